"""StnLinear, StnConv2d, convert(), hyper_input, torch.compile, torch.func and bad input."""
import pytest
import torch
from torch import nn

import stn_ext
from stn_ext import reference as R


def _randomise_hyper(model):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (stn_ext.StnLinear, stn_ext.StnConv2d)):
                m.hyper_weight.normal_()
                if m.hyper_bias is not None:
                    m.hyper_bias.normal_()


class SmallNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 8, 3, stride=2, groups=2, bias=False)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc1 = nn.Linear(32, 16)
        self.drop = nn.Dropout(0.0)
        self.fc2 = nn.Linear(16, 10)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv1(x)))
        x = self.pool(torch.relu(self.conv2(x))).flatten(1)
        return self.fc2(self.drop(torch.relu(self.fc1(x))))


def test_fresh_layers_equal_elementary_layers(device):
    lin = nn.Linear(7, 5, device=device)
    stn = stn_ext.StnLinear.from_linear(lin, 3)
    x = torch.randn(4, 2, 7, device=device)
    for lam in (torch.randn(3, device=device), torch.randn(4, 3, device=device)):
        torch.testing.assert_close(stn(x, lam), lin(x))
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2, padding_mode="reflect", device=device)
    stn_c = stn_ext.StnConv2d.from_conv(conv, 2)
    x = torch.randn(3, 4, 9, 9, device=device)
    for lam in (torch.randn(2, device=device), torch.randn(3, 2, device=device)):
        torch.testing.assert_close(stn_c(x, lam), conv(x))


@pytest.mark.parametrize("x_shape", [(0, 5), (0, 4, 5), (2, 0, 5)], ids=str)
def test_empty_batches_and_positions(x_shape, device):
    layer = stn_ext.StnLinear(5, 3, 2, device=device)
    _randomise_hyper(layer)
    x = torch.randn(*x_shape, device=device, requires_grad=True)
    for lam in (torch.randn(2, device=device), torch.randn(x_shape[0], 2, device=device)):
        y = layer(x, lam)
        assert y.shape == x_shape[:-1] + (3,)
        y.sum().backward()
        assert x.grad.shape == x.shape and torch.all(layer.weight_hyper.grad == 0)
        layer.zero_grad()
    conv = stn_ext.StnConv2d(3, 4, 3, 2, device=device)
    y = conv(torch.randn(0, 3, 6, 6, device=device), torch.randn(0, 2, device=device))
    assert y.shape == (0, 4, 4, 4)
    # The reference (which torch.func transforms and forward-mode AD run) too.
    ref = R.stn_linear(x, torch.randn(x_shape[0], 2, device=device), *layer._stn_params())
    assert ref.shape == x_shape[:-1] + (3,)


def test_layers_run_on_the_meta_device():
    # As nn.Linear / nn.Conv2d do: shapes without data (autocast does not know the meta device).
    lin, conv = stn_ext.StnLinear(5, 3, 2, device="meta"), stn_ext.StnConv2d(3, 4, 3, 2, device="meta")
    for lam in (torch.randn(2, device="meta"), torch.randn(4, 2, device="meta")):
        assert lin(torch.randn(4, 5, device="meta"), lam).shape == (4, 3)
        assert conv(torch.randn(4, 3, 6, 6, device="meta"), lam).shape == (4, 4, 4, 4)


