"""2-process data-parallel training (torch.distributed, gloo on CPU) equals 1 process with the same
global batch: same weights, hypernet and hyperparameters on every rank."""
import pytest
import torch

from stn_ext import checkpoint
from stn_ext.trainer import TrainConfig, Trainer, run_distributed

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")


@pytest.mark.parametrize("kw", [
    dict(method="stn", perturb="example", hypers=("dropout", "noise", "weight_decay")),
    dict(method="delta-stn", perturb="batch", linearize=True, model="cnn", hypers=("dropout", "cutout", "shift")),
])
def test_two_processes_equal_one(tmp_path, kw):
    cfg = TrainConfig(steps=24, warmup_steps=6, batch_size=32, hidden=(16,), channels=(4, 8), train_size=256,
                      hyper_lr=0.02, quiet=True, plots=False, **kw)
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
