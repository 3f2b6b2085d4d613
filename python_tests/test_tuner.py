"""stn_ext.tuning.Tuner in a user's own loop: any optimiser, any loss, DataLoader batches, autocast,
state_dict for the user's checkpoints; and the example that shows it."""
import copy
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import stn_ext
from stn_ext.tuning.space import HyperSpace
from stn_ext.tuning.models import HyperDropout
from stn_ext.tuning import Tuner
from stn_ext.tuning.core import inv_softplus
from stn_ext.tuning.response_baseline import ResponseBaseline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _setup(method="delta-stn", loss=None, steps=40, opt=torch.optim.AdamW, **kw):
    torch.manual_seed(0)
    space = HyperSpace.build(("dropout", "weight_decay"), dropout_slots=["in", "h1"])
    model = torch.nn.Sequential(HyperDropout("in"), torch.nn.Linear(12, 16), torch.nn.ReLU(), HyperDropout("h1"),
                                torch.nn.Linear(16, 3))
    stn_ext.convert(model, n_hyper=len(space))
    kw = {"warmup_steps": 4, "train_per_cycle": 2, **kw}
    tuner = Tuner(model, space, opt(model.parameters(), lr=1e-2), loss or torch.nn.CrossEntropyLoss(), method=method,
                  total_steps=steps, **kw)
    return model, tuner


def _batches(n, seed):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 12, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(n)]


def _run(tuner, train, val):
    vi = iter(val)
    for x, y in train:
        tuner.weight_step(x, y)
        for _ in range(tuner.hyper_steps_due()):
            tuner.hyper_step(*next(vi))


@pytest.mark.parametrize("method", ["stn", "delta-stn"])
@pytest.mark.parametrize("loss", [torch.nn.CrossEntropyLoss(), lambda o, y: F.cross_entropy(o, y, reduction="none")],
                         ids=["scalar-loss", "per-example-loss"])
def test_hyperparameters_move_in_a_user_loop(method, loss):
    model, tuner = _setup(method, loss)
    u0 = tuner.u.detach().clone()
    _run(tuner, _batches(40, 1), _batches(40, 2))
    assert tuner.step == 40 and tuner.hstep == (40 - 4) // 2
    assert not torch.equal(tuner.u.detach(), u0)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    with tuner.evaluating():
        assert not model.training
        out = model(torch.randn(5, 12))
    assert model.training and out.shape == (5, 3)
    assert set(tuner.scalars()) == {"hyper/dropout.in", "hyper/dropout.h1", "hyper/weight_decay", "sigma/dropout.in",
                                    "sigma/dropout.h1", "sigma/weight_decay"}


def test_the_response_step_on_part_of_the_batch():
    """response_rows=0.5: Delta-STN's response step runs on half the batch's rows (every second one, with their
    random draws); the hyperparameters still move and nothing goes non-finite."""
    model, tuner = _setup("delta-stn", response_rows=0.5, response_every=1, perturb="example")
    seen = []
    model.register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach().clone()))
    u0 = tuner.u.detach().clone()
    train = _batches(12, 1)
    _run(tuner, train, _batches(12, 2))
    assert [len(x) for x in seen[:7]] == [8, 8, 8, 8, 8, 4, 8]  # warm-up: general steps; then general, response, hyper
    assert torch.equal(seen[5], train[4][0][1::2])  # the response step's rows: 1, 3, 5, 7 of the step's batch
    assert not torch.equal(tuner.u.detach(), u0)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    with pytest.raises(ValueError, match="response_rows"):
        _setup("delta-stn", response_rows=1.5)


def test_a_part_of_a_split_batch_picks_the_same_rows_and_draws_on_any_split():
    """BatchRandom.pick on each rank of a split batch picks that rank's rows of the rows one process would pick,
    and draws what one process draws for them."""
    from stn_ext.tuning.augment import BatchRandom

    rows, draws = [], []
    for rank in range(2):
        picked, rnd = BatchRandom(torch.Generator().manual_seed(5), 8, offset=4 * rank, local=4).pick(0.375)
        rows.append(picked + 4 * rank)
        draws.append(rnd.randn(2))
    picked, rnd = BatchRandom(torch.Generator().manual_seed(5), 8).pick(0.375)
    assert torch.cat(rows).tolist() == picked.tolist() == [2, 5, 7]
    assert torch.equal(torch.cat(draws), rnd.randn(2))
    with pytest.raises(ValueError, match="picks none"):
        BatchRandom(torch.Generator(), 4).pick(0.2)


def _draw_pass(rnd):
    """What a training pass draws: a dropout mask's uniforms, a noise draw, a shared uniform."""
    return [rnd.rand(3), rnd.randn(2, 2), rnd.shared_rand(4)]


def test_a_replayed_pass_gets_the_recorded_draws_without_moving_the_generator():
    """The response by difference replays the general pass's draws from its DrawTape: the same numbers a pass from
    the generator's state before it would draw, the generator left where the recorded pass left it."""
    from stn_ext.tuning import response_steps
    from stn_ext.tuning.augment import BatchRandom, recording

    gen = torch.Generator().manual_seed(3)
    rnd = BatchRandom(gen, 6, offset=2, local=3)
    start = gen.get_state()
    with recording(rnd) as tape:
        first = _draw_pass(rnd)
    after = gen.get_state()
    assert tape.usable
    with response_steps._replaying(rnd, tape, 3):
        again = _draw_pass(rnd)
    assert all(a is b or torch.equal(a, b) for a, b in zip(first, again))
    assert torch.equal(gen.get_state(), after)
    gen.set_state(start)
    assert all(torch.equal(a, b) for a, b in zip(first, _draw_pass(BatchRandom(gen, 6, offset=2, local=3))))
    with response_steps._replaying(rnd, tape, 3), pytest.raises(RuntimeError, match="must not depend"):
        rnd.rand(4)  # the pass it replays drew 3 per row first


@pytest.mark.parametrize("spoil", ["draw past the BatchRandom", "change a draw in place"])
def test_a_tape_that_may_not_hold_the_draws_replays_from_the_generator(spoil):
    """A model that draws from the generator itself (current_random().generator), or changes a draw in place,
    leaves a tape that does not hold the pass's draws as they were: the replay draws them again from the generator's
    state before the pass, as before the tape, and gives the pass's numbers."""
    from stn_ext.tuning import response_steps
    from stn_ext.tuning.augment import BatchRandom, recording

    gen = torch.Generator().manual_seed(4)
    rnd = BatchRandom(gen, 3)
    with recording(rnd) as tape:
        first = [d.clone() for d in _draw_pass(rnd)]
        if spoil == "draw past the BatchRandom":
            first.append(torch.rand(5, generator=rnd.generator))
        else:
            rnd.tape.draws[0].mul_(2)
    assert not tape.usable
    after = gen.get_state()
    with response_steps._replaying(rnd, tape, 3):
        again = _draw_pass(rnd) + ([torch.rand(5, generator=rnd.generator)] if len(first) == 4 else [])
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert torch.equal(gen.get_state(), after)


@pytest.mark.parametrize("baseline,repeat,stopped", [(0.0, False, False), (0.9, True, False), (0.9, False, True)])
def test_state_dict_resumes_bit_for_bit(baseline, repeat, stopped):
    """Saved after 12 steps and resumed, a run ends where the unbroken run ends: with the response baseline live at the
    save (one batch over and over: the weights descend, beta ~1) and after it stopped (fresh batches: noise)."""
    train = _batches(1, 1) * 30 if repeat else _batches(30, 1)
    val = _batches(30, 2)
    model, tuner = _setup("stn", steps=30, response_baseline=baseline)
    _run(tuner, train, val)
    want = [p.detach() for p in model.parameters()] + [tuner.u.detach()]

    model, tuner = _setup("stn", steps=30, response_baseline=baseline)
    _run(tuner, train[:12], val)
    if baseline:
        assert tuner.baseline.stopped == stopped and (tuner.baseline.mean is None) == stopped
    saved = {"model": model.state_dict(), "opt": tuner.opt_w.state_dict(), "tuner": tuner.state_dict()}
    model, tuner = _setup("stn", steps=30, response_baseline=baseline)
    model.load_state_dict(saved["model"])
    tuner.opt_w.load_state_dict(saved["opt"])
    tuner.load_state_dict(saved["tuner"])
    _run(tuner, train[12:], val[tuner.hstep:])
    got = [p.detach() for p in model.parameters()] + [tuner.u.detach()]
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_dataloader_and_autocast():
    model, tuner = _setup("delta-stn")
    x, y = torch.randn(64, 12), torch.randint(0, 3, (64,))
    loader = DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True, drop_last=True)
    for xb, yb in loader:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = tuner.weight_step(xb, yb)
        assert torch.isfinite(loss)
    assert tuner.step == 8


