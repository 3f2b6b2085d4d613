"""Tests of the bilevel trainer: hyperparameter spaces, augmentations, STN / Delta-STN runs, the
hypergradient on ridge regression, checkpoint/resume, errors, CLI. (DDP: test_trainer_ddp.py.)"""
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import stn_ext
from stn_ext import checkpoint
from stn_ext.tuning import augment, models
from stn_ext.tuning.augment import BatchRandom
from stn_ext.data import Dataset, digits
from stn_ext.tuning.space import BUILTINS, Hyper, HyperSpace
from stn_ext.tuning.cli import EPILOG, format_table, summarise
from stn_ext.tuning import TrainConfig, Trainer, open_run_folder, train


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def small_digits():
    return digits(seed=0, train_size=256)


# --- hyperparameter spaces ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(BUILTINS))
def test_builtin_transforms_round_trip(kind):
    low, high, init, transform, discrete = BUILTINS[kind]
    h = Hyper(kind, kind, low, high, init, transform, discrete)
    if discrete:
        values = torch.arange(math.ceil(low), math.floor(high) + 1, dtype=torch.float64)
    elif transform == "log":
        values = torch.exp(torch.linspace(math.log(low), math.log(high), 9, dtype=torch.float64))
    else:
        values = torch.linspace(low, high, 11, dtype=torch.float64)[1:-1]
    back = h.to_value(h.to_unconstrained(values))
    assert torch.allclose(back, values, rtol=1e-6, atol=1e-9), (values, back)
    # and the other way on the part of u-space that maps inside the range
    lo, hi = h.u_bounds()
    u = torch.linspace(lo, hi, 7, dtype=torch.float64)
    if not discrete:
        assert torch.allclose(h.to_unconstrained(h.to_value(u)), u, atol=1e-6)


@pytest.mark.parametrize("transform", ["logit", "log", "linear"])
def test_custom_range_round_trip(transform):
    h = Hyper("x", "custom", 0.5, 7.0, 2.0, transform)
    v = torch.tensor([0.6, 1.0, 2.5, 6.9], dtype=torch.float64)
    assert torch.allclose(h.to_value(h.to_unconstrained(v)), v, rtol=1e-9)
    assert 0.5 <= float(h.to_value(torch.tensor(-1e3, dtype=torch.float64))) <= 7.0


def test_discrete_hyperparameters_stay_integral():
    space = HyperSpace.build("cutout,shift,dropout", dropout_slots=["in"])
    u = torch.randn(1000, len(space), dtype=torch.float64) * 5
    v = space.to_values(u)
    for i, h in enumerate(space.hypers):
        if h.discrete:
            assert torch.equal(v[:, i], v[:, i].round()), h.name
            assert v[:, i].min() >= h.low and v[:, i].max() <= h.high
        else:
            assert not torch.equal(v[:, i], v[:, i].round())
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        s = space.sample(g)
        assert all(float(s[h.name]).is_integer() for h in space.hypers if h.discrete)


def test_a_range_of_one_value_holds_the_hyperparameter_there():
    """low == high: the value for any u, u 0 and unperturbed (its limits), drawn as itself by the searches."""
    space = HyperSpace.build(["dropout", "weight_decay", "cutout_length"], ("in", "h1"),
                             ranges={"dropout.h1": (0.3, 0.3), "weight_decay": (1e-3, 1e-3), "cutout_length": (8, 8)})
    held = [h.held for h in space.hypers]
    assert held == [False, True, True, True]
    u = space.init_unconstrained()
    assert u[1:].tolist() == [0.0, 0.0, 0.0]
    for shift in (-5.0, 0.0, 5.0):
        assert space.to_values(u + shift)[1:].tolist() == pytest.approx([0.3, 1e-3, 8.0])
    lo, hi = space.u_limits()
    assert lo[1:].tolist() == hi[1:].tolist() == [0.0, 0.0, 0.0] and lo[0] == -math.inf
    draws = [space.sample(torch.Generator().manual_seed(k)) for k in range(5)]
    assert {d["dropout.h1"] for d in draws} == {0.3} and len({d["dropout.in"] for d in draws}) == 5
    with pytest.raises(ValueError, match="outside"):  # a start away from the held value is refused
        HyperSpace.build("weight_decay", ranges={"weight_decay": (1e-3, 1e-3)}, inits={"weight_decay": 1e-2})


@pytest.mark.parametrize("method,perturb", [("stn", "batch"), ("stn", "example"), ("delta-stn", "batch"),
                                            ("delta-stn", "example")])
def test_a_held_hyperparameter_stays_while_the_others_are_tuned(method, perturb):
    cfg = TrainConfig(method=method, perturb=perturb, hypers=("dropout", "weight_decay"), steps=80, warmup_steps=10,
                      hidden=(16, 16), train_size=200, ranges={"dropout.h1": (0.3, 0.3)}, quiet=True, plots=False)
    tr = Trainer(cfg)
    tr.fit()
    tu = tr.tuner
    i = tu.space.names.index("dropout.h1")
    values = tu.hyperparameters()
    assert values["dropout.h1"] == pytest.approx(0.3) and float(tu.u.detach()[i]) == 0.0
    assert values["dropout.in"] != pytest.approx(0.05) and values["dropout.h2"] != pytest.approx(0.05)
    assert torch.isfinite(tu.u).all()


@pytest.mark.parametrize("method", ["stn", "delta-stn"])
def test_held_rates_leave_the_response_fit_to_the_tuned_hyperparameters(method):
    """A held rate draws the same masks at any u~ and its hypernet input is 0, so with the rest smooth (weight decay)
    'auto' fits the response by difference with the smooth settings, as without the rates; one tuned rate keeps STN
    on the gradient and gives Delta-STN the settings where masks are drawn. A resume (config.response_fit_of)
    resolves a held hyperparameter the same way."""
    from stn_ext.tuning.config import response_fit_of

    held = {f"dropout.{s}": (0.1, 0.1) for s in ("in", "h1", "h2")}

    def trainer(ranges):
        return Trainer(TrainConfig(method=method, hypers=("dropout", "weight_decay"), steps=40, warmup_steps=10,
                                   hidden=(16, 16), train_size=200, ranges=ranges, quiet=True, plots=False))

    tr = trainer(held)
    assert tr.tuner.space.tuned_kinds() == ["weight_decay"] and tr.tuner.response_fit == "difference"
    assert not tr.tuner.near_one and tr.tuner.path_cap == 0
    tr.fit()
    assert torch.isfinite(tr.tuner.u).all() and tr.tuner.hyperparameters()["dropout.h1"] == pytest.approx(0.1)
    tuned = trainer({**held, "dropout.h1": (0.0, 0.5)}).tuner
    masked = method == "delta-stn"
    assert tuned.response_fit == ("difference" if masked else "gradient") and tuned.near_one == masked
    fields = {"method": method, "hypers": ["weight_decay", "noise", "cutout_length"]}
    assert response_fit_of(fields) == ("difference" if masked else "gradient")
    assert response_fit_of({**fields, "ranges": {"cutout_length": [8, 8]}}) == "difference"


