"""Reversible training of an nn.Module as one autograd node (stn_ext.reversible.training, issue 24).

What is asserted: the hypergradients that ``objective.backward()`` gives (learning-rate and momentum schedules
per group, an initialisation scale, the model's own initial weights, per-weight L2, learned training data,
a validation penalty on a hyperparameter) equal float64 unrolled autograd of plain SGD with momentum written
out in torch (the same quantised momenta, batches, seeds and modes); dropout replays exactly from the step;
BatchNorm's running statistics and other changed buffers are refused; clear errors for bad inputs and overflow.
"""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import stn_ext  # noqa: F401
from stn_ext.reversible import (FixedPointOverflowError, FunctionalModule, ReversibilityError, UnsupportedBufferError,
                                parameter_groups, quantize_momentum, step_seed, train_and_evaluate, train_reversibly)
from stn_ext.reversible.training import _parameter_slots

TOL = 1e-8  # relative to the largest entry, as test_reversible.py's rel_err


def rel_err(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def unrolled(model, train_loss, val_loss, batches, T, lr_cols, mom_cols, init, meta, seed=0):
    """Plain SGD with momentum written out in torch, differentiable end to end (create_graph through the
    T steps), with the same batches, seeds (step_seed) and modes (train, then eval) as the reversible run."""
    names = list(init)
    xs = [init[n] for n in names]
    vs = [torch.zeros_like(x) for x in xs]
    for t in range(T):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(step_seed(seed, t))
            model.train()
            loss = train_loss(FunctionalModule(model, dict(zip(names, xs))), batches[t], meta)
        gs = torch.autograd.grad(loss, xs, create_graph=True)
        vs = [mom_cols[t, i] * v - (1 - mom_cols[t, i]) * g for i, (v, g) in enumerate(zip(vs, gs))]
        xs = [x + lr_cols[t, i] * v for i, (x, v) in enumerate(zip(xs, vs))]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(step_seed(seed, T))
        model.eval()
        return val_loss(FunctionalModule(model, dict(zip(names, xs))), meta)


def leaf(t):
    return t.detach().clone().requires_grad_(True)


def data(n, shape, classes, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=gen, dtype=torch.float64), torch.randint(0, classes, (n,), generator=gen)


def minibatches(X, Y, T, B):
    n = len(Y)
    return [(X[torch.arange(t * B, (t + 1) * B) % n], Y[torch.arange(t * B, (t + 1) * B) % n]) for t in range(T)]


def schedules(shape, seed, lr=(0.2, 0.1), mom=(0.5, 0.45)):
    gen = torch.Generator().manual_seed(seed)
    lrs = lr[0] + lr[1] * torch.rand(shape, generator=gen, dtype=torch.float64)
    moms = quantize_momentum(mom[0] + mom[1] * torch.rand(shape, generator=gen, dtype=torch.float64))
    return lrs, moms


def ce_loss(net, batch, meta):
    x, y = batch
    return F.cross_entropy(net(x), y)


# --- (a) a small CNN: per-group schedules and an initialisation scale per layer ---------------------------


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3)
        self.fc = nn.Linear(3 * 4 * 4, 3)

    def forward(self, x):
        return self.fc(torch.tanh(self.conv(x)).flatten(1))


