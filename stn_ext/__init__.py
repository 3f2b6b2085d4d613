"""stn_ext: Self-Tuning Network layers and exact reversible learning as fused PyTorch ops."""
from stn_ext import ops  # noqa: F401  (loads the compiled library and registers the ops)
from stn_ext._library import has_cuda
from stn_ext.cpu_memory import keep_freed_memory
from stn_ext import functional, reference, reversible  # noqa: F401
from stn_ext.nn import (ELEMENTARY, StnConv2d, StnEmbedding, StnLinear, StnLSTM, convert, current_hyper_input,
                        dropout_slots, elementary, hyper_input)

__all__ = [
    "StnLinear",
    "StnConv2d",
    "StnLSTM",
    "StnEmbedding",
    "convert",
    "dropout_slots",
    "hyper_input",
    "elementary",
    "ELEMENTARY",
    "current_hyper_input",
    "has_cuda",
    "keep_freed_memory",
    "functional",
    "reference",
    "reversible",
]
__version__ = "0.1.0"
