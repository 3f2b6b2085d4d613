"""Benchmark: one exact reversible SGD-with-momentum step against torch.optim.SGD(momentum).

    python bench/bench_reversible.py [--numel 16777216] [--device cpu|cuda|all] [--rounds 3]

Times, in one run on one machine (variants interleaved over rounds; medians over repeats after
warm-up): the fused reversible step op
(stn_ext::reversible_step: velocity update with the exact momentum multiply and buffer push/pop,
weight update, float32 view), the whole ReversibleSGD.step (Python wrapper included), the reverse
step (unstep_weights + unstep_velocity), and torch.optim.SGD(momentum=0.9) with foreach=True and
fused=True where the device supports it; prints ratios to the fastest SGD and writes markdown and JSON
to bench/results/. Not a test: nothing is asserted about speed.
"""
import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import stn_ext  # noqa: E402
from stn_ext.reversible import ops as R  # noqa: E402
from stn_ext.reversible import ReversibleSGD  # noqa: E402


def timer(device):
    """time_once(fn) -> seconds of one call (CUDA events on a GPU)."""
    if device.type == "cuda":
        def time_once(fn):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
    else:
        def time_once(fn):
            t0 = time.perf_counter()
            fn()
            return time.perf_counter() - t0
    return time_once


def make_variants(device, numel):
    """{name: one call} for every variant, each on its own state; and a function returning the
    reversible op's status flags. The reverse step directly follows the forward op and undoes as many
    steps as the forward op took in the same round, so its buffer never runs dry."""
    gen = torch.Generator().manual_seed(0)
    w0 = (torch.randn(numel, generator=gen) * 0.1).to(device)
    g = (torch.randn(numel, generator=gen) * 0.01).to(device)
    lr, mom = 0.01, 0.9
    fns, errors = {}, {}
    for variant in ("foreach", "fused"):
        p = torch.nn.Parameter(w0.clone())
        p.grad = g.clone()
        try:
            opt = torch.optim.SGD([p], lr=lr, momentum=mom, **{variant: True})
            opt.step()
        except (RuntimeError, TypeError, ValueError) as err:
            errors[f"torch.optim.SGD {variant}"] = str(err).splitlines()[0][:120]
            continue
        fns[f"torch.optim.SGD {variant}"] = opt.step

    # the fused ops alone (what one reversible step costs at the kernel level)
    x = torch.round(w0.double() * 2.0**52).long()
    v = torch.zeros_like(x)
    head = torch.full_like(x, R.HEAD_EMPTY)
    count = torch.zeros(numel, dtype=torch.int32, device=device)
    words = torch.zeros((8, numel), dtype=torch.int32, device=device)  # momentum 0.9: no spill for ~1000 steps
    view = w0.clone()
    status = torch.zeros(2, dtype=torch.int64, device=device)
    num = R.gamma_num(mom)
    fns["reversible_step op"] = lambda: R.step(x, v, head, count, words, view, g, status, lr, num, 52)
    fns["reverse step ops (unstep_weights + unstep_velocity)"] = lambda: (
        R.unstep_weights(x, v, view, None, status, lr, 52),
        R.unstep_velocity(v, head, count, words, g, None, None, status, lr, num, 52))

    # the Python optimizer (status checks and capacity management included)
    p = torch.nn.Parameter(w0.clone())
    p.grad = g.clone()
    opt = ReversibleSGD([p])
    fns["ReversibleSGD.step"] = lambda: opt.step(lr, mom)
    return fns, errors, lambda: (opt.check(), int(status[0]))[1]


def measure_rounds(fns, time_once, repeats, warmup, rounds):
    """Per round, every variant in turn: warm-up calls, then the median of `repeats` timed calls. The
    ratio to the fastest torch SGD is taken within each round (a shared machine drifts between rounds);
    reported: the median over rounds and its range."""
    per_round = []
    for _ in range(rounds):
        medians = {}
        for name, fn in fns.items():
            for _ in range(warmup):
                fn()
            medians[name] = statistics.median(time_once(fn) for _ in range(repeats))
        per_round.append(medians)
    sgd = [k for k in fns if k.startswith("torch.optim.SGD")]
    results = {}
    for name in fns:
        secs = [r[name] for r in per_round]
        r = dict(seconds=statistics.median(secs), ms=statistics.median(secs) * 1e3)
        if sgd:
            ratios = [rd[name] / min(rd[k] for k in sgd) for rd in per_round]
            r.update(ratio_to_fastest_sgd=statistics.median(ratios), ratio_min=min(ratios), ratio_max=max(ratios))
        results[name] = r
    return results