def test_cnn_group_schedules_and_init_scale_match_unrolled_float64():
    torch.manual_seed(0)
    model = SmallCNN().double()
    before = {n: leaf(p) for n, p in model.named_parameters()}
    X, Y = data(32, (1, 6, 6), 3, 1)
    Xv, Yv = data(20, (1, 6, 6), 3, 2)
    T = 12
    batches = minibatches(X, Y, T, 8)

    def val_loss(net, meta):
        return F.cross_entropy(net(Xv), Yv)

    assert parameter_groups(model, "weight_bias") == [("conv.weight", 0), ("conv.bias", 1), ("fc.weight", 0),
                                                      ("fc.bias", 1)]
    lr0, mom0 = schedules((T, 2), 3)
    gen = torch.Generator().manual_seed(4)
    noise = {"conv.weight": torch.randn(3, 1, 3, 3, generator=gen, dtype=torch.float64) / 3,
             "fc.weight": torch.randn(3, 48, generator=gen, dtype=torch.float64) / math.sqrt(48)}
    lr, mom, log_scale = leaf(lr0), leaf(mom0), leaf(torch.tensor([0.1, -0.2], dtype=torch.float64))
    init = {n: torch.exp(log_scale[i]) * noise[n] for i, n in enumerate(noise)}
    model.eval()
    objective = train_and_evaluate(model, ce_loss, val_loss, batches, T, lr, mom, init=init, groups="weight_bias")
    objective.backward()
    assert not model.training  # modes restored
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # the model is not trained

    L, M, S = leaf(lr0), leaf(mom0), leaf(log_scale)
    B = {n: leaf(before[n]) for n in ("conv.bias", "fc.bias")}
    ref_init = {"conv.weight": torch.exp(S[0]) * noise["conv.weight"], "conv.bias": B["conv.bias"],
                "fc.weight": torch.exp(S[1]) * noise["fc.weight"], "fc.bias": B["fc.bias"]}
    cols = [0, 1, 0, 1]
    ref = unrolled(model, ce_loss, val_loss, batches, T, L[:, cols], M[:, cols], ref_init, {})
    gl, gm, gs, gbc, gbf = torch.autograd.grad(ref, [L, M, S, B["conv.bias"], B["fc.bias"]])
    assert abs(objective.item() - ref.item()) <= 1e-10 * abs(ref.item())
    assert lr.grad.shape == (T, 2) and mom.grad.shape == (T, 2)
    assert rel_err(lr.grad, gl) < TOL
    assert rel_err(mom.grad, gm) < TOL
    assert rel_err(log_scale.grad, gs) < TOL
    # parameters without an init tensor start from the model's own, which receive their gradient
    assert rel_err(model.conv.bias.grad, gbc) < TOL and rel_err(model.fc.bias.grad, gbf) < TOL


# --- (b) an MLP: per-weight L2, learned training data, a validation penalty on a hyperparameter ----------


def mlp(seed, hidden=8, dropout=None, norm=None):
    torch.manual_seed(seed)
    layers = [nn.Linear(4, hidden), nn.Tanh()]
    layers += [dropout] if dropout is not None else []
    layers += [norm] if norm is not None else []
    return nn.Sequential(*layers, nn.Linear(hidden, 3)).double()


def test_mlp_per_weight_l2_and_learned_data_match_unrolled_float64():
    model = mlp(0)
    X, Y = data(24, (4,), 3, 5)
    Xv, Yv = data(30, (4,), 3, 6)
    T = 15
    batches = [torch.arange(t * 8, (t + 1) * 8) % 24 for t in range(T)]  # indices into the learned data
    gen = torch.Generator().manual_seed(7)
    meta0 = {"x": X, "log_l2.0": -3 + 0.5 * torch.randn(8, 4, generator=gen, dtype=torch.float64),
             "log_l2.2": -3 + 0.5 * torch.randn(3, 8, generator=gen, dtype=torch.float64)}

    def train_loss(net, idx, meta):
        l2 = sum((torch.exp(meta[f"log_l2.{i}"]) * net.params[f"{i}.weight"] ** 2).sum() for i in (0, 2))
        return F.cross_entropy(net(meta["x"][idx]), Y[idx]) + 0.5 * l2

    def val_loss(net, meta):
        penalty = sum(torch.exp(meta[f"log_l2.{i}"]).sum() for i in (0, 2))
        return F.cross_entropy(net(Xv), Yv) + 1e-2 * penalty

    lr0, mom0 = schedules((T,), 8, lr=(0.4, 0.2), mom=(0.6, 0.35))
    lr, mom = leaf(lr0), leaf(mom0)
    meta = {k: leaf(v) for k, v in meta0.items()}
    start = {n: leaf(p) for n, p in model.named_parameters()}
    objective = train_and_evaluate(model, train_loss, val_loss, batches, T, lr, mom, meta=meta)
    objective.backward()

    L, M = leaf(lr0), leaf(mom0)
    meta_ref = {k: leaf(v) for k, v in meta0.items()}
    ref = unrolled(model, train_loss, val_loss, batches, T, L[:, None].expand(T, 4), M[:, None].expand(T, 4),
                   start, meta_ref)
    grads = torch.autograd.grad(ref, [L, M] + list(meta_ref.values()) + list(start.values()))
    assert abs(objective.item() - ref.item()) <= 1e-10 * abs(ref.item())
    assert rel_err(lr.grad, grads[0]) < TOL and rel_err(mom.grad, grads[1]) < TOL
    for k, g in zip(meta_ref, grads[2:5]):
        assert meta[k].grad is not None and rel_err(meta[k].grad, g) < TOL, k
    for (n, p), g in zip(model.named_parameters(), grads[5:]):
        assert rel_err(p.grad, g) < TOL, n


