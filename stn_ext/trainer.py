"""Bilevel training with self-tuning networks.

Methods (``TrainConfig.method``):

stn         MacKay et al. 2019. Hyperparameters u (unconstrained) with a learned perturbation scale
            sigma = softplus(h). Weight step: lam~ = u + sigma (.) eps (per example or one per batch),
            the regularisers use value(lam~), the hypernet sees z = lam~ - u_init, all weights
            step on the training loss. Hyper step (eval mode: no dropout/augmentation/noise): the
            validation loss at the perturbed lam~ minus tau * entropy(sigma); gradients reach u and h
            only through the hypernet response.
delta-stn   Bae & Grosse 2020. The hypernet sees the centred delta = lam~ - stopgrad(u).
            General step: W_e, b_e (and any non-STN parameters) at delta = 0 with the regularisers
            at u; response step: V, C, W_h, b_h at delta = sigma eps with the regularisers at lam~,
            optionally on the linearised network f(W_e) + J (Phi delta). Evaluation at delta = 0.
fixed       plain training at the initial hyperparameters (hypernet input 0: the elementary net).
random      random search: ``random_trials`` fixed runs at values drawn from the space, splitting the
            same total number of weight steps; the best final validation loss wins.

``steps`` counts weight steps (mini-batches of training data) for every method; STN methods also
take hyper steps on validation batches (Ttrain:Tval after a warm-up).

Python API (what the CLI uses)::

    from stn_ext.trainer import TrainConfig, train
    summary = train(TrainConfig(method="delta-stn", hypers=("dropout", "weight_decay"), steps=1500,
                                out="runs/dstn"))
    # own data and model: Dataset.from_arrays(x_train, y_train, x_val, y_val, x_test, y_test) and any
    # nn.Module built on StnLinear/StnConv2d (n_hyper = number of tuned hyperparameters, optional
    # stn_ext.models.HyperDropout slots): train(config, data=dataset, model=model)

Data parallel: run under torch.distributed (gloo on CPU, nccl on GPU; ``run_distributed`` spawns local
processes). Each rank takes its rows of the same global batch, draws its rows of the same global
random numbers, and gradients (weights and hyperparameters) are summed across ranks, so every rank
holds identical weights, hypernet and hyperparameters, equal to a 1-process run with the same batch.
"""
import json
import math
import os
import re
import shutil
import signal
import socket
import time
import warnings
from dataclasses import asdict, dataclass, field, fields

import torch
import torch.nn.functional as F
from torch import nn

import stn_ext
from stn_ext import checkpoint, models
from stn_ext.augment import BatchRandom
from stn_ext.data import Dataset, fashion_mnist_folder, load as load_data
from stn_ext.divergence import Diverged, Guard, finite
from stn_ext.hyperparams import HyperSpace
from stn_ext.plots import PLOT_FILES, plot_run
from stn_ext.tuning import Tuner
from stn_ext.tuning.core import inv_softplus_t

METHODS = ("stn", "delta-stn", "fixed", "random", "tpe")
SEARCHES = ("random", "tpe")  # searches over fixed runs, each trial steps // random_trials weight steps


@dataclass
class TrainConfig:
    """Everything a run depends on (saved as config.json in the run folder)."""

    method: str = "delta-stn"
    model: str = "mlp"                # mlp | cnn (ignored when a model is passed to Trainer)
    data: str = "digits"              # digits | fashion-mnist (ignored when data is passed to Trainer)
    data_path: str = ""               # folder of Fashion-MNIST's IDX files ("" : stn_ext.data.fashion_mnist_folder)
    hypers: tuple = ("dropout", "weight_decay")
    ranges: dict = field(default_factory=dict)   # {name: (low, high)}
    inits: dict = field(default_factory=dict)    # {name: initial value}
    steps: int = 1500                 # weight steps (total over all trials for random search)
    batch_size: int = 64              # global batch (all ranks together)
    lr: float = 0.01                  # SGD with momentum for the weights
    momentum: float = 0.9
    hyper_lr: float = 0.02            # Adam for u and the perturbation scales
    hyper_lr_schedule: str = "auto"   # cosine | constant | tail (constant, then cosine over the last half) |
                                      # auto (cosine with per-example perturbation, tail per batch)
    scale_init: float = 0.5           # initial sigma (in unconstrained units)
    scale_max: float = 0.0            # cap on sigma (0: scale_init, so the entropy term cannot grow it)
    tau: float = -1.0                 # entropy weight (-1: 1e-2 with per-example perturbation, 1e-3 per batch)
    train_per_cycle: int = 5          # Ttrain
    val_per_cycle: int = 1            # Tval
    warmup_steps: int = -1            # weight steps before the response trains and the first hyper step (-1: steps/10)
    perturb: str = "example"          # example (papers' default) | batch (one perturbation per batch)
    response_init: str = "v"          # start of the hypernet path: "v" (V, C random; W_h, b_h zero) | "zero" (V, C zero)
    hyper_input: str = "auto"         # STN hypernet input z = u~ - anchor: "centre" (the range's centre: raw logits),
                                      # "recentred" (u, moved after each hyper step by an exact reparameterisation),
                                      # "auto" (centre for logit-scale hyperparameters, recentred for the others),
                                      # "init" (u at the start)
    linearize: bool = False           # Delta-STN: response and hyper steps on the linearised network
    hidden: tuple = (128, 128)
    channels: tuple = (16, 32)
    train_size: int = 0               # cap on the digits training split (0: all)
    random_trials: int = 4
    seed: int = 0
    data_seed: int = 0
    eval_every: int = 0               # weight steps between evaluations (0: one epoch, at least steps/50)
    checkpoint_every: int = 0         # weight steps between checkpoints (0: at each evaluation)
    out: str = ""                     # run folder ("" : no files)
    resume: bool = False              # continue the run in out from its checkpoint
    overwrite: bool = False           # a new run may replace an earlier run's files in out
    quiet: bool = False
    plots: bool = True
    tensorboard: bool = False         # also write the records as TensorBoard scalars to out/tensorboard
    device: str = "cpu"
    stop_after: int = 0               # stop (as if interrupted) at this weight step (random search: counted
                                      # over all trials); a run resumed at or past it goes on; 0: never

    @classmethod
    def from_dict(cls, d):
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"stn_ext: unknown TrainConfig fields {unknown}")
        return cls(**d)

    def validate(self):
        if self.method not in METHODS:
            raise ValueError(f"stn_ext: unknown method {self.method!r}; expected one of {METHODS}")
        if self.perturb not in ("example", "batch"):
            raise ValueError(f"stn_ext: perturb must be 'example' or 'batch', got {self.perturb!r}")
        if self.hyper_lr_schedule not in ("auto", "cosine", "constant", "tail"):
            raise ValueError("stn_ext: hyper_lr_schedule must be 'auto', 'cosine', 'constant' or 'tail', got "
                             f"{self.hyper_lr_schedule!r}")
        if self.hyper_input not in ("auto", "init", "centre", "recentred"):
            raise ValueError(f"stn_ext: hyper_input must be 'auto', 'init', 'centre' or 'recentred', got {self.hyper_input!r}")
        if self.response_init not in ("v", "zero"):
            raise ValueError(f"stn_ext: response_init must be 'v' or 'zero', got {self.response_init!r}")
        for name in ("steps", "batch_size", "train_per_cycle", "val_per_cycle", "random_trials"):
            if getattr(self, name) < 1:
                raise ValueError(f"stn_ext: {name} must be >= 1, got {getattr(self, name)}")
        if self.warmup_steps < -1:
            raise ValueError(f"stn_ext: warmup_steps must be >= 0 (or -1: steps / 10), got {self.warmup_steps}")
        for name in ("eval_every", "checkpoint_every", "stop_after", "train_size"):
            if getattr(self, name) < 0:
                raise ValueError(f"stn_ext: {name} must be >= 0, got {getattr(self, name)}")
        if self.method in SEARCHES and self.steps < self.random_trials:
            raise ValueError(f"stn_ext: a search ({self.method}) with {self.random_trials} trials needs steps >= trials")
        if self.lr <= 0 or self.hyper_lr < 0 or self.scale_init <= 0 or not (self.tau >= 0 or self.tau == -1) \
                or not self.scale_max >= 0:
            raise ValueError("stn_ext: lr and scale_init must be > 0, hyper_lr and scale_max >= 0, tau >= 0 (or -1: auto)")
        if self.resume and not self.out:
            raise ValueError("stn_ext: resume needs the run folder (out)")
        if self.tensorboard and not self.out:
            raise ValueError("stn_ext: tensorboard writes into the run folder: give out (--out)")
        if self.resume and self.overwrite:
            raise ValueError("stn_ext: resume continues the run in out and overwrite replaces it; choose one")
        if isinstance(self.hypers, str):
            self.hypers = tuple(h.strip() for h in self.hypers.split(",") if h.strip())
        self.hypers = tuple(self.hypers)
        self.hidden, self.channels = tuple(self.hidden), tuple(self.channels)
        _check_device(self.device)
        return self


