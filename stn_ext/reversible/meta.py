"""A meta-optimisation loop over exact hypergradients (:func:`stn_ext.reversible.train_and_evaluate`).

    hypers = {"log_lr": torch.full((T, G), -1.0, dtype=torch.float64, requires_grad=True), ...}
    def objective(hypers, seed):          # one training run at these hyperparameters -> scalar tensor
        return reversible.train_and_evaluate(model, train_loss, val_loss, batches, T,
                                             lr=hypers["log_lr"].exp(), ..., seed=seed)
    result = meta_optimize(objective, hypers, torch.optim.Adam(hypers.values(), lr=0.04), meta_iters=50,
                           out="runs/meta")   # checkpointed after every meta-iteration; resume=True continues

Each meta-iteration calls ``objective(hypers, seed)`` (a fresh ``seed + k`` at meta-iteration k with
``fresh_seed=True``), back-propagates it into the hyperparameter tensors and takes one step of the
optimiser. ``objective`` may return ``(value, info)`` with ``info`` a dict of numbers to log (say the test
loss of the trained weights). A history row per meta-iteration: the objective, the meta-gradient's norm
(all tensors together and each one), ``info``, the seed and the seconds taken.

Chaos stop (the paper's Fig. 10: when training becomes chaotic the meta-gradient's norm grows
exponentially and stops being informative): see :class:`ChaosRule`. The loop also stops, with the
reason, when training diverges (a non-finite objective, a fixed-point overflow, a non-finite gradient).
A stop keeps the hyperparameters at which the offending gradient was measured (no step is taken with it).

Checkpoint: with ``out``, after every meta-iteration ``state.pt`` (the hyperparameters, the optimiser's
state, the history), ``meta_history.csv`` and ``summary.json`` are rewritten atomically, so a kill leaves
the last finished meta-iteration; ``resume=True`` continues from it and reproduces an uninterrupted run
bit for bit (the seeds come from the iteration number, the optimiser's state is saved whole).
"""
import csv
import io
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch

from stn_ext import checkpoint
from stn_ext.reversible.optim import FixedPointOverflowError

__all__ = ["meta_optimize", "MetaResult", "ChaosRule", "STATE_FILE"]

STATE_FILE = "state.pt"
_VERSION = 1


@dataclass
class ChaosRule:
    """Stop when the meta-gradient's norm grows steadily: at meta-iteration k (with at least ``window``
    finite norms logged), fit a least-squares line to log10(norm) over the last ``window`` meta-iterations;
    stop if its slope times (window - 1), the growth of the fitted trend across the window, is at least
    log10(``factor``), i.e. the trend multiplied the norm by ``factor`` or more within the window. A
    non-finite norm stops at once. Defaults: a tenfold trend growth within 8 meta-iterations; noise of a
    fresh seed per meta-iteration (about +-0.3 in log10) does not reach it on a flat sequence.
    ``window=0`` disables the rule."""

    window: int = 8
    factor: float = 10.0

    def check(self, norms: List[float]) -> Optional[str]:
        """A message if the last entries of ``norms`` (one per meta-iteration) call for a stop, else None."""
        if not norms:
            return None
        if not math.isfinite(norms[-1]):
            return f"the meta-gradient norm is {norms[-1]}"
        w = int(self.window)
        if w < 2 or len(norms) < w:
            return None
        tail = norms[-w:]
        if min(tail) <= 0:
            return None
        ys = [math.log10(n) for n in tail]
        xm, ym = (w - 1) / 2, sum(ys) / w
        slope = sum((i - xm) * (y - ym) for i, y in enumerate(ys)) / sum((i - xm) ** 2 for i in range(w))
        growth = 10 ** (slope * (w - 1))
        if growth >= self.factor:
            return (f"the meta-gradient norm grew {growth:.3g}x along its trend over the last {w} meta-iterations "
                    f"({tail[0]:.3g} -> {tail[-1]:.3g}; rule: >= {self.factor:g}x): training has likely turned "
                    "chaotic (Maclaurin et al. 2015, Fig. 10), so its hypergradients no longer point anywhere useful. "
                    "Use fewer training steps T, smaller learning rates, or a smaller meta step")
        return None


@dataclass
class MetaResult:
    """What :func:`meta_optimize` returns: the hyperparameter tensors (the caller's own, updated in
    place), one history row per meta-iteration, why it stopped early (None if it ran all meta-iterations),
    the best row (lowest objective) and the seconds spent (over all resumptions)."""

    hypers: Dict[str, torch.Tensor]
    history: List[dict]
    stopped: Optional[str] = None
    best: Optional[dict] = None
    best_hypers: Dict[str, torch.Tensor] = field(default_factory=dict)
    seconds: float = 0.0


