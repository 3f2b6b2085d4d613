"""``python -m stn_ext reversible``: meta-learn training schedules by exact reversible learning.

The kind of experiment of Maclaurin, Duvenaud & Adams (2015): an MLP on scikit-learn's digits (8x8
images, shipped with scikit-learn, no download) is trained for T steps of SGD with momentum; the
validation loss after training is differentiated exactly w.r.t. the per-step learning rates and
momenta, the L2 strength and per-layer initialisation scales by running the training backwards bit for
bit (stn_ext.reversible.hypergradient), and those hyperparameters are improved by normalised gradient
descent over several meta-iterations. Writes the learned schedules (CSV), the meta-training curve (CSV) and a plot (PNG).
"""
import argparse
import csv
import json
import math
import os
import sys
import time

import torch

from stn_ext.reversible import FixedPointOverflowError, ReversibilityError, hypergradient, quantize_momentum


def build_parser():
    p = argparse.ArgumentParser(
        prog="python -m stn_ext reversible",
        description=(
            "Meta-learn per-step learning-rate and momentum schedules, an L2 strength and per-layer "
            "initialisation scales of an MLP on scikit-learn's digits, with exact hypergradients through "
            "T steps of SGD with momentum run backwards bit for bit (Maclaurin et al. 2015)."),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--steps", type=int, default=100, help="training steps T per meta-iteration")
    p.add_argument("--meta-iters", type=int, default=25, help="meta-iterations (one hypergradient each)")
    p.add_argument("--meta-lr", type=float, default=0.05,
                   help="meta step size: each block (log lrs, logit momenta, log L2, log init scales) moves by "
                        "this much in RMS per meta-iteration, along its RMS-normalised hypergradient")
    p.add_argument("--meta-momentum", type=float, default=0.5, help="momentum of the meta-optimiser")
    p.add_argument("--hidden", type=int, default=50, help="hidden units of the MLP (64 -> hidden -> 10, tanh)")
    p.add_argument("--batch", type=int, default=100, help="training minibatch size (a fixed batch per step)")
    p.add_argument("--train-size", type=int, default=1000, help="training examples (the rest is validation)")
    p.add_argument("--lr", type=float, default=0.3, help="initial learning rate of every step")
    p.add_argument("--momentum", type=float, default=0.9, help="initial momentum of every step")
    p.add_argument("--l2", type=float, default=1e-3, help="initial L2 strength on the weight matrices")
    p.add_argument("--init-scale", type=float, default=1.0,
                   help="initial scale of the weight matrices (times N(0, 1/fan_in))")
    p.add_argument("--per-layer", action="store_true",
                   help="separate schedules for each layer (its weight and bias share one)")
    p.add_argument("--no-l2", action="store_true", help="do not meta-learn the L2 strength")
    p.add_argument("--no-init-scale", action="store_true", help="do not meta-learn the initialisation scales")
    p.add_argument("--radix-bits", type=int, default=52, help="fixed-point radix of the exact weights")
    p.add_argument("--dtype", choices=["float64", "float32"], default="float64", help="model precision")
    p.add_argument("--seed", type=int, default=0, help="seed of the data split, batches and initial weights")
    p.add_argument("--out", default="runs/reversible", help="output folder for CSV, JSON and PNG")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG (no matplotlib needed)")
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    return p


def load_digits_split(train_size, seed, dtype):
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    X = torch.tensor(X, dtype=dtype) / 16.0
    y = torch.tensor(y, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    X, y = X[perm], y[perm]
    if not 0 < train_size < len(y):
        raise SystemExit(f"--train-size must be in (0, {len(y)})")
    return X[:train_size], y[:train_size], X[train_size:], y[train_size:]


def forward(p, x):
    return torch.tanh(x @ p[0].T + p[1]) @ p[2].T + p[3]


class MetaProblem:
    """The MLP, its data and the mapping from unconstrained meta-parameters to hyperparameters."""

    def __init__(self, args):
        self.dtype = torch.float64 if args.dtype == "float64" else torch.float32
        self.Xtr, self.ytr, self.Xva, self.yva = load_digits_split(args.train_size, args.seed, self.dtype)
        gen = torch.Generator().manual_seed(args.seed + 1)
        d, h = self.Xtr.shape[1], args.hidden
        # base weights; the initial weights are exp(log_init_scale[l]) * base[l] for the matrices
        self.base = [torch.randn(h, d, generator=gen, dtype=self.dtype) / math.sqrt(d),
                     torch.zeros(h, dtype=self.dtype),
                     torch.randn(10, h, generator=gen, dtype=self.dtype) / math.sqrt(h),
                     torch.zeros(10, dtype=self.dtype)]
        self.matrices = [0, 2]
        self.T, self.B = args.steps, args.batch
        self.order = torch.randperm(len(self.ytr), generator=torch.Generator().manual_seed(args.seed + 2))

    def batch(self, t):
        n = len(self.ytr)
        start = (t * self.B) % n
        idx = self.order[torch.arange(start, start + self.B) % n]
        return self.Xtr[idx], self.ytr[idx]

    def train_loss(self, p, t, hypers):
        xb, yb = self.batch(t)
        ce = torch.nn.functional.cross_entropy(forward(p, xb), yb)
        l2 = torch.exp(hypers["log_l2"]).to(self.dtype)
        return ce + 0.5 * l2 * sum((p[i] ** 2).sum() for i in self.matrices)

    def val_loss(self, p):
        return torch.nn.functional.cross_entropy(forward(p, self.Xva), self.yva)

    def val_accuracy(self, p):
        with torch.no_grad():
            return float((forward(p, self.Xva).argmax(1) == self.yva).double().mean())

    def init_params(self, log_scale):
        p = [b.clone() for b in self.base]
        for j, i in enumerate(self.matrices):
            p[i] = p[i] * torch.exp(log_scale[j]).to(self.dtype)
        return p


def run(args):
    prob = MetaProblem(args)
    groups = [0, 0, 1, 1]  # layer of each parameter tensor (weight, bias, weight, bias)
    shape = (args.steps, 2) if args.per_layer else (args.steps,)
    meta = {
        "log_lr": torch.full(shape, math.log(args.lr), dtype=torch.float64),
        "logit_momentum": torch.full(shape, math.log(args.momentum / (1 - args.momentum)), dtype=torch.float64),
        "log_l2": torch.tensor(math.log(args.l2), dtype=torch.float64),
        "log_init_scale": torch.full((len(prob.matrices),), math.log(args.init_scale), dtype=torch.float64),
    }
    learn = ["log_lr", "logit_momentum"] + ([] if args.no_l2 else ["log_l2"]) + \
        ([] if args.no_init_scale else ["log_init_scale"])
    leaves = {k: meta[k].clone().requires_grad_(k in learn) for k in meta}
    # Meta-optimiser: gradient descent with momentum on each block's RMS-normalised hypergradient, so
    # the shape of a schedule's gradient (not only its signs, as with Adam) shapes the schedule.
    meta_lr = args.meta_lr
    meta_vel = {k: torch.zeros_like(meta[k]) for k in learn}

    history, schedules = [], []
    progress = range(args.meta_iters)
    bar = None
    if not args.quiet:
        try:
            from tqdm import tqdm

            bar = progress = tqdm(progress, desc="meta-iterations", unit="it", file=sys.stderr)
        except ImportError:  # progress without tqdm
            pass
    started = time.time()
    last_good = {k: v.detach().clone() for k, v in leaves.items()}
    for it in progress:
        with torch.no_grad():
            lrs = torch.exp(leaves["log_lr"])
            moms = quantize_momentum(torch.sigmoid(leaves["logit_momentum"]).clamp(2.0**-16, 1 - 2.0**-16))
            scale = leaves["log_init_scale"].detach()
        params = prob.init_params(scale)
        try:
            res = hypergradient(params, prob.train_loss, prob.val_loss, lrs, moms,
                                hypers={"log_l2": leaves["log_l2"].detach()}, radix_bits=args.radix_bits,
                                groups=groups if args.per_layer else None)
            ok = math.isfinite(res.val_loss)
        except (FixedPointOverflowError, FloatingPointError, ReversibilityError) as err:
            ok, res = False, err
        if not ok:
            # the meta-step went too far (training diverged): go back and halve the meta step size
            with torch.no_grad():
                for k in leaves:
                    leaves[k].copy_(last_good[k])
            meta_lr *= 0.5
            for k in learn:
                meta_vel[k].zero_()
            history.append({"meta_iter": it, "val_loss": float("nan"), "val_acc": float("nan"),
                            "note": f"diverged, meta lr halved ({str(res)[:80]})"})
            continue
        last_good = {k: v.detach().clone() for k, v in leaves.items()}
        acc = prob.val_accuracy(res.final_params)
        row = {"meta_iter": it, "val_loss": res.val_loss, "val_acc": acc,
               "l2": float(torch.exp(leaves["log_l2"].detach())),
               "bits_per_element_per_step": res.bits_per_element_per_step}
        for j, i in enumerate(prob.matrices):
            row[f"init_scale_{i}"] = float(torch.exp(leaves["log_init_scale"][j].detach()))
        history.append(row)
        schedules.append((it, lrs.clone(), moms.clone()))
        if bar is not None:
            bar.set_postfix(val_loss=f"{res.val_loss:.4f}", val_acc=f"{acc:.3f}")
        # chain rule to the unconstrained meta-parameters (gradient descent on the validation loss)
        grads = {
            "log_lr": res.grad_lrs * lrs,
            "logit_momentum": res.grad_momenta * moms * (1 - moms),
            "log_l2": res.grad_hypers["log_l2"].double(),
            "log_init_scale": torch.stack([
                (res.grad_params[i].double() * prob.base[i].double()).sum() * torch.exp(scale[j])
                for j, i in enumerate(prob.matrices)]),
        }
        with torch.no_grad():
            for k in learn:
                g = grads[k].reshape(leaves[k].shape).to(leaves[k].dtype)
                rms = g.pow(2).mean().sqrt()
                if float(rms) > 0:
                    meta_vel[k].mul_(args.meta_momentum).add_(g / rms)
                    leaves[k].sub_(meta_lr * meta_vel[k])
    return history, schedules, time.time() - started, prob


def write_outputs(args, history, schedules, seconds):
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "meta_history.csv"), "w", newline="") as f:
        keys = sorted({k for row in history for k in row}, key=lambda k: (k != "meta_iter", k))
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(history)
    with open(os.path.join(args.out, "schedules.csv"), "w", newline="") as f:
        w = csv.writer(f)
        first_lr = schedules[0][1]
        per_layer = first_lr.dim() == 2
        cols = ["meta_iter", "step"]
        if per_layer:
            for i in range(first_lr.shape[1]):
                cols += [f"lr_layer{i}", f"momentum_layer{i}"]
        else:
            cols += ["lr", "momentum"]
        w.writerow(cols)
        for it, lrs, moms in schedules:
            for t in range(lrs.shape[0]):
                if per_layer:
                    vals = [x for i in range(lrs.shape[1]) for x in (float(lrs[t, i]), float(moms[t, i]))]
                else:
                    vals = [float(lrs[t]), float(moms[t])]
                w.writerow([it, t] + [f"{v:.8g}" for v in vals])
    good = [r for r in history if math.isfinite(r.get("val_loss", float("nan")))]
    summary = {
        "seconds": seconds,
        "meta_iters": len(history),
        "first_val_loss": good[0]["val_loss"] if good else None,
        "final_val_loss": good[-1]["val_loss"] if good else None,
        "best_val_loss": min(r["val_loss"] for r in good) if good else None,
        "first_val_acc": good[0]["val_acc"] if good else None,
        "final_val_acc": good[-1]["val_acc"] if good else None,
        "args": vars(args),
    }
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    if not args.no_plot:
        plot(args, history, schedules)
    return summary


