"""The benchmark cases (MLP, CNN and language-model layer shapes, small to large) and the variants timed for each,
shared by the command (bench/bench_layers.py) and the pytest-benchmark tests (bench/test_bench_layers.py)."""
import torch
import torch.nn.functional as F

import stn_ext
from stn_ext import functional as Fn
from stn_ext import reference as R

# (batch, in, out, n_hyper)
LINEAR_CASES = [(128, 784, 1200, 4), (1024, 1024, 1024, 8), (8192, 4096, 4096, 8)]
# (batch, in channels, out channels, height = width, n_hyper), 3x3 kernels, padding 1
CONV_CASES = [(128, 64, 64, 32, 8), (128, 128, 128, 16, 8)]
# (sequence length, batch, input size, hidden size, layers, n_hyper): a small language model's LSTM, the STN
# paper's (650/650, 2 layers) at BPTT 35 batch 20, and at its own BPTT 70 batch 40.
LSTM_CASES = [(35, 20, 200, 200, 2, 7), (35, 20, 650, 650, 2, 7), (70, 40, 650, 650, 2, 7)]
# (tokens per batch as (T, B), vocabulary, embedding size, n_hyper): the paper's LM input.
EMBEDDING_CASES = [((70, 40), 10000, 650, 7)]
# Cases too large for a 2-core CPU in a few minutes: run them with --all.
CPU_SKIP = {(8192, 4096, 4096, 8), (70, 40, 650, 650, 2, 7)}

VARIANTS = ["plain", "stn shared", "stn per-example", "reference shared", "reference per-example",
            "compiled reference shared", "compiled reference per-example"]


def _leaf(shape, device, dtype, scale=0.05):
    return (torch.randn(*shape, device=device, dtype=dtype) * scale).requires_grad_()


def _adjacent_pair(shape, device, dtype):
    """W_e and W_h in one storage, as StnLinear keeps them."""
    stacked = torch.randn((2,) + shape, device=device, dtype=dtype) * 0.05
    return [stacked[0].detach().requires_grad_(), stacked[1].detach().requires_grad_()]


def linear_case(case, device, dtype):
    B, n_in, n_out, n = case
    x = _leaf((B, n_in), device, dtype, 1.0)
    p = _adjacent_pair((n_out, n_in), device, dtype) + [_leaf(s, device, dtype) for s in [(n_out, n), (n_out,), (n_out,),
                                                                                          (n_out, n)]]
    plain = (lambda x, w, b: F.linear(x, w, b), [x, p[0], p[3]])
    return plain, Fn.stn_linear, R.stn_linear, x, p, (_leaf((n,), device, dtype, 1.0), _leaf((B, n), device, dtype, 1.0))


def conv_case(case, device, dtype):
    B, c_in, c_out, hw, n = case
    x = _leaf((B, c_in, hw, hw), device, dtype, 1.0)
    k = (c_out, c_in, 3, 3)
    p = [_leaf(s, device, dtype) for s in [k, k, (c_out, n), (c_out,), (c_out,), (c_out, n)]]
    plain = (lambda x, w, b: F.conv2d(x, w, b, padding=1), [x, p[0], p[3]])
    ours = lambda *a: Fn.stn_conv2d(*a, padding=1)  # noqa: E731
    ref = lambda *a: R.stn_conv2d(*a, padding=1)  # noqa: E731
    return plain, ours, ref, x, p, (_leaf((n,), device, dtype, 1.0), _leaf((B, n), device, dtype, 1.0))


def _randomised(module, device, dtype):
    """An STN module on device/dtype with a live hypernet (V, C ~ 0.05 N(0, 1)), as the other cases' leaves."""
    module = module.to(device=device, dtype=dtype)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith(("hyper_weight", "hyper_bias")):
                p.normal_(0, 0.05)
    return module