def _check_optimizer(optimizer, hypers):
    params = [p for g in optimizer.param_groups for p in g["params"]]
    ids = {id(h) for h in hypers.values()}
    if len(params) != len(ids) or {id(p) for p in params} != ids:
        raise ValueError("stn_ext: meta_optimize: the optimiser must hold exactly the tensors of hypers (built as "
                         "torch.optim.X(hypers.values(), ...)), so that its state can be saved and resumed")
    for k, h in hypers.items():
        if not isinstance(h, torch.Tensor) or not h.is_leaf or not h.requires_grad:
            raise ValueError(f"stn_ext: meta_optimize: hypers[{k!r}] must be a leaf tensor with requires_grad=True")


def _signature(hypers, optimizer, seed, fresh_seed, config):
    return {"shapes": {k: list(h.shape) for k, h in hypers.items()},
            "dtypes": {k: str(h.dtype) for k, h in hypers.items()},
            "optimizer": type(optimizer).__name__, "seed": int(seed), "fresh_seed": bool(fresh_seed),
            "config": dict(config or {})}


def _iteration_seed(seed, fresh_seed, k):
    return int(seed) + int(k) if fresh_seed else int(seed)


def history_csv(history):
    buf = io.StringIO()
    keys = []
    for row in history:
        keys += [k for k in row if k not in keys]
    w = csv.DictWriter(buf, fieldnames=keys)
    w.writeheader()
    w.writerows(history)
    return buf.getvalue()


def _summary(state, meta_iters):
    hist = state["history"]
    good = [r for r in hist if math.isfinite(r.get("objective", float("nan")))]
    return {"meta_iters_done": len(hist), "meta_iters": meta_iters, "stopped": state["stopped"],
            "complete": state["stopped"] is None and state["next_iter"] >= meta_iters,
            "seconds": state["seconds"], "first": good[0] if good else None, "last": good[-1] if good else None,
            "best": state["best"], "config": state["signature"]["config"]}


def _save(out, state, meta_iters):
    checkpoint.save(os.path.join(out, STATE_FILE), state)
    checkpoint.atomic_write_text(os.path.join(out, "meta_history.csv"), history_csv(state["history"]))
    checkpoint.atomic_write_json(os.path.join(out, "summary.json"), _summary(state, meta_iters))


def _resume(out, hypers, optimizer, signature):
    path = os.path.join(out, STATE_FILE)
    if not os.path.exists(path):
        raise ValueError(f"stn_ext: meta_optimize: no {path} to resume from (is out right?); for a new run leave "
                         "out resume")
    state = checkpoint.load(path)
    if state.get("version") != _VERSION:
        raise ValueError(f"stn_ext: meta_optimize: {path} was written by another version of the meta loop")
    old = state["signature"]
    diff = sorted(k for k in set(old) | set(signature) if old.get(k) != signature.get(k))
    if diff:
        detail = "; ".join(f"{k}: saved {old.get(k)!r}, now {signature.get(k)!r}" for k in diff)
        raise ValueError(f"stn_ext: meta_optimize: cannot resume {out} with different settings ({detail}); use the "
                         "original settings or a new folder")
    with torch.no_grad():
        for k, h in hypers.items():
            h.copy_(state["hypers"][k])
    optimizer.load_state_dict(state["optimizer"])
    return state


def _progress(total, done, show):
    if not show:
        return None
    try:
        from tqdm import tqdm
    except ImportError:  # no progress bar without tqdm
        return None
    return tqdm(total=total, initial=min(done, total), desc="meta-iterations", unit="it", file=sys.stderr)


def _one_iteration(objective, hypers, optimizer, seed):
    """(row, error): the objective and meta-gradient at the current hyperparameters; error says why
    training diverged (no gradient then)."""
    optimizer.zero_grad(set_to_none=True)
    try:
        out = objective(hypers, seed)
        value, info = out if isinstance(out, tuple) else (out, {})
        if not isinstance(value, torch.Tensor) or value.numel() != 1:
            raise TypeError("stn_ext: meta_optimize: objective(hypers, seed) must return a scalar tensor "
                            f"(or (tensor, info dict)), got {type(value).__name__}")
        v = float(value.detach())
        if not math.isfinite(v):
            return {"objective": v, **info}, f"the objective is {v}"
        value.backward()
    except (FixedPointOverflowError, FloatingPointError) as err:
        return {"objective": float("nan")}, f"training diverged: {err}"
    grads = {k: (h.grad if h.grad is not None else torch.zeros_like(h)) for k, h in hypers.items()}
    norms = {k: float(g.double().pow(2).sum().sqrt()) for k, g in grads.items()}
    row = {"objective": v, "grad_norm": math.sqrt(sum(n * n for n in norms.values()))}
    row.update({f"grad_norm_{k}": n for k, n in norms.items()})
    row.update({k: (float(x) if isinstance(x, (int, float, torch.Tensor)) else x) for k, x in info.items()})
    return row, None


