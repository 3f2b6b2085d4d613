"""Benchmark: one exact reversible SGD-with-momentum step against torch.optim.SGD(momentum).

    python bench/bench_reversible.py [--numel 16777216] [--device cpu|cuda|all] [--repeats 20]

Times, in one run on one machine (medians over repeats after warm-up): the fused reversible step op
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
from stn_ext import reversible_ops as R  # noqa: E402
from stn_ext.reversible import ReversibleSGD  # noqa: E402


def timer(device):
    if device.type == "cuda":
        def measure(fn, repeats, warmup):
            for _ in range(warmup):
                fn()
            torch.cuda.synchronize()
            times = []
            for _ in range(repeats):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            return statistics.median(times)
    else:
        def measure(fn, repeats, warmup):
            for _ in range(warmup):
                fn()
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
            return statistics.median(times)
    return measure


def bench_device(device, numel, repeats, warmup):
    measure = timer(device)
    gen = torch.Generator().manual_seed(0)
    w0 = (torch.randn(numel, generator=gen) * 0.1).to(device)
    g = (torch.randn(numel, generator=gen) * 0.01).to(device)
    lr, mom = 0.01, 0.9
    results = {}

    # torch.optim.SGD variants
    for variant in ("foreach", "fused"):
        p = torch.nn.Parameter(w0.clone())
        p.grad = g.clone()
        try:
            opt = torch.optim.SGD([p], lr=lr, momentum=mom, **{variant: True})
            opt.step()
        except (RuntimeError, TypeError, ValueError) as err:
            results[f"torch.optim.SGD {variant}"] = {"error": str(err).splitlines()[0][:120]}
            continue
        results[f"torch.optim.SGD {variant}"] = {"seconds": measure(opt.step, repeats, warmup)}

    # the fused op alone (what one reversible step costs at the kernel level)
    steps = repeats + warmup
    n = numel
    x = torch.round(w0.double() * 2.0**52).long()
    v = torch.zeros_like(x)
    head = torch.full_like(x, R.HEAD_EMPTY)
    count = torch.zeros(n, dtype=torch.int32, device=device)
    words = torch.zeros((4, n), dtype=torch.int32, device=device)  # momentum 0.9: no spill within ~100 steps
    view = w0.clone()
    status = torch.zeros(2, dtype=torch.int64, device=device)
    num = R.gamma_num(mom)
    results["reversible_step op"] = {"seconds": measure(
        lambda: R.step(x, v, head, count, words, view, g, status, lr, num, 52), repeats, warmup)}
    results["reverse step ops (unstep_weights + unstep_velocity)"] = {"seconds": measure(
        lambda: (R.unstep_weights(x, v, view, None, status, lr, 52),
                 R.unstep_velocity(v, head, count, words, g, None, None, status, lr, num, 52)), steps - 1, 1)}
    flags = int(status[0])
    del x, v, head, count, words, view

    # the Python optimizer (status checks and capacity management included)
    p = torch.nn.Parameter(w0.clone())
    p.grad = g.clone()
    opt = ReversibleSGD([p])
    results["ReversibleSGD.step"] = {"seconds": measure(lambda: opt.step(lr, mom), repeats, warmup)}
    opt.check()
    del opt, p

    sgd = [r["seconds"] for k, r in results.items() if k.startswith("torch.optim.SGD") and "seconds" in r]
    best = min(sgd) if sgd else None
    for r in results.values():
        if "seconds" in r:
            r["ms"] = r["seconds"] * 1e3
            if best:
                r["ratio_to_fastest_sgd"] = r["seconds"] / best
            r["GB_per_s_moved"] = None
    # bytes each moves per element (reads + writes), for the memory-bound floor
    bytes_per_elem = {
        "torch.optim.SGD foreach": 4 * 5, "torch.optim.SGD fused": 4 * 5,  # p, g, buf read; p, buf written
        # x, v, head, grad read; x, v, head, view written (the count and the words only on a spill or
        # refill, about every 32 / -log2(momentum) steps per element)
        "reversible_step op": 8 * 3 + 4 + 8 * 3 + 4,
        "ReversibleSGD.step": 8 * 3 + 4 + 8 * 3 + 4,
    }
    for k, b in bytes_per_elem.items():
        if k in results and "seconds" in results[k]:
            results[k]["bytes_per_element"] = b
            results[k]["GB_per_s_moved"] = b * numel / results[k]["seconds"] / 1e9
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
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
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
        results, flags = bench_device(device, args.numel, args.repeats, args.warmup)
        info = machine(device)
        lines = [f"# Reversible SGD step vs torch.optim.SGD(momentum=0.9), {args.numel} elements, {name}", "",
                 "Machine: " + ", ".join(f"{k}={v}" for k, v in info.items()), "",
                 f"Medians of {args.repeats} repeats after {args.warmup} warm-up calls, one run.", "",
                 "| what | ms | ratio to fastest SGD | bytes/elem | GB/s moved |", "|---|---|---|---|---|"]
        for k, r in results.items():
            if "seconds" not in r:
                lines.append(f"| {k} | n/a ({r['error']}) | | | |")
                continue
            ratio = f"{r['ratio_to_fastest_sgd']:.2f}x" if "ratio_to_fastest_sgd" in r else ""
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
                       "warmup": args.warmup, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
