"""2-process data-parallel training (torch.distributed, gloo on CPU) equals 1 process with the same
global batch: same weights, hypernet and hyperparameters on every rank."""
import pytest
import torch

import installed

from stn_ext import checkpoint
from stn_ext.tuning import TrainConfig, Trainer, run_distributed

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")


@pytest.mark.parametrize("kw", [
    dict(method="stn", perturb="example", hypers=("dropout", "noise", "weight_decay")),
    dict(method="delta-stn", perturb="batch", linearize=True, model="cnn", hypers=("dropout", "cutout", "shift")),
    dict(method="delta-stn", perturb="example", response_rows=0.5, response_every=1, hypers=("dropout", "noise")),
    dict(method="stn", perturb="batch", hypers=("noise", "weight_decay")),  # the response by difference
    dict(method="delta-stn", perturb="batch", hypers=("noise", "weight_decay")),
    dict(method="stn", perturb="example", hypers=("noise", "weight_decay")),  # by difference, each rank its rows
    dict(method="delta-stn", perturb="example", hypers=("noise", "weight_decay")),
])
def test_two_processes_equal_one(tmp_path, kw):
    _two_equal_one(tmp_path, TrainConfig(steps=24, warmup_steps=6, batch_size=32, hidden=(16,), channels=(4, 8),
                                         train_size=256, hyper_lr=0.02, quiet=True, plots=False, **kw))


@pytest.mark.skipif(not installed.austen(), reason="Jane Austen's novels are not installed (scripts/setup_env.sh)")
def test_two_processes_equal_one_language_model(tmp_path):
    """Text: each rank carries the hidden states of its own streams (rows of the global batch)."""
    _two_equal_one(tmp_path, TrainConfig(method="stn", data="austen", model="lstm", hidden=(16, 16), steps=16,
                                         warmup_steps=4, batch_size=8, bptt=10, train_size=4000, hyper_lr=0.02,
                                         quiet=True, plots=False))


def _two_equal_one(tmp_path, cfg):
    result = str(tmp_path / "res")
    run_distributed(cfg, 2, result)
    ranks = [checkpoint.load(f"{result}.rank{r}") for r in range(2)]
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = Trainer(cfg)
        s1 = single.fit()
    finally:
        torch.set_num_threads(n)
    want = {k: v.detach() for k, v in single.model.state_dict().items()}
    want["__u"], want["__hscale"] = single.u.detach(), single.hscale.detach()
    for k in want:
        assert torch.equal(ranks[0]["state"][k], ranks[1]["state"][k]), f"ranks differ in {k}"
        assert torch.allclose(ranks[0]["state"][k], want[k], rtol=1e-4, atol=1e-5), \
            (k, (ranks[0]["state"][k] - want[k]).abs().max())
    assert not torch.equal(want["__u"], Trainer(cfg).u.detach())  # the hyperparameters did move
    s2 = ranks[0]["summary"]
    assert s2["steps"] == s1["steps"] and s2["hyper_steps"] == s1["hyper_steps"]
    assert s2["val_loss"] == pytest.approx(s1["val_loss"], rel=1e-4)


def _spawned_ranks(parent):
    """PIDs of the rank processes mp.spawn started under ``parent`` (Linux /proc)."""
    import os

    pids = []
    for d in os.listdir("/proc"):
        try:
            with open(f"/proc/{d}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{d}/cmdline", "rb") as f:
                cmd = f.read()
        except (OSError, ValueError, IndexError):
            continue
        if ppid == parent and b"spawn_main" in cmd:
            pids.append(int(d))
    return sorted(pids)


@pytest.mark.skipif(not __import__("os").path.isdir("/proc/self"), reason="finds the ranks through /proc")
def test_killed_rank_names_itself_and_the_checkpoint(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "run"
    args = [sys.executable, "-m", "stn_ext", "train", "--nproc", "2", "--steps", "100000", "--hidden", "16",
            "--train-size", "256", "--checkpoint-every", "20", "--out", str(out), "--quiet"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    try:
        deadline = time.time() + 120
        while not (out / "checkpoint.pt").exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.2)
        ranks = _spawned_ranks(proc.pid)
        assert (out / "checkpoint.pt").exists() and len(ranks) == 2, proc.poll()
        os.kill(ranks[-1], signal.SIGKILL)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1, err
    line = next(ln for ln in err.splitlines() if ln.startswith("error:"))
    assert "rank" in line and "SIGKILL" in line and "--resume" in line and str(out) in line, err
    assert "Traceback" not in err and "ProcessExitedException" not in err
    step = int(line.split("at step ")[1].split()[0])
    assert step == checkpoint.load(str(out / "checkpoint.pt"))["step"] and step % 20 == 0