def plot(args, history, schedules):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    cmap = plt.get_cmap("viridis")
    m = max(len(schedules) - 1, 1)
    for k, (it, lrs, moms) in enumerate(schedules):
        if k not in (0, len(schedules) - 1) and k % max(1, len(schedules) // 6):
            continue
        color = cmap(k / m)
        lr = lrs if lrs.dim() == 1 else lrs[:, 0]
        mo = moms if moms.dim() == 1 else moms[:, 0]
        axes[0].plot(lr.numpy(), color=color, label=f"meta-iter {it}")
        axes[1].plot(mo.numpy(), color=color, label=f"meta-iter {it}")
    axes[0].set(title="learning-rate schedule" + (" (first layer)" if args.per_layer else ""),
                xlabel="training step", ylabel="learning rate")
    axes[1].set(title="momentum schedule", xlabel="training step", ylabel="momentum")
    axes[0].legend(fontsize=7)
    its = [r["meta_iter"] for r in history if math.isfinite(r.get("val_loss", float("nan")))]
    vls = [r["val_loss"] for r in history if math.isfinite(r.get("val_loss", float("nan")))]
    axes[2].plot(its, vls, marker="o")
    axes[2].set(title="validation loss after training", xlabel="meta-iteration", ylabel="cross-entropy")
    fig.suptitle(f"Exact hypergradients through {args.steps} reversed SGD steps, digits MLP")
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "schedules.png"), dpi=110)
    plt.close(fig)


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.steps < 1 or args.meta_iters < 1:
        raise SystemExit("--steps and --meta-iters must be positive")
    if not 0 < args.momentum < 1:
        raise SystemExit("--momentum must be in (0, 1)")
    torch.use_deterministic_algorithms(True)
    history, schedules, seconds, _ = run(args)
    if not schedules:
        print("stn_ext reversible: every meta-iteration diverged; lower --lr or --meta-lr", file=sys.stderr)
        return 1
    summary = write_outputs(args, history, schedules, seconds)
    if not args.quiet:
        print(f"validation loss {summary['first_val_loss']:.4f} -> {summary['final_val_loss']:.4f} "
              f"(accuracy {summary['first_val_acc']:.3f} -> {summary['final_val_acc']:.3f}) "
              f"in {seconds:.1f} s; wrote {args.out}/schedules.csv, meta_history.csv, summary.json"
              + ("" if args.no_plot else ", schedules.png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
