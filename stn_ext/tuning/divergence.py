"""Catching a run that diverges, at the step where it does, and recovering from it.

A weight step is unhealthy when its training loss is not finite or exceeds ``factor`` times the running
mean of the recent losses (SGD that has lost stability grows its loss geometrically, so it passes that
bar within a few steps, long before it overflows); a hyper step is unhealthy when its validation loss,
u or the scales are not finite. The trainer keeps an in-memory snapshot of the last healthy state (all
weights, hyperparameters, optimiser states, random generator, counters), taken every ``every`` weight
steps and after every checkpoint, so a checkpoint on disk is never newer than the snapshot and never
holds an unhealthy state. It also keeps the snapshot before (where no checkpoint came between): a state
can pass the loss check and still be on its way out (SGD's momentum already excited), so a run that
diverges again from the snapshot it was rolled back to, before the next one, goes back to the older one.
On divergence it rolls back to the snapshot and halves the perturbation
scales (and their cap): perturbed hyperparameters are what take SGD past its stability limit (a large
weight decay, say); from the third roll-back on it also halves the hyper learning rate, which keeps u
from running there. It restarts the hypernet's response from its init and the hyper optimiser's moments
(``restart``), and after each healthy snapshot interval regrows the scales with their cap (``regrow``).
After ``max_recoveries`` roll-backs it stops with ``Diverged``, naming the step and the values.

``roll_back`` is that recovery, shared by the trainer and by a ``Tuner`` given a ``Guard`` (``Tuner(..., guard=
Guard())``: snapshots of the model, the user's optimiser and the tuner). ``StepChecks`` is what a Tuner does about a
step with a non-finite loss or hypergradient before anything steps (its default, ``check_finite=True``): it skips
the step with a warning and counts it, and stops with ``Diverged`` after ``max_skipped`` in a row; with a guard it
rolls back instead.
"""
import copy
import math
import warnings

import torch

from stn_ext._messages import count
from stn_ext.tuning import models


class Diverged(RuntimeError):
    """Training diverged and could not be recovered; the last good checkpoint (if any) is kept."""


class Guard:
    def __init__(self, factor=100.0, every=50, max_recoveries=6, window=20):
        self.factor, self.every, self.max_recoveries, self.window = factor, every, max_recoveries, window
        self.recent = []
        self.history = []       # (state, step, recent losses): the newest last, at most two
        self._restored = None   # the step of the snapshot last restored, until the next is taken

    def check_loss(self, loss):
        """Whether a weight step's loss is healthy; healthy losses join the running mean."""
        if not math.isfinite(loss):
            return False
        if len(self.recent) >= 5 and loss > self.factor * max(sum(self.recent) / len(self.recent), 1e-12):
            return False
        self.recent = (self.recent + [loss])[-self.window:]
        return True

    def take(self, state, step, keep_older=True):
        """Snapshot a healthy state. ``keep_older=False`` where a checkpoint was just written: no roll-back
        may go past the records on disk."""
        self.history = (self.history[-1:] if keep_older else []) + [(copy.deepcopy(state), step, list(self.recent))]
        self._restored = None

    def reset(self):
        """Forget the snapshots and the recent losses (the state they were taken of has been replaced)."""
        self.recent, self.history, self._restored = [], [], None

    @property
    def snapshot_step(self):
        return self.history[-1][1] if self.history else -1

    def due(self, step):
        return step - self.snapshot_step >= self.every

    def restore(self):
        """The snapshot to load (a copy, so it can be restored again): the newest, or the one before it when
        the run has diverged again since it was last restored from the newest. The trainer counts the recoveries."""
        if self._restored == self.snapshot_step and len(self.history) > 1:
            self.history.pop()
        state, step, recent = self.history[-1]
        self._restored = step
        self.recent = list(recent)
        return copy.deepcopy(state)


def finite(*tensors):
    return all(bool(t.isfinite().all()) for t in tensors)


ADVICE = "Try a smaller learning rate (lr) or a narrower hyperparameter range."


def diverged_message(where, problem, vals, sigmas, tried="", kept="", advice=ADVICE):
    return (f"stn_ext: training diverged at {where} ({problem}) with hyperparameters {vals}"
            + (f", perturbation scales {sigmas}" if sigmas else "") + tried + kept + ". " + advice)


