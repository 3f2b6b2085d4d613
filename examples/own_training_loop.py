"""Tune dropout and weight decay inside your own training loop: your model, DataLoader, loss and optimiser.

    python examples/own_training_loop.py [--steps 1500] [--method delta-stn|stn]
"""
import argparse

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader, TensorDataset

import stn_ext
from stn_ext.tuning.space import HyperSpace
from stn_ext.tuning.models import HyperDropout
from stn_ext.tuning import Guard, Tuner


def smoothed_cross_entropy(logits, y):  # your own loss; per-example (or a scalar mean) both work
    return F.cross_entropy(logits, y, label_smoothing=0.05, reduction="none")


def forever(loader):  # validation batches on demand, reshuffled at each pass
    while True:
        yield from loader


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--method", default="delta-stn", choices=["delta-stn", "stn"])
    p.add_argument("--checkpoint", default="", help="save model, optimiser and tuner here at the end")
    a = p.parse_args(argv)
    torch.manual_seed(0)
    x, y = load_digits(return_X_y=True)
    x, y = torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y)
    train = DataLoader(TensorDataset(x[:1000], y[:1000]), batch_size=64, shuffle=True, drop_last=True)
    val = DataLoader(TensorDataset(x[1000:1400], y[1000:1400]), batch_size=64, shuffle=True, drop_last=True)
    x_test, y_test = x[1400:], y[1400:]

    space = HyperSpace.build(("dropout", "weight_decay"), dropout_slots=["in", "h1"])
    model = torch.nn.Sequential(HyperDropout("in"), torch.nn.Linear(64, 128), torch.nn.ReLU(), HyperDropout("h1"),
                                torch.nn.Linear(128, 10))
    stn_ext.convert(model, n_hyper=len(space))  # the Linear layers become StnLinear
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0)  # weight decay is tuned instead
    # guard: on a non-finite or exploding loss, roll model, optimiser and tuner back to a snapshot (every 50 steps)
    # and halve the perturbation scales; without it a non-finite step is skipped with a warning
    tuner = Tuner(model, space, optimizer, smoothed_cross_entropy, method=a.method, total_steps=a.steps, guard=Guard())

    val_batches = forever(val)
    while tuner.step < a.steps:  # counts by the tuner's step: steps undone by a roll-back are redone
        for xb, yb in train:
            tuner.weight_step(xb, yb)
            for _ in range(tuner.hyper_steps_due()):
                tuner.hyper_step(*next(val_batches))
            if tuner.step == a.steps:
                break
    with tuner.evaluating(), torch.no_grad():
        logits = model(x_test)
    acc = (logits.argmax(1) == y_test).float().mean()
    print(f"{a.method}: test loss {F.cross_entropy(logits, y_test):.4f}, accuracy {acc:.3f}, hyperparameters " +
          ", ".join(f"{k}={v:.3g}" for k, v in tuner.hyperparameters().items()))
    if a.checkpoint:  # your checkpoint holds the tuner too: tuner.load_state_dict(torch.load(...)["tuner"])
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "tuner": tuner.state_dict()},
                   a.checkpoint)


if __name__ == "__main__":
    main()