def test_the_response_gain_ignores_held_hyperparameters():
    """The response's gain is sigma_0^2 over the mean square of the tuned scales: a held one (never perturbed, its
    scale left at its cap) does not dilute it."""
    from stn_ext.tuning.core import inv_softplus

    cfg = TrainConfig(method="delta-stn", hypers=("dropout",), steps=20, hidden=(16, 16), train_size=200,
                      ranges={"dropout.h1": (0.3, 0.3)}, quiet=True, plots=False)
    tu = Trainer(cfg).tuner
    assert tu.tuned.tolist() == [True, False, True]
    pace = float(tu.response_gain())  # every scale at sigma_0: gain 1, times the response's pace
    with torch.no_grad():
        tu.hscale[tu.tuned] = inv_softplus(tu.scale_init / 1.5)
    assert float(tu.response_gain()) == pytest.approx(1.5 ** 2 * pace)  # diluted by the held: 1.59 x pace


def test_space_expands_groups_and_applies_ranges():
    space = HyperSpace.build(["dropout", "weight_decay", "cutout"], dropout_slots=["in", "h1"],
                             ranges={"dropout": (0.1, 0.6), "weight_decay": (1e-5, 1e-2)}, inits={"dropout.h1": 0.3})
    assert space.names == ["dropout.in", "dropout.h1", "weight_decay", "cutout_length", "cutout_holes"]
    d = {h.name: h for h in space.hypers}
    assert (d["dropout.in"].low, d["dropout.in"].high) == (0.1, 0.6)
    assert d["dropout.h1"].init == 0.3 and d["dropout.in"].low < d["dropout.in"].init < d["dropout.in"].high
    vals = space.as_dict(space.init_unconstrained(torch.float64))
    assert vals["dropout.h1"] == pytest.approx(0.3) and vals["weight_decay"] == pytest.approx(1e-4)


# --- bad configuration gets a clear error ---------------------------------------------------------------


def test_unknown_hyperparameter_name():
    with pytest.raises(ValueError, match="unknown hyperparameter 'dropuot'"):
        HyperSpace.build("dropuot", dropout_slots=["in"])
    with pytest.raises(ValueError, match="unknown hyperparameter 'learning_rate'"):
        Trainer(TrainConfig(method="stn", hypers=("learning_rate",), steps=1))


def test_empty_range_and_bad_init():
    with pytest.raises(ValueError, match="empty range"):
        HyperSpace.build("weight_decay", ranges={"weight_decay": (1e-2, 1e-3)})
    with pytest.raises(ValueError, match="empty range"):
        Hyper("d", "dropout", 0.5, 0.1, 0.3)
    with pytest.raises(ValueError, match="log transform needs low > 0"):
        HyperSpace.build("noise", ranges={"noise": (0.0, 1.0)})
    with pytest.raises(ValueError, match="outside"):
        HyperSpace.build("weight_decay", inits={"weight_decay": 5.0})
    with pytest.raises(ValueError, match="not among the tuned"):
        HyperSpace.build("weight_decay", ranges={"noise": (0.1, 0.2)})
    with pytest.raises(ValueError, match="empty"):
        HyperSpace.build([])


def test_wrong_data_shape():
    x = torch.randn(20, 5)
    with pytest.raises(ValueError, match="holds 20 examples .shape.0.. but y_train holds 19"):
        Dataset.from_arrays(x, torch.zeros(19, dtype=torch.long), x, torch.zeros(20, dtype=torch.long))
    with pytest.raises(ValueError, match=r"must be \(N, features\) or \(N, C, H, W\)"):
        Dataset.from_arrays(torch.randn(20, 2, 3), torch.zeros(20), x, torch.zeros(20))
    with pytest.raises(ValueError, match="different shapes per example"):
        Dataset.from_arrays(x, torch.zeros(20, dtype=torch.long), torch.randn(20, 6), torch.zeros(20, dtype=torch.long))
    with pytest.raises(ValueError, match="non-integer labels"):
        Dataset.from_arrays(x, torch.rand(20), x, torch.zeros(20))
    with pytest.raises(TypeError, match="torch.Tensor or numpy.ndarray"):
        Dataset.from_arrays([[1.0]], [0], x, torch.zeros(20))
    flat = Dataset.from_arrays(x.numpy(), torch.zeros(20, dtype=torch.long).numpy(), x, torch.zeros(20, dtype=torch.long))
    with pytest.raises(ValueError, match=r"augments images and needs data shaped \(N, C, H, W\)"):
        Trainer(TrainConfig(method="stn", hypers=("cutout",), steps=1, batch_size=8), data=flat)
    with pytest.raises(ValueError, match="needs image data"):
        Trainer(TrainConfig(method="stn", model="cnn", hypers=("weight_decay",), steps=1, batch_size=8), data=flat)


def test_bad_config_values():
    with pytest.raises(ValueError, match="unknown method"):
        TrainConfig(method="sgd").validate()
    with pytest.raises(ValueError, match="perturb"):
        TrainConfig(perturb="layer").validate()
    with pytest.raises(ValueError, match=r"response_rows must be in \(0, 1\]"):
        TrainConfig(response_rows=1.5).validate()
    with pytest.raises(ValueError, match=r"hyper_beta2 must be in \[0, 1\) \(or -1: the mode's default\), got 1.0"):
        TrainConfig(hyper_beta2=1.0).validate()
    with pytest.raises(ValueError, match="unknown TrainConfig fields"):
        train({"method": "stn", "stepz": 3})
    with pytest.raises(ValueError, match="n_hyper=2 but the space tunes 1 hyperparameter "):
        model = nn.Sequential(nn.Flatten(), stn_ext.StnLinear(64, 10, 2))
        Trainer(TrainConfig(method="stn", hypers=("weight_decay",), steps=1), model=model)


def test_device_is_checked_before_any_work(monkeypatch):
    with pytest.raises(ValueError, match="cannot parse device 'gpu'"):
        TrainConfig(device="gpu").validate()
    with pytest.raises(ValueError, match="CPU and CUDA kernels only"):
        TrainConfig(device="meta").validate()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="finds no CUDA GPU"):
        TrainConfig(device="cuda").validate()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(stn_ext, "has_cuda", lambda: False)  # a CPU-only build of stn_ext
    with pytest.raises(ValueError, match="no CUDA kernels"):
        TrainConfig(device="cuda").validate()
    monkeypatch.setattr(stn_ext, "has_cuda", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match="finds 1 GPU"):
        TrainConfig(device="cuda:1").validate()
    TrainConfig(device="cuda:0").validate()


# --- augmentations ----------------------------------------------------------------------------------------


def test_augmentations_per_example():
    g = torch.Generator().manual_seed(0)
    x = torch.ones(4, 1, 8, 8)
    out = augment.cutout(x, torch.tensor([0.0, 2.0, 4.0, 4.0]), torch.tensor([1.0, 1.0, 0.0, 2.0]), BatchRandom(g, 4),
                         max_holes=2)
    zeros = (out == 0).flatten(1).sum(1)
    assert zeros[0] == 0 and zeros[2] == 0            # length 0, or no holes: untouched
    assert 1 <= zeros[1] <= 4 and 1 <= zeros[3] <= 32  # holes of side 2, two of side 4 (clipped at borders)
    img = torch.arange(64.0).view(1, 1, 8, 8).expand(3, 1, 8, 8).contiguous()
    sh = augment.random_shift(img, torch.tensor([0.0, 2.0, 2.0]), BatchRandom(g, 3))
    assert torch.equal(sh[0], img[0])
    assert ((sh[1] == 0).sum() + (img[1] == 0).sum()) >= 1
    nz = augment.gaussian_noise(torch.zeros(2, 1000), torch.tensor([0.0, 1.0]), BatchRandom(g, 2))
    assert nz[0].abs().max() == 0 and 0.8 < nz[1].std() < 1.2
    m = augment.dropout_mask(torch.zeros(2, 20000), torch.tensor([0.0, 0.5]), BatchRandom(g, 2))
    assert torch.all(m[0] == 1) and 0.45 < (m[1] == 0).float().mean() < 0.55 and m[1].max() == 2


