"""Deprecated alias, kept for one release: hyperparameter spaces live in ``stn_ext.tuning.space``."""
import sys

from stn_ext.tuning import space as _space

sys.modules[__name__] = _space  # the same module: its names, and patches of them, are shared