def test_clear_errors():
    model, tuner = _setup("fixed")
    with pytest.raises(RuntimeError, match="takes no hyper steps"):
        tuner.hyper_step(torch.randn(4, 12), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="optimizer does not hold"):
        Tuner(model, tuner.space, torch.optim.SGD(list(model.parameters())[:1], lr=0.1), F.cross_entropy)
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        Tuner(model, tuner.space, "sgd", F.cross_entropy)
    space = HyperSpace.build(("dropout",), dropout_slots=["in", "h1"])
    with pytest.raises(ValueError, match="n_hyper=3 but the space tunes 2 hyperparameters"):
        Tuner(model, space, torch.optim.SGD(model.parameters(), lr=0.1), F.cross_entropy)


# Each was taken by the Tuner before it checked its options: run without a word (a misspelt schedule, hyper_input
# or response_init fell back to another setting; val_per_cycle 0 never tuned), or failed later and raw
# (train_per_cycle 0: ZeroDivisionError in the first weight step; scale_max < 0: 'math domain error').
BAD_OPTIONS = [("hyper_lr_schedule", "linear"), ("hyper_input", "centred"), ("response_init", "zeros"),
               ("val_per_cycle", 0), ("train_per_cycle", 0), ("train_per_cycle", 2.5), ("scale_max", -0.1),
               ("tau", -0.5), ("warmup_steps", -3), ("hyper_lr", float("nan")), ("hyper_beta2", 1.0),
               ("hyper_beta2", -0.5),
               ("clip", -1.0), ("total_steps", 0), ("hyper_plain_every", -1), ("response_gain_max", 0.5),
               ("response_baseline", 1.0), ("response_baseline", -0.1)]


@pytest.mark.parametrize("name,value", BAD_OPTIONS)
def test_a_bad_option_is_refused_by_name_at_construction(name, value):
    with pytest.raises(ValueError, match=rf"stn_ext: {name} must be .*, got {value!r}"):
        _setup(**({"steps": value} if name == "total_steps" else {name: value}))


@pytest.mark.parametrize("method", ["stn", "delta-stn"])
def test_every_second_hyper_step_is_plain_at_u_and_leaves_the_scales(method):
    """hyper_plain_every=2 (the default): hyper steps 0, 2, ... evaluate the validation loss at u itself (no draw:
    the same step whatever the generator) and step u alone; steps 1, 3, ... are perturbed and move the scales too."""
    train, val = _batches(12, 0), _batches(4, 1)
    steps = []
    for gen_seed in (1, 2):
        model, tuner = _setup(method, generator=torch.Generator().manual_seed(gen_seed), warmup_steps=0,
                              scale_max=1.0)  # above sigma_0: the scales can move both ways
        assert tuner.plain_every == 2
        torch.manual_seed(0)
        for p in model.parameters():  # the same weights whatever the generator drew in the weight steps
            p.data = torch.randn_like(p) * 0.3
        rows = []
        for x, y in val:
            u0, h0 = tuner.u.detach().clone(), tuner.hscale.detach().clone()
            tuner.hyper_step(x, y)
            rows.append((tuner.u.detach() - u0, tuner.hscale.detach() - h0))
        steps.append(rows)
    a, b = steps
    assert all(torch.equal(h, torch.zeros_like(h)) for _, h in a[0::2])  # plain: the scales stay
    assert all(h.abs().max() > 0 for _, h in a[1::2])                    # perturbed: they move
    assert torch.equal(a[0][0], b[0][0]) and a[0][0].abs().max() > 0     # plain: u's step draws nothing
    assert not torch.equal(a[1][0], b[1][0])                              # perturbed: it depends on the draw


def test_no_plain_hyper_steps_when_set_to_0():
    model, tuner = _setup("stn", hyper_plain_every=0, warmup_steps=0, scale_max=1.0)
    for p in model.parameters():
        p.data = torch.randn_like(p) * 0.3
    h0 = tuner.hscale.detach().clone()
    tuner.hyper_step(*_batches(1, 1)[0])
    assert not torch.equal(tuner.hscale.detach(), h0)


def _set_sigma(tuner, sigma):
    with torch.no_grad():
        tuner.hscale.fill_(inv_softplus(sigma))


def test_response_gain_follows_the_scales_shrinking():
    """(sigma_0 / sigma)^2 over the scales' mean square, clamped to [1, response_gain_max]; a roll-back's halving
    of sigma and its cap together (scale_perturbation) leaves it where it was."""
    model, tuner = _setup("stn", scale_init=0.3, response_gain_max=4.0)
    for sigma, gain in ((0.3, 1.0), (0.2, 2.25), (0.15, 4.0), (0.05, 4.0)):
        _set_sigma(tuner, sigma)
        assert tuner.response_gain().item() == pytest.approx(gain, rel=1e-5)
    with torch.no_grad():
        tuner.hscale.copy_(torch.tensor([inv_softplus(s) for s in (0.3, 0.3, 0.15)]))  # mean square 0.0675
    assert tuner.response_gain().item() == pytest.approx(4 / 3, rel=1e-5)
    tuner.scale_perturbation(0.5, 0.15)  # sigma (0.15, 0.15, 0.075) against a reference of 0.15
    assert tuner.response_gain().item() == pytest.approx(4 / 3, rel=1e-5)
    assert _setup("stn", response_gain_max=1.0)[1].response_gain().item() == 1.0


def test_delta_stns_response_gain_keeps_the_pace_per_weight_step():
    """Per batch, Delta-STN's response, stepped after every k-th general step, is stepped k times as far: the pace
    per weight step of one stepped after each (the scales' factor on top). Per example it is not (there it weakened
    the learned response: docs/trainer.md, "A shorter memory per batch"). Fitted by the gradient: by difference the
    default is every step."""
    for every, sigma, gain in ((0, 0.3, 2.0), (2, 0.15, 8.0), (3, 0.3, 3.0), (1, 0.3, 1.0)):
        tuner = _setup("delta-stn", scale_init=0.3, response_every=every, response_fit="gradient")[1]
        _set_sigma(tuner, sigma)
        assert tuner.response_gain().item() == pytest.approx(gain, rel=1e-5)
    tuner = _setup("delta-stn", scale_init=0.3, perturb="example")[1]
    _set_sigma(tuner, 0.15)
    assert tuner.response_every == 2 and tuner.response_gain().item() == pytest.approx(4.0, rel=1e-5)


def test_a_roll_back_turns_the_response_gain_off_for_the_rest_of_the_run():
    """A roll-back's restart sets response_gain_max to 1, and the tuner's state carries that (a resumed run or a
    later snapshot keeps it off)."""
    from stn_ext.tuning import divergence
    model, tuner = _setup("stn", scale_init=0.3, response_gain_max=4.0)
    _set_sigma(tuner, 0.15)
    assert tuner.response_gain().item() == pytest.approx(4.0)
    divergence.restart(tuner, tuner.sigma_max, 1.0, 1)
    _set_sigma(tuner, 0.05)  # below the halved cap as well
    assert tuner.response_gain_max == 1.0 and tuner.response_gain().item() == 1.0
    st = tuner.state_dict()
    fresh = _setup("stn", scale_init=0.3, response_gain_max=4.0)[1]
    fresh.load_state_dict(st)
    assert fresh.response_gain_max == 1.0


def test_the_response_starts_with_rows_of_v_and_c_no_shorter_than_the_floor():
    """The response's start draws V, C ~ N(0, 1/n) and raises the rows shorter than the floor to that length (a row's
    response learns at |V_i|^2 times its pace); rows drawn longer keep the draw, and W_h, b_h start at zero."""
    from stn_ext.tuning import models
    layer = stn_ext.StnLinear(5, 400, n_hyper=3)
    torch.manual_seed(1)
    models.init_response([layer], 0.8)
    torch.manual_seed(1)
    drawn_v, drawn_c = torch.randn(400, 3) / 3 ** 0.5, torch.randn(400, 3) / 3 ** 0.5
    for got, drawn in ((layer.hyper_weight, drawn_v), (layer.hyper_bias, drawn_c)):
        n, short = got.norm(dim=1), drawn.norm(dim=1) < 0.8
        assert 0 < short.sum() < 400  # the draw has rows on both sides of the floor
        assert torch.allclose(n[short], torch.full_like(n[short], 0.8))
        assert torch.allclose(got[short], drawn[short] * (0.8 / drawn.norm(dim=1)[short])[:, None])
        assert torch.allclose(got[~short], drawn[~short], rtol=1e-6, atol=0)
    assert not layer.weight_hyper.any() and not layer.bias_hyper.any()
    models.init_response([layer])  # no floor: the plain draw
    assert (layer.hyper_weight.norm(dim=1) < 0.5).any()


