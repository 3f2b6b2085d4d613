"""The compiled ops: opcheck, float64 gradcheck/gradgradcheck, the layers against the reference."""
import copy

import pytest
import torch

import stn_ext
from stn_ext import functional as Fn
from stn_ext import reference as R
from stn_cases import TOL, cast, conv_params, leaves, linear_params, make_lam

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


# --- opcheck: schema, fake kernel, autograd registration, for every op --------------------------


def _op_samples(device):
    d = dict(dtype=torch.float64, device=device)
    r = lambda *s, grad=False: torch.randn(*s, **d).requires_grad_(grad)  # noqa: E731
    yield torch.ops.stn_ext.gate.default, (r(5, 7, grad=True), r(5, 7, grad=True), r(5, grad=True))
    yield torch.ops.stn_ext.gate.default, (r(4, 2, 3, 3, grad=True), r(4, 2, 3, 3), r(4, grad=True))
    yield torch.ops.stn_ext.gate.default, (r(6), r(6), r(6))
    yield torch.ops.stn_ext.gate_backward.default, (r(5, 7, grad=True), r(5, 7, grad=True), r(5, grad=True))
    stacked = r(2, 3, 5)
    for x_shape in [(4, 5), (4, 2, 5)]:
        yield torch.ops.stn_ext.per_example_linear.default, (
            r(*x_shape, grad=True), r(3, 5, grad=True), r(3, 5, grad=True), r(4, 3, grad=True), r(4, 3, grad=True))
        yield torch.ops.stn_ext.per_example_linear.default, (
            r(*x_shape, grad=True), stacked[0].requires_grad_(), stacked[1].requires_grad_(), r(4, 3), r(3, grad=True))
        yield torch.ops.stn_ext.per_example_linear.default, (r(*x_shape, grad=True), r(3, 5), r(3, 5), r(4, 3), None)
        n = x_shape[0] * x_shape[1] if len(x_shape) == 3 else x_shape[0]
        yield torch.ops.stn_ext.per_example_linear_backward.default, (
            r(*x_shape[:-1], 3, grad=True), r(*x_shape, grad=True), r(3, 5, grad=True), r(3, 5, grad=True),
            r(n, 3, grad=True), r(4, 3, grad=True), [True, True, True])
    yield torch.ops.stn_ext.per_example_linear_backward.default, (
        r(4, 3), r(4, 5), r(3, 5), r(3, 5), r(4, 3), r(4, 3), [False, True, False])
    for groups, cl in [(1, True), (1, False), (2, False), (2, True)]:
        o_shape = (3, 4, 8) if cl else (3, 8, 4)
        y_shape = (3, 4, 4) if cl else (3, 4, 4)
        yield torch.ops.stn_ext.per_example_epilogue.default, (
            r(*o_shape, grad=True), r(3, 4, grad=True), r(3, 4, grad=True), groups, cl)
        yield torch.ops.stn_ext.per_example_epilogue.default, (
            r(*o_shape, grad=True), r(3, 4, grad=True), r(4, grad=True), groups, cl)
        yield torch.ops.stn_ext.per_example_epilogue.default, (r(*o_shape, grad=True), r(3, 4), None, groups, cl)
        yield torch.ops.stn_ext.per_example_epilogue_backward.default, (
            r(*y_shape, grad=True), r(*y_shape, grad=True), r(3, 4, grad=True), groups, cl)

    # The layer ops, composed in C++ of the ops above.
    lin = lambda: [r(3, 5, grad=True), r(3, 5, grad=True), r(3, 2, grad=True), r(3, grad=True), r(3, grad=True),  # noqa: E731
                   r(3, 2, grad=True)]
    yield torch.ops.stn_ext.stn_linear.default, (r(4, 5, grad=True), r(2, grad=True), *lin())
    yield torch.ops.stn_ext.stn_linear.default, (r(4, 2, 5, grad=True), r(4, 2, grad=True), *lin())
    yield torch.ops.stn_ext.stn_linear.default, (r(4, 5, grad=True), r(4, 2, grad=True), *lin()[:3])
    conv = lambda: [r(4, 1, 3, 3, grad=True), r(4, 1, 3, 3, grad=True), r(4, 2, grad=True), r(4, grad=True),  # noqa: E731
                    r(4, grad=True), r(4, 2, grad=True)]
    x_cl = r(3, 2, 6, 6).to(memory_format=torch.channels_last).requires_grad_()
    yield torch.ops.stn_ext.stn_conv2d.default, (r(3, 2, 6, 6, grad=True), r(2, grad=True), *conv(), [1, 1], [1, 1],
                                                 [1, 1], 2)
    yield torch.ops.stn_ext.stn_conv2d.default, (x_cl, r(3, 2, grad=True), *conv(), [2, 1], [0, 1], [1, 1], 2)
    yield torch.ops.stn_ext.stn_conv2d.default, (r(3, 2, 6, 6, grad=True), r(3, 2, grad=True), *conv(), [1, 1],
                                                 [0, 0], [1, 1], 2, "same")

