"""Random STN layer arguments shared by the tests: (x, lam, params) for Linear and Conv2d."""
import torch

# Tolerances against a float64 reference fed the same (rounded) inputs.
TOL = {
    torch.float64: dict(rtol=1e-10, atol=1e-10),
    torch.float32: dict(rtol=1e-4, atol=1e-4),
    torch.bfloat16: dict(rtol=4e-2, atol=4e-2),
    torch.float16: dict(rtol=5e-3, atol=5e-3),
}


def linear_params(in_f, out_f, n, bias=True, dtype=torch.float64, device="cpu", bias_hyper=True):
    mk = lambda *shape: torch.randn(*shape, dtype=dtype, device=device) * 0.5  # noqa: E731
    w_e, w_h, v = mk(out_f, in_f), mk(out_f, in_f), mk(out_f, n)
    if not bias:
        return [w_e, w_h, v, None, None, None]
    if not bias_hyper:
        return [w_e, w_h, v, mk(out_f), None, None]
    return [w_e, w_h, v, mk(out_f), mk(out_f), mk(out_f, n)]


def conv_params(in_c, out_c, k, n, groups=1, bias=True, dtype=torch.float64, device="cpu"):
    mk = lambda *shape: torch.randn(*shape, dtype=dtype, device=device) * 0.5  # noqa: E731
    shape = (out_c, in_c // groups, k, k)
    w_e, w_h, v = mk(*shape), mk(*shape), mk(out_c, n)
    if not bias:
        return [w_e, w_h, v, None, None, None]
    return [w_e, w_h, v, mk(out_c), mk(out_c), mk(out_c, n)]


def make_lam(per_example, batch, n, dtype=torch.float64, device="cpu"):
    shape = (batch, n) if per_example else (n,)
    return torch.randn(*shape, dtype=dtype, device=device)


def leaves(tensors):
    return [t.detach().clone().requires_grad_() if t is not None else None for t in tensors]


def cast(tensors, dtype):
    return [t.detach().to(dtype) if t is not None else None for t in tensors]
