"""The tuner's per-method defaults: what an 'auto' setting (perturbation mode, initial scale sigma_0, hyper
learning-rate schedule) becomes. Chosen by measurement; docs/trainer.md ("Defaults, and how they were chosen")
gives the numbers.

Perturbation mode, by method: one per batch for both tuned methods. Per example (the papers' mode) did better
for Delta-STN's dropout rates on real data (Fashion-MNIST 4 seeds 0.4152 against 0.4219 per batch, fixed 0.4228;
inside the seed spread), but on a family of eight ridge problems with a closed-form optimal weight decay
(bench_tuning.py --only ridge-family) 23 of its 32 runs (both methods, both sides) ended outside 0.10 log units of
the optimum, six of them 1.0-5.5 away; per batch 8 of 32 ended outside 0.05, at most 0.191 away. One
perturbation per batch is also the fused one-GEMM path (per example does about twice a plain layer's GEMM
work). The table keeps the choice per method.

sigma_0, schedule and the hyper optimiser's beta2, by mode: per batch 0.3, 'tail' (constant, then cosine over the
last half) and 0.95; per example 0.5, cosine and 0.99. One perturbation per batch scales the curvature of every
weight at once (a weight decay by e^(sigma eps)), so momentum SGD goes unstable well below its fixed limit at 0.5;
per example the batch averages the perturbations and 0.5 learns the response faster. A noisier per-example
hypergradient needs the earlier decay and the longer memory to settle; per batch, a far start's hypergradient
shrinks as u arrives, and Adam's second moment must follow it down (ridge families: 214 of 256 runs within 0.05
with 0.95 against 190 with 0.99). With the response fitted by difference, the schedule and beta2 are the per-batch
ones in either mode, and STN's sigma_0 per example is smaller (STN_EXAMPLE_DIFFERENCE_SCALE).
"""
from stn_ext.tuning import options
from stn_ext.tuning.space import LANGUAGE_KINDS

PERTURB = {"stn": "batch", "delta-stn": "batch", "fixed": "batch"}

# Delta-STN's response step after every 2nd general step: on digits (interleaved rounds, per batch) 1.83x fixed's
# time per weight step against 2.37x after every one; quality inside the seed spread (digits best val 0.0777
# against 0.0748, 3 seeds; Fashion-MNIST MLP test loss 0.4109 against 0.4237, 2 seeds; ridge per batch within
# 0.018 of the optimum, 3 seeds from both sides). Per batch its gradients count twice on those steps
# (Tuner.response_gain), so that it learns at the pace per weight step of a response stepped after each
RESPONSE_EVERY = 2
# ... except per batch by difference, after every weight step for Delta-STN, and for STN where the batch is the whole
# training split: the response pass then samples the difference every step, where every 2nd step at twice the pace
# left runs from far above short or past the optimum, its direction stale (ridge families: docs/trainer.md,
# "Delta-STN's response by difference after every step" and "STN's response by difference after every full batch").
# On minibatches STN keeps every 2nd: with its second pass every step cost 3.18x fixed's time per step against 2.42x
# and was worse on Fashion-MNIST with weight decay and noise on 6 of 10 seeds ("Where issue 22 stands")
RESPONSE_EVERY_DIFFERENCE = 1


def response_every(k, method="delta-stn", perturb="batch", fit="gradient", full_batch=False):
    """Delta-STN's response step (per batch, STN's by difference too) after every k-th weight step; 0 is the
    default: RESPONSE_EVERY, or RESPONSE_EVERY_DIFFERENCE per batch by difference for Delta-STN, and for STN where
    ``full_batch`` (each batch the whole training split)."""
    if k < 0:
        raise ValueError(f"stn_ext: response_every must be >= 1 (or 0: the default), got {k}")
    if k:
        return k
    every_step = perturb == "batch" and fit == "difference" and (method == "delta-stn" or full_batch)
    return RESPONSE_EVERY_DIFFERENCE if every_step else RESPONSE_EVERY


# Delta-STN's response step on this part of the batch's rows (spread evenly): 1.0, the whole batch (see
# docs/trainer.md for what a half measured)
RESPONSE_ROWS = 1.0


