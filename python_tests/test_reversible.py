"""Exact reversible SGD with momentum and hypergradients (stn_ext.reversible).

What is asserted: bit-exact round trips of T = 1000 steps (weights, velocities and buffer), buffer size
against -log2(momentum), hypergradients against an independent float64 autograd unrolling and finite
differences, errors for non-reproducible gradients, overflow and bad inputs, opcheck; CUDA tests
(skipped without a GPU) including identical bits on CPU and CUDA.
"""
import contextlib
import math
import os

import pytest
import torch

import stn_ext  # noqa: F401
from stn_ext.reversible import ops as R
from stn_ext.reversible import (
    FixedPointOverflowError,
    ReversibilityError,
    ReversibleSGD,
    hypergradient,
    quantize_momentum,
)
from reversible_states import edge_unstep_state

RADIX = 52
LIMIT = 2.0 ** (63 - RADIX)  # 2048
CUDA = torch.cuda.is_available() and stn_ext.has_cuda()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a GPU and a CUDA build of stn_ext")


# --- raw-op round trips ---------------------------------------------------------------------------


class RawState:
    """The exact state of one tensor, driven through the ops directly."""

    def __init__(self, x, v, capacity, device="cpu", dtype=torch.float32):
        n = x.numel()
        self.x = x.to(device).clone()
        self.v = v.to(device).clone()
        self.head = torch.full((n,), R.HEAD_EMPTY, dtype=torch.int64, device=device)
        self.count = torch.zeros(n, dtype=torch.int32, device=device)
        self.words = torch.zeros((capacity, n), dtype=torch.int32, device=device)
        self.view = torch.empty(n, dtype=dtype, device=device)
        self.status = torch.zeros(2, dtype=torch.int64, device=device)

    def step(self, g, lr, num):
        R.step(self.x, self.v, self.head, self.count, self.words, self.view, g, self.status, lr, num, RADIX)

    def unstep(self, g, lr, num):
        R.unstep_weights(self.x, self.v, self.view, None, self.status, lr, RADIX)
        R.unstep_velocity(self.v, self.head, self.count, self.words, g, None, None, self.status, lr, num, RADIX)

    def bits(self):
        hb = self.head.double() + (self.head < 0).double() * float(2**64)
        return float((32.0 * self.count.double() + torch.log2(hb) - 32.0).sum())


def hard_case(n, seed, device="cpu"):
    """Weights with mixed signs and magnitudes from 2^-45 up to the edge of the range, velocities
    from tiny to ~10, and a gradient pool (mixed magnitudes 1e-9 .. 10) that drives the elements
    near the range limit inwards, so 1000 steps stay in range."""
    gen = torch.Generator().manual_seed(seed)
    sign = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0).double()
    mag = torch.exp2(torch.rand(n, generator=gen).double() * 56 - 45).clamp(max=LIMIT - 40)
    vsign = torch.randn(n, generator=gen).double().sign()
    if n >= 4:  # a few within 2^-20 of the edge of the range (moving inwards), and tiny ones
        mag[:4] = torch.tensor([LIMIT - 2.0**-20, LIMIT - 1.0, 2.0**-52, 1.0], dtype=torch.float64)
        vsign[:2] = -sign[:2]
    x = torch.round(sign * mag * 2.0**RADIX).long()
    vmag = torch.exp2(torch.rand(n, generator=gen).double() * 40 - 37)
    v = torch.round(vsign * vmag * 2.0**RADIX).long()
    pool = []
    for scale in (1e-9, 1e-3, 1.0, 10.0):
        g = torch.randn(n, generator=gen).abs() * scale
        rnd = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0)
        # far elements: always pushed towards zero (the update moves x along -g)
        g = torch.where(mag.float() > 64, g * sign.float(), g * rnd)
        pool.append(g.to(device))
    return x, v, pool


