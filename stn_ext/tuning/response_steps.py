"""The response's steps (Delta-STN's, and STN's fitted by difference), taken for a Tuner ``t``: by the gradient at
delta = sigma eps (the papers'), or by finite difference (response_fit 'difference', docs/trainer.md "The response by
finite difference"): the gradient at delta = d less the gradient at delta = 0 along the path, at the same weights and
noise draws, over (d / sigma)^2."""
import contextlib

import torch
import torch.nn.functional as F

from stn_ext.tuning import augment, defaults, models
from stn_ext.tuning.response_baseline import subtract_along_path


def by_gradient(t, x, y, u, rnd):
    """Delta-STN's response step at delta = sigma eps, on ``response_rows`` of the batch's rows, spread evenly
    (their random draws, the loss normalised over them); a problem found, or None."""
    rows, whole = torch.arange(x.shape[0]), rnd.global_batch
    if t.response_rows < 1:
        rows, rnd = rnd.pick(t.response_rows)
        x, y = x[rows.to(x.device)], y[rows.to(y.device)]
    norm = t.loss_norm * rnd.global_batch / whole if t.loss_norm else None
    u_t = t.perturbed(u, F.softplus(t.hscale.detach()), rnd)
    vals = t.space.to_values(u_t)
    xr, rates = t.regularise(x, vals, rnd)
    with models.regularisers(rates, rnd, t.named(vals)), models.side_run(rows):
        rloss, _ = t.loss(xr, y, t.z(u_t, True), vals, linearised=t.linearize, norm=norm)
    return t._apply(rloss, t.response_params, "response step's training loss (after its general step, which was "
                    "taken)", spike=False, d=u_t - u)


def general_and_difference(t, x, y, u, rnd):
    """Delta-STN's general step and, every response_every-th step, its response fitted by finite difference
    (response_fit 'difference', docs/trainer.md "The response by finite difference"): the response's gradients
    at delta = d = sigma eps, taken at the same weights and with the same random draws as the general step's at
    delta = 0, less the general step's gradient along the path (response_baseline.subtract_along_path), so that
    what is left is d times the change of the weights' gradient over d: (V d)^2 (H J + d grad / du) to first
    order, H the training loss's curvature, J = V (.) W_h the response. Divided by (d / sigma)^2 and times
    DIFFERENCE_PACE times the response's gain over sigma^2, J steps at that pace times the gain relative to the
    weights, deterministically (a forward-mode step on the weights' own trajectory), where the gradient's
    steps at sigma^2 times it. One optimiser step for both; (the batch's losses, a problem or None)."""
    due = t.response_due()
    if due and t.perturb == "example":
        return _general_and_difference_per_example(t, x, y, u, rnd)
    vals = t._while_unchanged("u values", t.u, lambda: t.space.to_values(u))
    with augment.recording(rnd) if due else contextlib.nullcontext() as draws:
        xr, rates = t.regularise(x, vals, rnd)
        with models.regularisers(rates, rnd, t.named(vals)):
            loss, report = t.loss(xr, y, None, vals)
    grads, problem = t._gradients(loss, t.general_params)
    if problem:
        return report, problem
    response = None
    if due:
        sigma = F.softplus(t.hscale.detach())
        u_t = t.perturbed(u, sigma, rnd)
        rloss = _replayed_loss(t, x, y, u_t, t.z(u_t, True), rnd, draws)  # the general step's draws, at u~
        at_d, problem = t._gradients(rloss, t.response_params, "response step's training loss (its general step "
                                     "was taken)", spike=False)
        if problem is None:
            by_id = {id(p): g for p, g in zip(t.general_params, grads)}
            response = difference(t, at_d, [by_id[id(e)] for e in t._elementary], (u_t - u).detach(), sigma)
    _step(t, grads, response)
    return report, problem


def _general_and_difference_per_example(t, x, y, u, rnd):
    """``general_and_difference`` with one perturbation d_i per example: the general step's pass at delta = 0
    carries the tangent along each example's path (``_at_u_with_tangent``), whose control variate's gradient is
    subtracted from the response's at delta = d. Both count example i at ``example_weights``' 1 / (d_i / sigma)^2,
    so that each example's difference, about (V d_i)^2 (H_i J + d g_i / du), enters at the same weight whatever its
    draw: on a full batch the response then steps on the batch's curvature, as per batch, where weighted by the
    draws' squares (their mean divided out) it stepped on a noisy mix of the examples' (docs/trainer.md, "Each
    example's difference at its own scale")."""
    sigma = F.softplus(t.hscale.detach())
    u_t = t.perturbed(u, sigma, rnd)
    d = (u_t - u).detach()
    with augment.recording(rnd) as draws:
        loss, report, cv, problem, w = _at_u_with_tangent(t, x, y, u, d, rnd, sigma=sigma)
    if problem:
        return report, problem
    grads, problem = t._gradients(loss, t.general_params)
    if problem:
        return report, problem
    rloss = _replayed_loss(t, x, y, u_t, t.z(u_t, True), rnd, draws, w)  # the general pass's draws, at u~
    at_d, problem = t._gradients(rloss, t.response_params, "response step's training loss (its general step was "
                                 "taken)", spike=False)
    _step(t, grads, None if problem else _scaled(t, [a - c for a, c in zip(at_d, cv)], d, sigma, w))
    return report, problem