def test_hyper_input_holds_for_its_own_thread():
    import threading

    layer = stn_ext.StnLinear(1, 1, 1, bias=False)
    with torch.no_grad():
        layer.weight_elem.fill_(0.0)
        layer.weight_hyper.fill_(1.0)
        layer.hyper_weight.fill_(1.0)
    both_inside = threading.Barrier(2)
    got = {}

    def run(name, value):
        with stn_ext.hyper_input(torch.tensor([value])):
            both_inside.wait()  # the other thread has opened its block too
            got[name] = layer(torch.ones(1, 1)).item()
            both_inside.wait()
        got[name + " after"] = stn_ext.current_hyper_input()

    threads = [threading.Thread(target=run, args=a) for a in (("A", 2.0), ("B", 5.0))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == {"A": 2.0, "B": 5.0, "A after": None, "B after": None}


def test_fresh_layer_parameter_names_and_shapes():
    layer = stn_ext.StnConv2d(4, 6, (3, 5), 2, groups=2)
    shapes = {k: tuple(v.shape) for k, v in layer.named_parameters()}
    assert shapes == {
        "weight_elem": (6, 2, 3, 5), "weight_hyper": (6, 2, 3, 5), "hyper_weight": (6, 2),
        "bias_elem": (6,), "bias_hyper": (6,), "hyper_bias": (6, 2),
    }
    assert torch.all(layer.hyper_weight == 0) and torch.all(layer.hyper_bias == 0)
    lin = stn_ext.StnLinear(3, 4, 1, bias=False)
    assert [k for k, _ in lin.named_parameters()] == ["weight_elem", "weight_hyper", "hyper_weight"]


def test_layers_match_reference_with_hyper_weights(device):
    layer = stn_ext.StnConv2d(3, 4, 3, 2, padding="same", device=device, dtype=torch.float64)
    _randomise_hyper(layer)
    x = torch.randn(2, 3, 6, 6, device=device, dtype=torch.float64)
    lam = torch.randn(2, 2, device=device, dtype=torch.float64)
    want = R.stn_conv2d(x, lam, *layer._stn_params(), padding="same")
    torch.testing.assert_close(layer(x, lam), want)


def test_convert_keeps_outputs_and_state_dict_round_trips(tmp_path):
    model = SmallNet().eval()
    x = torch.randn(5, 1, 8, 8)
    before = model(x)
    converted = stn_ext.convert(model, n_hyper=3)
    assert converted is model
    kinds = {name: type(m).__name__ for name, m in model.named_children()}
    assert kinds["conv1"] == "StnConv2d" and kinds["conv2"] == "StnConv2d"
    assert kinds["fc1"] == "StnLinear" and kinds["bn"] == "BatchNorm2d"
    for lam in (torch.randn(3), torch.randn(5, 3)):
        with stn_ext.hyper_input(lam):
            torch.testing.assert_close(model(x), before)
    _randomise_hyper(model)
    lam = torch.randn(5, 3)
    with stn_ext.hyper_input(lam):
        after = model(x)
    assert not torch.allclose(after, before)
    torch.save(model.state_dict(), tmp_path / "m.pt")
    fresh = stn_ext.convert(SmallNet().eval(), n_hyper=3)
    fresh.load_state_dict(torch.load(tmp_path / "m.pt"))
    with stn_ext.hyper_input(lam):
        torch.testing.assert_close(fresh(x), after)


def test_convert_of_a_bare_layer_is_a_clear_error():
    with pytest.raises(ValueError, match="from_linear"):
        stn_ext.convert(nn.Linear(3, 2), 1)
    with pytest.raises(ValueError, match="from_conv"):
        stn_ext.convert(nn.Conv2d(3, 2, 1), 1)


def test_convert_filter_selects_layers():
    model = stn_ext.convert(SmallNet(), 2, filter=lambda name, m: isinstance(m, nn.Linear))
    assert isinstance(model.fc1, stn_ext.StnLinear) and isinstance(model.conv1, nn.Conv2d)
    assert not isinstance(model.conv1, stn_ext.StnConv2d)


class DropNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.drop = nn.Linear(6, 8), nn.Dropout(0.3)
        self.block = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Dropout(0.5))
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc2(self.block(self.drop(torch.relu(self.fc1(x)))))


