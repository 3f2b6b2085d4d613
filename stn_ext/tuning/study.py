"""Searches as users run them: random search and TPE as an Optuna study on a storage, with full-length trials
(``trial_steps``), Optuna's pruning on the validation loss of each evaluation, trials in parallel worker
processes, and resume after kill -9.

``random_search`` comes here when a config asks for a pruner, ``workers > 1`` or a ``storage``; otherwise the
sequential search of stn_ext.tuning.search runs, unchanged.

The storage is SQLite in the run folder (``sqlite:///<out>/study.db``) unless ``storage`` names another
Optuna storage URL (PostgreSQL or MySQL: several machines on one study). SQLite, not Optuna's journal file:
every change is a transaction that a kill -9 rolls back whole, and its locks are the kernel's, released when
a process dies. The journal file's lock is a lock file that a killed process leaves behind (the others wait
out a 30 s grace period), and a line torn by a kill makes every later read of the file fail.

Finished trials are COMPLETE, PRUNED or FAIL (an exception in the trial: its message is the trial's user
attribute ``error``). Workers run trials until the study holds ``random_trials`` of them, RUNNING ones
included. A trial left RUNNING by a kill is marked FAIL with the system attribute ``stn_ext:interrupted`` by
``resume`` and does not count: a new trial takes its place. A trial asked for after the study was full (two
workers racing for the last one) is marked FAIL with ``stn_ext:surplus``, runs nothing and does not count.
"""
import json
import math
import multiprocessing
import os
import signal
import time

import torch

from stn_ext import checkpoint
from stn_ext.tuning.config import TrainConfig, _dist, replace_config
from stn_ext.tuning.loop import Trainer
from stn_ext.tuning.runfolder import check_run_folder, open_run_folder

STORAGE_FILE = "study.db"          # the default storage, in the run folder
STUDY_NAME = "stn_ext"             # the default study name
INTERRUPTED = "stn_ext:interrupted"  # system attribute of a trial left RUNNING by a kill, failed by resume
SURPLUS = "stn_ext:surplus"        # system attribute of a trial asked for after the study was full


def _optuna():
    try:
        import optuna
    except ImportError:
        raise ImportError("stn_ext: pruning, --workers and --storage use Optuna: pip install optuna") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def storage_url(cfg):
    """The study's storage URL: ``cfg.storage``, else SQLite in the run folder, else None (in memory: one
    worker without a run folder)."""
    if cfg.storage:
        return cfg.storage
    if cfg.out:
        return "sqlite:///" + os.path.abspath(os.path.join(cfg.out, STORAGE_FILE))
    if cfg.workers > 1:
        raise ValueError("stn_ext: parallel workers share the study through a storage: give out (--out) or "
                         "storage (--storage)")
    return None


def open_storage(url):
    """An Optuna storage for ``url`` (SQLite: waiting up to 10 minutes for another process's write). Retried:
    processes (or machines) opening a new database at once race to create its tables."""
    optuna = _optuna()
    if url is None:
        return optuna.storages.InMemoryStorage()
    kw = {"engine_kwargs": {"connect_args": {"timeout": 600}}} if url.startswith("sqlite") else {}
    for attempt in range(5):
        try:
            return optuna.storages.RDBStorage(url, **kw)
        except Exception:  # noqa: BLE001  (processes creating the tables of a new database at once: one loses)
            if attempt == 4:
                raise
            time.sleep(1.0 + attempt)


def load_study(cfg, storage=None):
    """The search's study (created if it does not exist). Without a sampler: for reading."""
    optuna = _optuna()
    storage = storage if storage is not None else open_storage(storage_url(cfg))
    return optuna.create_study(storage=storage, study_name=cfg.study_name or STUDY_NAME, direction="minimize",
                               load_if_exists=True)


