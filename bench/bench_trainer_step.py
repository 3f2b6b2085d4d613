"""The trainer's own cost per weight step (issue 14): Trainer(method="fixed").fit() against a plain PyTorch
loop over the same MLP (784-256-256-10, the trainer's dropout and weight decay at the same fixed values),
the same batches and the same SGD, on random data of Fashion-MNIST's shape; then where the difference goes
(cProfile of fit, per step). The tuner's steps alone (its maths on the trainer's batches) are timed too, so
fit's own bookkeeping (logging, the divergence guard, the hyperparameter plumbing) is the difference.

Each round times both in turn (``--steps`` weight steps each, after a warm-up); reported: the median per-step
time over ``--rounds`` rounds with the range, and the ratio measured in the same round.

    python bench/bench_trainer_step.py            # ~2 minutes on a 2-core CPU
"""
import argparse
import cProfile
import os
import pstats
import statistics
import time

import torch
import torch.nn.functional as F

from stn_ext.data import Dataset
from stn_ext.tuning import TrainConfig
from stn_ext.tuning.loop import Trainer

HIDDEN = (256, 256)


def make_data(n_train=8192, n_val=1024, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n_train + n_val, 784, generator=g)
    y = torch.randint(0, 10, (n_train + n_val,), generator=g)
    return Dataset.from_arrays(x[:n_train], y[:n_train], x[n_train:], y[n_train:], name="random-784")


def trainer(data, steps, batch):
    # evaluation only at the end and no run folder (no checkpoints): what is left is the step's own cost
    cfg = TrainConfig(method="fixed", hidden=HIDDEN, steps=steps, batch_size=batch, eval_every=10**9, quiet=True,
                      plots=False)
    return Trainer(cfg, data=data)


def plain_loop(data, steps, batch, tr):
    """The same network as plain nn layers with the trainer's fixed hyperparameter values."""
    vals = tr.hyper_values()
    p_in, p_h = vals.get("dropout.in", 0.0), vals.get("dropout.h1", 0.0)
    wd = vals.get("weight_decay", 0.0)
    sizes = (784,) + HIDDEN + (10,)
    layers = [torch.nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:])]
    params = [p for m in layers for p in m.parameters()]
    cfg = tr.cfg
    opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=wd)
    xs, ys = data.train.x, data.train.y
    g = torch.Generator().manual_seed(0)

    def run():
        perm = torch.randperm(len(ys), generator=g)
        for k in range(steps):
            idx = perm[(k * batch) % (len(ys) - batch):][:batch]
            h = F.dropout(xs[idx], p_in)
            for i, m in enumerate(layers):
                h = m(h)
                if i + 1 < len(layers):
                    h = F.dropout(F.relu(h), p_h)
            loss = F.cross_entropy(h, ys[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            float(loss.detach())  # the trainer reads each step's loss too
    return run


def tuner_steps(data, steps, batch):
    """The tuner's weight steps alone on the trainer's batches: its maths without fit's bookkeeping."""
    tr = trainer(data, steps, batch)

    def run():
        for k in range(steps):
            x, y, rnd = tr._batch(tr.data.train, "train", k, batch)
            float(tr.tuner.weight_step(x, y, rnd).sum())
    return run


def time_per_step(fn, steps):
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) / steps * 1e3


def profile_fit(data, steps, batch, top):
    tr = trainer(data, steps, batch)
    prof = cProfile.Profile()
    prof.enable()
    tr.fit()
    prof.disable()
    stats = pstats.Stats(prof)
    rows = []
    for (file, line, name), (_, ncalls, tt, ct, _) in stats.stats.items():
        if "stn_ext" in file or name in ("backward", "step"):
            rows.append((ct / steps * 1e3, ncalls, f"{os.path.relpath(file, os.path.dirname(os.path.dirname(file)))}:"
                                                   f"{line}({name})"))
    rows.sort(reverse=True)
    return rows[:top]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--top", type=int, default=25, help="profile rows to print")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"),
                    help="folder for trainer-step-cpu.md ('' : print only)")
    a = ap.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    data = make_data()
    rounds = []
    for _ in range(a.rounds):
        tr = trainer(data, a.steps, a.batch)
        loop = plain_loop(data, a.steps, a.batch, tr)
        steps_only = tuner_steps(data, a.steps, a.batch)
        trainer(data, 20, a.batch).fit()  # warm-up
        rounds.append((time_per_step(loop, a.steps), time_per_step(steps_only, a.steps), time_per_step(tr.fit, a.steps)))
    lines = []
    say = lines.append
    say(f"MLP 784-{'-'.join(map(str, HIDDEN))}-10, batch {a.batch}, {a.steps} steps, {torch.get_num_threads()} threads, "
          f"{a.rounds} rounds (ms per weight step, median [range]; ratios to the plain loop of the same round):")

    def row(label, i):
        t = [r[i] for r in rounds]
        q = [r[i] / r[0] for r in rounds]
        say(f"  {label:44s} {statistics.median(t):6.2f} [{min(t):.2f}-{max(t):.2f}]  "
              f"{statistics.median(q):.2f}x [{min(q):.2f}-{max(q):.2f}]")
    row("plain PyTorch loop", 0)
    row("Tuner.weight_step on the trainer's batches", 1)
    row("Trainer(method='fixed').fit()", 2)
    book = [(r[2] - r[1]) / r[0] for r in rounds]
    say(f"  fit's bookkeeping (fit - the steps alone): {100 * statistics.median(book):.1f}% of the plain step "
          f"[{100 * min(book):.1f}-{100 * max(book):.1f}%]")
    say("\nWhere fit's time goes (cProfile, cumulative ms per weight step; profiling inflates Python-heavy rows):")
    for ms, ncalls, where in profile_fit(data, a.steps, a.batch, a.top):
        say(f"  {ms:7.3f}  {ncalls:6d}  {where}")
    text = "\n".join(lines)
    print(text)
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, "trainer-step-cpu.md"), "w") as f:
            f.write(f"# Trainer step vs a plain PyTorch loop, cpu, torch {torch.__version__}\n\n```\n{text}\n```\n")


if __name__ == "__main__":
    main()