def test_batch_random_rows_match_global_draw():
    a = BatchRandom(torch.Generator().manual_seed(3), 8).rand(5)
    b = BatchRandom(torch.Generator().manual_seed(3), 8, offset=4, local=4).rand(5)
    assert torch.equal(a[4:], b)


# --- models ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@pytest.mark.parametrize("shared", [True, False])
def test_linearised_forward_matches_double_backward_jvp(kind, shared):
    torch.manual_seed(0)
    m = models.build(kind, (1, 8, 8), 10, 3, hidden=(16, 16), channels=(4, 8)).double()
    for layer in models.stn_layers(m):
        with torch.no_grad():
            layer.hyper_weight.normal_()
            layer.hyper_bias.normal_()
    m.eval()
    x = torch.randn(5, 1, 8, 8, dtype=torch.float64)
    delta = torch.randn(3 if shared else (5, 3), dtype=torch.float64)
    y0, ydot = m.forward_linearised(x, delta)

    def fn(lam):
        with stn_ext.hyper_input(lam):
            return m(x)

    r0, rdot = models.jvp_by_double_backward(fn, delta)
    assert torch.allclose(y0, r0, atol=1e-10) and torch.allclose(ydot, rdot, atol=1e-8)
    # and it is the derivative: (f(h delta) - f(-h delta)) / 2h
    h = 1e-5
    fd = (fn(h * delta) - fn(-h * delta)) / (2 * h)
    assert torch.allclose(ydot, fd, atol=1e-6)
    # the primal's graph holds W_e alone: a loss's backward does not run through W_h's GEMM
    hyper = [layer.weight_hyper for layer in models.stn_layers(m)]
    assert all(g is None for g in torch.autograd.grad(y0.sum(), hyper, allow_unused=True))


def test_effective_weight_l2():
    torch.manual_seed(0)
    tr = Trainer(TrainConfig(method="stn", hypers=("weight_decay", "noise"), steps=1, hidden=(8,)))
    for layer in tr.layers:
        with torch.no_grad():
            layer.hyper_weight.normal_()
            layer.weight_hyper.normal_()  # the response's init has W_h = 0, where the cross term 2 s <W_e, W_h> is 0
    z = torch.randn(3, 2)
    got = tr.tuner.l2(z)
    for b in range(3):
        with torch.no_grad():
            want = sum(float((stn_ext.reference.gated_weight(z[b], l.weight_elem, l.weight_hyper, l.hyper_weight) ** 2).sum())
                       for l in tr.layers)
        assert got[b].item() == pytest.approx(want, rel=1e-5)
    assert tr.tuner.l2(z[0]).item() == pytest.approx(got[0].item(), rel=1e-5)
    # its part linear in z: d/da l2(a z) at a = 0, by central difference (l2 is quadratic in a, so exact)
    a = 1e-2
    slope = (tr.tuner.l2(a * z) - tr.tuner.l2(-a * z)) / (2 * a)
    assert torch.allclose(tr.tuner.l2(z, linear=True), slope, rtol=1e-3, atol=1e-5)
    assert tr.tuner.l2(None).item() == pytest.approx(tr.tuner.l2(0 * z[0]).item(), rel=1e-6)


# --- training ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kw", [dict(method="stn"), dict(method="delta-stn"),
                                dict(method="delta-stn", linearize=True, perturb="batch")])
def test_short_run_lowers_validation_loss(small_digits, kw):
    cfg = TrainConfig(steps=120, warmup_steps=20, hidden=(64,), hyper_lr=0.01, eval_every=40, quiet=True, **kw)
    tr = Trainer(cfg, data=small_digits)
    s = tr.fit()
    first, last = tr.log.epochs[0], tr.log.epochs[-1]
    assert first["step"] == 0 and last["step"] == 120
    assert last["val_loss"] < 0.6 * first["val_loss"], (first, last)
    assert s["hyper_steps"] == (120 - 20) // cfg.train_per_cycle
    assert s["hypers"] != {h.name: h.init for h in tr.space.hypers}  # the hyperparameters moved


def test_cnn_with_augmentation_and_discrete_schedule(small_digits, tmp_path):
    cfg = TrainConfig(method="stn", model="cnn", hypers=("dropout", "cutout", "shift", "noise", "weight_decay"),
                      channels=(4, 8), hidden=(16,), steps=40, warmup_steps=10, hyper_lr=0.05, out=str(tmp_path),
                      eval_every=20, quiet=True)
    s = train(cfg, data=small_digits)
    assert s["complete"] and s["steps"] == 40
    rows = [line.split(",") for line in open(tmp_path / "schedule.csv").read().strip().splitlines()]
    header, rows = rows[0], rows[1:]
    assert len(rows) == 40
    for name in ("cutout_length", "cutout_holes", "shift"):
        col = header.index(name)
        assert all(float(r[col]).is_integer() for r in rows)
    for f in ("config.json", "steps.jsonl", "epochs.jsonl", "summary.json", "losses.png", "accuracy.png", "hypers.png"):
        assert (tmp_path / f).stat().st_size > 0, f


def test_fixed_and_random_search_equal_steps(small_digits, tmp_path):
    s = train(TrainConfig(method="fixed", steps=30, hidden=(16,), quiet=True), data=small_digits)
    assert s["steps"] == 30 and s["hyper_steps"] == 0
    assert s["hypers"]["dropout.in"] == pytest.approx(BUILTINS["dropout"][2], rel=1e-5)
    r = train(TrainConfig(method="random", steps=30, random_trials=3, hidden=(16,), quiet=True, out=str(tmp_path)),
              data=small_digits)
    assert r["steps"] == 30 and r["trials"] == 3
    assert r["val_loss"] == min(r["trial_val_losses"])
    assert len({json.dumps(json.load(open(tmp_path / f"trial_{k}" / "summary.json"))["hypers"]) for k in range(3)}) == 3


def test_double_model_trains_on_float32_data(small_digits):
    torch.manual_seed(0)
    model = models.mlp(64, 10, 3, hidden=(16,)).double()  # dropout.in, dropout.h1, weight_decay
    assert small_digits.train.x.dtype == torch.float32
    s = train(TrainConfig(method="delta-stn", steps=8, warmup_steps=2, batch_size=32, quiet=True), data=small_digits,
              model=model)
    assert s["complete"] and math.isfinite(s["val_loss"])
    X, y, Xv, yv = _ridge_problem()  # float32 regression targets too
    data = Dataset.from_arrays(X, y, Xv, yv, X, y, task="regression")
    tr = Trainer(TrainConfig(method="stn", hypers=("weight_decay",), steps=4, batch_size=20, warmup_steps=1, quiet=True),
                 data=data, model=nn.Sequential(stn_ext.StnLinear(X.shape[1], 1, 1)).double())
    assert tr.data.train.x.dtype == tr.data.train.y.dtype == torch.float64
    assert math.isfinite(tr.fit()["val_loss"])


