"""The CUDA kernels of csrc/cuda on a CPU: compiled as C++ on the SIMT emulator (csrc/testing/simt) into
torch.ops.stn_ext_simt and held against the CPU kernels (torch.ops.stn_ext).

Bit for bit where the two share the element maths and the order of operations (every element-wise
output, the channels-last epilogue sums, the whole reversible state); within a stated tolerance where
only the order of a sum differs (the warp-shuffle reductions of gate_backward and of the
channels-first epilogue backward, the block sums of the reversible unsteps). Every test runs with two
SIMT_SEED orders (blocks and threads in order, and shuffled).

The emulator's own self-test (csrc/testing/simt/selftest.cpp) is built and run here as well, also under
AddressSanitizer, which must stop a kernel with a planted off-by-one read.
"""
import os
import shutil
import subprocess

import pytest
import torch

import stn_ext
from stn_ext import _simt
from stn_ext.reversible import ops as R
from reversible_states import edge_unstep_state

cpu = torch.ops.stn_ext

# With the stn_ext ops routed to the emulated kernels (conftest.py) there is no CPU kernel to compare with.
pytestmark = pytest.mark.skipif(os.environ.get("STN_EXT_SIMT_ROUTE") == "1", reason="stn_ext ops are routed to simt")

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
# Relative tolerance of a sum whose order differs (the result's rounding dominates in half precision).
SUM_RTOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
SEEDS = ["0", "5"]  # 0: blocks and threads in order; 5: both shuffled


@pytest.fixture(scope="session")
def simt():
    return _simt.load()


@pytest.fixture(params=SEEDS, ids=[f"seed{s}" for s in SEEDS])
def seed(request, monkeypatch):
    monkeypatch.setenv("SIMT_SEED", request.param)
    return int(request.param)


def rand(*shape, dtype=torch.float64):
    return torch.randn(*shape, dtype=torch.float64).to(dtype)


def assert_sum_close(emu, ref, dtype, terms):
    """A sum of `terms` terms computed in another order: relative error of the accumulation type plus
    the result's own rounding."""
    rtol = SUM_RTOL[dtype]
    torch.testing.assert_close(emu.double(), ref.double(), rtol=rtol, atol=rtol * max(1, terms) ** 0.5)


# --- the emulator itself --------------------------------------------------------------------------


def _build_selftest(asan):
    out_dir = os.path.join(_simt.ROOT, "build", "simt-selftest")
    os.makedirs(out_dir, exist_ok=True)
    exe = os.path.join(out_dir, "selftest-asan" if asan else "selftest")
    src = [os.path.join(_simt.SIMT_DIR, f) for f in ("selftest.cpp", "simt.h")]
    if not os.path.exists(exe) or os.path.getmtime(exe) < max(os.path.getmtime(f) for f in src):
        flags = ["-std=c++20", "-O1", "-g", "-Wall", "-Werror", "-I", _simt.SIMT_DIR]
        if asan:
            flags += _simt.ASAN_FLAGS
        subprocess.run(["g++", *flags, src[0], "-o", exe + ".tmp"], check=True)
        os.replace(exe + ".tmp", exe)
    return exe


def _run(exe, *args, seed="0"):
    env = dict(os.environ, SIMT_SEED=seed, ASAN_OPTIONS="detect_leaks=1:abort_on_error=0")
    env.pop("LD_PRELOAD", None)  # the programs link their own sanitizer runtime
    return subprocess.run([exe, *args], capture_output=True, text=True, env=env, timeout=120)


needs_gxx = pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")


@needs_gxx
@pytest.mark.parametrize("asan", [False, True], ids=["plain", "asan"])
@pytest.mark.parametrize("order", SEEDS, ids=[f"seed{s}" for s in SEEDS])
def test_emulator_selftest(asan, order):
    """Barriers, shuffles of every kind and width, __syncwarp, votes, atomics, shared memory and its
    poisoning, launch checks and divergence errors (csrc/testing/simt/selftest.cpp)."""
    r = _run(_build_selftest(asan), seed=order)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "0 failures" in r.stdout and "FAIL" not in r.stdout, r.stdout
    assert "AddressSanitizer" not in r.stderr, r.stderr


