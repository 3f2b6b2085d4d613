"""Microbenchmark: STN layers against the plain layer and the pure-PyTorch reference, forward+backward.

Every variant is timed in the same run, so the ratios (to nn.Linear / nn.Conv2d) are what to read.
    python bench/bench_layers.py                       # CPU, float32, default shapes
    python bench/bench_layers.py --device cuda --dtype bfloat16 --compile
Writes bench/results/<device>-<date>.md and .json.
"""
import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import stn_ext
from stn_ext import functional as Fn
from stn_ext import reference as R

LINEAR_SHAPES = {"small": [(256, 256, 256)], "default": [(64, 256, 256), (256, 512, 512), (1024, 1024, 1024)],
                 "large": [(1024, 1024, 1024), (8192, 4096, 4096)]}
CONV_SHAPES = {"small": [(8, 16, 16, 16)], "default": [(32, 32, 32, 16), (64, 64, 64, 16)],
               "large": [(64, 64, 64, 32), (128, 128, 128, 16)]}
N_HYPER = 4


def timer(device):
    if device == "cuda":
        def run(fn, repeats):
            times = []
            for _ in range(repeats):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            return times
    else:
        def run(fn, repeats):
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
            return times
    return run


def fwd_bwd(fn, inputs):
    def step():
        y = fn(*inputs)
        y.backward(torch.ones_like(y))
    return step


def linear_variants(B, n_in, n_out, device, dtype, compile_):
    mk = lambda *s: (torch.randn(*s, device=device, dtype=dtype) * 0.1).requires_grad_()  # noqa: E731
    x = mk(B, n_in)
    p = [mk(n_out, n_in), mk(n_out, n_in), mk(n_out, N_HYPER), mk(n_out), mk(n_out), mk(n_out, N_HYPER)]
    lam_shared, lam_ex = mk(N_HYPER), mk(B, N_HYPER)
    v = {
        "plain": (lambda x, w, b: F.linear(x, w, b), [x, p[0], p[3]]),
        "stn shared": (Fn.stn_linear, [x, lam_shared] + p),
        "stn per-example": (Fn.stn_linear, [x, lam_ex] + p),
        "reference shared": (R.stn_linear, [x, lam_shared] + p),
        "reference per-example": (R.stn_linear, [x, lam_ex] + p),
    }
    if compile_:
        v["compiled reference shared"] = (torch.compile(R.stn_linear), [x, lam_shared] + p)
        v["compiled reference per-example"] = (torch.compile(R.stn_linear), [x, lam_ex] + p)
    return v


def conv_variants(B, c_in, c_out, hw, device, dtype, compile_):
    mk = lambda *s: (torch.randn(*s, device=device, dtype=dtype) * 0.1).requires_grad_()  # noqa: E731
    x = mk(B, c_in, hw, hw)
    p = [mk(c_out, c_in, 3, 3), mk(c_out, c_in, 3, 3), mk(c_out, N_HYPER), mk(c_out), mk(c_out), mk(c_out, N_HYPER)]
    lam_shared, lam_ex = mk(N_HYPER), mk(B, N_HYPER)
    conv = lambda fn: (lambda *a: fn(*a, padding=1))  # noqa: E731
    v = {
        "plain": (lambda x, w, b: F.conv2d(x, w, b, padding=1), [x, p[0], p[3]]),
        "stn shared": (conv(Fn.stn_conv2d), [x, lam_shared] + p),
        "stn per-example": (conv(Fn.stn_conv2d), [x, lam_ex] + p),
        "reference shared": (conv(R.stn_conv2d), [x, lam_shared] + p),
        "reference per-example": (conv(R.stn_conv2d), [x, lam_ex] + p),
    }
    if compile_:
        v["compiled reference per-example"] = (torch.compile(conv(R.stn_conv2d)), [x, lam_ex] + p)
    return v


def measure(variants, device, repeats, warmup):
    run = timer(device)
    out = {}
    steps = {name: fwd_bwd(fn, inputs) for name, (fn, inputs) in variants.items()}
    for step in steps.values():
        run(step, warmup)
    # Interleave the variants so drift in machine speed hits them alike.
    times = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            times[name] += run(step, 1)
    for name, t in times.items():
        out[name] = statistics.median(t)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "float64"])
    ap.add_argument("--shapes", default="default", choices=sorted(LINEAR_SHAPES))
    ap.add_argument("--repeats", type=int, default=15, help="timed repeats per variant (median reported)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--compile", action="store_true", help="also time torch.compile'd reference")
    ap.add_argument("--no-conv", action="store_true", help="skip the Conv2d shapes")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args(argv)
    if args.device == "cuda" and not (torch.cuda.is_available() and stn_ext.has_cuda()):
        sys.exit("bench: --device cuda needs a GPU and a CUDA build of stn_ext")
    dtype = getattr(torch, args.dtype)
    rows = []
    for B, i, o in LINEAR_SHAPES[args.shapes]:
        t = measure(linear_variants(B, i, o, args.device, dtype, args.compile), args.device, args.repeats, args.warmup)
        rows.append(dict(layer="Linear", shape=f"B={B} {i}->{o}", times=t))
        print(_row(rows[-1]), flush=True)
    if not args.no_conv:
        for B, ci, co, hw in CONV_SHAPES[args.shapes]:
            t = measure(conv_variants(B, ci, co, hw, args.device, dtype, args.compile), args.device, args.repeats,
                        args.warmup)
            rows.append(dict(layer="Conv2d 3x3", shape=f"B={B} {ci}->{co} {hw}x{hw}", times=t))
            print(_row(rows[-1]), flush=True)
    _write(rows, args)


def _row(r):
    base = r["times"]["plain"]
    ratios = ", ".join(f"{k} {v / base:.2f}x" for k, v in r["times"].items() if k != "plain")
    return f"{r['layer']} {r['shape']}: plain {base * 1e3:.3f} ms; {ratios}"


def _device_name(device):
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def _write(rows, args):
    os.makedirs(args.out, exist_ok=True)
    stamp = datetime.date.today().isoformat()
    base = os.path.join(args.out, f"layers-{args.device}-{args.dtype}-{stamp}")
    meta = dict(device=_device_name(args.device), dtype=args.dtype, torch=torch.__version__, date=stamp,
                repeats=args.repeats, n_hyper=N_HYPER, note="forward+backward, median seconds; ratios to plain")
    with open(base + ".json", "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)
    names = [k for k in rows[0]["times"] if k != "plain"]
    lines = [f"# STN layers vs plain layers, {meta['device']}, {args.dtype}, torch {torch.__version__}, {stamp}", "",
             "Forward+backward, median of the repeats; each entry is the ratio of its time to the plain layer's "
             f"(nn.Linear / nn.Conv2d) in the same run; n_hyper={N_HYPER}.", "",
             "| layer | shape | plain (ms) | " + " | ".join(names) + " |",
             "|---|---|---|" + "---|" * len(names)]
    for r in rows:
        base_t = r["times"]["plain"]
        cells = [f"{r['times'][k] / base_t:.2f}x" if k in r["times"] else "" for k in names]
        lines.append(f"| {r['layer']} | {r['shape']} | {base_t * 1e3:.3f} | " + " | ".join(cells) + " |")
    with open(base + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {base}.md and .json")


if __name__ == "__main__":
    main()
