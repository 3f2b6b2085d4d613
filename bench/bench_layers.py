"""Microbenchmark: STN layers against the plain layer and the pure-PyTorch reference (eager and
torch.compile), forward+backward, all variants timed in one run so their ratios can be compared.

    python bench/bench_layers.py                          # CPU float32, every shape of bench/cases.py but the largest
    python bench/bench_layers.py --all                    # every shape
    python bench/bench_layers.py --device cuda --dtype bfloat16
    python bench/bench_layers.py --only lstm              # one layer kind: linear, conv, lstm or embedding
    python bench/bench_layers.py --overhead               # per-call overhead at tiny shapes (bench_overhead.py)
Writes bench/results/<device>-<dtype>-<date>.{md,json,png} (with --overhead: overhead-<device>.{md,json}).
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

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import stn_ext  # noqa: E402
from cases import (CONV_CASES, CPU_SKIP, EMBEDDING_CASES, LINEAR_CASES, LSTM_CASES, fwd_bwd, saved_bytes,  # noqa: E402
                   variants)


def time_once(step, device):
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    step()
    return time.perf_counter() - t0


def cuda_peak(step):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def measure(vs, device, repeats, warmup):
    """Median seconds per variant; the variants are interleaved so drift in speed hits them alike."""
    steps = {name: fwd_bwd(fn, inputs) for name, (fn, inputs) in vs.items()}
    for step in steps.values():
        for _ in range(warmup):
            time_once(step, device)
    times = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            times[name].append(time_once(step, device))
    result = {}
    for name, (fn, inputs) in vs.items():
        result[name] = dict(seconds=statistics.median(times[name]), saved_mib=saved_bytes(fn, inputs) / 2**20)
        if device == "cuda":
            result[name]["peak_mib"] = cuda_peak(steps[name]) / 2**20
    return result


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--all", action="store_true", help="include the shapes skipped on CPU (B=8192 4096->4096)")
    ap.add_argument("--repeats", type=int, default=10, help="timed repeats per variant (the median is reported)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed runs first (torch.compile compiles here)")
    ap.add_argument("--rounds", type=int, default=3,
                    help="measure each case this many times; the table shows the median ratio and its range")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile'd reference")
    ap.add_argument("--only", choices=["linear", "conv", "lstm", "embedding"], help="time one layer kind only")
    ap.add_argument("--overhead", action="store_true",
                    help="time the per-call overhead at tiny shapes instead (B=2 4->4, B=32 64->64; bench_overhead.py)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args(argv)
    if args.device == "cuda" and not (torch.cuda.is_available() and stn_ext.has_cuda()):
        sys.exit("bench: --device cuda needs a GPU and a CUDA build of stn_ext")
    if args.overhead:
        import bench_overhead
        return bench_overhead.main(["--device", args.device, "--rounds", str(max(1, args.rounds)), "--out", args.out])
    dtype = getattr(torch, args.dtype)
    kinds = [("Linear", "linear", LINEAR_CASES), ("Conv2d 3x3", "conv", CONV_CASES), ("LSTM", "lstm", LSTM_CASES),
             ("Embedding", "embedding", EMBEDDING_CASES)]
    todo = [(kind, c) for kind, flag, cases in kinds if args.only in (None, flag) for c in cases]
    if args.device == "cpu" and not args.all:
        todo = [(k, c) for k, c in todo if c not in CPU_SKIP]
    rows = []
    for kind, case in todo:
        vs = variants("Conv2d" if kind.startswith("Conv2d") else kind, case, args.device, dtype, not args.no_compile)
        rounds = [measure(vs, args.device, args.repeats, args.warmup) for _ in range(max(1, args.rounds))]
        rows.append(dict(layer=kind, shape=_shape_name(kind, case), results=combine_rounds(rounds)))
        print(_summary(rows[-1]), flush=True)
    _write(rows, args)


def combine_rounds(rounds):
    """Per variant: median seconds over the rounds, and the median, min and max of its ratio to the
    plain layer measured in the same round (a shared machine drifts between rounds)."""
    combined = {}
    for name in rounds[0]:
        ratios = [r[name]["seconds"] / r["plain"]["seconds"] for r in rounds]
        combined[name] = dict(rounds[-1][name], seconds=statistics.median(r[name]["seconds"] for r in rounds),
                              ratio=statistics.median(ratios), ratio_min=min(ratios), ratio_max=max(ratios))
    return combined


def _shape_name(kind, case):
    if kind == "Linear":
        B, i, o, n = case
        return f"B={B} {i}->{o} n={n}"
    if kind == "LSTM":
        T, B, i, h, layers, n = case
        return f"T={T} B={B} {i}/{h} {layers} layers n={n}"
    if kind == "Embedding":
        (T, B), vocab, dim, n = case
        return f"T={T} B={B} {vocab}x{dim} n={n}"
    B, ci, co, hw, n = case
    return f"B={B} {ci}->{co} {hw}x{hw} n={n}"


def _summary(row):
    base = row["results"]["plain"]["seconds"]
    ratios = ", ".join(f"{k} {v['ratio']:.2f}x" for k, v in row["results"].items() if k != "plain")
    return f"{row['layer']} {row['shape']}: plain {base * 1e3:.2f} ms; {ratios}"


def _device_name(device):
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"{platform.machine()} CPU, {torch.get_num_threads()} threads"


def _write(rows, args):
    os.makedirs(args.out, exist_ok=True)
    stamp = datetime.date.today().isoformat()
    base = os.path.join(args.out, f"{args.device}-{args.dtype}-{stamp}")
    meta = dict(device=_device_name(args.device), dtype=args.dtype, torch=torch.__version__, date=stamp,
                repeats=args.repeats, warmup=args.warmup, rounds=args.rounds)
    with open(base + ".json", "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)
    with open(base + ".md", "w") as f:
        f.write(markdown_table(rows, meta))
    _plot(rows, meta, base + ".png")
    print(f"wrote {base}.md, .json and .png")


def markdown_table(rows, meta):
    names = list(dict.fromkeys(k for r in rows for k in r["results"] if k != "plain"))
    lines = [f"# STN layers vs plain layers: {meta['device']}, {meta['dtype']}, torch {meta['torch']}, {meta['date']}",
             "",
             f"Forward+backward. Each cell is the variant's median time divided by the plain layer's (nn.Linear / "
             f"nn.Conv2d / nn.LSTM / nn.Embedding) measured in the same round, the median over {meta.get('rounds', 1)} rounds with the "
             f"smallest and largest in brackets, then the activation memory autograd keeps for backward (MiB, "
             f"parameters not counted).", "",
             "| layer | shape | plain (ms) | " + " | ".join(names) + " |", "|---|---|---|" + "---|" * len(names)]
    for r in rows:
        res = r["results"]
        base = res["plain"]["seconds"]
        cells = [f"{res[k]['ratio']:.2f}x ({res[k]['ratio_min']:.2f}-{res[k]['ratio_max']:.2f}) "
                 f"{res[k]['saved_mib']:.0f} MiB" if k in res else "" for k in names]
        lines.append(f"| {r['layer']} | {r['shape']} | {base * 1e3:.2f}, {res['plain']['saved_mib']:.0f} MiB | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _plot(rows, meta, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(k for r in rows for k in r["results"] if k != "plain"))
    fig, ax = plt.subplots(figsize=(max(6, 2.2 * len(rows)) + 2.5, 4))
    width = 0.8 / len(names)
    for j, name in enumerate(names):
        ys = [r["results"][name]["ratio"] if name in r["results"] else 0 for r in rows]
        ax.bar([i + j * width for i in range(len(rows))], ys, width, label=name)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(rows))])
    ax.set_xticklabels([f"{r['layer']}\n{r['shape']}" for r in rows], fontsize=7)
    ax.set_ylabel("time / plain layer (fwd+bwd)")
    ax.set_title(f"{meta['device']}, {meta['dtype']}", fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
