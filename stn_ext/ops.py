"""Python face of the compiled STN ops: fake (meta) kernels and autograd formulas.

Every backward is written in differentiable ops (the backward ops have autograd of their own), so
double backward works: the trainer and reversible learning take Hessian-vector products.
"""
import math

import torch

from stn_ext import _library  # noqa: F401  (loads the library that defines the schemas)

_ops = torch.ops.stn_ext


# --- gate: W = elem + scale (.)row hyper ----------------------------------------------------------


def gate(elem, hyper, scale):
    """``elem + scale[:, None, ...] * hyper`` in one pass (elem, hyper: (out, ...); scale: (out,))."""
    _library.check_device_supported(elem, hyper, scale)
    return _ops.gate(elem, hyper, scale)


def gate_backward(grad, hyper, scale):
    """``(scale[:, None, ...] * grad, (grad * hyper).sum over all but dim 0)`` in one pass."""
    return _ops.gate_backward(grad, hyper, scale)


def _row(scale, like):
    """scale (out,) viewed to broadcast over the rows of `like` (out, ...)."""
    return scale.view((-1,) + (1,) * (like.dim() - 1))


def _row_sum(t):
    return t.sum(dim=tuple(range(1, t.dim()))) if t.dim() > 1 else t


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


def _gate_setup(ctx, inputs, output):
    _, hyper, scale = inputs
    ctx.save_for_backward(hyper, scale)


def _gate_bwd(ctx, grad):
    hyper, scale = ctx.saved_tensors
    grad_hyper = grad_scale = None
    if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
        grad_hyper, grad_scale = _ops.gate_backward(grad, hyper, scale)
    return grad if ctx.needs_input_grad[0] else None, grad_hyper, grad_scale


def _gate_backward_setup(ctx, inputs, output):
    grad, hyper, scale = inputs
    ctx.save_for_backward(grad, hyper, scale)


def _gate_backward_bwd(ctx, g_hyper, g_scale):
    # The backward op is bilinear; its own derivative in plain ops (double backward).
    grad, hyper, scale = ctx.saved_tensors
    d_grad = d_hyper = d_scale = None
    if ctx.needs_input_grad[0]:
        d_grad = torch.zeros_like(grad)
        if g_hyper is not None:
            d_grad = d_grad + _row(scale, grad) * g_hyper
        if g_scale is not None:
            d_grad = d_grad + _row(g_scale, grad) * hyper
    if ctx.needs_input_grad[1] and g_scale is not None:
        d_hyper = _row(g_scale, grad) * grad
    if ctx.needs_input_grad[2] and g_hyper is not None:
        d_scale = _row_sum(g_hyper * grad)
    return d_grad, d_hyper, d_scale


torch.library.register_autograd("stn_ext::gate", _gate_bwd, setup_context=_gate_setup)
torch.library.register_autograd("stn_ext::gate_backward", _gate_backward_bwd, setup_context=_gate_backward_setup)


# --- per_example_linear: one GEMM against [W_e; W_h], then the fused epilogue ----------------------


def per_example_linear(x, weight_elem, weight_hyper, s, offset):
    """Per-example STN linear layer y = x W_e^T + s (.) (x W_h^T) + offset; x (B, ..., in), s (B, out),
    offset (B, out), (out,) or None."""
    _library.check_device_supported(x, weight_elem)
    return _ops.per_example_linear(x, weight_elem, weight_hyper, s, offset)[0]


@torch.library.register_fake("stn_ext::per_example_linear")
def _per_example_linear_fake(x, weight_elem, weight_hyper, s, offset):
    torch._check(x.dim() >= 2, lambda: "stn_ext: x must be (B, ..., in)")
    dtype = torch.promote_types(x.dtype, weight_elem.dtype)  # the autocast rule has cast them already
    out = weight_elem.shape[0]
    h = x.new_empty((math.prod(x.shape[:-1]), out), dtype=dtype)
    return x.new_empty(x.shape[:-1] + (out,), dtype=dtype), h


def _per_example_linear_setup(ctx, inputs, output):
    x, w_e, w_h, s, offset = inputs
    ctx.offset_dim = None if offset is None else offset.dim()
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)  # no zero-filled gradient for h
    ctx.save_for_backward(x, w_e, w_h, s, output[1])


def _per_example_linear_bwd(ctx, grad, _grad_o):
    if grad is None:
        return (None,) * 5
    x, w_e, w_h, s, h = ctx.saved_tensors
    need = ctx.needs_input_grad
    if torch.is_grad_enabled():
        # Double backward: grad_s depends on x and W_h through h, which the forward saved detached.
        h = torch.nn.functional.linear(x.flatten(0, -2), w_h).to(h.dtype)
    dx, dw_e, dw_h, ds = _ops.per_example_linear_backward(grad, x, w_e, w_h, h, s, list(need[:3]))
    d_offset = None
    if need[4]:
        # grad summed over positions (if x had any), and over the batch for a shared offset.
        d_offset = grad if x.dim() == 2 else grad.reshape(s.shape[0], math.prod(x.shape[1:-1]), s.shape[1]).sum(1)
        d_offset = d_offset.sum(0) if ctx.offset_dim == 1 else d_offset
    return dx, dw_e, dw_h, ds, d_offset


torch.library.register_autograd("stn_ext::per_example_linear", _per_example_linear_bwd,
                                setup_context=_per_example_linear_setup)