def roll_back(tuner, guard, recoveries, load, where, problem, kept="", give_up=False):
    """Roll back to ``guard``'s snapshot (``load(state)`` restores it) and halve the perturbation scales, their cap
    and, from the third roll-back on, the hyper learning rate, and restarts the response (``restart``). Raises ``Diverged``
    where that cannot help (``give_up``) or has not helped (``recoveries`` roll-backs already, the maximum).
    Returns the new number of roll-backs. ``where``/``problem`` ("weight step 12", "training loss inf") and
    ``kept`` (what the caller keeps on disk) go into the messages."""
    vals, sig = tuner.hyperparameters(), tuner.sigmas() if tuner.tunes else None
    if give_up or recoveries >= guard.max_recoveries:
        tried = ""
        if tuner.tunes:
            tried = (f"; rolled back to step {guard.snapshot_step} and halved the perturbation scales {recoveries} "
                     "times (and the hyper learning rate from the third time) without recovering")
        elif recoveries:
            tried = f"; rolled back to step {guard.snapshot_step} {recoveries} times without recovering"
        raise Diverged(diverged_message(where, problem, vals, sig, tried, kept))
    sigma_max, factor = tuner.sigma_max, tuner.hyper_lr_factor  # the snapshot may predate earlier halvings
    load(guard.restore())
    recoveries += 1
    halved = ""
    if tuner.tunes:
        restart(tuner, sigma_max, factor, recoveries)
        halved = (f" and halved the perturbation scales (cap now {tuner.sigma_max:.3g}; hyper learning rate now "
                  f"x{tuner.hyper_lr_factor:.3g}), restarting " + ("the response and " if tuner.response_seed is not None
                                                                      else "") + "the hyper optimiser's moments")
    warnings.warn(f"stn_ext: training diverged at {where} ({problem}, hyperparameters {vals}); rolled back to step "
                  f"{tuner.step}{halved}")
    return recoveries


def restart(tuner, sigma_max, hyper_lr_factor, recoveries):
    """After roll-back number ``recoveries``, from the cap and factor before it: halve the scales and their cap
    (perturbations take SGD past its limit) and, from the third on, the hyper learning rate (u heading there); restart
    the response from its start (``response_init="v"``; the user's optimiser forgets its state for it), its rows of V
    and C halved per roll-back so far (a quarter of the pace each: ridge from 100x above, a response started at full
    pace ran away again after each roll-back until the third halved the hyper learning rate and left u 1.6-1.9 log
    units off), and the hyper optimiser's moments. A snapshot's response can be excited already (ridge, per-batch STN
    from 100x above: |V W_h| 40x the slope the data ask for, and with sigma halved alone it diverged again at sigma
    0.03-0.06), and Adam's second moment holds that stretch's hypergradients (sqrt 7.9 against 0.25 after it: u moved
    at 1/30 of its rate, and runs ended 1-4 log units off)."""
    tuner.hyper_lr_factor = hyper_lr_factor / 2 if recoveries >= 3 else hyper_lr_factor
    tuner.scale_perturbation(0.5, sigma_max / 2)
    if tuner.response_seed is not None:  # at a quarter of the pace per roll-back so far: a fast start tipped it over
        models.start_response(tuner.layers, tuner.response_seed, tuner.row_floor, 0.25 ** recoveries, tuner.near_one)
        for p in tuner.response_params:  # the user's optimiser starts afresh on them too
            tuner.opt_w.state.pop(p, None)
    tuner.opt_h.state.clear()
    tuner.response_gain_max = 1.0  # a faster response tipped a run into more roll-backs (docs/trainer.md)


def regrow(tuner):
    """After a healthy snapshot interval: the cap on sigma and sigma with it grow back x sqrt 2, to the cap's start.
    Left to its own gradient a halved sigma stayed small, and u's signal (~ sigma^2) with it (ridge: a run rolled back
    twice ended 0.055 off with the cap alone regrown, 0.005 with sigma too)."""
    if tuner.sigma_max < tuner.sigma_max0:
        tuner.scale_perturbation(math.sqrt(2), min(tuner.sigma_max0, tuner.sigma_max * math.sqrt(2)))


def _values(t):
    return ", ".join(f"{v:.4g}" for v in t.reshape(-1).tolist())