def test_summary_says_when_test_is_validation():
    X, y, Xv, yv = _ridge_problem()
    model = lambda: nn.Sequential(stn_ext.StnLinear(X.shape[1], 1, 1))  # noqa: E731
    cfg = TrainConfig(method="fixed", hypers=("weight_decay",), steps=2, batch_size=20, quiet=True)
    s = train(cfg, data=Dataset.from_arrays(X, y, Xv, yv, task="regression"), model=model)
    assert s["test_is_val"] is True and s["test_loss"] == s["val_loss"]
    s = train(cfg, data=Dataset.from_arrays(X, y, Xv, yv, Xv[:50], yv[:50], task="regression"), model=model)
    assert "test_is_val" not in s


# --- the hypergradient on ridge regression ------------------------------------------------------------------


def _ridge_problem(seed=0, N=40, d=30, Nv=400, noise=1.0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(d, generator=g) / math.sqrt(d) * 2
    X, Xv = torch.randn(N, d, generator=g), torch.randn(Nv, d, generator=g)
    y, yv = X @ w + noise * torch.randn(N, generator=g), Xv @ w + noise * torch.randn(Nv, generator=g)
    return X, y, Xv, yv


def _ridge_val_loss(X, y, Xv, yv, lam):
    """Closed form: argmin_w mean (Xw - y)^2 + lam/2 |w|^2 = (X^T X + N lam/2 I)^-1 X^T y."""
    N, d = X.shape
    A = X.double().T @ X.double() + (N * lam / 2) * torch.eye(d, dtype=torch.float64)
    w = torch.linalg.solve(A, X.double().T @ y.double())
    return float(((Xv.double() @ w - yv.double()) ** 2).mean())


@pytest.mark.parametrize("perturb", ["batch", "example"])
@pytest.mark.parametrize("method", ["delta-stn", "stn"])
def test_hypergradient_points_the_right_way_on_ridge_regression(method, perturb):
    X, y, Xv, yv = _ridge_problem()
    grid = torch.linspace(math.log(1e-3), math.log(1e2), 300)
    losses = [_ridge_val_loss(X, y, Xv, yv, math.exp(g)) for g in grid]
    u_star = float(grid[min(range(len(losses)), key=losses.__getitem__)])
    assert math.log(1e-3) + 1 < u_star < math.log(1e2) - 1  # an interior optimum
    data = Dataset.from_arrays(X, y, Xv, yv, task="regression")
    for offset in (-2.5, 2.5):
        u0 = u_star + offset
        torch.manual_seed(0)
        model = nn.Sequential(stn_ext.StnLinear(X.shape[1], 1, 1, bias=False))
        cfg = TrainConfig(method=method, hypers=("weight_decay",), ranges={"weight_decay": (1e-4, 1e3)},
                          inits={"weight_decay": math.exp(u0)}, steps=800, batch_size=40, lr=0.02, hyper_lr=0.0,
                          warmup_steps=0, perturb=perturb, quiet=True)
        tr = Trainer(cfg, data=data, model=model)
        tr.fit()
        g = float(tr.hypergradient())
        h = 1e-3
        exact = (_ridge_val_loss(X, y, Xv, yv, math.exp(u0 + h)) - _ridge_val_loss(X, y, Xv, yv, math.exp(u0 - h))) / (2 * h)
        assert math.copysign(1, g) == math.copysign(1, exact), (offset, g, exact)
        assert abs(g) > 0.1 * abs(exact), (offset, g, exact)  # not a vanishing response


def test_stn_moves_l2_toward_the_optimum():
    X, y, Xv, yv = _ridge_problem()
    grid = torch.linspace(math.log(1e-3), math.log(1e2), 300)
    losses = [_ridge_val_loss(X, y, Xv, yv, math.exp(g)) for g in grid]
    u_star = float(grid[min(range(len(losses)), key=losses.__getitem__)])
    data = Dataset.from_arrays(X, y, Xv, yv, task="regression")
    torch.manual_seed(0)
    u0 = u_star + 2.5
    cfg = TrainConfig(method="delta-stn", hypers=("weight_decay",), ranges={"weight_decay": (1e-4, 1e3)},
                      inits={"weight_decay": math.exp(u0)}, steps=1200, batch_size=40, lr=0.02, hyper_lr=0.03,
                      warmup_steps=200, perturb="batch", val_per_cycle=1, train_per_cycle=2, quiet=True)
    tr = Trainer(cfg, data=data, model=nn.Sequential(stn_ext.StnLinear(X.shape[1], 1, 1, bias=False)))
    s = tr.fit()
    u_end = math.log(s["hypers"]["weight_decay"])
    assert abs(u_end - u_star) < 0.5 * abs(u0 - u_star), (u0, u_end, u_star)


# --- checkpoint / resume -------------------------------------------------------------------------------------


def _final_state(tr):
    st = {k: v.clone() for k, v in tr.model.state_dict().items()}
    st["u"], st["hscale"] = tr.u.detach().clone(), tr.hscale.detach().clone()
    return st


@pytest.mark.parametrize("kw", [dict(method="stn", perturb="example"),
                                dict(method="delta-stn", linearize=True, hypers=("dropout", "noise", "cutout"))])
def test_resume_equals_uninterrupted(small_digits, tmp_path, kw):
    base = dict(steps=60, warmup_steps=10, hidden=(16,), eval_every=16, checkpoint_every=8, hyper_lr=0.02,
                quiet=True, plots=False, **kw)
    full = Trainer(TrainConfig(out=str(tmp_path / "full"), **base), data=small_digits)
    full.fit()
    # interrupted at step 29 (checkpointed there), then resumed in a fresh Trainer
    part = Trainer(TrainConfig(out=str(tmp_path / "part"), stop_after=29, **base), data=small_digits)
    s1 = part.fit()
    assert not s1["complete"] and s1["steps"] == 29
    resumed = Trainer(TrainConfig(out=str(tmp_path / "part"), resume=True, **base), data=small_digits)
    s2 = resumed.fit()
    assert s2["complete"] and s2["steps"] == 60
    a, b = _final_state(full), _final_state(resumed)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # the logs read the same too (apart from wall times and time stamps)
    strip = lambda path: [{k: v for k, v in json.loads(line).items() if k not in ("wall_s", "time")}  # noqa: E731
                          for line in open(path)]
    assert strip(tmp_path / "full" / "epochs.jsonl") == strip(tmp_path / "part" / "epochs.jsonl")
    assert (tmp_path / "full" / "schedule.csv").read_text() == (tmp_path / "part" / "schedule.csv").read_text()
    # the best evaluation and its weights, kept across the stop
    assert s2["best"] == full.best
    assert all(torch.equal(full.best_state[k], resumed.best_state[k]) for k in full.best_state)


def test_request_stop_stops_after_a_checkpoint_and_the_run_resumes(small_digits, tmp_path):
    """Trainer.request_stop() (what SIGINT does, for a user's callback or thread) ends fit at the step boundary where
    it was asked, with a checkpoint there; resume then finishes the run."""
    base = dict(method="stn", steps=40, warmup_steps=5, hidden=(16,), eval_every=10, quiet=True, plots=False,
                out=str(tmp_path / "run"))
    tr = Trainer(TrainConfig(**base), data=small_digits)
    step = tr.weight_step

    def asking_at_17():
        out = step()
        if tr.step == 17:  # counted once this weight step is taken
            tr.request_stop()
        return out
    tr.weight_step = asking_at_17
    s = tr.fit()
    assert not s["complete"] and s["steps"] == 17
    s2 = Trainer(TrainConfig(resume=True, **base), data=small_digits).fit()
    assert s2["complete"] and s2["steps"] == 40


def test_best_evaluation_is_kept_and_restored(small_digits, tmp_path):
    """best.pt and summary["best"] hold the evaluation with the lowest validation loss (a run at a large step
    whose validation loss goes down, then up and down); restore_best() loads weights that give that loss again."""
    cfg = TrainConfig(method="fixed", steps=160, hidden=(64,), eval_every=10, lr=0.1, quiet=True, plots=False,
                      out=str(tmp_path / "run"))
    tr = Trainer(cfg, data=small_digits)
    s = tr.fit()
    evals = [json.loads(line) for line in open(tmp_path / "run" / "epochs.jsonl")]
    best = min(evals, key=lambda r: r["val_loss"])
    assert best["step"] != evals[-1]["step"], "the protocol should put the best evaluation before the last"
    assert s["best"]["step"] == best["step"] and s["best"]["val_loss"] == best["val_loss"]
    assert s["best"]["test_loss"] == best["test_loss"] and s["val_loss"] == evals[-1]["val_loss"]
    on_disk = torch.load(tmp_path / "run" / "best.pt", weights_only=True)
    assert on_disk["record"] == s["best"]
    assert tr.restore_best() == s["best"]
    assert tr.evaluate(tr.data.val)["loss"] == pytest.approx(best["val_loss"], rel=1e-12, abs=0)
    assert all(torch.equal(v, on_disk["model"][k]) for k, v in tr.model.state_dict().items())
    fresh = Trainer(cfg, data=small_digits)
    with pytest.raises(RuntimeError, match="no evaluation"):
        fresh.restore_best()


def test_resume_from_an_older_checkpoint_after_kill(small_digits, tmp_path):
    """A kill between checkpoints: resume restarts from the last checkpoint and still ends identical."""
    base = dict(method="delta-stn", steps=40, warmup_steps=5, hidden=(16,), checkpoint_every=10, quiet=True,
                plots=False)
    full = Trainer(TrainConfig(out=str(tmp_path / "a"), **base), data=small_digits)
    full.fit()
    part = Trainer(TrainConfig(out=str(tmp_path / "b"), stop_after=20, **base), data=small_digits)
    part.fit()
    import shutil
    keep = tmp_path / "b" / "checkpoint.pt"
    shutil.copy(keep, tmp_path / "ck20")
    Trainer(TrainConfig(out=str(tmp_path / "b"), stop_after=27, resume=True, **base), data=small_digits).fit()
    shutil.copy(tmp_path / "ck20", keep)  # as if killed at step 27 before its checkpoint landed
    resumed = Trainer(TrainConfig(out=str(tmp_path / "b"), resume=True, **base), data=small_digits)
    resumed.fit()
    a, b = _final_state(full), _final_state(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not [p for p in os.listdir(tmp_path / "b") if p.endswith(".tmp")]


def test_resume_a_folder_written_before_a_config_field_existed(small_digits, tmp_path):
    """A config.json without a field added later (here response_every, trial_steps) resumes when the run sets
    that field's default; a changed setting is still refused."""
    base = dict(method="delta-stn", steps=12, warmup_steps=2, hidden=(8,), batch_size=32, quiet=True, plots=False,
                out=str(tmp_path))
    Trainer(TrainConfig(stop_after=6, **base), data=small_digits).fit()
    path = tmp_path / "config.json"
    old = json.loads(path.read_text())
    for k in ("response_every", "trial_steps"):
        old.pop(k)
    path.write_text(json.dumps(old))
    with pytest.raises(ValueError, match="response_every was 0, now 3"):
        Trainer(TrainConfig(resume=True, response_every=3, **base), data=small_digits).fit()
    s = Trainer(TrainConfig(resume=True, **base), data=small_digits).fit()
    assert s["complete"] and s["steps"] == 12


@pytest.mark.parametrize("name,earlier,now", [("hyper_plain_every", 0, "2"), ("response_gain_max", 1.0, "4.0"),
                                              ("response_baseline", 0.0, "0.9")])
def test_resume_compares_a_field_added_later_with_the_value_earlier_runs_had(small_digits, tmp_path, name, earlier, now):
    """hyper_plain_every came with the default 2, but runs written before it took every hyper step perturbed (0);
    response_gain_max with 4, where earlier runs left the response's gradients as they were (1), and response_baseline
    became 0.9 (December 6) where earlier runs had none (0): resuming one with the new default would change it
    halfway, so it is refused until the old value is given."""
    base = dict(method="stn", steps=12, warmup_steps=2, hidden=(8,), batch_size=32, quiet=True, plots=False,
                out=str(tmp_path))
    Trainer(TrainConfig(stop_after=6, **{name: earlier}, **base), data=small_digits).fit()
    path = tmp_path / "config.json"
    old = json.loads(path.read_text())
    old.pop(name)
    path.write_text(json.dumps(old))
    with pytest.raises(ValueError, match=f"{name} was {earlier}, now {now}"):
        Trainer(TrainConfig(resume=True, **base), data=small_digits).fit()
    s = Trainer(TrainConfig(resume=True, **{name: earlier}, **base), data=small_digits).fit()
    assert s["complete"] and s["steps"] == 12


@pytest.mark.parametrize("method,hypers,refused", [("stn", ("dropout", "weight_decay"), False),
                                                    ("delta-stn", ("dropout", "weight_decay"), True),  # Dec 7 on
                                                    ("delta-stn", ("weight_decay",), True),
                                                    ("stn", ("weight_decay",), True)])
def test_resume_refuses_a_run_whose_response_fit_the_new_default_would_change(small_digits, tmp_path, method, hypers,
                                                                              refused):
    """Runs written before response_fit fitted the response on the gradient; its default 'auto' now takes the
    difference where every tuned hyperparameter acts smoothly, and for Delta-STN per batch whatever it tunes. A run
    the new default would switch halfway is refused until the old fit is given; one that 'auto' leaves on the
    gradient resumes as it is."""
    base = dict(method=method, hypers=hypers, steps=12, warmup_steps=2, hidden=(8,), batch_size=32, quiet=True,
                plots=False, out=str(tmp_path))
    Trainer(TrainConfig(stop_after=6, response_fit="gradient", **base), data=small_digits).fit()
    path = tmp_path / "config.json"
    old = json.loads(path.read_text())
    old.pop("response_fit")
    path.write_text(json.dumps(old))
    if refused:
        with pytest.raises(ValueError, match="response_fit was 'gradient', now 'auto'"):
            Trainer(TrainConfig(resume=True, **base), data=small_digits).fit()
        base["response_fit"] = "gradient"
    s = Trainer(TrainConfig(resume=True, **base), data=small_digits).fit()
    assert s["complete"] and s["steps"] == 12


def test_new_run_into_a_used_folder_is_refused_unless_overwrite(small_digits, tmp_path):
    base = dict(method="stn", warmup_steps=2, hidden=(8,), batch_size=32, quiet=True, plots=False, out=str(tmp_path))
    Trainer(TrainConfig(steps=12, **base), data=small_digits).fit()
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="--resume.*--overwrite"):
        Trainer(TrainConfig(steps=6, **base), data=small_digits).fit()
    assert len((tmp_path / "steps.jsonl").read_text().splitlines()) == 12  # the old run untouched
    s = Trainer(TrainConfig(steps=6, overwrite=True, **base), data=small_digits).fit()
    assert s["complete"]
    assert [json.loads(line)["step"] for line in open(tmp_path / "steps.jsonl")] == list(range(1, 7))
    assert len((tmp_path / "schedule.csv").read_text().splitlines()) == 1 + 6
    assert [r["step"] for r in map(json.loads, open(tmp_path / "epochs.jsonl"))][0] == 0
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=False)["step"] == 6
    assert json.loads((tmp_path / "config.json").read_text())["steps"] == 6
    assert (tmp_path / "notes.txt").read_text() == "mine"  # only the run's own files go