@needs_gxx
def test_asan_catches_a_planted_off_by_one_read():
    exe = _build_selftest(asan=True)
    r = _run(exe, "oob")
    assert r.returncode != 0, r.stdout
    assert "heap-buffer-overflow" in r.stderr and "off_by_one" in r.stderr, r.stderr[-3000:]
    # Without the sanitizer the same kernel runs to the end unnoticed: that is what the ASan runs are for.
    r = _run(_build_selftest(asan=False), "oob")
    assert r.returncode == 0 and "ran to the end" in r.stdout


@needs_gxx
def test_asan_catches_a_shared_memory_overflow():
    r = _run(_build_selftest(asan=True), "oob_shared")
    assert r.returncode != 0, r.stdout
    assert "global-buffer-overflow" in r.stderr and "shared_overflow" in r.stderr, r.stderr[-3000:]


def test_emulated_library_reports_its_launches(simt, seed):
    before = simt.launches()
    e, h, s = rand(3, 4), rand(3, 4), rand(3)
    simt.gate(e, h, s)
    assert simt.launches() == before + 1


def test_emulated_ops_check_their_arguments_as_the_cuda_ones_do(simt):
    # The emulated kernels take CPU tensors (kCudaKernelDevice) and share the CUDA kernels' checks.
    with pytest.raises(RuntimeError, match="hyper must have shape"):
        simt.gate(rand(3, 4), rand(3, 5), rand(3))
    with pytest.raises(RuntimeError, match="2\\*out = 8 channels"):
        simt.per_example_epilogue(rand(2, 3, 7), rand(2, 4), None, 1, True)


# --- STN layer kernels ----------------------------------------------------------------------------

# (rows, cols): partial blocks and warps, one column, rows not a multiple of a block's 8 warps, conv
# weights, empty tensors.
GATE_SHAPES = [(37, 100), (5, 1), (300, 33), (6, 2, 3, 3), (1, 7), (0, 5), (4, 0)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", GATE_SHAPES, ids=str)
def test_gate_matches_cpu_bit_for_bit(simt, seed, dtype, shape):
    e, h = rand(*shape, dtype=dtype), rand(*shape, dtype=dtype)
    s = rand(shape[0], dtype=dtype)
    assert torch.equal(simt.gate(e, h, s), cpu.gate(e, h, s))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", GATE_SHAPES, ids=str)
def test_gate_backward_matches_cpu(simt, seed, dtype, shape):
    g, h = rand(*shape, dtype=dtype), rand(*shape, dtype=dtype)
    s = rand(shape[0], dtype=dtype)
    gh, gs = simt.gate_backward(g, h, s)
    gh_ref, gs_ref = cpu.gate_backward(g, h, s)
    assert torch.equal(gh, gh_ref)  # element-wise: bit for bit
    cols = g[0].numel() if shape[0] else 0
    assert_sum_close(gs, gs_ref, dtype, cols)  # warp-shuffle tree against a loop


def test_gate_backward_sum_is_bit_for_bit_when_a_lane_holds_the_row(simt, seed):
    # With at most one column per lane only zeros are added to the row's one term: same bits.
    g, h, s = rand(50, 1, dtype=torch.float32), rand(50, 1, dtype=torch.float32), rand(50, dtype=torch.float32)
    assert torch.equal(simt.gate_backward(g, h, s)[1], cpu.gate_backward(g, h, s)[1])


@pytest.mark.parametrize("cap", [1, 3])
def test_grid_stride_loops_cover_everything_when_the_grid_cap_is_hit(simt, seed, cap):
    # The grid cap (2^20 blocks on the device) lowered, so the grid-stride loops take many rounds.
    with _simt.grid_cap(cap):
        e, h, s = rand(300, 33, dtype=torch.float32), rand(300, 33, dtype=torch.float32), rand(300, dtype=torch.float32)
        assert torch.equal(simt.gate(e, h, s), cpu.gate(e, h, s))
        gh, gs = simt.gate_backward(e, h, s)
        gh_ref, gs_ref = cpu.gate_backward(e, h, s)
        assert torch.equal(gh, gh_ref)
        assert_sum_close(gs, gs_ref, torch.float32, 33)
        for cl in (False, True):
            o = rand(5, 70, 24, dtype=torch.float32) if cl else rand(5, 24, 70, dtype=torch.float32)
            sv, off = rand(5, 12, dtype=torch.float32), rand(5, 12, dtype=torch.float32)
            for a, b in zip(simt.per_example_epilogue(o, sv, off, 3, cl), cpu.per_example_epilogue(o, sv, off, 3, cl)):
                assert torch.equal(a, b)
            y, hk = cpu.per_example_epilogue(o, sv, None, 3, cl)
            g = torch.randn_like(y)
            go, gs_, gsum = simt.per_example_epilogue_backward(g, hk, sv, 3, cl)
            ref = cpu.per_example_epilogue_backward(g, hk, sv, 3, cl)
            assert torch.equal(go, ref[0])
            assert_sum_close(gs_, ref[1], torch.float32, 70)
            assert_sum_close(gsum, ref[2], torch.float32, 70)


# (batch, out, positions, groups): partial blocks, warps per (example, channel) with fewer and more
# positions than lanes, grouped convolutions, empty batch, no positions, no channels.
EPILOGUE_CASES = [(3, 8, 5, 1), (2, 12, 70, 3), (4, 6, 1, 2), (1, 4, 33, 4), (0, 4, 3, 1), (2, 4, 0, 2), (2, 0, 3, 1)]


def _epilogue_inputs(B, out, P, cl, dtype):
    o = rand(B, P, 2 * out, dtype=dtype) if cl else rand(B, 2 * out, P, dtype=dtype)
    return o, rand(B, out, dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["cf", "cl"])
@pytest.mark.parametrize("case", EPILOGUE_CASES, ids=str)
def test_per_example_epilogue_matches_cpu_bit_for_bit(simt, seed, dtype, channels_last, case):
    B, out, P, groups = case
    o, s = _epilogue_inputs(B, out, P, channels_last, dtype)
    for offset in (None, rand(out, dtype=dtype), rand(B, out, dtype=dtype)):
        got = simt.per_example_epilogue(o, s, offset, groups, channels_last)
        want = cpu.per_example_epilogue(o, s, offset, groups, channels_last)
        for a, b in zip(got, want):
            assert a.shape == b.shape and torch.equal(a, b)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["cf", "cl"])