def test_final_weights_in_the_graph_and_a_second_backward():
    model = mlp(1)
    X, Y = data(24, (4,), 3, 9)
    T = 10
    batches = minibatches(X, Y, T, 6)
    lr0, mom0 = schedules((T, 4), 10)
    lr = leaf(lr0)
    final = train_reversibly(model, ce_loss, batches, T, lr, mom0, groups="param")
    assert list(final) == [n for n, _ in model.named_parameters()]
    f = sum((w ** 2).sum() for w in final.values())
    f.backward(retain_graph=True)
    first = lr.grad.clone()
    lr.grad = None
    f.backward()  # the node trains again and reverses again: the same bits
    assert torch.equal(lr.grad, first)

    L = leaf(lr0)
    start = {n: leaf(p) for n, p in model.named_parameters()}

    def squares(net, meta):
        return sum((w ** 2).sum() for w in net.params.values())

    ref = unrolled(model, ce_loss, squares, batches, T, L, mom0, start, {})
    assert abs(f.item() - ref.item()) <= 1e-10 * abs(ref.item())
    assert rel_err(first, torch.autograd.grad(ref, L)[0]) < TOL


def one_schedule_against_unrolled(model, data_seed, T, seed=0, scale=1.0):
    """One (T,) learning-rate schedule on ``model`` (cross-entropy on made-up data): the reversible objective and
    the gradient of ``scale`` times it w.r.t. the schedule, beside unrolled autograd's; (objective, lr.grad,
    reference objective, reference gradient, the run's arguments)."""
    X, Y = data(24, (4,), 3, data_seed)
    Xv, Yv = data(20, (4,), 3, data_seed + 1)
    batches = minibatches(X, Y, T, 8)

    def val_loss(net, meta):
        return F.cross_entropy(net(Xv), Yv)

    lr0, mom0 = schedules((T,), data_seed + 2)
    lr = leaf(lr0)
    objective = train_and_evaluate(model, ce_loss, val_loss, batches, T, lr, mom0, seed=seed)
    (scale * objective).backward()
    L = leaf(lr0)
    n = len(list(model.named_parameters()))
    ref = unrolled(model, ce_loss, val_loss, batches, T, L[:, None].expand(T, n), mom0[:, None].expand(T, n),
                   {k: leaf(p) for k, p in model.named_parameters()}, {}, seed=seed)
    return objective, lr.grad, ref, torch.autograd.grad(scale * ref, L)[0], (ce_loss, val_loss, batches, T, lr0, mom0)