def test_overwrite_replaces_a_random_search(small_digits, tmp_path):
    base = dict(method="random", steps=8, hidden=(8,), batch_size=32, quiet=True, plots=False, out=str(tmp_path))
    train(TrainConfig(random_trials=4, **base), data=small_digits)
    with pytest.raises(FileExistsError, match="already holds a run"):
        train(TrainConfig(random_trials=2, **base), data=small_digits)
    with pytest.raises(FileExistsError, match="already holds a run"):  # nor a single run over it
        train(TrainConfig(**dict(base, method="fixed")), data=small_digits)
    s = train(TrainConfig(random_trials=2, overwrite=True, **base), data=small_digits)
    assert s["trials"] == 2 and sorted(p for p in os.listdir(tmp_path) if p.startswith("trial_")) == ["trial_0", "trial_1"]


def test_resume_without_a_checkpoint_is_an_error(small_digits, tmp_path):
    base = dict(method="stn", steps=6, hidden=(8,), batch_size=32, quiet=True, plots=False)
    typo = tmp_path / "typo"
    with pytest.raises(FileNotFoundError, match="no checkpoint in .*typo to resume from"):
        Trainer(TrainConfig(out=str(typo), resume=True, **base), data=small_digits).fit()
    assert not typo.exists()  # no run was started
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train(TrainConfig(**dict(base, method="random", random_trials=2, out=str(typo), resume=True)), data=small_digits)
    # killed before its first checkpoint: only config.json; resume says how to start it again
    open_run_folder(TrainConfig(out=str(typo), **base))
    with pytest.raises(FileNotFoundError, match="stopped before the first one.*--overwrite"):
        Trainer(TrainConfig(out=str(typo), resume=True, **base), data=small_digits).fit()


