"""keep_freed_memory: a large tensor allocated again after it was freed reuses the process's pages (no new page
faults) once it is in force, where glibc's defaults fault some blocks anew; the opt-out leaves malloc alone."""
import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")

# a language model's step: 28 MiB tensors (logits at 20 x 35 x 10k floats) and one twice that, freed out of
# order; the minor page faults of four such steps after two
PROBE = """
import resource, torch, stn_ext
kept = stn_ext.keep_freed_memory()
n = 7 * 2**20
def step():
    a, b, c = torch.ones(n), torch.ones(n), torch.ones(n)
    del a
    d = torch.ones(2 * n)
    del b, c, d
step(), step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
    step()
print(kept, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(opt_out):
    env = dict(os.environ)
    env.pop("STN_EXT_KEEP_FREED_MEMORY", None)
    if opt_out:
        env["STN_EXT_KEEP_FREED_MEMORY"] = "0"
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True).stdout
    kept, faults = out.split()
    return kept == "True", int(faults)


def test_freed_blocks_are_reused_without_new_page_faults():
    kept, faults = _faults(opt_out=False)
    assert kept and faults < 200, faults  # each fresh 28 MiB block is 7168 pages of 4 KiB


def test_opt_out_leaves_malloc_alone():
    kept, faults = _faults(opt_out=True)
    assert not kept and faults > 7000, faults  # glibc's defaults map or trim some of them


def test_the_trainer_keeps_freed_memory_on_a_cpu():
    probe = ("from stn_ext import cpu_memory; from stn_ext.tuning import Trainer, TrainConfig; "
             "before = cpu_memory._kept; "
             "Trainer(TrainConfig(method='fixed', steps=2, hidden=(8,), train_size=64, quiet=True, plots=False)); "
             "print(before, cpu_memory._kept)")
    env = {k: v for k, v in os.environ.items() if k != "STN_EXT_KEEP_FREED_MEMORY"}
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["None", "True"], out
