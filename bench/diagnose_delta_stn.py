"""Why Delta-STN's dropout rates move little, why STN's move, and why ridge runs miss (issue 22): six measurements
(docs/trainer.md, "Why Delta-STN tunes little", "Why STN's rates rise" and "The ridge family's misses"; results in
bench/results/delta-stn-*.md and stn-anchor-*.md).

toy        input dropout on linear regression (stn_ext.tuning.problems.DropoutRegression): the rate a method
           reaches from 0.05 (--init) against the closed-form optimum, and its learned response V W_h against the closed
           form dw/du (cosine, length ratio) over the run.
hypergrad  Fashion-MNIST MLP 784-256-256-10, three dropout rates: the hypergradient of u at every hyper step,
           summarised over six windows (mean, spread, fraction negative). --response-cv: Delta-STN's response step
           with common random numbers and a control variate (response_with_control_variate).
lookahead  after --steps weight steps of a Delta-STN run: the hypergradient through the learned response on the
           whole validation set, against finite differences of plain training continued K steps at u +- h with
           common random numbers (the same batches and uniform draws for the dropout masks).
forward    the long-horizon hypergradient of the same MLP trained plainly: forward mode, Z = d theta / d u carried
           through SGD with momentum from the first step (one extra pass per rate per step, a finite difference of
           the gradient along (Z e_k, e_k) with the step's batch and mask draws). --check K: after K steps at
           constant rates, Z^T grad L_val against central finite differences of training from scratch at u +- h;
           otherwise online (u takes an Adam step along Z^T grad L_val, 5:1, after steps / 10), and --fixed RATE:
           plain training at a constant rate, with the same batches. What the response differs from it in, one at
           a time: --horizon (Z forgets), --pace (Z's step a part of the weights'), --tangent (one rate a step in
           turn, one random direction, the STN layers' row-scaled response), --v-init (that response's start).
anchor     STN on the same MLP with its default hypernet input (raw logits: z = u~ minus the range's centre) and
           with the anchor mirrored about the start (z's sign flipped, its size kept): rates and test loss, and
           each quarter the derivative of the validation loss (all images, eval mode) along the scale of the
           hypernet path P = (V z) (.) W_h (and C z (.) b_h), which is z . dL/dz, against the same along W_e, b_e
           (positive: shrinking that part of the weights lowers the validation loss).
ridge      one run of the ridge family (bench_tuning.py --only ridge-family): the hyper steps' gradient and
           Adam's normaliser sqrt(m2) in windows of 30, and at the end the hypergradient through the learned slope
           V W_h split into its parts along and across the closed-form dw*/du, against the closed form. --every N:
           every N weight steps, the validation gradient at W_e or w*(u) against V W_h or dw*/du (which of the
           weights and the response sets the hypergradient's error), with W_e's and V W_h's errors. --hold OFF: u
           held at u* + OFF (the hyper learning rate 0, so the scales stay too): the mean of u's gradient over the
           plain and the perturbed hyper steps of the run's last two thirds, against the closed form through the
           learned slope and through dw*/du at the same moments (whether the hyper step's gradient is biased
           while the weights train, or only noisy).

    python bench/diagnose_delta_stn.py toy
    python bench/diagnose_delta_stn.py hypergrad --method delta-stn --set perturb=example --set scale_init=1.0
    python bench/diagnose_delta_stn.py hypergrad --response-cv
    python bench/diagnose_delta_stn.py lookahead --steps 2000 --K 100 500 1500
    python bench/diagnose_delta_stn.py forward --check 2000
    python bench/diagnose_delta_stn.py forward --steps 4000 [--fixed 0.05]
    python bench/diagnose_delta_stn.py forward --tangent rows-cycle --pace 0.1 [--v-init normal]
    python bench/diagnose_delta_stn.py toy --only --init 0.6 --seed 1
    python bench/diagnose_delta_stn.py anchor --seed 0
    python bench/diagnose_delta_stn.py ridge --family-seed 23 --instance i1 --side above --steps 3000
    python bench/diagnose_delta_stn.py ridge --family-seed 22 --instance i5 --method stn --seed 2 --every 100
    python bench/diagnose_delta_stn.py ridge --family-seed 26 --instance i4 --method stn --seed 1 --hold 0.05 --steps 6000
"""
import argparse
import ast
import copy
import math

import torch
import torch.nn.functional as F
from torch.func import functional_call

import stn_ext
from stn_ext.tuning import TrainConfig, Trainer
from stn_ext.tuning.augment import BatchRandom
from stn_ext.tuning.divergence import Diverged
from stn_ext.tuning.models import mlp, regularisers
from stn_ext.tuning.problems import DropoutRegression