@pytest.mark.parametrize("case", EPILOGUE_CASES, ids=str)
def test_per_example_epilogue_backward_matches_cpu(simt, seed, dtype, channels_last, case):
    B, out, P, groups = case
    o, s = _epilogue_inputs(B, out, P, channels_last, dtype)
    y, h = cpu.per_example_epilogue(o, s, None, groups, channels_last)
    g = torch.randn(y.shape, dtype=torch.float64).to(dtype)
    got = simt.per_example_epilogue_backward(g, h, s, groups, channels_last)
    want = cpu.per_example_epilogue_backward(g, h, s, groups, channels_last)
    assert torch.equal(got[0], want[0])  # G = [g | g s]: element-wise
    if channels_last:
        # One thread per (example, channel) walks the positions in order, as the CPU loop does.
        assert torch.equal(got[1], want[1]) and torch.equal(got[2], want[2])
    else:
        # One warp per (example, channel): lanes stride over the positions, then a shuffle tree.
        assert_sum_close(got[1], want[1], dtype, P)
        assert_sum_close(got[2], want[2], dtype, P)


# --- reversible learning kernels ------------------------------------------------------------------


def _fresh_state(x0, capacity, dtype):
    n = x0.numel()
    return dict(x=x0.clone(), v=torch.zeros(n, dtype=torch.long), head=torch.full((n,), R.HEAD_EMPTY, dtype=torch.long),
                count=torch.zeros(n, dtype=torch.int32), words=torch.zeros(capacity, n, dtype=torch.int32),
                view=torch.zeros(n, dtype=dtype), status=torch.zeros(2, dtype=torch.long))


def _step(ops, st, g, lr, gnum, radix):
    ops.reversible_step(st["x"], st["v"], st["head"], st["count"], st["words"], st["view"], g, st["status"], lr, gnum, radix)