@pytest.mark.parametrize("method,hypers,floor", [
    ("delta-stn", ("dropout", "weight_decay"), 1.0),  # delta = lam~ - u: centred
    ("stn", ("weight_decay",), 1.0),                  # recentred on u: centred
    ("stn", ("dropout", "weight_decay"), 0.0),        # a rate's input is anchored at its range's centre
    ("stn", ("dropout",), 0.0)])
def test_the_floor_applies_where_the_hypernet_input_is_centred(method, hypers, floor):
    """Where z is centred |V| sets only the response's pace; at STN's fixed anchor it also sets the path's share of the
    weights' step ((V z)^2), and there the start stays the plain draw."""
    from stn_ext.tuning import models
    space = HyperSpace.build(hypers, dropout_slots=["in"])
    model = torch.nn.Sequential(HyperDropout("in"), torch.nn.Linear(12, 64), torch.nn.ReLU(), torch.nn.Linear(64, 3))
    stn_ext.convert(model, n_hyper=len(space))
    tuner = Tuner(model, space, torch.optim.SGD(model.parameters(), lr=0.1), torch.nn.CrossEntropyLoss(),
                  method=method, total_steps=10)
    assert tuner.row_floor == (models.ROW_FLOOR if floor else 0.0)
    shortest = min(float(m.hyper_weight.norm(dim=1).min()) for m in tuner.layers)
    assert (shortest >= models.ROW_FLOOR - 1e-6) == bool(floor)


@pytest.mark.parametrize("method", ["stn", "delta-stn"])  # Delta-STN's here starts near V = 1 (masks are drawn)
def test_a_roll_back_restarts_the_response_at_a_quarter_of_its_pace_per_roll_back(method):
    """Restart number r draws the same start and halves its rows of V and C r times (the response learns at |V|^2
    times its pace): a response restarted at full pace ran away again after each roll-back (docs/trainer.md)."""
    from stn_ext.tuning import divergence, models
    model, tuner = _setup(method, scale_init=0.3)
    start = [(m.hyper_weight.clone(), m.hyper_bias.clone()) for m in tuner.layers]
    for r in (1, 2, 3):
        for m in tuner.layers:
            m.hyper_weight.data.normal_()
            m.weight_hyper.data.normal_()
        divergence.restart(tuner, tuner.sigma_max, tuner.hyper_lr_factor, r)
        for m, (v, c) in zip(tuner.layers, start):
            assert torch.allclose(m.hyper_weight, v * 0.5 ** r) and torch.allclose(m.hyper_bias, c * 0.5 ** r)
            assert not m.weight_hyper.any()
    models.start_response(tuner.layers, tuner.response_seed, near_one=tuner.near_one)  # pace 1: the start itself
    assert all(torch.equal(m.hyper_weight, v) for m, (v, _) in zip(tuner.layers, start))


@pytest.mark.parametrize("method", ["stn", "delta-stn"])
def test_the_response_steps_by_the_gain_and_the_rest_as_before(method):
    """Plain SGD, the same draws: with sigma at half its start the response's parameters move 4x as far as with
    response_gain_max=1 (Delta-STN's by the gradient, stepped after every 2nd general step, 8x); every other
    parameter the same."""
    moves = []
    for gain_max in (1.0, 4.0):
        model, tuner = _setup(method, opt=torch.optim.SGD, warmup_steps=0, scale_init=0.3, response_gain_max=gain_max,
                              generator=torch.Generator().manual_seed(3), response_fit="gradient")
        torch.manual_seed(0)
        for p in model.parameters():
            p.data = torch.randn_like(p) * 0.3
        _set_sigma(tuner, 0.15)
        before = [p.detach().clone() for p in model.parameters()]
        tuner.weight_step(*_batches(1, 0)[0])
        moves.append([p.detach() - b for p, b in zip(model.parameters(), before)])
    ids = {id(p) for p in tuner.response_params}
    gain = 8 if method == "delta-stn" else 4
    for p, off, on in zip(model.parameters(), *moves):
        assert off.abs().max() > 1e-4  # float32 rounding of the moves: ~1e-7
        torch.testing.assert_close(on, off * gain if id(p) in ids else off, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["linear", "conv", "embedding"])
def test_the_response_baseline_subtracts_its_mean_along_the_path_and_nothing_else(kind):
    """The correction is beta times the gradient of <mean, path(d)>: on W_h the gate (V d) times the mean, on V the mean
    times W_h summed over each gate's entries, times d; likewise C and b_h; the elementary weights' gradients
    untouched."""
    torch.manual_seed(0)
    n = 3
    layer = {"linear": lambda: stn_ext.StnLinear(5, 4, n), "conv": lambda: stn_ext.StnConv2d(2, 4, 3, n),
             "embedding": lambda: stn_ext.StnEmbedding(6, 4, n)}[kind]().double()
    for p in layer.parameters():
        p.data = torch.randn_like(p)
        p.grad = torch.randn_like(p)
    base = ResponseBaseline([layer])
    means = [torch.randn_like(layer.weight_elem)] + ([torch.randn_like(layer.bias_elem)] if layer.bias_elem is not None
                                                     else [])
    base.load_state_dict({"mean": means, "fit": torch.tensor([[3.0, 4.0]], dtype=torch.float64)})  # beta 0.75
    before = {k: p.grad.clone() for k, p in layer.named_parameters()}
    d = torch.randn(n, dtype=torch.float64)
    base.correct(d)
    g = layer.gate_dim
    shape = [1] * layer.weight_hyper.dim()
    shape[g] = -1
    means = [0.75 * m for m in means]
    want_wh = before["weight_hyper"] - (layer.hyper_weight @ d).view(shape) * means[0]
    per_gate = (means[0] * layer.weight_hyper).movedim(g, 0).flatten(1).sum(1)
    want_v = before["hyper_weight"] - per_gate[:, None] * d[None, :]
    torch.testing.assert_close(layer.weight_hyper.grad, want_wh)
    torch.testing.assert_close(layer.hyper_weight.grad, want_v)
    if layer.bias_elem is not None:
        torch.testing.assert_close(layer.bias_hyper.grad, before["bias_hyper"] - (layer.hyper_bias @ d) * means[1])
        torch.testing.assert_close(layer.hyper_bias.grad, before["hyper_bias"] - (means[1] * layer.bias_hyper)[:, None] * d)
        assert torch.equal(layer.bias_elem.grad, before["bias_elem"])
    assert torch.equal(layer.weight_elem.grad, before["weight_elem"])


@pytest.mark.parametrize("method", ["stn", "delta-stn"])
def test_the_baseline_holds_earlier_steps_weight_gradients_per_batch_only(method):
    """Per batch, the baseline is the running mean (decay 0.9) of the elementary weights' gradients of the steps so far,
    each taken in after its own step was corrected; per example, and at response_baseline=0, there is none (per batch
    the default is 0.9)."""
    model, tuner = _setup(method, opt=torch.optim.SGD, warmup_steps=0, response_baseline=0.9, response_fit="gradient")
    layer, seen, step = tuner.layers[0], [], tuner.opt_w.step  # one batch over and over: beta ~1, it does not stop

    def recording_step(*a, **kw):  # Delta-STN's response step leaves W_e's gradient None
        if layer.weight_elem.grad is not None:
            seen.append((layer.weight_elem.grad.clone(), layer.bias_elem.grad.clone()))
        return step(*a, **kw)

    tuner.opt_w.step = recording_step
    _run(tuner, _batches(1, 0) * 4, _batches(4, 1))
    want, fit = seen[0], torch.zeros(2)
    for g in seen[1:]:
        fit = fit.lerp(torch.stack([sum((a * b).sum() for a, b in zip(g, want)), sum((b * b).sum() for b in want)]),
                       0.1)
        want = [b.lerp(a, 0.1) for a, b in zip(g, want)]
    assert len(seen) == 4
    torch.testing.assert_close(tuner.baseline.mean[:2], want)  # the first layer's weight and bias
    torch.testing.assert_close(tuner.baseline.fit[0], fit)
    assert _setup(method, perturb="example", response_baseline=0.9)[1].baseline is None
    assert _setup(method, response_baseline=0)[1].baseline is None
    assert _setup(method, response_fit="gradient")[1].baseline.decay == 0.9  # the default, per batch by the gradient
    if method == "delta-stn":  # by difference it subtracts the batch's own gradient at u
        assert _setup(method, response_fit="difference")[1].baseline is None


