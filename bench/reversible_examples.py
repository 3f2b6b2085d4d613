"""The reversible-learning paper's three experiments (Maclaurin, Duvenaud & Adams 2015) on Fashion-MNIST (or
digits), through ``python -m stn_ext reversible --problem ...``; figures and numbers into bench/results/.

    OMP_NUM_THREADS=1 python bench/reversible_examples.py                 # all three, Fashion-MNIST
    python bench/reversible_examples.py --problems distill --data digits  # one, on digits

Writes bench/results/reversible-<problem>-<date>[-digits].png for each problem and
bench/results/reversible-examples-<date>[-digits].json / .md with the settings, times and results;
the run folders (state.pt etc.) go to --runs (default runs/reversible-examples/, not in the repository).
Extra options after ``--`` go to every run (say ``-- --meta-iters 10``).
"""
import argparse
import datetime
import json
import os
import shutil
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from stn_ext.checkpoint import atomic_write_json, atomic_write_text  # noqa: E402
from stn_ext.reversible import cli  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--problems", nargs="+", default=["schedules", "l2", "distill"])
    p.add_argument("--data", default="fashion-mnist", choices=["fashion-mnist", "digits"])
    p.add_argument("--runs", default=os.path.join(ROOT, "runs", "reversible-examples"))
    p.add_argument("--results", default=os.path.join(ROOT, "bench", "results"))
    p.add_argument("extra", nargs=argparse.REMAINDER)
    args = p.parse_args()
    extra = [a for a in args.extra if a != "--"]
    date = datetime.date.today().isoformat()
    tag = date + ("" if args.data == "fashion-mnist" else f"-{args.data}")
    results = {}
    for problem in args.problems:
        out = os.path.join(args.runs, f"{problem}-{args.data}")
        if os.path.isdir(out):
            shutil.rmtree(out)
        started = time.perf_counter()
        rc = cli.main(["--problem", problem, "--data", args.data, "--out", out] + extra)
        wall = time.perf_counter() - started
        with open(os.path.join(out, "result.json")) as f:
            report = json.load(f)
        report.update(rc=rc, wall_seconds=wall, seconds_per_meta_iter=report["seconds"] / report["meta_iters_done"])
        figure = os.path.join(args.results, f"reversible-{problem}-{tag}.png")
        shutil.copyfile(os.path.join(out, f"{problem}.png"), figure)
        report["figure"] = os.path.relpath(figure, ROOT)
        if problem == "schedules":
            import torch

            state = torch.load(os.path.join(out, "state.pt"), weights_only=True)
            report["learned_init_scales"] = state["hypers"]["log_init_scale"].exp().tolist()
        results[problem] = report
    atomic_write_json(os.path.join(args.results, f"reversible-examples-{tag}.json"),
                      {"date": date, "data": args.data, "extra": extra, "threads": os.environ.get("OMP_NUM_THREADS"),
                       "results": results})
    lines = [f"# Reversible-learning experiments on {args.data} ({date})", "",
             "| problem | hyperparameters | T | training images | meta-iterations | s / meta-iteration | "
             "validation loss first -> final | test loss | test accuracy first -> final | stopped |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        f, z = r["first"], r["final"]
        lines.append(f"| {name} | {r['hyperparameters']:,} | {r['settings']['steps']} | {r['train_images']:,} | "
                     f"{r['meta_iters_done']} | {r['seconds_per_meta_iter']:.2f} | {f['val_loss']:.4f} -> "
                     f"{z['val_loss']:.4f} | {z['test_loss']:.4f} | {f['test_acc']:.4f} -> {z['test_acc']:.4f} | "
                     f"{r['stopped'] or 'no'} |")
    atomic_write_text(os.path.join(args.results, f"reversible-examples-{tag}.md"), "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
