"""StnLSTM and StnEmbedding: nn.LSTM / nn.Embedding when fresh, the pure-PyTorch reference with a live
hypernet (shared and per-example lam, DropConnect), gradcheck, torch.compile, autocast, convert() and bad input.
No new op is registered for them (they compose stn_ext::gate and stn_ext::per_example_linear, whose opcheck
is in test_stn_ops.py)."""
import copy
import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import stn_ext
from stn_ext import functional as Fn
from stn_ext import reference as R
from stn_ext.nn._base import _StnMixin

F64 = torch.float64


def _randomise_hyper(model):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, _StnMixin):
                m.hyper_weight.normal_()
                if m.hyper_bias is not None:
                    m.hyper_bias.normal_()
    return model


def _params(lstm):
    return [(ih._stn_params(), hh._stn_params()) for ih, hh in lstm.cells()]


def _state(batch_first, T, B, I, layers, H, dtype=torch.float32, device="cpu"):
    x = torch.randn((B, T, I) if batch_first else (T, B, I), dtype=dtype, device=device)
    hx = tuple(torch.randn(layers, B, H, dtype=dtype, device=device) for _ in range(2))
    return x, hx


def _assert_same(a, b, exact):
    if exact:
        assert torch.equal(a, b)
    else:
        torch.testing.assert_close(a, b)


# --- StnLSTM -------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_layers", [1, 2])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("batch_first", [False, True], ids=["time_first", "batch_first"])
@pytest.mark.parametrize("with_hx", [False, True], ids=["no_hx", "hx"])
def test_fresh_lstm_equals_nn_lstm(num_layers, bias, batch_first, with_hx, device):
    lstm = nn.LSTM(5, 4, num_layers, bias=bias, batch_first=batch_first, device=device)
    stn = stn_ext.StnLSTM.from_lstm(lstm, 3)
    x, hx = _state(batch_first, 6, 3, 5, num_layers, 4, device=device)
    x.requires_grad_()
    hx = hx if with_hx else None
    want, (h_want, c_want) = lstm(x, hx)
    g = torch.randn_like(want)
    gx_want, *w_want = torch.autograd.grad(want, [x] + list(lstm.parameters()), g)
    for lam in (torch.randn(3, device=device), torch.randn(3, 3, device=device), stn_ext.ELEMENTARY):
        with stn_ext.hyper_input(lam) if lam is not stn_ext.ELEMENTARY else stn_ext.elementary():
            got, (h, c) = stn(x, hx)
        if lam is not stn_ext.ELEMENTARY and lam.dim() == 2:  # the recurrence in another order of sums
            for a, b in ((got, want), (h, h_want), (c, c_want)):
                torch.testing.assert_close(a, b)
            continue
        # Shared lam with V = C = 0 gates each weight to W_e exactly, and the same kernel runs on it (on a GPU
        # cuDNN may pick another algorithm for a buffer of its own: close there).
        for a, b in ((got, want), (h, h_want), (c, c_want)):
            _assert_same(a, b, exact=device == "cpu")
        elem = [p for ih, hh in stn.cells() for m in (ih, hh) for p in (m.weight_elem, m.bias_elem) if p is not None]
        gx, *w = torch.autograd.grad(got, [x] + elem, g)
        _assert_same(gx, gx_want, exact=device == "cpu")
        # nn.LSTM's order per layer: weight_ih, weight_hh, bias_ih, bias_hh; ours: ih (W, b), hh (W, b).
        order = [0, 2, 1, 3] if bias else [0, 1]
        per_layer = 4 if bias else 2
        w = [w[k * per_layer + j] for k in range(num_layers) for j in order]
        for a, b in zip(w, w_want):
            _assert_same(a, b, exact=device == "cpu")


def test_lstm_unbatched_and_packed_equal_nn_lstm():
    lstm = nn.LSTM(5, 4, 2)
    stn = stn_ext.StnLSTM.from_lstm(lstm, 2)
    _randomise_hyper(stn)
    lam = torch.zeros(2)  # V, C live, lam = 0: still nn.LSTM exactly
    x, hx = torch.randn(6, 5), (torch.randn(2, 4), torch.randn(2, 4))
    for a, b in zip(torch.utils._pytree.tree_leaves(stn(x, hx, lam)), torch.utils._pytree.tree_leaves(lstm(x, hx))):
        assert torch.equal(a, b)
    padded, lengths = torch.randn(6, 3, 5), torch.tensor([4, 6, 2])
    packed = pack_padded_sequence(padded, lengths, enforce_sorted=False)
    hx = (torch.randn(2, 3, 4), torch.randn(2, 3, 4))
    got, (h, c) = stn(packed, hx, lam)
    want, (h_want, c_want) = lstm(packed, hx)
    assert torch.equal(got.data, want.data) and torch.equal(h, h_want) and torch.equal(c, c_want)
    with pytest.raises(NotImplementedError, match="PackedSequence needs one lam"):
        stn(packed, hx, torch.zeros(3, 2))