def test_the_baseline_stops_for_good_once_every_layers_weight_gradient_is_noise():
    """beta is judged from the first correction on (not in the warm-up before it), then after every 10 steps (the
    mean's memory at decay 0.9): while one layer's gradient follows its mean the baseline stays; once every layer's beta
    is below 1/2 it drops its mean, corrects nothing and takes in nothing, and a state saved then restores it stopped."""
    torch.manual_seed(0)
    layers = [stn_ext.StnLinear(4, 3, 2), stn_ext.StnLinear(3, 2, 2)]
    steady = [torch.randn_like(p) for m in layers for p in (m.weight_elem, m.bias_elem)]
    params = [p for m in layers for p in m.parameters()]

    def observe(base, signs):  # each layer's elementary gradients: its steady draw times a sign
        for m, sign, (gw, gb) in zip(layers, signs, zip(steady[::2], steady[1::2])):
            m.weight_elem.grad, m.bias_elem.grad = sign * gw, sign * gb
        base.observe()

    def corrects(base):  # whether correct() changed any gradient
        for p in params:
            p.grad = torch.randn_like(p)
        grads = [p.grad.clone() for p in params]
        base.correct(torch.randn(2))
        return not all(torch.equal(p.grad, g) for p, g in zip(params, grads))

    base = ResponseBaseline(layers)
    for k in range(10):
        observe(base, [1, 1])
    assert torch.equal(base.beta(), torch.ones(2)) and corrects(base) and not base.stopped
    for k in range(10):  # the first layer's gradient flips sign each step, the second's from the 7th on
        observe(base, [(-1) ** k, (-1) ** k if k >= 6 else 1])
    assert base.beta()[0] < 0.5 <= base.beta()[1] and not base.stopped  # judged at step 20: one layer still follows
    below = []  # the steps after which every layer's beta was below 1/2, before it stopped
    for k in range(20):
        observe(base, [(-1) ** k, (-1) ** k])
        if base.stopped:
            break
        below += [base.seen] if bool((base.beta() < 0.5).all()) else []
    assert below and below[0] % 10 and base.seen == 10 * (below[0] // 10 + 1)  # judged on the next 10th step
    assert base.mean is None and base.state_dict() == {"stopped": True}
    assert not corrects(base)
    observe(base, [1, 1])
    assert base.mean is None and base.seen == 30
    again = ResponseBaseline(layers)
    again.load_state_dict(base.state_dict())
    assert again.stopped and again.mean is None

    warm = ResponseBaseline(layers)  # noise from the start: not judged before its first correction, which it skips
    for k in range(20):
        observe(warm, [(-1) ** k, (-1) ** k])
    assert not warm.stopped and not corrects(warm) and warm.stopped and warm.corrections == 0


def test_train_config_refuses_what_the_tuner_refuses():
    """TrainConfig.validate and the Tuner share one check (stn_ext.tuning.options), so the CLI and a user's loop
    refuse the same values with the same message."""
    from stn_ext.tuning.config import TUNER_OPTIONS, TrainConfig
    for name, value in BAD_OPTIONS:
        if name in TUNER_OPTIONS:
            with pytest.raises(ValueError, match=rf"stn_ext: {name} must be .*, got {value!r}"):
                TrainConfig(**{name: value}).validate()
    TrainConfig(tau=-1, scale_init=-1, warmup_steps=-1, hyper_beta2=-1).validate()  # the 'auto' values pass

def test_example_own_training_loop_runs():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "own_training_loop.py"), "--steps", "60"],
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr
    assert "test loss" in r.stdout and "dropout.in=" in r.stdout


# --- non-finite steps: skipped, counted, stopped; the opt-in roll-back (issue 22) ---------------------------------

NAN_X = torch.full((8, 12), float("nan"))


RESPONSE_NAMES = ("weight_hyper", "hyper_weight", "bias_hyper", "hyper_bias")


def _same(a, b):
    """Equal state (dicts, lists, tensors bit for bit, numbers)."""
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    return a == b


def _state(model, tuner):
    sd = tuner.state_dict()
    sd.pop("checks", None)
    return {"model": {k: v.clone() for k, v in model.state_dict().items()},
            "opt_w": copy.deepcopy(tuner.opt_w.state_dict()), "tuner": copy.deepcopy(sd)}


def _without_counters(st):
    """A tuner state with its step counters and random generator left out (what a skipped step may move)."""
    t = {k: v for k, v in st["tuner"].items() if k not in ("step", "hstep", "gen")}
    return {**st, "tuner": t}


@pytest.mark.parametrize("method", ["stn", "delta-stn", "fixed"])
def test_a_nan_training_batch_is_skipped_with_a_warning(method):
    model, tuner = _setup(method)
    train, val = _batches(12, 1), _batches(12, 2)
    _run(tuner, train[:8], val)  # past the warm-up (4): the response trains
    before = _state(model, tuner)
    with pytest.warns(UserWarning, match=r"weight step 9: training loss nan; skipped it \(1 in a row, 1 weight step in "
                                         r"all\).*hyperparameters \{'dropout.in': 0\.0\d+"):
        report = tuner.weight_step(NAN_X, train[8][1])
    assert not torch.isfinite(report).all()  # the user still sees the batch's loss
    assert tuner.step == 9 and tuner.skipped_steps == 1 and tuner.skipped_hyper_steps == 0
    after = _state(model, tuner)
    assert _same(_without_counters(after), _without_counters(before))  # weights, optimiser, u, scales unchanged
    assert all(torch.isfinite(p).all() for p in model.parameters())
    # and the run goes on: the next batch steps as usual, the count of skips in a row starts again
    tuner.weight_step(*train[9])
    assert not _same(_state(model, tuner)["model"], before["model"])
    assert tuner.checks.in_a_row["weight"] == 0 and tuner.skipped_steps == 1
    for _ in range(tuner.hyper_steps_due()):
        tuner.hyper_step(*val[0])
    assert torch.isfinite(tuner.u).all() and torch.isfinite(tuner.hscale).all()


@pytest.mark.parametrize("fit,what", [("gradient", r"\(after its general step, which was taken\)"),
                                      ("difference", r"\(its general step was taken\)")])
def test_a_nan_in_the_delta_stn_response_step_skips_only_that_part(fit, what):
    calls = []

    def loss(out, y):  # the 2nd loss of the weight step (the response step's) is NaN
        calls.append(1)
        ell = F.cross_entropy(out, y)
        return ell * float("nan") if len(calls) == 2 else ell

    model, tuner = _setup("delta-stn", loss=loss, warmup_steps=0, response_fit=fit)
    resp = [p.detach().clone() for p in tuner.response_params]
    gen = [p.detach().clone() for p in tuner.general_params]
    with pytest.warns(UserWarning, match=r"weight step 1: response step's training loss " + what + " nan; skipped it"):
        tuner.weight_step(*_batches(1, 1)[0])
    assert all(torch.equal(a, b) for a, b in zip(resp, tuner.response_params))
    assert not all(torch.equal(a, b) for a, b in zip(gen, tuner.general_params))
    assert tuner.skipped_steps == 1


def test_a_nan_validation_batch_skips_the_hyper_step():
    model, tuner = _setup("stn")
    train, val = _batches(12, 1), _batches(12, 2)
    _run(tuner, train[:6], val)
    assert tuner.hyper_steps_due() == 1 and tuner.hstep == 1
    u, h, opt_h = tuner.u.detach().clone(), tuner.hscale.detach().clone(), copy.deepcopy(tuner.opt_h.state_dict())
    with pytest.warns(UserWarning, match=r"hyper step 2 \(after weight step 6\): hyper loss \(validation loss - tau "
                                         r"entropy\) \[nan\]; hypergradient of u \[nan, nan, nan\].*skipped it"):
        tuner.hyper_step(NAN_X, val[0][1])
    assert torch.equal(tuner.u, u) and torch.equal(tuner.hscale, h) and _same(tuner.opt_h.state_dict(), opt_h)
    assert tuner.hstep == 2 and tuner.skipped_hyper_steps == 1 and tuner.skipped_steps == 0
    assert all(torch.isfinite(v) for v in map(torch.tensor, tuner.hyperparameters().values()))


def test_a_remote_rank_s_nan_skips_the_step_here_too():
    model, tuner = _setup("stn")

    def allreduce(tensors):  # the other rank's batch was NaN: every sum is
        for t in tensors:
            t.add_(float("nan"))

    tuner.allreduce = allreduce
    w = [p.detach().clone() for p in model.parameters()]
    with pytest.warns(UserWarning, match="weight step 1: training loss nan; skipped"):
        tuner.weight_step(*_batches(1, 1)[0])  # finite here
    assert all(torch.equal(a, b) for a, b in zip(w, model.parameters()))