def lstm_variants(case, device, dtype):
    """nn.LSTM against StnLSTM (shared and per-example lam) and the reference's cell loop, output of all steps.
    No compiled variants: torch.compile runs an LSTM kernel eagerly (as for nn.LSTM), and the unrolled loops
    of the per-example path and the reference compile for minutes at these lengths."""
    T, B, n_in, hidden, layers, n = case
    x = _leaf((T, B, n_in), device, dtype, 1.0)
    plain = torch.nn.LSTM(n_in, hidden, layers, device=device, dtype=dtype)
    stn = _randomised(stn_ext.StnLSTM.from_lstm(plain, n), device, dtype)
    params = [(ih._stn_params(), hh._stn_params()) for ih, hh in stn.cells()]
    lam_shared, lam_ex = _leaf((n,), device, dtype, 1.0), _leaf((B, n), device, dtype, 1.0)
    ours = lambda x, lam, *_: stn(x, lam=lam)[0]  # noqa: E731  (the parameters are listed so their grads reset)
    ref = lambda x, lam, *_: R.stn_lstm(x, None, lam, params)[0]  # noqa: E731
    weights = list(stn.parameters())
    return {
        "plain": (lambda x, *_: plain(x)[0], [x] + list(plain.parameters())),
        "stn shared": (ours, [x, lam_shared] + weights),
        "stn per-example": (ours, [x, lam_ex] + weights),
        "reference shared": (ref, [x, lam_shared] + weights),
        "reference per-example": (ref, [x, lam_ex] + weights),
    }


def embedding_variants(case, device, dtype):
    """nn.Embedding against StnEmbedding (time-major (T, B) indices, batch_dim=1) and the reference."""
    (T, B), vocab, dim, n = case
    idx = torch.randint(0, vocab, (T, B), device=device)
    plain = torch.nn.Embedding(vocab, dim, device=device, dtype=dtype)
    stn = _randomised(stn_ext.StnEmbedding.from_embedding(plain, n, batch_dim=1), device, dtype)
    lam_shared, lam_ex = _leaf((n,), device, dtype, 1.0), _leaf((B, n), device, dtype, 1.0)
    ours = lambda lam, *_: stn(idx, lam)  # noqa: E731
    ref = lambda lam, w_e, w_h, v: R.stn_embedding(idx, lam, w_e, w_h, v, batch_dim=1)  # noqa: E731
    weights = [stn.weight_elem, stn.weight_hyper, stn.hyper_weight]
    return {
        "plain": (lambda w: plain(idx), [plain.weight]),
        "stn shared": (ours, [lam_shared] + weights),
        "stn per-example": (ours, [lam_ex] + weights),
        "reference shared": (ref, [lam_shared] + weights),
        "reference per-example": (ref, [lam_ex] + weights),
    }


def variants(kind, case, device, dtype, compile_=True):
    """{name: (function, inputs)} for one case; the function's output is what backward starts from."""
    if kind == "LSTM":
        return lstm_variants(case, device, dtype)
    if kind == "Embedding":
        return embedding_variants(case, device, dtype)
    plain, ours, ref, x, p, (lam_shared, lam_ex) = (linear_case if kind == "Linear" else conv_case)(case, device, dtype)
    out = {
        "plain": plain,
        "stn shared": (ours, [x, lam_shared] + p),
        "stn per-example": (ours, [x, lam_ex] + p),
        "reference shared": (ref, [x, lam_shared] + p),
        "reference per-example": (ref, [x, lam_ex] + p),
    }
    if compile_:
        out["compiled reference shared"] = (torch.compile(ref), [x, lam_shared] + p)
        out["compiled reference per-example"] = (torch.compile(ref), [x, lam_ex] + p)
    return out


def fwd_bwd(fn, inputs):
    """One forward+backward step, gradients dropped so they do not accumulate."""
    def step():
        for t in inputs:
            t.grad = None
        y = fn(*inputs)
        y.backward(torch.ones_like(y))
    return step


def saved_bytes(fn, inputs):
    """Bytes of the distinct storages autograd keeps for backward, plus the output: the activation
    memory a training step holds per layer (measured, device independent)."""
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = fn(*inputs)
    leaves = {t.untyped_storage().data_ptr() for t in inputs}
    extra = sum(n for ptr, n in seen.items() if ptr not in leaves)
    return extra + y.untyped_storage().nbytes()
