"""Pure-PyTorch reference of the STN layers (MacKay et al. 2019, Eq. 10), used by the tests and
benchmarks. Written for clarity: the per-example path runs two GEMMs/convs and broadcasts."""
import torch
import torch.nn.functional as F


def _hyper_terms(lam, hyper_weight, hyper_bias):
    s = lam @ hyper_weight.t()
    t = lam @ hyper_bias.t() if hyper_bias is not None else None
    return s, t


def gated_weight(lam, weight_elem, weight_hyper, hyper_weight):
    """W(lam) = W_e + (V lam) (.)row W_h for a shared lam of shape (n,)."""
    s = hyper_weight @ lam
    return weight_elem + s.view((-1,) + (1,) * (weight_elem.dim() - 1)) * weight_hyper


def gated_bias(lam, bias_elem, bias_hyper, hyper_bias):
    """b(lam) = b_e + (C lam) (.) b_h (shared lam), or b_e, or None."""
    if bias_elem is None:
        return None
    if bias_hyper is None:
        return bias_elem
    return bias_elem + (hyper_bias @ lam) * bias_hyper


def stn_linear(x, lam, weight_elem, weight_hyper, hyper_weight, bias_elem=None, bias_hyper=None, hyper_bias=None):
    if lam.dim() == 1:
        w = gated_weight(lam, weight_elem, weight_hyper, hyper_weight)
        return F.linear(x, w, gated_bias(lam, bias_elem, bias_hyper, hyper_bias))
    s, t = _hyper_terms(lam, hyper_weight, hyper_bias)
    shape = (x.shape[0],) + (1,) * (x.dim() - 2) + (s.shape[1],)  # not -1: ambiguous for an empty batch
    y = F.linear(x, weight_elem) + s.view(shape) * F.linear(x, weight_hyper)
    if bias_elem is not None:
        y = y + bias_elem
    if bias_hyper is not None:
        y = y + t.view(shape) * bias_hyper
    return y


def stn_conv2d(x, lam, weight_elem, weight_hyper, hyper_weight, bias_elem=None, bias_hyper=None, hyper_bias=None,
               stride=1, padding=0, dilation=1, groups=1):
    if lam.dim() == 1:
        w = gated_weight(lam, weight_elem, weight_hyper, hyper_weight)
        b = gated_bias(lam, bias_elem, bias_hyper, hyper_bias)
        return F.conv2d(x, w, b, stride, padding, dilation, groups)
    s, t = _hyper_terms(lam, hyper_weight, hyper_bias)
    conv = lambda w: F.conv2d(x, w, None, stride, padding, dilation, groups)  # noqa: E731
    y = conv(weight_elem) + s[:, :, None, None] * conv(weight_hyper)
    if bias_elem is not None:
        y = y + bias_elem[:, None, None]
    if bias_hyper is not None:
        y = y + (t * bias_hyper)[:, :, None, None]
    return y
