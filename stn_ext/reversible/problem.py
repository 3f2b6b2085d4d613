"""The meta-learning problem of ``python -m stn_ext reversible``: a tanh MLP on digits, trained by SGD with
momentum whose schedules, L2 strength and initialisation scales are the hyperparameters."""
import math

import torch

from stn_ext.data import digits_arrays


def load_digits_split(train_size, seed, dtype):
    """Training and validation digits (flat), split by a permutation seeded with ``seed``."""
    X, y = digits_arrays(flat=True, dtype=dtype)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    X, y = X[perm], y[perm]
    if not 0 < train_size < len(y):
        raise SystemExit(f"--train-size must be in (0, {len(y)})")
    return X[:train_size], y[:train_size], X[train_size:], y[train_size:]


def forward(p, x):
    return torch.tanh(x @ p[0].T + p[1]) @ p[2].T + p[3]


class MetaProblem:
    """The MLP, its data and the mapping from unconstrained meta-parameters to hyperparameters."""

    def __init__(self, args):
        self.dtype = torch.float64 if args.dtype == "float64" else torch.float32
        self.Xtr, self.ytr, self.Xva, self.yva = load_digits_split(args.train_size, args.seed, self.dtype)
        gen = torch.Generator().manual_seed(args.seed + 1)
        d, h = self.Xtr.shape[1], args.hidden
        # base weights; the initial weights are exp(log_init_scale[l]) * base[l] for the matrices
        self.base = [torch.randn(h, d, generator=gen, dtype=self.dtype) / math.sqrt(d),
                     torch.zeros(h, dtype=self.dtype),
                     torch.randn(10, h, generator=gen, dtype=self.dtype) / math.sqrt(h),
                     torch.zeros(10, dtype=self.dtype)]
        self.matrices = [0, 2]
        self.T, self.B = args.steps, args.batch
        self.order = torch.randperm(len(self.ytr), generator=torch.Generator().manual_seed(args.seed + 2))

    def batch(self, t):
        n = len(self.ytr)
        start = (t * self.B) % n
        idx = self.order[torch.arange(start, start + self.B) % n]
        return self.Xtr[idx], self.ytr[idx]

    def train_loss(self, p, t, hypers):
        xb, yb = self.batch(t)
        ce = torch.nn.functional.cross_entropy(forward(p, xb), yb)
        l2 = torch.exp(hypers["log_l2"]).to(self.dtype)
        return ce + 0.5 * l2 * sum((p[i] ** 2).sum() for i in self.matrices)

    def val_loss(self, p):
        return torch.nn.functional.cross_entropy(forward(p, self.Xva), self.yva)

    def val_accuracy(self, p):
        with torch.no_grad():
            return float((forward(p, self.Xva).argmax(1) == self.yva).double().mean())

    def init_params(self, log_scale):
        p = [b.clone() for b in self.base]
        for j, i in enumerate(self.matrices):
            p[i] = p[i] * torch.exp(log_scale[j]).to(self.dtype)
        return p