@pytest.mark.parametrize("mask", ["none", "one", "per_layer"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("per_example", [False, True], ids=["shared", "per_example"])
def test_lstm_matches_reference(per_example, bias, mask):
    torch.manual_seed(0)
    stn = _randomise_hyper(stn_ext.StnLSTM(3, 4, 2, num_layers=2, bias=bias, batch_first=True, dtype=F64))
    x, hx = _state(True, 5, 3, 3, 2, 4, dtype=F64)
    lam = torch.randn(3, 2, dtype=F64) if per_example else torch.randn(2, dtype=F64)
    m = (torch.rand(16, 4, dtype=F64) > 0.3).to(F64) / 0.7
    masks = {"none": None, "one": m, "per_layer": [m, None]}[mask]
    leaves = [t.requires_grad_() for t in (x, lam, *hx)]
    got = stn(x, hx, lam, weight_hh_mask=masks)
    want = R.stn_lstm(x, hx, lam, _params(stn), batch_first=True, weight_hh_mask=masks)
    for a, b in zip(torch.utils._pytree.tree_leaves(got), torch.utils._pytree.tree_leaves(want)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    inputs = leaves + list(stn.parameters())
    g = torch.randn_like(got[0])
    out_got = got[0].mul(g).sum() + got[1][0].sum() + got[1][1].square().sum()
    out_want = want[0].mul(g).sum() + want[1][0].sum() + want[1][1].square().sum()
    for a, b in zip(torch.autograd.grad(out_got, inputs), torch.autograd.grad(out_want, inputs)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_lstm_weight_hh_mask_attribute_and_argument():
    stn = _randomise_hyper(stn_ext.StnLSTM(3, 4, 2, num_layers=2))
    x = torch.randn(5, 2, 3)
    masks = [torch.zeros(16, 4), torch.ones(16, 1)]  # layer 0 without recurrent weights, layer 1 unmasked
    for lam in (torch.randn(2), torch.randn(2, 2)):
        stn.weight_hh_mask = masks
        by_attribute = stn(x, lam=lam)[0]
        stn.weight_hh_mask = None
        by_argument = stn(x, lam=lam, weight_hh_mask=masks)[0]
        assert torch.equal(by_attribute, by_argument)
        zeroed = copy.deepcopy(stn)
        with torch.no_grad():
            zeroed.hh_l0.weight_elem.zero_()
            zeroed.hh_l0.weight_hyper.zero_()
        torch.testing.assert_close(by_argument, zeroed(x, lam=lam)[0])
    with pytest.raises(ValueError, match="one per layer"):
        stn(x, lam=torch.randn(2), weight_hh_mask=[torch.ones(16, 4)])


def test_per_example_lam_with_identical_rows_equals_shared():
    stn = _randomise_hyper(stn_ext.StnLSTM(3, 5, 2, num_layers=2, dtype=F64))
    x, hx = _state(False, 4, 3, 3, 2, 5, dtype=F64)
    lam = torch.randn(2, dtype=F64)
    shared = stn(x, hx, lam)
    per_example = stn(x, hx, lam.expand(3, 2))
    for a, b in zip(torch.utils._pytree.tree_leaves(per_example), torch.utils._pytree.tree_leaves(shared)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def _lstm_fn(stn, per_example):
    """(fn, inputs) for gradcheck: fn(x, lam, h0, c0, *parameters) through functional.stn_lstm, with a mask."""
    names = [n for n, _ in stn.named_parameters()]
    six = ("weight_elem", "weight_hyper", "hyper_weight", "bias_elem", "bias_hyper", "hyper_bias")
    mask = (torch.rand(4 * stn.hidden_size, stn.hidden_size, dtype=F64) > 0.5).to(F64)

    def fn(x, lam, h0, c0, *flat):
        p = dict(zip(names, flat))
        params = [tuple(tuple(p[f"{k}_l{i}.{n}"] for n in six) for k in ("ih", "hh")) for i in range(stn.num_layers)]
        out, (h, c) = Fn.stn_lstm(x, (h0, c0), lam, params, weight_hh_mask=mask)
        return out, h, c

    x, (h0, c0) = _state(False, 3, 2, stn.input_size, stn.num_layers, stn.hidden_size, dtype=F64)
    lam = torch.randn(2, stn.n_hyper, dtype=F64) if per_example else torch.randn(stn.n_hyper, dtype=F64)
    inputs = [t.detach().requires_grad_() for t in (x, lam, h0, c0, *stn.parameters())]
    return fn, inputs


@pytest.mark.parametrize("per_example", [False, True], ids=["shared", "per_example"])
def test_lstm_gradcheck_and_gradgradcheck(per_example):
    torch.manual_seed(0)
    stn = _randomise_hyper(stn_ext.StnLSTM(3, 2, 2, dtype=F64))
    fn, inputs = _lstm_fn(stn, per_example)
    assert torch.autograd.gradcheck(fn, inputs)
    assert torch.autograd.gradgradcheck(fn, inputs)


@pytest.mark.parametrize("per_example", [False, True], ids=["shared", "per_example"])
def test_lstm_torch_compile_matches_eager(per_example):
    # Like nn.LSTM, the kernel of the shared path runs eagerly under torch.compile unless Dynamo's allow_rnn
    # is set (a graph break, the gate ops before it compiled); the per-example path is plain ops and compiles
    # whole.
    torch._dynamo.reset()
    stn = _randomise_hyper(stn_ext.StnLSTM(3, 4, 2, num_layers=2))
    x = torch.randn(3, 3, 3)
    lam = torch.randn(3, 2) if per_example else torch.randn(2)
    # aot_eager for the unrolled loop: inductor's compile of it takes ~30 s on 2 cores, and adds nothing here.
    compiled = torch.compile(stn, fullgraph=per_example, backend="aot_eager" if per_example else "inductor")
    y, (h, c) = compiled(x, lam=lam)
    y_eager, (h_eager, c_eager) = stn(x, lam=lam)
    torch.testing.assert_close(y, y_eager)
    torch.testing.assert_close(c, c_eager)
    g = torch.autograd.grad((y.sum() + h.sum()), list(stn.parameters()))
    g_eager = torch.autograd.grad((y_eager.sum() + h_eager.sum()), list(stn.parameters()))
    for a, b in zip(g, g_eager):
        torch.testing.assert_close(a, b)


def test_lstm_torch_compile_fullgraph_inference_with_allow_rnn(monkeypatch):
    # Where nn.LSTM compiles whole (allow_rnn, no grad: on torch 2.14's CPU AOTAutograd fails on the LSTM
    # kernel's backward, for nn.LSTM too), the shared path does as well.
    torch._dynamo.reset()
    monkeypatch.setattr(torch._dynamo.config, "allow_rnn", True)
    stn = _randomise_hyper(stn_ext.StnLSTM(3, 4, 2, num_layers=2))
    x, lam = torch.randn(5, 3, 3), torch.randn(2)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(stn, fullgraph=True)(x, lam=lam)[0], stn(x, lam=lam)[0])
    torch._dynamo.reset()


@pytest.mark.parametrize("per_example", [False, True], ids=["shared", "per_example"])
def test_lstm_runs_under_autocast(per_example):
    stn = _randomise_hyper(stn_ext.StnLSTM(8, 8, 2, num_layers=2))
    x = torch.randn(5, 4, 8)
    if not per_example:  # the shared path is torch's LSTM kernel: it needs oneDNN's bf16 LSTM on this CPU
        try:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                torch.nn.LSTM(8, 8, 2)(x)
        except RuntimeError as e:
            pytest.skip(f"torch's own nn.LSTM does not run under CPU bf16 autocast here: {str(e)[:80]}")
    lam = torch.randn(4, 2) if per_example else torch.randn(2)
    want = stn(x, lam=lam)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = stn(x, lam=lam)[0]
    if not per_example:
        assert y.dtype == torch.bfloat16  # torch's LSTM kernel under autocast, as nn.LSTM
    torch.testing.assert_close(y.float(), want, rtol=5e-2, atol=5e-2)
    y.float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in stn.parameters())


def test_lstm_forward_ad_runs_the_reference():
    # Under forward AD (and torch.func transforms) the layer runs reference.stn_lstm: same values.
    stn = _randomise_hyper(stn_ext.StnLSTM(3, 4, 2, dtype=F64))
    x, lam, tangent = torch.randn(4, 2, 3, dtype=F64), torch.randn(2, dtype=F64), torch.randn(2, dtype=F64)
    _, jvp = torch.func.jvp(lambda l: stn(x, lam=l)[0], (lam,), (tangent,))
    eps = 1e-6
    fd = (stn(x, lam=lam + eps * tangent)[0] - stn(x, lam=lam - eps * tangent)[0]) / (2 * eps)
    torch.testing.assert_close(jvp, fd, rtol=1e-6, atol=1e-6)


def test_lstm_elementary_and_hyper_input():
    stn = _randomise_hyper(stn_ext.StnLSTM(3, 4, 2, num_layers=2))
    x = torch.randn(5, 2, 3)
    want = stn(x, lam=torch.zeros(2))[0]
    with stn_ext.elementary():
        got = stn(x)[0]
    assert torch.equal(got, want)
    got.sum().backward()
    assert all(m.weight_hyper.grad is None and m.hyper_weight.grad is None for pair in stn.cells() for m in pair)
    lam = torch.randn(2, 2)
    with stn_ext.hyper_input(lam):
        torch.testing.assert_close(stn(x)[0], stn(x, lam=lam)[0], rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="hyper_input"):
        stn(x)


def test_lstm_parameter_names_init_and_from_lstm_mode():
    stn = stn_ext.StnLSTM(3, 4, 2, num_layers=2, bias=False)
    assert [n for n, _ in stn.named_parameters()] == [
        f"{k}_l{i}.{n}" for i in range(2) for k in ("ih", "hh") for n in ("weight_elem", "weight_hyper", "hyper_weight")]
    assert all(torch.all(m.hyper_weight == 0) for pair in stn.cells() for m in pair)
    assert all(p.abs().max() <= 0.5 for n, p in stn.named_parameters() if "hyper_weight" not in n)  # U(-1/sqrt(4), .)
    lstm = nn.LSTM(3, 4, 2, dropout=0.5, batch_first=True).eval()
    converted = stn_ext.StnLSTM.from_lstm(lstm, 2)
    assert not converted.training and converted.dropout == 0.5 and converted.batch_first
    x = torch.randn(2, 5, 3)
    assert torch.equal(converted(x, lam=torch.randn(2))[0], lstm(x)[0])  # eval: no dropout between layers
    with pytest.raises(NotImplementedError, match="bidirectional"):
        stn_ext.StnLSTM(3, 4, 2, bidirectional=True)
    with pytest.raises(ValueError, match="bidirectional"):
        stn_ext.StnLSTM.from_lstm(nn.LSTM(3, 4, proj_size=2), 2)


BAD_LSTM = [
    (dict(lam=torch.zeros(3)), "n_hyper=2"),
    (dict(lam=torch.zeros(5, 2)), "batch size"),
    (dict(lam=torch.zeros(4, 2, 1)), "lam must have shape"),
    (dict(lam=torch.zeros(2, dtype=torch.int64)), "lam must be a floating-point"),
    (dict(lam=torch.zeros(2, dtype=torch.float64)), "lam has dtype"),
    (dict(lam=torch.zeros(2, device="meta")), "lam is on meta"),
    (dict(x=torch.zeros(6, 4, 6)), "input_size=7"),
    (dict(x=torch.zeros(6, 4, 7, dtype=torch.float64)), "input has dtype"),
    (dict(x=torch.zeros(2, 6, 4, 7)), "input must be 3-D"),
    (dict(hx=(torch.zeros(1, 4, 3), torch.zeros(2, 4, 3))), r"h0 has shape \(1, 4, 3\)"),
    (dict(hx=(torch.zeros(2, 4, 3), torch.zeros(2, 5, 3))), "c0 has shape"),
    (dict(hx=(torch.zeros(2, 4, 3), torch.zeros(2, 4, 3, dtype=torch.float64))), "c0 has dtype"),
]


@pytest.mark.parametrize("change,message", BAD_LSTM, ids=[m for _, m in BAD_LSTM])
def test_bad_lstm_input_is_a_clear_error(change, message):
    stn = stn_ext.StnLSTM(7, 3, 2, num_layers=2)
    args = dict(x=torch.zeros(6, 4, 7), hx=None, lam=torch.zeros(2))
    args.update(change)
    with pytest.raises(ValueError, match=message):
        stn(args["x"], args["hx"], args["lam"])


def test_bad_unbatched_lstm_input_is_a_clear_error():
    stn = stn_ext.StnLSTM(7, 3, 2)
    with pytest.raises(ValueError, match="needs a batched input"):
        stn(torch.zeros(6, 7), lam=torch.zeros(1, 2))
    with pytest.raises(ValueError, match="must be 2-D"):
        stn(torch.zeros(6, 7), (torch.zeros(1, 1, 3), torch.zeros(1, 1, 3)), torch.zeros(2))


def test_lstm_on_cuda_hands_cudnn_one_buffer(device):
    if device != "cuda":
        pytest.skip("the one-buffer layout is for cuDNN")
    stn = _randomise_hyper(stn_ext.StnLSTM(8, 16, 2, num_layers=2, device=device))
    x, lam = torch.randn(5, 3, 8, device=device), torch.randn(2, device=device)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*single contiguous chunk")
        y = stn(x, lam=lam)[0]
        y.sum().backward()
    want = R.stn_lstm(x, None, lam, _params(stn))[0]
    torch.testing.assert_close(y, want, rtol=1e-4, atol=1e-4)


def test_one_buffer_views_keep_values_and_gradients():
    weights = [torch.randn(8, 3, requires_grad=True), torch.randn(8, requires_grad=True)]
    views = Fn._one_buffer(weights)
    assert views[1].data_ptr() == views[0].data_ptr() + views[0].numel() * 4
    assert all(torch.equal(a, b) for a, b in zip(views, weights))
    sum(v.square().sum() for v in views).backward()
    assert all(torch.equal(w.grad, 2 * w) for w in weights)


# --- StnEmbedding ----------------------------------------------------------------------------------


def test_fresh_embedding_equals_nn_embedding(device):
    emb = nn.Embedding(10, 4, padding_idx=-1, device=device)
    stn = stn_ext.StnEmbedding.from_embedding(emb, 3)
    assert stn.padding_idx == 9 and torch.all(stn.weight_hyper[9] == 0)
    idx = torch.tensor([[1, 9, 3], [9, 0, 1]], device=device)
    want = emb(idx)
    g = torch.randn_like(want)
    want.backward(g)
    for lam in (torch.randn(3, device=device), torch.randn(2, 3, device=device), stn_ext.ELEMENTARY):
        stn.zero_grad()
        with stn_ext.hyper_input(lam) if lam is not stn_ext.ELEMENTARY else stn_ext.elementary():
            got = stn(idx)
        assert torch.equal(got, want)
        got.backward(g)
        assert torch.equal(stn.weight_elem.grad, emb.weight.grad)  # the padding row gets none
        if lam is not stn_ext.ELEMENTARY:
            assert torch.all(stn.weight_hyper.grad[9] == 0)


@pytest.mark.parametrize("batch_dim", [0, 1])
@pytest.mark.parametrize("per_example", [False, True], ids=["shared", "per_example"])
def test_embedding_matches_reference(per_example, batch_dim):
    stn = _randomise_hyper(stn_ext.StnEmbedding(10, 4, 2, padding_idx=0, batch_dim=batch_dim, dtype=F64))
    idx = torch.randint(0, 10, (3, 5))
    B = idx.shape[batch_dim]
    lam = (torch.randn(B, 2, dtype=F64) if per_example else torch.randn(2, dtype=F64)).requires_grad_()
    got = stn(idx, lam)
    want = R.stn_embedding(idx, lam, stn.weight_elem, stn.weight_hyper, stn.hyper_weight, 0, batch_dim)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    inputs = [lam, stn.weight_elem, stn.weight_hyper, stn.hyper_weight]
    g = torch.randn_like(got)
    grads = torch.autograd.grad(got, inputs, g)
    grads_want = torch.autograd.grad(want, inputs, g)
    for a, b in zip(grads, grads_want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    if per_example:  # identical rows: the shared value
        shared = stn(idx, lam[0].detach())
        torch.testing.assert_close(stn(idx, lam[0].detach().expand(B, 2)), shared, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("per_example", [False, True], ids=["shared", "per_example"])
def test_embedding_gradcheck_and_gradgradcheck(per_example):
    idx = torch.tensor([[1, 2, 0], [3, 2, 2]])
    lam = torch.randn(2, 2, dtype=F64) if per_example else torch.randn(2, dtype=F64)
    tensors = [lam, torch.randn(4, 3, dtype=F64), torch.randn(4, 3, dtype=F64), torch.randn(3, 2, dtype=F64)]
    inputs = [t.requires_grad_() for t in tensors]
    # No padding_idx: its row gets no gradient by definition (nn.Embedding's rule), which no finite difference sees.
    fn = lambda lam, w_e, w_h, v: Fn.stn_embedding(idx, lam, w_e, w_h, v)  # noqa: E731
    assert torch.autograd.gradcheck(fn, inputs)
    assert torch.autograd.gradgradcheck(fn, inputs)


def test_embedding_compile_autocast_and_tied_decoder():
    torch._dynamo.reset()
    stn = _randomise_hyper(stn_ext.StnEmbedding(10, 6, 2))
    idx, lam = torch.randint(0, 10, (4, 3)), torch.randn(4, 2)
    torch.testing.assert_close(torch.compile(stn, fullgraph=True)(idx, lam), stn(idx, lam))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = stn(idx, lam)
    torch.testing.assert_close(y.float(), stn(idx, lam), rtol=2e-2, atol=2e-2)
    decoder = nn.Linear(6, 10)
    decoder.weight = stn.weight_elem  # nn.Embedding's layout: the paper's tied decoder
    assert decoder(stn(idx, lam)).shape == (4, 3, 10)


BAD_EMBEDDING = [
    (dict(lam=torch.zeros(3)), "n_hyper=2"),
    (dict(lam=torch.zeros(5, 2)), "batch size"),
    (dict(lam=torch.zeros(2, dtype=torch.float64)), "lam has dtype"),
    (dict(lam=torch.zeros(2, dtype=torch.int64)), "lam must be a floating-point"),
    (dict(idx=torch.zeros(4, 3)), "integer indices"),
]


@pytest.mark.parametrize("change,message", BAD_EMBEDDING, ids=[m for _, m in BAD_EMBEDDING])
def test_bad_embedding_input_is_a_clear_error(change, message):
    stn = stn_ext.StnEmbedding(10, 6, 2)
    args = dict(idx=torch.zeros(4, 3, dtype=torch.int64), lam=torch.zeros(2))
    args.update(change)
    with pytest.raises(ValueError, match=message):
        stn(args["idx"], args["lam"])
    with pytest.raises(ValueError, match="max_norm"):
        stn_ext.StnEmbedding.from_embedding(nn.Embedding(10, 6, max_norm=1.0), 2)


# --- convert() ------------------------------------------------------------------------------------


class TinyLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Embedding(20, 6)
        self.rnn = nn.LSTM(6, 8, 2, batch_first=True)
        self.decoder = nn.Linear(8, 20)

    def forward(self, idx):
        return self.decoder(self.rnn(self.encoder(idx))[0])


def test_convert_language_model_keeps_outputs_and_state_dict_round_trips(tmp_path):
    model = TinyLM().eval()
    idx = torch.randint(0, 20, (3, 7))
    before = model(idx)
    stn_ext.convert(model, n_hyper=2)
    assert (type(model.encoder), type(model.rnn), type(model.decoder)) == (
        stn_ext.StnEmbedding, stn_ext.StnLSTM, stn_ext.StnLinear)
    assert not model.rnn.training  # the mode of the layer it replaced
    for lam in (torch.randn(2), torch.randn(3, 2)):
        with stn_ext.hyper_input(lam):
            torch.testing.assert_close(model(idx), before)
    _randomise_hyper(model)
    lam = torch.randn(3, 2)
    with stn_ext.hyper_input(lam):
        after = model(idx)
    assert not torch.allclose(after, before)
    torch.save(model.state_dict(), tmp_path / "m.pt")
    fresh = stn_ext.convert(TinyLM().eval(), n_hyper=2)
    fresh.load_state_dict(torch.load(tmp_path / "m.pt"))
    with stn_ext.hyper_input(lam):
        torch.testing.assert_close(fresh(idx), after)


def test_convert_filter_and_unsupported_layers():
    model = stn_ext.convert(TinyLM(), 2, filter=lambda name, m: not isinstance(m, nn.Embedding))
    assert type(model.encoder) is nn.Embedding and isinstance(model.rnn, stn_ext.StnLSTM)
    bi = TinyLM()
    bi.rnn = nn.LSTM(6, 4, bidirectional=True, batch_first=True)
    with pytest.raises(ValueError, match="'rnn' is a bidirectional LSTM"):
        stn_ext.convert(bi, 2)
    assert type(bi.encoder) is nn.Embedding  # nothing replaced before the error
    stn_ext.convert(bi, 2, filter=lambda name, m: name != "rnn")
    with pytest.raises(ValueError, match="from_lstm"):
        stn_ext.convert(nn.LSTM(3, 4), 2)
    with pytest.raises(ValueError, match="from_embedding"):
        stn_ext.convert(nn.Embedding(3, 4), 2)