def example_weights(d, sigma):
    """Each example's weight in the per-example difference: 1 / (d_i / sigma)^2 (its mean over the hyperparameters),
    the square floored at EXAMPLE_SPREAD_FLOOR so that a draw near 0 does not magnify the float error of its
    difference."""
    return (d / sigma).square().mean(-1).clamp_min(defaults.EXAMPLE_SPREAD_FLOOR).reciprocal()


def _at_u_with_tangent(t, x, y, u, d, rnd, draws=None, sigma=None):
    """(the training loss at u on the elementary weights, its report, the control variate's gradients, a problem the
    checks find in the loss or the control variate, or None, the examples' weights or None): the pass
    carries the tangent along each example's path (V d_i) (.) W_h (models.linearised), and the control variate
    sum_i <g_i(0), path(d_i)>, g_i example i's gradient at delta = 0, is that tangent against the output's gradient
    plus the weight decay's linear part. Its gradients on the response's parameters are sum_i (V d_i) (.) g_i(0) on
    W_h, and so on: what the response's gradient at d has, less the change of the gradient over d. Examples must not
    interact (no batch statistics). ``draws``: a DrawTape to replay (the noise of the step's other pass).
    ``sigma``: example i's share weighted by ``example_weights`` (where the loss is per example; else None)."""
    with _replaying(rnd, draws, x.shape[0]):
        vals = t._while_unchanged("u values", t.u, lambda: t.space.to_values(u))
        xr, rates = t.regularise(x, vals, rnd)
        with models.regularisers(rates, rnd, t.named(vals)):
            out, tangent = models.linearised(t.model, xr, d)
            loss, report = t.loss(xr, y, None, vals, out=out)
    w = example_weights(d, sigma) if sigma is not None and report.dim() else None
    (d_out,) = torch.autograd.grad(loss, out, retain_graph=True)
    along = (d_out * tangent if w is None else d_out * tangent * w.view(-1, *[1] * (out.dim() - 1))).sum()
    if t.i_wd:  # d/da of the penalty 0.5 wd ||W(a d_i)||^2 per example at a = 0, over the loss's norm
        lin = t.l2(d, linear=True) * (1 if w is None else w)
        along = along + 0.5 * vals[t.i_wd[0]] * lin.sum() / (t.loss_norm or x.shape[0])
    # checked with the loss at u, which STN's step has no other check of (its gradients are the control variate's)
    cv, problem = t._gradients(loss.detach() + along, t.response_params, "training loss at u with its tangent (the "
                               "response by difference)", spike=False, retain_graph=True)
    return loss, report, cv, problem, w


def stn_by_difference(t, x, y, u, rnd):
    """STN's weight step with its response fitted by difference (response_fit 'difference': one perturbation per
    batch, the input recentred on every coordinate, so z = 0 at u). Every weight's gradient at u~ = u + d, as
    STN's step takes them, then one more pass at u with the same draws, whose gradient on W_e and b_e is what
    the response's is taken the difference from (``difference``): about twice the work of STN's step. Per example
    with per-example losses, each example's difference weighed (``_stn_per_example_weighted``). One optimiser
    step; (the batch's losses, a problem or None)."""
    sigma = F.softplus(t.hscale.detach())
    u_t = t.perturbed(u, sigma, rnd)
    z, d = t.z(u_t, False), (u_t - u).detach()
    vals = t.space.to_values(u_t)
    with augment.recording(rnd) as draws:
        xr, rates = t.regularise(x, vals, rnd)
        with models.regularisers(rates, rnd, t.named(vals)):
            out = t.forward(xr, z)
            loss, report = t.loss(xr, y, z, vals, out=out)
    if t.perturb == "example" and report.dim():
        return report, _stn_per_example_weighted(t, (x, y, xr, z, vals, out), loss, u, d, sigma, rnd, draws)
    grads, problem = t._gradients(loss, t.params)
    if problem:
        return report, problem
    by_id = {id(p): g for p, g in zip(t.params, grads)}
    at_d = [by_id[id(p)] for p in t.response_params]
    if t.perturb == "example":  # the pass at u with the perturbed pass's draws, carrying each example's tangent
        cv, problem = _at_u_with_tangent(t, x, y, u, d, rnd, draws)[2:4]
        if problem:
            return report, problem
        response = _scaled(t, [a - c for a, c in zip(at_d, cv)], d, sigma)
    else:
        loss0 = _replayed_loss(t, x, y, u, t.z(u, False), rnd, draws)  # the perturbed pass's draws, at u
        at_u, problem = t._gradients(loss0, t._elementary, "training loss at u (STN's response by difference)",
                                     spike=False)
        if problem:
            return report, problem
        response = difference(t, at_d, at_u, d, sigma)
    _step(t, [by_id[id(p)] for p in t.general_params], response)
    return report, None


