"""Self-tuning layers (MacKay et al. 2019): drop-in replacements for nn.Linear, nn.Conv2d, nn.LSTM and
nn.Embedding whose weights are gated by a hyperparameter vector lam:

    W(lam) = W_e + (V lam) (.)row W_h          b(lam) = b_e + (C lam) (.) b_h

V and C start at zero, so a fresh layer computes exactly its elementary layer. One module per family:
linear, conv, recurrent, embedding; the hyperparameter input's blocks in _context, the shared parameters in
_base, convert() in conversion.
"""
from stn_ext.nn._context import ELEMENTARY, current_hyper_input, elementary, hyper_input
from stn_ext.nn.conv import StnConv2d
from stn_ext.nn.conversion import convert, dropout_slots
from stn_ext.nn.embedding import StnEmbedding
from stn_ext.nn.linear import StnLinear
from stn_ext.nn.recurrent import StnLSTM

__all__ = ["StnLinear", "StnConv2d", "StnLSTM", "StnEmbedding", "convert", "dropout_slots", "hyper_input", "elementary",
           "ELEMENTARY", "current_hyper_input"]
