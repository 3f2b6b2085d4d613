"""Python face of the compiled STN ops: thin wrappers and the fake (meta) kernels torch.compile traces with.

The ops' autograd is registered in C++ (csrc/autograd.cpp); every backward op has a backward of its own, so
double backward works: the trainer and reversible learning take Hessian-vector products. The layers
themselves are ops too (stn_ext::stn_linear, stn_ext::stn_conv2d, csrc/stn_layers.cpp), composed of these
in C++, so they need no fake kernels of their own.
"""
import math

import torch

from stn_ext import _library  # noqa: F401  (loads the library that defines the schemas)

_ops = torch.ops.stn_ext


def gate(elem, hyper, scale):
    """``elem + scale[:, None, ...] * hyper`` in one pass (elem, hyper: (out, ...); scale: (out,))."""
    return _ops.gate(elem, hyper, scale)


def gate_backward(grad, hyper, scale):
    """``(scale[:, None, ...] * grad, (grad * hyper).sum over all but dim 0)`` in one pass."""
    return _ops.gate_backward(grad, hyper, scale)


def per_example_linear(x, weight_elem, weight_hyper, s, offset):
    """Per-example STN linear layer y = x W_e^T + s (.) (x W_h^T) + offset; x (B, ..., in), s (B, out),
    offset (B, out), (out,) or None."""
    return _ops.per_example_linear(x, weight_elem, weight_hyper, s, offset)[0]


def per_example_epilogue(o, s, offset, groups, channels_last):
    """Fused epilogue of the per-example path, y; see csrc/op_schemas.h for the layout of ``o``."""
    return _ops.per_example_epilogue(o, s, offset, groups, channels_last)[0]


# --- fake kernels ---------------------------------------------------------------------------------


@torch.library.register_fake("stn_ext::gate")
def _gate_fake(elem, hyper, scale):
    torch._check(hyper.shape == elem.shape, lambda: "stn_ext: hyper must have the shape of elem")
    torch._check(scale.shape == elem.shape[:1], lambda: "stn_ext: scale must have shape (out,)")
    return elem.new_empty(elem.shape)


@torch.library.register_fake("stn_ext::gate_backward")
def _gate_backward_fake(grad, hyper, scale):
    torch._check(hyper.shape == grad.shape, lambda: "stn_ext: hyper must have the shape of grad")
    torch._check(scale.shape == grad.shape[:1], lambda: "stn_ext: scale must have shape (out,)")
    return grad.new_empty(grad.shape), scale.new_empty(scale.shape)


@torch.library.register_fake("stn_ext::per_example_linear")
def _per_example_linear_fake(x, weight_elem, weight_hyper, s, offset):
    torch._check(x.dim() >= 2, lambda: "stn_ext: x must be (B, ..., in)")
    dtype = torch.promote_types(x.dtype, weight_elem.dtype)  # the autocast rule has cast them already
    out = weight_elem.shape[0]
    h = x.new_empty((math.prod(x.shape[:-1]), out), dtype=dtype)
    return x.new_empty(x.shape[:-1] + (out,), dtype=dtype), h


def _out_shape(o, out, channels_last):
    return (o.shape[0], o.shape[1], out) if channels_last else (o.shape[0], out, o.shape[2])


def _stacked_shape(h, channels_last):
    return (h.shape[0], h.shape[1], 2 * h.shape[2]) if channels_last else (h.shape[0], 2 * h.shape[1], h.shape[2])


@torch.library.register_fake("stn_ext::per_example_epilogue")
def _epilogue_fake(o, s, offset, groups, channels_last):
    torch._check(o.dim() == 3, lambda: "stn_ext: o must be 3-D")
    torch._check(s.dim() == 2, lambda: "stn_ext: s must be 2-D (B, out)")
    shape = _out_shape(o, s.shape[1], channels_last)
    return o.new_empty(shape), o.new_empty(shape)


@torch.library.register_fake("stn_ext::per_example_epilogue_backward")
def _epilogue_backward_fake(grad, h, s, groups, channels_last):
    return h.new_empty(_stacked_shape(h, channels_last)), s.new_empty(s.shape), s.new_empty(s.shape)
