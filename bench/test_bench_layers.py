"""pytest-benchmark over the same cases as bench/bench_layers.py (not part of the test suite):
    python -m pytest bench/test_bench_layers.py --benchmark-group-by=param:case
Set STN_BENCH_DEVICE=cuda and STN_BENCH_DTYPE=bfloat16 for the GPU."""
import os

import pytest
import torch

from cases import CONV_CASES, CPU_SKIP, LINEAR_CASES, VARIANTS, fwd_bwd, variants

DEVICE = os.environ.get("STN_BENCH_DEVICE", "cpu")
DTYPE = getattr(torch, os.environ.get("STN_BENCH_DTYPE", "float32"))
CASES = [("Linear", c) for c in LINEAR_CASES] + [("Conv2d", c) for c in CONV_CASES]
if DEVICE == "cpu":
    CASES = [(k, c) for k, c in CASES if c not in CPU_SKIP]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("case", CASES, ids=lambda kc: f"{kc[0]}-{'x'.join(map(str, kc[1]))}")
def test_fwd_bwd(benchmark, case, variant):
    kind, shape = case
    fn, inputs = variants(kind, shape, DEVICE, DTYPE, compile_=variant.startswith("compiled"))[variant]
    step = fwd_bwd(fn, inputs)
    step()  # warm-up (and compile)

    def run():
        step()
        if DEVICE == "cuda":
            torch.cuda.synchronize()

    benchmark.pedantic(run, rounds=5, iterations=1, warmup_rounds=1)
