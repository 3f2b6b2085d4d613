"""bench/delta_stn_variants.py's changes to Delta-STN's response (issue 22, docs/trainer.md "Forward mode's lessons for
Delta-STN's response"): the figures measured through it rest on each change doing what it says, and on nothing else."""
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
                        (defaults, "response_fit"), (defaults, "DIFFERENCE_PACE")):
        monkeypatch.setattr(owner, name, getattr(owner, name))
    return bench_scripts.load("delta_stn_variants")


def _tuner():
    torch.manual_seed(0)
    model = mlp(20, 5, 3, (16, 16))
    space = HyperSpace.build(("dropout",), dropout_slots=["in", "h1", "h2"], inits={"dropout": 0.1})
    return Tuner(model, space, torch.optim.SGD(model.parameters(), lr=0.01), F.cross_entropy, method="delta-stn",
                 total_steps=100, warmup_steps=0)


def test_v_near_one_starts_every_rate_alike(variants):
    default = torch.cat([m.hyper_weight.reshape(-1) for m in _tuner().layers])
    assert (default < 0).any()  # N(0, 1/n), rows raised to length 1: signs at random
    variants.v_near_one()
    tu = _tuner()
    for m in tu.layers:
        assert torch.count_nonzero(m.weight_hyper) == 0 and torch.count_nonzero(m.bias_hyper) == 0
        assert (m.hyper_weight - 1).abs().max() < 0.5 and (m.hyper_bias - 1).abs().max() < 0.5


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


def test_delta_stn_difference_changes_delta_stn_per_batch_alone(variants):
    args = (["dropout"], False, 1.0)
    before = {(m, q): defaults.response_fit("auto", m, q, *args, centred=True)
              for m in ("stn", "delta-stn") for q in ("batch", "example")}
    assert before[("delta-stn", "batch")] == "gradient"
    variants.delta_stn_difference()
    after = {(m, q): defaults.response_fit("auto", m, q, *args, centred=True)
             for m in ("stn", "delta-stn") for q in ("batch", "example")}
    assert after == {**before, ("delta-stn", "batch"): "difference"}
    assert defaults.response_fit("auto", "delta-stn", "batch", ["dropout"], True, 1.0) == "gradient"  # linearised
