"""Hyperparameter tuning with self-tuning networks: ``Tuner``, the algorithm's steps for any training loop."""
from stn_ext.tuning.core import METHODS, TUNED, Tuner

__all__ = ["Tuner", "METHODS", "TUNED"]
