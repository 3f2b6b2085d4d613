"""The STN / Delta-STN algorithm as steps for any training loop (``Tuner``); ``stn_ext.trainer`` runs its own
loop on it.

A Tuner owns the hyperparameters (unconstrained u, perturbation scales sigma = softplus(h)), their Adam
optimiser and schedule, and the rules of each step; the user owns the model, the data, the loss and the
weights' optimiser (any torch.optim optimiser)::

    tuner = Tuner(model, space, torch.optim.AdamW(model.parameters()), F.cross_entropy, total_steps=3000)
    for x, y in train_loader:
        tuner.weight_step(x, y)
        for _ in range(tuner.hyper_steps_due()):
            tuner.hyper_step(*next(val_batches))
    with tuner.evaluating():
        logits = model(x_test)

Method rules (MacKay et al. 2019; Bae & Grosse 2020):

stn         Weight step: u~ = u + sigma (.) eps, the regularisers use value(u~), the hypernet sees
            z = u~ - anchor, all weights step on the training loss. Evaluation at z = u - anchor.
delta-stn   General step: W_e, b_e (and non-STN parameters) at z = 0 with the regularisers at u; response
            step: V, C, W_h, b_h at z = sigma eps with the regularisers at u~, optionally on the linearised
            network. Evaluation at z = 0.
fixed       plain training at the initial hyperparameters (z = 0).

Hyper step (both tuned methods; eval mode: no dropout, augmentation or noise): the validation loss at the
perturbed u~ minus tau * entropy(sigma), gradients reaching u and h only through the hypernet response; every
``hyper_plain_every``-th one at u itself, stepping u alone (its gradient carries no perturbation noise).
"""
import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn

import stn_ext
from stn_ext.tuning import augment, defaults, models, options, response_steps, tuner_state
from stn_ext._messages import count
from stn_ext.tuning.augment import BatchRandom
from stn_ext.tuning.divergence import StepChecks
from stn_ext.tuning.response_baseline import ResponseBaseline
from stn_ext.tuning.space import LANGUAGE_KINDS

TUNED = ("stn", "delta-stn")
METHODS = TUNED + ("fixed",)


def inv_softplus(y):
    return y + math.log(-math.expm1(-y))


def inv_softplus_t(y):
    return y + torch.log(-torch.expm1(-y))


