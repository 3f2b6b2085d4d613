"""Tuning quality and stability of the trainer's defaults (issue 11): the ridge problem with a closed-form
optimum, divergence caught at the step and recovered (or stopped with a clear message), perturbations kept
in range, the STN re-centring as an exact reparameterisation, and bench/bench_tuning.py --quick."""
import json
import math

import pytest
import torch

import bench_scripts

import stn_ext
from stn_ext import checkpoint
from stn_ext.tuning import models
from stn_ext.tuning.divergence import Diverged, Guard
from stn_ext.tuning.problems import DropoutRegression, Ridge, digits_protocol
from stn_ext.tuning import TrainConfig, Trainer


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ridge():
    p = Ridge()
    return p, p.log_optimum()


def _ridge_trainer(p, wd0, **kw):
    cfg = dict(method="stn", hypers=("weight_decay",), ranges={"weight_decay": (1e-4, 1e4)},
               inits={"weight_decay": wd0}, steps=300, batch_size=p.n_train, quiet=True)
    cfg.update(kw)
    torch.manual_seed(cfg.get("seed", 0))
    return Trainer(TrainConfig(**cfg), data=p.dataset(), model=p.model())


def test_ridge_optimum_is_the_closed_form(ridge):
    p, u_star = ridge
    # the eigendecomposition solution is the normal equations' solution ...
    wd = 0.7
    w = torch.linalg.solve(p.x.T @ p.x + p.n_train * wd / 2 * torch.eye(p.d, dtype=torch.float64), p.x.T @ p.y)
    assert torch.allclose(p.weights(wd), w, atol=1e-10)
    # ... and u* is a minimum of the validation loss: lower than its neighbours, zero derivative
    f = lambda u: p.val_loss(math.exp(u))  # noqa: E731
    assert f(u_star) < f(u_star - 0.01) and f(u_star) < f(u_star + 0.01)
    assert abs((f(u_star + 1e-4) - f(u_star - 1e-4)) / 2e-4) < 1e-6
    assert math.log(1e-4) + 3 < u_star < math.log(1e4) - 3


def test_recentring_is_an_exact_reparameterisation():
    torch.manual_seed(0)
    model = models.mlp(6, 3, 2, hidden=(5,), input_dropout=False).double()
    layers = models.stn_layers(model)
    models.init_response(layers)
    for m in layers:  # a response that is not zero
        m.weight_hyper.data.normal_()
        m.bias_hyper.data.normal_()
    x, z = torch.randn(4, 6, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64)
    with stn_ext.hyper_input(z):
        before = model(x)
    shift = torch.tensor([0.7, -1.3], dtype=torch.float64)
    with torch.no_grad():  # what Tuner._recentre does, anchor moved by shift
        for m in layers:
            m.weight_elem.add_((m.hyper_weight @ shift)[:, None] * m.weight_hyper)
            m.bias_elem.add_((m.hyper_bias @ shift) * m.bias_hyper)
    with stn_ext.hyper_input(z - shift):
        after = model(x)
    assert torch.allclose(before, after, atol=1e-12)


@pytest.mark.parametrize("batch_size,val_rows", [(30, 50), (29, 29), (10, 10)])
def test_full_batch_training_takes_its_hyper_steps_on_the_whole_validation_set(batch_size, val_rows):
    # 30 training and 50 validation examples: a batch holding the whole training split takes hyper steps on all 50
    # validation rows (not on 30 of them, a hypergradient noisier than the weights' gradient); a minibatch keeps
    # the training batch's size for both
    p = Ridge(d=20, n_train=30, n_val=50)
    tr = _ridge_trainer(p, 1.0, batch_size=batch_size)
    assert tr.val_batch == val_rows
    for k in range(3):  # every hyper step's batch: val_rows distinct validation rows
        x, y, _ = tr._batch(tr.data.val, "val", k, tr.val_batch)
        assert len(x) == val_rows and len({tuple(r.tolist()) for r in x}) == val_rows


