"""Per-call overhead of the STN layers at tiny shapes (issue 14), where the fixed cost of a call, not the
arithmetic, decides: forward (no grad) and forward+backward of nn.Linear, the pure-PyTorch reference and our
fused layer, shared and per-example lam, at B=2 4->4 and B=32 64->64 (n_hyper 2).

Each round times the variants in interleaved blocks of ``--calls`` calls, each variant's median over its ``--blocks`` blocks;
the figure reported is the median over ``--rounds`` rounds with the range in brackets, and the ratio of our
layer to the reference of the same lam measured in the same round. Writes bench/results/overhead-<device>.md
and .json.

    python bench/bench_overhead.py            # ~1 minute on a 2-core CPU
"""
import argparse
import datetime
import json
import os
import statistics
import time

import torch
import torch.nn.functional as F

from stn_ext import functional as Fn
from stn_ext import reference as R

SHAPES = [(2, 4, 4), (32, 64, 64)]
N_HYPER = 2
VARIANTS = ["nn.Linear", "reference shared", "stn shared", "reference per-example", "stn per-example"]


def make(shape, device):
    B, n_in, n_out = shape
    leaf = lambda *s: (torch.randn(*s, device=device) * 0.1).requires_grad_()  # noqa: E731
    x = leaf(B, n_in)
    p = [leaf(n_out, n_in), leaf(n_out, n_in), leaf(n_out, N_HYPER), leaf(n_out), leaf(n_out), leaf(n_out, N_HYPER)]
    shared, per_ex = leaf(N_HYPER), leaf(B, N_HYPER)
    return {"nn.Linear": lambda: F.linear(x, p[0], p[3]),
            "reference shared": lambda: R.stn_linear(x, shared, *p),
            "stn shared": lambda: Fn.stn_linear(x, shared, *p),
            "reference per-example": lambda: R.stn_linear(x, per_ex, *p),
            "stn per-example": lambda: Fn.stn_linear(x, per_ex, *p)}


def time_block(fn, backward, calls):
    if backward:
        def step():
            fn().sum().backward()
    else:
        def step():
            with torch.no_grad():
                fn()
    sync = torch.cuda.synchronize if torch.cuda.is_available() and torch.cuda.is_initialized() else (lambda: None)
    sync()
    t = time.perf_counter()
    for _ in range(calls):
        step()
    sync()  # on a GPU: the kernels' time too, where they outlast the launches
    return (time.perf_counter() - t) / calls * 1e6  # us per call


def one_round(device, calls, blocks):
    out = {}
    for shape in SHAPES:
        fns = make(shape, device)
        for backward in (False, True):
            for name in VARIANTS:
                time_block(fns[name], backward, calls // 10)  # warm-up
            # blocks of the variants interleaved, so a drift of the machine within the round hits them alike
            times = {name: [] for name in VARIANTS}
            for _ in range(blocks):
                for name in VARIANTS:
                    times[name].append(time_block(fns[name], backward, calls))
            for name in VARIANTS:
                out[(shape, backward, name)] = statistics.median(times[name])
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--calls", type=int, default=300)
    ap.add_argument("--blocks", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    rounds = [one_round(a.device, a.calls, a.blocks) for _ in range(a.rounds)]
    rows = []
    for shape in SHAPES:
        for backward in (False, True):
            for name in VARIANTS:
                us = [r[(shape, backward, name)] for r in rounds]
                ref = "reference " + name.split(" ", 1)[1] if name.startswith("stn") else None
                ratio = [r[(shape, backward, name)] / r[(shape, backward, ref)] for r in rounds] if ref else None
                rows.append({"shape": "B=%d %d->%d" % shape, "pass": "forward+backward" if backward else "forward",
                             "variant": name, "us": statistics.median(us), "us_range": [min(us), max(us)],
                             "ratio_to_reference": statistics.median(ratio) if ratio else None,
                             "ratio_range": [min(ratio), max(ratio)] if ratio else None})
    lines = [f"# Per-call overhead, {a.device}, torch {torch.__version__}, {datetime.date.today().isoformat()}", "",
             f"us per call: median of {a.blocks} blocks of {a.calls} calls (the variants' blocks interleaved), then the median over {a.rounds} rounds "
             "[range]; ratio: our layer over the reference of the same lam, in the same round.", "",
             "| shape | pass | variant | us per call | ratio to reference |", "|---|---|---|---|---|"]
    for r in rows:
        ratio = f"{r['ratio_to_reference']:.2f}x ({r['ratio_range'][0]:.2f}-{r['ratio_range'][1]:.2f})" \
            if r["ratio_to_reference"] else ""
        lines.append(f"| {r['shape']} | {r['pass']} | {r['variant']} | {r['us']:.1f} "
                     f"[{r['us_range'][0]:.1f}-{r['us_range'][1]:.1f}] | {ratio} |")
    md = "\n".join(lines)
    print(md)
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, f"overhead-{a.device}.md"), "w") as f:
            f.write(md + "\n")
        with open(os.path.join(a.out, f"overhead-{a.device}.json"), "w") as f:
            json.dump({"torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