def round_trip(n, momentum, T=1000, device="cpu", seed=0):
    x, v, pool = hard_case(n, seed, device)
    num = R.gamma_num(momentum)
    st = RawState(x, v, capacity=T // 2 + 8, device=device)
    x0, v0 = st.x.clone(), st.v.clone()
    lrs = [1e-4, 1e-3, 3e-3]
    for t in range(T):
        st.step(pool[t % 4], lrs[t % 3], num)
    assert int(st.status[0]) == 0, f"flags {int(st.status[0])}"
    fwd_bits = st.bits()
    moved = not torch.equal(st.x, x0)
    for t in reversed(range(T)):
        st.unstep(pool[t % 4], lrs[t % 3], num)
    assert int(st.status[0]) == 0
    assert moved
    assert torch.equal(st.x, x0)
    assert torch.equal(st.v, v0)
    assert bool((st.count == 0).all())
    assert bool((st.head == R.HEAD_EMPTY).all())
    return fwd_bits, int(st.status[1])


@pytest.mark.parametrize("momentum", [0.5, 0.9, 0.99, 0.999])
@pytest.mark.parametrize("n", [1, 7, 1000, 20_000])
def test_round_trip_exact(n, momentum):
    bits, max_count = round_trip(n, momentum)
    ideal = -math.log2(R.gamma_num(momentum) / R.DEN)
    if n >= 1000:  # enough elements for the average to be tight
        assert abs(bits / (n * 1000) - ideal) <= 0.1 * ideal
        # stored words stay within the bound too: 32 bits per word, plus one word of slack
        assert max_count * 32 <= 1.1 * 1000 * ideal + 32 + 32


def test_round_trip_exact_million():
    round_trip(1_000_000, 0.9, seed=1)


@pytest.mark.parametrize("momentum", [2.0**-16, 0.25, 1.0])
def test_round_trip_extreme_momenta(momentum):
    round_trip(333, momentum, T=300)


def test_round_trip_many_momenta():
    # every code path of the divisions: powers of two, tiny and huge numerators, random ones
    nums = [1, 2, 3, 4, 5, 7, 255, 256, 4097, 32768, 32769, 65534, 65535, 65536]
    nums += torch.randint(2, R.DEN, (30,), generator=torch.Generator().manual_seed(11)).tolist()
    for num in nums:
        round_trip(64, num / R.DEN, T=120, seed=num)


def test_bits_per_step_close_to_information_bound():
    for momentum in (0.5, 0.9, 0.99, 0.999):
        p = torch.nn.Parameter(torch.zeros(2000))
        opt = ReversibleSGD([p])
        gen = torch.Generator().manual_seed(3)
        for t in range(1000):
            p.grad = torch.randn(2000, generator=gen)
            opt.step(1e-3, momentum)
        ideal = -math.log2(quantize_momentum(momentum))
        rate = opt.bits_per_element_per_step
        assert abs(rate - ideal) <= 0.1 * ideal, (momentum, rate, ideal)
        # memory actually held: 64 bits of head (a fixed per-element overhead) + 32 per word
        stored = opt.buffer_storage_bits() / opt.numel - 64
        assert stored <= 1.1 * 1000 * ideal + 32
        assert opt.buffer_bits() > 0


@pytest.mark.parametrize("momentum", [0.3, 0.9, 0.999])
def test_kernel_matches_python_reference_bit_for_bit(momentum):
    from stn_ext.reversible.reference import Element

    n, T = 50, 250  # not a multiple of 4: the CPU's vector lanes and their scalar tail
    x, v, pool = hard_case(n, 21)
    num = R.gamma_num(momentum)
    st = RawState(x, v, capacity=T // 2 + 8)
    ref = [Element(int(a), int(b)) for a, b in zip(x.tolist(), v.tolist())]
    lrs = [1e-4, 1e-3, 3e-3]

    def same():
        heads = [(h + (1 << 64)) % (1 << 64) for h in st.head.tolist()]
        counts = st.count.tolist()
        words = st.words.tolist()
        for i, e in enumerate(ref):
            assert (st.x[i].item(), st.v[i].item(), heads[i]) == (e.x, e.v, e.head), i
            assert counts[i] == len(e.words)
            assert [words[k][i] % (1 << 32) for k in range(counts[i])] == e.words
            assert st.view[i].item() == e.view(RADIX)

    for t in range(T):
        st.step(pool[t % 4], lrs[t % 3], num)
        for i, e in enumerate(ref):
            e.step(pool[t % 4][i].item(), lrs[t % 3], num, RADIX)
        if t % 50 == 49:
            same()
    for t in reversed(range(T)):
        st.unstep(pool[t % 4], lrs[t % 3], num)
        for i, e in enumerate(ref):
            e.unstep(pool[t % 4][i].item(), lrs[t % 3], num, RADIX)
    same()
    assert all(e.head == R.HEAD_EMPTY and not e.words for e in ref)


def test_flags_overflow_and_leaves_element_untouched():
    x = torch.tensor([int((LIMIT - 1) * 2**RADIX), 0], dtype=torch.int64)
    v = torch.zeros(2, dtype=torch.int64)
    st = RawState(x, v, capacity=4)
    g = torch.tensor([-1e6, 1.0])  # pushes the first element out of range
    x0 = st.x.clone()
    st.step(g, 1.0, R.gamma_num(0.5))
    assert int(st.status[0]) & R.OVERFLOW
    assert int(st.x[0]) == int(x0[0]) and int(st.v[0]) == 0  # not committed
    assert int(st.x[1]) != 0  # the other element stepped


# --- the CPU's vector paths against its scalar one -------------------------------------------------

LANES_ENV = "STN_EXT_REVERSIBLE_LANES"
# The CPU paths' own tests: with STN_EXT_SIMT_ROUTE=1 (CI's second run) the ops run the emulated CUDA kernels,
# which neither read the lanes setting nor sum the adjoints in the CPU's block order.
cpu_paths_only = pytest.mark.skipif(os.environ.get("STN_EXT_SIMT_ROUTE") == "1",
                                    reason="stn_ext ops are routed to the emulated CUDA kernels, not the CPU paths")


@contextlib.contextmanager
def cpu_lanes(name):
    """Sends the CPU ops down one path: avx512, avx2, or scalar (the element maths the CUDA kernels run)."""
    old = os.environ.get(LANES_ENV)
    os.environ[LANES_ENV] = name
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(LANES_ENV, None)
        else:
            os.environ[LANES_ENV] = old


@pytest.fixture(params=["avx512", "avx2"])
def vector_lanes(request):
    """Each vector path of the CPU ops, skipped where the CPU lacks it."""
    st = RawState(torch.zeros(8, dtype=torch.long), torch.zeros(8, dtype=torch.long), capacity=1)
    with cpu_lanes(request.param):
        try:
            st.unstep(torch.zeros(8), 0.1, R.gamma_num(0.9))
        except RuntimeError as err:
            if "this CPU" not in str(err):
                raise
            pytest.skip(str(err).splitlines()[0])
    return request.param


def same_bits(a, b):
    """Equal tensors, floating ones compared by their bits (NaN included)."""
    if a.dtype.is_floating_point:
        ints = {8: torch.int64, 4: torch.int32, 2: torch.int16}[a.element_size()]
        a, b = a.reshape(-1).view(ints), b.reshape(-1).view(ints)
    return torch.equal(a, b)


@cpu_paths_only
def test_cpu_lanes_names_are_checked():
    st = RawState(torch.zeros(8, dtype=torch.long), torch.zeros(8, dtype=torch.long), capacity=1)
    with cpu_lanes("avx1024"), pytest.raises(RuntimeError, match="must be auto, avx512, avx2 or scalar"):
        st.unstep(torch.zeros(8), 0.1, R.gamma_num(0.9))


@cpu_paths_only
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("gnum", [16, 17, 100, 3277, 32768, 32769, 58982, 65521, 65535])
@pytest.mark.parametrize("lr", [0.37, 3.0])
def test_cpu_vector_unsteps_match_scalar_on_edge_states(vector_lanes, dtype, gnum, lr):
    """Both reverse ops from states at the edges of the vector paths (test_simt's, with |lr v| past 2^63 at
    lr 3), two blocks and a tail whose last group of 4 is whole (n mod 8 = 5): the whole state, the status,
    dv and both sums bit for bit against the scalar path."""
    n, capacity, radix = 2 * 4096 + 13, 3, 52
    base, g = edge_unstep_state(n, gnum, capacity, torch.Generator().manual_seed(gnum))
    base["v"][0], g[0] = (1 << 63) - 1, 1e3  # v + (1 - gamma) g overflows
    base["view"] = torch.randn(n, dtype=torch.float64).to(dtype)  # an element left alone keeps its view
    g = g.to(dtype)
    dx = torch.linspace(-1, 1, n, dtype=torch.float64).to(dtype)
    dv0 = torch.randn(n, dtype=torch.float64).to(dtype)
    runs = {}
    for name in ("scalar", vector_lanes):
        st, dv = {k: t.clone() for k, t in base.items()}, dv0.clone()
        with cpu_lanes(name):
            sw = R.unstep_weights(st["x"], st["v"], st["view"], dx, st["status"], lr, radix)
            sv = R.unstep_velocity(st["v"], st["head"], st["count"], st["words"], g, dx, dv, st["status"], lr, gnum,
                                   radix)
        runs[name] = dict(st, dv=dv, sw=sw, sv=sv)
    want, got = runs["scalar"], runs[vector_lanes]
    for k in want:
        assert same_bits(got[k], want[k]), f"{vector_lanes} at n = {gnum}, lr = {lr}: {k} differs"
    flags = want["status"][0].item()
    assert flags & R.OVERFLOW and flags & R.NON_FINITE and flags & R.STACK_EMPTY
    assert int((want["v"] != base["v"]).sum()) > n // 4, "most velocities should be reversed"
    assert int((want["x"] != base["x"]).sum()) > n // 2, "most weights should be reversed"


@cpu_paths_only
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("gnum", [2, 17, 3277, 32769, 58982, 65535])
@pytest.mark.parametrize("lr", [0.37, 3.0])
def test_cpu_vector_step_matches_scalar_on_edge_states(vector_lanes, dtype, gnum, lr):
    """The forward step from the same arbitrary states (heads about to spill, huge velocities and weights,
    |lr v| past 2^63 at lr 3, gradients huge or not finite): state, view and status bit for bit."""
    n, capacity, radix = 2 * 4096 + 13, 3, 52
    base, g = edge_unstep_state(n, gnum, capacity, torch.Generator().manual_seed(gnum + 1))
    base["x"][0], base["v"][0], g[0] = (1 << 63) - 1, 1 << 40, 0.0  # x + lr v overflows
    base["view"] = torch.randn(n, dtype=torch.float64).to(dtype)
    g = g.to(dtype)
    runs = {}
    for name in ("scalar", vector_lanes):
        st = {k: t.clone() for k, t in base.items()}
        with cpu_lanes(name):
            R.step(st["x"], st["v"], st["head"], st["count"], st["words"], st["view"], g, st["status"], lr, gnum, radix)
        runs[name] = st
    for k in base:
        assert same_bits(runs[vector_lanes][k], runs["scalar"][k]), f"{vector_lanes} at n = {gnum}, lr = {lr}: {k} differs"
    flags = runs["scalar"]["status"][0].item()
    assert flags & R.OVERFLOW and flags & R.NON_FINITE and flags & R.STACK_FULL
    assert int((runs["scalar"]["x"] != base["x"]).sum()) > n // 4, "most elements should step"


@cpu_paths_only
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("momentum", [0.05, 0.9, 0.999])
def test_cpu_vector_steps_and_unsteps_match_scalar(vector_lanes, dtype, momentum):
    """Steps that spill words, then the unsteps back to the start, on hard_case's states: the vector path's
    state equals the scalar path's after every op."""
    n, T = 4096 + 4101, 40
    x, v, pool = hard_case(n, 7)
    num = R.gamma_num(momentum)
    lrs = [1e-4, 1e-3, 3e-3]
    states = {name: RawState(x, v, capacity=T, dtype=dtype) for name in ("scalar", vector_lanes)}
    for st in states.values():
        st.view.zero_()
    pool = [g.to(dtype) for g in pool]

    def same(when):
        a, b = states["scalar"], states[vector_lanes]
        for k in ("x", "v", "head", "count", "words", "view", "status"):
            assert same_bits(getattr(b, k), getattr(a, k)), f"{vector_lanes}, momentum {momentum}: {k} {when}"

    for t in range(T):
        for name, st in states.items():
            with cpu_lanes(name):
                st.step(pool[t % 4], lrs[t % 3], num)
        same(f"after step {t}")
    if momentum < 0.5:
        assert int(states["scalar"].status[1]) > 0, "the test should spill words"
    for t in reversed(range(T)):
        for name, st in states.items():
            with cpu_lanes(name):
                st.unstep(pool[t % 4], lrs[t % 3], num)
        same(f"after unstep {t}")
    st = states[vector_lanes]
    assert int(st.status[0]) == 0
    assert torch.equal(st.x, x) and torch.equal(st.v, v) and bool((st.head == R.HEAD_EMPTY).all())


@cpu_paths_only
@pytest.mark.parametrize("lanes", ["scalar", "avx2", "avx512"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_cpu_adjoint_sums_are_block_sums_in_element_order(lanes, dtype):
    """The reverse ops' adjoint sums, whatever the path and however the blocks are grouped, equal a plain Python
    reference bit for bit: each 4096-element block summed in element order from 0, the blocks' sums added in
    block order; dv likewise. Nine blocks and a tail: two whole groups of four and a group of one."""
    import numpy as np

    n, lr, radix, gnum, block = 9 * 4096 + 3, 0.05, 52, R.gamma_num(0.9), 4096
    x, v, pool = hard_case(n, 3)
    st = RawState(x, v, capacity=4, dtype=dtype)
    g = pool[2].to(dtype)
    st.step(g, lr, gnum)
    dx = torch.randn(n, dtype=torch.float64).to(dtype)
    dv = torch.randn(n, dtype=torch.float64).to(dtype)
    v_new, dv_old = st.v.numpy().copy(), dv.double().numpy().copy()
    with cpu_lanes(lanes):
        try:
            sw = R.unstep_weights(st.x, st.v, st.view, dx, st.status, lr, radix)
            sv = R.unstep_velocity(st.v, st.head, st.count, st.words, g, dx, dv, st.status, lr, gnum, radix)
        except RuntimeError as err:
            if "this CPU" not in str(err):
                raise
            pytest.skip(str(err).splitlines()[0])
    assert int(st.status[0]) == 0

    def block_sums(terms):
        total = 0.0
        for b in range(0, n, block):
            s = 0.0
            for t in terms[b:b + block].tolist():
                s += t
            total += s
        return total

    inv_scale = 2.0**-radix
    want_sw = block_sums(dx.double().numpy() * (v_new.astype(np.float64) * inv_scale))
    d = (dv_old + lr * dx.double().numpy()).astype(torch.empty(0, dtype=dtype).numpy().dtype).astype(np.float64)
    want_sv = block_sums(d * (st.v.numpy().astype(np.float64) * inv_scale + g.double().numpy()))
    assert np.array_equal(dv.double().numpy(), d)
    assert sw.item().hex() == want_sw.hex()
    assert sv.item().hex() == want_sv.hex()


# --- ReversibleSGD ------------------------------------------------------------------------------


def small_model(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 2)).to(dtype)


def batch_loss(model, t):
    gen = torch.Generator().manual_seed(1000 + t)
    xb = torch.randn(16, 5, generator=gen, dtype=next(model.parameters()).dtype)
    yb = torch.randn(16, 2, generator=gen, dtype=xb.dtype)
    return ((model(xb) - yb) ** 2).mean()


def test_optimizer_round_trip_with_model():
    model = small_model()
    opt = ReversibleSGD(model.named_parameters())
    start = [p.detach().clone() for p in model.parameters()]
    x0, v0 = opt.exact_state()
    T = 200
    lrs = [0.05 + 0.01 * (t % 5) for t in range(T)]
    moms = [0.5 + 0.49 * t / T for t in range(T)]
    for t in range(T):
        model.zero_grad()
        batch_loss(model, t).backward()
        opt.step(lrs[t], moms[t])
    assert opt.buffer_bits() > 0
    for t in reversed(range(T)):
        def grads():
            model.zero_grad()
            batch_loss(model, t).backward()
            return [p.grad for p in model.parameters()]
        opt.reverse_step(lrs[t], moms[t], grads)
    x1, v1 = opt.exact_state()
    assert all(torch.equal(a, b) for a, b in zip(x0, x1))
    assert all(torch.equal(a, b) for a, b in zip(v0, v1))
    assert opt.buffer_is_empty() and opt.steps == 0
    assert all(torch.equal(a, p) for a, p in zip(start, model.parameters()))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_round_trip_other_view_dtypes(dtype):
    model = small_model(2, dtype=dtype)
    opt = ReversibleSGD(model.parameters())
    start = [p.detach().clone() for p in model.parameters()]
    x0, v0 = opt.exact_state()
    for t in range(40):
        model.zero_grad()
        batch_loss(model, t).backward()
        opt.step(0.05, 0.8)
    for t in reversed(range(40)):
        opt.unstep_weights(0.05)
        model.zero_grad()
        batch_loss(model, t).backward()
        opt.unstep_velocity([p.grad for p in model.parameters()], 0.8)
    x1, v1 = opt.exact_state()
    assert all(torch.equal(a, b) for a, b in zip(x0 + v0, x1 + v1)) and opt.buffer_is_empty()
    # the view the kernel writes equals the Python conversion of the exact weights
    assert all(torch.equal(a, p) for a, p in zip(start, model.parameters()))


def test_state_dict_round_trip():
    model = small_model(1)
    opt = ReversibleSGD(model.parameters())
    for t in range(30):
        model.zero_grad()
        batch_loss(model, t).backward()
        opt.step(0.1, 0.9)
    state = opt.state_dict()
    snapshot = [p.detach().clone() for p in model.parameters()]
    for t in range(30, 60):
        model.zero_grad()
        batch_loss(model, t).backward()
        opt.step(0.1, 0.9)
    after = opt.exact_state()
    # a fresh optimizer on a fresh model, loaded from the state, reproduces the next 30 steps
    model2 = small_model(7)
    opt2 = ReversibleSGD(model2.parameters())
    opt2.load_state_dict(state)
    assert all(torch.equal(a, p) for a, p in zip(snapshot, model2.parameters()))
    for t in range(30, 60):
        model2.zero_grad()
        batch_loss(model2, t).backward()
        opt2.step(0.1, 0.9)
    again = opt2.exact_state()
    assert all(torch.equal(a, b) for a, b in zip(after[0] + after[1], again[0] + again[1]))
    # and reverses all 60 steps back to the first model's start
    for t in reversed(range(60)):
        opt2.unstep_weights(0.1)
        model2.zero_grad()
        batch_loss(model2, t).backward()
        opt2.unstep_velocity([p.grad for p in model2.parameters()], 0.9)
    assert opt2.buffer_is_empty()
    assert all(torch.equal(a, p) for a, p in zip(small_model(1).parameters(), model2.parameters()))


def test_overflow_reported_with_parameter_name():
    w = torch.nn.Parameter(torch.full((3,), 2000.0))
    opt = ReversibleSGD([("layer.weight", w)])
    w.grad = torch.full((3,), -1e5)
    with pytest.raises(FixedPointOverflowError, match="layer.weight"):
        opt.step(1.0, 0.5)


def test_out_of_range_parameter_rejected_with_name():
    with pytest.raises(FixedPointOverflowError, match="big"):
        ReversibleSGD({"big": torch.full((2,), 5000.0)})
    ReversibleSGD({"big": torch.full((2,), 5000.0)}, radix_bits=48)  # fits with a smaller radix


def test_non_finite_gradient_raises():
    w = torch.nn.Parameter(torch.zeros(4))
    opt = ReversibleSGD([w])
    w.grad = torch.tensor([0.0, float("nan"), 1.0, 2.0])
    with pytest.raises(FloatingPointError, match="non-finite"):
        opt.step(0.1, 0.9)


def test_buffer_grows():
    w = torch.nn.Parameter(torch.zeros(100))
    opt = ReversibleSGD([w], initial_capacity=1)
    cap0 = opt.capacity
    for t in range(200):  # momentum 2^-16: 16 bits per step, a word every two steps
        w.grad = torch.ones(100)
        opt.step(1e-3, 2.0**-16)
    assert opt.capacity > cap0 >= 1
    for t in range(200):
        opt.unstep_weights(1e-3)
        opt.unstep_velocity([torch.ones(100)], 2.0**-16)
    assert opt.buffer_is_empty() and bool((w == 0).all())


# --- hypergradients vs an independent float64 unrolling -------------------------------------------


def unrolled_reference(x0s, train_loss, val_loss, lrs, moms, hypers):
    """Plain float64 SGD with momentum, differentiated end to end by autograd."""
    xs = list(x0s)
    vs = [torch.zeros_like(x) for x in xs]
    per_param = lrs.dim() == 2
    for t in range(lrs.shape[0]):
        gs = torch.autograd.grad(train_loss(xs, t, hypers), xs, create_graph=True)
        new_v, new_x = [], []
        for i, (x, v, g) in enumerate(zip(xs, vs, gs)):
            lr = lrs[t, i] if per_param else lrs[t]
            m = moms[t, i] if per_param else moms[t]
            v = m * v - (1 - m) * g
            new_v.append(v)
            new_x.append(x + lr * v)
        xs, vs = new_x, new_v
    return val_loss(xs)


def rel_err(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def quadratic_problem(D=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    A = torch.randn(D, D, generator=gen, dtype=torch.float64)
    A = A @ A.T / D + 0.1 * torch.eye(D, dtype=torch.float64)
    b = torch.randn(D, generator=gen, dtype=torch.float64)
    target = torch.randn(D, generator=gen, dtype=torch.float64)

    def train_loss(p, t, h):
        x = p[0]
        return 0.5 * x @ A @ x - b @ x + 0.5 * torch.exp(h["log_l2"]) * (x * x).sum() + 0.01 * t * x.sum()

    def val_loss(p):
        return ((p[0] - target) ** 2).sum()

    return train_loss, val_loss, torch.randn(D, generator=gen, dtype=torch.float64)


def test_hypergradient_quadratic_matches_unrolled_float64():
    train_loss, val_loss, x0 = quadratic_problem()
    T = 50
    gen = torch.Generator().manual_seed(1)
    lrs = 0.1 + 0.02 * torch.rand(T, generator=gen, dtype=torch.float64)
    moms = quantize_momentum(0.85 + 0.1 * torch.rand(T, generator=gen, dtype=torch.float64))
    h = {"log_l2": torch.tensor(-2.0, dtype=torch.float64)}
    res = hypergradient([x0], train_loss, val_loss, lrs, moms, hypers=h)

    L, M = lrs.clone().requires_grad_(), moms.clone().requires_grad_()
    H, X = h["log_l2"].clone().requires_grad_(), x0.clone().requires_grad_()
    vl = unrolled_reference([X], train_loss, val_loss, L, M, {"log_l2": H})
    gl, gm, gh, gx = torch.autograd.grad(vl, [L, M, H, X])
    assert abs(res.val_loss - float(vl.detach())) <= 1e-10 * abs(float(vl.detach()))
    assert rel_err(res.grad_lrs, gl) < 1e-8
    assert rel_err(res.grad_momenta, gm) < 1e-8
    assert rel_err(res.grad_hypers["log_l2"], gh) < 1e-8
    assert rel_err(res.grad_params[0], gx) < 1e-8
    assert res.buffer_bits > 0 and res.grad_lrs.shape == (T,)


def mlp_problem(seed=0):
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(40, 4, generator=gen, dtype=torch.float64)
    Y = torch.randint(0, 3, (40,), generator=gen)
    Xv = torch.randn(30, 4, generator=gen, dtype=torch.float64)
    Yv = torch.randint(0, 3, (30,), generator=gen)
    W0 = [torch.randn(8, 4, generator=gen, dtype=torch.float64), torch.zeros(8, dtype=torch.float64),
          torch.randn(3, 8, generator=gen, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)]

    def forward(p, x):
        return torch.tanh(x @ p[0].T + p[1]) @ p[2].T + p[3]

    def train_loss(p, t, h):
        idx = torch.arange(10) + (t * 10) % 40  # a fixed minibatch per step
        ce = torch.nn.functional.cross_entropy(forward(p, X[idx]), Y[idx])
        return ce + 0.5 * torch.exp(h["log_l2"]) * ((p[0] ** 2).sum() + (p[2] ** 2).sum())

    def val_loss(p):
        return torch.nn.functional.cross_entropy(forward(p, Xv), Yv)

    return train_loss, val_loss, W0


@pytest.mark.parametrize("mode", ["shared", "per_param", "per_layer"])
def test_hypergradient_mlp_matches_unrolled_float64(mode):
    train_loss, val_loss, W0 = mlp_problem()
    T = 50
    n = len(W0)
    gen = torch.Generator().manual_seed(2)
    groups = [0, 0, 1, 1] if mode == "per_layer" else None  # (weight, bias) of each layer share a schedule
    shape = {"shared": (T,), "per_param": (T, n), "per_layer": (T, 2)}[mode]
    lrs = 0.3 + 0.1 * torch.rand(shape, generator=gen, dtype=torch.float64)
    moms = quantize_momentum(0.6 + 0.35 * torch.rand(shape, generator=gen, dtype=torch.float64))
    scale = torch.tensor(0.7, dtype=torch.float64)
    h = {"log_l2": torch.tensor(-4.0, dtype=torch.float64)}
    res = hypergradient([scale * w for w in W0], train_loss, val_loss, lrs, moms, hypers=h, groups=groups)

    L, M = lrs.clone().requires_grad_(), moms.clone().requires_grad_()
    H, S = h["log_l2"].clone().requires_grad_(), scale.clone().requires_grad_()
    cols = (lambda a: a[:, [0, 0, 1, 1]]) if groups else (lambda a: a)
    vl = unrolled_reference([S * w for w in W0], train_loss, val_loss, cols(L), cols(M), {"log_l2": H})
    gl, gm, gh, gs = torch.autograd.grad(vl, [L, M, H, S])
    assert res.grad_lrs.shape == shape and res.grad_momenta.shape == shape
    assert abs(res.val_loss - float(vl.detach())) <= 1e-10 * abs(float(vl.detach()))
    assert rel_err(res.grad_lrs, gl) < 1e-7
    assert rel_err(res.grad_momenta, gm) < 1e-7
    assert rel_err(res.grad_hypers["log_l2"], gh) < 1e-7
    # initial weights: the gradient w.r.t. a common init scale by the chain rule
    grad_scale = sum((g * w).sum() for g, w in zip(res.grad_params, W0))
    assert rel_err(grad_scale, gs) < 1e-7


def test_hypergradient_matches_finite_differences():
    train_loss, val_loss, W0 = mlp_problem(3)
    T = 40
    lrs = torch.full((T,), 0.4, dtype=torch.float64)
    moms = quantize_momentum(torch.full((T,), 0.9, dtype=torch.float64))
    h = {"log_l2": torch.tensor(-3.0, dtype=torch.float64)}
    res = hypergradient(W0, train_loss, val_loss, lrs, moms, hypers=h)

    def final_val(lrs_, h_):
        # forward only, through the exact optimizer
        ps = [w.clone() for w in W0]
        opt = ReversibleSGD(ps)
        for t in range(T):
            leaves = [p.detach().requires_grad_(True) for p in ps]
            g = torch.autograd.grad(train_loss(leaves, t, h_), leaves)
            opt.step(float(lrs_[t]), float(moms[t]), grads=g)
        return float(val_loss(ps))

    # the exact momentum multiply rounds v to about 2^(16 - radix_bits) (the buffer's bits fill the
    # low digits), so the difference quotient needs a step well above that noise
    k, eps = 17, 1e-3
    up, down = lrs.clone(), lrs.clone()
    up[k] += eps
    down[k] -= eps
    fd = (final_val(up, h) - final_val(down, h)) / (2 * eps)
    assert abs(fd - float(res.grad_lrs[k])) <= 2e-5 * abs(fd)
    hu = {"log_l2": h["log_l2"] + eps}
    hd = {"log_l2": h["log_l2"] - eps}
    fd_h = (final_val(lrs, hu) - final_val(lrs, hd)) / (2 * eps)
    assert abs(fd_h - float(res.grad_hypers["log_l2"])) <= 2e-5 * abs(fd_h)


@pytest.mark.parametrize("noisy_steps", ["all", "one"])
def test_non_deterministic_gradient_raises(noisy_steps):
    train_loss, val_loss, x0 = quadratic_problem(seed=4)
    T = 20
    lrs = torch.full((T,), 0.1, dtype=torch.float64)
    moms = torch.full((T,), 0.9, dtype=torch.float64)
    h = {"log_l2": torch.tensor(-2.0, dtype=torch.float64)}
    gen = torch.Generator().manual_seed(0)

    def noisy_loss(p, t, hh):
        # a tiny gradient noise that differs between the forward and the reverse pass
        noise = 1e-9 * torch.randn(p[0].shape, generator=gen, dtype=torch.float64)
        if noisy_steps == "one" and t != 7:
            noise = torch.zeros_like(noise)
        return train_loss(p, t, hh) + (noise * p[0]).sum()

    with pytest.raises(ReversibilityError, match="reproducible"):
        hypergradient([x0], noisy_loss, val_loss, lrs, moms, hypers=h)


def test_hypergradient_float32_params_and_initial_velocity():
    train_loss, val_loss, x0 = quadratic_problem(seed=5)
    T = 30
    lrs = torch.full((T,), 0.1, dtype=torch.float64)
    moms = quantize_momentum(torch.full((T,), 0.9, dtype=torch.float64))
    v0 = torch.randn(x0.shape, dtype=torch.float64) * 0.1
    h = {"log_l2": torch.tensor(-2.0, dtype=torch.float64)}
    res = hypergradient([x0], train_loss, val_loss, lrs, moms, hypers=h, velocities=[v0])
    # the initial velocity is honoured: compare the final weights with a float64 run
    x, v = x0.clone(), v0.clone()
    for t in range(T):
        xl = x.clone().requires_grad_(True)
        g = torch.autograd.grad(train_loss([xl], t, h), xl)[0]
        v = moms[t] * v - (1 - moms[t]) * g
        x = x + lrs[t] * v
    assert rel_err(res.final_params[0], x) < 1e-10
    assert len(res.grad_velocities) == 1


# --- ops: opcheck and bad inputs ----------------------------------------------------------------


def op_args(n=37, capacity=3, device="cpu"):
    st = RawState(torch.arange(n) * 2**40, torch.arange(n) * 2**38 - 2**44, capacity, device=device)
    g = torch.randn(n, device=device)
    return st, g


def test_opcheck_ops():
    st, g = op_args()
    num = R.gamma_num(0.9)
    torch.library.opcheck(torch.ops.stn_ext.reversible_step.default,
                          (st.x, st.v, st.head, st.count, st.words, st.view, g, st.status, 0.01, num, RADIX))
    dx = torch.randn_like(g)
    torch.library.opcheck(torch.ops.stn_ext.reversible_unstep_weights.default,
                          (st.x, st.v, st.view, dx, st.status, 0.01, RADIX))
    torch.library.opcheck(torch.ops.stn_ext.reversible_unstep_weights.default,
                          (st.x, st.v, st.view, None, st.status, 0.01, RADIX))
    dv = torch.randn_like(g)
    torch.library.opcheck(torch.ops.stn_ext.reversible_unstep_velocity.default,
                          (st.v, st.head, st.count, st.words, g, dx, dv, st.status, 0.01, num, RADIX))
    torch.library.opcheck(torch.ops.stn_ext.reversible_unstep_velocity.default,
                          (st.v, st.head, st.count, st.words, g, None, None, st.status, 0.01, num, RADIX))


def test_reductions_match_plain_torch():
    st, g = op_args(n=5000, capacity=4)
    num = R.gamma_num(0.8)
    for _ in range(3):
        st.step(g, 0.01, num)
    dx = torch.randn(5000, dtype=torch.float32)
    v_real = st.v.double() * 2.0**-RADIX
    d_alpha = R.unstep_weights(st.x, st.v, st.view, dx, st.status, 0.01, RADIX)
    assert d_alpha.dtype == torch.float64 and d_alpha.dim() == 0
    assert math.isclose(float(d_alpha), float((dx.double() * v_real).sum()), rel_tol=1e-12)
    dv = torch.randn(5000, dtype=torch.float32)
    dv_expected = (dv.double() + 0.01 * dx.double()).float()
    d_gamma = R.unstep_velocity(st.v, st.head, st.count, st.words, g, dx, dv, st.status, 0.01, num, RADIX)
    assert torch.equal(dv, dv_expected)
    v_old = st.v.double() * 2.0**-RADIX
    assert math.isclose(float(d_gamma), float((dv.double() * (v_old + g.double())).sum()), rel_tol=1e-12)


def test_fake_kernels_give_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        st, g = op_args()
        out = R.unstep_weights(st.x, st.v, st.view, g, st.status, 0.01, RADIX)
        assert out.shape == () and out.dtype == torch.float64


def bad(fn, match):
    with pytest.raises(RuntimeError, match=match):
        fn()


def test_bad_inputs_name_the_argument():
    st, g = op_args()
    num = R.gamma_num(0.9)
    op = torch.ops.stn_ext.reversible_step

    def step(**kw):
        args = dict(x=st.x, v=st.v, head=st.head, count=st.count, words=st.words, view=st.view, grad=g,
                    status=st.status, lr=0.01, gamma_num=num, radix_bits=RADIX)
        args.update(kw)
        return lambda: op(*args.values())

    bad(step(x=st.x.double()), "x must be a Long")
    bad(step(v=st.v[:-1].clone()), "v must have the shape of view")
    bad(step(head=st.head.int()), "head must be a Long")
    bad(step(count=st.count.long()), "count must be a Int")
    bad(step(words=st.words[:, :-1].contiguous()), "words must have shape")
    bad(step(words=st.words.long()), "words must be an int32")
    bad(step(view=st.view.long()), "view must be a floating-point")
    bad(step(grad=g.double()), "grad has dtype")
    bad(step(grad=g[:-1]), "grad must have the shape of view")
    bad(step(status=torch.zeros(3, dtype=torch.int64)), "status must have shape")
    bad(step(gamma_num=0), "gamma_num must be in")
    bad(step(gamma_num=R.DEN + 1), "gamma_num must be in")
    bad(step(radix_bits=63), "radix_bits must be in")
    bad(step(lr=float("nan")), "lr must be finite")
    bad(step(x=torch.zeros(74, dtype=torch.int64)[::2]), "x must be contiguous")
    bad(lambda: torch.ops.stn_ext.reversible_unstep_weights(st.x, st.v, st.view, g[:-1], st.status, 0.1, RADIX),
        "dx must have the shape of view")
    bad(lambda: torch.ops.stn_ext.reversible_unstep_velocity(st.v, st.head, st.count, st.words, g, None,
                                                              g.double(), st.status, 0.1, num, RADIX),
        "dv has dtype")
    bad(lambda: torch.ops.stn_ext.reversible_unstep_velocity(st.v, st.head, st.count, st.words[:, :3], g, None,
                                                              None, st.status, 0.1, num, RADIX),
        "words must have shape")
    with pytest.raises(ValueError, match="momentum"):
        R.gamma_num(0.0)
    with pytest.raises(ValueError, match="momentum"):
        R.gamma_num(1.5)


@pytest.mark.skipif(stn_ext.has_cuda() or not torch.cuda.is_available(), reason="CPU-only build with a GPU")
def test_cuda_tensor_on_cpu_only_build_says_how_to_rebuild():
    st, g = op_args(device="cuda")
    with pytest.raises(RuntimeError, match="FORCE_CUDA=1"):
        R.step(st.x, st.v, st.head, st.count, st.words, st.view, g, st.status, 0.1, 100, RADIX)


# --- CUDA -----------------------------------------------------------------------------------------


@needs_cuda
@pytest.mark.parametrize("momentum", [0.5, 0.9, 0.99, 0.999])
def test_cuda_round_trip_exact(momentum):
    round_trip(1_000_000, momentum, device="cuda", seed=5)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_cuda_and_cpu_give_identical_bits(dtype):
    n, T = 50_000, 300
    x, v, pool = hard_case(n, 9)
    pool = [p.to(dtype) for p in pool]
    num = R.gamma_num(0.93)
    cpu = RawState(x, v, 64, "cpu", dtype)
    gpu = RawState(x, v, 64, "cuda", dtype)

    def same():
        for name in ("x", "v", "head", "count", "words", "view", "status"):
            a, b = getattr(cpu, name), getattr(gpu, name).cpu()
            assert torch.equal(a, b), name

    for t in range(T):
        cpu.step(pool[t % 4], 1e-3, num)
        gpu.step(pool[t % 4].cuda(), 1e-3, num)
    same()
    for t in reversed(range(T // 2)):
        cpu.unstep(pool[t % 4], 1e-3, num)
        gpu.unstep(pool[t % 4].cuda(), 1e-3, num)
    same()


@needs_cuda
def test_cuda_hypergradient_matches_cpu():
    train_loss, val_loss, W0 = mlp_problem(6)

    def on(device):
        def tl(p, t, h):
            return train_loss([q.cpu() for q in p], t, {k: v.cpu() for k, v in h.items()})

        def vl(p):
            return val_loss([q.cpu() for q in p])

        T = 30
        lrs = torch.full((T,), 0.3, dtype=torch.float64)
        moms = torch.full((T,), 0.9, dtype=torch.float64)
        h = {"log_l2": torch.tensor(-3.0, dtype=torch.float64, device=device)}
        return hypergradient([w.to(device) for w in W0], tl, vl, lrs, moms, hypers=h)

    a, b = on("cpu"), on("cuda")
    assert rel_err(b.grad_lrs, a.grad_lrs) < 1e-9
    assert rel_err(b.grad_momenta, a.grad_momenta) < 1e-9
    assert all(torch.equal(p.cpu(), q) for p, q in zip(b.final_params, a.final_params))


@needs_cuda
def test_cuda_opcheck_and_bad_device():
    st, g = op_args(device="cuda")
    num = R.gamma_num(0.9)
    torch.library.opcheck(torch.ops.stn_ext.reversible_step.default,
                          (st.x, st.v, st.head, st.count, st.words, st.view, g, st.status, 0.01, num, RADIX))
    dx, dv = torch.randn_like(g), torch.randn_like(g)
    torch.library.opcheck(torch.ops.stn_ext.reversible_unstep_weights.default,
                          (st.x, st.v, st.view, dx, st.status, 0.01, RADIX))
    torch.library.opcheck(torch.ops.stn_ext.reversible_unstep_velocity.default,
                          (st.v, st.head, st.count, st.words, g, dx, dv, st.status, 0.01, num, RADIX))
    with pytest.raises(RuntimeError, match="grad is on"):
        R.step(st.x, st.v, st.head, st.count, st.words, st.view, g.cpu(), st.status, 0.01, num, RADIX)


@needs_cuda
def test_cuda_optimizer_grows_buffer_and_reverses():
    # momentum 2^-16 spills a word every other step: exercises the lazy status reads and the growth
    w = torch.nn.Parameter(torch.randn(10_000, device="cuda"))
    start = w.detach().clone()
    opt = ReversibleSGD([("w", w)], initial_capacity=1)
    gens = [torch.randn(10_000, device="cuda", generator=torch.Generator("cuda").manual_seed(t)) for t in range(4)]
    for t in range(300):
        w.grad = gens[t % 4]
        opt.step(1e-3, 2.0**-16)
    assert opt.capacity >= 150
    for t in reversed(range(300)):
        opt.unstep_weights(1e-3)
        opt.unstep_velocity([gens[t % 4]], 2.0**-16)
    opt.check()
    assert opt.buffer_is_empty() and torch.equal(w.detach(), start)
