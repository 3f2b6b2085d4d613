"""The default method on digits instances it was not chosen on (issue 22): fixed, STN and Delta-STN, defaults.

The real-data defaults were chosen on three protocols (digits 1000/400/397 at lr 0.01, the Fashion-MNIST MLP, the
CNN). This draws a family of digits instances, their training size, width and learning rate at random before any
run, and runs each method on each with its defaults from the protocol's start (three dropout rates at 0.05), so
that what the defaults do where lower or higher rates are better shows, not only where they were chosen.

    python bench/bench_digits_family.py                 # 10 instances, 3 seeds, 2000 steps (~15 min, one core)
    python bench/bench_digits_family.py --part 1/2      # half of the runs (two processes side by side), then
    python bench/bench_digits_family.py --merge A.json B.json   # one table from the parts
"""
import argparse
import datetime
import json
import math
import os
import random
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_tuning import OVERRIDES, RESULTS, _parse_sets, digits_run  # noqa: E402

from stn_ext.checkpoint import atomic_write_json, atomic_write_text  # noqa: E402
from stn_ext.data import Dataset, Split  # noqa: E402
from stn_ext.tuning.problems import digits_protocol  # noqa: E402

# "stn (no hyper steps)": STN's parameterisation with the rates frozen at their start (bench_tuning's digits
# control): what STN's hypernet gate alone does to the weights' step, apart from the schedule
METHODS = ("fixed", "stn (no hyper steps)", "stn", "delta-stn")


def draw_family(size, seed):
    """Instances: training size 150-1000 (the first n of the protocol's 1000; validation and test as the
    protocol's), width 32-256 log-uniform (two hidden layers), SGD learning rate 0.003-0.05 log-uniform."""
    r = random.Random(seed)
    return [{"name": f"i{k}", "n_train": r.randint(150, 1000), "width": round(math.exp(r.uniform(math.log(32),
             math.log(256)))), "lr": round(math.exp(r.uniform(math.log(0.003), math.log(0.05))), 4)}
            for k in range(size)]


def instance_data(full, n_train):
    tr = full.train
    return Dataset(Split(tr.x[:n_train], tr.y[:n_train]), full.val, full.test, full.task, full.n_classes, full.name)