def test_convert_makes_the_models_own_dropouts_tunable_slots():
    from stn_ext.tuning import Tuner
    from stn_ext.tuning.models import HyperDropout
    from stn_ext.tuning.space import HyperSpace

    model = stn_ext.convert(DropNet(), 2, dropout=True)
    assert stn_ext.dropout_slots(model) == ["drop", "block.2"]
    assert isinstance(model.drop, HyperDropout) and model.drop.p == 0.3 and model.block[2].p == 0.5
    assert stn_ext.dropout_slots(stn_ext.convert(DropNet(), 2)) == []  # only when asked
    # untuned, outside the tuner: nn.Dropout's behaviour, draw for draw
    torch.manual_seed(1)
    ref = DropNet()
    conv = stn_ext.convert(DropNet(), 2, dropout=True)
    conv.load_state_dict({k.replace("weight", "weight_elem").replace("bias", "bias_elem"): v
                          for k, v in ref.state_dict().items()}, strict=False)
    x = torch.randn(5, 6)
    torch.manual_seed(7)
    want = ref(x)
    torch.manual_seed(7)
    with stn_ext.elementary():
        torch.testing.assert_close(conv(x), want)
    # tuned: the space names the slots by their path, and a training step draws from the tuned rates
    space = HyperSpace.build(("dropout",), stn_ext.dropout_slots(model))
    assert space.names == ["dropout.drop", "dropout.block.2"]
    tuner = Tuner(model, space, torch.optim.SGD(model.parameters(), lr=0.1),
                  lambda out, y: nn.functional.cross_entropy(out, y, reduction="none"), "stn")
    tuner.weight_step(x, torch.tensor([0, 1, 2, 0, 1]))
    with pytest.raises(ValueError, match="itself an nn.Dropout"):
        stn_ext.convert(nn.Dropout(0.1), 1, dropout=True)


def test_missing_hyper_input_is_a_clear_error():
    layer = stn_ext.StnLinear(3, 2, 1)
    with pytest.raises(RuntimeError, match="hyper_input"):
        layer(torch.randn(2, 3))
    with stn_ext.hyper_input(torch.zeros(1)):
        with stn_ext.hyper_input(torch.zeros(2, 1)) as inner:
            assert stn_ext.current_hyper_input() is inner
        assert stn_ext.current_hyper_input().shape == (1,)
    assert stn_ext.current_hyper_input() is None


def test_training_lowers_loss():
    # The layer learns through both paths: a few SGD steps on a fixed regression target.
    torch.manual_seed(1)
    layer = stn_ext.StnLinear(8, 4, 2)
    x, target, lam = torch.randn(32, 8), torch.randn(32, 4), torch.randn(32, 2)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    losses = []
    for _ in range(30):
        loss = nn.functional.mse_loss(layer(x, lam), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]
    assert layer.hyper_weight.abs().sum() > 0  # V received gradient


class Hyperless(nn.Module):
    """A small model whose forward takes lam explicitly, for torch.compile."""

    def __init__(self):
        super().__init__()
        self.conv = stn_ext.StnConv2d(1, 4, 3, 2, padding=1)
        self.fc = stn_ext.StnLinear(4 * 16, 10, 2)

    def forward(self, x, lam):
        h = torch.relu(self.conv(x, lam))
        return self.fc(nn.functional.avg_pool2d(h, 2).flatten(1), lam)


@pytest.mark.parametrize("per_example", [False, True], ids=["shared", "per_example"])
def test_torch_compile_fullgraph_matches_eager(per_example):
    torch._dynamo.reset()
    model = Hyperless()
    _randomise_hyper(model)
    x = torch.randn(6, 1, 8, 8)
    lam = torch.randn(6, 2) if per_example else torch.randn(2)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, lam), model(x, lam))
    g_eager = torch.autograd.grad(model(x, lam).sum(), list(model.parameters()))
    g_comp = torch.autograd.grad(compiled(x, lam).sum(), list(model.parameters()))
    for a, b in zip(g_comp, g_eager):
        torch.testing.assert_close(a, b)


def test_torch_compile_inductor_with_hyper_input_context():
    torch._dynamo.reset()
    model = stn_ext.convert(nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 3)), 2)
    _randomise_hyper(model)
    x, lam = torch.randn(4, 5), torch.randn(4, 2)
    compiled = torch.compile(model, fullgraph=True)
    with stn_ext.hyper_input(lam):
        torch.testing.assert_close(compiled(x), model(x))


