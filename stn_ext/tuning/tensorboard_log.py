"""Run records as TensorBoard scalars (``--tensorboard``; the package ``tensorboard`` is optional)."""


class TensorBoardLog:
    """Writes the records a RunLog puts on disk to ``folder`` with torch.utils.tensorboard: losses,
    accuracies, every hyperparameter and perturbation scale, against the weight step. ``purge_step``: a
    resumed run's first redone step, so that events a killed run wrote past its checkpoint are dropped."""

    def __init__(self, folder, purge_step=None):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ImportError("stn_ext: --tensorboard (TrainConfig.tensorboard) needs the tensorboard package: "
                              "pip install tensorboard") from None
        self.writer = SummaryWriter(folder, purge_step=purge_step)

    def steps(self, records):
        w = self.writer
        for r in records:
            w.add_scalar("loss/train", r["train_loss"], r["step"])
            if "hyper_val_loss" in r:
                w.add_scalar("loss/hyper_step_val_batch", r["hyper_val_loss"], r["step"])
            for name, v in r["hypers"].items():
                w.add_scalar(f"hyper/{name}", v, r["step"])
            for name, v in r.get("sigmas", {}).items():
                w.add_scalar(f"sigma/{name}", v, r["step"])

    def epochs(self, records):
        w = self.writer
        for r in records:
            for key in ("val_loss", "test_loss", "val_acc", "test_acc"):
                if key in r:
                    kind, split = key.split("_")[1], key.split("_")[0]
                    w.add_scalar(f"{'loss' if kind == 'loss' else 'accuracy'}/{split}", r[key], r["step"])

    def flush(self):
        self.writer.flush()

    def close(self):
        self.writer.close()
