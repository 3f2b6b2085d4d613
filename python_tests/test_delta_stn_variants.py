"""bench/delta_stn_variants.py's changes to Delta-STN's response (issue 22, docs/trainer.md "Forward mode's lessons for
Delta-STN's response", "Delta-STN's response where masks are drawn"): the figures measured through it rest on each
change doing what it says, and on nothing else."""
import io
import math

import pytest
import torch
import torch.nn.functional as F

import bench_scripts

from stn_ext.tuning import Tuner, core, defaults, models
from stn_ext.tuning.augment import BatchRandom
from stn_ext.tuning.models import mlp
from stn_ext.tuning.space import HyperSpace


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def variants(monkeypatch):
    """The wrapper's module, every attribute it replaces restored after the test."""
    for owner, name in ((core.Tuner, "_eps"), (core.Tuner, "_response_step"),
                        (core.response_steps, "general_and_difference"), (models, "init_response"),
                        (models, "cap_path"),
                        (defaults, "response_fit"), (defaults, "DIFFERENCE_PACE"),
                        (defaults, "MASKED_DIFFERENCE_PACE"), (defaults, "PATH_CAP"), (core.response_steps, "_scaled"),
                        (core.Tuner, "__init__")):
        monkeypatch.setattr(owner, name, getattr(owner, name))
    return bench_scripts.load("delta_stn_variants")


def _tuner(hypers=("dropout",)):
    torch.manual_seed(0)
    space = HyperSpace.build(hypers, dropout_slots=["in", "h1", "h2"],
                             inits={"dropout": 0.1} if "dropout" in hypers else {})
    model = mlp(20, 5, len(space), (16, 16))
    return Tuner(model, space, torch.optim.SGD(model.parameters(), lr=0.01), F.cross_entropy, method="delta-stn",
                 total_steps=100, warmup_steps=0)


def test_v_near_one_starts_every_rate_alike_on_any_space(variants):
    smooth = torch.cat([m.hyper_weight.reshape(-1) for m in _tuner(("weight_decay", "noise")).layers])
    assert (smooth < 0).any()  # N(0, 1/n), rows raised to length 1: signs at random
    variants.v_near_one()
    tu = _tuner(("weight_decay", "noise"))
    for m in tu.layers:
        assert torch.count_nonzero(m.weight_hyper) == 0 and torch.count_nonzero(m.bias_hyper) == 0
        assert (m.hyper_weight - 1).abs().max() < 0.5 and (m.hyper_bias - 1).abs().max() < 0.5


def test_near_one_columns_starts_only_the_first_columns_near_one(variants):
    variants.near_one_columns(2)
    tu = _tuner()  # three dropout rates: the response by difference, started near V = 1 (defaults.difference_settings)
    assert tu.near_one
    for m in tu.layers:
        for v in (m.hyper_weight, m.hyper_bias):
            assert (v[:, :2] - 1).abs().max() < 0.5
            assert v[:, 2:].abs().max() < 0.5 and (v[:, 2:] != 0).all()


def test_watch_cap_reports_and_changes_nothing(variants):
    torch.manual_seed(3)
    tu = _tuner()
    with torch.no_grad():
        for m in tu.layers:  # paths past the cap on some rows
            m.weight_hyper.normal_(0, 5.0)
        plain = [m.weight_hyper.clone() for m in tu.layers]
        models.cap_path(tu.layers, 0.3 * torch.ones(3), 0.5)
        capped = [m.weight_hyper.clone() for m in tu.layers]
        for m, w in zip(tu.layers, plain):
            m.weight_hyper.copy_(w)
        out = io.StringIO()
        variants.watch_cap(1, out)
        models.cap_path(tu.layers, 0.3 * torch.ones(3), 0.5)
    assert all(torch.equal(m.weight_hyper, c) for m, c in zip(tu.layers, capped))
    assert not all(torch.equal(c, w) for c, w in zip(capped, plain))  # the cap acted
    assert "layer 0: shortened" in out.getvalue() and "layer 2" in out.getvalue()