def _check_device(device):
    """Refuse a device this process cannot train on, before any work (torch would fail late and raw)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"stn_ext: cannot parse device {device!r}; expected cpu, cuda or cuda:N") from None
    if dev.type == "cpu":
        return
    if dev.type != "cuda":
        raise ValueError(f"stn_ext: device {device!r}: stn_ext has CPU and CUDA kernels only")
    if not torch.cuda.is_available():
        raise ValueError(f"stn_ext: device {device!r} asked for, but torch finds no CUDA GPU "
                         "(torch.cuda.is_available() is False); use device 'cpu'")
    if not stn_ext.has_cuda():
        raise ValueError(f"stn_ext: device {device!r} asked for, but this stn_ext build has no CUDA kernels "
                         "(stn_ext.has_cuda() is False); rebuild it with FORCE_CUDA=1 or use device 'cpu'")
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"stn_ext: device {device!r} asked for, but torch finds {torch.cuda.device_count()} GPU(s)")


def _dist():
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class Trainer:
    """One training run of a fixed, STN or Delta-STN method (random search: ``random_search``).

    ``data``: a stn_ext.data.Dataset (default: ``config.data``). ``model``: an nn.Module built on
    StnLinear/StnConv2d whose layers take their hyperparameter input from ``stn_ext.hyper_input``
    (with n_hyper equal to the number of tuned hyperparameters; HyperDropout slots are found), or
    None for the built-in ``config.model``; pass ``model_fn(n_hyper, dropout_slots)`` instead when the
    size depends on the space."""

    def __init__(self, config, data=None, model=None, space=None):
        cfg = self.cfg = config.validate() if isinstance(config, TrainConfig) else TrainConfig.from_dict(config).validate()
        if cfg.method in SEARCHES:
            raise ValueError(f"stn_ext: use stn_ext.trainer.train (or random_search) for method {cfg.method!r}")
        self.rank, self.world = _dist()
        self.device = torch.device(cfg.device)
        if data is None:
            data = load_data(cfg.data, seed=cfg.data_seed, path=cfg.data_path or None,
                             **({"train_size": cfg.train_size} if cfg.train_size else {}))
        if not isinstance(data, Dataset):
            raise TypeError("stn_ext: data must be a stn_ext.data.Dataset (see Dataset.from_arrays)")
        self.data = data  # moved to the device in the model's dtype once the model is known
        if cfg.batch_size % self.world:
            raise ValueError(f"stn_ext: the global batch {cfg.batch_size} must divide among {self.world} processes")
        if cfg.batch_size > len(self.data.train):
            raise ValueError(f"stn_ext: batch_size {cfg.batch_size} exceeds the {len(self.data.train)} training examples")
        self.local_batch = cfg.batch_size // self.world

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            if model is None:
                slots = models.dropout_slots(cfg.model, cfg.hidden, cfg.channels)
                self.space = space or HyperSpace.build(cfg.hypers, slots, cfg.ranges, cfg.inits, self.data.is_image)
                n_out = self.data.n_classes if self.data.task == "classification" else \
                    (1 if self.data.train.y.dim() == 1 else self.data.train.y.shape[1])
                model = models.build(cfg.model, self.data.input_shape, n_out, len(self.space), cfg.hidden, cfg.channels)
            else:
                slots = [m.slot for m in model.modules() if isinstance(m, models.HyperDropout)]
                self.space = space or HyperSpace.build(cfg.hypers, slots, cfg.ranges, cfg.inits, self.data.is_image)
        self.model = model.to(self.device)
        dt = next(self.model.parameters()).dtype
        self.data = self.data.to(self.device, dtype=dt)  # inputs in the model's precision (e.g. a .double() model)
        self.n_train_batches = len(self.data.train) // cfg.batch_size
        self.n_val_batches = max(1, len(self.data.val) // cfg.batch_size)
        self.val_batch = min(cfg.batch_size, len(self.data.val) // self.world * self.world)
        self.tuner = Tuner(
            self.model, self.space, torch.optim.SGD(self.model.parameters(), lr=cfg.lr, momentum=cfg.momentum),
            self._per_example_loss, cfg.method, cfg.steps, hyper_lr=cfg.hyper_lr, hyper_lr_schedule=cfg.hyper_lr_schedule,
            scale_init=cfg.scale_init, scale_max=cfg.scale_max, tau=cfg.tau, train_per_cycle=cfg.train_per_cycle,
            val_per_cycle=cfg.val_per_cycle, warmup_steps=cfg.warmup_steps, perturb=cfg.perturb,
            response_init=cfg.response_init, hyper_input=cfg.hyper_input, linearize=cfg.linearize, seed=cfg.seed,
            loss_norm=cfg.batch_size, val_norm=self.val_batch, world=self.world, allreduce=self._allreduce)
        t = self.tuner
        self.layers, self.params = t.layers, t.params
        self.general_params, self.response_params = t.general_params, t.response_params
        self.recoveries = 0
        self.guard = Guard()
        if self.world > 1:  # identical start on every rank
            with torch.no_grad():
                for t in self.params + [self.u, self.hscale]:
                    torch.distributed.broadcast(t.data, 0)

        self.eval_every = cfg.eval_every or max(self.n_train_batches, cfg.steps // 50)
        self.ckpt_every = cfg.checkpoint_every or self.eval_every
        self.wall = 0.0      # seconds of training so far (over resumes)
        self.progress_label = ""  # the progress bar's name; default "<method> seed <k>"
        self._perm_cache = {}
        self.out = cfg.out if (cfg.out and self.rank == 0) else ""
        self._stop_flag = False

    # --- the tuner's state, as the trainer's (checkpoints, recovery, tests and benchmarks read these) ------

    @property
    def tunes(self):
        return self.tuner.tunes

    u = property(lambda self: self.tuner.u)
    hscale = property(lambda self: self.tuner.hscale)
    opt_w = property(lambda self: self.tuner.opt_w)
    opt_h = property(lambda self: self.tuner.opt_h)
    anchor = property(lambda self: self.tuner.anchor)
    gen = property(lambda self: self.tuner.gen)
    warmup = property(lambda self: self.tuner.warmup)
    tau = property(lambda self: self.tuner.tau)
    total_hyper_steps = property(lambda self: self.tuner.total_hyper_steps)
    h_max = property(lambda self: self.tuner.h_max)

    def _delegate(name):  # noqa: N805  (a read-write attribute kept on the tuner)
        return property(lambda self: getattr(self.tuner, name), lambda self, v: setattr(self.tuner, name, v))

    step = _delegate("step")
    hstep = _delegate("hstep")
    sigma_max = _delegate("sigma_max")
    hyper_lr_factor = _delegate("hyper_lr_factor")
    del _delegate

    def _hyper_steps_after(self, t):
        return self.tuner._hyper_steps_after(t)

    # --- data order ------------------------------------------------------------------------------------

    def _perm(self, which, epoch, n):
        key = (which, epoch)
        if key not in self._perm_cache:
            self._perm_cache.clear() if len(self._perm_cache) > 4 else None
            g = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + epoch * 2 + (which == "val"))
            self._perm_cache[key] = torch.randperm(n, generator=g).to(self.device)
        return self._perm_cache[key]

    def _batch(self, split, which, k, B):
        """Local rows of global batch number k of a split (epochs reshuffle, last partial batch dropped)."""
        per_epoch = len(split) // B
        perm = self._perm(which, k // per_epoch, len(split))
        pos = k % per_epoch
        local = B // self.world
        idx = perm[pos * B + self.rank * local: pos * B + (self.rank + 1) * local]
        return split.x[idx], split.y[idx], BatchRandom(self.gen, B, self.rank * local, local)

    # --- the steps (the algorithm is the tuner's; the trainer brings batches, random draws and ranks) -----

    def _per_example_loss(self, out, y):
        if self.data.task == "classification":
            return F.cross_entropy(out, y, reduction="none")
        out = out.reshape(y.shape) if out.numel() == y.numel() else out
        d = (out - y) ** 2
        return d.reshape(d.shape[0], -1).sum(1)

    def _allreduce(self, tensors):
        if self.world == 1:
            return
        flat = torch.cat([t.reshape(-1) for t in tensors])
        torch.distributed.all_reduce(flat)
        i = 0
        for t in tensors:
            t.copy_(flat[i:i + t.numel()].view_as(t))
            i += t.numel()

    def weight_step(self):
        x, y, rnd = self._batch(self.data.train, "train", self.step, self.cfg.batch_size)
        return self._global_mean(self.tuner.weight_step(x, y, rnd))

    def _global_mean(self, ell):
        s = ell.sum().reshape(1)
        if self.world > 1:
            torch.distributed.all_reduce(s)
        return float(s) / self.cfg.batch_size

    def hyper_step(self):
        """One step on u and the perturbation scales on the next validation batch (Tuner.hyper_step)."""
        x, y, rnd = self._batch(self.data.val, "val", self.hstep, self.val_batch)
        ell = self.tuner.hyper_step(x, y, rnd)
        return float(ell.sum()) / (self.val_batch / self.world) if self.world == 1 else None

    def hypergradient(self, split=None):
        """d(loss on ``split``, default the whole validation split) / du through the hypernet response, at
        the unperturbed hyperparameters, in eval mode (what a hyper step follows, without the noise)."""
        split = self.data.val if split is None else split
        self.model.eval()
        u = self.u.detach().clone().requires_grad_(True)
        z = u - (u.detach() if self.cfg.method != "stn" else self.anchor)  # Tuner.z at u, with u differentiable
        with stn_ext.hyper_input(z):
            out = self.model(split.x)
        loss = self._per_example_loss(out, split.y).mean()
        (g,) = torch.autograd.grad(loss, u)
        self.model.train()
        return g

    # --- evaluation ------------------------------------------------------------------------------------

    def eval_input(self):
        return self.tuner.eval_input()

    @torch.no_grad()
    def evaluate(self, split):
        self.model.eval()
        z = self.eval_input()
        total, correct = 0.0, 0
        for i in range(0, len(split), 512):
            x, y = split.x[i:i + 512], split.y[i:i + 512]
            with stn_ext.hyper_input(z):
                out = self.model(x)
            total += float(self._per_example_loss(out, y).sum())
            if self.data.task == "classification":
                correct += int((out.argmax(1) == y).sum())
        self.model.train()
        r = {"loss": total / len(split)}
        if self.data.task == "classification":
            r["acc"] = correct / len(split)
        return r

    def hyper_values(self):
        return self.tuner.hyperparameters()

    def sigmas(self):
        return self.tuner.sigmas()

    # --- checkpoints ------------------------------------------------------------------------------------

    def state_dict(self):
        """The checkpoint: the tuner's state (Tuner.state_dict) with the model, the weights' optimiser, the
        wall time, the recovery count and the world size."""
        return {"model": self.model.state_dict(), "opt_w": self.opt_w.state_dict(), **self.tuner.state_dict(),
                "wall": self.wall, "recoveries": self.recoveries, "world": self.world}

    def load_state_dict(self, st):
        if st["space"] != self.space.names or st["method"] != self.cfg.method:
            raise ValueError(f"stn_ext: the checkpoint is of method {st['method']!r} with hyperparameters {st['space']}, "
                             f"this run is {self.cfg.method!r} with {self.space.names}")
        self.model.load_state_dict(st["model"])
        self.opt_w.load_state_dict(st["opt_w"])
        self.tuner.load_state_dict(st, generator=False)
        self._restore_generator(st)
        self.wall, self.recoveries = st["wall"], st.get("recoveries", 0)

    def _restore_generator(self, st):
        """Give the generator the checkpoint's state if it is of this device type, and say whether it
        did. A CPU generator state cannot seed a CUDA generator (nor the reverse), so a resume on another
        device type reseeds from (seed, step): deterministic, but other random numbers than the run
        would have drawn on its first device."""
        # checkpoints without gen_device: a CPU (mt19937) state is much larger than a CUDA (philox) one
        saved = st.get("gen_device") or ("cpu" if st["gen"].numel() == torch.Generator().get_state().numel() else "cuda")
        if saved == self.gen.device.type:
            self.gen.set_state(st["gen"])
            return True
        warnings.warn(f"stn_ext: resuming a {saved} checkpoint on {self.gen.device.type}: its random generator "
                      "state does not transfer, so the random draws (perturbations, dropout, augmentation) are "
                      "reseeded from the step and differ from those of an uninterrupted run")
        self.gen.manual_seed(self.cfg.seed + 7919 + 1_000_003 * st["step"])
        return False

    def _ckpt_path(self):
        return os.path.join(self.cfg.out, "checkpoint.pt")

    def save_checkpoint(self):
        if self.out:
            self.log.flush_files()  # first: records past the checkpoint's step are dropped on resume
            checkpoint.save(self._ckpt_path(), self.state_dict())

    # --- the loop ------------------------------------------------------------------------------------

    def _on_signal(self, signum, frame):
        self._stop_flag = True

    def fit(self):
        """Train to ``config.steps`` weight steps (continuing from the checkpoint with ``resume``).
        Returns the summary dict. SIGINT/SIGTERM stop at the next step boundary after a checkpoint."""
        from tqdm.auto import tqdm

        c = self.cfg
        self.log = RunLog(self.out, self.space.names, tensorboard=c.tensorboard)
        if c.resume:
            check_run_folder(c)  # the same settings, and a checkpoint to continue (every rank loads it)
            # on CPU: generator states must stay CPU tensors; load_state_dict moves the rest to the device
            self.load_state_dict(checkpoint.load(self._ckpt_path(), map_location="cpu"))
            self.log.restore(self.step)
        elif self.out:
            open_run_folder(c)
        old = {}
        if c.out:
            for sig in (signal.SIGINT, signal.SIGTERM):
                try:
                    old[sig] = signal.signal(sig, self._on_signal)
                except ValueError:  # not the main thread
                    pass
        desc = self.progress_label or f"{c.method} seed {c.seed}"
        # disable=None: no bar when stderr is not a terminal (a log file would get every update)
        bar = tqdm(total=c.steps, initial=self.step, disable=True if (c.quiet or self.rank != 0) else None, desc=desc,
                   leave=False, dynamic_ncols=True)
        interrupted = False
        try:
            if self.step == 0:
                self._log_eval()
            t0 = time.perf_counter()
            self.guard.take(self.state_dict(), self.step)
            while self.step < c.steps:
                train_loss = self.weight_step()
                rec = {"step": self.step, "train_loss": train_loss}
                hl = []
                for _ in range(self._hyper_steps_after(self.step)):
                    hl.append(self.hyper_step())
                if not self._healthy(train_loss, hl):
                    self._recover(train_loss)
                    bar.n = self.step
                    bar.refresh()
                    continue
                if self.guard.due(self.step):
                    self._regrow_scale_cap()
                    self.guard.take(self.state_dict(), self.step)
                if hl:
                    rec["hyper_steps"] = self.hstep
                    rec["hyper_lr"] = self.opt_h.param_groups[0]["lr"]
                    if hl[0] is not None:
                        rec["hyper_val_loss"] = sum(hl) / len(hl)
                self.log.step(rec, self.hyper_values(), self.sigmas() if self.tunes else None)
                bar.update(1)
                if self.step % self.eval_every == 0 or self.step == c.steps:
                    self.wall += time.perf_counter() - t0
                    t0 = time.perf_counter()
                    ev = self._log_eval()
                    bar.set_postfix(val_loss=f"{ev['val_loss']:.3f}")
                    t0 = time.perf_counter()
                if self.step % self.ckpt_every == 0 or self.step == c.steps:
                    self.wall += time.perf_counter() - t0
                    t0 = time.perf_counter()
                    self.save_checkpoint()
                    self.guard.take(self.state_dict(), self.step)  # never older than the checkpoint on disk
                if self.world > 1:  # stop together: a signal may reach ranks at different steps
                    flag = torch.tensor([float(self._stop_flag)], device=self.device)
                    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
                    self._stop_flag = bool(flag.item())
                # stop_after marks one step: a run resumed at or past it is not stopped again
                if self.step == c.stop_after or self._stop_flag:
                    interrupted = True
                    self.wall += time.perf_counter() - t0
                    self.save_checkpoint()
                    break
        finally:
            bar.close()
            self.log.close()
            for sig, h in old.items():
                signal.signal(sig, h)
        summary = self.summary(interrupted)
        if self.out:
            checkpoint.atomic_write_json(os.path.join(self.out, "summary.json"), summary)
            if c.plots and not interrupted:
                plot_run(self.out, title=desc)
        return summary

    def _healthy(self, train_loss, hyper_losses):
        ok = self.guard.check_loss(train_loss)
        if self.tunes and hyper_losses:
            ok = ok and all(v is None or math.isfinite(v) for v in hyper_losses) and finite(self.u, self.hscale)
        if self.world > 1:  # all ranks roll back together
            flag = torch.tensor([float(not ok)], device=self.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            ok = not bool(flag.item())
        return ok

    def _recover(self, train_loss):
        """Roll back to the last healthy snapshot and halve the perturbation scales, their cap and the
        hyper learning rate; raise Diverged where that cannot help (no tuning) or has not helped."""
        at, vals, sig = self.step, self.hyper_values(), self.sigmas() if self.tunes else None
        if not self.tunes or self.recoveries >= self.guard.max_recoveries:
            tried = (f"; rolled back to step {self.guard.snapshot_step} and halved the perturbation scales "
                     f"{self.recoveries} times (and the hyper learning rate from the third time) without "
                     "recovering") if self.tunes else ""
            kept = ""
            if self.out:
                kept = (f"; the last good checkpoint is kept in {self.cfg.out}" if os.path.exists(self._ckpt_path())
                        else f"; no checkpoint had been written to {self.cfg.out} yet")
            raise Diverged(f"stn_ext: training diverged at weight step {at} (training loss {train_loss:.4g}) with "
                           f"hyperparameters {vals}" + (f", perturbation scales {sig}" if sig else "") + tried + kept +
                           ". Try a smaller learning rate (lr) or a narrower hyperparameter range.")
        sigma_max, factor, recoveries = self.sigma_max, self.hyper_lr_factor, self.recoveries
        self.load_state_dict(self.guard.restore())
        self.log.truncate(self.step)
        with torch.no_grad():
            # the scales first: perturbations are what take SGD past its limit; the hyper step only when
            # that keeps failing (u itself heading somewhere unstable)
            self.recoveries = recoveries + 1
            self.sigma_max, self.hyper_lr_factor = sigma_max / 2, factor / 2 if self.recoveries >= 3 else factor
            self.hscale.copy_(inv_softplus_t(torch.minimum(F.softplus(self.hscale) / 2,
                                                             torch.full_like(self.hscale, self.sigma_max))))
        warnings.warn(f"stn_ext: training diverged at weight step {at} (training loss {train_loss:.4g}, hyperparameters "
                      f"{vals}); rolled back to step {self.step} and halved the perturbation scales (cap now "
                      f"{self.sigma_max:.3g}; hyper learning rate now x{self.hyper_lr_factor:.3g})")

    def _regrow_scale_cap(self):
        """After a recovery the cap on sigma grows back (x sqrt 2 per healthy snapshot interval, to its start):
        a scale halved for good would starve the response, whose signal is proportional to sigma^2."""
        cap0 = self.cfg.scale_max or self.cfg.scale_init
        if self.sigma_max < cap0:
            self.sigma_max = min(cap0, self.sigma_max * math.sqrt(2))

    def _log_eval(self):
        v, t = self.evaluate(self.data.val), self.evaluate(self.data.test)
        rec = {"step": self.step, "epoch": self.step / max(1, self.n_train_batches), "hyper_steps": self.hstep,
               "val_loss": v["loss"], "test_loss": t["loss"], "wall_s": self.wall}
        if "acc" in v:
            rec["val_acc"], rec["test_acc"] = v["acc"], t["acc"]
        rec["hypers"] = self.hyper_values()
        self.log.epoch(rec)
        return rec

    def summary(self, interrupted=False):
        last = self.log.epochs[-1] if self.log.epochs else self._log_eval()
        s = {"method": self.cfg.method, "steps": self.step, "hyper_steps": self.hstep, "wall_s": self.wall,
             "val_loss": last["val_loss"], "test_loss": last["test_loss"], "hypers": self.hyper_values(),
             "complete": not interrupted and self.step >= self.cfg.steps, "seed": self.cfg.seed,
             "perturb": self.cfg.perturb, "linearize": self.cfg.linearize}
        if "val_acc" in last:
            s["val_acc"], s["test_acc"] = last["val_acc"], last["test_acc"]
        if self.data.test_is_val:
            s["test_is_val"] = True
        if self.tunes:
            s["sigmas"] = self.sigmas()
            s["recoveries"] = self.recoveries
        return s


# --- run folders ------------------------------------------------------------------------------------------

# Fields that may differ between a run and its resumption (device: see Trainer._restore_generator).
RESUME_FREE = ("data_path", "tensorboard", "out", "resume", "overwrite", "quiet", "plots", "stop_after", "eval_every", "checkpoint_every",
               "device")


def _trial_dirs(out):
    if not os.path.isdir(out):
        return []
    return sorted(os.path.join(out, d) for d in os.listdir(out)
                  if re.fullmatch(r"trial_\d+", d) and os.path.isdir(os.path.join(out, d)))


def holds_run(out):
    """Whether the folder ``out`` holds an earlier run: its checkpoint or config, or random-search trials."""
    return any(os.path.exists(os.path.join(out, f)) for f in ("checkpoint.pt", "config.json")) or bool(_trial_dirs(out))


def can_resume(cfg):
    """Whether ``cfg.out`` holds something to continue: a checkpoint (random search: its config or trials)."""
    if cfg.method in SEARCHES:
        return holds_run(cfg.out)
    return os.path.exists(os.path.join(cfg.out, "checkpoint.pt"))


def check_same_config(cfg):
    """Refuse to resume the run in ``cfg.out`` with settings that change its result."""
    path = os.path.join(cfg.out, "config.json")
    if not os.path.exists(path):
        return
    with open(path) as f:
        old = json.load(f)
    new = _jsonable(asdict(cfg))
    diff = sorted(k for k in new if k not in RESUME_FREE and old.get(k) != new[k])
    if diff:
        raise ValueError("stn_ext: cannot resume " + cfg.out + " with a different configuration: " +
                         ", ".join(f"{k} was {old.get(k)!r}, now {new[k]!r}" for k in diff) +
                         "; use the original settings or a new run folder")


def check_run_folder(cfg):
    """Refuse a run folder that cannot serve as asked, before any work: resume with no run to continue or
    with other settings, or a new run over an earlier one (whose logs it would extend) without overwrite."""
    if not cfg.out:
        return
    if cfg.resume:
        check_same_config(cfg)
        if not can_resume(cfg):
            if os.path.exists(os.path.join(cfg.out, "config.json")):
                raise FileNotFoundError(f"stn_ext: {cfg.out} holds no checkpoint to resume from (its run stopped "
                                        "before the first one); start it again with --overwrite (API: overwrite=True)")
            raise FileNotFoundError(f"stn_ext: no checkpoint in {cfg.out} to resume from (is --out right?); "
                                    "for a new run leave out --resume")
    elif not cfg.overwrite and holds_run(cfg.out):
        raise FileExistsError(f"stn_ext: {cfg.out} already holds a run; continue it with --resume, replace it with "
                              "--overwrite (deletes its files) or choose another --out (API: resume=True, overwrite=True)")
    else:
        checkpoint.check_folder_creatable(cfg.out)


TENSORBOARD_DIR = "tensorboard"  # the event files of --tensorboard, in the run folder


def run_files():
    """What a run writes in its folder; checkpoint first, so a folder cleared halfway cannot be resumed."""
    return ("checkpoint.pt", "config.json", "summary.json") + RunLog.FILES + PLOT_FILES


def clear_run(out):
    """Delete an earlier run's files from ``out``: run_files(), their temporary files and the trial_<k>
    folders of random search. Other files stay."""
    if not os.path.isdir(out):
        return
    for name in run_files():
        if os.path.exists(os.path.join(out, name)):
            os.unlink(os.path.join(out, name))
    if os.path.isdir(os.path.join(out, TENSORBOARD_DIR)):
        shutil.rmtree(os.path.join(out, TENSORBOARD_DIR))
    for name in os.listdir(out):  # left by a kill during an atomic write (checkpoint.atomic_write_bytes)
        if name.endswith(".tmp") and any(name.startswith(f".{f}.") for f in run_files()):
            os.unlink(os.path.join(out, name))
    for trial in _trial_dirs(out):
        clear_run(trial)
        try:
            os.rmdir(trial)
        except OSError:  # it holds files of the user's
            pass


def open_run_folder(cfg):
    """Start a new run in ``cfg.out`` (one process: rank 0): check it, delete an earlier run's files with
    overwrite, write config.json."""
    check_run_folder(cfg)
    if cfg.overwrite:
        clear_run(cfg.out)
    try:
        os.makedirs(cfg.out, exist_ok=True)
    except OSError as e:  # what the checks could not foresee (root on a read-only file system, /proc)
        raise ValueError(f"stn_ext: --out {cfg.out} (API: out): cannot create the folder: {e.strerror}") from None
    checkpoint.atomic_write_json(os.path.join(cfg.out, "config.json"), _jsonable(asdict(cfg)))


def preflight(cfg):
    """The checks of a run of the built-in data and models that need no data loaded nor model built:
    config values, device, run folder, hyperparameter space (what the CLI runs before any training)."""
    cfg.validate()
    check_run_folder(cfg)
    if cfg.data == "fashion-mnist":  # files missing: say so before any run starts
        fashion_mnist_folder(cfg.data_path or None)
    slots = models.dropout_slots(cfg.model, cfg.hidden, cfg.channels)
    HyperSpace.build(cfg.hypers, slots, cfg.ranges, cfg.inits, image_data=True)


class RunLog:
    """Per-step and per-evaluation records, kept in memory and appended to steps.jsonl, epochs.jsonl
    and schedule.csv (the hyperparameter schedule) in the run folder at each checkpoint (before the
    checkpoint is written). On resume the files are cut back to the checkpoint's step and rewritten
    atomically, so records of steps that are redone (or a line torn by a kill) disappear."""

    FILES = ("steps.jsonl", "epochs.jsonl", "schedule.csv")

    def __init__(self, out, names, tensorboard=False):
        self.out, self.names = out, names
        self.steps, self.epochs = [], []
        self._written = {"steps": 0, "epochs": 0}
        self.tensorboard = tensorboard and bool(out)
        self._tb, self._purge = None, None  # the TensorBoard writer, made at the first flush

    def step(self, rec, hypers, sigmas):
        rec = dict(rec)
        rec["hypers"] = hypers
        if sigmas is not None:
            rec["sigmas"] = sigmas
        self.steps.append(rec)

    def epoch(self, rec):
        self.epochs.append(rec)

    def truncate(self, step):
        """Forget the records past ``step`` (a roll-back; none of them is on disk yet)."""
        self.steps[:] = [r for r in self.steps if r["step"] <= step]
        self.epochs[:] = [r for r in self.epochs if r["step"] <= step]
        assert self._written["steps"] <= len(self.steps) and self._written["epochs"] <= len(self.epochs)

    def _csv_header(self):
        return ",".join(["step"] + self.names + [f"sigma.{n}" for n in self.names]) + "\n"

    def _csv_row(self, r):
        sig = r.get("sigmas", {})
        return ",".join([str(r["step"])] + [f"{r['hypers'][n]:.6g}" for n in self.names] +
                        [f"{sig[n]:.6g}" if n in sig else "" for n in self.names]) + "\n"

    def flush_files(self):
        """Append the records not yet on disk (fsync'ed)."""
        if not self.out:
            return
        os.makedirs(self.out, exist_ok=True)
        new_steps = self.steps[self._written["steps"]:]
        new_epochs = self.epochs[self._written["epochs"]:]
        if self._written["steps"] == 0 and not os.path.exists(os.path.join(self.out, "schedule.csv")):
            checkpoint.atomic_write_text(os.path.join(self.out, "schedule.csv"), self._csv_header())
        for name, text in (("steps.jsonl", "".join(json.dumps(r) + "\n" for r in new_steps)),
                           ("epochs.jsonl", "".join(json.dumps(r) + "\n" for r in new_epochs)),
                           ("schedule.csv", "".join(self._csv_row(r) for r in new_steps))):
            with open(os.path.join(self.out, name), "a") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
        self._written = {"steps": len(self.steps), "epochs": len(self.epochs)}
        if self.tensorboard:  # the same records as the files, so a resume redoes exactly what it drops
            if self._tb is None:
                from stn_ext.tensorboard_log import TensorBoardLog

                self._tb = TensorBoardLog(os.path.join(self.out, TENSORBOARD_DIR), purge_step=self._purge)
            self._tb.steps(new_steps)
            self._tb.epochs(new_epochs)
            self._tb.flush()

    def close(self):
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def restore(self, step):
        """Reload the records of a resumed run up to the checkpoint's step (later ones are redone)."""
        if not self.out:
            return
        for name, lst in (("steps.jsonl", self.steps), ("epochs.jsonl", self.epochs)):
            path = os.path.join(self.out, name)
            recs = []
            if os.path.exists(path):
                with open(path) as f:
                    for line in f:
                        try:
                            recs.append(json.loads(line))
                        except ValueError:  # a line torn by a kill
                            continue
            seen, keep = set(), []
            for r in recs:
                if r["step"] <= step and r["step"] not in seen:
                    seen.add(r["step"])
                    keep.append(r)
            lst[:] = keep
        checkpoint.atomic_write_text(os.path.join(self.out, "steps.jsonl"), "".join(json.dumps(r) + "\n" for r in self.steps))
        checkpoint.atomic_write_text(os.path.join(self.out, "epochs.jsonl"), "".join(json.dumps(r) + "\n" for r in self.epochs))
        checkpoint.atomic_write_text(os.path.join(self.out, "schedule.csv"),
                                     self._csv_header() + "".join(self._csv_row(r) for r in self.steps))
        self._written = {"steps": len(self.steps), "epochs": len(self.epochs)}
        self._purge = step + 1


def _jsonable(d):
    return json.loads(json.dumps(d, default=lambda o: list(o) if isinstance(o, (tuple, set)) else str(o)))


# --- plots ---------------------------------------------------------------------------------------------


# --- random search and the entry points -------------------------------------------------------------------


class RandomProposer:
    """Random search's trial values: drawn from the space up front (uniform; log-uniform for log scales)."""

    def __init__(self, space, seed, n):
        g = torch.Generator().manual_seed(seed + 31337)
        self.trials = [space.sample(g) for _ in range(n)]

    def ask(self, k):
        return dict(self.trials[k])

    def tell(self, k, values, loss):
        pass  # the draws do not depend on the results


class TPEProposer:
    """Optuna's TPE sampler (Bergstra et al. 2011), what users reach for today: each trial's values from the
    finished trials' final validation losses. The sampler is seeded, so asking again for the trials finished
    before a resume, and telling their losses, rebuilds the study as it was. Optional: ``pip install optuna``."""

    def __init__(self, space, seed, n):
        try:
            import optuna
        except ImportError:
            raise ImportError("stn_ext: method 'tpe' uses Optuna's TPE sampler: pip install optuna") from None
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.optuna = optuna
        # TPE needs a few random trials before it models anything; with the few trials of an equal-steps
        # budget, a quarter of them (at least 2)
        sampler = optuna.samplers.TPESampler(seed=seed + 31337, n_startup_trials=max(2, n // 4))
        self.study = optuna.create_study(direction="minimize", sampler=sampler)
        self.dists = {h.name: self._distribution(h) for h in space.hypers}
        self.pending = {}

    def _distribution(self, h):
        d = self.optuna.distributions
        if h.discrete:
            return d.IntDistribution(math.ceil(h.low), math.floor(h.high))
        if h.transform == "log":
            return d.FloatDistribution(h.low, h.high, log=True)
        margin = 1e-3 * (h.high - h.low)  # logit scales: strictly inside the range, as random search draws
        return d.FloatDistribution(h.low + margin, h.high - margin)

    def ask(self, k):
        t = self.study.ask(self.dists)
        self.pending[k] = t
        return {n: float(v) for n, v in t.params.items()}

    def tell(self, k, values, loss):
        self.study.tell(self.pending.pop(k), loss)


PROPOSERS = {"random": RandomProposer, "tpe": TPEProposer}


def _trial_values(out):
    """The values a trial folder's run was started with (its config's inits), or None."""
    path = os.path.join(out, "config.json")
    if not out or not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f).get("inits")


def random_search(config, data=None, model_fn=None):
    """``random_trials`` fixed runs, ``steps // trials`` weight steps each (the same total as one STN run), at
    values from the method's proposer: 'random' draws them from the space, 'tpe' asks Optuna's TPE given the
    trials so far. The trial with the lowest final validation loss wins. Trials run in out/trial_<k>; with
    resume, finished trials are kept (and told to TPE) and the current one resumes at its own values.
    ``stop_after`` counts weight steps over all trials: trial k holds steps k * per + 1 .. (k + 1) * per."""
    cfg = config.validate()
    per = cfg.steps // cfg.random_trials
    if cfg.out and (cfg.resume or _dist()[0] == 0):
        check_run_folder(cfg)
    base = Trainer(_replace(cfg, method="fixed", out="", resume=False, overwrite=False, steps=per), data=data,
                   model=model_fn() if model_fn else None)
    space = base.space
    proposer = PROPOSERS[cfg.method](space, cfg.seed, cfg.random_trials)
    if cfg.out and not cfg.resume and _dist()[0] == 0:
        open_run_folder(cfg)
    results = []
    for k in range(cfg.random_trials):
        out = os.path.join(cfg.out, f"trial_{k}") if cfg.out else ""
        values = proposer.ask(k)  # also for trials finished before a resume: TPE's sampler replays its draws
        done = finished_summary(out) if cfg.resume and out else None
        if done:
            proposer.tell(k, values, done["val_loss"])
            results.append(dict(done, trial=k))
            continue
        resume = cfg.resume and bool(out) and os.path.exists(os.path.join(out, "checkpoint.pt"))
        values = (_trial_values(out) if resume else None) or values  # a resumed trial keeps what it started with
        # a trial not resumed starts afresh (a folder left by a kill before its first checkpoint is replaced)
        tcfg = _replace(cfg, method="fixed", out=out, steps=per, stop_after=_trial_stop(cfg.stop_after, k, per),
                        resume=resume, overwrite=not resume and bool(out), inits=dict(values),
                        ranges=_ranges_of(space), hypers=tuple(space.names))
        tr = Trainer(tcfg, data=data, model=model_fn() if model_fn else None, space=space.with_inits(values))
        tr.progress_label = f"{cfg.method} trial {k + 1}/{cfg.random_trials} seed {cfg.seed}"
        s = tr.fit()
        s["trial"] = k
        if not s["complete"]:  # interrupted: stop here; resume continues this trial
            s.update(method=cfg.method, trial_steps=s["steps"], steps=k * per + s["steps"])
            return s
        proposer.tell(k, values, s["val_loss"])
        results.append(s)
    best = min(results, key=lambda r: r["val_loss"])
    summary = dict(best)
    summary.update(method=cfg.method, steps=per * cfg.random_trials, trials=len(results),
                   wall_s=sum(r["wall_s"] for r in results), best_trial=results.index(best),
                   trial_val_losses=[r["val_loss"] for r in results], trial_hypers=[r["hypers"] for r in results])
    if cfg.out and _dist()[0] == 0:
        checkpoint.atomic_write_json(os.path.join(cfg.out, "summary.json"), summary)
    return summary


def finished_summary(out):
    """The summary of the finished run (or trial) in ``out``, else None."""
    path = os.path.join(out, "summary.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        s = json.load(f)
    return s if s.get("complete") else None


def _trial_stop(stop_after, k, per):
    """Trial k's stop_after for a random search stopped after ``stop_after`` weight steps in total."""
    local = stop_after - k * per
    return local if 0 < local <= per else 0


def _ranges_of(space):
    return {h.name: (h.low, h.high) for h in space.hypers}


def _replace(cfg, **kw):
    d = asdict(cfg)
    d.update(kw)
    return TrainConfig(**d).validate()


def train(config, data=None, model=None, space=None):
    """Run ``config`` (a TrainConfig or dict) and return its summary; the API behind the CLI.
    ``data``: a stn_ext.data.Dataset or None (config.data); ``model``: an STN nn.Module or None (the
    built-in config.model); for the searches ('random', 'tpe'), a zero-argument function returning a fresh model.
    ``space``: a HyperSpace to use instead of config.hypers (it may hold hyperparameters of your own
    kind: your model reads their per-example values from stn_ext.models.current_hyperparameters())."""
    cfg = config if isinstance(config, TrainConfig) else TrainConfig.from_dict(dict(config))
    cfg.validate()
    if cfg.method in SEARCHES:
        if isinstance(model, nn.Module) or (model is not None and not callable(model)):
            raise TypeError(f"stn_ext: a search ({cfg.method}) trains several models; pass model as a zero-argument "
                            "function returning a fresh model")
        if space is not None:
            raise ValueError(f"stn_ext: a search ({cfg.method}) builds its space from config.hypers")
        return random_search(cfg, data, model)
    if model is not None and not isinstance(model, nn.Module):
        model = model()
    return Trainer(cfg, data=data, model=model, space=space).fit()


# --- multi-process ----------------------------------------------------------------------------------------


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, cfg_dict, result_path, backend):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    torch.distributed.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                         world_size=world)
    try:
        cfg = TrainConfig.from_dict(cfg_dict)
        if cfg.device.startswith("cuda"):
            cfg.device = f"cuda:{rank % torch.cuda.device_count()}"
            torch.cuda.set_device(cfg.device)
        if cfg.method in SEARCHES:
            summary = random_search(cfg.validate())
            state = None
        else:
            tr = Trainer(cfg)
            summary = tr.fit()
            state = {k: v.detach().cpu() for k, v in tr.model.state_dict().items()}
            state["__u"], state["__hscale"] = tr.u.detach().cpu(), tr.hscale.detach().cpu()
        if result_path:
            checkpoint.save(f"{result_path}.rank{rank}", {"summary": summary, "state": state})
    finally:
        torch.distributed.destroy_process_group()


class WorkerDied(RuntimeError):
    """A process of run_distributed died without a Python error (killed, or out of memory)."""


def _resume_hint(cfg):
    """Where a stopped multi-process run can continue from, and how."""
    if not cfg.out:
        return "Nothing was saved (no --out)."
    if cfg.method not in SEARCHES and os.path.exists(os.path.join(cfg.out, "checkpoint.pt")):
        step = checkpoint.load(os.path.join(cfg.out, "checkpoint.pt"), map_location="cpu")["step"]
        return (f"The last checkpoint, at step {step} of {cfg.steps}, is in {cfg.out}: run the same command with "
                "--resume to continue (API: resume=True).")
    if can_resume(cfg):
        return f"The run so far is in {cfg.out}: run the same command with --resume to continue (API: resume=True)."
    return f"No checkpoint was written yet in {cfg.out}: run the same command with --overwrite to start again."


def run_distributed(config, nprocs, result_path=""):
    """Train ``config`` on ``nprocs`` local processes (gloo on CPU, nccl on CUDA) and return rank 0's
    summary. With ``result_path``, each rank saves {'summary', 'state'} to result_path.rank<k>."""
    import torch.multiprocessing as mp

    cfg = config if isinstance(config, TrainConfig) else TrainConfig.from_dict(dict(config))
    cfg.validate()
    check_run_folder(cfg)  # here, where the error reads clean, not from inside a spawned rank
    backend = "nccl" if cfg.device.startswith("cuda") else "gloo"
    keep = result_path
    if not result_path:
        import tempfile
        result_path = os.path.join(tempfile.mkdtemp(prefix="stn_ext_ddp_"), "result")
    try:
        mp.spawn(_worker, args=(nprocs, free_port(), _jsonable(asdict(cfg)), result_path, backend), nprocs=nprocs,
                 join=True)
    except mp.ProcessExitedException as e:  # a rank killed (signal) or exited without a Python error
        how = f"was killed by {e.signal_name}" if e.signal_name else f"exited with code {e.exit_code}"
        raise WorkerDied(f"stn_ext: rank {e.error_index} of {nprocs} {how}; the other ranks were stopped. "
                         f"{_resume_hint(cfg)}") from None
    res = checkpoint.load(f"{result_path}.rank0")
    if not keep:
        for r in range(nprocs):
            os.unlink(f"{result_path}.rank{r}")
    return res["summary"]