@pytest.mark.parametrize("method", ["random", "tpe"])
@pytest.mark.parametrize("stop", [13, 16])  # inside trial 1, and at its last step
def test_search_stop_after_counts_all_trials_and_resumes(small_digits, tmp_path, stop, method):
    if method == "tpe":
        pytest.importorskip("optuna")
    base = dict(method=method, steps=32, random_trials=4, hidden=(8,), batch_size=32, quiet=True, plots=False)
    full = train(TrainConfig(out=str(tmp_path / "full"), **base), data=small_digits)
    s = train(TrainConfig(out=str(tmp_path / "part"), stop_after=stop, **base), data=small_digits)
    assert not s["complete"] and s["steps"] == stop and s["trial"] == 1 and s["trial_steps"] == stop - 8
    assert not (tmp_path / "part" / "trial_2").exists()
    # resumed with the same stop_after: a run at or past its stop goes on to the end
    done = train(TrainConfig(out=str(tmp_path / "part"), resume=True, stop_after=stop, **base), data=small_digits)
    assert done["complete"]
    strip = lambda d: {k: v for k, v in d.items() if k != "wall_s"}  # noqa: E731
    assert strip(done) == strip(full)
    steps = [json.loads(line)["step"] for line in open(tmp_path / "part" / "trial_1" / "steps.jsonl")]
    assert steps == list(range(1, 9))
    assert len({json.dumps(h, sort_keys=True) for h in full["trial_hypers"]}) == 4  # each trial its own values


def test_tpe_uses_the_finished_trials(small_digits):
    optuna = pytest.importorskip("optuna")
    from stn_ext.tuning.space import HyperSpace
    from stn_ext.tuning import TPEProposer

    space = HyperSpace.build(("weight_decay",), [])
    tpe = TPEProposer(space, seed=0, n=12)
    for k in range(12):  # a loss with its minimum at weight decay 1e-3: TPE's later proposals go near it
        v = tpe.ask(k)
        tpe.tell(k, v, (math.log10(v["weight_decay"]) + 3) ** 2)
    best = tpe.study.best_params["weight_decay"]
    assert isinstance(tpe.study.sampler, optuna.samplers.TPESampler) and abs(math.log10(best) + 3) < 1.0


def test_resume_on_another_device_type_reseeds_the_generator(small_digits, tmp_path):
    base = dict(method="stn", steps=12, warmup_steps=2, hidden=(8,), batch_size=32, quiet=True, plots=False,
                out=str(tmp_path))
    Trainer(TrainConfig(stop_after=6, **base), data=small_digits).fit()
    st = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert st["gen_device"] == "cpu"
    tr = Trainer(TrainConfig(**base), data=small_digits)
    assert tr._restore_generator(st) and torch.equal(tr.gen.get_state(), st["gen"])
    legacy = {k: v for k, v in st.items() if k != "gen_device"}  # a checkpoint from before gen_device
    assert tr._restore_generator(legacy)
    cuda_state = torch.zeros(16, dtype=torch.uint8)  # a CUDA (philox) generator's state: seed, offset
    for other in (dict(st, gen_device="cuda", gen=cuda_state), dict(legacy, gen=cuda_state)):
        with pytest.warns(UserWarning, match="does not transfer"):
            assert not tr._restore_generator(other)
        reseeded = tr.gen.get_state()
        with pytest.warns(UserWarning):
            tr._restore_generator(other)
        assert torch.equal(tr.gen.get_state(), reseeded)  # deterministic
    torch.save(dict(st, gen_device="cuda", gen=cuda_state), tmp_path / "checkpoint.pt")
    with pytest.warns(UserWarning, match="reseeded"):
        s = Trainer(TrainConfig(resume=True, **base), data=small_digits).fit()
    assert s["complete"] and s["steps"] == 12


# --- CLI -------------------------------------------------------------------------------------------------------


def _cli(*args, timeout=120):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "stn_ext", *args], capture_output=True, text=True, timeout=timeout,
                          env=env)


@pytest.mark.parametrize("method", ["stn", "delta-stn"])
def test_hyper_beta2_reaches_the_hyper_optimiser_and_its_default_is_the_modes(small_digits, method):
    def betas(**kw):
        return Trainer(TrainConfig(method=method, steps=2, quiet=True, **kw), data=small_digits).tuner.opt_h.param_groups[
            0]["betas"]
    assert betas(hyper_beta2=0.999) == (0.9, 0.999)
    assert betas(hyper_beta2=0.999, perturb="example") == (0.9, 0.999)
    assert betas() == (0.9, 0.95)  # per batch, the default mode
    assert betas(perturb="example") == (0.9, 0.99)