def test_repeated_non_finite_steps_stop_with_a_clear_error():
    from stn_ext.tuning import Diverged

    model, tuner = _setup("delta-stn", max_skipped=3)
    y = torch.zeros(8, dtype=torch.long)
    with pytest.warns(UserWarning, match="skipped"):
        tuner.weight_step(NAN_X, y)
        tuner.weight_step(NAN_X, y)
    with pytest.raises(Diverged, match=r"diverged at weight step 3 \(training loss nan\) with hyperparameters .*dropout"
                                       r".*the last 3 weight steps in a row were not finite.*Check the batches"):
        tuner.weight_step(NAN_X, y)
    model, tuner = _setup("stn", max_skipped=2, warmup_steps=0)
    tuner.weight_step(*_batches(1, 1)[0])
    with pytest.warns(UserWarning, match="hyper step 1"):
        tuner.hyper_step(NAN_X, y)
    tuner.weight_step(*_batches(1, 1)[0])  # a healthy weight step does not clear a run of bad hyper steps
    with pytest.raises(Diverged, match=r"hyper step 2 \(after weight step 2\).*the last 2 hyper steps in a row"):
        tuner.hyper_step(NAN_X, y)
    with pytest.raises(ValueError, match="max_skipped must be >= 1"):
        _setup("stn", max_skipped=0)
    from stn_ext.tuning import Guard
    with pytest.raises(ValueError, match="a guard needs check_finite=True"):
        _setup("stn", check_finite=False, guard=Guard())


def test_skip_counts_survive_a_state_dict_round_trip_and_old_states_load():
    model, tuner = _setup("stn")
    y = torch.zeros(8, dtype=torch.long)
    with pytest.warns(UserWarning):
        tuner.weight_step(NAN_X, y)
        tuner.weight_step(NAN_X, y)
    st = tuner.state_dict()
    assert st["checks"]["skipped"] == {"weight": 2, "hyper": 0}
    _, other = _setup("stn")
    other.load_state_dict(st)
    assert other.skipped_steps == 2 and other.checks.in_a_row["weight"] == 2 and other.step == 2
    old = {k: v for k, v in st.items() if k != "checks"}  # a state saved before the counts existed
    _, other = _setup("stn")
    other.load_state_dict(old)
    assert other.skipped_steps == 0 and other.rollbacks == 0 and other.step == 2


@pytest.mark.parametrize("method", ["stn", "delta-stn"])
def test_the_checks_and_the_guard_leave_a_healthy_run_bit_for_bit_unchanged(method):
    from stn_ext.tuning import Guard

    train, val = _batches(30, 1), _batches(30, 2)
    got = []
    for kw in ({"check_finite": False}, {}, {"guard": Guard(every=4)}):
        model, tuner = _setup(method, steps=30, **kw)
        _run(tuner, train, val)
        got.append([p.detach().clone() for p in model.parameters()] + [tuner.u.detach().clone(),
                                                                        tuner.hscale.detach().clone()])
        assert tuner.skipped_steps == tuner.skipped_hyper_steps == tuner.rollbacks == 0
    assert all(torch.equal(a, b) for a, b in zip(got[0], got[1]))
    assert all(torch.equal(a, b) for a, b in zip(got[0], got[2]))


@pytest.mark.parametrize("bad", ["nan", "spike"])
def test_the_guard_rolls_back_to_a_healthy_snapshot_and_the_run_goes_on(bad):
    from stn_ext.tuning import Guard

    momentum = lambda params, lr: torch.optim.SGD(params, lr=lr, momentum=0.9)  # noqa: E731 (state to restore)
    model, tuner = _setup("stn", steps=40, opt=momentum, guard=Guard(every=5))
    start = {k: v.clone() for k, v in model.state_dict().items()}
    response = {k for k in start if k.endswith(RESPONSE_NAMES)}
    train, val = _batches(40, 1), _batches(40, 2)
    x_bad = NAN_X if bad == "nan" else train[12][0] * 1e4  # finite, but a loss far over 100x the recent mean
    train[12] = (x_bad, train[12][1])
    vi, sigma, snap = iter(val), None, None
    for i, (x, y) in enumerate(train):
        if i == 12:  # the guard's newest snapshot: after weight step 10, before its hyper steps
            assert tuner.checks.guard.snapshot_step == 10
            sigma, snap = F.softplus(tuner.hscale.detach()).clone(), tuner.checks.guard.history[-1][0]
            with pytest.warns(UserWarning, match=r"diverged at weight step 13 \(training loss " +
                              (r"nan" if bad == "nan" else r"\S+, over 100x the mean of the recent ones") +
                              r", hyperparameters .*\); rolled back to step 10 and halved the perturbation scales"):
                tuner.weight_step(x, y)
            assert tuner.step == 10 and tuner.rollbacks == 1 and tuner.skipped_steps == 0
            # the snapshot's weights, and the response (V, C, W_h, b_h) back at its start, which the snapshot was not,
            # with V and C halved (a quarter of the pace after the first roll-back)
            now = model.state_dict()
            assert response and not any(torch.equal(snap["model"][k], start[k]) for k in response if "hyper_" in k)
            paced = {k: start[k] * (0.5 if k.endswith(("hyper_weight", "hyper_bias")) else 1) for k in response}
            assert all(torch.equal(now[k], (paced if k in response else snap["model"])[k]) for k in now)
            # the optimiser's state: the snapshot's, less the response's (it starts afresh with it)
            params = [p for g in tuner.opt_w.param_groups for p in g["params"]]
            ids = {id(p) for p in tuner.response_params}
            for i, p in enumerate(params):
                if id(p) in ids:
                    assert p not in tuner.opt_w.state and i in snap["opt_w"]["state"]
                else:
                    assert _same(tuner.opt_w.state[p], snap["opt_w"]["state"][i])
            restored = tuner.state_dict()
            for k in ("u", "step", "hstep", "anchor", "gen"):
                assert _same(restored[k], snap["tuner"][k]), k
            assert snap["tuner"]["opt_h"]["state"] and not restored["opt_h"]["state"]  # Adam's moments restart
            # the scales halved from where they were, the cap too (from 0.3)
            assert torch.allclose(F.softplus(tuner.hscale.detach()), torch.minimum(sigma / 2, torch.tensor(0.15)))
            assert tuner.sigma_max == pytest.approx(0.15)
        else:
            tuner.weight_step(x, y)
        for _ in range(tuner.hyper_steps_due()):  # after the roll-back: the hyper steps after step 10, again
            tuner.hyper_step(*next(vi))
    assert tuner.step == 37 and tuner.rollbacks == 1 and tuner.hstep == (37 - 4) // 2
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert torch.isfinite(tuner.u).all() and torch.isfinite(tuner.hscale).all()
    assert tuner.sigma_max > 0.15  # the cap grows back over healthy snapshot intervals


def test_the_guard_gives_up_after_max_recoveries():
    from stn_ext.tuning import Diverged, Guard

    model, tuner = _setup("delta-stn", guard=Guard(every=5, max_recoveries=2))
    y = torch.zeros(8, dtype=torch.long)
    tuner.weight_step(*_batches(1, 1)[0])
    with pytest.warns(UserWarning, match="rolled back to step 0"):
        tuner.weight_step(NAN_X, y)
        tuner.weight_step(NAN_X, y)
    with pytest.raises(Diverged, match=r"weight step 1 \(training loss nan\).*rolled back to step 0 and halved the "
                                       r"perturbation scales 2 times"):
        tuner.weight_step(NAN_X, y)


def test_a_roll_back_with_the_layers_own_response_init_keeps_the_snapshots_response():
    """response_init="zero" has no drawn start to go back to: the roll-back keeps the snapshot's response and restarts
    only the hyper optimiser's moments, and says so."""
    from stn_ext.tuning import Guard

    momentum = lambda params, lr: torch.optim.SGD(params, lr=lr, momentum=0.9)  # noqa: E731
    model, tuner = _setup("stn", steps=40, opt=momentum, guard=Guard(every=5), response_init="zero")
    assert tuner.response_seed is None
    train, val = _batches(12, 1), _batches(12, 2)
    _run(tuner, train[:11], val)
    snap = tuner.checks.guard.history[-1][0]
    assert tuner.checks.guard.snapshot_step == 10 and snap["tuner"]["opt_h"]["state"]
    with pytest.warns(UserWarning, match=r"rolled back to step 10 .*\), restarting the hyper optimiser's moments$"):
        tuner.weight_step(NAN_X, train[11][1])
    assert _same(model.state_dict(), snap["model"]) and _same(tuner.opt_w.state_dict(), snap["opt_w"])
    assert not tuner.opt_h.state_dict()["state"]


