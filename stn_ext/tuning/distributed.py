"""Multi-process training on one machine (torch.distributed: gloo on CPU, nccl on CUDA)."""
import os
import socket
from dataclasses import asdict

import torch

from stn_ext import checkpoint
from stn_ext.tuning.config import SEARCHES, TrainConfig
from stn_ext.tuning.loop import Trainer
from stn_ext.tuning.runfolder import _jsonable, can_resume, check_run_folder
from stn_ext.tuning.search import random_search


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, cfg_dict, result_path, backend):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    torch.distributed.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                         world_size=world)
    try:
        cfg = TrainConfig.from_dict(cfg_dict)
        if cfg.device.startswith("cuda"):
            cfg.device = f"cuda:{rank % torch.cuda.device_count()}"
            torch.cuda.set_device(cfg.device)
        if cfg.method in SEARCHES:
            summary = random_search(cfg.validate())
            state = None
        else:
            tr = Trainer(cfg)
            summary = tr.fit()
            state = {k: v.detach().cpu() for k, v in tr.model.state_dict().items()}
            state["__u"], state["__hscale"] = tr.u.detach().cpu(), tr.hscale.detach().cpu()
        if result_path:
            checkpoint.save(f"{result_path}.rank{rank}", {"summary": summary, "state": state})
    finally:
        torch.distributed.destroy_process_group()


class WorkerDied(RuntimeError):
    """A process of run_distributed died without a Python error (killed, or out of memory)."""


def _resume_hint(cfg):
    """Where a stopped multi-process run can continue from, and how."""
    if not cfg.out:
        return "Nothing was saved (no --out)."
    if cfg.method not in SEARCHES and os.path.exists(os.path.join(cfg.out, "checkpoint.pt")):
        step = checkpoint.load(os.path.join(cfg.out, "checkpoint.pt"), map_location="cpu")["step"]
        return (f"The last checkpoint, at step {step} of {cfg.steps}, is in {cfg.out}: run the same command with "
                "--resume to continue (API: resume=True).")
    if can_resume(cfg):
        return f"The run so far is in {cfg.out}: run the same command with --resume to continue (API: resume=True)."
    return f"No checkpoint was written yet in {cfg.out}: run the same command with --overwrite to start again."


def run_distributed(config, nprocs, result_path=""):
    """Train ``config`` on ``nprocs`` local processes (gloo on CPU, nccl on CUDA) and return rank 0's
    summary. With ``result_path``, each rank saves {'summary', 'state'} to result_path.rank<k>."""
    import torch.multiprocessing as mp

    cfg = config if isinstance(config, TrainConfig) else TrainConfig.from_dict(dict(config))
    cfg.validate()
    check_run_folder(cfg)  # here, where the error reads clean, not from inside a spawned rank
    backend = "nccl" if cfg.device.startswith("cuda") else "gloo"
    keep = result_path
    if not result_path:
        import tempfile
        result_path = os.path.join(tempfile.mkdtemp(prefix="stn_ext_ddp_"), "result")
    try:
        mp.spawn(_worker, args=(nprocs, free_port(), _jsonable(asdict(cfg)), result_path, backend), nprocs=nprocs,
                 join=True)
    except mp.ProcessExitedException as e:  # a rank killed (signal) or exited without a Python error
        how = f"was killed by {e.signal_name}" if e.signal_name else f"exited with code {e.exit_code}"
        raise WorkerDied(f"stn_ext: rank {e.error_index} of {nprocs} {how}; the other ranks were stopped. "
                         f"{_resume_hint(cfg)}") from None
    res = checkpoint.load(f"{result_path}.rank0")
    if not keep:
        for r in range(nprocs):
            os.unlink(f"{result_path}.rank{r}")
    return res["summary"]


__all__ = ["run_distributed", "WorkerDied", "free_port"]