def test_torch_func_transforms_and_forward_ad_work():
    # No fused rule exists for them, so the layers run the reference maths there: same values.
    layer = stn_ext.StnLinear(5, 3, 2, dtype=torch.float64)
    _randomise_hyper(layer)
    x, lam = torch.randn(4, 5, dtype=torch.float64), torch.randn(2, dtype=torch.float64)
    params = dict(layer.named_parameters())

    def loss(p, lam):
        return torch.func.functional_call(layer, p, (x, lam)).square().sum()

    lam_ = lam.clone().requires_grad_()
    (want,) = torch.autograd.grad(loss(params, lam_), [lam_])
    torch.testing.assert_close(torch.func.grad(loss, argnums=1)(params, lam), want)
    lams = torch.randn(3, 2, dtype=torch.float64)
    torch.testing.assert_close(torch.vmap(lambda l: layer(x, l))(lams), torch.stack([layer(x, l) for l in lams]))
    tangent = torch.randn(2, dtype=torch.float64)
    _, jvp = torch.func.jvp(lambda l: layer(x, l), (lam,), (tangent,))
    eps = 1e-6
    fd = (layer(x, lam + eps * tangent) - layer(x, lam - eps * tangent)) / (2 * eps)
    torch.testing.assert_close(jvp, fd, rtol=1e-6, atol=1e-6)
    conv = stn_ext.StnConv2d(2, 3, 3, 2, padding=1, dtype=torch.float64)
    _randomise_hyper(conv)
    xc = torch.randn(2, 2, 5, 5, dtype=torch.float64)
    with torch.autograd.forward_ad.dual_level():
        dual = torch.autograd.forward_ad.make_dual(lam, tangent)
        y_t = torch.autograd.forward_ad.unpack_dual(conv(xc, dual)).tangent
    fd = (conv(xc, lam + eps * tangent) - conv(xc, lam - eps * tangent)) / (2 * eps)
    torch.testing.assert_close(y_t, fd, rtol=1e-6, atol=1e-6)


def test_compile_under_autocast_matches_eager():
    # The per-example Linear op casts its inputs at the autocast key, so compiled code runs it in
    # bfloat16 as eager does (it used to run in float32 under torch.compile).
    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = stn_ext.StnLinear(16, 8, 2)
    _randomise_hyper(layer)
    x, lam = torch.randn(4, 3, 16), torch.randn(4, 2)

    def f(x, lam):  # an op after the layer, so compiled code reads the layer's output
        return torch.relu(layer(x, lam)) * 2

    compiled = torch.compile(f, fullgraph=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_eager, y_compiled = f(x, lam), compiled(x, lam)
    assert y_eager.dtype == y_compiled.dtype == torch.bfloat16
    torch.testing.assert_close(y_compiled, y_eager)
    grads = []
    for y in (y_eager, y_compiled):
        layer.zero_grad()
        y.float().square().sum().backward()
        grads.append([p.grad.clone() for p in layer.parameters()])
    for a, b in zip(*grads):  # the two graphs round in bfloat16 at different places
        assert a.dtype == b.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=2e-2, atol=1e-2 * max(1.0, b.abs().max().item()))