def meta_optimize(objective: Callable, hypers: Dict[str, torch.Tensor], optimizer: torch.optim.Optimizer,
                  meta_iters: int, *, seed: int = 0, fresh_seed: bool = True, out: Optional[str] = None,
                  resume: bool = False, chaos: Optional[ChaosRule] = ChaosRule(), progress: bool = True,
                  config: Optional[dict] = None, on_iteration: Optional[Callable] = None) -> MetaResult:
    """Minimise ``objective(hypers, seed)`` over the tensors of ``hypers`` with ``optimizer``.

    ``hypers``: dict name -> leaf tensor (requires_grad) in your parametrisation (log learning rates,
    logit momenta, log init scales, per-weight log L2, learned images); updated in place.
    ``optimizer``: any ``torch.optim`` optimiser built on exactly ``hypers.values()``.
    ``objective(hypers, seed)``: a scalar tensor (e.g. :func:`train_and_evaluate`'s) whose backward gives
    the meta-gradient, or ``(tensor, info)`` with a dict of numbers to log. ``seed``: the training seed
    of meta-iteration k is ``seed + k`` with ``fresh_seed`` (new batches, initial noise, dropout), else
    ``seed`` every time. ``out``: a folder for the checkpoint, ``meta_history.csv`` and ``summary.json``,
    rewritten atomically after every meta-iteration; ``resume=True`` continues the run saved there
    (same hyperparameter shapes, optimiser, seed and ``config``, a dict of your settings that must not
    change; ``meta_iters`` may be larger), bit for bit as if uninterrupted; a run that stopped early stays
    stopped. ``chaos``: the :class:`ChaosRule` (None: never stop for a growing meta-gradient).
    ``on_iteration(row)``: called after each logged meta-iteration. ``progress``: a tqdm bar on stderr,
    and the stop message printed there.

    Returns a :class:`MetaResult`. KeyboardInterrupt propagates; the checkpoint holds every finished
    meta-iteration.
    """
    hypers = dict(hypers)
    _check_optimizer(optimizer, hypers)
    if int(meta_iters) < 0:
        raise ValueError(f"stn_ext: meta_optimize: meta_iters must be >= 0, got {meta_iters}")
    signature = _signature(hypers, optimizer, seed, fresh_seed, config)
    if out is not None:
        checkpoint.check_folder_creatable(out, option="out")
    if resume:
        if out is None:
            raise ValueError("stn_ext: meta_optimize: resume=True needs out, the folder of the saved run")
        state = _resume(out, hypers, optimizer, signature)
    else:
        state = {"version": _VERSION, "signature": signature, "next_iter": 0, "history": [], "stopped": None,
                 "best": None, "best_hypers": {}, "seconds": 0.0}
    bar = _progress(meta_iters, state["next_iter"], progress and state["stopped"] is None)
    try:
        while state["stopped"] is None and state["next_iter"] < meta_iters:
            k = state["next_iter"]
            started = time.perf_counter()
            s = _iteration_seed(seed, fresh_seed, k)
            row, error = _one_iteration(objective, hypers, optimizer, s)
            row = {"meta_iter": k, "seed": s, **row}
            if error is None and not math.isfinite(row["grad_norm"]):
                error = f"the meta-gradient norm is {row['grad_norm']} (training diverged along the way)"
            if error is None and chaos is not None:
                error = chaos.check([r["grad_norm"] for r in state["history"] if "grad_norm" in r] +
                                    [row["grad_norm"]])
            if error is None:
                if state["best"] is None or row["objective"] < state["best"]["objective"]:
                    state["best"] = dict(row)
                    state["best_hypers"] = {n: h.detach().clone() for n, h in hypers.items()}
                optimizer.step()
            else:
                state["stopped"] = f"stopped at meta-iteration {k}: {error}"
                row["note"] = error[:200]
            optimizer.zero_grad(set_to_none=True)
            row["seconds"] = time.perf_counter() - started
            state["seconds"] += row["seconds"]
            state["history"].append(row)
            state["next_iter"] = k + 1
            state["hypers"] = {n: h.detach().clone() for n, h in hypers.items()}
            state["optimizer"] = optimizer.state_dict()
            if out is not None:
                _save(out, state, meta_iters)
            if on_iteration is not None:
                on_iteration(row)
            if bar is not None:
                bar.set_postfix(objective=f"{row['objective']:.4f}", grad_norm=f"{row.get('grad_norm', math.nan):.3g}",
                                refresh=False)
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    if state["stopped"] is not None and progress:
        print(f"stn_ext meta_optimize: {state['stopped']}", file=sys.stderr)
    return MetaResult(hypers=hypers, history=list(state["history"]), stopped=state["stopped"], best=state["best"],
                      best_hypers=dict(state["best_hypers"]), seconds=state["seconds"])