# --- Delta-STN's response by finite difference (response_fit 'difference') ---------------------------------------

def _smooth_setup(hypers, method="delta-stn", reduction="mean", **kw):
    torch.manual_seed(0)
    space = HyperSpace.build(hypers)
    model = torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    stn_ext.convert(model, n_hyper=len(space))
    tuner = Tuner(model, space, torch.optim.SGD(model.parameters(), lr=0.1), torch.nn.CrossEntropyLoss(reduction=reduction),
                  method=method, total_steps=40, **kw)
    return model, tuner


@pytest.mark.parametrize("method,hypers,kw,fit", [
    ("delta-stn", ("weight_decay",), {}, "difference"),
    ("delta-stn", ("weight_decay", "noise"), {}, "difference"),
    ("delta-stn", ("dropout", "weight_decay"), {}, "difference"),    # masks too, per batch (difference_settings)
    ("delta-stn", ("dropout",), {"perturb": "example"}, "gradient"),  # masks per example: not in its control variate
    ("delta-stn", ("dropout", "ar"), {}, "gradient"),  # a language model's space: by the gradient (perplexity)
    ("delta-stn", ("weight_decay", "noise"), {"perturb": "example"}, "difference"),
    ("stn", ("weight_decay",), {"perturb": "example"}, "difference"),
    ("delta-stn", ("ar",), {"perturb": "example"}, "gradient"),   # a model's own penalty: not in its control variate
    ("delta-stn", ("weight_decay",), {"linearize": True}, "gradient"),
    ("delta-stn", ("weight_decay",), {"response_rows": 0.5}, "gradient"),
    ("stn", ("weight_decay",), {}, "difference"),                  # recentred on u: z = 0 there
    ("stn", ("weight_decay",), {"centred": False}, "gradient"),     # a fixed anchor: z is not 0 at u
    ("stn", ("dropout", "weight_decay"), {}, "gradient"),
    ("delta-stn", ("dropout",), {"response_fit": "difference"}, "difference"),  # asked for: taken
])
def test_the_response_is_fitted_by_difference_where_it_can(method, hypers, kw, fit):
    from stn_ext.tuning import defaults

    space = HyperSpace.build(hypers, dropout_slots=["in"])
    kinds = [h.kind for h in space.hypers]
    got = defaults.response_fit(kw.get("response_fit", "auto"), method, kw.get("perturb", "batch"), kinds,
                                kw.get("linearize", False), kw.get("response_rows", 1.0), kw.get("centred", True))
    assert got == fit