@pytest.mark.parametrize("method", ["stn", "delta-stn"])
@pytest.mark.parametrize("batch_size", [30, 10])
def test_full_batch_steps_the_response_by_difference_after_every_weight_step(method, batch_size):
    # per batch by difference (weight decay): Delta-STN's response steps after every weight step, and STN's too where
    # each batch is the whole training split; STN's on minibatches after every 2nd, at twice the pace; as asked
    p = Ridge(d=20, n_train=30, n_val=50)
    tr = _ridge_trainer(p, 1.0, method=method, batch_size=batch_size)
    assert tr.full_batch == (batch_size == 30) and tr.tuner.response_fit == "difference"
    assert tr.tuner.response_every == (2 if (method, batch_size) == ("stn", 10) else 1)
    assert _ridge_trainer(p, 1.0, method=method, batch_size=batch_size, response_every=3).tuner.response_every == 3


def test_trainer_recentres_the_stn_anchor_to_u(ridge):
    p, u_star = ridge
    tr = _ridge_trainer(p, math.exp(u_star + 3), steps=200, warmup_steps=20)
    tr.fit()
    assert tr.hstep > 0
    assert torch.equal(tr.anchor, tr.u.detach())  # log-scale hyperparameter: follows u
    # and the network the trainer evaluates is the one at z = u - anchor = 0 ... which the hypergradient
    # sees through the response: a nonzero slope after training
    assert float(tr.hypergradient().abs()) > 0


def test_sigma_stays_under_its_cap_and_perturbed_values_in_range(ridge):
    p, u_star = ridge
    tr = _ridge_trainer(p, 1e-4 * 1.5, steps=150, warmup_steps=10, scale_init=3.0, tau=1.0, perturb="example")
    seen = []
    orig = tr.space.to_values

    def spy(u):
        v = orig(u)
        seen.append(v.detach())
        return v

    tr.space.to_values = spy
    tr.fit()
    vals = torch.cat([v.reshape(-1) for v in seen])
    assert vals.min() >= 1e-4 * (1 - 1e-6) and vals.max() <= 1e4 * (1 + 1e-6)
    # the entropy term (tau = 1) pushes sigma up; the cap (the initial 3.0) holds it
    assert tr.sigmas()["weight_decay"] <= 3.0 + 1e-6
    assert float(tr.u.detach()) >= math.log(1e-4) - 1e-6  # u projected onto the range


def test_a_diverging_run_is_rolled_back_and_recovers(ridge, tmp_path):
    p, u_star = ridge
    # per-batch perturbations at scale 2 around wd ~ 100 push SGD (lr 0.01, momentum 0.9) past its limit
    # (wd ~ 380); each recovery halves the scale until the run is stable
    with pytest.warns(UserWarning, match="diverged at weight step"):
        tr = _ridge_trainer(p, 100.0, steps=400, warmup_steps=0, scale_init=2.0, perturb="batch",
                            out=str(tmp_path / "run"), checkpoint_every=25)
        s = tr.fit()
    assert s["recoveries"] >= 1 and s["complete"]
    assert math.isfinite(s["val_loss"]) and all(math.isfinite(v) for v in s["hypers"].values())
    assert s["sigmas"]["weight_decay"] <= 2.0 / 2 ** s["recoveries"] + 1e-6
    steps = [json.loads(line)["step"] for line in open(tmp_path / "run" / "steps.jsonl")]
    assert steps == list(range(1, 401))  # rolled-back steps are redone, not logged twice
    assert all(math.isfinite(json.loads(line)["train_loss"]) for line in open(tmp_path / "run" / "steps.jsonl"))


