"""The tuner's options and the values each may take: one check shared by ``Tuner`` (a user's own loop) and
``TrainConfig.validate`` (the trainer and the CLI), so that a bad value is refused by name at construction, not
found later as a ZeroDivisionError, a 'math domain error' or a setting silently ignored."""
import math
import numbers

PERTURBS = ("auto", "example", "batch")
SCHEDULES = ("auto", "cosine", "constant", "tail")
HYPER_INPUTS = ("auto", "init", "centre", "recentred")
RESPONSE_INITS = ("v", "zero")
RESPONSE_FITS = ("auto", "gradient", "difference")


def _one_of(choices):
    return lambda v: v in choices, "one of " + ", ".join(repr(c) for c in choices)


def _number(ok, domain):
    return lambda v: isinstance(v, numbers.Real) and not isinstance(v, bool) and not math.isnan(v) and ok(v), domain


def _integer(v):
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _count(least, domain):
    return lambda v: _integer(v) and v >= least, domain


# option -> (accepts(value), what it accepts)
RULES = {
    "perturb": _one_of(PERTURBS),
    "hyper_lr_schedule": _one_of(SCHEDULES),
    "hyper_input": _one_of(HYPER_INPUTS),
    "response_init": _one_of(RESPONSE_INITS),
    "response_fit": _one_of(RESPONSE_FITS),
    "hyper_lr": _number(lambda v: 0 <= v < math.inf, ">= 0"),
    "hyper_beta2": _number(lambda v: 0 <= v < 1 or v == -1, "in [0, 1) (or -1: the mode's default)"),
    "scale_init": _number(lambda v: 0 < v < math.inf or v == -1, "> 0 (or -1: the method's default)"),
    "scale_max": _number(lambda v: 0 <= v < math.inf, ">= 0 (0: scale_init)"),
    "tau": _number(lambda v: 0 <= v < math.inf or v == -1, ">= 0 (or -1: the default, 1e-2)"),
    "hyper_plain_every": _count(0, "an integer >= 0 (0: none)"),
    "train_per_cycle": _count(1, "an integer >= 1"),
    "val_per_cycle": _count(1, "an integer >= 1"),
    "warmup_steps": _count(-1, "an integer >= 0 (or -1: a tenth of the steps)"),
    "response_gain_max": _number(lambda v: 1 <= v < math.inf, ">= 1 (1: the response's gradients as they are)"),
    "response_baseline": _number(lambda v: 0 <= v < 1, "in [0, 1) (0: off)"),
    "clip": _number(lambda v: 0 <= v < math.inf, ">= 0 (0: no clipping)"),  # TrainConfig's also takes -1 (auto)
    "total_steps": (lambda v: v is None or (_integer(v) and v >= 1), "None or an integer >= 1"),
}
# response_every and response_rows: stn_ext.tuning.defaults checks them where it resolves their 0 (the default)


def check(**options):
    """Raise ValueError naming the first option (of RULES) whose value is outside its domain; others pass."""
    for name, value in options.items():
        accepts, domain = RULES[name]
        if not accepts(value):
            raise ValueError(f"stn_ext: {name} must be {domain}, got {value!r}")


__all__ = ["check", "RULES", "PERTURBS", "SCHEDULES", "HYPER_INPUTS", "RESPONSE_INITS", "RESPONSE_FITS"]
