"""Python face of the compiled STN ops: fake (meta) kernels and autograd formulas.

Every backward is written in differentiable ops (the backward ops have autograd of their own), so
double backward works: the trainer and reversible learning take Hessian-vector products.
"""
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


# --- stacked_linear: x [W_e; W_h]^T in one GEMM -------------------------------------------------


def stacked_linear(x, weight_elem, weight_hyper):
    """``x @ cat([weight_elem, weight_hyper]).T`` for 2-D x, with no weight copy when they are adjacent."""
    _library.check_device_supported(x, weight_elem)
    return _ops.stacked_linear(x, weight_elem, weight_hyper)


@torch.library.register_fake("stn_ext::stacked_linear")
def _stacked_linear_fake(x, weight_elem, weight_hyper):
    torch._check(x.dim() == 2, lambda: "stn_ext: x must be 2-D")
    dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
    return x.new_empty((x.shape[0], 2 * weight_elem.shape[0]), dtype=dtype)


def _stacked_linear_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _stacked_linear_bwd(ctx, grad):
    # Half-size GEMMs on the two column blocks of grad (strided views, no copies); in grad's dtype,
    # which differs from the inputs' under autocast. (One GEMM for d[W_e; W_h] measured slower on CPU
    # in a whole training step, though not in isolation.)
    x, w_e, w_h = ctx.saved_tensors
    out, dt = w_e.shape[0], grad.dtype
    g_e, g_h = grad[:, :out], grad[:, out:]
    dx = dw_e = dw_h = None
    if ctx.needs_input_grad[0]:
        dx = torch.addmm(g_e @ w_e.to(dt), g_h, w_h.to(dt)).to(x.dtype)
    if ctx.needs_input_grad[1]:
        dw_e = (g_e.t() @ x.to(dt)).to(w_e.dtype)
    if ctx.needs_input_grad[2]:
        dw_h = (g_h.t() @ x.to(dt)).to(w_h.dtype)
    return dx, dw_e, dw_h


torch.library.register_autograd("stn_ext::stacked_linear", _stacked_linear_bwd, setup_context=_stacked_linear_setup)


# --- per-example epilogue: y = e + s (.) h + b_e + t (.) b_h -------------------------------------


def per_example_epilogue(o, s, t, bias_elem, bias_hyper, groups, channels_last):
    """Fused epilogue of the per-example path; see csrc/stn_ext.cpp for the layout of ``o``."""
    _library.check_device_supported(o, s)
    return _ops.per_example_epilogue(o, s, t, bias_elem, bias_hyper, groups, channels_last)


def _out_shape(o, out, channels_last):
    return (o.shape[0], o.shape[1], out) if channels_last else (o.shape[0], out, o.shape[2])


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
def _epilogue_fake(o, s, t, bias_elem, bias_hyper, groups, channels_last):
    torch._check(o.dim() == 3, lambda: "stn_ext: o must be 3-D")
    torch._check(s.dim() == 2, lambda: "stn_ext: s must be 2-D (B, out)")
    return o.new_empty(_out_shape(o, s.shape[1], channels_last))


@torch.library.register_fake("stn_ext::per_example_epilogue_backward")
def _epilogue_backward_fake(grad, o, s, groups, channels_last):
    return o.new_empty(o.shape), s.new_empty(s.shape), s.new_empty(s.shape)


def _epilogue_setup(ctx, inputs, output):
    o, s, t, bias_elem, bias_hyper, groups, channels_last = inputs
    ctx.groups, ctx.channels_last = groups, channels_last
    ctx.has_bias_elem = bias_elem is not None
    ctx.save_for_backward(o, s, t, bias_hyper)


def _epilogue_bwd(ctx, grad):
    o, s, t, bias_hyper = ctx.saved_tensors
    grad_o, grad_s, grad_sum = _ops.per_example_epilogue_backward(grad, o, s, ctx.groups, ctx.channels_last)
    grad_t = grad_sum * bias_hyper if bias_hyper is not None else None
    grad_bias_elem = grad_sum.sum(0) if ctx.has_bias_elem else None
    grad_bias_hyper = (grad_sum * t).sum(0) if bias_hyper is not None else None
    return grad_o, grad_s, grad_t, grad_bias_elem, grad_bias_hyper, None, None


def _epilogue_backward_setup(ctx, inputs, output):
    grad, o, s, groups, channels_last = inputs
    ctx.groups, ctx.channels_last = groups, channels_last
    ctx.save_for_backward(grad, o, s)


def _epilogue_backward_bwd(ctx, a_o, a_s, a_sum):
    # Derivative of (grad_o, grad_s, grad_sum) in plain ops (double backward).
    grad, o, s = ctx.saved_tensors
    g, cl = ctx.groups, ctx.channels_last
    h = split_halves(o, g, cl)[1]
    a_e, a_h = split_halves(a_o, g, cl) if a_o is not None else (None, None)
    d_grad = torch.zeros_like(grad)
    d_o = d_s = None
    if a_o is not None:
        d_grad = d_grad + a_e + _per_position(s, cl) * a_h
        d_s = (a_h * grad).sum(1 if cl else 2)
    if a_s is not None:
        d_grad = d_grad + _per_position(a_s, cl) * h
        d_o = join_halves(torch.zeros_like(grad), _per_position(a_s, cl) * grad, g, cl)
    if a_sum is not None:
        d_grad = d_grad + _per_position(a_sum, cl)
    return d_grad, d_o, d_s, None, None


torch.library.register_autograd("stn_ext::per_example_epilogue", _epilogue_bwd, setup_context=_epilogue_setup)
torch.library.register_autograd(
    "stn_ext::per_example_epilogue_backward", _epilogue_backward_bwd, setup_context=_epilogue_backward_setup
)