N_SAMPLES = len(list(_op_samples("cpu")))


@pytest.mark.parametrize("index", range(N_SAMPLES))
def test_opcheck(index, device):
    op, args = list(_op_samples(device))[index]
    torch.library.opcheck(op, args)


# --- float64 gradcheck and gradgradcheck of the layers (and so of every op) ----------------------

LINEAR_CASES = [
    dict(per_example=False, bias=True),
    dict(per_example=True, bias=True),
    dict(per_example=True, bias=False),
    dict(per_example=False, bias=False),
    dict(per_example=True, bias=True, extra_dims=True),
]


@pytest.mark.parametrize("case", LINEAR_CASES, ids=str)
def test_linear_gradcheck(case, device):
    B, n = 4, 3
    x = torch.randn((B, 2, 5) if case.get("extra_dims") else (B, 5), dtype=torch.float64, device=device)
    args = leaves([x, make_lam(case["per_example"], B, n, device=device)]
                  + linear_params(5, 6, n, bias=case["bias"], device=device))
    inputs = [a for a in args if a is not None]
    fn = lambda *a: Fn.stn_linear(*_fill(args, a))  # noqa: E731
    assert torch.autograd.gradcheck(fn, inputs)
    assert torch.autograd.gradgradcheck(fn, inputs)


CONV_CASES = [
    dict(per_example=False, groups=1, stride=1, padding=1, dilation=1, bias=True, channels_last=False),
    dict(per_example=True, groups=1, stride=2, padding=0, dilation=1, bias=True, channels_last=False),
    dict(per_example=True, groups=2, stride=1, padding=2, dilation=2, bias=True, channels_last=True),
    dict(per_example=True, groups=2, stride=1, padding=1, dilation=1, bias=False, channels_last=False),
    dict(per_example=False, groups=2, stride=2, padding=1, dilation=1, bias=False, channels_last=True),
]


@pytest.mark.parametrize("case", CONV_CASES, ids=str)
def test_conv_gradcheck(case, device):
    B, n = 2, 2
    x = torch.randn(B, 4, 5, 5, dtype=torch.float64, device=device)
    if case["channels_last"]:
        x = x.to(memory_format=torch.channels_last)
    args = leaves([x, make_lam(case["per_example"], B, n, device=device)]
                  + conv_params(4, 4, 3, n, groups=case["groups"], bias=case["bias"], device=device))
    inputs = [a for a in args if a is not None]
    kw = {k: case[k] for k in ("stride", "padding", "dilation", "groups")}
    fn = lambda *a: Fn.stn_conv2d(*_fill(args, a), **kw)  # noqa: E731
    assert torch.autograd.gradcheck(fn, inputs)
    assert torch.autograd.gradgradcheck(fn, inputs)


