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
from running there.
After ``max_recoveries`` roll-backs it stops with ``Diverged``, naming the step and the values.
"""
import copy
import math


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