def _unstep(ops, st, g, dx, dv, lr, gnum, radix):
    sw = ops.reversible_unstep_weights(st["x"], st["v"], st["view"], dx, st["status"], lr, radix)
    sv = ops.reversible_unstep_velocity(st["v"], st["head"], st["count"], st["words"], g, dx, dv, st["status"], lr, gnum, radix)
    return sw, sv


def _assert_same_state(a, b, what):
    for k in a:
        assert torch.equal(a[k], b[k]), f"{what}: {k} differs"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,momentum", [(1000, 0.05), (300, 0.9), (1, 0.5), (257, 1.0)], ids=str)
def test_reversible_steps_and_unsteps_match_cpu_and_return_to_the_start(simt, seed, dtype, n, momentum):
    """30 steps with buffer spills, then 30 unsteps: the emulated and the CPU state equal bit for bit after
    every op, and both end where they started."""
    steps, capacity, lr, radix = 30, 24, 0.05, 40
    gnum = R.gamma_num(momentum)
    x0 = (torch.randn(n, dtype=torch.float64) * 2**radix).long()
    emu, ref = _fresh_state(x0, capacity, dtype), _fresh_state(x0, capacity, dtype)
    grads = [rand(n, dtype=dtype) for _ in range(steps)]
    for t, g in enumerate(grads):
        _step(simt, emu, g, lr, gnum, radix)
        _step(cpu, ref, g, lr, gnum, radix)
        _assert_same_state(emu, ref, f"after step {t}")
    assert ref["status"][0].item() == 0
    if momentum < 0.5:
        assert ref["status"][1].item() > 0, "the test should spill words to the buffer"
    dx_e, dv_e = torch.linspace(-1, 1, n, dtype=torch.float64).to(dtype), torch.zeros(n, dtype=dtype)
    dx_r, dv_r = dx_e.clone(), dv_e.clone()
    for t, g in enumerate(reversed(grads)):
        sw_e, sv_e = _unstep(simt, emu, g, dx_e, dv_e, lr, gnum, radix)
        sw_r, sv_r = _unstep(cpu, ref, g, dx_r, dv_r, lr, gnum, radix)
        _assert_same_state(emu, ref, f"after unstep {t}")
        assert torch.equal(dv_e, dv_r)
        # float64 block sums (256 elements, a shuffle tree) against the CPU's blocked loop
        torch.testing.assert_close(sw_e, sw_r, rtol=1e-12, atol=1e-12 * n)
        torch.testing.assert_close(sv_e, sv_r, rtol=1e-12, atol=1e-12 * n)
    start = _fresh_state(x0, capacity, dtype)
    for k in ("x", "v", "head", "count"):
        assert torch.equal(emu[k], start[k]), k
    assert emu["status"][0].item() == 0


def test_reversible_unsteps_without_adjoints(simt, seed):
    n, lr, radix, gnum = 700, 0.1, 40, R.gamma_num(0.9)
    x0 = (torch.randn(n, dtype=torch.float64) * 2**radix).long()
    emu, ref = _fresh_state(x0, 8, torch.float32), _fresh_state(x0, 8, torch.float32)
    g = rand(n, dtype=torch.float32)
    for ops, st in ((simt, emu), (cpu, ref)):
        _step(ops, st, g, lr, gnum, radix)
        sw, sv = _unstep(ops, st, g, None, None, lr, gnum, radix)
        assert sw.item() == 0.0 and sv.item() == 0.0
    _assert_same_state(emu, ref, "unstep without dx, dv")


def test_reversible_flags_match_cpu(simt, seed):
    """Overflow, a non-finite gradient and a full buffer: the same flags, the same untouched elements."""
    n, radix = 600, 40
    x0 = (torch.randn(n, dtype=torch.float64) * 2**radix).long()
    grads = rand(n, dtype=torch.float64)
    grads[5] = float("nan")
    grads[300] = float("inf")
    grads[17] = 1e300  # overflows the fixed point
    for capacity in (0, 1):  # a buffer with no or one word: spills fail (STACK_FULL)
        emu, ref = _fresh_state(x0, capacity, torch.float64), _fresh_state(x0, capacity, torch.float64)
        for t in range(10):
            _step(simt, emu, grads, 0.05, R.gamma_num(0.01), radix)
            _step(cpu, ref, grads, 0.05, R.gamma_num(0.01), radix)
            _assert_same_state(emu, ref, f"capacity {capacity}, step {t}")
        flags = ref["status"][0].item()
        assert flags & R.OVERFLOW and flags & R.NON_FINITE and flags & R.STACK_FULL


