"""StnLSTM: nn.LSTM whose every input-to-hidden and hidden-to-hidden weight responds to hyperparameters."""
import math

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence

from stn_ext import functional
from stn_ext.nn._context import ELEMENTARY, _resolve_lam
from stn_ext.nn.linear import StnLinear


class StnLSTM(nn.Module):
    """nn.LSTM (unidirectional, no projection) whose weights respond to hyperparameters, as in the STN
    paper's language model: each layer's input-to-hidden map ``ih_l{k}`` and hidden-to-hidden map
    ``hh_l{k}`` is an StnLinear of 4*hidden_size outputs (all four gates, torch's order i, f, g, o), so
    W_ih(lam) = W_e + (V lam) (.)row W_h and b_ih(lam) = b_e + (C lam) (.) b_h, likewise for hh. V = C = 0
    at the start: a fresh or converted layer computes exactly nn.LSTM.

    ``forward(input, hx=None, lam=None, *, weight_hh_mask=None)`` takes what nn.LSTM takes (batched or
    unbatched input, or a PackedSequence with a shared lam) and returns output, (h_n, c_n).
    - lam (n_hyper,) shared by the batch: each gated weight is formed once by the fused gate op, then
      torch's own LSTM kernel runs on them (cuDNN on a GPU).
    - lam (B, n_hyper) per example: the same maths with the hypernet term inside the recurrence, a loop over
      time steps of the per-example linear op (bench/bench_layers.py states its cost against nn.LSTM).
    - ``stn_ext.hyper_input(lam)`` and ``stn_ext.elementary()`` blocks, as the other layers.

    DropConnect hook: ``weight_hh_mask`` (the argument, else the attribute of that name, None by default)
    multiplies each layer's gated hidden-to-hidden weight: a tensor broadcast to (4*hidden_size,
    hidden_size) for every layer, or a list of one tensor (or None) per layer. Draw and scale it yourself,
    e.g. ``torch.empty(4 * H, H).bernoulli_(1 - p) / (1 - p)``, and only while training."""

    def __init__(self, input_size, hidden_size, n_hyper, num_layers=1, bias=True, batch_first=False, dropout=0.0,
                 bidirectional=False, proj_size=0, device=None, dtype=None):
        super().__init__()
        if bidirectional or proj_size:
            raise NotImplementedError("stn_ext: StnLSTM supports bidirectional=False and proj_size=0 only")
        if num_layers < 1 or input_size < 1 or hidden_size < 1:
            raise ValueError(f"stn_ext: StnLSTM needs input_size, hidden_size and num_layers >= 1, got "
                             f"{input_size}, {hidden_size}, {num_layers}")
        if isinstance(dropout, bool) or not 0 <= dropout <= 1:
            raise ValueError(f"stn_ext: StnLSTM: dropout must be a probability in [0, 1], got {dropout!r}")
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        self.bias, self.batch_first, self.dropout = bias, batch_first, float(dropout)
        self.bidirectional, self.proj_size, self.n_hyper = False, 0, n_hyper
        self.weight_hh_mask = None
        for k in range(num_layers):
            n_in = input_size if k == 0 else hidden_size
            self.add_module(f"ih_l{k}", StnLinear(n_in, 4 * hidden_size, n_hyper, bias, device=device, dtype=dtype))
            self.add_module(f"hh_l{k}", StnLinear(hidden_size, 4 * hidden_size, n_hyper, bias, device=device,
                                                  dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self):
        """W_e, W_h, b_e, b_h as nn.LSTM initialises its weights, U(-1/sqrt(hidden), 1/sqrt(hidden)); V, C zero."""
        bound = 1 / math.sqrt(self.hidden_size)
        with torch.no_grad():
            for ih, hh in self.cells():
                for m in (ih, hh):
                    for p in (m.weight_elem, m.weight_hyper, m.bias_elem, m.bias_hyper):
                        if p is not None:
                            p.uniform_(-bound, bound)
                    for p in (m.hyper_weight, m.hyper_bias):
                        if p is not None:
                            p.zero_()

    def cells(self):
        """[(ih_l0, hh_l0), (ih_l1, hh_l1), ...]: each layer's two StnLinear maps."""
        return [(getattr(self, f"ih_l{k}"), getattr(self, f"hh_l{k}")) for k in range(self.num_layers)]

    @classmethod
    def from_lstm(cls, lstm, n_hyper):
        """An StnLSTM computing what ``lstm`` does (V = C = 0), with its weights, options and train/eval mode."""
        if lstm.bidirectional or lstm.proj_size:
            raise ValueError("stn_ext: StnLSTM.from_lstm: bidirectional LSTMs and proj_size > 0 are not supported")
        w = lstm.weight_ih_l0
        layer = cls(lstm.input_size, lstm.hidden_size, n_hyper, lstm.num_layers, lstm.bias, lstm.batch_first,
                    lstm.dropout, device=w.device, dtype=w.dtype)
        for k, (ih, hh) in enumerate(layer.cells()):
            ih._copy_elementary(getattr(lstm, f"weight_ih_l{k}"), getattr(lstm, f"bias_ih_l{k}", None))
            hh._copy_elementary(getattr(lstm, f"weight_hh_l{k}"), getattr(lstm, f"bias_hh_l{k}", None))
        return layer.train(lstm.training)

    def flatten_parameters(self):
        """A no-op, for code written for nn.LSTM: the weights handed to the kernel are formed at each call."""

    def forward(self, input, hx=None, lam=None, *, weight_hh_mask=None):
        lam = _resolve_lam(self, lam)
        lam = None if lam is ELEMENTARY else lam
        mask = self.weight_hh_mask if weight_hh_mask is None else weight_hh_mask
        params = [(ih._stn_params(), hh._stn_params()) for ih, hh in self.cells()]
        run = dict(dropout=self.dropout, training=self.training, batch_first=self.batch_first, weight_hh_mask=mask)
        if isinstance(input, PackedSequence):
            data, batch_sizes, sorted_indices, unsorted_indices = input
            if hx is not None and sorted_indices is not None:
                hx = tuple(t.index_select(1, sorted_indices) for t in hx)
            output, (h_n, c_n) = functional.stn_lstm(data, hx, lam, params, batch_sizes=batch_sizes, **run)
            if unsorted_indices is not None:
                h_n, c_n = h_n.index_select(1, unsorted_indices), c_n.index_select(1, unsorted_indices)
            return PackedSequence(output, batch_sizes, sorted_indices, unsorted_indices), (h_n, c_n)
        if input.dim() not in (2, 3):
            raise ValueError(f"stn_ext: StnLSTM: input must be 3-D ({'B, T' if self.batch_first else 'T, B'}, "
                             f"input_size) or 2-D (T, input_size), got shape {tuple(input.shape)}")
        if input.dim() == 3:
            return functional.stn_lstm(input, hx, lam, params, **run)
        # Unbatched, as nn.LSTM: a batch of one.
        if lam is not None and lam.dim() == 2:
            raise ValueError(f"stn_ext: StnLSTM: per-example lam {tuple(lam.shape)} needs a batched input, got "
                             f"shape {tuple(input.shape)}")
        if hx is not None:
            if any(t.dim() != 2 for t in hx):
                raise ValueError(f"stn_ext: StnLSTM: for unbatched 2-D input, h0 and c0 must be 2-D (num_layers, "
                                 f"hidden_size), got shapes {[tuple(t.shape) for t in hx]}")
            hx = tuple(t.unsqueeze(1) for t in hx)
        output, (h_n, c_n) = functional.stn_lstm(input.unsqueeze(0 if self.batch_first else 1), hx, lam, params, **run)
        return output.squeeze(0 if self.batch_first else 1), (h_n.squeeze(1), c_n.squeeze(1))

    def extra_repr(self):
        s = f"{self.input_size}, {self.hidden_size}, n_hyper={self.n_hyper}, num_layers={self.num_layers}"
        if not self.bias:
            s += ", bias=False"
        if self.batch_first:
            s += ", batch_first=True"
        if self.dropout:
            s += f", dropout={self.dropout}"
        return s