class StepChecks:
    """A Tuner's checks of its steps (``check_finite=True``, the default). Before the optimiser steps, the step's loss
    summed over ranks (and for a hyper step the gradients of u and of the scales) is read to the host: one read per
    optimiser step, which on a GPU waits for the step's backward pass. A non-finite one skips the step (nothing it
    would change is changed; the step counters advance, so the warm-up and the schedules follow the batches), with a
    warning naming the step, what was not finite and the hyperparameters, and is counted in ``skipped`` ("weight",
    "hyper"); ``max_skipped`` in a row (None: no limit) raise ``Diverged``. With a ``Guard`` the tuner snapshots the
    model, its optimiser and itself every ``guard.every`` weight steps, and a step whose loss is not finite or is
    over ``guard.factor`` times the recent mean is rolled back (``roll_back``) instead of skipped."""

    def __init__(self, tuner, max_skipped=10, guard=None):
        if max_skipped is not None and max_skipped < 1:
            raise ValueError(f"stn_ext: max_skipped must be >= 1 (or None: no limit), got {max_skipped}")
        self.tuner, self.max_skipped, self.guard = tuner, max_skipped, guard
        self.skipped = {"weight": 0, "hyper": 0}
        self.in_a_row = {"weight": 0, "hyper": 0}
        self.rollbacks = 0

    # --- what is wrong with a step (None: nothing) ---------------------------------------------------------

    def _reduced(self, loss, grads):
        """Sum loss over ranks with the gradients (one all-reduce, so every rank decides the same)."""
        total = loss.detach().reshape(1).to(grads[0].dtype)
        self.tuner._allreduce(list(grads) + [total])
        return total

    def weight_problem(self, loss, grads, what="training loss", spike=True):
        value = float(self._reduced(loss, grads))  # the read to the host
        if not math.isfinite(value):
            return f"{what} {value}"
        if spike and self.guard is not None and not self.guard.check_loss(value):
            return f"{what} {value:.4g}, over {self.guard.factor:g}x the mean of the recent ones"
        return None

    def hyper_problem(self, loss, grads):
        total = self._reduced(loss, grads)
        parts = (("hyper loss (validation loss - tau entropy)", total), ("hypergradient of u", grads[0]),
                 ("hypergradient of the perturbation scales", grads[1]))
        if bool(torch.stack([t.isfinite().all() for _, t in parts]).all()):  # the read to the host
            return None
        return "; ".join(f"{name} [{_values(t)}]" for name, t in parts if not bool(t.isfinite().all()))

    # --- before and after a step ---------------------------------------------------------------------------

    def before(self):
        if self.guard is not None and not self.guard.history:
            self._take()

    def after(self, kind, problem):
        """After a step (its counter advanced): count it, snapshot, skip (warn, maybe stop) or roll back."""
        t = self.tuner
        if problem is None:
            self.in_a_row[kind] = 0
            if kind == "weight" and self.guard is not None and self.guard.due(t.step):
                regrow(t)
                self._take()
            return
        where = f"weight step {t.step}" if kind == "weight" else f"hyper step {t.hstep} (after weight step {t.step})"
        if self.guard is not None:
            self.rollbacks = roll_back(t, self.guard, self.rollbacks, self._restore, where, problem)
            return
        self.skipped[kind] += 1
        self.in_a_row[kind] += 1
        n, vals, sig = self.in_a_row[kind], t.hyperparameters(), t.sigmas() if t.tunes else None
        if self.max_skipped is not None and n >= self.max_skipped:
            raise Diverged(diverged_message(
                where, problem, vals, sig, f"; the last {n} {kind} steps in a row were not finite and were skipped",
                advice="Check the batches for non-finite values; else try a smaller learning rate (lr) or a narrower "
                       "hyperparameter range, or pass guard=stn_ext.tuning.Guard() to roll back to a healthy state."))
        warnings.warn(f"stn_ext: {where}: {problem}; skipped it ({n} in a row, {count(self.skipped[kind], kind + ' step')} "
                      f"in all): weights, optimiser state, u and the perturbation scales unchanged by it; hyperparameters "
                      f"{vals}" + (f", perturbation scales {sig}" if sig else ""), stacklevel=3)

    # --- snapshots -----------------------------------------------------------------------------------------

    def _take(self):
        t = self.tuner
        st = t.state_dict()
        st.pop("checks", None)  # the counts are not rolled back
        self.guard.take({"model": t.model.state_dict(), "opt_w": t.opt_w.state_dict(), "tuner": st}, t.step)

    def _restore(self, st):
        t = self.tuner
        t.model.load_state_dict(st["model"])
        t.opt_w.load_state_dict(st["opt_w"])
        t._load_state(st["tuner"])
        self.in_a_row = {"weight": 0, "hyper": 0}

    def state_dict(self):
        return {"skipped": dict(self.skipped), "in_a_row": dict(self.in_a_row), "rollbacks": self.rollbacks}

    def load_state_dict(self, st):
        """``st`` None (a state saved before these counts existed): they start at 0. Snapshots are forgotten."""
        st = st or {}
        self.skipped = dict(st.get("skipped", {"weight": 0, "hyper": 0}))
        self.in_a_row = dict(st.get("in_a_row", {"weight": 0, "hyper": 0}))
        self.rollbacks = st.get("rollbacks", 0)
        if self.guard is not None:
            self.guard.reset()
