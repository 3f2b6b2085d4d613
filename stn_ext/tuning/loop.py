"""Bilevel training with self-tuning networks.

Methods (``TrainConfig.method``):

stn         MacKay et al. 2019. Hyperparameters u (unconstrained) with a learned perturbation scale
            sigma = softplus(h). Weight step: lam~ = u + sigma (.) eps (per example or one per batch),
            the regularisers use value(lam~), the hypernet sees z = lam~ - anchor (stn_ext.tuning.core),
            all weights step on the training loss. Hyper step (eval mode: no dropout/augmentation/noise): the
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

    from stn_ext.tuning import TrainConfig, train
    summary = train(TrainConfig(method="delta-stn", hypers=("dropout", "weight_decay"), steps=1500,
                                out="runs/dstn"))
    # own data and model: Dataset.from_arrays(x_train, y_train, x_val, y_val, x_test, y_test) and any
    # nn.Module built on StnLinear/StnConv2d (n_hyper = number of tuned hyperparameters, optional
    # stn_ext.tuning.models.HyperDropout slots): train(config, data=dataset, model=model)

Data parallel: run under torch.distributed (gloo on CPU, nccl on GPU; ``run_distributed`` spawns local
processes). Each rank takes its rows of the same global batch, draws its rows of the same global
random numbers, and gradients (weights and hyperparameters) are summed across ranks, so every rank
holds identical weights, hypernet and hyperparameters, equal to a 1-process run with the same batch.
"""
import contextlib
import math
import os
import signal
import time
import warnings

import torch
import torch.nn.functional as F

import stn_ext
from stn_ext import checkpoint
from stn_ext.cpu_memory import keep_freed_memory
from stn_ext.data import Dataset, load as load_data
from stn_ext.tuning import language, models
from stn_ext.tuning.augment import BatchRandom
from stn_ext.tuning.config import SEARCHES, TrainConfig, _dist, resolved
from stn_ext.tuning.core import Tuner
from stn_ext.tuning.divergence import Guard, finite, regrow, roll_back
from stn_ext.tuning.plots import plot_run
from stn_ext.tuning.runfolder import RunLog, check_run_folder, open_run_folder
from stn_ext.tuning.space import HyperSpace


