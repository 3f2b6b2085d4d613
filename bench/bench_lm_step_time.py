"""Time per weight step of stn and delta-stn against fixed on bench_lm.py's language model (issue 23's 1.5x).
Each round trains fixed, stn and delta-stn in turn (--steps weight steps each, bench_lm's model, data and
TrainConfig defaults, one thread) and takes the ratio of the trainer's own step time (`wall_s`: weight and hyper
steps, the warm-up's tenth of the steps included as in the bench, evaluations and checkpoints not) within the
round, so a machine that drifts hits all three alike. Reported: the median ratio over --rounds with the range.
Writes bench/results/lm-step-time-<date>.md.

    python bench/bench_lm_step_time.py            # ~6 minutes on a 2-core CPU
"""
import argparse
import datetime
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_lm  # noqa: E402
from stn_ext.checkpoint import atomic_write_text  # noqa: E402
from stn_ext.tuning import Trainer  # noqa: E402

METHODS = ("fixed", "stn", "delta-stn")


def step_time(a, data, method, seed):
    torch.manual_seed(seed)
    return Trainer(bench_lm.lm_config(a, method, seed), data=data).fit()["wall_s"] / a.steps


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=200, help="weight steps per run (default 200)")
    p.add_argument("--rounds", type=int, default=3, help="rounds (default 3)")
    p.add_argument("--out", default=bench_lm.RESULTS)
    a = p.parse_args(argv)
    # bench_lm's defaults for the model and data; one evaluation at each end on a short slice (not timed)
    cfg = bench_lm.parse(["--steps", str(a.steps), "--eval-tokens", "3500", "--evals", "1"])
    torch.set_num_threads(1)
    data = bench_lm._data(cfg)
    step_time(argparse.Namespace(**{**vars(cfg), "steps": 20}), data, "fixed", 0)  # first-call costs out of round 0
    times = {m: [] for m in METHODS}
    for rnd in range(a.rounds):
        for m in METHODS:
            times[m].append(step_time(cfg, data, m, rnd))
        print(f"round {rnd}: " + ", ".join(f"{m} {times[m][-1] * 1e3:.1f} ms" for m in METHODS), flush=True)
    date = datetime.date.today().isoformat()
    cells = []
    for m in METHODS[1:]:
        r = [t / f for t, f in zip(times[m], times["fixed"])]
        cells.append(f"{statistics.median(r):.2f}x [{min(r):.2f}-{max(r):.2f}]")
    lines = [f"# LSTM language model: time per weight step vs fixed ({date}, torch {torch.__version__}, "
             "bench_lm_step_time.py)", "",
             f"bench_lm.py's model and data (LSTM 128-128, tied embedding, 10k vocabulary, batch 20 x 35 tokens, the "
             f"seven hyperparameters), {a.steps} weight steps per run (the first tenth the warm-up, without hyper "
             f"steps), {a.rounds} rounds, one thread; ratio of the trainer's step time (weight and hyper steps) to "
             "fixed's in the same round, median [range].", "",
             "| fixed ms/step (median) | stn | delta-stn |", "|---|---|---|",
             f"| {statistics.median(times['fixed']) * 1e3:.1f} | " + " | ".join(cells) + " |"]
    print(lines[-1])
    os.makedirs(a.out, exist_ok=True)
    atomic_write_text(os.path.join(a.out, f"lm-step-time-{date}.md"), "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
