"""Run folders: what a run writes (checkpoint, config, logs, plots, TensorBoard events), the checks that a
folder can serve a new run or a resume, and RunLog, the per-step and per-evaluation records."""
import json
import os
import re
import shutil
from dataclasses import asdict

from stn_ext import checkpoint
from stn_ext.tuning.config import EARLIER_VALUES, SEARCHES, response_fit_of
from stn_ext.tuning.plots import PLOT_FILES, read_jsonl

# Fields that may differ between a run and its resumption (device: see Trainer._restore_generator).
RESUME_FREE = ("data_path", "tensorboard", "out", "resume", "overwrite", "quiet", "plots", "stop_after", "eval_every", "checkpoint_every",
               "device", "worker_threads")


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
    # a field added since the folder's run was written is compared as its default, which that run had (or, for
    # the fields of EARLIER_VALUES, as the value it had)
    old = {**_jsonable(asdict(type(cfg)())), **EARLIER_VALUES, **old}
    if old.get("response_fit") != new["response_fit"] and response_fit_of(old) == response_fit_of(new):
        old["response_fit"] = new["response_fit"]  # an 'auto' that resolves to the fit the run had is that fit
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
    return ("checkpoint.pt", "config.json", "summary.json", "best.pt") + RunLog.FILES + PLOT_FILES


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
                from stn_ext.tuning.tensorboard_log import TensorBoardLog

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
            seen, keep = set(), []
            for r in read_jsonl(os.path.join(self.out, name)):
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


def finished_summary(out):
    """The summary of the finished run (or trial) in ``out``, else None."""
    path = os.path.join(out, "summary.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        s = json.load(f)
    return s if s.get("complete") else None
