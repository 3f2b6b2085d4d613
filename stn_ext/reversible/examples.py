"""The experiments of Maclaurin, Duvenaud & Adams (2015) as problems for :func:`meta_optimize`.

Each problem holds its data (Fashion-MNIST or scikit-learn's digits, flattened, float64), its model, its
hyperparameter tensors in the parametrisation that is optimised (``problem.hypers``, leaves) and
``problem.objective(hypers, seed)``: one exact reversible training run (:func:`train_and_evaluate`)
returning the validation loss, with the validation and test loss and accuracy of the trained weights as
``info``. ``make_problem(name, ...)`` builds one:

* ``schedules``: an MLP (784-50-50-50-10 tanh); per step, a learning rate and a momentum for each
  parameter tensor (each layer's weights and biases: 8 columns) and an initialisation scale per tensor
  (its weights are ``exp(log_init_scale) * N(0, 1)`` noise drawn from the seed): T x 8 x 2 + 8 values.
* ``l2``: logistic regression with an L2 penalty per weight, ``0.5 sum(exp(log_l2) * W^2)`` (10 x 784).
* ``distill``: logistic regression trained on ten learned images (one per class, labels 0..9), the whole
  batch at every step; the validation loss on real images drives the images.
"""
import math

import torch
import torch.nn.functional as F
from torch.func import functional_call

from stn_ext.reversible.training import train_and_evaluate

__all__ = ["make_problem", "load_flat", "PROBLEMS", "DEFAULTS", "Schedules", "L2", "Distill"]

PROBLEMS = ("schedules", "l2", "distill")
# per problem: training steps T, minibatch, training/validation images, meta-iterations, Adam's step size,
# and the starting values of the hyperparameters
DEFAULTS = {
    "schedules": dict(steps=100, batch=200, train_size=10000, val_size=10000, meta_iters=50, meta_lr=0.04,
                      lr=0.3, momentum=0.9, init_scale=0.1, l2=0.0),
    "l2": dict(steps=100, batch=200, train_size=1000, val_size=10000, meta_iters=50, meta_lr=0.1,
               lr=0.3, momentum=0.9, init_scale=0.0, l2=1e-3),
    "distill": dict(steps=20, batch=10, train_size=10, val_size=10000, meta_iters=40, meta_lr=0.05,
                    lr=0.3, momentum=0.9, init_scale=0.0, l2=0.0),
}


def load_flat(data, train_size, val_size, test_size=None, seed=0, path=None):
    """{'train': (x, y), 'val': ..., 'test': ..., 'side': image side} with x (N, side^2) float64.
    ``fashion-mnist``: ``val_size`` images of the official training set, ``train_size`` of the rest, the
    official test set (capped at ``test_size``). ``digits``: the 1797 8x8 digits split 60/20/20 (seeded),
    the training split capped at ``train_size``, the validation split at ``val_size``."""
    from stn_ext.data import digits, fashion_mnist

    if data == "digits":
        ds = digits(seed=seed, train_size=train_size)
        side = 8
    elif data == "fashion-mnist":
        ds = fashion_mnist(path=path, seed=seed, train_size=train_size, val_size=val_size)
        side = 28
    else:
        raise ValueError(f"stn_ext: unknown data {data!r}; choose fashion-mnist or digits")
    flat = lambda s, n=None: (s.x[:n].reshape(len(s.x[:n]), -1).double(), s.y[:n])  # noqa: E731
    return {"train": flat(ds.train), "val": flat(ds.val, val_size), "test": flat(ds.test, test_size), "side": side}


