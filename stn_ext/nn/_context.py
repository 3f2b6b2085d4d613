"""Where the STN layers find their hyperparameter input when called without one: ``hyper_input`` and
``elementary`` blocks (per thread), and the check that one was given."""
import contextlib
import contextvars

import torch

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
