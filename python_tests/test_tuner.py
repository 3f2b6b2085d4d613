"""stn_ext.tuning.Tuner in a user's own loop: any optimiser, any loss, DataLoader batches, autocast,
state_dict for the user's checkpoints; and the example that shows it."""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import stn_ext
from stn_ext.tuning.space import HyperSpace
from stn_ext.tuning.models import HyperDropout
from stn_ext.tuning import Tuner

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _setup(method="delta-stn", loss=None, steps=40, opt=torch.optim.AdamW, **kw):
    torch.manual_seed(0)
    space = HyperSpace.build(("dropout", "weight_decay"), dropout_slots=["in", "h1"])
    model = torch.nn.Sequential(HyperDropout("in"), torch.nn.Linear(12, 16), torch.nn.ReLU(), HyperDropout("h1"),
                                torch.nn.Linear(16, 3))
    stn_ext.convert(model, n_hyper=len(space))
    tuner = Tuner(model, space, opt(model.parameters(), lr=1e-2), loss or torch.nn.CrossEntropyLoss(), method=method,
                  total_steps=steps, warmup_steps=4, train_per_cycle=2, **kw)
    return model, tuner


def _batches(n, seed):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 12, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(n)]


def _run(tuner, train, val):
    vi = iter(val)
    for x, y in train:
        tuner.weight_step(x, y)
        for _ in range(tuner.hyper_steps_due()):
            tuner.hyper_step(*next(vi))


@pytest.mark.parametrize("method", ["stn", "delta-stn"])
@pytest.mark.parametrize("loss", [torch.nn.CrossEntropyLoss(), lambda o, y: F.cross_entropy(o, y, reduction="none")],
                         ids=["scalar-loss", "per-example-loss"])
def test_hyperparameters_move_in_a_user_loop(method, loss):
    model, tuner = _setup(method, loss)
    u0 = tuner.u.detach().clone()
    _run(tuner, _batches(40, 1), _batches(40, 2))
    assert tuner.step == 40 and tuner.hstep == (40 - 4) // 2
    assert not torch.equal(tuner.u.detach(), u0)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    with tuner.evaluating():
        assert not model.training
        out = model(torch.randn(5, 12))
    assert model.training and out.shape == (5, 3)
    assert set(tuner.scalars()) == {"hyper/dropout.in", "hyper/dropout.h1", "hyper/weight_decay", "sigma/dropout.in",
                                    "sigma/dropout.h1", "sigma/weight_decay"}


def test_state_dict_resumes_bit_for_bit():
    train, val = _batches(30, 1), _batches(30, 2)
    model, tuner = _setup("stn", steps=30)
    _run(tuner, train, val)
    want = [p.detach().clone() for p in model.parameters()] + [tuner.u.detach().clone()]

    model, tuner = _setup("stn", steps=30)
    _run(tuner, train[:12], val)
    saved = {"model": model.state_dict(), "opt": tuner.opt_w.state_dict(), "tuner": tuner.state_dict()}
    model, tuner = _setup("stn", steps=30)
    model.load_state_dict(saved["model"])
    tuner.opt_w.load_state_dict(saved["opt"])
    tuner.load_state_dict(saved["tuner"])
    _run(tuner, train[12:], val[tuner.hstep:])
    got = [p.detach() for p in model.parameters()] + [tuner.u.detach()]
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_dataloader_and_autocast():
    model, tuner = _setup("delta-stn")
    x, y = torch.randn(64, 12), torch.randint(0, 3, (64,))
    loader = DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True, drop_last=True)
    for xb, yb in loader:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = tuner.weight_step(xb, yb)
        assert torch.isfinite(loss)
    assert tuner.step == 8


def test_clear_errors():
    model, tuner = _setup("fixed")
    with pytest.raises(RuntimeError, match="takes no hyper steps"):
        tuner.hyper_step(torch.randn(4, 12), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="optimizer does not hold"):
        Tuner(model, tuner.space, torch.optim.SGD(list(model.parameters())[:1], lr=0.1), F.cross_entropy)
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        Tuner(model, tuner.space, "sgd", F.cross_entropy)
    space = HyperSpace.build(("dropout",), dropout_slots=["in", "h1"])
    with pytest.raises(ValueError, match="n_hyper=3 but the space tunes 2 hyperparameters"):
        Tuner(model, space, torch.optim.SGD(model.parameters(), lr=0.1), F.cross_entropy)


def test_example_own_training_loop_runs():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "own_training_loop.py"), "--steps", "60"],
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr
    assert "test loss" in r.stdout and "dropout.in=" in r.stdout
