"""Pictures of tuning runs: a run folder's losses, accuracy and hyperparameter schedule (``plot_run``), and
the demo's comparison of its methods (``plot_comparison``). matplotlib with the Agg backend; files are
written atomically, so a kill mid-plot leaves the old picture."""
import io
import json
import os

from stn_ext.checkpoint import atomic_write_bytes

PLOT_FILES = ("losses.png", "accuracy.png", "hypers.png")
ERROR_FLOOR = 1e-3  # a perfect score drawn at this error rate on the log axis


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path, dpi=100):
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    atomic_write_bytes(path, buf.getvalue())


def read_jsonl(path):
    """The records of a JSONL log ([] when there is none); a line torn by a kill is skipped."""
    if not os.path.exists(path):
        return []
    recs = []
    with open(path) as f:
        for line in f:
            try:
                recs.append(json.loads(line))
            except ValueError:
                continue
    return recs


def plot_run(out, title=""):
    """PLOT_FILES in the run folder ``out``, each titled ``title`` (method and seed)."""
    steps, epochs = read_jsonl(os.path.join(out, "steps.jsonl")), read_jsonl(os.path.join(out, "epochs.jsonl"))
    if not steps or not epochs:
        return
    plt = _pyplot()
    prefix = f"{title}: " if title else ""
    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [r["step"] for r in steps]
    tl = [r["train_loss"] for r in steps]
    k = max(1, len(tl) // 100)
    smooth = [sum(tl[max(0, i - k + 1):i + 1]) / len(tl[max(0, i - k + 1):i + 1]) for i in range(len(tl))]
    ax.plot(xs, smooth, label="train (smoothed)", alpha=0.7)
    hv = [(r["step"], r["hyper_val_loss"]) for r in steps if "hyper_val_loss" in r]
    if hv:
        ax.plot(*zip(*hv), label="hyper step val batch", alpha=0.3)
    ax.plot([r["step"] for r in epochs], [r["val_loss"] for r in epochs], "o-", label="val")
    ax.plot([r["step"] for r in epochs], [r["test_loss"] for r in epochs], "s-", label="test")
    ax.set(xlabel="weight step", ylabel="loss", yscale="log", title=prefix + "losses")
    ax.legend()
    fig.tight_layout()
    _save(fig, os.path.join(out, "losses.png"))
    plt.close(fig)
    if "val_acc" in epochs[0]:
        # error rate on a log axis: late differences (0.95 vs 0.97) stay visible, unlike on a 0-1 accuracy axis
        fig, ax = plt.subplots(figsize=(6, 4))
        err = lambda key: [max(1.0 - r[key], ERROR_FLOOR) for r in epochs]  # noqa: E731
        ax.plot([r["step"] for r in epochs], err("val_acc"), "o-", label="val")
        ax.plot([r["step"] for r in epochs], err("test_acc"), "s-", label="test")
        ax.set(xlabel="weight step", ylabel=f"error rate, 1 - accuracy (floor {ERROR_FLOOR:g})", yscale="log",
               title=prefix + "error rate")
        ax.legend()
        fig.tight_layout()
        _save(fig, os.path.join(out, "accuracy.png"))
        plt.close(fig)
    names = list(steps[0]["hypers"])
    fig, axes = plt.subplots(len(names), 1, figsize=(6, 2 + 1.6 * len(names)), sharex=True, squeeze=False)
    for ax, n in zip(axes[:, 0], names):
        ax.plot(xs, [r["hypers"][n] for r in steps])
        ax.set_ylabel(n)
        if _log_scaled(n):
            ax.set_yscale("log")
    axes[-1, 0].set_xlabel("weight step")
    fig.suptitle(prefix + "hyperparameter schedule")
    fig.tight_layout()
    _save(fig, os.path.join(out, "hypers.png"))
    plt.close(fig)


def _log_scaled(name):
    return name.startswith(("weight_decay", "noise"))


def _schedule_folder(run_dir, summary):
    """Where a run's schedule is: its own folder, or for random search the best trial's."""
    if "best_trial" in summary:
        return os.path.join(run_dir, f"trial_{summary['best_trial']}")
    return run_dir


def plot_comparison(path, results, run_dirs):
    """One figure comparing the demo's methods: validation and test loss per method (each seed a point,
    the mean a bar), and each hyperparameter's schedule per method side by side (one line per seed).
    ``results``: the demo's run summaries (with "label"); ``run_dirs``: their folders, in the same order."""
    plt = _pyplot()
    methods = list(dict.fromkeys(r["label"] for r in results))
    names = list(results[0]["hypers"])
    fig, axes = plt.subplots(1, 1 + len(names), figsize=(4.2 * (1 + len(names)), 4), squeeze=False)
    ax = axes[0, 0]
    for j, (key, marker, dx) in enumerate((("val_loss", "o", -0.15), ("test_loss", "s", 0.15))):
        for i, m in enumerate(methods):
            ys = [r[key] for r in results if r["label"] == m]
            ax.scatter([i + dx] * len(ys), ys, marker=marker, color=f"C{j}", zorder=3,
                       label=key.replace("_", " ") if i == 0 else None)
            ax.hlines(sum(ys) / len(ys), i + dx - 0.12, i + dx + 0.12, color=f"C{j}")
    ax.set_xticks(range(len(methods)), methods)
    ax.set(ylabel="loss (points: seeds, bars: mean)", title="final loss per method")
    ax.legend(fontsize=8)
    schedules = [read_jsonl(os.path.join(_schedule_folder(d, r), "steps.jsonl")) for r, d in zip(results, run_dirs)]
    first_seed = min(r.get("seed", 0) for r in results)
    for ax, n in zip(axes[0, 1:], names):
        for r, steps in zip(results, schedules):
            if steps:
                # a trial's steps count from its own start
                xs = [s["step"] * (r.get("trials", 1) if "best_trial" in r else 1) for s in steps]
                ax.plot(xs, [s["hypers"][n] for s in steps], color=f"C{methods.index(r['label'])}", alpha=0.7, lw=1,
                        label=r["label"] if r.get("seed", 0) == first_seed else None)
        ax.set(title=n, xlabel="weight step")
        if _log_scaled(n):
            ax.set_yscale("log")
    axes[0, 1].legend(fontsize=8)
    fig.suptitle("methods compared: final losses and the tuned schedules (random search: its best trial's values)")
    fig.tight_layout()
    _save(fig, path, dpi=90)
    plt.close(fig)


__all__ = ["PLOT_FILES", "plot_run", "plot_comparison", "read_jsonl"]