@pytest.mark.parametrize("adjacent", [True, False], ids=["adjacent", "separate"])
def test_per_example_linear_both_layouts(adjacent, device):
    # W_e, W_h in one storage (read as [W_e; W_h] without a copy) or apart (concatenated): same results.
    stacked = torch.randn(2, 6, 5, dtype=torch.float64, device=device)
    w_e, w_h = (stacked[0], stacked[1]) if adjacent else (stacked[0].clone(), stacked[1].clone())
    assert (w_h.data_ptr() == w_e.data_ptr() + w_e.numel() * 8) == adjacent
    x, s = (torch.randn(4, 5, dtype=torch.float64, device=device), torch.randn(4, 6, dtype=torch.float64, device=device))
    ins = [t.detach().requires_grad_() for t in (x, w_e, w_h, s)]
    op = lambda *a: torch.ops.stn_ext.per_example_linear(*a, None)[0]  # noqa: E731
    y, h = torch.ops.stn_ext.per_example_linear(*ins, None)
    torch.testing.assert_close(h, x @ w_h.t())
    torch.testing.assert_close(y, x @ w_e.t() + s * (x @ w_h.t()))
    assert torch.autograd.gradcheck(op, ins)
    assert torch.autograd.gradgradcheck(op, ins)


def test_per_example_linear_backward_skips_masked_grads(device):
    d = dict(dtype=torch.float64, device=device)
    g, x, w_e, w_h, s = (torch.randn(4, 3, **d), torch.randn(4, 5, **d), torch.randn(3, 5, **d),
                         torch.randn(3, 5, **d), torch.randn(4, 3, **d))
    h = x @ w_h.t()
    full = torch.ops.stn_ext.per_example_linear_backward(g, x, w_e, w_h, h, s, [True, True, True])
    part = torch.ops.stn_ext.per_example_linear_backward(g, x, w_e, w_h, h, s, [False, True, False])
    assert part[0] is None and part[2] is None
    torch.testing.assert_close(part[1], full[1])
    torch.testing.assert_close(full[0], g @ w_e + (g * s) @ w_h)
    torch.testing.assert_close(full[2], (g * s).t() @ x)
    torch.testing.assert_close(full[3], g * h)


def test_no_output_channels(device):
    # out = 0 is a valid nn.Linear / nn.Conv2d; the epilogue loops once divided by the channels per group.
    for cl in (True, False):
        o = torch.zeros((2, 3, 0) if cl else (2, 0, 3), device=device)
        s = torch.zeros(2, 0, device=device)
        y, h = torch.ops.stn_ext.per_example_epilogue(o, s, None, 1, cl)
        assert y.shape == h.shape == o.shape
        grad_o, grad_s, grad_sum = torch.ops.stn_ext.per_example_epilogue_backward(y, h, s, 1, cl)
        assert grad_o.shape == o.shape and grad_s.shape == grad_sum.shape == (2, 0)
    for n_in, n_out in ((5, 0), (0, 4)):  # and no input features
        layer = stn_ext.StnLinear(n_in, n_out, 2, device=device)
        with torch.no_grad():
            layer.hyper_bias.normal_()
        x, lam = torch.randn(3, n_in, device=device, requires_grad=True), torch.randn(3, 2, device=device)
        y = layer(x, lam)
        torch.testing.assert_close(y, R.stn_linear(x, lam, *layer._stn_params()))
        y.sum().backward()
        assert x.grad.shape == x.shape and torch.all(x.grad == 0)


def test_module_weights_stay_adjacent_after_to():
    layer = stn_ext.StnLinear(5, 4, 2).double()
    assert layer.weight_hyper.data_ptr() == layer.weight_elem.data_ptr() + layer.weight_elem.numel() * 8
    assert isinstance(layer.weight_elem, torch.nn.Parameter) and layer.weight_elem.dtype == torch.float64
    sd = {k: torch.randn_like(v) for k, v in layer.state_dict().items()}
    layer.load_state_dict(sd)
    assert layer.weight_hyper.data_ptr() == layer.weight_elem.data_ptr() + layer.weight_elem.numel() * 8
    torch.testing.assert_close(layer.weight_hyper, sd["weight_hyper"])


