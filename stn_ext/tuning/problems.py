"""Tuning problems whose answer is known, to judge a tuner by (bench/bench_tuning.py, the tests).

``Ridge``: linear regression with an L2 penalty whose validation-optimal strength has a closed form.
The trainer's regression loss is the mean squared error plus 0.5 * wd * ||w||^2, so

    w(wd) = argmin_w (1/n) ||X w - y||^2 + wd/2 ||w||^2 = Q diag(1 / (e + n wd / 2)) Q^T X^T y,

with X^T X = Q diag(e) Q^T (one eigendecomposition), and the validation loss (1/m) ||X_v w(wd) - y_v||^2
is a smooth function of log wd that we minimise to machine precision (a grid, then golden section).

``DropoutRegression``: linear regression with inverted dropout on its inputs at rate p. Averaged over the masks the
training loss is (1/n) ||X w - y||^2 + p/(1-p) w^T diag(A) w with A = X^T X / n, so the best response is
w(p) = (A + p/(1-p) diag A)^-1 X^T y / n, its Jacobian dw/du (u the rate's logit) follows by implicit
differentiation, and the validation-optimal rate is found on a grid: a dropout rate with a known answer.

``digits_protocol``: the issue-11 protocol on scikit-learn's digits (1000/400/397 split of load_digits,
X / 16, a RandomState(0) permutation), for an MLP 64-256-256-10 with three tuned dropout rates.

``fashion_cnn_protocol``: the CNN experiment of the Delta-STN code (Bae & Grosse 2020, pomonam/Self-Tuning-Networks,
examples/simple_cnn: Fashion-MNIST, conv 16 - conv 32 - FC - 10, dropout on the input, after each conv stage and
after the FC layer, plus cutout length and holes: six hyperparameters, two of them discrete), sized for a CPU core.
"""
import math
from dataclasses import dataclass, replace

import torch

import stn_ext
from stn_ext.data import Dataset, Split, digits_arrays, fashion_mnist
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


@dataclass
class DropoutRegression:
    """Input dropout on linear regression (features of unequal scales, so dropout is not plain ridge); train and
    validation are full batches. The default instance's optimal rate is 0.224 (in [0, 0.9], from 0.05)."""

    d: int = 40
    n_train: int = 60
    n_val: int = 200
    noise: float = 1.0
    high: float = 0.9  # the dropout range's top (the built-in's)
    seed: int = 0

    def __post_init__(self):
        g = torch.Generator().manual_seed(self.seed)
        w = torch.randn(self.d, generator=g, dtype=torch.float64) * (2 / math.sqrt(self.d))
        scale = torch.exp(0.5 * torch.randn(self.d, generator=g, dtype=torch.float64))
        self.x, self.xv = (torch.randn(n, self.d, generator=g, dtype=torch.float64) * scale for n in (self.n_train, self.n_val))
        self.y = self.x @ w + self.noise * torch.randn(self.n_train, generator=g, dtype=torch.float64)
        self.yv = self.xv @ w + self.noise * torch.randn(self.n_val, generator=g, dtype=torch.float64)
        self._a = self.x.T @ self.x / self.n_train
        self._b = self.x.T @ self.y / self.n_train

    def rate(self, u):
        return self.high / (1 + math.exp(-u))

    def weights(self, p):
        """The training optimum w(p) (float64), averaged over the dropout masks."""
        return torch.linalg.solve(self._a + p / (1 - p) * torch.diag(torch.diag(self._a)), self._b)

    def val_loss(self, p):
        return float(((self.xv @ self.weights(p) - self.yv) ** 2).mean())

    def response_jacobian(self, u):
        """dw/du at the rate's logit u: the best response's slope that a tuner's V W_h should learn."""
        p = self.rate(u)
        r, da = p / (1 - p), torch.diag(torch.diag(self._a))
        dw_dr = -torch.linalg.solve(self._a + r * da, da @ self.weights(p))
        return dw_dr / (1 - p) ** 2 * p * (1 - p / self.high)

    def optimum(self):
        """The validation-optimal rate on a grid of step 0.001 over the range."""
        grid = [k / 1000 for k in range(1, int(self.high * 1000))]
        return min(grid, key=self.val_loss)

    def dataset(self, dtype=torch.float32):
        cast = lambda t: t.to(dtype)  # noqa: E731
        return Dataset.from_arrays(cast(self.x), cast(self.y), cast(self.xv), cast(self.yv), task="regression",
                                   name="dropout-regression")

    def model(self, dtype=torch.float32):
        """Input dropout (slot 'in') before one StnLinear(d, 1, n_hyper=1, bias=False)."""
        from stn_ext.tuning.models import HyperDropout

        return StnSequential(HyperDropout("in"), stn_ext.StnLinear(self.d, 1, 1, bias=False, dtype=dtype))


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


# The Delta-STN code's CNN experiment (examples/simple_cnn/train.py): four dropout rates from 0.05, cutout length
# in [2, 24] from 4 and holes in [0, 5] from 1 (its ranges and starts; dropout keeps the built-in range [0, 0.9],
# the paper's is [0, 0.95]). The built-in kinds keep their transforms: logit for the rates, linear and rounded
# for cutout (the paper's code puts every bounded one through a stretched sigmoid).
CNN_HYPERS = ("dropout", "cutout")
CNN_RANGES = {"cutout_length": (2.0, 24.0), "cutout_holes": (0.0, 5.0)}
CNN_INITS = {"cutout_length": 4.0, "cutout_holes": 1.0}
# 2000 training images and 2000 steps, chosen from fixed runs alone (seed 0, before any tuned run at this size): at
# 5000 and 1500 steps fixed barely overfits (best val 0.3431, final 0.3472), at 2000 it does (0.4134 -> 0.4583)
CNN_SIZES = {"train_size": 2000, "val_size": 2000, "test_size": 0, "steps": 2000, "batch_size": 128, "hidden": 256}


def fashion_cnn_protocol(train_size=CNN_SIZES["train_size"], val_size=CNN_SIZES["val_size"], test_size=0, path=None):
    """Fashion-MNIST for the CNN protocol: ``train_size`` training and ``val_size`` validation images drawn from
    the official training set (stn_ext.data.fashion_mnist, seed 0), the official test set (its first
    ``test_size`` images when > 0: the quick version). Raises FileNotFoundError where the IDX files are absent."""
    d = fashion_mnist(path=path, train_size=train_size, val_size=val_size)
    return replace(d, test=Split(d.test.x[:test_size], d.test.y[:test_size])) if test_size else d


def fashion_cnn(n_hyper=6, hidden=CNN_SIZES["hidden"]):
    """The built-in cnn with the input dropout slot: dropout 'in' -> conv 3x3 16 -> ReLU -> pool -> dropout 'c1' ->
    conv 3x3 32 -> ReLU -> pool -> dropout 'c2' -> FC ``hidden`` -> ReLU -> dropout 'h1' -> FC 10, all STN layers.
    The paper's model has 5x5 kernels and an FC layer of 1568 units, and drops whole channels (also of the
    one-channel input) where this one drops single units."""
    from stn_ext.tuning.models import cnn

    return cnn((1, 28, 28), 10, n_hyper, (16, 32), hidden, input_dropout=True)


__all__ = ["Ridge", "DropoutRegression", "digits_protocol", "digits_mlp", "fashion_cnn_protocol", "fashion_cnn", "CNN_HYPERS",
           "CNN_RANGES", "CNN_INITS", "CNN_SIZES"]