def response_rows(f):
    """The part of the batch Delta-STN's response step runs on; 0 is the default."""
    if not 0 <= f <= 1:
        raise ValueError(f"stn_ext: response_rows must be in (0, 1] (or 0: the default, {RESPONSE_ROWS}), got {f}")
    return f or RESPONSE_ROWS


# Delta-STN's response fit, per batch. 'gradient': the training loss's gradient at delta = sigma eps (the paper's),
# which moves the response J at sigma^2 times the weights' pace, noisily. 'difference': that gradient less the
# general step's along the response's path, at the same weights and draws, over (delta / sigma)^2: J then steps at
# DIFFERENCE_PACE times the weights' pace (times the response's gain, Tuner.response_gain), as forward mode does,
# with its noise taken out (response_steps.general_and_difference). 'auto' takes it where every tuned
# hyperparameter acts smoothly on the loss (and for Delta-STN per batch whatever it tunes: below). Ridge families
# 22-27 (weight decay, per batch, 3 seeds, both sides): Delta-STN's runs within 0.05 of the optimum 280 of 288 against
# 254, no roll-back; at pace 1 also 280 but 13 roll-backs and one run stopped (the response's step at the perturbed
# weight decay's curvature, far above, beyond the weights' stability limit). Where a rate draws masks (dropout,
# cutout, shift) a change of delta flips some of them, a jump the difference does not take out: on the Fashion-MNIST
# MLP's dropout at pace 1 it diverged after the warm-up on both seeds (docs/trainer.md, "The response by finite
# difference")
SMOOTH_KINDS = ("weight_decay", "noise", "ar", "tar")
DIFFERENCE_PACE = 0.5
# ... and Delta-STN per batch takes it where a tuned rate draws masks too (not on a language model's space:
# _masked_difference), with the response started near V = 1 (every
# rate's response alike: W_h = b_h = 0, V, C = 1 + N(0, 0.01)), at a fifth of that pace, and each gate's path at one
# sigma kept within PATH_CAP of its weights' row (models.cap_path). Fashion-MNIST MLP test loss 0.4000 over 12 seeds
# (fixed 0.4215, STN 0.3915; by the gradient 0.4172 over 4), the dropout regression's optimum from both sides; the CNN
# protocol 0.5847 over 5 seeds, behind fixed's 0.5676 (by the gradient 0.5941; seeds 0-2 alone 0.5482 against 0.5612);
# without the cap every CNN run rolled back right after a short warm-up, V and W_h running away together. Its runs are
# chaotic: a start changed by one rounding step moves a Fashion-MNIST seed by up to 0.03 (docs/trainer.md, "Delta-STN's
# response where masks are drawn", "The second pass's cost")
MASKED_DIFFERENCE_PACE = 0.1
PATH_CAP = 0.5
# per example, the kinds whose share of each example's gradient the control variate carries (a model's own
# penalties, AR and TAR, are not linearised: response_steps._at_u_with_tangent)
EXAMPLE_SMOOTH_KINDS = ("weight_decay", "noise")
# per example by difference, Delta-STN's response and control-variate passes weigh example i by 1 / (d_i / sigma)^2,
# the square floored here (response_steps.example_weights; docs/trainer.md, "Each example's difference at its own
# scale")
EXAMPLE_SPREAD_FLOOR = 0.01


def response_fit(fit, method, perturb, kinds, linearize, rows, centred=True):
    """'gradient' or 'difference' for a response fit (options.RESPONSE_FITS), method, perturbation mode, the tuned
    hyperparameters' kinds, --linearize, the response step's part of the batch (Delta-STN) and whether STN's input
    is recentred on every coordinate (z = 0 at u, where its difference is taken)."""
    options.check(response_fit=fit)
    eligible = method == "delta-stn" and not linearize and rows == 1 or method == "stn" and centred
    if perturb == "example" and not all(k in EXAMPLE_SMOOTH_KINDS for k in kinds):
        if fit == "difference":
            raise ValueError("stn_ext: response_fit='difference' with one perturbation per example takes "
                             f"{', '.join(EXAMPLE_SMOOTH_KINDS)} only (what its control variate covers); got {kinds}")
        eligible = False
    if fit == "difference" and not eligible:
        raise ValueError("stn_ext: response_fit='difference' takes Delta-STN's response on the whole batch and not "
                         "linearised, or STN's with its input recentred on every coordinate; got "
                         f"method {method!r}, perturb {perturb!r}, response_rows {rows}, linearize {linearize}, "
                         f"recentred {centred}")
    if fit == "auto":
        return "difference" if eligible and (smooth(kinds) or _masked_difference(method, perturb, kinds)) else "gradient"
    return fit