def make_pruner(cfg, per, eval_every):
    """The pruner cfg.pruner names. median: Optuna's MedianPruner, judging from the (n // 4, 2 to 5)-th trial
    on; hyperband: HyperbandPruner from one evaluation interval to the full trial, reduction factor 3."""
    optuna = _optuna()
    if cfg.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=max(2, min(5, cfg.random_trials // 4)))
    if cfg.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=min(eval_every, per), max_resource=per, reduction_factor=3)
    return optuna.pruners.NopPruner()


def make_sampler(cfg, seed):
    """random: Optuna's RandomSampler; tpe: TPESampler as the sequential search's (a quarter of the trials, at
    least 2, random first), with the constant liar when trials run in parallel."""
    optuna = _optuna()
    if cfg.method == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=max(2, cfg.random_trials // 4),
                                      constant_liar=cfg.workers > 1 or bool(cfg.storage))


def distributions(space):
    """Optuna distributions of a HyperSpace (as TPEProposer's)."""
    d = _optuna().distributions
    out = {}
    for h in space.hypers:
        if h.discrete:
            out[h.name] = d.IntDistribution(math.ceil(h.low), math.floor(h.high))
        elif h.transform == "log":
            out[h.name] = d.FloatDistribution(h.low, h.high, log=True)
        else:
            margin = 1e-3 * (h.high - h.low)
            out[h.name] = d.FloatDistribution(h.low + margin, h.high - margin)
    return out


def _counted(t):
    """Whether a trial counts toward the study's random_trials (all but the interrupted and surplus ones)."""
    return not (INTERRUPTED in t.system_attrs or SURPLUS in t.system_attrs)


def counted_trials(study):
    return [t for t in study.get_trials(deepcopy=False) if _counted(t)]


def finished_trials(study):
    states = _optuna().trial.TrialState
    return [t for t in counted_trials(study) if t.state in (states.COMPLETE, states.PRUNED, states.FAIL)]


def fail_interrupted(study):
    """Mark the trials left RUNNING (by a kill) as FAIL + INTERRUPTED, so they do not count. Only while no
    worker runs on the study (resume)."""
    optuna = _optuna()
    n = 0
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        study._storage.set_trial_system_attr(t._trial_id, INTERRUPTED, True)
        study._storage.set_trial_state_values(t._trial_id, optuna.trial.TrialState.FAIL)
        n += 1
    return n


class Pruned(Exception):
    """Raised inside a trial's training when its pruner says stop."""


class ReportingTrainer(Trainer):
    """A fixed run that reports each evaluation's validation loss to its Optuna trial and stops when the
    pruner says so."""

    trial = None

    def _log_eval(self):
        rec = super()._log_eval()
        if self.trial is not None and self.step > 0:
            self.trial.report(rec["val_loss"], self.step)
            if self.trial.should_prune():
                raise Pruned(self.step)
        return rec


def _base(cfg, per, data, model_fn):
    return Trainer(replace_config(cfg, method="fixed", out="", resume=False, overwrite=False, steps=per, workers=1,
                                  pruner="none", storage="", trial_steps=0, stop_after=0),
                   data=data, model=model_fn() if model_fn else None)


def run_trial(cfg, study, trial, per, space, data=None, model_fn=None):
    """Train one asked trial to ``per`` weight steps in out/trial_<number> and tell the study how it ended.
    Returns False when the trial was stopped by a signal (the worker stops too)."""
    optuna = _optuna()
    from stn_ext.tuning.search import _ranges_of

    out = os.path.join(cfg.out, f"trial_{trial.number}") if cfg.out else ""
    values = {k: float(v) for k, v in trial.params.items()}
    tr = None
    try:
        tcfg = replace_config(cfg, method="fixed", out=out, steps=per, stop_after=0, resume=False,
                              overwrite=bool(out), inits=dict(values), ranges=_ranges_of(space),
                              hypers=tuple(space.names), workers=1, pruner="none", storage="", trial_steps=0)
        tr = ReportingTrainer(tcfg, data=data, model=model_fn() if model_fn else None, space=space.with_inits(values))
        _TRAINER[0] = tr  # a signal from here on stops this trial at its first step boundary
        if _STOP[0]:  # one that came while the trial was asked and built
            tr.request_stop()
        tr.trial = trial
        tr.progress_label = f"{cfg.method} trial {trial.number} seed {cfg.seed}"
        s = tr.fit()
    except Pruned:
        s = tr.summary(interrupted=True)
        s.update(pruned=True, trial=trial.number)
        if out:
            tr.log.flush_files()
            checkpoint.atomic_write_json(os.path.join(out, "summary.json"), s)
        trial.set_user_attr("summary", s)
        study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        return True
    except Exception as e:  # noqa: BLE001  (any error of the trial: recorded as FAIL, the study goes on)
        trial.set_user_attr("error", f"{type(e).__name__}: {e}")
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        return True
    except KeyboardInterrupt:  # outside the loop's own handling: left as a kill leaves it, for resume
        study._storage.set_trial_system_attr(trial._trial_id, INTERRUPTED, True)
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        return False
    finally:
        _TRAINER[0] = None
    s["trial"] = trial.number
    if not s["complete"]:  # Ctrl-C / SIGTERM: the loop stopped at a step boundary
        study._storage.set_trial_system_attr(trial._trial_id, INTERRUPTED, True)
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        return False
    trial.set_user_attr("summary", s)
    study.tell(trial, s["val_loss"])
    return True


def work(cfg, index=0, data=None, model_fn=None, pruner=None, storage=None):
    """One worker: asks for trials and runs them until the study holds ``cfg.random_trials`` counted trials.
    Its sampler's seed depends on the seed, the worker and the trials in the study at its start, so workers
    and resumed workers draw afresh."""
    optuna = _optuna()
    per = trial_steps(cfg)
    base = _base(cfg, per, data, model_fn)
    space = base.space
    study = load_study(cfg, storage)
    seed = cfg.seed + 31337 + 7919 * index + 104729 * len(study.get_trials(deepcopy=False))
    study = optuna.load_study(study_name=study.study_name, storage=study._storage,
                              sampler=make_sampler(cfg, seed),
                              pruner=pruner if pruner is not None else make_pruner(cfg, per, base.eval_every))
    dists = distributions(space)
    n = cfg.random_trials
    while len(counted_trials(study)) < n:
        if _STOP[0]:  # Ctrl-C / SIGTERM between trials (a worker process)
            return False
        trial = study.ask(dists)
        # trial numbers come from the storage in order: the n counted trials with the lowest numbers run
        ahead = sum(1 for t in counted_trials(study) if t.number < trial.number)
        if ahead >= n:
            study._storage.set_trial_system_attr(trial._trial_id, SURPLUS, True)
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            break
        if not run_trial(cfg, study, trial, per, space, data, model_fn):
            return False
    return True


_STOP = [False]  # set by Ctrl-C / SIGTERM in a worker process: no new trial
_TRAINER = [None]  # the trial being built or trained in this process


def _on_signal(signum, frame):
    # between trials, and while a trial is built (before its loop takes the signals over), which would otherwise
    # train the whole trial before the worker saw the flag
    _STOP[0] = True
    if _TRAINER[0] is not None:
        _TRAINER[0].request_stop()


def _worker_main(cfg_dict, index, data, model_fn, pruner):
    for sig in (signal.SIGINT, signal.SIGTERM):  # the trial's loop takes them over while it runs
        signal.signal(sig, _on_signal)
    cfg = TrainConfig.from_dict(cfg_dict)
    if cfg.worker_threads:
        torch.set_num_threads(cfg.worker_threads)
    ok = work(cfg, index, data, model_fn, pruner)
    raise SystemExit(0 if ok else 130)


def trial_steps(cfg):
    from stn_ext.tuning.search import trial_steps as steps

    return steps(cfg)


def study_search(config, data=None, model_fn=None, pruner=None):
    """Random search or TPE as an Optuna study (see the module's doc): ``cfg.workers`` processes (spawned;
    one: this process) run trials of ``trial_steps`` weight steps until the study holds ``random_trials``
    trials; the summary is that of the complete trial with the lowest final validation loss, with
    ``trial_records`` (number, state, val_loss, hypers, steps of every counted trial). ``pruner``: an Optuna
    pruner to use instead of cfg.pruner's (API; picklable when workers > 1)."""
    cfg = config.validate()
    _optuna()
    if cfg.stop_after:
        raise ValueError("stn_ext: stop_after counts the steps of the sequential search; not with pruner, workers "
                         "or storage (stop a study with Ctrl-C or kill, and resume it)")
    if _dist()[1] > 1:
        raise ValueError("stn_ext: a study runs its trials in --workers processes, each one process; not under "
                         "--nproc or torchrun")
    url = storage_url(cfg)
    if cfg.out:
        if cfg.resume:
            check_run_folder(cfg)
        else:
            own = os.path.join(cfg.out, STORAGE_FILE)
            open_run_folder(cfg)  # refuses a folder holding a run unless overwrite, which clears it
            if not cfg.storage:  # left by an earlier run (with SQLite's journal, if a kill left one): a new study
                for path in (own, own + "-journal", own + "-wal", own + "-shm"):
                    if os.path.exists(path):
                        os.unlink(path)
    storage = open_storage(url)
    study = load_study(cfg, storage)
    if cfg.resume:
        fail_interrupted(study)
    t0 = time.perf_counter()
    if cfg.workers == 1:
        ok = work(cfg, 0, data, model_fn, pruner, storage)
    else:
        from dataclasses import asdict

        ctx = multiprocessing.get_context("spawn")
        procs = [ctx.Process(target=_worker_main, args=(asdict(cfg), k, data, model_fn, pruner), daemon=False)
                 for k in range(cfg.workers)]
        for p in procs:
            p.start()
        try:
            for p in procs:
                p.join()
        except KeyboardInterrupt:  # Ctrl-C reaches the workers too: they stop at a step boundary
            for p in procs:
                p.join()
        ok = all(p.exitcode == 0 for p in procs)
        # 130: stopped at a step boundary; -SIGINT / -SIGTERM: stopped by Ctrl-C or a kill while starting, before
        # its handler was installed (it had taken no trial): both stopped, not failed
        stopped = (130, -signal.SIGINT, -signal.SIGTERM)
        bad = [(k, p.exitcode) for k, p in enumerate(procs) if p.exitcode != 0 and p.exitcode not in stopped]
        if bad:
            raise RuntimeError("stn_ext: search workers " + ", ".join(f"{k} (exit {c})" for k, c in bad) +
                               " failed; the study so far is kept: continue it with --resume (API: resume=True)")
    return _summary(cfg, load_study(cfg, storage), ok, time.perf_counter() - t0)


def _summary(cfg, study, ok, elapsed):
    states = _optuna().trial.TrialState
    trials = counted_trials(study)
    records = []
    for t in sorted(trials, key=lambda t: t.number):
        s = t.user_attrs.get("summary", {})
        records.append({"number": t.number, "state": t.state.name, "val_loss": s.get("val_loss"),
                        "hypers": s.get("hypers", dict(t.params)), "steps": s.get("steps", 0),
                        "wall_s": s.get("wall_s", 0.0), "error": t.user_attrs.get("error")})
    complete = [t for t in trials if t.state == states.COMPLETE]
    if not complete and not ok:  # stopped (Ctrl-C, SIGTERM) before any trial completed
        raise KeyboardInterrupt
    if not complete:
        raise ValueError(f"stn_ext: no trial of the study completed ({len(trials)} trials: " +
                         ", ".join(f"{r['number']} {r['state']}" for r in records) + ")")
    best = min(complete, key=lambda t: t.value)
    summary = dict(best.user_attrs["summary"])
    finished = [r for r in records if r["state"] in ("COMPLETE", "PRUNED", "FAIL")]
    summary.update(method=cfg.method, steps=sum(r["steps"] for r in records), trial_steps=trial_steps(cfg),
                   trials=len(finished), best_trial=best.number, wall_s=sum(r["wall_s"] for r in records),
                   elapsed_s=elapsed, workers=cfg.workers, pruner=cfg.pruner, trial_records=records,
                   complete=ok and len(finished) >= cfg.random_trials,
                   states={k: sum(r["state"] == k for r in records) for k in ("COMPLETE", "PRUNED", "FAIL")})
    if cfg.out:
        checkpoint.atomic_write_json(os.path.join(cfg.out, "summary.json"), json.loads(json.dumps(summary)))
    return summary


__all__ = ["study_search", "work", "run_trial", "load_study", "open_storage", "storage_url", "make_pruner",
           "make_sampler", "counted_trials", "finished_trials", "fail_interrupted", "ReportingTrainer", "Pruned",
           "STORAGE_FILE", "STUDY_NAME", "INTERRUPTED", "SURPLUS"]