@pytest.mark.parametrize("kind,lam,forward_op,backward_op", [
    ("linear", (4, 2), "per_example_linear", "mm"),  # its backward op is composed of ATen's GEMMs
    ("linear", (2,), "stn_ext.gate", "gate_backward"),
    ("conv", (2, 2), "per_example_epilogue", "per_example_epilogue_backward"),
    ("conv", (2,), "stn_ext.gate", "gate_backward"),
])
def test_compiled_graph_uses_the_fused_ops(kind, lam, forward_op, backward_op):
    # The layer ops (stn_ext::stn_linear, stn_conv2d) are composed in C++: what runs is the graph AOTAutograd
    # traces through them, forward and backward.
    from torch._dynamo.backends.common import aot_autograd

    torch._dynamo.reset()
    seen = {"forward": [], "backward": []}

    def capture(part):
        def compiler(gm, inputs):
            seen[part].extend(str(n.target) for n in gm.graph.nodes)
            return gm
        return compiler

    layer, x = ((stn_ext.StnLinear(5, 3, 2), torch.randn(4, 5)) if kind == "linear"
                else (stn_ext.StnConv2d(3, 4, 3, 2), torch.randn(2, 3, 6, 6)))
    backend = aot_autograd(fw_compiler=capture("forward"), bw_compiler=capture("backward"))
    torch.compile(layer, fullgraph=True, backend=backend)(x, torch.randn(*lam)).sum().backward()
    assert any(forward_op in t for t in seen["forward"]), seen["forward"]
    assert any(backward_op in t for t in seen["backward"]), seen["backward"]
    assert not any("stn_linear" in t or "stn_conv2d" in t for t in seen["forward"])  # decomposed


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_per_example_layers_keep_h_not_the_stacked_output(kind):
    # Backward needs only the h half of the stacked output o = [e | h]; keeping all of o would hold
    # 2*out channels per example where the pure-PyTorch layer holds out.
    B, out = 4, 6
    layer, x = ((stn_ext.StnLinear(5, out, 2), torch.randn(B, 5)) if kind == "linear"
                else (stn_ext.StnConv2d(3, out, 3, 2, padding=1), torch.randn(B, 3, 7, 7)))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = layer(x.requires_grad_(), torch.randn(B, 2))
    activations = [t for t in saved if t.dim() > 1 and t.shape[0] == B]
    assert activations and all(t.numel() <= y.numel() for t in activations), [t.shape for t in saved]
    assert max(t.untyped_storage().nbytes() for t in activations) <= y.untyped_storage().nbytes()


BAD_LINEAR = [
    (dict(lam=torch.zeros(3)), "n_hyper=2"),
    (dict(lam=torch.zeros(5, 2)), "batch size"),
    (dict(lam=torch.zeros(4, 2, 1)), "lam must have shape"),
    (dict(lam=torch.zeros(2, dtype=torch.int64)), "lam must be a floating-point"),
    (dict(lam=torch.zeros(2, dtype=torch.float64)), "lam has dtype"),
    (dict(x=torch.zeros(4, 6)), "in_features=7"),
    (dict(lam=torch.zeros(2, device="meta")), "lam is on meta"),
]


@pytest.mark.parametrize("change,message", BAD_LINEAR, ids=[m for _, m in BAD_LINEAR])
def test_bad_linear_input_is_a_clear_error(change, message):
    layer = stn_ext.StnLinear(7, 3, 2)
    args = dict(x=torch.zeros(4, 7), lam=torch.zeros(2))
    args.update(change)
    with pytest.raises(ValueError, match=message):
        layer(args["x"], args["lam"])


@pytest.mark.parametrize("transform", ["vmap", "grad", "forward-ad"])
@pytest.mark.parametrize("change,message", BAD_LINEAR[:3] + BAD_LINEAR[5:6], ids=lambda v: str(v)[:20])
def test_bad_input_is_the_same_clear_error_on_the_reference_path(transform, change, message):
    # Under torch.func transforms and forward AD the layer runs the reference maths, after the same checks.
    layer = stn_ext.StnLinear(7, 3, 2)
    args = dict(x=torch.zeros(4, 7), lam=torch.zeros(2))
    args.update(change)
    x, lam = args["x"], args["lam"]
    with pytest.raises(ValueError, match=message):
        if transform == "vmap":  # lam batched by vmap: the layer sees one example's lam
            torch.vmap(lambda l: layer(x, l))(lam[None].expand(3, *lam.shape))
        elif transform == "grad":
            torch.func.grad(lambda l: layer(x, l).sum())(lam)
        else:
            with torch.autograd.forward_ad.dual_level():
                layer(x, torch.autograd.forward_ad.make_dual(lam, torch.ones_like(lam)))