def _adjacent(layer):
    e, h = layer.weight_elem, layer.weight_hyper
    return h.data_ptr() == e.data_ptr() + e.numel() * e.element_size()


@pytest.mark.parametrize("make", ["deepcopy", "assign", "pickle"])
def test_module_weights_stay_adjacent_when_copied_or_assigned(make, tmp_path):
    # Each of these makes W_e and W_h anew, one by one; the layer puts them back into one storage.
    for layer in (stn_ext.StnLinear(5, 4, 2), stn_ext.StnConv2d(3, 4, 3, 2)):
        model = torch.nn.Sequential(layer)
        if make == "deepcopy":
            new = copy.deepcopy(model)
        elif make == "assign":
            new = copy.deepcopy(model)
            new.load_state_dict({k: v.clone() + 1 for k, v in model.state_dict().items()}, assign=True)
            torch.testing.assert_close(new[0].weight_hyper, layer.weight_hyper + 1)
        else:
            torch.save(model, tmp_path / "m.pt")
            new = torch.load(tmp_path / "m.pt", weights_only=False)
        assert _adjacent(new[0]) and isinstance(new[0].weight_elem, torch.nn.Parameter)
        if make != "assign":
            torch.testing.assert_close(new[0].weight_hyper, layer.weight_hyper)


def _fill(template, given):
    """Put the non-None inputs given by gradcheck back among the Nones of the template."""
    it = iter(given)
    return [next(it) if t is not None else None for t in template]


# --- forward and backward against the pure-PyTorch reference, every dtype ------------------------