class TiedAutoencoder(nn.Module):
    """A decoder that shares the encoder's weight (as a tied LM embedding) and a weight-normed head."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(21)
        self.enc = nn.Linear(4, 4)
        self.dec = nn.Linear(4, 4)
        self.dec.weight = self.enc.weight
        self.head = nn.utils.parametrizations.weight_norm(nn.Linear(4, 3))

    def forward(self, x):
        return self.head(torch.tanh(self.dec(torch.tanh(self.enc(x)))))


def test_tied_and_parametrized_weights_match_unrolled():
    """The direct swap of weights into the model (FunctionalModule's slots) reaches a tied weight in both of its
    places and a parametrization's original, as torch.func.functional_call does (the unrolled reference uses
    it); weight_norm's backward, whose bits depend on whether it is differentiated twice, replays exactly (it
    failed the reversal before both passes took their gradients with create_graph); the objective's gradient is
    scaled by the gradient it receives (here 2.5)."""
    model = TiedAutoencoder().double()
    names = [n for n, _ in model.named_parameters()]
    assert "enc.weight" in names and "dec.weight" not in names  # the tie: one trained parameter
    objective, grad, ref, ref_grad, _ = one_schedule_against_unrolled(model, 22, 10, scale=2.5)
    assert abs(objective.item() - ref.item()) <= 1e-10 * abs(ref.item())
    assert rel_err(grad, ref_grad) < TOL
    assert model.dec.weight is model.enc.weight and isinstance(model.enc.weight, nn.Parameter)  # restored


def test_functional_module_restores_the_weights_after_an_error():
    model = mlp(8)
    before = dict(model.named_parameters())
    slots = _parameter_slots(model, list(before))

    def broken(x):
        raise RuntimeError("inside the model")

    model[0].register_forward_hook(lambda mod, inp, out: broken(out))
    net = FunctionalModule(model, {k: torch.zeros_like(p) for k, p in before.items()}, slots)
    with pytest.raises(RuntimeError, match="inside the model"):
        net(torch.zeros(2, 4, dtype=torch.float64))
    assert all(p is before[k] for k, p in model.named_parameters())


# --- randomness and buffers -----------------------------------------------------------------------------


def test_dropout_replays_exactly_from_the_step():
    model = mlp(2, hidden=16, dropout=nn.Dropout(0.3))
    rng = torch.get_rng_state()
    # the backward raises ReversibilityError unless every dropout mask replays
    objective, grad, ref, ref_grad, args = one_schedule_against_unrolled(model, 11, 12, seed=5)
    assert torch.equal(torch.get_rng_state(), rng)  # the caller's generator is left as it was
    assert abs(objective.item() - ref.item()) <= 1e-10 * abs(ref.item())  # the same masks as step_seed(5, t)
    assert rel_err(grad, ref_grad) < TOL
    other = train_and_evaluate(model, *args, seed=6)
    assert other.item() != objective.item()


def test_randomness_outside_torchs_generator_is_caught():
    model = mlp(3)
    X, Y = data(24, (4,), 3, 14)
    T = 8
    batches = minibatches(X, Y, T, 8)
    own = torch.Generator().manual_seed(0)  # not seeded from the step: differs in the reverse pass

    def noisy_loss(net, batch, meta):
        x, y = batch
        return F.cross_entropy(net(x + 1e-3 * torch.randn(x.shape, generator=own, dtype=x.dtype)), y)

    lr = leaf(torch.full((T,), 0.3, dtype=torch.float64))
    objective = train_and_evaluate(model, noisy_loss, lambda net, meta: ce_loss(net, batches[0], meta), batches, T,
                                   lr, 0.9)
    with pytest.raises(ReversibilityError, match="reproducible"):
        objective.backward()


def test_batchnorm_tracking_running_stats_is_refused():
    model = mlp(4, norm=nn.BatchNorm1d(8))
    X, Y = data(16, (4,), 3, 15)
    refused = r"2 \(BatchNorm1d\) has track_running_stats=True.*track_running_stats=False"
    with pytest.raises(UnsupportedBufferError, match=refused):
        train_and_evaluate(model, ce_loss, lambda net, meta: ce_loss(net, (X, Y), meta), [(X, Y)] * 4, 4, 0.1, 0.9)


def test_batchnorm_with_batch_statistics_matches_unrolled():
    model = mlp(5, norm=nn.BatchNorm1d(8, track_running_stats=False))
    X, Y = data(24, (4,), 3, 16)
    Xv, Yv = data(20, (4,), 3, 17)
    T = 10
    batches = minibatches(X, Y, T, 8)

    def val_loss(net, meta):
        return F.cross_entropy(net(Xv), Yv)

    lr0, mom0 = schedules((T,), 18)
    lr = leaf(lr0)
    train_and_evaluate(model, ce_loss, val_loss, batches, T, lr, mom0).backward()
    L = leaf(lr0)
    ref = unrolled(model, ce_loss, val_loss, batches, T, L[:, None].expand(T, 6), mom0[:, None].expand(T, 6),
                   {n: leaf(p) for n, p in model.named_parameters()}, {})
    assert rel_err(lr.grad, torch.autograd.grad(ref, L)[0]) < TOL


class CountsCalls(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("calls", torch.zeros((), dtype=torch.float64))

    def forward(self, x):
        self.calls += 1
        return x


def test_a_buffer_changed_by_training_is_refused_and_restored():
    model = nn.Sequential(nn.Linear(4, 3), CountsCalls()).double()
    X, Y = data(8, (4,), 3, 19)
    with pytest.raises(UnsupportedBufferError, match=r"\['1.calls'\].*training loss of step 0"):
        train_and_evaluate(model, ce_loss, lambda net, meta: ce_loss(net, (X, Y), meta), [(X, Y)] * 3, 3, 0.1, 0.9)
    assert float(model[1].calls) == 0


# --- clear errors -------------------------------------------------------------------------------------


def small_setup():
    model = mlp(6)
    X, Y = data(8, (4,), 3, 20)
    return model, [(X, Y)] * 5, (lambda net, meta: ce_loss(net, (X, Y), meta))


@pytest.mark.parametrize("lr, momentum, kwargs, err, match", [
    (torch.full((6,), 0.1, dtype=torch.float64), 0.9, {}, ValueError, r"lr must have shape \(T,\) = \(5,\)"),
    (torch.full((5, 3), 0.1, dtype=torch.float64), 0.9, {"groups": "weight_bias"}, ValueError, r"\(5, 2\).*\(5, 3\)"),
    (torch.full((5,), 1, dtype=torch.int64), 0.9, {}, TypeError, "floating-point"),
    (0.1, torch.tensor([0.9, 0.9, 0.0, 0.9, 0.9], dtype=torch.float64), {}, ValueError, r"must be in \(0, 1\]"),
    (float("nan"), 0.9, {}, ValueError, "non-finite"),
    (0.1, 0.9, {"groups": {"0.weight": 0}}, ValueError, "missing"),
    (0.1, 0.9, {"init": {"nope": torch.zeros(1)}}, ValueError, "not trainable parameters"),
    (0.1, 0.9, {"init": {"0.weight": torch.zeros(4, 8, dtype=torch.float64)}}, ValueError, r"shape \(8, 4\)"),
    (0.1, 0.9, {"meta": {"l2": 0.1}}, TypeError, "must be a tensor"),
])
def test_bad_inputs_are_named(lr, momentum, kwargs, err, match):
    model, batches, val_loss = small_setup()
    with pytest.raises(err, match=match):
        train_and_evaluate(model, ce_loss, val_loss, batches, 5, lr, momentum, **kwargs)


def test_a_learned_batch_must_go_through_meta():
    model, batches, val_loss = small_setup()
    X = leaf(batches[0][0])
    with pytest.raises(ValueError, match="meta"):
        train_and_evaluate(model, ce_loss, val_loss, lambda t: (X, batches[0][1]), 5, 0.1, 0.9)


def test_fixed_point_overflow_is_reported():
    model, batches, val_loss = small_setup()
    with pytest.raises(FixedPointOverflowError, match="fixed-point range"):
        train_and_evaluate(model, ce_loss, val_loss, batches, 5, 1e6, 0.5, radix_bits=60)
