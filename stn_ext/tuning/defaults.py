"""The tuner's per-method defaults: what an 'auto' setting (perturbation mode, initial scale sigma_0, hyper
learning-rate schedule) becomes. Chosen by measurement; docs/trainer.md ("Defaults, and how they were chosen")
gives the numbers.

Perturbation mode, by method: one per batch for stn (on ridge every per-batch run ended within 0.030 of the
optimum, per example up to 0.079; on real data STN is level in both modes and per batch is the one-GEMM path);
one per example for delta-stn (ahead of per batch on all three real-data comparisons: its response is fitted
from B perturbations per batch instead of one).

sigma_0 and schedule, by mode: per batch 0.3 and 'tail' (constant, then cosine over the last half), per example
0.5 and cosine. One perturbation per batch scales the curvature of every weight at once (a weight decay by
e^(sigma eps)), so momentum SGD goes unstable well below its fixed limit at 0.5; per example the batch averages
the perturbations and 0.5 learns the response faster. A noisier per-example hypergradient needs the earlier
decay to settle.
"""

PERTURB = {"stn": "batch", "delta-stn": "example", "fixed": "batch"}
SCALE_AND_SCHEDULE = {"batch": (0.3, "tail"), "example": (0.5, "cosine")}


def resolve(method, perturb="auto", scale_init=-1.0, schedule="auto"):
    """(perturb, sigma_0, schedule) with each 'auto' (-1 for sigma_0) replaced by the method's default."""
    if perturb == "auto":
        perturb = PERTURB[method]
    if perturb not in SCALE_AND_SCHEDULE:
        raise ValueError(f"stn_ext: perturb must be 'auto', 'example' or 'batch', got {perturb!r}")
    sigma_0, auto_schedule = SCALE_AND_SCHEDULE[perturb]
    return perturb, (sigma_0 if scale_init == -1 else scale_init), (auto_schedule if schedule == "auto" else schedule)


__all__ = ["resolve", "PERTURB", "SCALE_AND_SCHEDULE"]
