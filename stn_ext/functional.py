"""Functional STN layers: one call into the layer ops of csrc/stn_layers.cpp, which check the arguments
and compose the fused ops in C++.

shared lam (n,):        W(lam) by the fused gate op, then one GEMM/conv.
per-example lam (B, n): one GEMM/conv against the stacked weight [W_e; W_h], then the fused epilogue
                        y = e + s (.) h + offset with s = lam V^T and offset = b_e + (lam C^T) (.) b_h.
                        Never B weights.
"""
import torch
import torch.autograd.forward_ad as _forward_ad
from torch.nn.modules.utils import _pair

from stn_ext import ops, reference

_ops = ops._ops


def _needs_reference():
    """The fused ops have reverse-mode autograd only: under torch.func transforms (grad, vmap, jvp,
    jacrev, ...) and forward-mode AD the same maths runs as plain PyTorch ops (stn_ext.reference)."""
    return torch._C._are_functorch_transforms_active() or _forward_ad._current_level >= 0


def _stand_in(t):
    """A tensor of t's shape, dtype and device that holds one element: what the argument checks read."""
    return None if t is None else torch.empty((), dtype=t.dtype, device=t.device).expand(t.shape)


def _check_for_reference(kind, args, groups=1):
    """The fused layer's argument checks (csrc/stn_layers.cpp) before the reference path: on stand-ins,
    since the op has no batching rule (it returns nothing) and reads only shapes, dtypes and devices."""
    _ops.check_layer_args(kind, *(_stand_in(t) for t in args), groups)


def stn_linear(x, lam, weight_elem, weight_hyper, hyper_weight, bias_elem=None, bias_hyper=None, hyper_bias=None):
    """Self-tuning linear layer; x: (B, *, in), lam: (n_hyper,) or (B, n_hyper)."""
    args = (x, lam, weight_elem, weight_hyper, hyper_weight, bias_elem, bias_hyper, hyper_bias)
    if _needs_reference():
        _check_for_reference("stn_linear", args)
        return reference.stn_linear(*args)
    return _ops.stn_linear(*args)


def stn_conv2d(x, lam, weight_elem, weight_hyper, hyper_weight, bias_elem=None, bias_hyper=None, hyper_bias=None,
               stride=1, padding=0, dilation=1, groups=1):
    """Self-tuning conv2d; x: (B, C, H, W) in any memory format, lam: (n_hyper,) or (B, n_hyper); padding:
    numbers, or 'same' / 'valid' as F.conv2d takes them."""
    args = (x, lam, weight_elem, weight_hyper, hyper_weight, bias_elem, bias_hyper, hyper_bias)
    if _needs_reference():
        _check_for_reference("stn_conv2d", args, groups)
        return reference.stn_conv2d(*args, stride, padding, dilation, groups)
    stride, dilation = _pair(stride), _pair(dilation)  # the op's int[2] takes no bare int from Python
    if isinstance(padding, str):
        return _ops.stn_conv2d(*args, stride, (0, 0), dilation, groups, padding)
    return _ops.stn_conv2d(*args, stride, _pair(padding), dilation, groups)