# --- per-example epilogue: y = e + s (.) h + offset ------------------------------------------------


def per_example_epilogue(o, s, offset, groups, channels_last):
    """Fused epilogue of the per-example path, y; see csrc/stn_ext.cpp for the layout of ``o``."""
    _library.check_device_supported(o, s)
    return _ops.per_example_epilogue(o, s, offset, groups, channels_last)[0]


def _out_shape(o, out, channels_last):
    return (o.shape[0], o.shape[1], out) if channels_last else (o.shape[0], out, o.shape[2])


def _stacked_shape(h, channels_last):
    return (h.shape[0], h.shape[1], 2 * h.shape[2]) if channels_last else (h.shape[0], 2 * h.shape[1], h.shape[2])


def split_halves(o, groups, channels_last):
    """The (e, h) halves of a stacked output ``o``, each shaped like the layer output (copies)."""
    B = o.shape[0]
    if channels_last:
        P, C2 = o.shape[1], o.shape[2]
        v = o.reshape(B, P, groups, 2, C2 // (2 * groups))
        return v[:, :, :, 0].reshape(B, P, C2 // 2), v[:, :, :, 1].reshape(B, P, C2 // 2)
    C2, P = o.shape[1], o.shape[2]
    v = o.reshape(B, groups, 2, C2 // (2 * groups), P)
    return v[:, :, 0].reshape(B, C2 // 2, P), v[:, :, 1].reshape(B, C2 // 2, P)


def join_halves(e, h, groups, channels_last):
    """Inverse of split_halves."""
    B = e.shape[0]
    if channels_last:
        P, out = e.shape[1], e.shape[2]
        v = torch.stack([e.reshape(B, P, groups, out // groups), h.reshape(B, P, groups, out // groups)], dim=3)
        return v.reshape(B, P, 2 * out)
    out, P = e.shape[1], e.shape[2]
    v = torch.stack([e.reshape(B, groups, out // groups, P), h.reshape(B, groups, out // groups, P)], dim=2)
    return v.reshape(B, 2 * out, P)


def _per_position(x, channels_last):
    """(B, out) broadcast over the positions of a (B, P, out) or (B, out, P) tensor."""
    return x[:, None, :] if channels_last else x[:, :, None]


@torch.library.register_fake("stn_ext::per_example_epilogue")
def _epilogue_fake(o, s, offset, groups, channels_last):
    torch._check(o.dim() == 3, lambda: "stn_ext: o must be 3-D")
    torch._check(s.dim() == 2, lambda: "stn_ext: s must be 2-D (B, out)")
    shape = _out_shape(o, s.shape[1], channels_last)
    return o.new_empty(shape), o.new_empty(shape)


@torch.library.register_fake("stn_ext::per_example_epilogue_backward")
def _epilogue_backward_fake(grad, h, s, groups, channels_last):
    return h.new_empty(_stacked_shape(h, channels_last)), s.new_empty(s.shape), s.new_empty(s.shape)


def _epilogue_setup(ctx, inputs, output):
    _, s, offset, groups, channels_last = inputs
    ctx.groups, ctx.channels_last = groups, channels_last
    ctx.offset_dim = None if offset is None else offset.dim()
    ctx.set_materialize_grads(False)  # h's gradient is None but in double backward
    # h (an output, differentiable: the copy of o's h half) rather than o: half the memory kept.
    ctx.save_for_backward(output[1], s)


def _epilogue_bwd(ctx, grad, grad_h):
    h, s = ctx.saved_tensors
    g, cl = ctx.groups, ctx.channels_last
    if grad is None:
        grad = torch.zeros_like(h)
    grad_o, grad_s, grad_sum = _ops.per_example_epilogue_backward(grad, h, s, g, cl)
    if grad_h is not None:
        grad_o = grad_o + join_halves(torch.zeros_like(grad_h), grad_h, g, cl)
    grad_offset = None
    if ctx.needs_input_grad[2]:
        grad_offset = grad_sum.sum(0) if ctx.offset_dim == 1 else grad_sum
    return grad_o, grad_s, grad_offset, None, None


def _epilogue_backward_setup(ctx, inputs, output):
    grad, h, s, groups, channels_last = inputs
    ctx.groups, ctx.channels_last = groups, channels_last
    ctx.save_for_backward(grad, h, s)


def _epilogue_backward_bwd(ctx, a_o, a_s, a_sum):
    # Derivative of (grad_o, grad_s, grad_sum) in plain ops (double backward).
    grad, h, s = ctx.saved_tensors
    g, cl = ctx.groups, ctx.channels_last
    d_grad = torch.zeros_like(grad)
    d_h = d_s = None
    if a_o is not None:
        a_e, a_h = split_halves(a_o, g, cl)
        d_grad = d_grad + a_e + _per_position(s, cl) * a_h
        d_s = (a_h * grad).sum(1 if cl else 2)
    if a_s is not None:
        d_grad = d_grad + _per_position(a_s, cl) * h
        d_h = _per_position(a_s, cl) * grad
    if a_sum is not None:
        d_grad = d_grad + _per_position(a_sum, cl)
    return d_grad, d_h, d_s, None, None


torch.library.register_autograd("stn_ext::per_example_epilogue", _epilogue_bwd, setup_context=_epilogue_setup)
torch.library.register_autograd(
    "stn_ext::per_example_epilogue_backward", _epilogue_backward_bwd, setup_context=_epilogue_backward_setup
)
