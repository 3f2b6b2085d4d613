"""Can a dropout schedule beat the best fixed rates on the digits protocol (issue 11)?

Delta-STN trains and evaluates the plain network at the user's step, so on digits at lr 0.01 its best
validation loss is bounded by what a dropout schedule can earn there. This runs `fixed` with hand-made
schedules of (input rate, hidden rate) against the best constant rates of the grid (0.02, 0.5;
`bench_tuning.py --grid`), 2 seeds, 3000 weight steps, TrainConfig defaults otherwise, and writes
bench/results/tuning-digits-schedules-<date>.md.

    python bench/bench_digits_schedules.py      # ~3 minutes on one core
"""
import datetime

import torch

from bench_tuning import digits_config, write_results
from stn_ext.tuning import Trainer
from stn_ext.tuning.problems import digits_mlp, digits_protocol

STEPS, SEEDS = 3000, 2


def ramp(a, b):
    return lambda t: a + (b - a) * t / STEPS


def switch(a, b, at):
    return lambda t: a if t < at else b


def const(a):
    return lambda t: a


SCHEDULES = {  # name: (input rate at step t, hidden rate at step t)
    "constant 0.02 / 0.5 (the grid's best)": (const(0.02), const(0.5)),
    "hidden ramp 0.05 -> 0.6": (const(0.02), ramp(0.05, 0.6)),
    "hidden ramp 0.3 -> 0.7": (const(0.02), ramp(0.3, 0.7)),
    "hidden 0.05, 0.5 from step 600": (const(0.02), switch(0.05, 0.5, 600)),
    "hidden 0.5, 0.2 from step 1500": (const(0.02), switch(0.5, 0.2, 1500)),
    "input ramp 0 -> 0.1, hidden ramp 0.2 -> 0.6": (ramp(0.0, 0.1), ramp(0.2, 0.6)),
}


class ScheduledTrainer(Trainer):
    """A fixed run whose dropout rates follow a schedule (set before each weight step)."""

    schedule = None

    def weight_step(self):
        rate_in, rate_hidden = (f(self.step) for f in self.schedule)
        values = {"dropout.in": rate_in, "dropout.h1": rate_hidden, "dropout.h2": rate_hidden}
        with torch.no_grad():
            self.u.copy_(self.space.to_unconstrained(values, dtype=self.u.dtype, device=self.u.device))
        return super().weight_step()


def best_val(data, schedule, seed):
    torch.manual_seed(seed)
    tr = ScheduledTrainer(digits_config("fixed", seed, STEPS), data=data, model=digits_mlp(3))
    tr.schedule = schedule
    tr.fit()
    return min(e["val_loss"] for e in tr.log.epochs)


def main():
    torch.set_num_threads(1)
    data = digits_protocol()
    date = datetime.date.today().isoformat()
    lines = [f"# Digits: dropout schedules against the best fixed rates ({date}, torch {torch.__version__}, "
             "bench_digits_schedules.py)", "",
             f"fixed runs at lr 0.01 (TrainConfig defaults), {STEPS} weight steps, batch 100, seeds 0-{SEEDS - 1}; "
             "best validation loss.", "", "| schedule (input, hidden) | best val (mean) | per seed |", "|---|---|---|"]
    for name, schedule in SCHEDULES.items():
        vals = [best_val(data, schedule, seed) for seed in range(SEEDS)]
        lines.append(f"| {name} | {sum(vals) / len(vals):.4f} | {', '.join('%.4f' % v for v in vals)} |")
        print(lines[-1], flush=True)
    write_results(f"tuning-digits-schedules-{date}.md", lines)


if __name__ == "__main__":
    main()
