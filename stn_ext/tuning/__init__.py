"""Hyperparameter tuning with self-tuning networks (STN, Delta-STN).

The parts, bottom to top: ``space`` (hyperparameter spaces), ``augment`` and ``models`` (regularisers and the
built-in models), ``core`` (``Tuner``: the algorithm's steps, for any training loop), ``config`` (``TrainConfig``),
``divergence``, ``plots``, ``tensorboard_log``, ``runfolder`` (run folders and logs), ``loop`` (``Trainer``: the
built-in loop on a Tuner), ``search`` (random search, TPE), ``distributed``, ``api`` (``train``, ``preflight``),
``cli`` and ``demo`` (``python -m stn_ext train`` / ``demo``), ``problems`` (benchmark problems).
"""
from stn_ext.tuning.core import METHODS as TUNER_METHODS, TUNED, Tuner
from stn_ext.tuning.config import METHODS, SEARCHES, TrainConfig
from stn_ext.tuning.divergence import Diverged, Guard
from stn_ext.tuning.loop import Trainer
from stn_ext.tuning.runfolder import (RunLog, can_resume, check_run_folder, clear_run, finished_summary, holds_run,
                                      open_run_folder, run_files)
from stn_ext.tuning.search import PROPOSERS, RandomProposer, TPEProposer, random_search
from stn_ext.tuning.distributed import WorkerDied, run_distributed
from stn_ext.tuning.api import preflight, train

__all__ = ["Tuner", "Guard", "Diverged", "TUNED", "TUNER_METHODS", "METHODS", "SEARCHES", "TrainConfig", "Trainer",
           "RunLog", "can_resume", "check_run_folder", "clear_run", "finished_summary", "holds_run", "open_run_folder",
           "run_files", "PROPOSERS", "RandomProposer", "TPEProposer", "random_search", "WorkerDied", "run_distributed",
           "preflight", "train"]
