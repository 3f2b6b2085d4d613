"""StnLinear: nn.Linear whose weight and bias respond to hyperparameters."""
import torch
from torch import nn

from stn_ext import functional
from stn_ext.nn._base import _StnMixin
from stn_ext.nn._context import ELEMENTARY, _resolve_lam


class StnLinear(_StnMixin, nn.Module):
    """nn.Linear whose weight and bias respond to hyperparameters. ``forward(x, lam=None)``:
    x (B, *, in); lam (n_hyper,) shared by the batch, or (B, n_hyper) per example."""

    def __init__(self, in_features, out_features, n_hyper, bias=True, device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self._make_params((out_features, in_features), out_features, n_hyper, bias,
                          dict(device=device, dtype=dtype))
        self.reset_parameters()

    @classmethod
    def from_linear(cls, linear, n_hyper):
        """An StnLinear computing what ``linear`` does (V = C = 0), with its weight and bias."""
        w = linear.weight
        layer = cls(linear.in_features, linear.out_features, n_hyper, bias=linear.bias is not None,
                    device=w.device, dtype=w.dtype)
        layer._copy_elementary(w, linear.bias)
        return layer

    def forward(self, x, lam=None):
        lam = _resolve_lam(self, lam)
        if lam is ELEMENTARY:
            return torch.nn.functional.linear(x, self.weight_elem, self.bias_elem)
        return functional.stn_linear(x, lam, *self._stn_params())

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, n_hyper={self.n_hyper}, "
                f"bias={self.bias_elem is not None}")