class Tuner:
    """The hyperparameters of ``model`` and the steps that train them with its weights.

    model       an nn.Module built on StnLinear/StnConv2d (``stn_ext.convert``), n_hyper = len(space), with
                ``stn_ext.tuning.models.HyperDropout`` slots for tuned dropout rates.
    space       a ``stn_ext.tuning.space.HyperSpace`` (``HyperSpace.build(("dropout", "weight_decay"), slots)``).
    optimizer   the weights' optimiser over ``model.parameters()``, any torch.optim optimiser. Delta-STN
                steps it twice per weight step, each time with the other group's gradients set to None
                (which torch's optimisers skip); once where its response is fitted by difference.
    loss_fn     loss_fn(output, target): a scalar (the batch mean) or per-example losses (shape (B,): needed to weigh
                examples in Delta-STN's per-example difference, response_steps.example_weights).
    total_steps the run's weight steps: sets the warm-up (a tenth) and the hyper learning-rate schedule;
                None: no warm-up unless given, a constant hyper learning rate.

    The options are TrainConfig's (docs/trainer.md says why each default is what it is). ``loss_norm`` and
    ``world``/``allreduce`` are for data-parallel runs: losses are summed and divided by ``loss_norm`` (the
    global batch) and gradients summed across ranks by ``allreduce(list_of_tensors)`` (in place).

    check_finite  read each step's loss (a hyper step's: and the gradients of u and the scales) to the host before
                the optimiser steps: a non-finite one is skipped with a warning and counted (``skipped_steps``,
                ``skipped_hyper_steps``); ``max_skipped`` in a row raise ``Diverged``. False: no check, no read.
    guard       ``divergence.Guard()``: snapshots every ``guard.every`` weight steps; an unhealthy step rolls back to
                one, halves the scales, restarts the response, as the trainer does (``divergence.StepChecks``).
    clip        > 0: clip each optimiser step's gradients to this total norm (a language model's 0.25); 0: none.
    full_batch  each batch is the whole training split (the trainer's full-batch runs): ``defaults.response_every``."""

    def __init__(self, model, space, optimizer, loss_fn, method="stn", total_steps=None, *, hyper_lr=0.02,
                 hyper_lr_schedule="auto", hyper_beta2=-1.0, scale_init=-1.0, scale_max=0.0, tau=1e-2,
                 hyper_plain_every=2, train_per_cycle=5, val_per_cycle=1, warmup_steps=-1, perturb="auto",
                 response_init="v", hyper_input="auto", linearize=False, seed=0, loss_norm=None, val_norm=None, world=1,
                 allreduce=None, generator=None, check_finite=True, max_skipped=10, guard=None, response_every=0,
                 response_rows=0.0, clip=0.0, response_gain_max=4.0, response_baseline=0.9, response_fit="auto",
                 full_batch=False):
        if method not in METHODS:
            raise ValueError(f"stn_ext: unknown method {method!r}; expected one of {METHODS}")
        options.check(total_steps=total_steps, hyper_lr=hyper_lr, hyper_lr_schedule=hyper_lr_schedule,
                      hyper_beta2=hyper_beta2, scale_init=scale_init, scale_max=scale_max, tau=tau, clip=clip,
                      hyper_plain_every=hyper_plain_every, train_per_cycle=train_per_cycle,
                      val_per_cycle=val_per_cycle, warmup_steps=warmup_steps, perturb=perturb,
                      response_init=response_init, hyper_input=hyper_input, response_gain_max=response_gain_max,
                      response_baseline=response_baseline, response_fit=response_fit)
        asked = (hyper_lr_schedule, hyper_beta2)  # resolved with scale_init once the response's fit is
        perturb = defaults.resolve(method, perturb)[0]  # 'auto': stn_ext.tuning.defaults
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"stn_ext: optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        self.model, self.space, self.opt_w, self.loss_fn, self.method = model, space, optimizer, loss_fn, method
        self.layers = models.stn_layers(model)
        if not self.layers:
            raise ValueError("stn_ext: the model has no StnLinear/StnConv2d layers (use stn_ext.convert)")
        p0 = next(model.parameters())
        dt, device = p0.dtype, p0.device
        self.response_seed = seed + 104729 if response_init == "v" and method in TUNED else None
        n = len(space)
        if any(m.n_hyper != n for m in self.layers):
            raise ValueError(f"stn_ext: the model's STN layers have n_hyper={self.layers[0].n_hyper} but the space "
                             f"tunes {count(n, 'hyperparameter')} ({space.names})")
        self.response_params = []
        for m in self.layers:
            self.response_params += [p for p in (m.weight_hyper, m.hyper_weight, m.bias_hyper, m.hyper_bias) if p is not None]
        ids = self._response_ids = {id(p) for p in self.response_params}
        self.general_params = [p for p in model.parameters() if id(p) not in ids]
        self.params = list(model.parameters())
        owned = {id(p) for g in optimizer.param_groups for p in g["params"]}
        missing = [p for p in self.params if id(p) not in owned]
        if missing:
            raise ValueError(f"stn_ext: the optimizer does not hold {count(len(missing), 'parameter')} of the model; "
                             "build it over model.parameters() after stn_ext.convert")

        # STN input z = u~ - anchor. Which coordinates follow u (recentred after each hyper step); the others stay at
        # u itself ("init") or the range's centre in u. A held one's z is 0 either way; the fit's rule skips it
        follow = [h.held or hyper_input == "recentred" or (hyper_input == "auto" and h.transform != "logit")
                  for h in space.hypers]
        self.response_fit = defaults.response_fit(response_fit, method, perturb, space.tuned_kinds(), linearize,
                                                  defaults.response_rows(response_rows), all(follow))
        scale_init, self.hyper_lr_schedule, hyper_beta2 = defaults.resolve(method, perturb, scale_init, *asked,
                                                                           fit=self.response_fit)[1:]
        self.difference_pace, self.near_one, self.path_cap = defaults.difference_settings(
            method, perturb, self.response_fit, space.tuned_kinds())
        self.u = nn.Parameter(space.init_unconstrained(dt, device))
        self.hscale = nn.Parameter(torch.full((n,), inv_softplus(scale_init), dtype=dt, device=device))
        self.scale_init, self.sigma_max = scale_init, scale_max or scale_init
        self.sigma_max0 = self.sigma_max  # where the cap grows back to after a roll-back
        self.hyper_lr, self.plain_every = hyper_lr, hyper_plain_every
        self.hyper_lr_factor = 1.0  # halved by recoveries from a divergence (stn_ext.trainer)
        self.train_per_cycle, self.val_per_cycle, self.perturb, self.linearize = train_per_cycle, val_per_cycle, perturb, linearize
        self.response_rows = defaults.response_rows(response_rows)
        self.total_steps, self.clip, self.response_gain_max = total_steps, clip, response_gain_max
        self.warmup = warmup_steps if warmup_steps >= 0 else (total_steps // 10 if total_steps else 0)
        self.tau = tau if tau >= 0 else 1e-2  # -1: the 'auto' of older configs
        self.u_lo, self.u_hi = space.u_limits(dt, device)
        self.follow, self.tuned = torch.tensor(follow, dtype=dt, device=device), self.u_lo < self.u_hi
        self._recentres = method == "stn" and any(follow)
        self.response_every = defaults.response_every(response_every, method, perturb, self.response_fit, full_batch)
        # the running baseline; the finite-difference fit subtracts the same batch's gradient at u instead
        self.baseline = ResponseBaseline(self.layers, response_baseline) if method in TUNED and perturb == "batch" \
            and response_baseline > 0 and self.response_fit == "gradient" else None  # None: off
        self._elementary = [t for m in self.layers for t in (m.weight_elem, m.bias_elem) if t is not None]
        # A floor under V's rows where the input is centred (Delta-STN, STN recentred on every coordinate): |V| sets the
        # response's pace alone there; at STN's fixed anchors also the path's share of the step ("A floor", trainer.md).
        self.row_floor = models.ROW_FLOOR if method == "delta-stn" or all(follow) else 0.0
        if self.response_seed is not None:
            models.start_response(self.layers, self.response_seed, self.row_floor, near_one=self.near_one)
        self.anchor = self.u.detach().clone() if hyper_input == "init" else \
            torch.where(self.follow.bool(), self.u.detach(), space.u_centre(dt, device))
        self.opt_h = torch.optim.Adam([self.u, self.hscale], lr=hyper_lr, betas=(0.9, hyper_beta2))
        self._cache = {}  # _while_unchanged
        self.gen = generator if generator is not None else torch.Generator(device=device).manual_seed(seed + 7919)
        self.loss_norm, self.val_norm, self.world, self.allreduce = loss_norm, val_norm, world, allreduce
        self.i_wd, self.i_noise, self.i_shift = space.index("weight_decay"), space.index("noise"), space.index("shift")
        self.i_cut_len, self.i_cut_holes = space.index("cutout_length"), space.index("cutout_holes")
        self.drop = {h.slot: i for i, h in enumerate(space.hypers) if h.kind == "dropout"}
        slots = stn_ext.dropout_slots(model)
        if unused := [s for s in self.drop if s not in slots]:
            raise ValueError(f"stn_ext: the model has no dropout slot {unused}; its slots: {slots}")
        consumed = getattr(model, "hyper_kinds", ())
        ignored = [h.name for h in space.hypers if h.kind in LANGUAGE_KINDS and h.kind not in consumed]
        if ignored:
            raise ValueError(f"stn_ext: hyperparameters {ignored} regularise a language model "
                             "(stn_ext.tuning.language.LanguageModel); this model would ignore them")
        self.per_batch = torch.tensor([h.per_batch for h in space.hypers], device=device)
        self.total_hyper_steps = sum(self._hyper_steps_after(t) for t in range(1, total_steps + 1)) if total_steps else 0
        self.step, self.hstep = 0, 0  # weight steps and hyper steps done (skipped ones included)
        if guard is not None and not check_finite:
            raise ValueError("stn_ext: a guard needs check_finite=True (it reads each step's loss)")
        self.checks = StepChecks(self, max_skipped, guard) if check_finite else None

    skipped_steps = property(lambda self: self.checks.skipped["weight"] if self.checks else 0)
    skipped_hyper_steps = property(lambda self: self.checks.skipped["hyper"] if self.checks else 0)
    rollbacks = property(lambda self: self.checks.rollbacks if self.checks else 0)
    # --- schedule -------------------------------------------------------------------------------------
    tunes = property(lambda self: self.method in TUNED)

    def _hyper_steps_after(self, t):
        """Hyper steps taken right after weight step number t (1-based)."""
        if not self.tunes or t <= self.warmup or (t - self.warmup) % self.train_per_cycle:
            return 0
        return self.val_per_cycle

    def hyper_steps_due(self):
        """How many hyper steps are due now, after the weight steps done (0 during the warm-up)."""
        return self._hyper_steps_after(self.step)

    def response_on(self):
        """The response trains after the warm-up: fitted to unconverged weights (the weight decay penalty
        couples it to W_e) it learns a wrong direction that then decays only at sigma^2 times the weights' pace."""
        return self.step >= self.warmup

    def response_due(self):
        """A step that trains the response: every k-th, STN's per example every one (response_gain; docs/trainer.md)."""
        every = 1 if self.method == "stn" and self.perturb == "example" else self.response_every
        return self.response_on() and self.step % every == 0

    def current_hyper_lr(self):
        T, lr = self.total_hyper_steps, self.hyper_lr * self.hyper_lr_factor
        schedule = self.hyper_lr_schedule
        if schedule == "constant" or T == 0:
            return lr
        if schedule == "tail":
            t = max(0.0, 2 * min(self.hstep, T) / T - 1)
            return lr * 0.5 * (1 + math.cos(math.pi * t))
        return lr * 0.5 * (1 + math.cos(math.pi * min(self.hstep, T) / T))

    def response_gain(self):
        """Factor on the response's gradients (0-d): sigma_0^2 / mean(sigma^2) of the tuned (not the held) in [1,
        response_gain_max] (sigma_0 halved by a roll-back), as it learns at sigma^2 times the weights' pace; per batch,
        times k where it steps after every k-th weight step (Delta-STN's, STN's by difference): its pace per weight step."""
        ref = self.scale_init * (self.sigma_max / self.sigma_max0 if math.isfinite(self.sigma_max0) else 1.0)
        pace = self.response_every if self.perturb == "batch" and (self.method == "delta-stn" or self.response_fit == "difference") else 1
        sq = F.softplus(self.hscale.detach()).square()[self.tuned if self.tuned.any() else slice(None)]
        return (ref * ref / sq.mean()).clamp(1.0, self.response_gain_max) * pace

    @property
    def h_max(self):
        """The cap on hscale that keeps sigma = softplus(hscale) under sigma_max."""
        return inv_softplus(self.sigma_max) if math.isfinite(self.sigma_max) else math.inf

    # --- pieces of a step -----------------------------------------------------------------------------

    def z(self, u_tilde, centred):
        """Hypernet input for unconstrained hyperparameters u_tilde ((n,) or (B, n))."""
        return u_tilde - (self.u.detach() if centred else self.anchor)

    def named(self, vals):
        return {h.name: vals[..., i] for i, h in enumerate(self.space.hypers)}

    def regularise(self, x, vals, rnd):
        """Apply augmentations to x and return dropout rates, from values (n,) or (B, n)."""
        col = lambda i: vals[..., i]  # noqa: E731
        if self.i_shift:
            x = augment.random_shift(x, col(self.i_shift[0]), rnd)
        if self.i_cut_len or self.i_cut_holes:
            length = col(self.i_cut_len[0]) if self.i_cut_len else 4.0
            holes = col(self.i_cut_holes[0]) if self.i_cut_holes else 1.0
            max_holes = self.space.hypers[self.i_cut_holes[0]].high if self.i_cut_holes else 1
            x = augment.cutout(x, length, holes, rnd, max_holes=math.floor(max_holes))
        if self.i_noise:
            x = augment.gaussian_noise(x, col(self.i_noise[0]), rnd)
        rates = {slot: col(i) for slot, i in self.drop.items()}
        return x, rates

    def l2(self, z, linear=False):
        """Squared norm of the effective weights W(z) of every STN layer: (B,) for z (B, n), else scalar.
        Row r of W(z) is W_e,r + s_r W_h,r with s = z V^T, so ||W||^2 = sum_r A_r + 2 s_r B_r + s_r^2 C_r.
        ``linear``: its part linear in z alone, sum_r 2 s_r B_r (d/da ||W(a z)||^2 at a = 0)."""
        total = 0
        for m in self.layers:
            we, wh = m.gate_rows(m.weight_elem), m.gate_rows(m.weight_hyper)
            if z is None:  # the elementary weights (s = 0: the same sum, bit for bit)
                total = total + (we * we).sum(1).sum(-1)
                continue
            b, s = (we * wh).sum(1), z @ m.hyper_weight.t()
            part = 2 * s * b if linear else (we * we).sum(1) + 2 * s * b + s * s * (wh * wh).sum(1)
            total = total + part.sum(-1)
        return total

    @staticmethod
    def input_context(z):
        """The block in which the model sees hypernet input z; None: the elementary layers alone (z = 0 without
        the hypernet path)."""
        return stn_ext.elementary() if z is None else stn_ext.hyper_input(z)

    def forward(self, x, z, linearised=False):
        if not linearised:
            with self.input_context(z):
                return self.model(x)
        y0, ydot = models.linearised(self.model, x, z)
        return y0 if ydot is None else y0 + ydot

    def _reduce(self, out, y, norm, weights=None):
        """(scalar loss to differentiate, what to report: per-example losses or the scalar, detached)."""
        ell = self.loss_fn(out, y)
        if ell.dim() == 0:
            return ell, ell.detach()
        return (ell if weights is None else ell * weights).sum() / (norm or ell.shape[0]), ell.detach()

    def loss(self, x, y, z, vals, linearised=False, norm=None, out=None, weights=None):
        """(training loss with the tuned weight decay, over ``norm``: loss_norm or the batch size; the report).
        ``out``: the model's output for x at z, where the caller ran it; ``weights`` (B,): each example's weight."""
        norm = norm or self.loss_norm
        out = self.forward(x, z, linearised) if out is None else out
        loss, report = self._reduce(out, y, norm, weights)
        penalties = models.take_penalties()  # the model's own (a language model's AR and TAR)
        if self.i_wd:
            penalties.append(0.5 * vals[..., self.i_wd[0]] * self.l2(z))
        for pen in penalties:  # (B,) per example, or one for the batch
            pen = pen if weights is None or not pen.dim() else pen * weights
            loss = loss + (pen.sum() if pen.dim() else pen * x.shape[0]) / (norm or x.shape[0])
        return loss, report

    def _allreduce(self, tensors):
        if self.allreduce is not None:
            self.allreduce(tensors)

    def _gradients(self, loss, params, what="training loss", spike=True, retain_graph=None):
        """loss's gradients for params (summed over ranks) and, with the checks, the problem they find (or None)."""
        grads = torch.autograd.grad(loss, params, retain_graph=retain_graph, allow_unused=True, materialize_grads=True)
        if self.checks is None:
            self._allreduce(grads)
            return grads, None
        return grads, self.checks.weight_problem(loss, grads, what, spike)

    def _apply(self, loss, params, what="training loss", spike=True, d=None):
        """Step the optimiser on loss's gradients; with the checks, not where they find a problem (returned). ``d``:
        the perturbation u~ - u of a step that trains the response, for its control variate (response_baseline.py)."""
        grads, problem = self._gradients(loss, params, what, spike)
        if problem:
            return problem
        self._set_grads(params, grads)
        if self.baseline is not None:  # corrected by the mean of earlier steps' gradients, then this one joins it
            if d is not None:
                self.baseline.correct(d)
            self.baseline.observe()
        if self.clip:
            torch.nn.utils.clip_grad_norm_(params, self.clip)
        if self.response_gain_max > 1:
            gain = self._while_unchanged("response gain", self.hscale, self.response_gain)
            for p in (p for p in params if id(p) in self._response_ids):
                p.grad.mul_(gain)
        self.opt_w.step()
        return None

    def _set_grads(self, params, grads):
        """params' .grad = grads, every other parameter's None (the optimiser steps only params)."""
        for p in self.params:
            p.grad = None
        for p, g in zip(params, grads):
            p.grad = g

    def _eps(self, rnd):
        n = len(self.space)
        if self.perturb != "example":
            return rnd.shared_randn(n)
        eps = rnd.randn(n)
        if self.per_batch.any():  # one draw for the batch where the hyperparameter acts on what it shares
            eps = torch.where(self.per_batch, rnd.shared_randn(n), eps)
        return eps

    def perturbed(self, u, sigma, rnd):
        """u~ = u + sigma (.) eps, kept where the values move (inside the declared range), so the hypernet
        never sees an input whose value the regularisers clamp."""
        return torch.clamp(u + sigma * self._eps(rnd), self.u_lo, self.u_hi)

    def _rnd(self, x, rnd):
        return rnd if rnd is not None else BatchRandom(self.gen, x.shape[0])

    # --- the steps --------------------------------------------------------------------------------------

    def weight_step(self, x, y, rnd=None):
        """One weight step on a training batch; returns the batch's losses (per example where loss_fn gives
        them, else the scalar), detached. ``rnd``: a BatchRandom (data-parallel runs; default: this tuner's
        generator over the batch)."""
        if self.checks:
            self.checks.before()
        rnd = self._rnd(x, rnd)
        self.model.train()
        u = self.u.detach()
        if self.method == "fixed":
            vals = self._while_unchanged("u values", self.u, lambda: self.space.to_values(u))
            xr, rates = self.regularise(x, vals, rnd)
            with models.regularisers(rates, rnd, self.named(vals)):
                loss, report = self.loss(xr, y, None, vals)
            # the elementary network: the hypernet's parameters have no gradient (the optimiser skips them)
            problem = self._apply(loss, self.general_params)
        elif self.method == "stn" and self.response_fit == "difference" and self.response_due():
            report, problem = response_steps.stn_by_difference(self, x, y, u, rnd)
        elif self.method == "stn":
            u_t = self.perturbed(u, F.softplus(self.hscale.detach()), rnd)
            vals = self.space.to_values(u_t)
            xr, rates = self.regularise(x, vals, rnd)
            with models.regularisers(rates, rnd, self.named(vals)):
                loss, report = self.loss(xr, y, self.z(u_t, False), vals)
            on = self.response_on() and self.response_fit != "difference"  # by difference: on due steps alone
            problem = self._apply(loss, self.params if on else self.general_params, d=u_t - u if on else None)
        elif self.response_fit == "difference":
            report, problem = response_steps.general_and_difference(self, x, y, u, rnd)
        else:  # delta-stn: general step at delta = 0, then response step at delta = sigma eps
            vals = self._while_unchanged("u values", self.u, lambda: self.space.to_values(u))
            xr, rates = self.regularise(x, vals, rnd)
            with models.regularisers(rates, rnd, self.named(vals)):
                loss, report = self.loss(xr, y, None, vals)
            problem = self._apply(loss, self.general_params)
            if problem is None and self.response_due():
                problem = self._response_step(x, y, u, rnd)
        self.step += 1
        if self.checks:
            self.checks.after("weight", problem)
        return report

    def _response_step(self, x, y, u, rnd):
        """Delta-STN's response step by the gradient (response_steps.by_gradient); a problem found, or None."""
        return response_steps.by_gradient(self, x, y, u, rnd)

    def hyper_step(self, x, y, rnd=None):
        """One step on u and the perturbation scales (on a plain step: u alone) on a validation batch; returns its
        losses (per example where loss_fn gives them), detached, from the perturbed network (plain: at u)."""
        if not self.tunes:
            raise RuntimeError(f"stn_ext: method {self.method!r} takes no hyper steps")
        if self.checks:
            self.checks.before()
        rnd = self._rnd(x, rnd)
        self.model.eval()
        sigma = F.softplus(self.hscale)
        plain = self.plain_every and self.hstep % self.plain_every == 0  # at u itself: no sigma eps in u's gradient
        u_t = self.u if plain else self.perturbed(self.u, sigma, rnd)
        z = self.z(u_t, self.method == "delta-stn")
        out = self.forward(x, z, self.method == "delta-stn" and self.linearize)
        vloss, report = self._reduce(out, y, self.val_norm)
        entropy = torch.log(sigma * math.sqrt(2 * math.pi * math.e)).sum()
        loss = vloss - self.tau * entropy / self.world
        grads = list(torch.autograd.grad(loss, [self.u, self.hscale]))
        problem = None
        if self.checks is None:
            self._allreduce(grads)
        else:
            problem = self.checks.hyper_problem(loss, grads)
        if problem is None:
            self.u.grad, self.hscale.grad = grads[0], None if plain else grads[1]  # Adam skips a None
            for g in self.opt_h.param_groups:
                g["lr"] = self.current_hyper_lr()
            self.opt_h.step()
            with torch.no_grad():  # projection: u stays where its value moves, sigma under its cap
                self.u.clamp_(self.u_lo, self.u_hi)
                self.hscale.clamp_(max=self.h_max)
            if self._recentres:
                self._recentre()
        self.hstep += 1
        self.model.train()
        if self.checks:
            self.checks.after("hyper", problem)
        return report

    @torch.no_grad()
    def _recentre(self):
        """Move the STN anchor to u without changing the network at any input: W(z) = W_e + (V z) W_h with
        z = u~ - anchor, so W_e += (V shift) (.)row W_h and b_e += (C shift) (.) b_h for shift = u - anchor.
        A fixed anchor far from u makes intercept and slope nearly collinear in z (slow, lagging fits)."""
        shift = (self.u.detach() - self.anchor) * self.follow
        for m in self.layers:
            weight, bias = m.path(shift)
            m.weight_elem.add_(weight)
            if bias is not None:
                m.bias_elem.add_(bias)
        self.anchor.add_(shift)

    def scale_perturbation(self, factor, sigma_max):
        """Cap the scales at ``sigma_max`` and set sigma <- min(sigma * factor, the cap) (divergence.restart, .regrow)."""
        self.sigma_max = sigma_max
        with torch.no_grad():
            self.hscale.copy_(inv_softplus_t(torch.minimum(F.softplus(self.hscale) * factor,
                                                             torch.full_like(self.hscale, sigma_max))))

    # --- evaluation and state -----------------------------------------------------------------------------

    def eval_input(self):
        """Hypernet input at evaluation: the current u (STN); None, the elementary network (Delta-STN, fixed)."""
        if self.method == "stn":
            return self.z(self.u.detach(), False)
        return None

    @contextlib.contextmanager
    def evaluating(self):
        """The model in eval mode with the hypernet input of evaluation, for the user's own evaluation code."""
        was = self.model.training
        self.model.eval()
        try:
            with self.input_context(self.eval_input()):
                yield self.model
        finally:
            self.model.train(was)

    def _while_unchanged(self, name, t, fn):
        """fn(), recomputed only when tensor t has changed in place since (its version counter): u and the
        scales are read at every weight step and for every log record, but change only at hyper steps."""
        key = (t._version, t.data_ptr())
        hit = self._cache.get(name)
        if hit is None or hit[0] != key:
            hit = self._cache[name] = (key, fn())
        return hit[1]

    def hyperparameters(self):
        """The current values, {name: float}."""
        return dict(self._while_unchanged("values", self.u, lambda: self.space.as_dict(self.u)))

    def sigmas(self):
        """The current perturbation scales, {name: float}."""
        return dict(self._while_unchanged("sigmas", self.hscale, lambda: dict(
            zip(self.space.names, F.softplus(self.hscale.detach()).cpu().tolist()))))

    def scalars(self):
        """{"hyper/<name>": value, "sigma/<name>": scale} for a logger (e.g. SummaryWriter.add_scalar per item)."""
        out = {f"hyper/{k}": v for k, v in self.hyperparameters().items()}
        if self.tunes:
            out.update({f"sigma/{k}": v for k, v in self.sigmas().items()})
        return out

    def state_dict(self):
        """Everything the tuner holds but the model's weights and the user's optimiser (which have their own)."""
        st = tuner_state.capture(self)
        if self.checks:
            st["checks"] = self.checks.state_dict()  # skipped steps and roll-backs (states before them: none)
        return st

    def load_state_dict(self, st, generator=True):
        """Restore ``state_dict()``; ``generator=False`` leaves the random generator alone (the caller sets it).
        The guard's snapshots (``guard=``) are dropped: the next step takes one of the state restored."""
        self._load_state(st, generator)
        if self.checks:
            self.checks.load_state_dict(st.get("checks"))

    def _load_state(self, st, generator=True):
        tuner_state.restore(self, st, generator)


__all__ = ["Tuner", "METHODS", "TUNED"]