def toy(a, sets):
    prob = DropoutRegression()
    print(f"closed-form optimal rate {prob.optimum():.3f}; from {a.init}, {a.steps} steps, full batch")
    runs = [(a.method, a.perturb)] if a.only else [(m, q) for m in ("delta-stn", "stn") for q in ("batch", "example")]
    for method, perturb in runs:
        cfg = TrainConfig(method=method, hypers=("dropout",), inits={"dropout": a.init}, steps=a.steps,
                          batch_size=prob.n_train, perturb=perturb, seed=a.seed, quiet=True, **sets)
        torch.manual_seed(a.seed)
        tr = Trainer(cfg, data=prob.dataset(), model=prob.model())
        layer = tr.tuner.layers[0]
        rows = []
        for chunk in range(10):
            tr.cfg.steps = (chunk + 1) * a.steps // 10  # fit() runs to cfg.steps; continue chunk by chunk
            try:
                tr.fit()
            except Diverged as e:
                print(f"{method} per {perturb}: {e}")
                break
            u = float(tr.u.detach())
            learned = (layer.hyper_weight[:, 0:1] * layer.weight_hyper).detach().double().reshape(-1)
            true = prob.response_jacobian(u)
            cos = float(learned @ true / (learned.norm() * true.norm() + 1e-30))
            rows.append((tr.step, prob.rate(u), cos, float(learned.norm() / true.norm())))
        if len(rows) > 1:
            print(f"{method} per {perturb}: " + "; ".join(f"step {s} rate {p:.3f} cos {c:.2f} ratio {r:.2f}"
                                                         for s, p, c, r in rows[1::3] + rows[-1:]))


def fashion_trainer(a, sets, eval_every):
    from stn_ext.data import fashion_mnist

    cfg = TrainConfig(method=a.method, hypers=("dropout",), steps=a.steps, batch_size=100, seed=a.seed, quiet=True,
                      plots=False, eval_every=eval_every, **sets)
    torch.manual_seed(a.seed)
    return Trainer(cfg, data=fashion_mnist(train_size=10000), model=mlp(784, 10, 3, (256, 256)))


def after_hyper_steps(tuner, record):
    """Call ``record()`` after each of the tuner's hyper steps (u.grad and Adam's state are then that step's)."""
    step = tuner.hyper_step

    def recording(*args, **kw):
        out = step(*args, **kw)
        record()
        return out

    tuner.hyper_step = recording


def response_with_control_variate(tu):
    """Give Delta-STN's tuner ``tu`` a response step with common random numbers (it replays its general step's
    draws: the same masks, flipped only where the perturbed rate crosses a draw) and a control variate: minus the
    general step's gradient along the response's path, <G_We, (V delta) (.) W_h> + <G_be, (C delta) (.) b_h>, linear
    in delta and so zero in expectation. The response's expected gradient stays; most of its noise goes. The tuner's
    own response step runs; these wrap the pieces it calls, those of the response fitted by the gradient."""
    if tu.response_fit != "gradient":
        raise ValueError("diagnose_delta_stn: the control variate wraps the response fitted by the gradient; got "
                         f"response_fit {tu.response_fit!r} (add --set response_fit=gradient)")
    run, grads = {}, []
    step, apply, response, perturbed = tu.weight_step, tu._apply, tu._response_step, tu.perturbed

    def weight_step(x, y, rnd=None):
        rnd = tu._rnd(x, rnd)
        run["general draws"] = rnd.generator.get_state()
        return step(x, y, rnd)

    def response_step(*args):
        run["responding"] = True
        try:
            return response(*args)
        finally:
            run["responding"] = False

    def perturbed_then_replay(u, sigma, rnd):
        u_t = perturbed(u, sigma, rnd)
        if run.get("responding"):  # the response's delta is drawn; its masks are the general step's
            run["delta"], run["generator"] = tu.z(u_t, True), rnd.generator
            run["after"] = rnd.generator.get_state()
            rnd.generator.set_state(run["general draws"])
        return u_t

    def apply_with_control_variate(loss, params, *args, **kw):
        if params is tu.response_params:
            run["generator"].set_state(run["after"])  # the next step draws afresh
            delta = run["delta"]
            for m, (gw, gb) in zip(tu.layers, grads):
                loss = loss - ((m.hyper_weight @ delta) * (m.gate_rows(gw) * m.gate_rows(m.weight_hyper)).sum(1)).sum()
                if gb is not None:
                    loss = loss - ((m.hyper_bias @ delta) * gb * m.bias_hyper).sum()
        problem = apply(loss, params, *args, **kw)
        if params is tu.general_params and problem is None:  # keep the general step's gradients
            grads[:] = [(m.weight_elem.grad.detach().clone(),
                         None if getattr(m, "bias_hyper", None) is None else m.bias_elem.grad.detach().clone())
                        for m in tu.layers]
        return problem

    tu.weight_step, tu._response_step = weight_step, response_step
    tu.perturbed, tu._apply = perturbed_then_replay, apply_with_control_variate


