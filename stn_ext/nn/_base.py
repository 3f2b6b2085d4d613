"""What every STN layer shares: the six parameters, their initialisation, and W_e / W_h kept in one storage."""
import math

import torch
from torch import nn


class _StnMixin:
    """Parameters and initialisation shared by the STN layers (StnLinear and StnConv2d, the weights of
    StnLSTM, which are StnLinear, and StnEmbedding).

    ``gate_dim`` is the dimension of weight_elem that ``V lam`` scales: 0 (a row per output unit) for all
    but StnEmbedding, whose table keeps nn.Embedding's (num_embeddings, embedding_dim) layout and is
    scaled per embedding dimension (gate_dim = 1)."""

    gate_dim = 0

    def _make_params(self, weight_shape, out, n_hyper, bias, factory):
        if n_hyper < 1:
            raise ValueError(f"stn_ext: n_hyper must be >= 1, got {n_hyper}")
        self.n_hyper = n_hyper
        # W_e and W_h are two halves of one (2, out, ...) storage, so the per-example path reads
        # [W_e; W_h] as one matrix without copying it.
        stacked = torch.empty((2,) + tuple(weight_shape), **factory)
        self.weight_elem = nn.Parameter(stacked[0])
        self.weight_hyper = nn.Parameter(stacked[1])
        self.hyper_weight = nn.Parameter(torch.empty(out, n_hyper, **factory))
        if bias:
            self.bias_elem = nn.Parameter(torch.empty(out, **factory))
            self.bias_hyper = nn.Parameter(torch.empty(out, **factory))
            self.hyper_bias = nn.Parameter(torch.empty(out, n_hyper, **factory))
        else:
            self.register_parameter("bias_elem", None)
            self.register_parameter("bias_hyper", None)
            self.register_parameter("hyper_bias", None)

    def reset_parameters(self):
        # W_e, b_e as nn.Linear / nn.Conv2d do; W_h, b_h the same way; V, C zero.
        for w in (self.weight_elem, self.weight_hyper):
            nn.init.kaiming_uniform_(w, a=math.sqrt(5))
        nn.init.zeros_(self.hyper_weight)
        if self.bias_elem is not None:
            fan_in = math.prod(self.weight_elem.shape[1:])  # in * kernel size, also when out = 0
            bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
            nn.init.uniform_(self.bias_elem, -bound, bound)
            nn.init.uniform_(self.bias_hyper, -bound, bound)
            nn.init.zeros_(self.hyper_bias)

    def gate(self, lam):
        """V lam for one lam ((n_hyper,)), shaped to scale weight_elem along gate_dim."""
        return (self.hyper_weight @ lam).view(self.gate_shape())

    def gate_shape(self):
        """The shape that broadcasts one value per gate (an entry of V lam) over weight_elem, along gate_dim."""
        shape = [1] * self.weight_hyper.dim()
        shape[self.gate_dim] = -1
        return shape

    def gate_rows(self, w):
        """w (shaped as weight_elem) with one row per entry of the gate V lam, flattened: (gates, rest)."""
        return w.movedim(self.gate_dim, 0).flatten(1)

    def path(self, lam):
        """The hypernet's part of the weights at one lam ((n_hyper,)): ((V lam) (.) W_h along gate_dim, (C lam) (.)
        b_h or None), what W_e and b_e add to at that input."""
        weight = self.gate(lam) * self.weight_hyper
        return weight, None if self.bias_hyper is None else (self.hyper_bias @ lam) * self.bias_hyper

    def _restack(self):
        """Put W_e and W_h back into one storage where something made them anew; without it the
        per-example path still works but copies [W_e; W_h] on every call."""
        e, h = self.weight_elem, self.weight_hyper
        adjacent = (e.is_contiguous() and h.is_contiguous() and e.dtype == h.dtype and e.device == h.device
                    and h.untyped_storage().data_ptr() == e.untyped_storage().data_ptr()
                    and h.storage_offset() == e.storage_offset() + e.numel())
        if not adjacent and e.shape == h.shape:
            with torch.no_grad():
                stacked = torch.stack([e.data, h.data])
                e.data, h.data = stacked[0], stacked[1]

    def _apply(self, fn, recurse=True):
        result = super()._apply(fn, recurse)  # .to(), .cuda(), .half() ... make each parameter anew
        self._restack()
        return result

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)  # load_state_dict(..., assign=True) replaces them
        self._restack()

    def __setstate__(self, state):
        super().__setstate__(state)  # copy.deepcopy and unpickling copy each parameter on its own
        self._restack()

    def _copy_elementary(self, weight, bias):
        with torch.no_grad():
            self.weight_elem.copy_(weight)
            if bias is not None:
                self.bias_elem.copy_(bias)

    def _stn_params(self):
        return (self.weight_elem, self.weight_hyper, self.hyper_weight, self.bias_elem, self.bias_hyper,
                self.hyper_bias)