def run(full, inst, method, seed, steps):
    """One run of bench_tuning's digits protocol on the instance: its training digits, width, lr and batch."""
    row = digits_run(instance_data(full, inst["n_train"]), method, seed, steps, hidden=(inst["width"],) * 2,
                     lr=inst["lr"], batch_size=min(100, inst["n_train"] // 2))
    return {**row, "instance": inst["name"], "wall_s": row["s_per_step"] * steps}


def table(family, rows, steps, seeds, family_seed, sets=None):
    """Per instance, each method's mean (and per-seed) best validation and test loss; then each method against fixed,
    and STN against its frozen parameterisation, where both ran."""
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    fmt = lambda v: f"{mean(v):.4f} ({', '.join(f'{x:.4f}' for x in v)})"  # noqa: E731
    ran = [m for m in METHODS if any(r["method"] == m for r in rows)]
    tuned = [m for m in ran if m in ("stn", "delta-stn")]
    out = [f"# Digits family: the defaults on instances they were not chosen on ({datetime.date.today()}, torch "
           f"{torch.__version__}, one torch thread)", "",
           f"{len(family)} instances drawn from random.Random({family_seed}) before any run (training size 150-1000: the "
           "first n of the digits protocol's 1000, its 400 validation and 397 test digits; two hidden layers of one "
           "width, 32-256 log-uniform; SGD lr 0.003-0.05 log-uniform, momentum 0.9; batch min(100, n/2)); three dropout "
           f"rates from 0.05; {steps} weight steps; seeds {', '.join(map(str, seeds))}; TrainConfig defaults otherwise"
           + (f", and {', '.join(f'{k}={v!r}' for k, v in sets.items())}" if sets else "") +
           ". Cells: mean over seeds (per seed); best validation loss, then final test loss.", "",
           "| instance | n_train | width | lr | " + " | ".join(f"{m} best val" for m in ran) + " | " +
           " | ".join(f"{m} test" for m in ran) + f" | final rates (seed 0): {'; '.join(tuned)} |",
           "|---|---|---|---|" + "---|" * (2 * len(ran) + 1)]
    pairs = [(m, "fixed") for m in ran[1:] if ran[0] == "fixed"] + \
        [("stn", "stn (no hyper steps)")] * ("stn" in ran and "stn (no hyper steps)" in ran)  # the tuning's own part
    diffs = {pair: {"best_val_loss": [], "test_loss": []} for pair in pairs}
    for inst in family:
        got = {m: [r for r in rows if r["instance"] == inst["name"] and r["method"] == m] for m in ran}
        if not all(got.values()):
            continue
        cell = {m: {k: [r[k] for r in got[m]] for k in ("best_val_loss", "test_loss")} for m in ran}
        for (m, base), d in diffs.items():
            for k in d:
                d[k].append(mean(cell[m][k]) - mean(cell[base][k]))
        rates = "; ".join(", ".join(f"{v:.2f}" for v in got[m][0]["hypers"].values()) for m in tuned)
        out.append(f"| {inst['name']} | {inst['n_train']} | {inst['width']} | {inst['lr']} | " +
                   " | ".join(fmt(cell[m]["best_val_loss"]) for m in ran) + " | " +
                   " | ".join(fmt(cell[m]["test_loss"]) for m in ran) + f" | {rates} |")
    if diffs:
        out += ["", "| method against | best val: instances below, mean difference | test: instances below, mean "
                "difference |", "|---|---|---|"]
        for (m, base), d in diffs.items():
            out.append(f"| {m} against {base} | " + " | ".join(
                f"{sum(x < 0 for x in v)} of {len(v)}, {mean(v):+.4f}" if v else "-" for v in d.values()) + " |")
    return "\n".join(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--family-size", type=int, default=10)
    p.add_argument("--family-seed", type=int, default=26)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--part", default="1/1", help="K/N: the K-th of N interleaved shares of the runs (default all)")
    p.add_argument("--merge", nargs="+", default=None, help="JSON files of parts: write one table from them")
    p.add_argument("--methods", default=",".join(METHODS), help="these methods only, comma-separated (default all)")
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                   help="a TrainConfig field for every run (a Python literal, as bench_tuning's --set); repeatable")
    p.add_argument("--tag", default="digits-family", help="results file names tuning-<date>-<tag>.*")
    p.add_argument("--out", default=RESULTS, help="folder for the table and JSON ('' for none)")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    OVERRIDES.clear()
    OVERRIDES.update(_parse_sets(a.set))
    methods = a.methods.split(",")
    if unknown := [m for m in methods if m not in METHODS]:
        raise SystemExit(f"bench_digits_family: unknown methods {unknown}; choose from {', '.join(METHODS)}")
    family, seeds = draw_family(a.family_size, a.family_seed), list(range(a.seeds))
    if a.merge:
        rows = [r for f in a.merge for r in json.load(open(f))["rows"]]
    else:
        k, n = map(int, a.part.split("/"))
        full, rows = digits_protocol(), []
        jobs = [(inst, m, s) for inst in family for s in seeds for m in methods]
        for inst, m, s in jobs[k - 1::n]:
            rows.append(run(full, inst, m, s, a.steps))
            r = rows[-1]
            print(f"{inst['name']} {m} seed {s}: best val {r['best_val_loss']:.4f}, test {r['test_loss']:.4f}, "
                  f"{r['wall_s']:.0f} s", file=sys.stderr, flush=True)
    text = table(family, rows, a.steps, seeds, a.family_seed, dict(OVERRIDES))
    print(text)
    if a.out:
        stem = f"tuning-{datetime.date.today().isoformat()}-{a.tag}" + ("" if a.merge or a.part == "1/1" else
                                                                       "-part" + a.part.replace("/", "of"))
        atomic_write_text(os.path.join(a.out, stem + ".md"), text + "\n")
        atomic_write_json(os.path.join(a.out, stem + ".json"),
                          {"family": family, "steps": a.steps, "seeds": seeds, "set": dict(OVERRIDES), "rows": rows})
    return rows


if __name__ == "__main__":
    main()
