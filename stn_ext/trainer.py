"""Deprecated alias, kept for one release: the trainer now lives in ``stn_ext.tuning`` (``TrainConfig``,
``Trainer``, ``train``, ``run_distributed``, ...; ``Tuner`` for your own loop)."""
from stn_ext.tuning import *  # noqa: F401,F403
from stn_ext.tuning import __all__  # noqa: F401
