"""Time per weight step of stn and delta-stn relative to fixed on the digits protocol (issue 11's 2.0x / 3.0x).

Each round trains fixed, stn and delta-stn in turn (--steps weight steps each, TrainConfig defaults, one
thread) and takes the ratio of the trainer's own step time (`wall_s`: weight and hyper steps, without
evaluation and checkpoints) within the round, so a machine that drifts hits all three alike. Reported: the
median ratio over --rounds with the range, for each perturbation mode. Writes
bench/results/tuning-digits-step-time-<date>.md.

    python bench/bench_digits_step_time.py            # ~4 minutes on a 2-core CPU
    python bench/bench_digits_step_time.py --perturb batch --set response_every=2 --tag response-every-2
"""
import argparse
import datetime
import statistics

import torch

import bench_tuning
from bench_tuning import digits_config, write_results
from stn_ext.tuning import Trainer
from stn_ext.tuning.problems import digits_mlp, digits_protocol

METHODS = ("fixed", "stn", "delta-stn")


def step_time(data, method, perturb, steps, seed):
    cfg = digits_config(method, seed, steps, perturb=perturb)
    torch.manual_seed(seed)
    return Trainer(cfg, data=data, model=digits_mlp(3)).fit()["wall_s"] / steps


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=600, help="weight steps per run (default 600)")
    p.add_argument("--rounds", type=int, default=8, help="rounds per perturbation mode (default 8)")
    p.add_argument("--perturb", type=lambda s: s.split(","), default=["batch", "example"],
                   help="perturbation modes to time (default batch,example)")
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                   help="a TrainConfig field for every run, as bench_tuning.py's --set (repeatable)")
    p.add_argument("--tag", default="", help="file name tuning-digits-step-time-<date>-<tag>.md")
    a = p.parse_args(argv)
    bench_tuning.OVERRIDES.clear()
    bench_tuning.OVERRIDES.update(bench_tuning._parse_sets(a.set))
    torch.set_num_threads(1)
    data = digits_protocol()
    step_time(data, "fixed", "batch", 50, 0)  # warm-up: first-call costs stay out of round 0
    date = datetime.date.today().isoformat()
    lines = [f"# Digits: time per weight step vs fixed ({date}, torch {torch.__version__}, bench_digits_step_time.py)",
             "", f"MLP 64-256-256-10, batch 100, {a.steps} weight steps per run, {a.rounds} rounds, one thread; ratio "
             "of the trainer's step time (weight and hyper steps) to fixed's in the same round, median [range].", "",
             "| perturbation | fixed ms/step (median) | stn | delta-stn |", "|---|---|---|---|"]
    if a.set:
        lines[4:4] = [f"Settings for every run: {', '.join(a.set)}.", ""]
    for perturb in a.perturb:
        times = {m: [] for m in METHODS}
        for rnd in range(a.rounds):
            for m in METHODS:
                times[m].append(step_time(data, m, perturb, a.steps, rnd))
        cells = []
        for m in METHODS[1:]:
            r = [t / f for t, f in zip(times[m], times["fixed"])]
            cells.append(f"{statistics.median(r):.2f}x [{min(r):.2f}-{max(r):.2f}]")
        lines.append(f"| {perturb} | {statistics.median(times['fixed']) * 1e3:.2f} | " + " | ".join(cells) + " |")
        print(lines[-1], flush=True)
    write_results(f"tuning-digits-step-time-{date}" + (f"-{a.tag}" if a.tag else "") + ".md", lines)


if __name__ == "__main__":
    main()
