"""Deprecated alias, kept for one release: the tuner's models (``HyperDropout``, ``mlp``, ``cnn``, ...) live in
``stn_ext.tuning.models``."""
import sys

from stn_ext.tuning import models as _models

sys.modules[__name__] = _models  # the same module: its names, and patches of them, are shared