def test_bad_conv_input_is_a_clear_error():
    layer = stn_ext.StnConv2d(4, 6, 3, 2)
    with pytest.raises(ValueError, match=r"expects \(B, 4, H, W\)"):
        layer(torch.zeros(2, 3, 5, 5), torch.zeros(2))
    with pytest.raises(ValueError, match="groups"):
        stn_ext.StnConv2d(4, 6, 3, 2, groups=4)
    with pytest.raises(ValueError, match="padding must be"):
        stn_ext.StnConv2d(4, 6, 3, 2, padding="full")
    with pytest.raises(ValueError, match="needs stride 1"):
        stn_ext.StnConv2d(4, 6, 3, 2, padding="same", stride=2)


def test_bad_op_arguments_name_the_argument():
    ops = torch.ops.stn_ext
    with pytest.raises(RuntimeError, match="scale must have shape"):
        ops.gate(torch.zeros(3, 4), torch.zeros(3, 4), torch.zeros(4))
    with pytest.raises(RuntimeError, match="hyper has dtype"):
        ops.gate(torch.zeros(3, 4), torch.zeros(3, 4, dtype=torch.float64), torch.zeros(3))
    with pytest.raises(RuntimeError, match="floating-point"):
        ops.gate(torch.zeros(3, 4, dtype=torch.int32), torch.zeros(3, 4, dtype=torch.int32),
                 torch.zeros(3, dtype=torch.int32))
    with pytest.raises(RuntimeError, match="must have 2\\*out"):
        ops.per_example_epilogue(torch.zeros(2, 5, 3), torch.zeros(2, 3), None, 1, True)
    with pytest.raises(RuntimeError, match="offset must have shape"):
        ops.per_example_epilogue(torch.zeros(2, 5, 6), torch.zeros(2, 3), torch.zeros(3, 3), 1, True)
    with pytest.raises(RuntimeError, match="groups"):
        ops.per_example_epilogue(torch.zeros(2, 6, 5), torch.zeros(2, 3), None, 2, False)
    with pytest.raises(RuntimeError, match="h must have out = 3"):
        ops.per_example_epilogue_backward(torch.zeros(2, 5, 6), torch.zeros(2, 5, 6), torch.zeros(2, 3), 1, True)
    with pytest.raises(RuntimeError, match="s must have shape"):
        ops.per_example_linear(torch.zeros(2, 4), torch.zeros(3, 4), torch.zeros(3, 4), torch.zeros(3, 3), None)


def test_cuda_tensors_on_cpu_only_build_say_how_to_rebuild():
    # Call the op's CUDA kernel directly (what CUDA tensors would reach). A CPU-only build answers
    # with rebuild instructions; a CUDA build checks that the tensors are on a CUDA device.
    keyset = torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA)
    args = (torch.zeros(3, 4), torch.zeros(3, 4), torch.zeros(3))
    expected = "must be a CUDA tensor" if stn_ext.has_cuda() else "FORCE_CUDA=1"
    with pytest.raises(RuntimeError, match=expected):
        torch.ops.stn_ext.gate.default.redispatch(keyset, *args)


@pytest.mark.parametrize("kind", ["linear", "conv", "conv-reflect"])
def test_elementary_equals_lam_zero_bit_for_bit(kind):
    torch.manual_seed(0)
    if kind == "linear":
        layer, x = stn_ext.StnLinear(7, 5, n_hyper=3), torch.randn(4, 7)
    else:
        layer = stn_ext.StnConv2d(3, 4, 3, n_hyper=3, padding=1, padding_mode="reflect" if "reflect" in kind else "zeros")
        x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():  # a live hypernet path, so lam = 0 is not trivially the elementary layer
        layer.hyper_weight.normal_()
        if layer.hyper_bias is not None:
            layer.hyper_bias.normal_()
    want = layer(x, torch.zeros(3))
    want.square().sum().backward()
    g_want = layer.weight_elem.grad.clone()
    layer.zero_grad(set_to_none=True)
    with stn_ext.elementary():
        got = layer(x)
    got.square().sum().backward()
    assert torch.equal(got, want) and torch.equal(layer.weight_elem.grad, g_want)
    assert layer.weight_hyper.grad is None and layer.hyper_weight.grad is None  # no hypernet path at all
    assert repr(stn_ext.current_hyper_input()) == "None"
