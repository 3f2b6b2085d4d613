"""Searches over fixed runs at an equal total of weight steps: random search and Optuna's TPE."""
import json
import math
import os

import torch

from stn_ext import checkpoint
from stn_ext.tuning.config import _dist, replace_config
from stn_ext.tuning.loop import Trainer
from stn_ext.tuning.runfolder import check_run_folder, finished_summary, open_run_folder

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
    """``random_trials`` fixed runs, ``trial_steps`` weight steps each (0: ``steps // trials``, the same total
    as one STN run), at values from the method's proposer: 'random' draws them from the space, 'tpe' asks
    Optuna's TPE given the trials so far. The trial with the lowest final validation loss wins. Trials run in
    out/trial_<k>; with resume, finished trials are kept (and told to TPE) and the current one resumes at its
    own values.
    ``stop_after`` counts weight steps over all trials: trial k holds steps k * per + 1 .. (k + 1) * per."""
    cfg = config.validate()
    if uses_study(cfg):  # pruning, parallel workers or a shared storage: the Optuna study's code path
        from stn_ext.tuning.study import study_search

        return study_search(cfg, data, model_fn)
    per = trial_steps(cfg)
    if cfg.out and (cfg.resume or _dist()[0] == 0):
        check_run_folder(cfg)
    base = Trainer(replace_config(cfg, method="fixed", out="", resume=False, overwrite=False, steps=per), data=data,
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
        tcfg = replace_config(cfg, method="fixed", out=out, steps=per, stop_after=_trial_stop(cfg.stop_after, k, per),
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


def trial_steps(cfg):
    """Weight steps per trial of a search: ``trial_steps``, or (0) ``steps // random_trials``, the same total
    as one STN run."""
    return cfg.trial_steps or cfg.steps // cfg.random_trials


def uses_study(cfg):
    """Whether a search runs as an Optuna study on a storage (stn_ext.tuning.study): with a pruner, several
    workers or a storage URL. Otherwise the sequential search above, in one process."""
    return cfg.pruner != "none" or cfg.workers > 1 or bool(cfg.storage)


def _trial_stop(stop_after, k, per):
    """Trial k's stop_after for a random search stopped after ``stop_after`` weight steps in total."""
    local = stop_after - k * per
    return local if 0 < local <= per else 0


def _ranges_of(space):
    return {h.name: (h.low, h.high) for h in space.hypers}


__all__ = ["random_search", "RandomProposer", "TPEProposer", "PROPOSERS", "trial_steps", "uses_study"]