@pytest.mark.parametrize("seed", [7, 13])
def test_a_run_rolled_back_after_the_warm_up_still_reaches_the_optimum(ridge, seed):
    """Per-batch STN from 100x above (issue 22): its response runs away right after the warm-up (|V W_h| many times
    the slope asked for) and the run is rolled back. Seed 7: before the response and the hyper optimiser's moments
    were restarted and sigma regrown with its cap, it ended 3.8 log units off: the snapshot's Adam state held the
    runaway's hypergradients and moved u at 1/30 of its rate. Seed 13 (|V| 0.3 drawn, 1 with the floor): before each
    restart slowed the response, it ran away again after each roll-back until the third halved the hyper learning
    rate, and ended 1.9 log units off. With the gradient fit (the default where masks are drawn); fitted by difference
    (the default for a weight decay since December 6) neither seed rolls back."""
    p, u_star = ridge
    tr = _ridge_trainer(p, math.exp(u_star + math.log(100)), steps=3000, perturb="batch", seed=seed,
                        response_fit="gradient")
    with pytest.warns(UserWarning, match="diverged at weight step"):
        s = tr.fit()
    assert s["recoveries"] >= 1 and s["complete"]
    assert abs(math.log(s["hypers"]["weight_decay"]) - u_star) <= 0.05


def test_an_unrecoverable_divergence_stops_naming_the_step_and_keeps_the_last_good_checkpoint(ridge, tmp_path):
    p, u_star = ridge
    out = tmp_path / "run"
    tr = _ridge_trainer(p, 1.0, method="fixed", lr=2.0, steps=400, out=str(out), checkpoint_every=1)
    with pytest.raises(Diverged, match=r"diverged at weight step (\d+) .*weight_decay.*smaller learning rate") as e:
        tr.fit()
    step = int(e.value.args[0].split("weight step ")[1].split()[0])
    st = checkpoint.load(str(out / "checkpoint.pt"), map_location="cpu")
    assert 0 <= st["step"] < step
    assert all(bool(v.isfinite().all()) for v in st["model"].values())


def test_a_snapshot_that_diverges_again_is_given_up_for_the_one_before():
    g = Guard()
    g.take({"w": 1}, 50)
    g.take({"w": 2}, 100)
    assert g.restore() == {"w": 2}
    # diverged again before the next snapshot: the state at 100 was already on its way out
    assert g.restore() == {"w": 1} and g.snapshot_step == 50
    assert g.restore() == {"w": 1}  # nothing older: stays
    g.take({"w": 3}, 100)
    assert g.restore() == {"w": 3}  # a healthy stretch since: the newest first again
    g.take({"w": 4}, 150, keep_older=False)  # a checkpoint: no roll-back past the records on disk
    assert g.restore() == {"w": 4} and g.restore() == {"w": 4}


def test_stn_methods_give_up_after_repeated_divergence(ridge):
    p, u_star = ridge
    tr = _ridge_trainer(p, 1.0, lr=5.0, steps=300, warmup_steps=0)
    with pytest.warns(UserWarning, match="rolled back"):
        with pytest.raises(Diverged, match="halved the perturbation scales 6 times"):
            tr.fit()


# The issue-11 targets (0.05 log units per batch, 0.10 per example) after 3000 weight steps, seed 0, every
# method, perturbation mode and side (bench/bench_tuning.py runs 3 and 7 seeds: bench/results/tuning-*.md)
@pytest.mark.parametrize("method,perturb,side,tol", [
    (m, p, side, 0.05 if p == "batch" else 0.10) for m in ("stn", "delta-stn") for p in ("batch", "example")
    for side in (-1, 1)])
def test_defaults_reach_the_ridge_optimum(ridge, method, perturb, side, tol):
    p, u_star = ridge
    tr = _ridge_trainer(p, math.exp(u_star + side * math.log(100)), method=method, steps=3000, perturb=perturb)
    s = tr.fit()
    gap = float(tr.u.detach()) - u_star
    assert abs(gap) < tol, (method, perturb, side, gap)
    assert s["recoveries"] == 0


