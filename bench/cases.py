"""The benchmark cases (MLP and CNN layer shapes, small to large) and the variants timed for each,
shared by the command (bench/bench_layers.py) and the pytest-benchmark tests (bench/test_bench_layers.py)."""
import torch
import torch.nn.functional as F

from stn_ext import functional as Fn
from stn_ext import reference as R

# (batch, in, out, n_hyper)
LINEAR_CASES = [(128, 784, 1200, 4), (1024, 1024, 1024, 8), (8192, 4096, 4096, 8)]
# (batch, in channels, out channels, height = width, n_hyper), 3x3 kernels, padding 1
CONV_CASES = [(128, 64, 64, 32, 8), (128, 128, 128, 16, 8)]
# Cases too large for a 2-core CPU in a few minutes: run them with --all.
CPU_SKIP = {(8192, 4096, 4096, 8)}

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


def variants(kind, case, device, dtype, compile_=True):
    """{name: (function, inputs)} for one case; the function's output is what backward starts from."""
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