# bytes each moves per element (reads + writes), for the memory-bound floor
BYTES_PER_ELEMENT = {
    "torch.optim.SGD foreach": 4 * 5, "torch.optim.SGD fused": 4 * 5,  # p, g, buf read; p, buf written
    # x, v, head, grad read; x, v, head, view written (the count and the words only on a spill or
    # refill, about every 32 / -log2(momentum) steps per element)
    "reversible_step op": 8 * 3 + 4 + 8 * 3 + 4,
    "ReversibleSGD.step": 8 * 3 + 4 + 8 * 3 + 4,
    # unstep_weights: x, v read; x, view written. unstep_velocity: v, head, grad read; v, head written
    "reverse step ops (unstep_weights + unstep_velocity)": (8 * 2 + 8 + 4) + (8 * 2 + 4 + 8 * 2),
}


def bench_device(device, numel, repeats, warmup, rounds):
    fns, errors, finish = make_variants(device, numel)
    results = measure_rounds(fns, timer(device), repeats, warmup, rounds)
    flags = finish()
    for name, b in BYTES_PER_ELEMENT.items():
        if name in results:
            results[name]["bytes_per_element"] = b
            results[name]["GB_per_s_moved"] = b * numel / results[name]["seconds"] / 1e9
    results.update({name: {"error": err} for name, err in errors.items()})
    return results, flags


def machine(device):
    info = {"python": platform.python_version(), "torch": torch.__version__, "stn_ext_cuda": stn_ext.has_cuda()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    else:
        cpu = platform.processor() or ""
        try:
            with open("/proc/cpuinfo") as f:
                for line in f:
                    if line.startswith("model name"):
                        cpu = line.split(":", 1)[1].strip()
                        break
        except OSError:
            pass
        info["cpu"] = cpu
        info["threads"] = torch.get_num_threads()
        info["cores"] = os.cpu_count()
    return info


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--numel", type=int, default=1 << 24, help="elements in the parameter (default 2^24)")
    ap.add_argument("--device", choices=["cpu", "cuda", "all"], default="all")
    ap.add_argument("--repeats", type=int, default=10, help="timed calls per variant and round (median)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed calls per variant before each round's timing")
    ap.add_argument("--rounds", type=int, default=3,
                    help="rounds over all variants; the table shows the median ratio and its range")
    ap.add_argument("--out", default=os.path.join(HERE, "results"), help="folder for the markdown/JSON results")
    args = ap.parse_args(argv)
    devices = ["cpu", "cuda"] if args.device == "all" else [args.device]
    if "cuda" in devices and not (torch.cuda.is_available() and stn_ext.has_cuda()):
        if args.device == "cuda":
            raise SystemExit("no GPU, or stn_ext was built without CUDA")
        devices.remove("cuda")
    os.makedirs(args.out, exist_ok=True)
    for name in devices:
        device = torch.device(name)
        results, flags = bench_device(device, args.numel, args.repeats, args.warmup, args.rounds)
        info = machine(device)
        lines = [f"# Reversible SGD step vs torch.optim.SGD(momentum=0.9), {args.numel} elements, {name}", "",
                 "Machine: " + ", ".join(f"{k}={v}" for k, v in info.items()), "",
                 f"Each variant in turn, per round: {args.warmup} warm-up calls, then the median of {args.repeats} "
                 f"timed calls; ms and the ratio to the fastest torch SGD of the same round are the median over "
                 f"{args.rounds} rounds, with the ratio's range in brackets.", "",
                 "| what | ms | ratio to fastest SGD | bytes/elem | GB/s moved |", "|---|---|---|---|---|"]
        for k, r in results.items():
            if "seconds" not in r:
                lines.append(f"| {k} | n/a ({r['error']}) | | | |")
                continue
            ratio = (f"{r['ratio_to_fastest_sgd']:.2f}x ({r['ratio_min']:.2f}-{r['ratio_max']:.2f})"
                     if "ratio_to_fastest_sgd" in r else "")
            bpe = r.get("bytes_per_element", "")
            gbs = f"{r['GB_per_s_moved']:.1f}" if r.get("GB_per_s_moved") else ""
            lines.append(f"| {k} | {r['ms']:.3f} | {ratio} | {bpe} | {gbs} |")
        if flags:
            lines.append(f"\nWARNING: the reversible op reported status flags {flags}")
        text = "\n".join(lines)
        print(text + "\n")
        stem = os.path.join(args.out, f"reversible_{name}")
        with open(stem + ".md", "w") as f:
            f.write(text + "\n")
        with open(stem + ".json", "w") as f:
            json.dump({"numel": args.numel, "device": name, "machine": info, "repeats": args.repeats,
                       "warmup": args.warmup, "rounds": args.rounds, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
