"""Time per weight step of stn and delta-stn relative to fixed on a tuning protocol (issues 22 and 23).

Each round trains fixed, stn and delta-stn in turn (--steps weight steps each, the protocol's settings and the
TrainConfig defaults, one thread) and takes the ratio of the trainer's own step time (`wall_s`: weight and hyper
steps, without evaluation and checkpoints) within the round, so a machine that drifts hits all three alike.
Reported: the median ratio over --rounds with the range, for each perturbation mode. Writes
bench/results/tuning-<protocol>-step-time-<date>[-<tag>].md.

    python bench/bench_step_time.py                       # digits, ~4 minutes on a 2-core CPU
    python bench/bench_step_time.py --protocol fashion --perturb batch
    python bench/bench_step_time.py --protocol cnn --perturb batch --steps 300 --rounds 5
    python bench/bench_step_time.py --protocol lm --perturb batch --steps 200 --rounds 5   # ~10 minutes
    python bench/bench_step_time.py --perturb batch --set response_every=2 --tag response-every-2
    python bench/bench_step_time.py --protocol digits-smooth --perturb example --rounds 6
"""
import argparse
import dataclasses
import datetime
import statistics

import torch

import bench_tuning
from bench_tuning import config, digits_config, write_results
from stn_ext.tuning import Trainer
from stn_ext.tuning.problems import CNN_SIZES, digits_mlp, digits_protocol, fashion_cnn_protocol

METHODS = ("fixed", "stn", "delta-stn")


def _digits():
    return digits_protocol(), lambda: digits_mlp(3), lambda m, seed, steps, perturb: digits_config(
        m, seed, steps, perturb=perturb)


def _digits_smooth():
    return digits_protocol(), lambda: digits_mlp(2), lambda m, seed, steps, perturb: digits_config(
        m, seed, steps, perturb=perturb, hypers=("weight_decay", "noise"))


def _fashion():
    from stn_ext.data import fashion_mnist

    return fashion_mnist(train_size=10000), bench_tuning.fashion_model, lambda m, seed, steps, perturb: config(
        method=m, steps=steps, batch_size=100, seed=seed, quiet=True, plots=False, eval_every=steps, perturb=perturb,
        **bench_tuning.FASHION_SETTINGS)


def _cnn():
    return fashion_cnn_protocol(), bench_tuning.cnn_model, lambda m, seed, steps, perturb: config(
        method=m, steps=steps, batch_size=CNN_SIZES["batch_size"], seed=seed, quiet=True, plots=False,
        eval_every=steps, perturb=perturb, **bench_tuning.cnn_settings())


def _lm():
    import bench_lm

    a = bench_lm.parse(["--eval-tokens", "3500", "--evals", "1"])  # bench_lm's model and data; one short evaluation

    def cfg(m, seed, steps, perturb):
        run = argparse.Namespace(**{**vars(a), "steps": steps, "set": dict(bench_tuning.OVERRIDES)})  # --set
        return dataclasses.replace(bench_lm.lm_config(run, m, seed), perturb=perturb)
    return bench_lm._data(a), lambda: None, cfg  # None: the trainer builds the language model


# name: (what the table says of it, a function giving (data, model factory, run config))
PROTOCOLS = {
    "digits": ("Digits: MLP 64-256-256-10, three dropout rates, batch 100", _digits),
    "digits-smooth": ("Digits: MLP 64-256-256-10, weight decay and input noise (the response fitted by difference), "
                      "batch 100", _digits_smooth),
    "fashion": ("Fashion-MNIST (10k training images): MLP 784-256-256-10, three dropout rates, batch 100", _fashion),
    "cnn": (f"Fashion-MNIST CNN protocol ({CNN_SIZES['train_size']} training images): conv 16 - conv 32 - FC "
            f"{CNN_SIZES['hidden']} - 10, four dropout rates and cutout, batch {CNN_SIZES['batch_size']}", _cnn),
    "lm": ("bench_lm.py's language model: LSTM 128-128, tied embedding, 10k vocabulary, batch 20 x 35 tokens of "
           "Jane Austen, the seven hyperparameters", _lm),
}


def step_time(setup, method, perturb, steps, seed):
    data, model, cfg = setup
    torch.manual_seed(seed)
    return Trainer(cfg(method, seed, steps, perturb), data=data, model=model()).fit()["wall_s"] / steps


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--protocol", choices=sorted(PROTOCOLS), default="digits", help="the problem (default digits)")
    p.add_argument("--steps", type=int, default=600, help="weight steps per run (default 600)")
    p.add_argument("--rounds", type=int, default=8, help="rounds per perturbation mode (default 8)")
    p.add_argument("--perturb", type=lambda s: s.split(","), default=["batch", "example"],
                   help="perturbation modes to time (default batch,example)")
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                   help="a TrainConfig field for every run, as bench_tuning.py's --set (repeatable)")
    p.add_argument("--tag", default="", help="file name tuning-<protocol>-step-time-<date>-<tag>.md")
    a = p.parse_args(argv)
    bench_tuning.OVERRIDES.clear()
    bench_tuning.OVERRIDES.update(bench_tuning._parse_sets(a.set))
    torch.set_num_threads(1)
    what, make = PROTOCOLS[a.protocol]
    setup = make()
    step_time(setup, "fixed", "batch", 50, 0)  # warm-up: first-call costs stay out of round 0
    date = datetime.date.today().isoformat()
    lines = [f"# {a.protocol}: time per weight step vs fixed ({date}, torch {torch.__version__}, bench_step_time.py)",
             "", f"{what}; {a.steps} weight steps per run (the first tenth the warm-up, without hyper steps), "
             f"{a.rounds} rounds, one thread; ratio of the trainer's step time (weight and hyper steps) to fixed's in "
             "the same round, median [range].", "",
             "| perturbation | fixed ms/step (median) | stn | delta-stn |", "|---|---|---|---|"]
    if a.set:
        lines[4:4] = [f"Settings for every run: {', '.join(a.set)}.", ""]
    for perturb in a.perturb:
        times = {m: [] for m in METHODS}
        for rnd in range(a.rounds):
            for m in METHODS:
                times[m].append(step_time(setup, m, perturb, a.steps, rnd))
            print(f"{perturb} round {rnd}: " + ", ".join(f"{m} {times[m][-1] * 1e3:.1f} ms" for m in METHODS),
                  flush=True)
        cells = []
        for m in METHODS[1:]:
            r = [t / f for t, f in zip(times[m], times["fixed"])]
            cells.append(f"{statistics.median(r):.2f}x [{min(r):.2f}-{max(r):.2f}]")
        lines.append(f"| {perturb} | {statistics.median(times['fixed']) * 1e3:.2f} | " + " | ".join(cells) + " |")
        print(lines[-1], flush=True)
    write_results(f"tuning-{a.protocol}-step-time-{date}" + (f"-{a.tag}" if a.tag else "") + ".md", lines)


if __name__ == "__main__":
    main()