def test_reversible_empty_tensors(simt):
    st, ref = _fresh_state(torch.zeros(0, dtype=torch.long), 4, torch.float32), _fresh_state(torch.zeros(0, dtype=torch.long), 4, torch.float32)
    g = torch.zeros(0)
    _step(simt, st, g, 0.1, R.gamma_num(0.9), 40)
    sw, sv = _unstep(simt, st, g, g.clone(), g.clone(), 0.1, R.gamma_num(0.9), 40)
    assert sw.item() == 0.0 and sv.item() == 0.0
    _assert_same_state(st, ref, "empty")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("gnum", [16, 17, 100, 3277, 32768, 32769, 58982, 65521, 65535])
def test_reversible_unsteps_match_cpu_on_edge_states(simt, dtype, gnum):
    """The CPU's vector path of the reverse ops (float32, float64) and its scalar fall-back against the
    emulated CUDA kernels (the element maths alone) from states at the edges of the vector path: the whole
    state, the status and dv bit for bit."""
    n, capacity, lr, radix = 4096 + 4099, 3, 0.37, 52
    gen = torch.Generator().manual_seed(gnum)
    base, g = edge_unstep_state(n, gnum, capacity, gen)
    base["v"][0], g[0] = (1 << 63) - 1, 1e3  # v + (1 - gamma) g overflows
    g = g.to(dtype)
    base["view"] = torch.zeros(n, dtype=dtype)
    emu = {k: t.clone() for k, t in base.items()}
    ref = {k: t.clone() for k, t in base.items()}
    dx = torch.linspace(-1, 1, n, dtype=torch.float64).to(dtype)
    dv_e = rand(n, dtype=dtype)
    dv_r = dv_e.clone()
    sw_e, sv_e = _unstep(simt, emu, g, dx, dv_e, lr, gnum, radix)
    sw_r, sv_r = _unstep(cpu, ref, g, dx, dv_r, lr, gnum, radix)
    _assert_same_state(emu, ref, f"unstep at n = {gnum}")
    assert torch.equal(dv_e, dv_r)
    flags = ref["status"][0].item()
    assert flags & R.OVERFLOW and flags & R.NON_FINITE and flags & R.STACK_EMPTY
    changed = (ref["v"] != base["v"]) | (ref["head"] != base["head"])
    assert int(changed.sum()) > n // 4, "most elements should be reversed"
    torch.testing.assert_close(sw_e, sw_r, equal_nan=True)
    torch.testing.assert_close(sv_e, sv_r, equal_nan=True)


# --- the stn_ext ops routed to the emulated kernels -----------------------------------------------


def test_routing_sends_layers_and_the_optimizer_through_the_emulated_kernels(simt, seed):
    torch.manual_seed(1)
    lin = stn_ext.StnLinear(20, 9, 3)
    conv = stn_ext.StnConv2d(4, 6, 3, 3, padding=1, groups=2)
    x, img = torch.randn(5, 20), torch.randn(2, 4, 6, 6)
    lam_b, lam = torch.randn(5, 3), torch.randn(3)

    def run():
        outs = []
        for layer, inp, hyper in ((lin, x, lam_b), (lin, x, lam), (conv, img, lam_b[:2]), (conv, img, lam)):
            layer.zero_grad()
            y = layer(inp, hyper)
            y.square().sum().backward()
            outs += [y.detach()] + [p.grad.clone() for p in layer.parameters() if p.grad is not None]
        return outs

    want = run()
    before = simt.launches()
    with _simt.routed():
        got = run()
    launched = simt.launches() - before
    assert launched >= 8, f"only {launched} emulated launches: the ops were not routed"
    after = simt.launches()
    run()
    assert simt.launches() == after, "routing must end with the block"
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
