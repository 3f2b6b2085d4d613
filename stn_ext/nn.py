"""Self-tuning layers (MacKay et al. 2019): drop-in replacements for nn.Linear and nn.Conv2d whose
weight and bias are gated by a hyperparameter vector lam:

    W(lam) = W_e + (V lam) (.)row W_h          b(lam) = b_e + (C lam) (.) b_h

V and C start at zero, so a fresh layer computes exactly its elementary layer.
"""
import contextlib
import contextvars
import math

import torch
from torch import nn
from torch.nn.modules.utils import _pair

from stn_ext import functional

# Stack (a tuple) set by `hyper_input`; the innermost value is used. A context variable, so threads
# and asyncio tasks each see their own blocks.
_HYPER_INPUTS = contextvars.ContextVar("stn_ext_hyper_inputs", default=())


@contextlib.contextmanager
def _pushed(lam):
    token = _HYPER_INPUTS.set(_HYPER_INPUTS.get() + (lam,))
    try:
        yield lam
    finally:
        _HYPER_INPUTS.reset(token)


def hyper_input(lam):
    """Within this block, STN layers called without ``lam`` use this one, so a converted model keeps
    its own forward signature: ``with stn_ext.hyper_input(lam): y = model(x)``. Like ``torch.no_grad``,
    the block holds for the thread that opened it."""
    if not isinstance(lam, torch.Tensor):
        raise TypeError(f"stn_ext.hyper_input: lam must be a tensor, got {type(lam).__name__}")
    return _pushed(lam)


class _Elementary:
    """The marker ``elementary()`` sets in place of a lam: the layers compute their elementary part alone."""

    def __repr__(self):
        return "stn_ext.ELEMENTARY"


ELEMENTARY = _Elementary()


def elementary():
    """Within this block, STN layers called without ``lam`` compute x W_e^T + b_e (nn.Linear / nn.Conv2d on
    the elementary weights): what lam = 0 gives, bit for bit, without the hypernet path (its parameters get
    no gradient). For training at fixed hyperparameters and Delta-STN's general step and evaluation."""
    return _pushed(ELEMENTARY)


def current_hyper_input():
    """The lam set by the innermost ``hyper_input`` block (of this thread), or None."""
    stack = _HYPER_INPUTS.get()
    return stack[-1] if stack else None


def _resolve_lam(layer, lam):
    if lam is None:
        lam = current_hyper_input()
    if lam is None:
        raise RuntimeError(
            f"stn_ext: {type(layer).__name__} needs a hyperparameter input: call layer(x, lam) or run the "
            "model inside `with stn_ext.hyper_input(lam):`"
        )
    return lam


class _StnMixin:
    """Parameters and initialisation shared by StnLinear and StnConv2d."""

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


class StnConv2d(_StnMixin, nn.Module):
    """nn.Conv2d whose weight and bias respond to hyperparameters. ``forward(x, lam=None)``:
    x (B, C, H, W); lam (n_hyper,) shared by the batch, or (B, n_hyper) per example."""

    def __init__(self, in_channels, out_channels, kernel_size, n_hyper, stride=1, padding=0, dilation=1, groups=1,
                 bias=True, padding_mode="zeros", device=None, dtype=None):
        super().__init__()
        if groups < 1 or in_channels % groups or out_channels % groups:
            raise ValueError(f"stn_ext: groups={groups} must divide in_channels={in_channels} and "
                             f"out_channels={out_channels}")
        if padding_mode not in ("zeros", "reflect", "replicate", "circular"):
            raise ValueError(f"stn_ext: unknown padding_mode {padding_mode!r}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.dilation = _pair(kernel_size), _pair(stride), _pair(dilation)
        if isinstance(padding, str) and padding not in ("same", "valid"):
            raise ValueError(f"stn_ext: padding must be 'same', 'valid' or numbers, got {padding!r}")
        if padding == "same" and self.stride != (1, 1):
            raise ValueError(f"stn_ext: padding='same' needs stride 1 (as nn.Conv2d), got stride={stride}")
        self.padding = padding if isinstance(padding, str) else _pair(padding)
        self.groups, self.padding_mode = groups, padding_mode
        self._explicit_pad = self._padding_for_mode()
        self._make_params((out_channels, in_channels // groups) + self.kernel_size, out_channels, n_hyper, bias,
                          dict(device=device, dtype=dtype))
        self.reset_parameters()

    def _padding_for_mode(self):
        """F.pad's argument when padding_mode is not 'zeros' (as nn.Conv2d computes it)."""
        if self.padding_mode == "zeros":
            return None
        if self.padding == "valid":
            return None
        if self.padding == "same":
            pads = []
            for d, k in zip(reversed(self.dilation), reversed(self.kernel_size)):
                total = d * (k - 1)
                pads += [total // 2, total - total // 2]
            return pads
        return [p for p in reversed(self.padding) for _ in range(2)]

    @classmethod
    def from_conv(cls, conv, n_hyper):
        """An StnConv2d computing what ``conv`` does (V = C = 0), with its weight and bias."""
        w = conv.weight
        layer = cls(conv.in_channels, conv.out_channels, conv.kernel_size, n_hyper, stride=conv.stride,
                    padding=conv.padding, dilation=conv.dilation, groups=conv.groups, bias=conv.bias is not None,
                    padding_mode=conv.padding_mode, device=w.device, dtype=w.dtype)
        layer._copy_elementary(w, conv.bias)
        return layer

    def forward(self, x, lam=None):
        lam = _resolve_lam(self, lam)
        padding = self.padding
        if self._explicit_pad is not None:
            x = torch.nn.functional.pad(x, self._explicit_pad, mode=self.padding_mode)
            padding = 0
        if lam is ELEMENTARY:
            return torch.nn.functional.conv2d(x, self.weight_elem, self.bias_elem, self.stride, padding, self.dilation,
                                              self.groups)
        return functional.stn_conv2d(x, lam, *self._stn_params(), stride=self.stride, padding=padding,
                                     dilation=self.dilation, groups=self.groups)

    def extra_repr(self):
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, n_hyper={self.n_hyper}, "
                f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, groups={self.groups}, "
                f"bias={self.bias_elem is not None}, padding_mode={self.padding_mode!r}")


def convert(model, n_hyper, filter=None):
    """Replace, in place, the nn.Linear and nn.Conv2d submodules of ``model`` (all, or those for which
    ``filter(name, module)`` is true) by StnLinear / StnConv2d carrying their weights; returns model.
    With V = C = 0 (as converted) the model computes what it did before. Run it with
    ``with stn_ext.hyper_input(lam): model(x)``."""
    if n_hyper < 1:
        raise ValueError(f"stn_ext.convert: n_hyper must be >= 1, got {n_hyper}")
    if type(model) in (nn.Linear, nn.Conv2d):
        # Nothing holds the model to replace it in; say so instead of returning it unconverted.
        raise ValueError("stn_ext.convert: the model is itself a Linear/Conv2d; use StnLinear.from_linear or "
                         "StnConv2d.from_conv")
    targets = [(name, module) for name, module in model.named_modules()
               if type(module) in (nn.Linear, nn.Conv2d) and (filter is None or filter(name, module))]
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if isinstance(module, nn.Linear):
            new = StnLinear.from_linear(module, n_hyper)
        else:
            new = StnConv2d.from_conv(module, n_hyper)
        setattr(parent, child, new)
    return model