def hypergrad(a, sets):
    if a.response_cv:  # the control variate wraps the gradient's fit (Delta-STN's default per batch was, until Dec 7)
        sets = {"response_fit": "gradient", **sets}
    tr = fashion_trainer(a, sets, max(10, a.steps // 40))
    if a.response_cv:
        response_with_control_variate(tr.tuner)
    grads = []
    after_hyper_steps(tr.tuner, lambda: grads.append(tr.tuner.u.grad.detach().clone()))
    s = tr.fit()
    g = torch.stack(grads)
    print(f"{a.method} {sets}: final test loss {s['test_loss']:.4f}, rates",
          {k: round(v, 3) for k, v in s["hypers"].items()})
    k = max(1, len(g) // 6)
    for i in range(0, len(g), k):
        w = g[i:i + k]
        print(f"  hyper steps {i}-{i + len(w)}: mean {[round(float(x), 5) for x in w.mean(0)]}, "
              f"sd {[round(float(x), 5) for x in w.std(0)]}, negative {[round(float(x), 2) for x in (w < 0).double().mean(0)]}")


def lookahead(a, sets):
    tr = fashion_trainer(a, sets, a.steps)
    tr.fit()
    tu, model = tr.tuner, tr.tuner.model
    xv, yv, xt, yt = tr.data.val.x, tr.data.val.y, tr.data.train.x, tr.data.train.y
    model.eval()
    z = torch.zeros(len(tu.space), requires_grad=True)
    with stn_ext.hyper_input(z):
        (g,) = torch.autograd.grad(F.cross_entropy(model(xv), yv), z)
    print(f"rates {tu.hyperparameters()}; through the learned response, all validation images: "
          f"{[round(float(x), 5) for x in g]}")
    u0 = tu.u.detach().clone()

    def val_after(du, K):
        m = copy.deepcopy(model).train()
        opt = torch.optim.SGD(m.parameters(), lr=tr.cfg.lr, momentum=tr.cfg.momentum)
        gen = torch.Generator().manual_seed(123)  # the same batches and mask draws at u + du and u - du
        vals = tu.space.to_values(u0 + du)
        rates = {slot: vals[i] for slot, i in tu.drop.items()}
        for _ in range(K):
            idx = torch.randint(0, len(yt), (100,), generator=gen)
            with regularisers(rates, BatchRandom(gen, 100)), stn_ext.elementary():
                loss = F.cross_entropy(m(xt[idx]), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad(), stn_ext.elementary():
            return float(F.cross_entropy(m.eval()(xv), yv))

    for K in a.K:
        fd = []
        for i in range(len(u0)):
            e = torch.zeros_like(u0)
            e[i] = a.h
            fd.append((val_after(e, K) - val_after(-e, K)) / (2 * a.h))
        print(f"K = {K}: finite-difference lookahead (h = {a.h}): {[round(x, 5) for x in fd]}")


class PlainTangentRun:
    """Plain training of the fashion protocol's MLP (its elementary weights: lr 0.01, momentum 0.9, batch 100,
    epochs in a random order) at the rates sigmoid(u), carrying Z = d theta / d u (one column per rate) by
    forward mode."""

    def __init__(self, data, seed, fd_step, lr=0.01, momentum=0.9, batch=100, horizon=0, tangent="exact", pace=1.0,
                 v_init="ones"):
        torch.manual_seed(seed)
        self.model = mlp(784, 10, 3, (256, 256))
        self.theta = {n: p.detach().clone() for n, p in self.model.named_parameters()
                      if n.endswith(("weight_elem", "bias_elem"))}
        self.vel = {n: torch.zeros_like(t) for n, t in self.theta.items()}
        self.Z = {n: torch.zeros(t.shape + (3,)) for n, t in self.theta.items()}
        self.Zvel = {n: torch.zeros_like(z) for n, z in self.Z.items()}
        self.data, self.fd_step, self.lr, self.momentum, self.batch = data, fd_step, lr, momentum, batch
        self.keep = 1.0 - 1.0 / horizon if horizon else 1.0  # Z's memory: the last ~horizon steps
        self.tangent, self.pace = tangent, pace  # pace: Z's step against the weights' (a response's pace)
        self.gen = torch.Generator().manual_seed(1000 + seed)  # batches and mask draws
        self.dirs = torch.Generator().manual_seed(2000 + seed)  # the random tangent's directions
        if tangent.startswith("rows"):  # Z's column k = V[:, k] (.)row W_h, the STN layers' response (W_h from 0, V near 1)
            self.Wh = {n: torch.zeros_like(t) for n, t in self.theta.items()}
            # ones: V near 1, the rates' responses alike at the start; normal: V ~ N(0, 1/3), the trainer's
            # (models.init_response), each row's rates mixed at random signs
            self.V = {n: (1 + 0.1 * torch.randn(t.shape[0], 3, generator=self.dirs) if v_init == "ones" else
                          torch.randn(t.shape[0], 3, generator=self.dirs) / math.sqrt(3))
                      for n, t in self.theta.items()}
            self.Whvel = {n: torch.zeros_like(t) for n, t in self.Wh.items()}
            self.Vvel = {n: torch.zeros_like(t) for n, t in self.V.items()}
        self.step = 0

    def _grad(self, theta, x, y, u, state):
        self.gen.set_state(state)  # the same mask draws in every pass of a step (common random numbers)
        theta = {n: t.detach().requires_grad_() for n, t in theta.items()}
        rates = dict(zip(("in", "h1", "h2"), torch.sigmoid(u).tolist()))
        with regularisers(rates, BatchRandom(self.gen, len(y))), stn_ext.elementary():
            loss = F.cross_entropy(functional_call(self.model.train(), theta, (x,), strict=False), y)
        return dict(zip(theta, torch.autograd.grad(loss, list(theta.values()))))

    def _batch(self):
        per_epoch = len(self.data.train.y) // self.batch
        if self.step % per_epoch == 0:
            self.perm = torch.randperm(len(self.data.train.y), generator=self.gen)
        idx = self.perm[(self.step % per_epoch) * self.batch:(self.step % per_epoch + 1) * self.batch]
        return self.data.train.x[idx], self.data.train.y[idx]

    def train_step(self, u, tangents=True):
        """One SGD step at sigmoid(u); with ``tangents``, Z's step too: Zvel = momentum Zvel + H Z + dg/du, Z -= lr
        Zvel, H Z + dg/du by a finite difference of fd_step along (Z e_k, e_k) for each column k."""
        x, y = self._batch()
        state = self.gen.get_state()
        g = self._grad(self.theta, x, y, u, state)
        if tangents:
            h = self.fd_step
            if self.tangent in ("exact", "cycle"):
                # cycle: one column's velocity a step (k = step mod 3), every velocity applied every step: the same
                # pace from one pass instead of three
                cols = range(3) if self.tangent == "exact" else [self.step % 3]
                for k in cols:
                    gk = self._grad({n: t + h * self.Z[n][..., k] for n, t in self.theta.items()}, x, y,
                                    u + h * torch.eye(3)[k], state)
                    for n in self.theta:
                        self.Zvel[n][..., k].mul_(self.momentum).add_((gk[n] - g[n]) / h)
            else:  # one pass along a direction d of the rates
                # random, rows: d ~ N(0, I), E[(H Z d + G d) d^T] = H Z + G, one pass instead of three; rows-cycle:
                # d = sqrt(3) e_k in turn, so that d d^T averages I as a Gaussian d's does
                d = (math.sqrt(3) * torch.eye(3)[self.step % 3] if self.tangent == "rows-cycle" else
                     torch.randn(3, generator=self.dirs))
                gd = self._grad({n: t + h * self.Z[n] @ d for n, t in self.theta.items()}, x, y, u + h * d, state)
                if self.tangent == "random":
                    for n in self.theta:
                        self.Zvel[n].mul_(self.momentum).add_(((gd[n] - g[n]) / h)[..., None] * d)
                else:
                    self._step_rows(g, gd, d)
            if not self.tangent.startswith("rows"):  # the row-scaled Z is V and W_h's product, stepped above
                for n in self.theta:
                    self.Z[n].mul_(self.keep).sub_(self.pace * self.lr * self.Zvel[n])
        for n, t in self.theta.items():
            self.vel[n].mul_(self.momentum).add_(g[n])
            t.sub_(self.lr * self.vel[n])
        self.step += 1

    def _step_rows(self, g, gd, d):
        """The step along d taken by V and W_h through Z = V (.)row W_h: each gets the gradient of <Z d, D>, D the
        change of the weights' gradient along (h Z d, h d) over h."""
        h = self.fd_step
        for n, t in self.theta.items():
            D, Vd = (gd[n] - g[n]) / h, self.V[n] @ d
            rows = Vd.view(-1, *[1] * (t.dim() - 1))
            self.Whvel[n].mul_(self.momentum).add_(rows * D)
            self.Vvel[n].mul_(self.momentum).add_((D * self.Wh[n]).reshape(len(Vd), -1).sum(1)[:, None] * d)
            self.Wh[n].sub_(self.pace * self.lr * self.Whvel[n])
            self.V[n].sub_(self.pace * self.lr * self.Vvel[n])
            self.Z[n] = self.Wh[n][..., None] * self.V[n].view(len(Vd), *[1] * (t.dim() - 1), 3)

    def val_loss(self, x, y, grad=False):
        """The validation loss of the plain network (no dropout) on (x, y); with ``grad``, also Z^T grad."""
        theta = {n: t.detach().requires_grad_(grad) for n, t in self.theta.items()}
        with torch.set_grad_enabled(grad), stn_ext.elementary():
            loss = F.cross_entropy(functional_call(self.model.eval(), theta, (x,), strict=False), y)
        if not grad:
            return float(loss)
        gs = torch.autograd.grad(loss, list(theta.values()))
        return float(loss.detach()), sum((gv[..., None] * self.Z[n]).reshape(-1, 3).sum(0) for gv, n in zip(gs, theta))


def forward(a, sets):
    from stn_ext.data import fashion_mnist

    data = fashion_mnist(train_size=10000)
    u0 = torch.full((3,), math.log(a.fixed / (1 - a.fixed)) if a.fixed else math.log(0.05 / 0.95))
    if a.check:
        run = PlainTangentRun(data, a.seed, a.fd_step)
        for _ in range(a.check):
            run.train_step(u0)
        _, hg = run.val_loss(data.val.x, data.val.y, grad=True)
        print(f"forward mode after {a.check} steps at rate {float(torch.sigmoid(u0[0])):.3f}, all validation images: "
              f"{[round(float(v), 5) for v in hg]}")
        fd = []
        for k in range(3):
            ends = []
            for sign in (1, -1):
                r = PlainTangentRun(data, a.seed, a.fd_step)
                for _ in range(a.check):
                    r.train_step(u0 + sign * a.h * torch.eye(3)[k], tangents=False)
                ends.append(r.val_loss(data.val.x, data.val.y))
            fd.append((ends[0] - ends[1]) / (2 * a.h))
        print(f"training from scratch at u +- {a.h}, central difference: {[round(v, 5) for v in fd]}")
        return
    steps, warmup = a.steps, a.steps // 10
    run = PlainTangentRun(data, a.seed, a.fd_step, horizon=a.horizon, tangent=a.tangent, pace=a.pace, v_init=a.v_init)
    u = u0.clone()
    # Adam as the trainer's hyper step had it when the recorded runs were made (beta2 0.999; its default is 0.99
    # since), with its per-batch schedule: constant, then cosine over the last half
    opt = torch.optim.Adam([u], lr=a.hyper_lr, betas=(0.9, 0.999))
    vgen, curve, hgs = torch.Generator().manual_seed(7 + a.seed), [], []
    for step in range(1, steps + 1):
        run.train_step(u, tangents=not a.fixed)
        if not a.fixed and step > warmup and step % 5 == 0:
            vi = torch.randint(0, len(data.val.y), (100,), generator=vgen)
            _, u.grad = run.val_loss(data.val.x[vi], data.val.y[vi], grad=True)
            hgs.append(u.grad)
            frac = (step - warmup) / (steps - warmup)
            decay = 1.0 if frac < 0.5 else 0.5 * (1 + math.cos(math.pi * (2 * frac - 1)))
            opt.param_groups[0]["lr"] = a.hyper_lr * decay
            opt.step()
        if step % max(10, steps // 40) == 0:
            curve.append(run.val_loss(data.val.x, data.val.y))
            if step % (steps // 8) == 0:
                w = torch.stack(hgs[-100:]) if hgs else torch.zeros(1, 3)
                print(f"  step {step}: val {curve[-1]:.4f} rates {[round(v, 3) for v in torch.sigmoid(u).tolist()]} "
                      f"hypergradient (last 100) mean {[round(float(v), 4) for v in w.mean(0)]}", flush=True)
    test = run.val_loss(data.test.x, data.test.y)
    label = f"fixed {a.fixed}" if a.fixed else (f"forward mode ({a.tangent}, horizon {a.horizon or 'whole run'}, "
                                                f"pace {a.pace}, hyper lr {a.hyper_lr}"
                                                + (f", V {a.v_init})" if a.tangent.startswith("rows") else ")"))
    print(f"{label} seed {a.seed}: test {test:.4f} final val "
          f"{curve[-1]:.4f} best val {min(curve):.4f} rates {[round(v, 3) for v in torch.sigmoid(u).tolist()]}")


def shrink_derivatives(tr):
    """(z . dL_val/dz, sum over STN layers of <dL_val/dW_e, W_e> + <dL_val/db_e, b_e>): the validation loss's
    derivatives along the scale of the hypernet path and of the elementary weights, at u, in eval mode."""
    tu = tr.tuner
    z = tu.z(tu.u.detach(), False).clone().requires_grad_(True)
    elem = [p for m in tu.layers for p in (m.weight_elem, m.bias_elem) if p is not None]
    tu.model.eval()
    with stn_ext.hyper_input(z):
        loss = F.cross_entropy(tu.model(tr.data.val.x), tr.data.val.y)
    g = torch.autograd.grad(loss, [z] + elem)
    tu.model.train()
    return float(z.detach() @ g[0]), float(sum((gp * p.detach()).sum() for gp, p in zip(g[1:], elem)))


def anchor(a, sets):
    a.method = "stn"  # fashion_trainer's method: the anchor is STN's
    for mirrored in (False, True):
        tr = fashion_trainer(a, sets, max(10, a.steps // 40))
        tu = tr.tuner
        if mirrored:
            with torch.no_grad():  # z = u - anchor: the same size, the other sign
                tu.anchor.copy_(2 * tu.u.detach() - tu.anchor)
        rows = []
        for quarter in range(1, 5):
            tr.cfg.steps = quarter * a.steps // 4  # fit() runs to cfg.steps; continue quarter by quarter
            s = tr.fit()
            path, elem = shrink_derivatives(tr)
            rows.append(f"step {tr.step}: rates {[round(v, 3) for v in tu.hyperparameters().values()]}, "
                        f"z {[round(float(v), 2) for v in tu.z(tu.u.detach(), False)]}, "
                        f"dL/d(path scale) {path:+.4f}, dL/d(W_e scale) {elem:+.4f}")
        print(f"STN, anchor {'mirrored' if mirrored else 'as default'} {sets}: test loss {s['test_loss']:.4f}")
        print("\n".join("  " + r for r in rows))


def ridge(a, sets):
    import bench_tuning as bt

    instances, _ = bt.ridge_family(8, a.family_seed)
    inst = next((i for i in instances if i["name"] == a.instance), None)
    if inst is None:
        raise SystemExit(f"no instance {a.instance!r} in family {a.family_seed}: {[i['name'] for i in instances]}")
    prob, u_star = bt.family_problem(inst), inst["log_opt"]
    if a.hold is not None:
        sets = dict(sets, hyper_lr=0.0)
    cfg = bt.ridge_config(prob, u_star, a.method, a.perturb, 1 if a.side == "above" else -1, a.seed, a.steps, **sets)
    if a.hold is not None:
        cfg.inits = {"weight_decay": math.exp(u_star + a.hold)}
    torch.manual_seed(a.seed)
    tr = Trainer(cfg, data=prob.dataset(), model=prob.model())
    if a.hold is not None:
        return _held(a, prob, u_star, tr)
    tu, rec = tr.tuner, []

    def record():
        state = tu.opt_h.state.get(tu.u, {})
        root_m2 = float(state["exp_avg_sq"].sqrt()) if state else 0.0
        rec.append((float(tu.u.detach()) - u_star, float(tu.u.grad), root_m2))

    after_hyper_steps(tu, record)
    print(f"family {a.family_seed} {a.instance} ({inst['d']} features, {inst['n_train']} examples), {a.method} per "
          f"{a.perturb} from {a.side}, {a.steps} steps {sets or ''}")
    if a.every:
        print("  step   u - u*  g(W_e).J  g(w*).J*  g(W_e).J*  g(w*).J  |W_e-w*|/|w*|  cos(J, J*)  |J|/|J*|  (g: the "
              "validation gradient, J = V W_h, J* = dw*/du, w* = w*(u))")
        stepping = tu.weight_step

        def weight_step(*args, **kw):
            out = stepping(*args, **kw)
            if tu.step % a.every == 0:
                w_e, slope, true, u = _ridge_state(prob, tu)
                w_s = prob.weights(math.exp(u))
                g_e, g_s = _val_gradient(prob, w_e), _val_gradient(prob, w_s)
                print(f"  {tu.step:5d} {u - u_star:+.3f}  {float(g_e @ slope):+.3f}  {float(g_s @ true):+.3f}  "
                      f"{float(g_e @ true):+.3f}  {float(g_s @ slope):+.3f}  {float((w_e - w_s).norm() / w_s.norm()):.4f}"
                      f"  {float(slope @ true / (slope.norm() * true.norm() + 1e-30)):+.3f}  "
                      f"{float(slope.norm() / true.norm()):.3f}", flush=True)
            return out
        tu.weight_step = weight_step
    tr.fit()
    for i in range(0, len(rec), 30):
        g = torch.tensor([r[1] for r in rec[i:i + 30]])
        print(f"  hyper steps {i}-{i + len(g)}: u - u* {rec[i][0]:+.3f}, gradient mean {float(g.mean()):+.2e} sd "
              f"{float(g.std()):.2e}, sqrt(m2) {rec[i + len(g) - 1][2]:.2e}")
    w_e, slope, true, u = _ridge_state(prob, tu)
    grad = _val_gradient(prob, w_e)
    along = (slope @ true) / (true @ true) * true
    print(f"end: u - u* {u - u_star:+.3f}; W_e against w*(u): relative error "
          f"{float((w_e - prob.weights(math.exp(u))).norm() / prob.weights(math.exp(u)).norm()):.4f}; V W_h against "
          f"dw*/du: cosine {float(slope @ true / (slope.norm() * true.norm())):.3f}, length ratio "
          f"{float(slope.norm() / true.norm()):.2f}")
    print(f"  validation gradient . dw*/du {float(grad @ true):+.4f} (closed form); through V W_h "
          f"{float(grad @ slope):+.4f} = along {float(grad @ along):+.4f} + across {float(grad @ (slope - along)):+.4f} "
          f"(the part across: {float((slope - along).norm() / true.norm()):.3f} of |dw*/du|; |validation gradient| "
          f"{float(grad.norm()):.3f}, cosine to dw*/du {float(grad @ true / (grad.norm() * true.norm())):+.3f})")


def _held(a, prob, u_star, tr):
    """ridge --hold: u held at u* + a.hold; u's gradient on plain and perturbed hyper steps against the closed form."""
    tu, rec = tr.tuner, []

    def record():  # a plain hyper step leaves the scales without a gradient (Tuner.hyper_step)
        w_e, slope, true, u = _ridge_state(prob, tu)
        g_s = _val_gradient(prob, prob.weights(math.exp(u)))
        rec.append((tu.step, tu.hscale.grad is None, float(tu.u.grad), float(_val_gradient(prob, w_e) @ slope),
                    float(g_s @ true)))

    after_hyper_steps(tu, record)
    tr.fit()
    out = {"u_minus_opt": float(tu.u.detach()) - u_star}
    print(f"family {a.family_seed} {a.instance}, {a.method} per {a.perturb}, u held at u* {a.hold:+.3f} "
          f"({out['u_minus_opt']:+.3f} at the end), {a.steps} steps; hyper steps after step {a.steps // 3}:")
    kept = [r for r in rec if r[0] > a.steps // 3]
    for name, plain in (("plain", True), ("perturbed", False)):
        rows = torch.tensor([r[2:] for r in kept if r[1] == plain])
        if len(rows) < 2:
            continue
        sd = float(rows[:, 0].std())
        out[name] = {"n": len(rows), "mean": float(rows[:, 0].mean()), "se": sd / math.sqrt(len(rows)),
                     "through_response": float(rows[:, 1].mean()), "closed_form": float(rows[:, 2].mean())}
        print(f"  {name} ({len(rows)}): u's gradient mean {out[name]['mean']:+.5f} (standard error "
              f"{out[name]['se']:.5f}, spread {sd:.4f}); closed form through V W_h {out[name]['through_response']:+.5f}, "
              f"through dw*/du {out[name]['closed_form']:+.5f}")
    return out


def _ridge_state(prob, tu, h=1e-5):
    """(W_e, the learned slope V W_h, the closed form dw*/du by central difference, u) of a ridge run's tuner."""
    u, layer = float(tu.u.detach()), tu.layers[0]
    w_e = layer.weight_elem.detach().double().reshape(-1)
    slope = (layer.hyper_weight[:, 0:1] * layer.weight_hyper).detach().double().reshape(-1)
    true = (prob.weights(math.exp(u + h)) - prob.weights(math.exp(u - h))) / (2 * h)
    return w_e, slope, true, u


def _val_gradient(prob, w):
    """d (mean squared validation error) / dw at w."""
    return 2 * prob.xv.T @ (prob.xv @ w - prob.yv) / prob.n_val


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["toy", "hypergrad", "lookahead", "forward", "anchor", "ridge"])
    p.add_argument("--method", default="delta-stn", choices=["stn", "delta-stn"], help="hypergrad, lookahead, ridge (anchor: always stn)")
    p.add_argument("--family-seed", type=int, default=22, help="ridge: the family (bench_tuning.py --family-seed)")
    p.add_argument("--instance", default="i5", help="ridge: the instance's name (i0 ... i7)")
    p.add_argument("--side", default="above", choices=["above", "below"], help="ridge: the start, 100x off")
    p.add_argument("--perturb", default="batch", choices=["batch", "example"],
                   help="ridge, toy --only: the perturbation mode")
    p.add_argument("--steps", type=int, default=None,
                   help="weight steps (toy 3000, hypergrad 4000, lookahead 2000, forward 4000, anchor 4000, "
                        "ridge 3000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--every", type=int, default=0, help="ridge: the hypergradient's parts every N weight steps")
    p.add_argument("--hold", type=float, default=None,
                   help="ridge: u held at u* + HOLD (log units): u's gradient against the closed form")
    p.add_argument("--init", type=float, default=0.05, help="toy: the dropout rate's start")
    p.add_argument("--only", action="store_true", help="toy: --method per --perturb alone (default: both methods, both "
                   "modes)")
    p.add_argument("--K", type=int, nargs="+", default=[100, 500, 1500], help="lookahead: steps of plain training")
    p.add_argument("--h", type=float, default=0.5,
                   help="lookahead, forward --check: the step in u of the finite difference")
    p.add_argument("--check", type=int, default=0,
                   help="forward: compare with training from scratch after this many steps")
    p.add_argument("--fixed", type=float, default=0.0, help="forward: plain training at this constant rate")
    p.add_argument("--fd-step", type=float, default=0.3,
                   help="forward: the finite difference's step along (Z e_k, e_k)")
    p.add_argument("--hyper-lr", type=float, default=0.02, help="forward: Adam's step on u")
    p.add_argument("--horizon", type=int, default=0,
                   help="forward: Z forgets 1/HORIZON of itself each step (its memory: the last ~HORIZON steps; "
                        "0: the whole run)")
    p.add_argument("--pace", type=float, default=1.0,
                   help="forward: Z's step as a part of the weights' (Delta-STN's response learns at about sigma^2 "
                        "of the weights' pace)")
    p.add_argument("--v-init", default="ones", choices=["ones", "normal"],
                   help="forward --tangent rows*: V's start (ones: 1 + N(0, 0.01); normal: N(0, 1/3), the trainer's)")
    p.add_argument("--tangent", default="exact", choices=["exact", "cycle", "random", "rows", "rows-cycle"],
                   help="forward: Z's step by one pass per rate (exact), or by one pass along a random direction "
                        "d ~ N(0, I) of the rates, times d^T (random: Delta-STN's per-batch response step with "
                        "a whole response matrix per rate, at the weights' pace, with common random numbers; cycle: one "
                        "rate's velocity a step, in turn, all applied every step; rows: "
                        "the same step taken by Z = V (.)row W_h, the STN layers' response, one W_h for all rates; "
                        "rows-cycle: that along sqrt(3) e_k in turn)")
    p.add_argument("--response-cv", action="store_true",
                   help="hypergrad, delta-stn: the response step with common random numbers and a control variate")
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="a TrainConfig field (repeatable)")
    a = p.parse_args(argv)
    if a.horizon and a.tangent.startswith("rows"):
        p.error("--horizon forgets Z's own steps; the rows tangents step V and W_h instead")
    if a.response_cv and (a.what != "hypergrad" or a.method != "delta-stn"):
        p.error("--response-cv is for hypergrad with --method delta-stn")
    a.steps = a.steps or {"toy": 3000, "hypergrad": 4000, "lookahead": 2000, "forward": 4000, "anchor": 4000,
                        "ridge": 3000}[a.what]
    sets = {}
    for item in a.set:
        name, _, value = item.partition("=")
        try:
            sets[name] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            sets[name] = value
    torch.set_num_threads(1)
    return {"toy": toy, "hypergrad": hypergrad, "lookahead": lookahead, "forward": forward, "anchor": anchor,
            "ridge": ridge}[a.what](a, sets)


if __name__ == "__main__":
    main()
