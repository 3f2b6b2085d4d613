"""bench/diagnose_delta_stn.py's response step with common random numbers and a control variate (issue 22,
bench/results/delta-stn-response-noise-2026-12-05.md): the figures there rest on its replaying the general step's
draws and cancelling the gradient's part that does not depend on delta."""

import pytest
import torch
import torch.nn.functional as F

import bench_scripts

from stn_ext.tuning import Tuner
from stn_ext.tuning.models import mlp
from stn_ext.tuning.space import HyperSpace


pytestmark = pytest.mark.usefixtures("one_thread")


def _response_grads(control_variate, sigma):
    """The response parameters' gradients of one response step (after its general step) of a small MLP with three
    dropout rates at 0.3, perturbed by ``sigma``."""
    torch.manual_seed(0)
    model = mlp(20, 5, 3, (32, 32))
    space = HyperSpace.build(("dropout",), dropout_slots=["in", "h1", "h2"], inits={"dropout": 0.3})
    tu = Tuner(model, space, torch.optim.SGD(model.parameters(), lr=0.01), F.cross_entropy, method="delta-stn",
               total_steps=100, warmup_steps=0, scale_init=sigma, response_every=1, response_fit="gradient")
    with torch.no_grad():  # a response that is not zero, so that the path's gradient is
        for m in tu.layers:
            m.weight_hyper.normal_(0, 0.1)
    seen = []
    apply = tu._apply

    def recording(loss, params, *args, **kw):
        if params is tu.response_params:
            seen.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params, retain_graph=True)]))
        return apply(loss, params, *args, **kw)

    tu._apply = recording
    if control_variate:
        bench_scripts.load("diagnose_delta_stn").response_with_control_variate(tu)
    x, y = torch.randn(64, 20), torch.randint(0, 5, (64,))
    tu.weight_step(x, y)
    return seen[0]


def test_the_control_variate_cancels_the_part_of_the_response_gradient_that_does_not_depend_on_delta():
    # With a tiny perturbation no mask flips under common random numbers, and the plain gradient is mostly the
    # general step's gradient along the path (V delta) (.) W_h, which the control variate removes. What remains is
    # that step's own change of the weights (one step at lr 0.01) and terms of order sigma^2: 1.6% and 1.2% of the
    # plain gradient here. Draws not replayed, or no control variate, leave about all of it (both checked).
    for sigma in (1e-3, 1e-4):
        plain, corrected = _response_grads(False, sigma), _response_grads(True, sigma)
        assert plain.norm() > 0 and torch.isfinite(corrected).all()
        assert corrected.norm() < 0.05 * plain.norm(), (sigma, float(corrected.norm()), float(plain.norm()))


def test_response_cv_is_only_for_delta_stn_hypergrad():
    diag = bench_scripts.load("diagnose_delta_stn")
    with pytest.raises(SystemExit):
        diag.main(["ridge", "--response-cv"])


def test_ridge_hold_keeps_u_and_its_plain_gradient_is_the_one_through_the_learned_response(monkeypatch):
    """diagnose_delta_stn.py ridge --hold (bench/results/tuning-2026-12-06-s22-where-issue-22-stands.md): u stays at
    u* + HOLD, and on plain hyper steps (at u) u's gradient is the validation batch's slope through the learned response,
    whose mean over batches is the whole validation set's at the same weights: the means agree within the noise."""
    monkeypatch.syspath_prepend(bench_scripts.BENCH)  # the script imports bench_tuning as its neighbour
    res = bench_scripts.load("diagnose_delta_stn").main(
        ["ridge", "--method", "stn", "--family-seed", "26", "--instance", "i4", "--seed", "1", "--hold", "0.05",
         "--steps", "1500"])
    assert res["u_minus_opt"] == pytest.approx(0.05, abs=1e-6)
    plain, perturbed = res["plain"], res["perturbed"]
    assert plain["n"] >= 90 and perturbed["n"] >= 90
    assert abs(plain["mean"] - plain["through_response"]) < 4 * plain["se"]
    assert plain["closed_form"] == pytest.approx(0.0030, abs=3e-4)  # the instance's slope at +0.05: flat
