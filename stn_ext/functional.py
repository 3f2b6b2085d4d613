"""Functional STN layers on the fused ops.

shared lam (n,):        W(lam) by the fused gate op, then one GEMM/conv.
per-example lam (B, n): one GEMM/conv against the stacked weight [W_e; W_h], then the fused epilogue
                        y = e + s (.) h + offset with s = lam V^T and offset = b_e + (lam C^T) (.) b_h.
                        Never B weights.
"""
import torch
import torch.autograd.forward_ad as _forward_ad
import torch.nn.functional as F

from stn_ext import ops, reference


def _needs_reference():
    """The fused ops have reverse-mode autograd only: under torch.func transforms (grad, vmap, jvp,
    jacrev, ...) and forward-mode AD the same maths runs as plain PyTorch ops (stn_ext.reference)."""
    return torch._C._are_functorch_transforms_active() or _forward_ad._current_level >= 0


def _fail(msg):
    raise ValueError("stn_ext: " + msg)


def _autocast_enabled(device_type):
    """torch.is_autocast_enabled, False for device types autocast does not know (meta, ...)."""
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:
        return False


def _check_args(kind, x, lam, weight_elem, weight_hyper, hyper_weight, bias_elem, bias_hyper, hyper_bias):
    named = dict(x=x, lam=lam, weight_elem=weight_elem, weight_hyper=weight_hyper, hyper_weight=hyper_weight,
                 bias_elem=bias_elem, bias_hyper=bias_hyper, hyper_bias=hyper_bias)
    for name, t in named.items():
        if t is not None and not isinstance(t, torch.Tensor):
            _fail(f"{kind}: {name} must be a tensor, got {type(t).__name__}")
    for name, t in named.items():
        if t is not None and t.device != weight_elem.device:
            _fail(f"{kind}: {name} is on {t.device} but weight_elem is on {weight_elem.device}; move them to one device")
    if not lam.is_floating_point():
        _fail(f"{kind}: lam must be a floating-point tensor, got {lam.dtype}")
    if not _autocast_enabled(x.device.type):
        for name, t in named.items():
            if t is not None and t.dtype != weight_elem.dtype:
                _fail(f"{kind}: {name} has dtype {t.dtype} but weight_elem has {weight_elem.dtype}; cast them to one dtype")
    out = weight_elem.shape[0]
    if weight_hyper.shape != weight_elem.shape:
        _fail(f"{kind}: weight_hyper has shape {tuple(weight_hyper.shape)}, expected weight_elem's {tuple(weight_elem.shape)}")
    if hyper_weight.dim() != 2 or hyper_weight.shape[0] != out:
        _fail(f"{kind}: hyper_weight must have shape (out={out}, n_hyper), got {tuple(hyper_weight.shape)}")
    n = hyper_weight.shape[1]
    if lam.dim() == 1:
        if lam.shape[0] != n:
            _fail(f"{kind}: lam has shape ({lam.shape[0]},) but the layer has n_hyper={n}")
    elif lam.dim() == 2:
        if lam.shape[1] != n:
            _fail(f"{kind}: lam has shape {tuple(lam.shape)}; expected (B, n_hyper={n})")
        if x.dim() < 2 or lam.shape[0] != x.shape[0]:
            _fail(f"{kind}: per-example lam has batch size {lam.shape[0]} (shape[0]) but x has batch size "
                  f"{x.shape[0] if x.dim() else 'none'} (x.shape={tuple(x.shape)})")
    else:
        _fail(f"{kind}: lam must have shape (n_hyper,) or (B, n_hyper), got {tuple(lam.shape)}")
    for name, t in (("bias_elem", bias_elem), ("bias_hyper", bias_hyper)):
        if t is not None and t.shape != (out,):
            _fail(f"{kind}: {name} must have shape ({out},), got {tuple(t.shape)}")
    if bias_hyper is not None:
        if bias_elem is None:
            _fail(f"{kind}: bias_hyper needs bias_elem")
        if hyper_bias is None or hyper_bias.shape != (out, n):
            _fail(f"{kind}: bias_hyper needs hyper_bias of shape ({out}, {n}), got "
                  f"{None if hyper_bias is None else tuple(hyper_bias.shape)}")


def _gated_bias(lam, bias_elem, bias_hyper, hyper_bias):
    if bias_elem is None or bias_hyper is None:
        return bias_elem
    return ops.gate(bias_elem, bias_hyper, torch.mv(hyper_bias, lam))


