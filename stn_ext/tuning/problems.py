"""Tuning problems whose answer is known, to judge a tuner by (bench/bench_tuning.py, the tests).

``Ridge``: linear regression with an L2 penalty whose validation-optimal strength has a closed form.
The trainer's regression loss is the mean squared error plus 0.5 * wd * ||w||^2, so

    w(wd) = argmin_w (1/n) ||X w - y||^2 + wd/2 ||w||^2 = Q diag(1 / (e + n wd / 2)) Q^T X^T y,

with X^T X = Q diag(e) Q^T (one eigendecomposition), and the validation loss (1/m) ||X_v w(wd) - y_v||^2
is a smooth function of log wd that we minimise to machine precision (a grid, then golden section).

``digits_protocol``: the issue-11 protocol on scikit-learn's digits (1000/400/397 split of load_digits,
X / 16, a RandomState(0) permutation), for an MLP 64-256-256-10 with three tuned dropout rates.
"""
import math
from dataclasses import dataclass

import torch

import stn_ext
from stn_ext.data import Dataset, Split, digits_arrays
from stn_ext.tuning.models import StnSequential


@dataclass
class Ridge:
    """A ridge instance: ``n_train`` examples of ``d`` Gaussian features, targets x.w + noise, with
    w ~ N(0, signal^2 I/d). Train and validation are full batches of the trainer. The default's optimum
    (wd ~ 0.5) lets a 100x-too-large start (wd ~ 50) train stably under SGD lr 0.01, momentum 0.9, whose
    limit here is wd < 2 (1 + 0.9) / 0.01 = 380 minus the data term's curvature."""

    d: int = 40
    n_train: int = 50
    n_val: int = 50
    noise: float = 1.0
    signal: float = 2.0
    seed: int = 0

    def __post_init__(self):
        g = torch.Generator().manual_seed(self.seed)
        w = torch.randn(self.d, generator=g, dtype=torch.float64) * (self.signal / math.sqrt(self.d))
        self.x, self.xv = (torch.randn(n, self.d, generator=g, dtype=torch.float64) for n in (self.n_train, self.n_val))
        self.y = self.x @ w + self.noise * torch.randn(self.n_train, generator=g, dtype=torch.float64)
        self.yv = self.xv @ w + self.noise * torch.randn(self.n_val, generator=g, dtype=torch.float64)
        self._e, self._q = torch.linalg.eigh(self.x.T @ self.x)
        self._qxy = self._q.T @ (self.x.T @ self.y)

    def weights(self, wd):
        """The training optimum w(wd) (float64)."""
        return self._q @ (self._qxy / (self._e + self.n_train * wd / 2))

    def val_loss(self, wd):
        return float(((self.xv @ self.weights(wd) - self.yv) ** 2).mean())

    def log_optimum(self, lo=math.log(1e-4), hi=math.log(1e4)):
        """log of the validation-optimal weight decay (raises if it lies on the edge of [lo, hi])."""
        grid = torch.linspace(lo, hi, 801, dtype=torch.float64)
        f = [self.val_loss(math.exp(float(u))) for u in grid]
        k = min(range(len(f)), key=f.__getitem__)
        if k in (0, len(f) - 1):
            raise ValueError("stn_ext: this ridge instance has no interior optimum in the range")
        a, b = float(grid[k - 1]), float(grid[k + 1])
        r = (math.sqrt(5) - 1) / 2
        while b - a > 1e-10:  # golden section on the bracketing cell
            c, e = b - r * (b - a), a + r * (b - a)
            if self.val_loss(math.exp(c)) < self.val_loss(math.exp(e)):
                b = e
            else:
                a = c
        return (a + b) / 2

    def dataset(self, dtype=torch.float32):
        cast = lambda t: t.to(dtype)  # noqa: E731
        return Dataset.from_arrays(cast(self.x), cast(self.y), cast(self.xv), cast(self.yv), task="regression",
                                   name="ridge")

    def model(self, dtype=torch.float32):
        """One StnLinear(d, 1, n_hyper=1, bias=False): its weight is the ridge solution's shape."""
        return StnSequential(stn_ext.StnLinear(self.d, 1, 1, bias=False, dtype=dtype))


def digits_protocol():
    """Digits split 1000 train / 400 val / 397 test: X / 16 (flat), a RandomState(0) permutation."""
    import numpy as np

    x, y = digits_arrays(flat=True)
    p = torch.from_numpy(np.random.RandomState(0).permutation(len(y)))
    tr, va, te = p[:1000], p[1000:1400], p[1400:]
    return Dataset(Split(x[tr], y[tr]), Split(x[va], y[va]), Split(x[te], y[te]), "classification", 10, "digits")


def digits_mlp(n_hyper=3, hidden=(256, 256)):
    """MLP 64-256-256-10 with dropout slots in, h1, h2 (the built-in mlp at the protocol's width)."""
    from stn_ext.tuning.models import mlp

    return mlp(64, 10, n_hyper, hidden)


__all__ = ["Ridge", "digits_protocol", "digits_mlp"]