def _compare(fn_ours, fn_ref, args, dtype):
    """Outputs and gradients of ours in `dtype` against the reference in float64 on the same values."""
    ours_in = leaves(cast(args, dtype))
    ref_in = leaves(cast(ours_in, torch.float64))
    y = fn_ours(*ours_in)
    y_ref = fn_ref(*ref_in)
    assert y.dtype == dtype and y.shape == y_ref.shape
    torch.testing.assert_close(y.double(), y_ref, **TOL[dtype])
    w = torch.randn_like(y_ref)
    (y * w.to(dtype)).sum().backward()
    (y_ref * w).sum().backward()
    for name, a, b in zip(range(len(ours_in)), ours_in, ref_in):
        if a is None:
            continue
        scale = max(1.0, b.grad.abs().max().item())
        torch.testing.assert_close(a.grad.double() / scale, b.grad / scale, **TOL[dtype],
                                   msg=lambda m: f"gradient of input {name}: {m}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("per_example", [False, True], ids=["shared", "per_example"])
@pytest.mark.parametrize("bias", ["full", "elem_only", "none"])
def test_linear_matches_reference(dtype, per_example, bias, device):
    B, n = 6, 3
    params = linear_params(16, 12, n, bias=bias != "none", bias_hyper=bias == "full", device=device)
    args = [torch.randn(B, 16, dtype=torch.float64, device=device), make_lam(per_example, B, n, device=device)] + params
    _compare(Fn.stn_linear, R.stn_linear, args, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("per_example", [False, True], ids=["shared", "per_example"])
@pytest.mark.parametrize("case", [
    dict(groups=1, stride=1, padding=1, dilation=1, bias=True, channels_last=False),
    dict(groups=1, stride=2, padding=0, dilation=1, bias=False, channels_last=True),
    dict(groups=4, stride=1, padding=2, dilation=2, bias=True, channels_last=False),
    dict(groups=2, stride=1, padding=1, dilation=1, bias=True, channels_last=True),
], ids=str)
def test_conv_matches_reference(dtype, per_example, case, device):
    B, n = 3, 2
    x = torch.randn(B, 8, 7, 6, dtype=torch.float64, device=device)
    params = conv_params(8, 8, 3, n, groups=case["groups"], bias=case["bias"], device=device)
    kw = {k: case[k] for k in ("stride", "padding", "dilation", "groups")}
    ml = torch.channels_last if case["channels_last"] else torch.contiguous_format

    def ours(x, *rest):
        return Fn.stn_conv2d(x.contiguous(memory_format=ml), *rest, **kw)

    _compare(ours, lambda *a: R.stn_conv2d(*a, **kw), [x, make_lam(per_example, B, n, device=device)] + params, dtype)


def test_per_example_linear_never_builds_batch_weights():
    # The per-example path's peak allocation stays far below B copies of the weight.
    B, n = 64, 2
    args = [torch.randn(B, 256), make_lam(True, B, n, dtype=torch.float32)] + linear_params(256, 256, n, dtype=torch.float32)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        Fn.stn_linear(*args)
    peak = max(e.cpu_memory_usage for e in prof.key_averages())
    assert peak < 4 * 256 * 256 * 4, peak  # B weights would be 64 * 256 KiB


def test_non_contiguous_inputs(device):
    B, n = 4, 2
    x = torch.randn(10, B, dtype=torch.float64, device=device).t()  # (B, 10), non-contiguous
    w_e, w_h, v, b_e, b_h, c = linear_params(10, 6, n, device=device)
    w_e_t = w_e.t().contiguous().t()  # same values, transposed strides
    v_t = v.t().contiguous().t()
    lam = torch.randn(n, B, dtype=torch.float64, device=device).t()
    for lam_ in (lam, lam[0]):
        got = Fn.stn_linear(x, lam_, w_e_t, w_h, v_t, b_e, b_h, c)
        want = R.stn_linear(x.contiguous(), lam_.contiguous(), w_e, w_h, v, b_e, b_h, c)
        torch.testing.assert_close(got, want)
    o = torch.randn(3, 8, 4, dtype=torch.float64, device=device).transpose(1, 2).contiguous().transpose(1, 2)
    s = torch.randn(4, 3, dtype=torch.float64, device=device).t()
    y, h_kept = torch.ops.stn_ext.per_example_epilogue(o, s, None, 1, False)
    e, h = o[:, :4], o[:, 4:]
    torch.testing.assert_close(y, e + s[:, :, None] * h)
    torch.testing.assert_close(h_kept, h, rtol=0, atol=0)


def test_non_contiguous_gradients(device):
    # The gradient reaching the per-example ops may be permuted or broadcast (expanded) by what follows.
    B, n = 4, 2
    args = [torch.randn(B, 6, 5, dtype=torch.float64, device=device), make_lam(True, B, n, device=device)]
    args += linear_params(5, 3, n, device=device)
    ours, ref = leaves(args), leaves(args)
    for fn, a in ((Fn.stn_linear, ours), (R.stn_linear, ref)):
        y = fn(*a)
        (y.transpose(0, 1).reshape(6, -1) ** 2).sum().backward()
        fn(*a).sum().backward()  # an expanded (zero-stride) gradient
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a.grad, b.grad)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_autocast(dtype, device):
    if device == "cpu" and dtype == torch.float16:
        pytest.skip("CPU autocast is exercised in bfloat16")
    linear = stn_ext.StnLinear(16, 8, 2, device=device)
    conv = stn_ext.StnConv2d(4, 6, 3, 2, padding=1, device=device)
    for layer in (linear, conv):
        with torch.no_grad():
            layer.hyper_weight.normal_()
            layer.hyper_bias.normal_()
    cases = [(linear, torch.randn(4, 16, device=device)), (conv, torch.randn(4, 4, 5, 5, device=device))]
    for layer, x in cases:
        for lam in (torch.randn(2, device=device), torch.randn(4, 2, device=device)):
            layer.zero_grad()
            with torch.autocast(device, dtype=dtype):
                y = layer(x, lam)
            assert y.dtype == dtype
            torch.testing.assert_close(y.float(), layer(x, lam), rtol=5e-2, atol=5e-2)
            y.float().sum().backward()
            assert layer.weight_hyper.grad is not None and layer.weight_hyper.grad.dtype == torch.float32