def _per_example_offset(lam, bias_elem, bias_hyper, hyper_bias):
    """The gated bias b_e + (lam C^T) (.) b_h = b_e + lam (C (.)row b_h)^T per example, in one small
    GEMM (its backward is small GEMMs too, no pass over (B, out)); b_e alone, or None."""
    if bias_elem is None or bias_hyper is None:
        return bias_elem
    return torch.addmm(bias_elem, lam, (hyper_bias * bias_hyper[:, None]).t())


def stn_linear(x, lam, weight_elem, weight_hyper, hyper_weight, bias_elem=None, bias_hyper=None, hyper_bias=None):
    """Self-tuning linear layer; x: (B, *, in), lam: (n_hyper,) or (B, n_hyper)."""
    _check_args("stn_linear", x, lam, weight_elem, weight_hyper, hyper_weight, bias_elem, bias_hyper, hyper_bias)
    if x.dim() == 0 or x.shape[-1] != weight_elem.shape[1]:
        _fail(f"stn_linear: x has shape {tuple(x.shape)} but the layer has in_features={weight_elem.shape[1]}")
    if _needs_reference():
        return reference.stn_linear(x, lam, weight_elem, weight_hyper, hyper_weight, bias_elem, bias_hyper, hyper_bias)
    if lam.dim() == 1:
        w = ops.gate(weight_elem, weight_hyper, torch.mv(hyper_weight, lam))
        return F.linear(x, w, _gated_bias(lam, bias_elem, bias_hyper, hyper_bias))
    s = lam @ hyper_weight.t()
    return ops.per_example_linear(x, weight_elem, weight_hyper, s, _per_example_offset(lam, bias_elem, bias_hyper,
                                                                                       hyper_bias))


def _stacked_conv_weight(weight_elem, weight_hyper, groups):
    """[W_e; W_h] interleaved by group, so that conv groups see their own halves."""
    if groups == 1:
        return torch.cat([weight_elem, weight_hyper])
    out = weight_elem.shape[0]
    rest = weight_elem.shape[1:]
    w = torch.stack([weight_elem.reshape((groups, out // groups) + rest),
                     weight_hyper.reshape((groups, out // groups) + rest)], dim=1)
    return w.reshape((2 * out,) + rest)


def stn_conv2d(x, lam, weight_elem, weight_hyper, hyper_weight, bias_elem=None, bias_hyper=None, hyper_bias=None,
               stride=1, padding=0, dilation=1, groups=1):
    """Self-tuning conv2d; x: (B, C, H, W) in any memory format, lam: (n_hyper,) or (B, n_hyper)."""
    _check_args("stn_conv2d", x, lam, weight_elem, weight_hyper, hyper_weight, bias_elem, bias_hyper, hyper_bias)
    if weight_elem.dim() != 4:
        _fail(f"stn_conv2d: weight_elem must be 4-D (out, in/groups, kh, kw), got {tuple(weight_elem.shape)}")
    if x.dim() != 4 or x.shape[1] != weight_elem.shape[1] * groups:
        _fail(f"stn_conv2d: x has shape {tuple(x.shape)} but the layer expects (B, {weight_elem.shape[1] * groups}, H, W)")
    if _needs_reference():
        return reference.stn_conv2d(x, lam, weight_elem, weight_hyper, hyper_weight, bias_elem, bias_hyper, hyper_bias,
                                    stride, padding, dilation, groups)
    if lam.dim() == 1:
        w = ops.gate(weight_elem, weight_hyper, torch.mv(hyper_weight, lam))
        return F.conv2d(x, w, _gated_bias(lam, bias_elem, bias_hyper, hyper_bias), stride, padding, dilation, groups)
    out = weight_elem.shape[0]
    o = F.conv2d(x, _stacked_conv_weight(weight_elem, weight_hyper, groups), None, stride, padding, dilation, groups)
    B, _, H, W = o.shape
    channels_last = o.is_contiguous(memory_format=torch.channels_last) and not o.is_contiguous()
    o3 = o.permute(0, 2, 3, 1).reshape(B, H * W, 2 * out) if channels_last else o.reshape(B, 2 * out, H * W)
    s = (lam @ hyper_weight.t()).to(o.dtype)  # o's dtype differs under autocast
    offset = _per_example_offset(lam, bias_elem, bias_hyper, hyper_bias)
    y = ops.per_example_epilogue(o3, s, None if offset is None else offset.to(o.dtype), groups, channels_last)
    if channels_last:
        return y.view(B, H, W, out).permute(0, 3, 1, 2)
    return y.view(B, out, H, W)
