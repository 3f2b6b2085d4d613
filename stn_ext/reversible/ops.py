"""Python face of the exact reversible-learning ops (fake kernels and thin wrappers).

The ops work on the exact state of one tensor (see csrc/stn_ext.cpp and csrc/reversible_math.h):
``x``, ``v`` (int64 fixed point), ``head`` (int64 holding uint64 bits), ``count`` (int32), ``words``
((capacity, N) int32 holding uint32 bits) and ``status`` ((2,) int64: flags, largest stack count).
They never raise on data (no device synchronisation); :mod:`stn_ext.reversible` reads ``status``.
No autograd: the state is integer and the hypergradient is computed by the reverse pass itself.
"""
import math

import torch

from stn_ext import _library

_ops = torch.ops.stn_ext

DEN_BITS = 16
DEN = 1 << DEN_BITS  # momentum = gamma_num / DEN
HEAD_EMPTY = 1 << 32  # head of an empty buffer

# status[0] flags (csrc/reversible_math.h)
OVERFLOW = 1
NON_FINITE = 2
STACK_FULL = 4
STACK_EMPTY = 8

FLAG_NAMES = {
    OVERFLOW: "fixed-point overflow",
    NON_FINITE: "non-finite gradient",
    STACK_FULL: "information buffer full (internal error)",
    STACK_EMPTY: "information buffer underflow (the state is not one this forward pass produced)",
}


def gamma_num(momentum):
    """The numerator n of the momentum actually used, n / 2^16 (nearest, in [1, 2^16])."""
    m = float(momentum)
    if not (0.0 < m <= 1.0) or math.isnan(m):
        raise ValueError(f"stn_ext: momentum must be in (0, 1], got {momentum}")
    return min(DEN, max(1, int(round(m * DEN))))


def quantize_momentum(momentum):
    """The momentum the exact optimizer uses for `momentum`: the nearest multiple of 2^-16 (a float or
    a tensor of floats)."""
    if isinstance(momentum, torch.Tensor):
        return torch.clamp(torch.round(momentum.double() * DEN), 1, DEN).to(momentum.dtype) / DEN
    return gamma_num(momentum) / DEN


def step(x, v, head, count, words, view, grad, status, lr, gamma_num, radix_bits):
    """In place: v <- gamma v - (1 - gamma) grad; x <- x + lr v; view <- x (gamma = gamma_num / 2^16)."""
    _library.check_device_supported(x, view, grad)
    _ops.reversible_step(x, v, head, count, words, view, grad, status, float(lr), int(gamma_num), int(radix_bits))


def unstep_weights(x, v, view, dx, status, lr, radix_bits):
    """In place: x <- x - lr v; view <- x. Returns sum(dx * v) as a 0-dim float64 tensor."""
    _library.check_device_supported(x, view, dx)
    return _ops.reversible_unstep_weights(x, v, view, dx, status, float(lr), int(radix_bits))


def unstep_velocity(v, head, count, words, grad, dx, dv, status, lr, gamma_num, radix_bits):
    """In place: v <- (v + (1 - gamma) grad) / gamma exactly; with dv: dv += lr dx and returns
    sum(dv * (v + grad)) (0-dim float64)."""
    _library.check_device_supported(v, grad, dx, dv)
    return _ops.reversible_unstep_velocity(
        v, head, count, words, grad, dx, dv, status, float(lr), int(gamma_num), int(radix_bits)
    )


@torch.library.register_fake("stn_ext::reversible_step")
def _step_fake(x, v, head, count, words, view, grad, status, lr, gamma_num, radix_bits):
    torch._check(x.shape == view.shape, lambda: "stn_ext: x must have the shape of view")
    torch._check(grad.shape == view.shape, lambda: "stn_ext: grad must have the shape of view")
    torch._check(words.dim() == 2, lambda: "stn_ext: words must be 2-D (capacity, N)")
    return None


@torch.library.register_fake("stn_ext::reversible_unstep_weights")
def _unstep_weights_fake(x, v, view, dx, status, lr, radix_bits):
    torch._check(x.shape == view.shape, lambda: "stn_ext: x must have the shape of view")
    return view.new_empty((), dtype=torch.float64)


@torch.library.register_fake("stn_ext::reversible_unstep_velocity")
def _unstep_velocity_fake(v, head, count, words, grad, dx, dv, status, lr, gamma_num, radix_bits):
    torch._check(v.shape == grad.shape, lambda: "stn_ext: v must have the shape of grad")
    return grad.new_empty((), dtype=torch.float64)