def _stn_per_example_weighted(t, batch, loss, u, d, sigma, rnd, draws):
    """STN's step per example by difference with per-example losses: the general parameters on the batch's loss at
    u + d_i as STN's, the response on each example's difference weighed by ``example_weights`` (as Delta-STN's,
    ``_general_and_difference_per_example``). STN's response gradient is its weight step's, so the weighted one
    takes a second backward through the step's graph. ``batch``: (x, y, its regularised input, z, values, the
    model's output at u~). A problem found, or None."""
    x, y, xr, z, vals, out = batch
    general, problem = t._gradients(loss, t.general_params, retain_graph=True)
    if problem:
        return problem
    _, _, cv, problem, w = _at_u_with_tangent(t, x, y, u, d, rnd, draws, sigma=sigma)  # w: example_weights'
    if problem:
        return problem
    at_d, problem = t._gradients(t.loss(xr, y, z, vals, out=out, weights=w)[0], t.response_params,
                                 "training loss at u~, each example weighed (STN's response by difference)",
                                 spike=False)
    if problem:
        return problem
    _step(t, general, _scaled(t, [a - c for a, c in zip(at_d, cv)], d, sigma, w))
    return None


def _replayed_loss(t, x, y, u_at, z, rnd, draws, weights=None):
    """The training loss at u_at (hypernet input z) with the random draws of the DrawTape ``draws`` (the noise of
    the step's other pass), run beside the step's own (models.side_run); the generator is left where it was.
    ``weights``: the examples' (Tuner.loss)."""
    with _replaying(rnd, draws, x.shape[0]):
        vals = t.space.to_values(u_at)
        xr, rates = t.regularise(x, vals, rnd)
        with models.regularisers(rates, rnd, t.named(vals)):
            loss, _ = t.loss(xr, y, z, vals, weights=weights)
    return loss


@contextlib.contextmanager
def _replaying(rnd, draws, rows):
    """A run beside the step's own (models.side_run) with the random draws of the DrawTape ``draws`` (None: the
    step's own run, as it is), on ``rows`` rows: served from the tape where it holds them all as they were, else
    drawn again from the generator's state before the recorded pass; the generator is left where it was."""
    if draws is None:
        yield
        return
    if draws.usable:
        with augment.replaying(rnd, draws), models.side_run(torch.arange(rows)):
            yield
        return
    gen = rnd.generator
    after = gen.get_state()
    gen.set_state(draws.start)
    try:
        with models.side_run(torch.arange(rows)):
            yield
    finally:
        gen.set_state(after)


def _step(t, general, response=None):
    """One optimiser step: the general parameters on ``general``, the response's on ``response`` (None: they do
    not step), each group clipped on its own."""
    params = t.general_params + (t.response_params if response is not None else [])
    t._set_grads(params, list(general) + list(response if response is not None else []))
    if t.clip:
        torch.nn.utils.clip_grad_norm_(t.general_params, t.clip)
        if response is not None:
            torch.nn.utils.clip_grad_norm_(t.response_params, t.clip)
    t.opt_w.step()
    if response is not None and t.path_cap:
        models.cap_path(t.layers, F.softplus(t.hscale.detach()) * t.tuned, t.path_cap)  # a held one is never moved


@torch.no_grad()
def difference(t, response, elementary, d, sigma):
    """The response's gradients at d less the gradient ``elementary`` (W_e's, b_e's at delta = 0, flat) along
    the path at d, over (d / sigma)^2 and times the pace and gain (``general_and_difference``)."""
    for p, g in zip(t.response_params, response):
        p.grad = g
    subtract_along_path(t.layers, elementary, d, None)
    return _scaled(t, [p.grad for p in t.response_params], d, sigma)


def _scaled(t, diffs, d, sigma, weights=None):
    """The response's differences (in place) over (d / sigma)^2, times the pace and gain over sigma^2. Per example
    (d of shape (B, n)) its mean over the global batch: the ranks of a data-parallel run hold other rows, and each
    must scale the summed gradients alike. ``weights``: the examples' (``example_weights``), each example's square
    times its weight (1 unless floored)."""
    sq = (d / sigma).square()
    if weights is not None:
        sq = sq.mean(-1) * weights
    spread = sq.mean()
    if d.dim() == 2 and t.allreduce is not None:
        sums = torch.stack([sq.sum(), sq.new_tensor(float(sq.numel()))])
        t._allreduce([sums])
        spread = sums[0] / sums[1]
    spread = spread.clamp_min(torch.finfo(d.dtype).tiny)
    scale = t.difference_pace * t.response_gain() / sigma.square().mean() / spread
    return [g.mul_(scale) for g in diffs]


__all__ = ["by_gradient", "general_and_difference", "stn_by_difference", "difference", "example_weights"]