def test_bench_tuning_quick(tmp_path):
    bench = bench_scripts.load("bench_tuning")
    res = bench.main(["--quick", "--only", "digits", "--out", str(tmp_path)])
    rows = {r["method"]: r for r in res["digits"]}
    assert set(rows) == {"fixed", "random", "stn (no hyper steps)", "stn", "delta-stn"}
    assert all(math.isfinite(r["best_val_loss"]) for r in rows.values())
    assert rows["stn"]["best_val_loss"] < rows["fixed"]["best_val_loss"]
    assert (tmp_path / "tuning-quick.md").exists() and (tmp_path / "tuning-quick.json").exists()


def test_digits_protocol_split():
    d = digits_protocol()
    assert (len(d.train), len(d.val), len(d.test)) == (1000, 400, 397)
    assert float(d.train.x.max()) <= 1.0 and d.train.x.shape[1] == 64


def test_cli_reports_a_divergence_in_one_line(tmp_path, capsys):
    from stn_ext.tuning.cli import main

    rc = main(["--method", "fixed", "--lr", "1e6", "--steps", "50", "--hypers", "weight_decay", "--range",
               "weight_decay=1e-3:1", "--init", "weight_decay=1", "--out", str(tmp_path / "run"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 1
    assert err.startswith("error: stn_ext: training diverged at weight step ") and "Traceback" not in err
    assert "no checkpoint had been written" in err


# Input dropout on linear regression: the best response and the optimal rate (0.224) in closed form. From 0.05,
# with the defaults, Delta-STN's rate arrives (both modes: 0.233 per batch, 0.232 per example after 2400 steps,
# bench/diagnose_delta_stn.py toy) and its learned response points the closed form's way. STN with the default
# raw-logit input diverges on this problem (docs/trainer.md); with the recentred input it arrives too.
# Per example the end point varies more by seed: over seeds 0-6 one run in seven ended outside 0.04 both with hyper
# steps on 60 of the 200 validation rows (seed 4: 0.179) and on all of them (seed 0: 0.274, the full-batch rule
# since December 7; mean distance 0.016 against 0.018), so that mode is judged on three seeds. Its slope V, one
# number here, is noisy per example: on seed 2 it wandered over -0.11..-0.36 in the last 400 steps and stood at
# +0.012 after the last one (the response then 0.02 long, pointing away), so there two of the three final
# responses must point the closed form's way.
@pytest.mark.parametrize("method,perturb,extra,seeds", [("delta-stn", "batch", {}, (0,)),
                                                        ("delta-stn", "example", {}, (0, 1, 2)),
                                                        ("stn", "batch", {"hyper_input": "recentred"}, (0,))])
def test_dropout_rate_reaches_the_closed_form_optimum(method, perturb, extra, seeds):
    prob = DropoutRegression()
    p_star = prob.optimum()
    gaps, cosines = [], []
    for seed in seeds:
        cfg = TrainConfig(method=method, hypers=("dropout",), inits={"dropout": 0.05}, steps=3000, seed=seed,
                          batch_size=prob.n_train, perturb=perturb, quiet=True, **extra)
        torch.manual_seed(seed)
        tr = Trainer(cfg, data=prob.dataset(), model=prob.model())
        s = tr.fit()
        u = float(tr.u.detach())
        gaps.append(abs(prob.rate(u) - p_star))
        layer = tr.tuner.layers[0]
        learned = (layer.hyper_weight[:, 0:1] * layer.weight_hyper).detach().double().reshape(-1)
        true = prob.response_jacobian(u)
        cosines.append(float(learned @ true / (learned.norm() * true.norm())))
        assert s["recoveries"] == 0
    # one seed within 0.04; three within 0.03 on average, none beyond 0.06
    assert (max(gaps) < 0.04) if len(gaps) == 1 else (sum(gaps) / len(gaps) < 0.03 and max(gaps) < 0.06), \
        (method, perturb, gaps, p_star)
    assert sum(c > 0.5 for c in cosines) >= len(cosines) - len(cosines) // 3, cosines


# A near-square ridge instance (bench_tuning.py --only ridge-family --family-seed 23, i1: 26 features, 28 examples),
# STN per batch from 100x below its optimum, seed 1. There the response's signal is proportional to the tiny weight
# decay, and without the baseline the weights' own descent (its gradient times the perturbation) set the response's
# sign wrong during the warm-up: u ran to the range's edge, 7.2 log units off. With it (the default), it corrects the
# response while the weights descend and stops for good once they have converged. (The baseline serves the gradient
# fit, the default where masks are drawn; the fit by difference, the default here since December 6, subtracts the same
# batch's gradient at u instead and ends within 0.006 without it.)
@pytest.mark.parametrize("baseline,ok", [(None, True), (0.0, False)])
def test_the_response_baseline_keeps_stn_from_far_below_on_a_near_square_ridge(baseline, ok):
    p = Ridge(d=26, n_train=28, n_val=50, noise=3.7976, signal=9.4976, seed=84093566)
    u_star = p.log_optimum()
    kw = {} if baseline is None else {"response_baseline": baseline}
    tr = _ridge_trainer(p, math.exp(u_star - math.log(100)), steps=3000, seed=1, response_fit="gradient", **kw)
    tr.fit()
    gap = float(tr.u.detach()) - u_star
    assert (abs(gap) < 0.05) == ok, (baseline, gap)
    if ok:  # on from the warm-up's end (step 300) for hundreds of steps, then stopped before the run's end
        assert tr.tuner.baseline.stopped and tr.tuner.baseline.seen > 600


# Family 25's i1 (bench_tuning.py --only ridge-family --family-seed 25: 22 features, 30 examples), STN per batch from
# 100x above, seed 1. With one hyperparameter V is a single number, and seed 1 draws |V| = 0.18: its response learns at
# 0.18^2 of the pace of a row of length 1, keeps a stale part, and the run ended far below the optimum. The floor on
# the rows of V (the default, models.ROW_FLOOR) starts it at length 1.
@pytest.mark.parametrize("floor,ok", [(None, True), (0.0, False)])
def test_a_response_drawn_slow_starts_at_the_floor_and_reaches_the_optimum(floor, ok, monkeypatch):
    if floor is not None:
        monkeypatch.setattr(models, "ROW_FLOOR", floor)
    p = Ridge(d=22, n_train=30, n_val=50, noise=0.2753, signal=0.789, seed=412963308)
    u_star = p.log_optimum()
    tr = _ridge_trainer(p, math.exp(u_star + math.log(100)), steps=3000, seed=1)
    assert abs(float(tr.tuner.layers[0].hyper_weight)) == pytest.approx(1.0 if ok else 0.18, abs=0.005)
    tr.fit()
    gap = float(tr.u.detach()) - u_star
    assert (abs(gap) < 0.05) == ok, (floor, gap)


# Family 33's i7 (bench_tuning.py --only ridge-family --family-seed 33: 63 features, 77 examples), Delta-STN per batch
# from 100x above, seed 0. Fitted on the gradient at delta, the response learns at sigma^2 times the weights' pace, its
# slow directions lag behind u's approach, and the run settles at that stale response's equilibrium, 0.2 above. Fitted
# by difference (the default for a weight decay) it steps at the weights' pace and arrives.
@pytest.mark.parametrize("fit,ok", [("auto", True), ("gradient", False)])
def test_delta_stn_with_the_response_by_difference_arrives_from_far_above(fit, ok):
    p = Ridge(d=63, n_train=77, n_val=50, noise=2.8615, signal=5.4402, seed=531896839)
    u_star = p.log_optimum()
    tr = _ridge_trainer(p, math.exp(u_star + math.log(100)), steps=3000, seed=0, method="delta-stn", response_fit=fit)
    assert tr.tuner.response_fit == ("difference" if ok else "gradient")
    tr.fit()
    gap = float(tr.u.detach()) - u_star
    assert math.isfinite(gap) and (abs(gap) < 0.05) == ok, (fit, gap)
