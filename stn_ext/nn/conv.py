"""StnConv2d: nn.Conv2d whose weight and bias respond to hyperparameters."""
import torch
from torch import nn
from torch.nn.modules.utils import _pair

from stn_ext import functional
from stn_ext.nn._base import _StnMixin
from stn_ext.nn._context import ELEMENTARY, _resolve_lam


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