def test_cli_help():
    r = _cli("train", "--help")
    assert r.returncode == 0
    for word in ("--method", "delta-stn", "--hypers", "weight_decay", "cutout", "--resume", "--out", "--quiet",
                 "--overwrite", "--hyper-beta2"):
        assert word in r.stdout, word
    r = _cli("demo", "--help")
    assert r.returncode == 0 and "random search" in r.stdout
    assert "--resume" in r.stdout and "a rerun replaces" in r.stdout


def test_epilog_resume_examples_match_a_run():
    lines = [line.split() for line in EPILOG.splitlines() if line.strip().startswith("python -m stn_ext train")]
    arg = lambda words, name: words[words.index(name) + 1] if name in words else None  # noqa: E731
    runs = {arg(w, "--out"): arg(w, "--method") for w in lines if "--resume" not in w}
    resumes = [w for w in lines if "--resume" in w]
    assert resumes
    for w in resumes:
        assert runs.get(arg(w, "--out")) == arg(w, "--method"), w


def test_table_marks_incomplete_runs():
    row = dict(val_loss=1.0, test_loss=1.0, wall_s=1.0)
    table = format_table(summarise([dict(row, method="stn", complete=True), dict(row, method="fixed", complete=False),
                                    dict(row, method="fixed", complete=True)]))
    assert "fixed (incomplete)" in table and "stn (incomplete)" not in table


def test_table_shows_accuracy_or_perplexity_as_the_runs_have():
    row = dict(method="stn", complete=True, val_loss=5.0, test_loss=5.1, wall_s=1.0)
    text = format_table(summarise([dict(row, val_ppl=148.4, test_ppl=164.0)])).splitlines()
    assert text[0].split() == ["method", "seeds", "val_loss", "val_ppl", "test_loss", "test_ppl", "train_s"]
    assert "148.4" in text[2] and "164.0" in text[2]
    images = format_table(summarise([dict(row, val_acc=0.81, test_acc=0.8)])).splitlines()
    assert images[0].split() == ["method", "seeds", "val_loss", "val_acc", "test_loss", "test_acc", "train_s"]


def test_cli_train_run_and_errors(tmp_path):
    out = tmp_path / "run"
    r = _cli("train", "--method", "stn", "--steps", "30", "--warmup", "10", "--hidden", "16", "--train-size", "200",
             "--out", str(out), "--no-plots")
    assert r.returncode == 0, r.stderr
    assert "val_loss" in r.stdout and "stn" in r.stdout
    assert json.loads((out / "summary.json").read_text())["steps"] == 30
    r = _cli("train", "--hypers", "dropout,bogus", "--steps", "5", "--quiet")
    assert r.returncode == 2 and "unknown hyperparameter 'bogus'" in r.stderr
    r = _cli("train", "--range", "weight_decay=0.1:0.01", "--steps", "5", "--quiet")
    assert r.returncode == 2 and "empty range" in r.stderr


def _one_error_line(r):
    lines = r.stderr.strip().splitlines()
    return r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ")


def test_cli_used_folder_and_resume_without_checkpoint(tmp_path):
    out = tmp_path / "run"
    args = lambda steps: ["train", "--method", "stn", "--steps", str(steps), "--warmup", "2", "--hidden", "8",  # noqa: E731
                          "--train-size", "128", "--no-plots", "--quiet", "--out", str(out)]
    assert _cli(*args(12)).returncode == 0
    r = _cli(*args(6))
    assert _one_error_line(r) and "--resume" in r.stderr and "--overwrite" in r.stderr, r.stderr
    r = _cli(*args(6), "--overwrite")
    assert r.returncode == 0, r.stderr
    assert [json.loads(line)["step"] for line in open(out / "steps.jsonl")] == list(range(1, 7))
    r = _cli(*args(6)[:-1], str(tmp_path / "typo"), "--resume")
    assert _one_error_line(r) and "no checkpoint" in r.stderr, r.stderr
    assert not (tmp_path / "typo").exists()


def test_cli_bad_settings_fail_before_any_run(tmp_path):
    r = _cli("demo", "--methods", "stn,fixd", "--steps", "10", "--seeds", "1", "--out", str(tmp_path), "--quiet")
    assert _one_error_line(r) and "unknown method 'fixd'" in r.stderr, r.stderr
    assert not (tmp_path / "stn_seed0").exists()  # STN did not run first
    if not (torch.cuda.is_available() and stn_ext.has_cuda()):
        r = _cli("train", "--device", "cuda", "--steps", "5", "--quiet")
        assert _one_error_line(r) and "cuda" in r.stderr, r.stderr


def test_cli_random_search_stop_after_then_resume(tmp_path):
    args = ["train", "--method", "random", "--steps", "40", "--trials", "4", "--hidden", "8", "--train-size", "128",
            "--no-plots", "--out", str(tmp_path)]
    r = _cli(*args, "--stop-after", "15")
    assert r.returncode == 130, r.stderr
    assert "random (incomplete)" in r.stdout and "stopped at step 15 of 40 (in trial 1)" in r.stderr
    assert not (tmp_path / "trial_2").exists()
    r = _cli(*args, "--resume", "--quiet")
    assert r.returncode == 0, r.stderr
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["complete"] and s["steps"] == 40 and s["trials"] == 4