@pytest.mark.parametrize("method,hypers,kw,want", [
    ("delta-stn", ("dropout",), {}, (0.1, True, 0.5)),                   # masks, per batch: the masked settings
    ("delta-stn", ("dropout", "weight_decay"), {}, (0.1, True, 0.5)),
    ("delta-stn", ("weight_decay", "noise"), {}, (0.5, False, 0.0)),     # smooth: as before
    ("delta-stn", ("dropout",), {"perturb": "example"}, (0.5, False, 0.0)),  # by the gradient there
    ("delta-stn", ("dropout",), {"response_fit": "gradient"}, (0.5, False, 0.0)),
    ("stn", ("weight_decay",), {}, (0.5, False, 0.0)),
])
def test_delta_stn_by_difference_where_masks_are_drawn_takes_its_own_pace_start_and_cap(method, hypers, kw, want):
    from stn_ext.tuning import defaults
    space = HyperSpace.build(hypers, dropout_slots=["in"])
    model = torch.nn.Sequential(HyperDropout("in"), torch.nn.Linear(12, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    stn_ext.convert(model, n_hyper=len(space))
    tuner = Tuner(model, space, torch.optim.SGD(model.parameters(), lr=0.1), torch.nn.CrossEntropyLoss(),
                  method=method, total_steps=40, **kw)
    assert (tuner.difference_pace, tuner.near_one, tuner.path_cap) == want
    assert want[0] in (defaults.DIFFERENCE_PACE, defaults.MASKED_DIFFERENCE_PACE)
    v = torch.cat([m.hyper_weight.reshape(-1) for m in tuner.layers])
    assert ((v - 1).abs().max() < 0.6) == want[1]  # near 1, or N(0, 1/n) rows raised to length 1 (signs at random)
    assert not any(m.weight_hyper.any() for m in tuner.layers)


def test_a_state_fitted_by_difference_at_other_settings_is_refused():
    """A checkpoint of Delta-STN by difference where masks are drawn, written before its settings (pace 0.5 from
    V ~ N(0, 1/n), uncapped: a state without the field) or at others, is refused with what each ran at; one at the
    same settings loads."""
    from stn_ext.tuning import tuner_state
    _, tuner = _setup("delta-stn")
    st = tuner_state.capture(tuner)
    tuner_state.restore(tuner, st)
    for old in ({k: v for k, v in st.items() if k != "difference"}, {**st, "difference": [0.3, True, 0.5]}):
        with pytest.raises(ValueError, match=r"by difference at pace 0\.[35], .*this tuner at 0\.1, True, 0\.5"):
            tuner_state.restore(tuner, old)


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_cap_path_shortens_the_rows_over_the_cap_to_it_and_leaves_the_rest(kind):
    from stn_ext.tuning import models
    torch.manual_seed(0)
    layer = stn_ext.StnLinear(6, 5, 2) if kind == "linear" else stn_ext.StnConv2d(2, 5, 3, 2)
    with torch.no_grad():
        layer.hyper_weight.normal_()
        layer.weight_hyper.normal_()
        layer.weight_hyper[:2].mul_(100)  # rows 0 and 1 far over the cap
        layer.weight_hyper[2:].mul_(1e-3)  # the rest far under it
    sigma = torch.tensor([0.3, 0.2])
    before = layer.weight_hyper.detach().clone()
    models.cap_path([layer], sigma, 0.5)

    def path(m):
        return (m.hyper_weight * sigma).norm(dim=1) * m.gate_rows(m.weight_hyper).norm(dim=1)
    limit = 0.5 * layer.gate_rows(layer.weight_elem).norm(dim=1)
    torch.testing.assert_close(path(layer)[:2], limit[:2].detach())
    assert torch.equal(layer.weight_hyper[2:], before[2:])
    cos = F.cosine_similarity(layer.weight_hyper[:2].flatten(1), before[:2].flatten(1))
    torch.testing.assert_close(cos, torch.ones(2))  # shortened, not turned


def test_delta_stns_step_where_masks_are_drawn_caps_the_path():
    model, tuner = _setup("delta-stn", warmup_steps=0, opt=torch.optim.SGD)
    with torch.no_grad():
        for m in tuner.layers:
            m.weight_hyper.normal_().mul_(50)
    tuner.weight_step(*_batches(1, 0)[0])
    sigma = F.softplus(tuner.hscale.detach())
    for m in tuner.layers:
        path = (m.hyper_weight * sigma).norm(dim=1) * m.gate_rows(m.weight_hyper).norm(dim=1)
        assert (path <= tuner.path_cap * m.gate_rows(m.weight_elem).norm(dim=1) * (1 + 1e-5)).all()


@pytest.mark.parametrize("hypers,kw,schedule,beta2", [
    (("weight_decay",), {"perturb": "example"}, "tail", 0.95),             # by difference: the per-batch ones
    (("dropout", "weight_decay"), {"perturb": "example"}, "cosine", 0.99),  # by the gradient: the mode's own
    (("weight_decay",), {"perturb": "example", "hyper_lr_schedule": "cosine", "hyper_beta2": 0.9}, "cosine", 0.9),
    (("weight_decay",), {"perturb": "example", "response_fit": "gradient"}, "cosine", 0.99),
    (("weight_decay",), {}, "tail", 0.95),
])
def test_the_difference_fit_takes_the_per_batch_hyper_optimiser_unless_asked_otherwise(hypers, kw, schedule, beta2):
    space = HyperSpace.build(hypers, dropout_slots=["in"])
    model = torch.nn.Sequential(HyperDropout("in"), torch.nn.Linear(12, 3))
    stn_ext.convert(model, n_hyper=len(space))
    tuner = Tuner(model, space, torch.optim.SGD(model.parameters(), lr=0.1), torch.nn.CrossEntropyLoss(),
                  method="delta-stn", total_steps=40, **kw)
    assert tuner.hyper_lr_schedule == schedule and tuner.opt_h.param_groups[0]["betas"] == (0.9, beta2)


@pytest.mark.parametrize("method,hypers,kw,sigma_0", [
    ("stn", ("weight_decay",), {"perturb": "example"}, 0.3),      # STN per example by difference: its own
    ("delta-stn", ("weight_decay",), {"perturb": "example"}, 0.5),
    ("stn", ("dropout", "weight_decay"), {"perturb": "example"}, 0.5),  # by the gradient: the mode's
    ("stn", ("weight_decay",), {"perturb": "example", "response_fit": "gradient"}, 0.5),
    ("stn", ("weight_decay",), {"perturb": "example", "scale_init": 0.7}, 0.7),  # asked for: taken
    ("stn", ("weight_decay",), {}, 0.3),                          # per batch: the mode's
    ("delta-stn", ("weight_decay",), {}, 0.3),
    ("stn", ("dropout", "weight_decay"), {}, 0.3),
])
def test_sigma_0_is_the_modes_except_stns_per_example_by_difference(method, hypers, kw, sigma_0):
    space = HyperSpace.build(hypers, dropout_slots=["in"])
    model = torch.nn.Sequential(HyperDropout("in"), torch.nn.Linear(12, 3))
    stn_ext.convert(model, n_hyper=len(space))
    tuner = Tuner(model, space, torch.optim.SGD(model.parameters(), lr=0.1), torch.nn.CrossEntropyLoss(),
                  method=method, total_steps=40, **kw)
    assert tuner.scale_init == pytest.approx(sigma_0) and tuner.sigma_max == pytest.approx(sigma_0)
    torch.testing.assert_close(F.softplus(tuner.hscale.detach()), torch.full((len(space),), sigma_0))


def test_a_state_loads_only_into_a_tuner_that_fits_the_response_as_it_did():
    """A per-example state from before the difference fit (no record of it) was fitted on the gradient: the default
    tuner, which now fits by difference, refuses it by name; one that asks for the gradient takes it."""
    _, tuner = _smooth_setup(("weight_decay",), perturb="example", response_fit="gradient")
    old = tuner.state_dict()
    old.pop("response_fit")
    new = _smooth_setup(("weight_decay",), perturb="example")[1]
    assert new.response_fit == "difference"
    with pytest.raises(ValueError, match="fitted the response by 'gradient', this tuner by 'difference'"):
        new.load_state_dict(old)
    _smooth_setup(("weight_decay",), perturb="example", response_fit="gradient")[1].load_state_dict(old)
    with pytest.raises(ValueError, match="--response-fit difference"):  # a recorded fit, the other way round
        _smooth_setup(("weight_decay",), perturb="example", response_fit="gradient")[1].load_state_dict(
            new.state_dict())


@pytest.mark.parametrize("kw", [{"method": "stn", "centred": False}, {"linearize": True}, {"response_rows": 0.5},
                                {"method": "stn", "perturb": "example", "centred": False}])
def test_a_difference_fit_where_it_cannot_apply_is_refused_by_name(kw):
    from stn_ext.tuning import defaults

    args = {"method": "delta-stn", "perturb": "batch", "linearize": False, "response_rows": 1.0, "centred": True, **kw}
    with pytest.raises(ValueError, match="response_fit='difference' takes Delta-STN's response on the whole batch"):
        defaults.response_fit("difference", args["method"], args["perturb"], ["weight_decay"], args["linearize"],
                              args["response_rows"], args["centred"])
    with pytest.raises(ValueError, match="with one perturbation per example takes weight_decay, noise only"):
        defaults.response_fit("difference", "delta-stn", "example", ["weight_decay", "tar"], False, 1.0)
    with pytest.raises(ValueError, match="response_fit must be one of"):
        defaults.response_fit("finite", "delta-stn", "batch", ["weight_decay"], False, 1.0)


def _watch_perturbations(tuner):
    """A dict that each weight step's perturbed u~ ("u_t") and the generator's state after eps ("after eps") go to."""
    seen, perturbed = {}, tuner.perturbed

    def spy(u, sigma, rnd):
        seen["u_t"] = perturbed(u, sigma, rnd)
        seen["after eps"] = tuner.gen.get_state()
        return seen["u_t"]

    tuner.perturbed = spy
    return seen


@pytest.mark.parametrize("method", ["delta-stn", "stn"])
@pytest.mark.parametrize("perturb", ["batch", "example"])
def test_by_difference_the_response_steps_after_every_kth_weight_step_alone(method, perturb):
    """Fitted by difference, the response steps (and the step takes the second pass that fit needs) after every k-th
    weight step (by default every 2nd; Delta-STN's per batch every one), the weights after each, and per batch
    response_gain carries the factor k; STN's per example steps after every one (after every 2nd at twice the pace,
    it ran a ridge run to NaN: docs/trainer.md)."""
    model, tuner = _smooth_setup(("weight_decay", "noise"), method, warmup_steps=0, perturb=perturb,
                                 response_fit="difference")
    every = 1 if (method, perturb) == ("delta-stn", "batch") else 2
    assert tuner.response_every == every
    full = _smooth_setup(("weight_decay", "noise"), method, perturb=perturb, response_fit="difference", full_batch=True)[1]
    assert full.response_every == (1 if perturb == "batch" else 2)  # each batch the whole split: STN's every step too
    if every == 1:  # the same rules at k = 2, asked for
        model, tuner = _smooth_setup(("weight_decay", "noise"), method, warmup_steps=0, perturb=perturb,
                                     response_fit="difference", response_every=2)
    with torch.no_grad():
        for m in tuner.layers:
            m.weight_hyper.normal_(0, 0.1)
    passes = []
    model.register_forward_hook(lambda *a: passes.append(1))
    for i, (x, y) in enumerate(_batches(4, 5)):
        resp = [p.detach().clone() for p in tuner.response_params]
        general = [p.detach().clone() for p in tuner.general_params]
        passes.clear()
        tuner.weight_step(x, y)
        due = i % 2 == 0 or (method, perturb) == ("stn", "example")
        assert any(not torch.equal(a, b) for a, b in zip(resp, tuner.response_params)) == due
        assert all(not torch.equal(a, b) for a, b in zip(general, tuner.general_params) if b.dim() == 2)
        assert len(passes) == (2 if due else 1)
    _set_sigma(tuner, tuner.scale_init)
    pace = 2.0 if perturb == "batch" else 1.0
    assert tuner.response_gain().item() == pytest.approx(pace, rel=1e-5)


@pytest.mark.parametrize("method", ["delta-stn", "stn"])
def test_the_difference_fit_steps_the_response_on_the_change_of_the_weights_gradient(method):
    """One weight step with a response step due: the response's gradient at d and the one at u come from the same
    weights and the same noise draws, and the response moves by lr * pace * gain / mean(sigma^2) / mean((d / sigma)^2)
    times (V d) (.) (g(d) - g(0)), g the gradient on the effective weights: computed here apart from the step. The
    elementary weights move as the method's step has them: Delta-STN's on g(0), STN's on g(d)."""
    from stn_ext.tuning import defaults, models
    from stn_ext.tuning.augment import BatchRandom

    model, tuner = _smooth_setup(("weight_decay", "noise"), warmup_steps=0, method=method)
    assert tuner.response_fit == "difference" and tuner.baseline is None
    with torch.no_grad():  # a response already learned, so that V's gradient is not zero either
        for m in tuner.layers:
            m.weight_hyper.normal_(0, 0.1)
            m.bias_hyper.normal_(0, 0.1)
    x, y = _batches(1, 3)[0]
    seen = _watch_perturbations(tuner)
    start, u = tuner.gen.get_state(), tuner.u.detach().clone()
    before = copy.deepcopy(model.state_dict())
    tuner.weight_step(x, y)
    after = copy.deepcopy(model.state_dict())
    model.load_state_dict(before)
    # Delta-STN's general step draws its noise first (then eps); STN draws eps, then its noise
    draws = start if method == "delta-stn" else seen["after eps"]

    def grads_at(u_t, z):  # the effective weights' gradient (W_e's, b_e's) at the step's weights and draws
        tuner.gen.set_state(draws)
        rnd = BatchRandom(tuner.gen, x.shape[0])
        vals = tuner.space.to_values(u_t)
        xr, rates = tuner.regularise(x, vals, rnd)
        with models.regularisers(rates, rnd, tuner.named(vals)):
            loss, _ = tuner.loss(xr, y, z, vals)
        return torch.autograd.grad(loss, [p for m in tuner.layers for p in (m.weight_elem, m.bias_elem)])

    d = (seen["u_t"] - u).detach()
    g0, gd = grads_at(u, None), grads_at(seen["u_t"], d)
    sigma = F.softplus(tuner.hscale.detach())
    gain = tuner.response_every  # stepped after every k-th weight step; sigma at sigma_0: (sigma_0 / sigma)^2 = 1
    scale = defaults.DIFFERENCE_PACE * gain / sigma.square().mean() / (d / sigma).square().mean()
    for i, (name, m) in enumerate((n, m) for n, m in model.named_modules() if m in tuner.layers):
        dw, db = gd[2 * i] - g0[2 * i], gd[2 * i + 1] - g0[2 * i + 1]
        moved = lambda p: before[f"{name}.{p}"] - after[f"{name}.{p}"]  # noqa: E731  lr * its gradient
        v, c = before[f"{name}.hyper_weight"], before[f"{name}.hyper_bias"]
        w_h, b_h = before[f"{name}.weight_hyper"], before[f"{name}.bias_hyper"]
        torch.testing.assert_close(moved("weight_elem"), 0.1 * (g0 if method == "delta-stn" else gd)[2 * i])
        torch.testing.assert_close(moved("weight_hyper"), 0.1 * scale * (v @ d)[:, None] * dw)
        torch.testing.assert_close(moved("bias_hyper"), 0.1 * scale * (c @ d) * db)
        torch.testing.assert_close(moved("hyper_weight"), 0.1 * scale * torch.outer((w_h * dw).sum(1), d))
        torch.testing.assert_close(moved("hyper_bias"), 0.1 * scale * torch.outer(b_h * db, d))
    assert float(dw.abs().max()) > 0


@pytest.mark.parametrize("method,reduction", [("delta-stn", "mean"), ("delta-stn", "none"), ("stn", "mean"),
                                              ("stn", "none")])
def test_the_difference_fit_per_example_subtracts_each_examples_gradient_along_its_own_path(method, reduction):
    """Per example: the response's gradient at d_i (one per example) less sum_i <g_i(0), path(d_i)>'s, g_i example
    i's gradient at delta = 0 (weight decay's share included), computed here one example at a time, with the noise
    the step drew after eps; the elementary weights step as the method has them: Delta-STN's on the batch's gradient
    at delta = 0, STN's at d (unweighed). With per-example losses (reduction 'none') both methods weigh example i's
    share of the response's gradient at d and of the control variate by 1 / mean_k (d_ik / sigma_k)^2 (floored), and
    the scale divides by the weighted squares' mean; a batch mean leaves them at 1."""
    from stn_ext.tuning import defaults
    from stn_ext.tuning.augment import BatchRandom

    model, tuner = _smooth_setup(("weight_decay", "noise"), method, reduction, warmup_steps=0, perturb="example",
                                 response_fit="difference")
    assert tuner.response_fit == "difference"
    with torch.no_grad():
        for m in tuner.layers:
            m.weight_hyper.normal_(0, 0.1)
            m.bias_hyper.normal_(0, 0.1)
        tuner.u[0] = math.log(5e-3)  # a weight decay whose share of the gradient is not lost in the tolerance
        tuner.anchor[0] = tuner.u[0]  # STN's input recentred on u (Delta-STN's is u~ - u anyway)
    x, y = _batches(1, 3)[0]
    seen = _watch_perturbations(tuner)
    u = tuner.u.detach().clone()
    before = copy.deepcopy(model.state_dict())
    tuner.weight_step(x, y)
    after = copy.deepcopy(model.state_dict())
    model.load_state_dict(before)
    d = (seen["u_t"] - u).detach()
    assert d.shape == (x.shape[0], 2) and float((d[0] - d[1]).abs().min()) > 0  # one perturbation per example
    resp = [p for m in tuner.layers for p in (m.weight_hyper, m.hyper_weight, m.bias_hyper, m.hyper_bias)]
    elem = [p for m in tuner.layers for p in (m.weight_elem, m.bias_elem)]

    def inputs(u_at):  # the step's noise draws
        tuner.gen.set_state(seen["after eps"])
        rnd = BatchRandom(tuner.gen, x.shape[0])
        vals = tuner.space.to_values(u_at)
        return tuner.regularise(x, vals, rnd)[0], vals

    sigma = F.softplus(tuner.hscale.detach())
    sq = (d / sigma).square().mean(1)
    weighed = reduction == "none"
    w = 1 / sq.clamp_min(defaults.EXAMPLE_SPREAD_FLOOR) if weighed else torch.ones_like(sq)
    xr, vals = inputs(seen["u_t"])
    B = x.shape[0]
    at_d = [torch.zeros_like(p) for p in resp + elem]
    for i in range(B):  # example i's loss at d_i, with its penalty, over B; the response's share times its weight
        with stn_ext.hyper_input(d[i:i + 1]):
            li = torch.nn.functional.cross_entropy(model(xr[i:i + 1]), y[i:i + 1])
        li = (li + 0.5 * vals[i, 0] * tuner.l2(d[i])) / B
        for k, (a, g) in enumerate(zip(at_d, torch.autograd.grad(li, resp + elem))):
            a += (w[i] if k < len(resp) else 1) * g
    at_d, gd = at_d[:len(resp)], at_d[len(resp):]
    xr0, vals0 = inputs(u)
    g0 = torch.autograd.grad(tuner.loss(xr0, y, None, vals0)[0], elem)
    cv = [torch.zeros_like(p) for p in resp]
    for i in range(B):  # example i's share of the loss at delta = 0: its loss and the penalty, over B
        with stn_ext.elementary():
            li = torch.nn.functional.cross_entropy(model(xr0[i:i + 1]), y[i:i + 1])
        li = (li + 0.5 * vals0[0] * tuner.l2(None)) / B
        gi = torch.autograd.grad(li, elem)
        for k, m in enumerate(tuner.layers):
            gw, gb = w[i] * gi[2 * k], w[i] * gi[2 * k + 1]
            cv[4 * k] += (m.hyper_weight @ d[i])[:, None] * gw
            cv[4 * k + 1] += torch.outer((m.weight_hyper * gw).sum(1), d[i]).detach()
            cv[4 * k + 2] += (m.hyper_bias @ d[i]) * gb
            cv[4 * k + 3] += torch.outer(m.bias_hyper * gb, d[i]).detach()
    scale = defaults.DIFFERENCE_PACE / sigma.square().mean() / (w * sq).mean()
    assert not weighed or float((w - 1).abs().max()) > 0.1  # the weights are not all 1 here
    names = {p: n for n, p in model.named_parameters()}
    for p, a, c in zip(resp, at_d, cv):
        moved = before[names[p]] - after[names[p]]
        torch.testing.assert_close(moved, 0.1 * scale * (a - c.detach()))
    for p, g in zip(elem, g0 if method == "delta-stn" else gd):
        torch.testing.assert_close(before[names[p]] - after[names[p]], 0.1 * g)
    assert float((at_d[0] - cv[0]).detach().abs().max()) > 1e-3 * float(at_d[0].abs().max())  # the difference is not empty


@pytest.mark.parametrize("method", ["delta-stn", "stn"])
def test_a_non_finite_tangent_at_u_skips_the_per_example_difference_step(method, monkeypatch):
    """The pass at u that carries each example's tangent is checked too: STN's step has no other check of it (its
    loss at u~ is finite here), and Delta-STN's general step shares it."""
    from stn_ext.tuning import models

    model, tuner = _smooth_setup(("weight_decay", "noise"), method, warmup_steps=0, perturb="example",
                                 response_fit="difference")
    linearised = models.linearised
    monkeypatch.setattr(models, "linearised", lambda *a: (lambda o, t: (o, t * float("nan")))(*linearised(*a)))
    before = _state(model, tuner)
    with pytest.warns(UserWarning, match=r"weight step 1: training loss at u with its tangent \(the response by "
                                         r"difference\) nan; skipped it"):
        tuner.weight_step(*_batches(1, 3)[0])
    assert tuner.skipped_steps == 1
    assert _same(_without_counters(_state(model, tuner)), _without_counters(before))
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("method", ["delta-stn", "stn"])
def test_the_difference_fit_takes_no_response_step_in_the_warm_up_and_keeps_the_general_step(method):
    model, tuner = _smooth_setup(("weight_decay",), method, warmup_steps=3, scale_init=0.3)  # STN's sigma_0 by fit
    fitted = _smooth_setup(("weight_decay",), method, warmup_steps=3, scale_init=0.3, response_fit="gradient")[1]
    for (x, y) in _batches(3, 4):
        tuner.weight_step(x, y)
        fitted.weight_step(x, y)
    for p, q in zip(tuner.params, fitted.params):  # the warm-up: the general steps alone, bit for bit
        assert torch.equal(p, q)
    assert tuner.layers[0].weight_hyper.abs().max() == 0
