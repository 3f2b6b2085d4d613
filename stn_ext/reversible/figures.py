"""Figures of the example problems (:mod:`stn_ext.reversible.examples`), as PNG bytes (matplotlib, Agg)."""
import io
import math

import torch

__all__ = ["figure"]


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig, plt):
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def _meta_curve(ax, history, title="meta-learning curve"):
    """Validation objective and test loss per meta-iteration; meta-gradient norm on a log axis."""
    rows = [r for r in history if math.isfinite(r.get("objective", float("nan")))]
    its = [r["meta_iter"] for r in rows]
    ax.plot(its, [r["objective"] for r in rows], marker=".", label="validation loss (objective)")
    if rows and "test_loss" in rows[0]:
        ax.plot(its, [r["test_loss"] for r in rows], marker=".", label="test loss")
    ax.set(title=title, xlabel="meta-iteration", ylabel="cross-entropy after training")
    norms = [(r["meta_iter"], r["grad_norm"]) for r in rows if r.get("grad_norm", 0) > 0]
    handles = ax.get_legend_handles_labels()
    if norms:
        ax2 = ax.twinx()
        ax2.semilogy(*zip(*norms), color="grey", lw=0.8, ls=":", label="meta-gradient norm (right)")
        ax2.set_ylabel("meta-gradient norm", color="grey")
        extra = ax2.get_legend_handles_labels()
        handles = (handles[0] + extra[0], handles[1] + extra[1])
        ax2.legend(*handles, fontsize=7, loc="upper right")
    else:
        ax.legend(fontsize=7)


def _images(fig, grid, tensors, side, title, cmap, symmetric):
    """Ten images in grid[0:2, 0:5], their colour bar in grid[:, 5]."""
    axes = [fig.add_subplot(grid[i // 5, i % 5]) for i in range(10)]
    lim = float(tensors.abs().max()) if symmetric else None
    low = -lim if symmetric else float(tensors.min())
    high = lim if symmetric else float(tensors.max())
    im = None
    for c, ax in enumerate(axes):
        im = ax.imshow(tensors[c].reshape(side, side).numpy(), cmap=cmap, vmin=low, vmax=high)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(f"class {c}", fontsize=8)
    fig.colorbar(im, cax=fig.add_subplot(grid[:, 5]))
    fig.text(0.25, 0.9, title, ha="center", fontsize=11)
    return axes


def schedules_figure(problem, initial, final, history, curves, title):
    """Learned learning-rate and momentum schedules per layer (weights, biases), init scales against
    1/sqrt(fan_in), learning curves at the initial and learned hyperparameters, the meta-learning curve."""
    plt = _plt()
    fig, axes = plt.subplots(2, 3, figsize=(16, 8.5))
    lr, mom = (s.detach() for s in problem.schedules(final))
    layers = [n for n in problem.names if n.endswith("weight")]
    cmap = plt.get_cmap("viridis")
    for j, n in enumerate(problem.names):
        layer = n.rsplit(".", 1)[0]
        color = cmap(layers.index(layer + ".weight") / max(len(layers) - 1, 1))
        ax = axes[0, 0] if n.endswith("weight") else axes[0, 1]
        ax.plot(lr[:, j].numpy(), color=color, label=f"layer {layers.index(layer + '.weight') + 1}")
        axes[0, 2].plot(mom[:, j].numpy(), color=color, ls="-" if n.endswith("weight") else "--",
                        label=f"layer {layers.index(layer + '.weight') + 1} " + ("weights" if n.endswith("weight")
                                                                                 else "biases"))
    lr0 = float(problem.schedules(initial)[0][0, 0])
    for ax, what in ((axes[0, 0], "weights"), (axes[0, 1], "biases")):
        ax.axhline(lr0, color="grey", ls=":", lw=1, label="initial")
        ax.set(title=f"learned learning rates: {what}", xlabel="training step", ylabel="learning rate")
        ax.legend(fontsize=7)
    axes[0, 2].axhline(float(problem.schedules(initial)[1][0, 0]), color="grey", ls=":", lw=1, label="initial")
    axes[0, 2].set(title="learned momenta", xlabel="training step", ylabel="momentum")
    axes[0, 2].legend(fontsize=6, ncol=2)
    ax = axes[1, 0]
    s0 = initial["log_init_scale"].exp()
    s1 = final["log_init_scale"].detach().exp()
    x = torch.arange(len(problem.names)).numpy()
    ax.bar(x - 0.2, s0.numpy(), 0.4, label="initial", color="lightgrey")
    ax.bar(x + 0.2, s1.numpy(), 0.4, label="learned")
    fans = [(i, 1 / math.sqrt(f)) for i, f in enumerate(problem.fan_in) if f]
    ax.scatter(*zip(*fans), marker="_", s=400, color="red", label="1/sqrt(fan-in)", zorder=3)
    first = problem.names.index(layers[0])
    ax.set_xticks(x, [n.replace(".weight", " W").replace(".bias", " b") for n in problem.names], fontsize=7)
    ax.set(title=f"init scales (weights = scale x N(0,1)); layer 1: {float(s1[first]):.4f}, "
                 f"1/sqrt({problem.fan_in[first]}) = {1 / math.sqrt(problem.fan_in[first]):.4f}", ylabel="scale")
    ax.title.set_fontsize(9)
    ax.legend(fontsize=7)
    ax = axes[1, 1]
    for label, (steps, train, val), color in (("initial", curves[0], "grey"), ("learned", curves[1], "C0")):
        ax.plot(range(len(train)), train, color=color, lw=0.7, alpha=0.6, label=f"{label}: minibatch training loss")
        ax.plot(steps, val, color=color, lw=2, label=f"{label}: validation loss")
    ax.set(title="learning curves (plain float64 SGD at these hyperparameters)", xlabel="training step",
           ylabel="cross-entropy", yscale="log")
    ax.title.set_fontsize(9)
    ax.legend(fontsize=7)
    _meta_curve(axes[1, 2], history)
    fig.suptitle(title)
    fig.tight_layout()
    return _png(fig, plt)


def images_figure(tensors, side, history, title, what, cmap, symmetric):
    """Ten images (one per class) and the meta-learning curve."""
    plt = _plt()
    fig = plt.figure(figsize=(15, 5.2))
    grid = fig.add_gridspec(2, 8, width_ratios=[1, 1, 1, 1, 1, 0.08, 0.5, 4.2])
    _images(fig, grid, tensors, side, what, cmap, symmetric)
    _meta_curve(fig.add_subplot(grid[:, 7]), history)
    fig.suptitle(title)
    fig.subplots_adjust(left=0.02, right=0.93, top=0.84, wspace=0.15, hspace=0.3)
    return _png(fig, plt)


def figure(problem, initial, final, history, title, curves=None):
    """The PNG of a problem's result: ``initial`` and ``final`` hyperparameters (dicts of tensors)."""
    side = problem.data["side"]
    if problem.name == "schedules":
        return schedules_figure(problem, initial, final, history, curves, title)
    if problem.name == "l2":
        log10 = final["log_l2"].detach() / math.log(10)
        return images_figure(log10, side, history, title, "learned L2 per weight, log10", "viridis", False)
    return images_figure(final["images"].detach(), side, history, title, "learned training images", "RdBu_r", True)