@pytest.mark.parametrize("how", ["SIGINT", "SIGKILL"])
def test_cli_interrupt_then_resume_equals_uninterrupted(small_digits, tmp_path, how):
    """Ctrl-C (stops at a step boundary after a checkpoint) or kill -9 (loses the steps since the last
    checkpoint), then --resume: the final weights and hyperparameters equal an uninterrupted run."""
    import signal
    import time

    args = ["--method", "delta-stn", "--steps", "1000", "--warmup", "20", "--hidden", "16", "--train-size", "256",
            "--checkpoint-every", "50", "--no-plots", "--quiet"]
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "stn_ext", "train", *args, "--out", str(out)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out / "checkpoint.pt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(0.3)
    proc.send_signal(getattr(signal, how))
    _, err = proc.communicate(timeout=120)
    if how == "SIGINT":
        assert proc.returncode == 130, err
        assert "continue with --resume" in err
    else:
        assert proc.returncode == -signal.SIGKILL
    step = torch.load(out / "checkpoint.pt", weights_only=False)["step"]
    assert 0 < step < 1000, "the run finished before the signal; the test needs it mid-run"
    r = _cli("train", *args, "--out", str(out), "--resume", timeout=300)
    assert r.returncode == 0, r.stderr
    resumed = torch.load(out / "checkpoint.pt", weights_only=False)
    assert resumed["step"] == 1000
    cfg = TrainConfig(method="delta-stn", steps=1000, warmup_steps=20, hidden=(16,), train_size=256, quiet=True)
    ref = Trainer(cfg)
    ref.fit()
    for k, v in ref.model.state_dict().items():
        assert torch.equal(resumed["model"][k], v), k
    assert torch.equal(resumed["u"], ref.u.detach()) and torch.equal(resumed["hscale"], ref.hscale.detach())
    lines = (out / "steps.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == list(range(1, 1001))


def test_cli_demo_end_to_end_small(tmp_path):
    r = _cli("demo", "--steps", "40", "--seeds", "1", "--trials", "2", "--hidden", "16", "--warmup", "10",
             "--out", str(tmp_path), "--quiet", timeout=300)
    assert r.returncode == 0, r.stderr
    for method in ("stn", "delta-stn", "fixed", "random"):
        assert any(line.startswith(method + " ") for line in r.stdout.splitlines()), (method, r.stdout)
        assert (tmp_path / f"{method}_seed0" / "summary.json").exists()
    for col in ("val_loss", "val_acc", "test_loss", "test_acc", "train_s"):
        assert col in r.stdout
    results = json.loads((tmp_path / "demo_results.json").read_text())
    assert [x["steps"] for x in results] == [40, 40, 40, 40]
    assert (tmp_path / "comparison.png").stat().st_size > 10000, "the methods' comparison figure"
    assert "train_s: seconds in weight and hyper steps" in r.stdout


def test_cli_train_out_that_cannot_be_made_names_the_option(tmp_path):
    (tmp_path / "file").write_text("")
    r = _cli("train", "--steps", "2", "--out", str(tmp_path / "file" / "run"))
    assert r.returncode == 2
    assert r.stderr.startswith("error: stn_ext: --out ") and "cannot create the folder" in r.stderr, r.stderr
    assert len(r.stderr.splitlines()) == 1 and "Errno" not in r.stderr


def test_cli_argparse_errors_are_one_line_in_every_command():
    for cmd in ("train", "demo", "reversible"):
        r = _cli(cmd, "--no-such-option")
        assert r.returncode == 2
        assert r.stderr.startswith("error: unrecognized arguments: --no-such-option"), (cmd, r.stderr)
        assert "usage:" not in r.stderr and "--help" in r.stderr and len(r.stderr.splitlines()) == 2


def test_cli_demo_reruns_into_its_folder(tmp_path):
    args = ["demo", "--methods", "fixed,random", "--steps", "12", "--seeds", "1", "--trials", "2", "--hidden", "8",
            "--train-size", "128", "--out", str(tmp_path), "--quiet"]
    for _ in range(2):
        r = _cli(*args)
        assert r.returncode == 0, r.stderr
    assert len((tmp_path / "fixed_seed0" / "steps.jsonl").read_text().splitlines()) == 12


def test_cli_demo_ctrl_c_stops_the_demo_then_resume(tmp_path):
    import signal
    import time

    args = ["demo", "--methods", "stn,fixed", "--steps", "1000", "--seeds", "1", "--hidden", "16", "--train-size", "256",
            "--warmup", "20", "--out", str(tmp_path), "--quiet"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "stn_ext", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    ckpt = tmp_path / "stn_seed0" / "checkpoint.pt"
    deadline = time.time() + 120
    while not ckpt.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert 0 < torch.load(ckpt, weights_only=False)["step"] < 1000, "the run finished before the signal"
    assert "--resume" in err and out.strip() == ""  # no table with a cut-short run
    assert not (tmp_path / "fixed_seed0").exists()  # the demo stopped, it did not go on to the next method
    r = _cli(*args, "--resume", timeout=300)
    assert r.returncode == 0, r.stderr
    assert "incomplete" not in r.stdout
    for method in ("stn", "fixed"):
        assert any(line.startswith(method + " ") for line in r.stdout.splitlines()), (method, r.stdout)
    assert [json.loads(line)["step"] for line in open(tmp_path / "stn_seed0" / "steps.jsonl")] == list(range(1, 1001))


@pytest.mark.parametrize("perturb", ["example", "batch"])
def test_custom_hyperparameter_reaches_the_model(small_digits, perturb):
    """A hyperparameter of the user's own kind: the model reads its perturbed values in training steps, one
    per example or one for the batch."""
    seen = []

    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = models.mlp(64, 10, 2, hidden=(16,))

        def forward(self, x):
            hp = models.current_hyperparameters()
            if hp is not None and self.training:
                seen.append(hp["input_gain"].clone())
                x = x * hp["input_gain"].view(-1, 1, 1, 1)
            return self.net(x)

    space = HyperSpace([Hyper("input_gain", "custom", 0.5, 2.0, 1.0, "log"), Hyper("dropout.h1", "dropout", 0.0, 0.9, 0.1, slot="h1")])
    s = train(TrainConfig(method="stn", steps=12, warmup_steps=4, hyper_lr=0.05, perturb=perturb, quiet=True),
              data=small_digits, model=Scaled(), space=space)
    assert s["steps"] == 12 and set(s["hypers"]) == {"input_gain", "dropout.h1"}
    assert len(seen) == 12 and seen[0].shape == ((64,) if perturb == "example" else ())
    assert all(torch.all((v >= 0.5) & (v <= 2.0)) for v in seen)
    if perturb == "example":
        assert seen[0].std() > 0  # per-example perturbed values
    else:
        assert len({float(v) for v in seen}) > 1  # a fresh perturbation for every batch


def test_atomic_writes_get_the_mode_of_a_plain_open(tmp_path):
    # mkstemp creates 0600 files; run outputs should be readable as files written with open() are.
    from stn_ext import checkpoint

    checkpoint.atomic_write_text(tmp_path / "a.txt", "x")
    with open(tmp_path / "b.txt", "w") as f:
        f.write("x")
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == (tmp_path / "b.txt").stat().st_mode & 0o777


class _Exploit:
    """A pickle that would create a file when unpickled with weights_only=False."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_crafted_checkpoint_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "checkpoint.pt"
    torch.save({"model": {}, "payload": _Exploit(str(marker))}, str(path))
    assert not marker.exists()
    with pytest.raises(ValueError, match="not read"):
        checkpoint.load(str(path))
    assert not marker.exists()
    # what the trainer saves reads back
    tr = Trainer(TrainConfig(method="stn", hypers=("dropout",), steps=3, hidden=(8,), quiet=True),
                 data=digits(seed=0, train_size=64))
    checkpoint.save(str(tmp_path / "ok.pt"), tr.state_dict())
    st = checkpoint.load(str(tmp_path / "ok.pt"))
    assert st["method"] == "stn" and torch.equal(st["u"], tr.u.detach())


def test_tensorboard_scalars_survive_a_resume(small_digits, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    base = dict(method="stn", steps=24, warmup_steps=4, hidden=(8,), batch_size=32, quiet=True, plots=False,
                out=str(tmp_path), tensorboard=True, checkpoint_every=8, eval_every=8)
    Trainer(TrainConfig(stop_after=13, **base), data=small_digits).fit()  # events up to 13, checkpoint at 13
    Trainer(TrainConfig(resume=True, **base), data=small_digits).fit()
    ea = EventAccumulator(str(tmp_path / "tensorboard"))
    ea.Reload()
    steps = [e.step for e in ea.Scalars("loss/train")]
    assert sorted(steps) == list(range(1, 25)), steps  # each step once: nothing redone twice, nothing lost
    want = {"loss/val", "loss/test", "accuracy/val", "hyper/dropout.in", "sigma/weight_decay"}
    assert want <= set(ea.Tags()["scalars"])
    assert [e.step for e in ea.Scalars("loss/val")] == [0, 8, 16, 24]
    with pytest.raises(ValueError, match="tensorboard writes into the run folder"):
        TrainConfig(tensorboard=True).validate()