def _mlp(sizes):
    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(torch.nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(torch.nn.Tanh())
    return torch.nn.Sequential(*layers).double()


class _Problem:
    """What the three problems share: data, fixed minibatches per seed, metrics of trained weights."""

    name = ""

    def __init__(self, data, steps, batch, lr, momentum):
        self.data, self.T, self.B = data, int(steps), int(batch)
        self.lr0, self.momentum0 = float(lr), float(momentum)
        self.xtr, self.ytr = data["train"]
        self.xva, self.yva = data["val"]
        self.xte, self.yte = data["test"]
        self.d = self.xtr.shape[1]
        if self.B > len(self.ytr):
            raise ValueError(f"stn_ext: the batch ({self.B}) is larger than the training set ({len(self.ytr)})")

    def batches(self, seed):
        """Step t's minibatch: the training set shuffled by ``seed``, B consecutive images at a time."""
        perm = torch.randperm(len(self.ytr), generator=torch.Generator().manual_seed(int(seed)))
        n, B = len(self.ytr), self.B

        def batch(t):
            idx = perm[(t * B + torch.arange(B)) % n]
            return self.xtr[idx], self.ytr[idx]

        return batch

    def metrics(self, weights, split):
        x, y = {"train": (self.xtr, self.ytr), "val": (self.xva, self.yva), "test": (self.xte, self.yte)}[split]
        with torch.no_grad():
            out = functional_call(self.model, {k: w.detach() for k, w in weights.items()}, (x,))
            return float(F.cross_entropy(out, y)), float((out.argmax(1) == y).double().mean())

    def val_loss(self, net, meta):
        return F.cross_entropy(net(self.xva), self.yva)

    def run(self, hypers, seed):
        """(objective, final weights) of one training run."""
        raise NotImplementedError

    def objective(self, hypers, seed):
        obj, weights = self.run(hypers, seed)
        info = {}
        for split in ("val", "test"):
            info[f"{split}_loss"], info[f"{split}_acc"] = self.metrics(weights, split)
        return obj, info

    def initial_hypers(self):
        return {k: v.detach().clone() for k, v in self.hypers.items()}


class Schedules(_Problem):
    """Per-step learning rates and momenta for each parameter tensor, and an init scale per tensor."""

    name = "schedules"

    def __init__(self, data, steps, batch, lr, momentum, init_scale, hidden=(50, 50, 50), **_):
        super().__init__(data, steps, batch, lr, momentum)
        self.model = _mlp([self.d, *hidden, 10])
        self.names = [n for n, _ in self.model.named_parameters()]
        self.fan_in = [p.shape[1] if p.dim() == 2 else None for _, p in self.model.named_parameters()]
        G = len(self.names)
        self.hypers = {
            "log_lr": torch.full((self.T, G), math.log(lr), dtype=torch.float64),
            "logit_momentum": torch.full((self.T, G), math.log(momentum / (1 - momentum)), dtype=torch.float64),
            "log_init_scale": torch.full((G,), math.log(init_scale), dtype=torch.float64),
        }
        for h in self.hypers.values():
            h.requires_grad_(True)

    def schedules(self, hypers):
        """(learning rates, momenta), each (T, G): column g for parameter tensor g."""
        return hypers["log_lr"].exp(), torch.sigmoid(hypers["logit_momentum"]).clamp(2.0**-16, 1.0)

    def noise(self, seed):
        gen = torch.Generator().manual_seed(int(seed) + 1_000_003)
        return {n: torch.randn(p.shape, generator=gen, dtype=torch.float64) for n, p in self.model.named_parameters()}

    def init(self, hypers, seed):
        scale = hypers["log_init_scale"].exp()
        return {n: scale[i] * z for i, (n, z) in enumerate(self.noise(seed).items())}

    def train_loss(self, net, batch, meta):
        x, y = batch
        return F.cross_entropy(net(x), y)

    def run(self, hypers, seed):
        lr, mom = self.schedules(hypers)
        return train_and_evaluate(self.model, self.train_loss, self.val_loss, self.batches(seed), self.T, lr, mom,
                                  init=self.init(hypers, seed), groups="param", seed=seed, return_weights=True)

    def learning_curve(self, hypers, seed, every=5):
        """Plain float64 SGD with momentum at ``hypers`` (the same maths, no exact arithmetic), for plots:
        (steps, minibatch training losses, validation losses at ``steps``)."""
        with torch.no_grad():
            lr, mom = self.schedules(hypers)
            w = {n: x.detach().clone().requires_grad_(True) for n, x in self.init(hypers, seed).items()}
        v = {n: torch.zeros_like(x) for n, x in w.items()}
        batch = self.batches(seed)
        train, steps, val = [], [], []
        for t in range(self.T + 1):
            if t % every == 0 or t == self.T:
                steps.append(t)
                val.append(self.metrics(w, "val")[0])
            if t == self.T:
                break
            x, y = batch(t)
            loss = F.cross_entropy(functional_call(self.model, w, (x,)), y)
            grads = torch.autograd.grad(loss, list(w.values()))
            train.append(float(loss.detach()))
            with torch.no_grad():
                for j, (g, (n, x_)) in enumerate(zip(grads, w.items())):  # column j: parameter tensor j
                    v[n].mul_(mom[t, j]).sub_((1 - mom[t, j]) * g)
                    x_.add_(lr[t, j] * v[n])
        return steps, train, val


class L2(_Problem):
    """Logistic regression with a learned L2 strength per weight (log scale)."""

    name = "l2"

    def __init__(self, data, steps, batch, lr, momentum, l2, **_):
        super().__init__(data, steps, batch, lr, momentum)
        self.model = _mlp([self.d, 10])
        self.hypers = {"log_l2": torch.full((10, self.d), math.log(l2), dtype=torch.float64, requires_grad=True)}
        self.zero = {n: torch.zeros_like(p) for n, p in self.model.named_parameters()}

    def train_loss(self, net, batch, meta):
        x, y = batch
        w = net.params["0.weight"]
        return F.cross_entropy(net(x), y) + 0.5 * (meta["log_l2"].exp() * w * w).sum()

    def run(self, hypers, seed):
        return train_and_evaluate(self.model, self.train_loss, self.val_loss, self.batches(seed), self.T, self.lr0,
                                  self.momentum0, init=self.zero, meta={"log_l2": hypers["log_l2"]}, seed=seed,
                                  return_weights=True)


class Distill(_Problem):
    """Logistic regression trained on ten learned images with labels 0..9 (all ten at every step)."""

    name = "distill"

    def __init__(self, data, steps, lr, momentum, **_):
        super().__init__(data, steps, 1, lr, momentum)
        self.model = _mlp([self.d, 10])
        self.hypers = {"images": torch.zeros(10, self.d, dtype=torch.float64, requires_grad=True)}
        self.labels = torch.arange(10)
        self.zero = {n: torch.zeros_like(p) for n, p in self.model.named_parameters()}

    def train_loss(self, net, batch, meta):
        return F.cross_entropy(net(meta["images"]), self.labels)

    def run(self, hypers, seed):
        return train_and_evaluate(self.model, self.train_loss, self.val_loss, None, self.T, self.lr0, self.momentum0,
                                  init=self.zero, meta={"images": hypers["images"]}, seed=seed, return_weights=True)


def make_problem(name, data="digits", *, seed=0, data_path=None, test_size=None, **settings):
    """A problem by name with its data; ``settings`` override :data:`DEFAULTS` (steps, batch, train_size,
    val_size, lr, momentum, init_scale, l2, hidden)."""
    if name not in PROBLEMS:
        raise ValueError(f"stn_ext: unknown problem {name!r}; choose one of {', '.join(PROBLEMS)}")
    s = dict(DEFAULTS[name])
    s.update({k: v for k, v in settings.items() if v is not None})
    split = load_flat(data, s["train_size"], s["val_size"], test_size, seed=seed, path=data_path)
    cls = {"schedules": Schedules, "l2": L2, "distill": Distill}[name]
    return cls(split, **{k: v for k, v in s.items() if k not in ("train_size", "val_size", "meta_iters", "meta_lr")})