def test_coordinate_draws_one_hyperparameter_in_turn_inside_the_response_step_only(variants):
    variants.coordinate_response_draws()
    tu = _tuner()
    rnd = BatchRandom(torch.Generator().manual_seed(1), 8)
    assert torch.count_nonzero(tu._eps(rnd)) == 3  # outside the response step: a Gaussian draw on every coordinate
    tu._in_response = True
    draws = torch.stack([tu._eps(rnd) for _ in range(6)])
    assert torch.equal(draws.abs(), math.sqrt(3) * torch.eye(3).repeat(2, 1))
    x, y = torch.randn(8, 20), torch.randint(0, 5, (8,))
    tu._in_response = False
    seen = []
    eps = core.Tuner._eps
    tu._eps = lambda r: seen.append((tu._in_response, eps(tu, r))) or seen[-1][1]
    tu.weight_step(x, y)  # Delta-STN's general step and its response step
    assert [flag for flag, _ in seen] == [True] and torch.count_nonzero(seen[0][1]) == 1


def test_gradient_where_masked_changes_delta_stn_per_batch_with_masks_alone(variants):
    cases = [(m, q, k) for m in ("stn", "delta-stn") for q in ("batch", "example") for k in ("dropout", "weight_decay")]
    before = {c: defaults.response_fit("auto", c[0], c[1], [c[2]], False, 1.0) for c in cases}
    assert before[("delta-stn", "batch", "dropout")] == "difference"  # the defaults, since December 7
    variants.gradient_where_masked()
    after = {c: defaults.response_fit("auto", c[0], c[1], [c[2]], False, 1.0) for c in cases}
    assert after == {**before, ("delta-stn", "batch", "dropout"): "gradient"}


def test_the_paces_and_the_cap_reach_the_tuner(variants):
    defaults.DIFFERENCE_PACE = defaults.MASKED_DIFFERENCE_PACE = 0.25
    defaults.PATH_CAP = 0.0
    tu = _tuner()
    assert (tu.difference_pace, tu.near_one, tu.path_cap) == (0.25, True, 0.0)
    assert _tuner(("weight_decay",)).difference_pace == 0.25


def test_row_normalised_divides_each_gates_step_by_its_factors_squares(variants):
    tu = _tuner()
    for m in tu.layers:
        m.weight_hyper.data.normal_()
    d, sigma = torch.tensor([0.3, -0.2, 0.1]), torch.full((3,), 0.3)
    ones = [torch.ones_like(p) for p in tu.response_params]
    plain = core.response_steps._scaled(tu, [g.clone() for g in ones], d, sigma)
    variants.row_normalised()
    got = core.response_steps._scaled(tu, [g.clone() for g in ones], d, sigma)
    m = tu.layers[0]  # its W_h, V, b_h, C: the first four
    rows = 1 / (m.hyper_weight.square().sum(1) + m.weight_hyper.square().sum(1))
    bias = 1 / (m.hyper_bias.square().sum(1) + m.bias_hyper.square())
    torch.testing.assert_close(got[0], plain[0] * rows[:, None])
    torch.testing.assert_close(got[1], plain[1] * rows[:, None])
    torch.testing.assert_close(got[2], plain[2] * bias)
    torch.testing.assert_close(got[3], plain[3] * bias[:, None])


def test_the_nudges_scale_the_start_by_about_one_rounding_step_and_nothing_else(variants):
    plain = _tuner()
    variants.nudge_v(1)
    variants.nudge_weights(2)
    tu = _tuner()
    for a, b in zip(plain.layers, tu.layers):
        torch.testing.assert_close(b.hyper_weight, a.hyper_weight * (1 + 1e-7), rtol=0, atol=1e-7)
        assert not torch.equal(b.hyper_weight, a.hyper_weight) and torch.equal(b.hyper_bias, a.hyper_bias)
    for a, b in zip(plain.general_params, tu.general_params):
        torch.testing.assert_close(b, a * (1 + 2e-7), rtol=0, atol=1e-6)
    assert not all(torch.equal(a, b) for a, b in zip(plain.general_params, tu.general_params))