def smooth(kinds):
    """Whether every one of the tuned hyperparameters' ``kinds`` acts smoothly on the loss (SMOOTH_KINDS: none draws
    masks)."""
    return all(k in SMOOTH_KINDS for k in kinds)


def _masked_difference(method, perturb, kinds):
    """Whether 'auto' fits Delta-STN's response by difference where masks are drawn: per batch, and not on a language
    model's space (its kinds: there it ended at test perplexity 239.0 against 213.8 by the gradient, 2 seeds)."""
    return (method, perturb) == ("delta-stn", "batch") and not any(k in LANGUAGE_KINDS for k in kinds)


def difference_settings(method, perturb, fit, kinds):
    """(the response's pace by difference, whether it starts near V = 1, the cap on its path or 0): Delta-STN's per
    batch by difference where a tuned rate draws masks (MASKED_DIFFERENCE_PACE, near 1, PATH_CAP), else
    (DIFFERENCE_PACE, False, 0.0)."""
    if (method, perturb, fit) == ("delta-stn", "batch", "difference") and not smooth(kinds):
        return MASKED_DIFFERENCE_PACE, True, PATH_CAP
    return DIFFERENCE_PACE, False, 0.0


# sigma_0, the hyper learning rate's schedule and Adam's beta2 for u and the scales, by perturbation mode. With the
# response fitted by difference the schedule and beta2 are the per-batch ones in either mode: per example, that fit
# keeps the response's pace, and the cosine schedule and beta2 0.99 chosen for the gradient's fit left u short of the
# optimum from far above (Adam's memory of the large hypergradients there; ridge families 22-27, docs/trainer.md
# "The response by finite difference, per example")
BY_MODE = {"batch": (0.3, "tail", 0.95), "example": (0.5, "cosine", 0.99)}
# ... and STN's sigma_0 per example by difference. STN trains W_e at u + d, so W_e fits the mean of a curved best
# response over the perturbation, off its value at u by about sigma^2 / 2 times the curvature: with each example's
# difference weighed (its noise gone, response_steps._stn_per_example_weighted) that bias showed on ridge families,
# runs from both sides settling at the same point off the optimum (docs/trainer.md, "STN by difference")
STN_EXAMPLE_DIFFERENCE_SCALE = 0.3


def resolve(method, perturb="auto", scale_init=-1.0, schedule="auto", beta2=-1.0, fit="gradient"):
    """(perturb, sigma_0, schedule, beta2) with each 'auto' (-1 for the numbers) replaced by the method's default;
    ``fit``: the response fit resolved (``response_fit``)."""
    options.check(perturb=perturb)
    if perturb == "auto":
        perturb = PERTURB[method]
    sigma_0, auto_schedule, auto_beta2 = BY_MODE[perturb]
    if fit == "difference":
        auto_schedule, auto_beta2 = BY_MODE["batch"][1:]
        if (method, perturb) == ("stn", "example"):
            sigma_0 = STN_EXAMPLE_DIFFERENCE_SCALE
    return (perturb, sigma_0 if scale_init == -1 else scale_init, auto_schedule if schedule == "auto" else schedule,
            auto_beta2 if beta2 == -1 else beta2)


__all__ = ["resolve", "response_every", "response_rows", "response_fit", "smooth", "difference_settings", "RESPONSE_ROWS",
           "PERTURB", "BY_MODE", "RESPONSE_EVERY", "RESPONSE_EVERY_DIFFERENCE", "SMOOTH_KINDS", "EXAMPLE_SMOOTH_KINDS",
           "DIFFERENCE_PACE", "MASKED_DIFFERENCE_PACE", "PATH_CAP", "EXAMPLE_SPREAD_FLOOR",
           "STN_EXAMPLE_DIFFERENCE_SCALE"]