def _ppl(loss):
    """Perplexity of a per-token loss (inf past exp's range, as a diverged run's)."""
    return math.exp(loss) if loss < 700 else math.inf


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
            raise ValueError(f"stn_ext: use stn_ext.tuning.train (or random_search) for method {cfg.method!r}")
        self.rank, self.world = _dist()
        self.device = torch.device(cfg.device)
        if self.device.type == "cpu":
            keep_freed_memory()
        if data is None and cfg.data in language.TEXT_DATA:
            data = language.load_text(cfg.data, cfg.batch_size, resolved(cfg, True)["bptt"], cfg.data_path,
                                      train_tokens=cfg.train_size)
        elif data is None:
            data = load_data(cfg.data, seed=cfg.data_seed, path=cfg.data_path or None,
                             **({"train_size": cfg.train_size} if cfg.train_size else {}))
        if not isinstance(data, Dataset):
            raise TypeError("stn_ext: data must be a stn_ext.data.Dataset (see Dataset.from_arrays)")
        self.data = data  # moved to the device in the model's dtype once the model is known
        self.language = data.task == "language"
        self.settings = resolved(cfg, self.language)  # lr, momentum, clip, bptt, hypers: defaults by the data
        hypers = self.settings["hypers"]
        if cfg.batch_size % self.world:
            raise ValueError(f"stn_ext: the global batch {cfg.batch_size} must divide among {self.world} processes")
        if cfg.batch_size > len(self.data.train):
            raise ValueError(f"stn_ext: batch_size {cfg.batch_size} exceeds the {len(self.data.train)} training examples")

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            if model is None:
                language.check_model_for_data(cfg.model, self.language, self.data.name)
            if model is None and self.language:
                slots = language.dropout_slots(cfg.hidden)
                self.space = space or HyperSpace.build(hypers, slots, cfg.ranges, cfg.inits, False)
                model = language.LanguageModel(self.data.n_classes, len(self.space), cfg.hidden)
            elif model is None:
                slots = models.dropout_slots(cfg.model, cfg.hidden, cfg.channels)
                self.space = space or HyperSpace.build(hypers, slots, cfg.ranges, cfg.inits, self.data.is_image)
                n_out = self.data.n_classes if self.data.task == "classification" else \
                    (1 if self.data.train.y.dim() == 1 else self.data.train.y.shape[1])
                model = models.build(cfg.model, self.data.input_shape, n_out, len(self.space), cfg.hidden, cfg.channels)
            else:
                slots = stn_ext.dropout_slots(model)
                self.space = space or HyperSpace.build(hypers, slots, cfg.ranges, cfg.inits, self.data.is_image)
        self.model = model.to(self.device)
        dt = next(self.model.parameters()).dtype
        self.data = self.data.to(self.device, dtype=dt)  # inputs in the model's precision (e.g. a .double() model)
        self.n_train_batches = len(self.data.train) // cfg.batch_size
        # Validation rows per hyper step: the batch's, or all where each batch is the whole training split (full batch,
        # docs/trainer.md). Text: the split is cut into batch_size streams (language.stream_split).
        self.full_batch = not self.language and cfg.batch_size == len(self.data.train)
        whole = len(self.data.val) // self.world * self.world
        self.val_batch = whole if self.full_batch else min(cfg.batch_size, whole)
        self.streams = {"train": language.Stream(), "val": language.Stream()}  # carried hidden states (text)
        self.tuner = Tuner(
            self.model, self.space, torch.optim.SGD(self.model.parameters(), lr=self.settings["lr"],
                                                    momentum=self.settings["momentum"], foreach=True),
            self._per_example_loss, cfg.method, cfg.steps, hyper_lr=cfg.hyper_lr, hyper_lr_schedule=cfg.hyper_lr_schedule,
            hyper_beta2=cfg.hyper_beta2, scale_init=cfg.scale_init, scale_max=cfg.scale_max, tau=cfg.tau,
            hyper_plain_every=cfg.hyper_plain_every, train_per_cycle=cfg.train_per_cycle, full_batch=self.full_batch,
            val_per_cycle=cfg.val_per_cycle, warmup_steps=cfg.warmup_steps, perturb=cfg.perturb,
            response_init=cfg.response_init, hyper_input=cfg.hyper_input, linearize=cfg.linearize, seed=cfg.seed,
            response_every=cfg.response_every, response_rows=cfg.response_rows, clip=self.settings["clip"],
            response_gain_max=cfg.response_gain_max, response_baseline=cfg.response_baseline,
            response_fit=cfg.response_fit, loss_norm=cfg.batch_size, val_norm=self.val_batch, world=self.world, allreduce=self._allreduce,
            check_finite=False)  # the trainer checks each step itself (_healthy) and rolls back (_recover)
        self.layers, self.params = self.tuner.layers, self.tuner.params
        self.recoveries, self.guard = 0, Guard()
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
        self.best = None        # the evaluation with the lowest validation loss so far (a record of epochs.jsonl)
        self.best_state = None  # the model's state_dict there (CPU copies); in <out>/best.pt too

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

    def _delegate(name):  # noqa: N805  (a read-write attribute kept on the tuner)
        return property(lambda self: getattr(self.tuner, name), lambda self, v: setattr(self.tuner, name, v))

    step = _delegate("step")
    hstep = _delegate("hstep")
    sigma_max = _delegate("sigma_max")
    hyper_lr_factor = _delegate("hyper_lr_factor")
    del _delegate

    # --- data order ------------------------------------------------------------------------------------

    def _perm(self, which, epoch, n):
        if self.language:  # windows in order: batch k continues batch k - 1 in every stream
            return torch.arange(n, device=self.device)
        if (key := (which, epoch)) not in self._perm_cache:
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
        if self.language:
            return language.token_losses(out, y)
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
        with self._stream("train", self.step, len(self.data.train) // self.cfg.batch_size):
            return self._global_mean(self.tuner.weight_step(x, y, rnd))

    def _stream(self, which, k, per_epoch):
        """The block of batch k of a split's streams (language data; else no-op): the state restarts with each
        pass over the split and moves on once the step is done."""
        stream = self.streams[which]
        if not self.language:
            return contextlib.nullcontext()
        if k % per_epoch == 0:
            stream.reset()

        @contextlib.contextmanager
        def block():
            with language.carrying(stream):
                yield
            stream.advance()

        return block()

    def _global_mean(self, ell):
        s = ell.sum().reshape(1)
        if self.world > 1:
            torch.distributed.all_reduce(s)
        return float(s) / self.cfg.batch_size

    def hyper_step(self):
        """One step on u and the perturbation scales on the next validation batch (Tuner.hyper_step)."""
        x, y, rnd = self._batch(self.data.val, "val", self.hstep, self.val_batch)
        with self._stream("val", self.hstep, len(self.data.val) // self.val_batch):
            ell = self.tuner.hyper_step(x, y, rnd)
        return float(ell.sum()) / (self.val_batch / self.world) if self.world == 1 else None

    def hypergradient(self, split=None):
        """d(loss on ``split``, default the whole validation split) / du through the hypernet response, at
        the unperturbed hyperparameters, in eval mode (what a hyper step follows, without the noise)."""
        split = self.data.val if split is None else split
        self.model.eval()
        u = self.u.detach().clone().requires_grad_(True)
        g = torch.zeros_like(u)
        for x, y, carried in self._in_order(split):  # each chunk its own graph (a carried state is detached)
            with stn_ext.hyper_input(self.tuner.z(u, centred=self.cfg.method != "stn")), carried:
                out = self.model(x)
            g += torch.autograd.grad(self._per_example_loss(out, y).sum() / len(split), u)[0]
        self.model.train()
        return g

    def _in_order(self, split):
        """The split in chunks (x, y, the block to run the model in): language data, its streams in order from a
        zero state, batch_size windows at a time with the state carried; else 512 examples at a time."""
        chunk, stream = (self.cfg.batch_size, language.Stream()) if self.language else (512, None)
        for i in range(0, len(split), chunk):
            yield split.x[i:i + chunk], split.y[i:i + chunk], language.carrying(stream)
            if stream is not None:
                stream.advance()

    # --- evaluation ------------------------------------------------------------------------------------

    def eval_input(self):
        return self.tuner.eval_input()

    @torch.no_grad()
    def evaluate(self, split):
        self.model.eval()
        z = self.eval_input()
        total, correct = 0.0, 0
        for x, y, carried in self._in_order(split):
            with self.tuner.input_context(z), carried:
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
        st = {"model": self.model.state_dict(), "opt_w": self.opt_w.state_dict(), **self.tuner.state_dict(),
              "wall": self.wall, "recoveries": self.recoveries, "world": self.world}
        if self.language:  # the hidden states carried into the next training and validation batches
            st["streams"] = {k: s.start for k, s in self.streams.items()}
        return st

    def load_state_dict(self, st):
        self.tuner.load_state_dict(st, generator=False)  # first: it refuses a checkpoint of another method or space
        self.model.load_state_dict(st["model"])
        self.opt_w.load_state_dict(st["opt_w"])
        self._restore_generator(st)
        self.wall, self.recoveries = st["wall"], st.get("recoveries", 0)
        for k, state in st.get("streams", {}).items():
            state = None if state is None else [tuple(t.to(self.device) for t in hc) for hc in state]
            self.streams[k].start = self.streams[k].end = state

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

    def _best_path(self):
        return os.path.join(self.cfg.out, "best.pt")

    def _keep_if_best(self, rec):
        """Keep the model of the evaluation with the lowest finite validation loss so far: a tuned run can pass
        its best and drift (the last evaluation is what the summary's val_loss/test_loss report)."""
        if not math.isfinite(rec["val_loss"]) or (self.best is not None and rec["val_loss"] >= self.best["val_loss"]):
            return
        self.best = {k: v for k, v in rec.items() if k not in ("wall_s", "time")}
        self.best_state = {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}
        if self.out:
            checkpoint.save(self._best_path(), {"model": self.best_state, "record": self.best})

    def _load_best(self):
        """On resume: the best evaluation kept so far. best.pt may be from past the checkpoint's step (an
        evaluation after it, then a stop); resume replays the same bits, so it is the state the run reaches."""
        if self.cfg.out and os.path.exists(self._best_path()):
            st = checkpoint.load(self._best_path())
            self.best, self.best_state = st["record"], st["model"]

    def restore_best(self):
        """Load the best evaluation's weights into the model (in place); returns its record (step, val_loss,
        test_loss, hypers, ...)."""
        if self.best_state is None:
            raise RuntimeError("stn_ext: no evaluation with a finite validation loss has been made yet")
        self.model.load_state_dict(self.best_state)
        return self.best

    def save_checkpoint(self):
        if self.out:
            self.log.flush_files()  # first: records past the checkpoint's step are dropped on resume
            checkpoint.save(self._ckpt_path(), self.state_dict())

    # --- the loop ------------------------------------------------------------------------------------

    def request_stop(self):
        """Stop ``fit`` at the next step boundary, after a checkpoint, as SIGINT or SIGTERM do: the summary then says
        interrupted, and ``resume`` continues the run. Safe from a signal handler, another thread or a callback."""
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
            self._load_best()
        elif self.out:
            open_run_folder(c)
        old = {}
        if c.out:
            for sig in (signal.SIGINT, signal.SIGTERM):
                try:
                    old[sig] = signal.signal(sig, lambda signum, frame: self.request_stop())
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
                for _ in range(self.tuner.hyper_steps_due()):
                    hl.append(self.hyper_step())
                if not self._healthy(train_loss, hl):
                    self._recover(train_loss)
                    bar.n = self.step
                    bar.refresh()
                    continue
                if self.guard.due(self.step):
                    regrow(self.tuner)
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
                    # never older than the checkpoint on disk (nor is the one it keeps before)
                    self.guard.take(self.state_dict(), self.step, keep_older=not self.out)
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
        kept = ""
        if self.out:
            kept = (f"; the last good checkpoint is kept in {self.cfg.out}" if os.path.exists(self._ckpt_path())
                    else f"; no checkpoint had been written to {self.cfg.out} yet")

        def load(state):
            self.load_state_dict(state)
            self.log.truncate(self.step)

        self.recoveries = roll_back(self.tuner, self.guard, self.recoveries, load, f"weight step {self.step}",
                                    f"training loss {train_loss:.4g}", kept, give_up=not self.tunes)

    def _log_eval(self):
        v, t = self.evaluate(self.data.val), self.evaluate(self.data.test)
        rec = {"step": self.step, "epoch": self.step / max(1, self.n_train_batches), "hyper_steps": self.hstep,
               "val_loss": v["loss"], "test_loss": t["loss"], "wall_s": self.wall,
               "time": round(time.time(), 3)}  # when it was known (Unix seconds): aligns runs in parallel
        if "acc" in v:
            rec["val_acc"], rec["test_acc"] = v["acc"], t["acc"]
        if self.language:
            rec["val_ppl"], rec["test_ppl"] = _ppl(v["loss"]), _ppl(t["loss"])
        rec["hypers"] = self.hyper_values()
        self.log.epoch(rec)
        self._keep_if_best(rec)
        return rec

    def summary(self, interrupted=False):
        last = self.log.epochs[-1] if self.log.epochs else self._log_eval()
        s = {"method": self.cfg.method, "steps": self.step, "hyper_steps": self.hstep, "wall_s": self.wall,
             "val_loss": last["val_loss"], "test_loss": last["test_loss"], "hypers": self.hyper_values(),
             "complete": not interrupted and self.step >= self.cfg.steps, "seed": self.cfg.seed,
             "perturb": self.tuner.perturb, "linearize": self.cfg.linearize}
        if "val_acc" in last:
            s["val_acc"], s["test_acc"] = last["val_acc"], last["test_acc"]
        if "val_ppl" in last:
            s["val_ppl"], s["test_ppl"] = last["val_ppl"], last["test_ppl"]
        if self.best is not None:
            s["best"] = self.best
        if self.data.test_is_val:
            s["test_is_val"] = True
        if self.tunes:
            s["sigmas"] = self.sigmas()
            s["recoveries"] = self.recoveries
        return s


__all__ = ["Trainer"]
