"""Tuning quality of the trainer's defaults on problems with a known answer (issue 11).

ridge   one StnLinear(40, 1, bias=False) with its weight decay tuned (range 1e-4..1e4), full batch,
        started 100x above and 100x below the closed-form optimum (stn_ext.tuning.problems.Ridge); every
        method (stn, delta-stn) and perturbation mode (batch, example), 3 seeds; reports |u - u*| in
        log units after --ridge-steps weight steps, and whether any run ended non-finite.
ridge-family (only with --only ridge-family) the ridge targets on a family of instances instead of one: --family-size
        (8) Ridge instances drawn from a fixed generator (--family-seed 22; --instances i3,i5 runs some of them):
        d in 20..80, n_train in d..2d, noise
        and signal/noise log-uniform, so the optimum moves through the weight-decay range. A draw is rejected and
        redrawn (deterministically, the next draw of the same generator) where its optimum is not interior, a start
        lies within one log unit of the range's ends, or the 100x-above start is not well inside momentum SGD's
        stability limit (lr * curvature > 1/4 of 2 (1 + momentum)). Every method, perturbation mode and side as
        ridge, --seeds (default 3) each; the table marks runs that rolled back (recoveries > 0) with their final
        gap and counts the runs within tolerance (0.05 per batch, 0.10 per example). ~4 s a run on one core.
fashion Fashion-MNIST (stn_ext.data.fashion_mnist: a 10k training subset, 10k validation images from the
        training set, the official 10k test set), MLP 784-256-256-10 with three dropout rates from 0.05,
        batch 100, --fashion-steps weight steps: fixed, random search and Optuna's TPE (4 trials each,
        splitting the same steps), stn, delta-stn, 2 seeds; final test loss, and the tuned schedules
        plotted (tuning-<date>-fashion.png). Skipped, with a note, where the IDX files are not installed.
cnn     the Delta-STN code's Fashion-MNIST CNN experiment (stn_ext.tuning.problems.fashion_cnn_protocol): a 5k
        training subset, 2k validation images from the training set, the official 10k test set; conv 16 - conv 32 -
        FC 256 - 10 (3x3 kernels) with four dropout rates (input, after each conv stage, after the FC layer) from
        0.05 and cutout length (2..24, from 4) and holes (0..5, from 1), six hyperparameters; batch 128,
        --cnn-steps weight steps (1500: ~45 s for a fixed run on one core), --cnn-seeds seeds (3): fixed, random
        search and TPE (4 trials each, splitting the same steps), stn, delta-stn; test loss, best and final
        validation loss, training time per step against fixed, the final hyperparameters, and the six schedules
        plotted (tuning-<date>-cnn.png). Skipped, with a note, where the IDX files are not installed.
digits  the 1000/400/397 protocol (stn_ext.tuning.problems.digits_protocol), MLP 64-256-256-10 with three
        dropout rates from 0.05, batch 100, --digits-steps weight steps: fixed, random search (4 trials
        splitting the same steps), stn, delta-stn; best and final validation loss, test loss, seconds per
        weight step relative to fixed.

Everything runs with TrainConfig's defaults except what the problem sets (hyperparameter, range, start,
steps, batch size, perturbation mode). Writes bench/results/tuning-<date>.{md,json} and
tuning-ridge-<date>.png (u - u* against weight steps).

    python bench/bench_tuning.py                      # ~45 minutes on one core (fashion ~10, cnn ~25 of them)
    python bench/bench_tuning.py --quick              # one seed, fewer steps (what the test runs)
    python bench/bench_tuning.py --only cnn           # ~25 minutes on one core
    python bench/bench_tuning.py --quick --only cnn   # the cnn protocol in seconds (24 steps, small splits)
    python bench/bench_tuning.py --only ridge-family --tag ridge-family   # ~5 minutes on one core (64 runs)
"""
import argparse
import datetime
import json
import math
import os
import random
import subprocess
import sys
import time
import warnings

import torch

import stn_ext
from stn_ext.checkpoint import atomic_write_text
from stn_ext.tuning.problems import (CNN_HYPERS, CNN_INITS, CNN_RANGES, CNN_SIZES, Ridge, digits_mlp, digits_protocol,
                                     fashion_cnn, fashion_cnn_protocol)
from stn_ext.tuning import TUNED, TrainConfig, Trainer, train
from stn_ext.tuning.space import HyperSpace

DIGITS_METHODS = ("fixed", "random", "stn (no hyper steps)", "stn", "delta-stn")
FASHION_METHODS = ("fixed", "random", "tpe", "stn", "delta-stn")
CNN_METHODS = FASHION_METHODS
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
OVERRIDES = {}  # --set NAME=VALUE: TrainConfig fields a problem does not set itself (to measure an alternative)


def config(**settings):
    """The run's TrainConfig: the defaults, then --set, then what the problem itself sets; a dict field both set
    (inits, ranges) is merged, --set's entries on top, so --set inits={'dropout': 0.5} starts the cnn protocol's
    rates at 0.5 and keeps its own cutout starts."""
    merged = {k: {**v, **OVERRIDES[k]} for k, v in settings.items()
              if isinstance(v, dict) and isinstance(OVERRIDES.get(k), dict)}
    return TrainConfig(**{**OVERRIDES, **settings, **merged})


RIDGE_RANGE = (1e-4, 1e4)  # the tuned weight decay's range on every ridge instance


def ridge_config(problem, u_star, method, perturb, side, seed, steps, **settings):
    """The TrainConfig of a ridge run: weight decay tuned in RIDGE_RANGE from 100x above (side 1) or below (side
    -1) the log-optimum ``u_star``, full batches."""
    return config(method=method, hypers=("weight_decay",), ranges={"weight_decay": RIDGE_RANGE},
                  inits={"weight_decay": math.exp(u_star + side * math.log(100))}, steps=steps,
                  batch_size=problem.n_train, perturb=perturb, seed=seed, quiet=True, **settings)


def ridge_run(problem, u_star, method, perturb, side, seed, steps, details=False):
    """One ridge run on the instance ``problem`` (a Ridge) whose log-optimum is ``u_star``, started 100x above
    (side 1) or below (side -1) it. ``details``: also the settings the tuner resolved (perturbation mode, sigma_0,
    schedule), the wall time and the final validation loss's excess over the optimum's (relative)."""
    t0 = time.perf_counter()
    cfg = ridge_config(problem, u_star, method, perturb, side, seed, steps)
    torch.manual_seed(seed)
    tr = Trainer(cfg, data=problem.dataset(), model=problem.model())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            tr.fit()
            error = ""
        except RuntimeError as e:  # Diverged: reported, counted as a miss
            error = str(e)
    u = float(tr.u.detach())
    traj = [(r["step"], math.log(r["hypers"]["weight_decay"]) - u_star) for r in tr.log.steps[::10]]
    row = {"method": method, "perturb": perturb, "side": "above" if side > 0 else "below", "seed": seed,
           "u_minus_opt": u - u_star, "finite": math.isfinite(u), "error": error, "recoveries": tr.recoveries,
           "sigma": tr.sigmas()["weight_decay"], "diverged_warnings": sum("diverged" in str(w.message) for w in caught),
           "trajectory": traj}
    if details:
        t = tr.tuner
        best = problem.val_loss(math.exp(u_star))
        excess = (problem.val_loss(math.exp(min(max(u, math.log(RIDGE_RANGE[0])), math.log(RIDGE_RANGE[1])))) - best) / best \
            if math.isfinite(u) else math.inf
        row.update(resolved={"perturb": getattr(t, "perturb", None), "sigma_0": getattr(t, "scale_init", None),
                             "schedule": getattr(t, "hyper_lr_schedule", None)},
                   val_excess=excess, wall_s=time.perf_counter() - t0)
    return row


def digits_config(method, seed, steps, **settings):
    """The digits protocol's TrainConfig: three dropout rates, batch 100, ~60 evaluations a run; ``settings`` on top."""
    return config(**{"method": method, "hypers": ("dropout",), "steps": steps, "batch_size": 100, "seed": seed,
                     "quiet": True, "eval_every": max(10, steps // 60), **settings})


def write_results(name, lines):
    """A markdown table of bench/results, written whole or not at all."""
    path = os.path.join(RESULTS, name)
    atomic_write_text(path, "\n".join(lines) + "\n")
    print("wrote", path)


def digits_run(data, method, seed, steps, inits=None, hidden=(256, 256), **settings):
    # "stn (no hyper steps)": STN's parameterisation with the hyperparameters frozen at their start, the
    # control that separates what the schedule earns from what the hypernet's extra gate does. ``hidden``: the
    # MLP's widths; ``settings``: TrainConfig fields on top of the protocol's (bench_digits_family's lr, batch_size)
    frozen = method == "stn (no hyper steps)"
    cfg = digits_config("stn" if frozen else method, seed, steps, inits=dict(inits or {}),
                        **({"hyper_lr": 0.0} if frozen else {}), **settings)
    torch.manual_seed(seed)
    t = time.perf_counter()
    if method == "random":
        s = train(cfg, data=data, model=lambda: digits_mlp(3, hidden))
        best = min(s["trial_val_losses"])
    else:
        tr = Trainer(cfg, data=data, model=digits_mlp(3, hidden))
        s = tr.fit()
        best = min(e["val_loss"] for e in tr.log.epochs)
    wall = time.perf_counter() - t
    return {"method": method, "seed": seed, "best_val_loss": best, "val_loss": s["val_loss"], "test_loss": s["test_loss"],
            "test_acc": s.get("test_acc"), "s_per_step": wall / steps, "hypers": s["hypers"], "sigmas": s.get("sigmas")}


def image_run(data, method, seed, steps, model, batch_size=100, n_evals=40, **settings):
    """One run of an image protocol (fashion, cnn): ``model`` a zero-argument function returning a fresh model,
    ``settings`` the protocol's TrainConfig fields (hypers, ranges, inits). s_per_step counts the whole run
    (evaluations included), train_s_per_step the weight and hyper steps alone (the trainer's wall_s; random search:
    its trials' sum). The trajectory holds the hyperparameters every few weight steps and at the last, val_curve the
    validation loss at each evaluation (both empty for the searches, whose trials restart)."""
    cfg = config(method=method, steps=steps, batch_size=batch_size, seed=seed, quiet=True,
                 eval_every=max(10, steps // n_evals), plots=False, **settings)
    torch.manual_seed(seed)
    t = time.perf_counter()
    traj, curve = [], []
    if method in ("random", "tpe"):
        s = train(cfg, data=data, model=model)
        best = min(s["trial_val_losses"])
    else:
        tr = Trainer(cfg, data=data, model=model())
        s = tr.fit()
        every = max(1, min(20, steps // 50))
        traj = [(r["step"], r["hypers"]) for r in tr.log.steps[::every]]
        if traj[-1][0] != tr.log.steps[-1]["step"]:
            traj.append((tr.log.steps[-1]["step"], tr.log.steps[-1]["hypers"]))
        curve = [(e["step"], e["val_loss"]) for e in tr.log.epochs]
        best = min(e["val_loss"] for e in tr.log.epochs)
    return {"method": method, "seed": seed, "test_loss": s["test_loss"], "test_acc": s.get("test_acc"),
            "val_loss": s["val_loss"], "best_val_loss": best, "s_per_step": (time.perf_counter() - t) / steps,
            "train_s_per_step": s["wall_s"] / steps, "hypers": s["hypers"], "sigmas": s.get("sigmas"),
            "recoveries": s.get("recoveries", 0), "hyper_steps": s.get("hyper_steps", 0), "trial_hypers": s.get("trial_hypers"),
            "trial_val_losses": s.get("trial_val_losses"), "trajectory": traj, "val_curve": curve}


def fashion_model():
    """The fashion protocol's network: MLP 784-256-256-10 with three dropout slots."""
    from stn_ext.tuning.models import mlp

    return mlp(784, 10, 3, (256, 256))


FASHION_SETTINGS = {"hypers": ("dropout",)}  # the fashion protocol's TrainConfig fields (batch 100: image_run's)


def cnn_model():
    """The cnn protocol's network: problems.fashion_cnn with cutout's two and the four dropout slots."""
    return fashion_cnn(len(CNN_RANGES) + 4)


def cnn_settings():
    """The cnn protocol's TrainConfig fields (fresh dicts: a run may not change the protocol's)."""
    return dict(hypers=CNN_HYPERS, ranges=dict(CNN_RANGES), inits=dict(CNN_INITS))


def fashion_run(data, method, seed, steps):
    """The fashion protocol: MLP 784-256-256-10, three dropout rates, batch 100, 40 evaluations."""
    return image_run(data, method, seed, steps, fashion_model, **FASHION_SETTINGS)


def cnn_run(data, method, seed, steps, batch_size=CNN_SIZES["batch_size"]):
    """The cnn protocol: problems.fashion_cnn, four dropout rates and cutout, batch 128, 10 evaluations (each
    evaluates the 10k test images: ~2 s on one core)."""
    return image_run(data, method, seed, steps, cnn_model, batch_size=batch_size, n_evals=10, **cnn_settings())


def _image_cells(rs, fixed_time, time_key="s_per_step", best_val=False):
    """An image protocol's cells for one method: test loss (mean, per seed), test accuracy, [best validation loss,]
    final validation loss, time per step against fixed's (mean over seeds of ``time_key``)."""
    return ([f"{_mean([r['test_loss'] for r in rs]):.4f}", ", ".join("%.4f" % r["test_loss"] for r in rs),
             f"{_mean([r['test_acc'] for r in rs]):.3f}"]
            + ([f"{_mean([r['best_val_loss'] for r in rs]):.4f}"] if best_val else [])
            + [f"{_mean([r['val_loss'] for r in rs]):.4f}",
               "-" if math.isnan(fixed_time) else f"{_mean([r[time_key] for r in rs]) / fixed_time:.2f}x"])


def _fixed_time(rows, key):
    ts = [r[key] for r in rows if r["method"] == "fixed"]
    return _mean(ts) if ts else math.nan


def _short(name):
    return name.split(".", 1)[1] if name.startswith("dropout.") else name.replace("cutout_", "")


def _hyper_value(name, v):
    return f"{v:.0f}" if name.startswith("cutout") or name == "shift" else f"{v:.2f}"


def fashion_table(rows, steps):
    fixed = _fixed_time(rows, "s_per_step")
    out = [f"Fashion-MNIST (10k training subset, 10k validation from the training set, official test set), MLP "
           f"784-256-256-10, three dropout rates from 0.05, {steps} weight steps, batch 100 (random, tpe: 4 trials "
           f"of {steps // 4} steps; the trial with the best final validation loss is reported).", "",
           "| method | test loss (mean) | per seed | test acc | best val loss | final val loss | time/step vs fixed | "
           "final rates (seed 0) |", "|---|---|---|---|---|---|---|---|"]
    return "\n".join(out + _method_rows(rows, FASHION_METHODS, lambda rs: _image_cells(rs, fixed, best_val=True) + [
        ", ".join(f"{v:.2f}" for v in rs[0]["hypers"].values())]))


def cnn_space():
    """The cnn protocol's hyperparameters as its runs are configured (--set inits and ranges merged in)."""
    cfg = config(**cnn_settings())
    return HyperSpace.build(cfg.hypers, stn_ext.dropout_slots(cnn_model()), cfg.ranges, cfg.inits)


def _starts_and_ranges(space):
    """'in 0.05 [0, 0.9], ..., length 4 [2, 24], holes 1 [0, 5]': each hyperparameter's start and range."""
    return ", ".join(f"{_short(h.name)} {_hyper_value(h.name, h.init)} [{h.low:g}, {h.high:g}]" for h in space.hypers)


def cnn_table(rows, steps, sizes):
    """The cnn protocol's results, then every run's final hyperparameters (and the perturbation scales)."""
    fixed, space = _fixed_time(rows, "train_s_per_step"), cnn_space()
    n_test = sizes["test_size"] or 10000
    out = [f"Fashion-MNIST CNN (the Delta-STN code's experiment, sized for one core): {sizes['train_size']} training and "
           f"{sizes['val_size']} validation images from the training set, {n_test} official test images; conv 3x3 16 - "
           f"conv 3x3 32 - FC {sizes['hidden']} - 10 (max-pool 2 after each conv), dropout on the input, after each conv "
           f"stage and after the FC layer, cutout length and holes (start [range]: {_starts_and_ranges(space)}); "
           f"{steps} weight steps, batch {sizes['batch_size']}, {len({r['seed'] for r in rows})} "
           f"seed(s); random, tpe: 4 trials of {steps // 4} steps, the trial with the best final validation loss is "
           "reported (its best val: the lowest final validation loss of a trial). Time per step: the weight and hyper "
           "steps alone (evaluations excluded), against fixed's.", "",
           "| method | test loss (mean) | per seed | test acc | best val loss | final val loss | time/step vs fixed | "
           "final hyperparameters (seed 0) |", "|---|---|---|---|---|---|---|---|"]
    out += _method_rows(rows, CNN_METHODS, lambda rs: _image_cells(rs, fixed, "train_s_per_step", best_val=True) + [
        ", ".join(f"{_short(n)} {_hyper_value(n, v)}" for n, v in rs[0]["hypers"].items())])
    names = list(rows[0]["hypers"])
    starts = {h.name: h.init for h in space.hypers}
    out += ["", "Final hyperparameters per run (start: "
            + ", ".join(f"{_short(n)} {_hyper_value(n, starts[n])}" for n in names)
            + "); sigma: the perturbation scales at the end (unconstrained units), in the order of the columns.", "",
            "| method | seed | " + " | ".join(_short(n) for n in names) + " | sigma | recoveries |",
            "|---" * (len(names) + 4) + "|"]
    for m in CNN_METHODS:
        for r in sorted((r for r in rows if r["method"] == m), key=lambda r: r["seed"]):
            sig = ", ".join(f"{r['sigmas'][n]:.2f}" for n in names) if r.get("sigmas") else ""
            out.append(f"| {m} | {r['seed']} | " + " | ".join(_hyper_value(n, r["hypers"][n]) for n in names)
                       + f" | {sig} | {r.get('recoveries') or 0} |")
    return "\n".join(out)


def plot_schedules(rows, path, methods, title, columns=None):
    """One panel per hyperparameter: the tuned schedules (stn, delta-stn; one line per seed) beside the values the
    baselines used (dashed: fixed, the best trial of random search and TPE). Panels of dropout rates share a
    y axis; others (cutout length, holes) have their own. Where the rows carry validation curves, a first panel
    shows them (fixed, stn, delta-stn; every seed): the paper's claim of faster, steadier convergence, put to the eye."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(rows[0]["hypers"])
    curves = any(r.get("val_curve") for r in rows)
    panels = (["validation loss"] if curves else []) + names
    columns = columns or len(panels)
    nrow = -(-len(panels) // columns)
    fig, axes = plt.subplots(nrow, columns, figsize=(4 * columns, 3.4 * nrow), squeeze=False)
    colours = {m: f"C{i}" for i, m in enumerate(methods)}
    steps = max((t[-1][0] for r in rows if r["trajectory"] for t in [r["trajectory"]]), default=1)
    first_seed = min(q["seed"] for q in rows)
    if curves:
        _plot_val_curves(axes.flat[0], rows, colours, first_seed)
    rate_axes = []
    for ax, n in zip(list(axes.flat)[len(panels) - len(names):], names):
        for r in rows:
            label = r["method"] if r["seed"] == first_seed else None
            if r["trajectory"]:
                xs, hs = zip(*r["trajectory"])
                ax.plot(xs, [h[n] for h in hs], color=colours[r["method"]], lw=1, label=label,
                        drawstyle="steps-post" if n.startswith("cutout") else "default")
            else:
                ax.hlines(r["hypers"][n], 0, steps, colors=colours[r["method"]], linestyles="--", lw=1, label=label)
        ax.set(title=n, xlabel="weight step")
        if n.startswith("dropout."):
            rate_axes.append(ax)
        if not n.startswith("dropout.") or len(rate_axes) == 1:
            ax.set_ylabel("dropout rate" if n.startswith("dropout.") else
                          {"cutout_length": "pixels", "cutout_holes": "holes"}.get(n, "value"))
    if rate_axes:  # the rates on one scale
        top = max(ax.get_ylim()[1] for ax in rate_axes)
        for ax in rate_axes:
            ax.set_ylim(0, top)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    axes.flat[0].legend(fontsize=7)
    if curves:  # the searches have no curve: their colours in the first schedule's legend
        axes.flat[1].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_val_curves(ax, rows, colours, first_seed):
    """Validation loss against weight steps for the runs that train once (not the searches' restarting trials)."""
    lows = []
    for r in rows:
        if r.get("val_curve"):
            xs, ys = zip(*r["val_curve"])
            ax.plot(xs, ys, color=colours[r["method"]], lw=1, ls="--" if r["method"] == "fixed" else "-",
                    label=r["method"] if r["seed"] == first_seed else None)
            lows.append(min(ys))
    low = min(lows)
    ax.set_ylim(low * 0.95, low * 1.6)  # the late part, where the methods differ
    ax.set(title="validation loss", xlabel="weight step", ylabel="loss")


def plot_fashion(rows, path):
    """The tuned dropout schedules (stn, delta-stn; one line per seed) beside the values the baselines used."""
    plot_schedules(rows, path, FASHION_METHODS,
                   "Fashion-MNIST: tuned dropout schedules (lines) and the baselines' rates (dashed: fixed, best trial)")


def plot_cnn(rows, path):
    """The validation curves and the six schedules of the cnn protocol, one panel each (4 per row)."""
    plot_schedules(rows, path, CNN_METHODS, "Fashion-MNIST CNN: tuned dropout and cutout schedules (lines, one per seed)\n"
                   "and the baselines' values (dashed: fixed, the best trial of random search and TPE)", columns=4)


def digits_grid(data, steps, seed=0):
    """Fixed per-layer dropout on a 3x4 grid (input 0.02/0.1/0.2, hidden 0.05/0.15/0.3/0.5): the most a plain
    network's rates can earn on this protocol, the reference for Delta-STN, which evaluates the plain network."""
    rows = []
    for a in (0.02, 0.1, 0.2):
        for h in (0.05, 0.15, 0.3, 0.5):
            r = digits_run(data, "fixed", seed, steps, inits={"dropout.in": a, "dropout.h1": h, "dropout.h2": h})
            rows.append({"in": a, "hidden": h, "seed": seed, "best_val_loss": r["best_val_loss"],
                         "test_loss": r["test_loss"]})
            print(f"grid in {a} hidden {h}: best val {rows[-1]['best_val_loss']:.4f}", file=sys.stderr, flush=True)
    return rows


def grid_table(rows, steps):
    best = min(rows, key=lambda r: r["best_val_loss"])
    out = [f"Fixed dropout grid, seed {rows[0]['seed']}, {steps} weight steps: best validation loss per (input, hidden) "
           f"rate; best {best['best_val_loss']:.4f} at input {best['in']}, hidden {best['hidden']}.", "",
           "| input \\ hidden | " + " | ".join(str(h) for h in sorted({r["hidden"] for r in rows})) + " |",
           "|---" * (1 + len({r["hidden"] for r in rows})) + "|"]
    for a in sorted({r["in"] for r in rows}):
        cells = [f"{r['best_val_loss']:.4f}" for r in sorted((r for r in rows if r["in"] == a), key=lambda r: r["hidden"])]
        out.append(f"| {a} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def _method_rows(rows, methods, cells):
    """Markdown table rows, one per method that has results: its name, then cells(its rows)."""
    out = []
    for m in methods:
        rs = [r for r in rows if r["method"] == m]
        if rs:
            out.append("| " + " | ".join([m] + cells(rs)) + " |")
    return out


def _mean(xs):
    return sum(xs) / len(xs)


def ridge_table(rows, steps):
    seeds = sorted({r["seed"] for r in rows})
    out = [f"Ridge (d=40, n=50, noise 1; optimum wd* from the closed form), |u - u*| in log units after {steps} "
           f"weight steps, per seed (seeds {seeds[0]}-{seeds[-1]}); `x` marks a run that stopped (Diverged) or ended "
           "non-finite.", "",
           "| method | perturb | start | seeds | max | recoveries |", "|---|---|---|---|---|---|"]
    keys = sorted({(r["method"], r["perturb"], r["side"]) for r in rows})
    for m, p, side in keys:
        rs = [r for r in rows if (r["method"], r["perturb"], r["side"]) == (m, p, side)]
        cells = [("x " if r["error"] or not r["finite"] else "") + f"{abs(r['u_minus_opt']):.3f}" for r in rs]
        out.append(f"| {m} | {p} | 100x {side} | {', '.join(cells)} | {max(abs(r['u_minus_opt']) for r in rs):.3f} | "
                   f"{sum(r['recoveries'] for r in rs)} |")
    return "\n".join(out)


# The ridge family (--only ridge-family): the ridge targets on instances drawn in advance from a fixed generator.
RIDGE_TOL = {"batch": 0.05, "example": 0.10}  # |u - u*| in log units after the run, by perturbation mode
FAMILY_SEED = 22  # issue 22
FAMILY_LR, FAMILY_MOMENTUM = 0.01, 0.9  # TrainConfig's SGD, for which the 100x-above start must be stable
FAMILY_STABILITY = 0.25  # lr * (data curvature + 100 wd*) at most this fraction of momentum SGD's limit 2 (1 + momentum)
FAMILY_EDGE = 1.0  # both starts at least this many log units inside RIDGE_RANGE


def _family_draw(rnd, k):
    """Draw k of the family's generator: d in 20..80, n_train in d..2d, noise log-uniform in [0.25, 4], signal/noise
    log-uniform in [0.9, 7] (the optimum wd* ~ 2 d noise^2 / (n signal^2) moves with it), a data seed."""
    d = rnd.randint(20, 80)
    n = rnd.randint(d, 2 * d)
    noise = math.exp(rnd.uniform(math.log(0.25), math.log(4.0)))
    snr = math.exp(rnd.uniform(math.log(0.9), math.log(7.0)))
    return {"draw": k, "d": d, "n_train": n, "n_val": 50, "noise": round(noise, 4), "signal": round(noise * snr, 4),
            "seed": rnd.randrange(2 ** 31)}


def _val_curvature(problem, u_star, h=0.05):
    """d^2 L_val / du^2 at the optimum over L_val(u*): how much a miss of |u - u*| costs (~ curv/2 |u - u*|^2)."""
    f = lambda u: problem.val_loss(math.exp(u))  # noqa: E731
    return (f(u_star + h) - 2 * f(u_star) + f(u_star - h)) / h ** 2 / f(u_star)


def ridge_family(size=8, seed=FAMILY_SEED, max_draws=200):
    """(instances, rejected): the first ``size`` draws of random.Random(seed) that pass the checks, each with its
    Ridge parameters, log-optimum and stability ratio; the rejected draws with their reason. Fixed in advance: the
    draws and the checks depend on nothing but ``seed`` (closed forms in float64, no training)."""
    rnd, out, rejected = random.Random(seed), [], []
    limit = 2 * (1 + FAMILY_MOMENTUM) / FAMILY_LR
    lo, hi = (math.log(v) for v in RIDGE_RANGE)
    for k in range(max_draws):
        if len(out) == size:
            break
        params = _family_draw(rnd, k)
        problem = Ridge(**{n: params[n] for n in ("d", "n_train", "n_val", "noise", "signal", "seed")})
        try:
            u_star = problem.log_optimum()
        except ValueError:
            rejected.append(dict(params, reason="no interior optimum in [1e-4, 1e4]"))
            continue
        curv = 2 * float(problem._e.max()) / problem.n_train  # the data term's largest curvature (the mean square error)
        ratio = (curv + 100 * math.exp(u_star)) / limit
        info = dict(params, log_opt=u_star, wd_opt=math.exp(u_star), data_curvature=curv, stability=ratio,
                    val_curvature=_val_curvature(problem, u_star))
        if u_star - math.log(100) < lo + FAMILY_EDGE or u_star + math.log(100) > hi - FAMILY_EDGE:
            rejected.append(dict(info, reason=f"a start within {FAMILY_EDGE:g} log unit of the range's ends"))
        elif ratio > FAMILY_STABILITY:
            rejected.append(dict(info, reason=f"100x-above start unstable: lr * curvature = {ratio:.2f} of the limit "
                                              f"(> {FAMILY_STABILITY:g})"))
        else:
            out.append(dict(info, name=f"i{len(out)}"))
    if len(out) < size:
        raise RuntimeError(f"bench_tuning: only {len(out)} of {size} ridge instances passed in {max_draws} draws")
    return out, rejected


def family_problem(inst):
    return Ridge(**{n: inst[n] for n in ("d", "n_train", "n_val", "noise", "signal", "seed")})


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _git(*args):
    """git's output (run at the repository's root), '' where git is not there."""
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def run_provenance(methods, modes):
    """The commit, the tuner's files that differ from it, and the per-method defaults the runs resolved."""
    try:
        from stn_ext.tuning import defaults
        auto = {m: defaults.resolve(m)[0] for m in methods}
        modes_resolved = {}  # by method and mode: sigma_0 and the rest depend on both, and on the response's fit
        for m in (m for m in methods if m in TUNED):
            for p in modes:
                fit = defaults.response_fit("auto", m, p, ["weight_decay"], False, 1.0)
                every = defaults.response_every(0, m, p, fit, full_batch=True)  # ridge: full batches
                modes_resolved[f"{m} {p}"] = defaults.resolve(m, p, fit=fit)[1:] + (fit, every)
    except (ImportError, AttributeError, KeyError, ValueError):
        auto, modes_resolved = {}, {}
    import hashlib

    dirty = sorted(ln[3:] for ln in _git("status", "--porcelain", "--", "stn_ext").splitlines() if ln.strip())
    digest = hashlib.sha1()
    for f in dirty:  # what the uncommitted files held when the runs started
        try:
            with open(os.path.join(ROOT, f), "rb") as fh:
                digest.update(f.encode() + b"\0" + fh.read())
        except OSError:  # deleted, or a folder
            digest.update(f.encode() + b"\0-")
    return {"commit": _git("log", "-1", "--format=%h").strip(), "dirty": dirty,
            "dirty_sha1": digest.hexdigest()[:10] if dirty else "", "auto_perturb": auto,
            "mode_defaults": {k: {"sigma_0": v[0], "schedule": v[1], "beta2": v[2], "fit": v[3], "response_every": v[4]}
                              for k, v in modes_resolved.items()},
            "config_perturb": TrainConfig().perturb}


def _within(r):
    return r["finite"] and not r["error"] and abs(r["u_minus_opt"]) <= RIDGE_TOL[r["perturb"]]


def ridge_family_table(instances, rejected, rows, steps, prov, family_seed, drawn=None):
    """The family's tables; ``drawn``: the family's size where ``instances`` holds some of it (--instances)."""
    seeds = sorted({r["seed"] for r in rows})
    which = (f"{len(instances)} instances" if drawn in (None, len(instances))
             else f"instances {', '.join(q['name'] for q in instances)} of {drawn}")
    out = [f"Ridge family: {which} drawn from random.Random({family_seed}) (d 20..80, n_train d..2d, "
           "n_val 50, noise and signal/noise log-uniform in [0.25, 4] and [0.9, 7], a data seed), weight decay tuned in "
           f"[1e-4, 1e4] from 100x above and 100x below the closed-form optimum wd*; {steps} weight steps, full batch, "
           f"TrainConfig defaults except what ridge_run sets; seeds {', '.join(map(str, seeds))}. Tolerance |u - u*| "
           f"<= {RIDGE_TOL['batch']} (per batch), <= {RIDGE_TOL['example']} (per example), finite, not stopped.", "",
           f"Draws rejected and redrawn (the generator's next draw): {len(rejected)}"
           + (" - " + "; ".join(f"draw {q['draw']} (d {q['d']}, n {q['n_train']}, noise {q['noise']:.2f}, signal "
                                f"{q['signal']:.2f}" + (f", log wd* {q['log_opt']:+.2f}" if "log_opt" in q else "")
                                + f"): {q['reason']}" for q in rejected) if rejected else "") + ". Checks: interior "
           f"optimum; both starts at least {FAMILY_EDGE:g} log unit inside the range; lr {FAMILY_LR} * (largest data "
           f"curvature 2 e_max / n + 100 wd*) at most {FAMILY_STABILITY:g} of momentum SGD's limit 2 (1 + "
           f"{FAMILY_MOMENTUM}) (stability column: that fraction).", "",
           f"Ran at commit {prov['commit'] or '?'}" + (f" with uncommitted changes to {', '.join(prov['dirty'])} "
                                                       f"(their contents' sha1 {prov['dirty_sha1']})"
                                                       if prov["dirty"] else "") + "; TrainConfig perturb "
           f"{prov['config_perturb']!r}, resolved per method (auto): "
           + ", ".join(f"{m} {p}" for m, p in prov["auto_perturb"].items()) + "; per method and mode: "
           + ", ".join(f"{k} sigma_0 {v['sigma_0']} schedule {v['schedule']} beta2 {v.get('beta2', '?')} response fit "
                       f"{v.get('fit', '?')} every {v.get('response_every', '?')}"
                       for k, v in prov["mode_defaults"].items())
           + " (the runs set the mode explicitly; the rest is the mode's, for a weight decay).", "",
           "| instance | d | n_train | noise | signal | data seed | log wd* | wd* | stability | val curvature |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for q in instances:
        out.append(f"| {q['name']} | {q['d']} | {q['n_train']} | {q['noise']:.3f} | {q['signal']:.3f} | {q['seed']} | "
                   f"{q['log_opt']:+.3f} | {q['wd_opt']:.4g} | {q['stability']:.3f} | {q['val_curvature']:.3f} |")
    out += ["", "val curvature: d^2 L_val/du^2 / L_val at u* (a gap g costs ~ curvature/2 g^2 of the validation "
            "loss). Per run: |u - u*| after the run per seed (`x`: stopped or non-finite; `*`: outside the tolerance; "
            "`(rN)`: N roll-backs); val excess: the largest relative excess of the final validation loss over the "
            "optimum's.", "",
            "| instance | method | perturb | start | |u - u*| per seed | max | val excess | recoveries |",
            "|---|---|---|---|---|---|---|---|"]
    for q in instances:
        for m in sorted({r["method"] for r in rows}):
            for p in sorted({r["perturb"] for r in rows}):
                for side in ("above", "below"):
                    rs = [r for r in rows if (r["instance"], r["method"], r["perturb"], r["side"]) == (q["name"], m, p, side)]
                    if not rs:
                        continue
                    cells = [("x " if r["error"] or not r["finite"] else "") + f"{abs(r['u_minus_opt']):.3f}"
                             + ("" if _within(r) else "*") + (f" (r{r['recoveries']})" if r["recoveries"] else "")
                             for r in rs]
                    out.append(f"| {q['name']} | {m} | {p} | 100x {side} | {', '.join(cells)} | "
                               f"{max(abs(r['u_minus_opt']) for r in rs):.3f} | {max(r['val_excess'] for r in rs):.2e} | "
                               f"{sum(r['recoveries'] for r in rs)} |")
    ok = [r for r in rows if _within(r)]
    per = "; ".join(f"{m} {p}: {sum(_within(r) for r in rows if (r['method'], r['perturb']) == (m, p))}/"
                    f"{sum((r['method'], r['perturb']) == (m, p) for r in rows)}"
                    for m in sorted({r["method"] for r in rows}) for p in sorted({r["perturb"] for r in rows}))
    bad = [r for r in rows if r["error"] or not r["finite"]]
    out += ["", f"**Within tolerance: {len(ok)}/{len(rows)} runs** ({per}); stopped or non-finite: {len(bad)}."]
    rec = [r for r in rows if r["recoveries"]]
    if rec:
        out += ["", "Runs that rolled back (recoveries > 0) and where they ended:", "",
                "| instance | method | perturb | start | seed | recoveries | final |u - u*| | within tolerance |",
                "|---|---|---|---|---|---|---|---|"]
        out += [f"| {r['instance']} | {r['method']} | {r['perturb']} | 100x {r['side']} | {r['seed']} | {r['recoveries']} | "
                f"{abs(r['u_minus_opt']):.3f} | {'yes' if _within(r) else 'no'} |" for r in rec]
    else:
        out += ["", f"Roll-backs: none (recoveries 0 in all {len(rows)} runs; diverged warnings "
                    f"{sum(r['diverged_warnings'] for r in rows)})."]
    wall = sum(r.get("wall_s", 0.0) for r in rows)
    out += ["", f"Wall time: {wall:.0f} s for {len(rows)} runs ({wall / max(1, len(rows)):.1f} s a run, one thread)."]
    return "\n".join(out)


def plot_ridge_family(rows, instances, path):
    """As plot_ridge, one panel per (method, mode): one colour per instance, solid from above, dashed from below,
    the mode's tolerance band shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    combos = sorted({(r["method"], r["perturb"]) for r in rows})
    colours = {q["name"]: f"C{i % 10}" for i, q in enumerate(instances)}
    fig, axes = plt.subplots(1, len(combos), figsize=(3.6 * len(combos), 3.6), sharey=True, squeeze=False)
    for ax, (m, p) in zip(axes[0], combos):
        for r in rows:
            if (r["method"], r["perturb"]) == (m, p) and r["trajectory"]:
                xs, ys = zip(*r["trajectory"])
                ax.plot(xs, ys, color=colours[r["instance"]], ls="-" if r["side"] == "above" else "--", alpha=0.8, lw=1)
        ax.axhline(0, color="k", lw=0.8)
        ax.axhspan(-RIDGE_TOL[p], RIDGE_TOL[p], color="0.85")
        ax.set_title(f"{m}, per {p}", fontsize=9)
        ax.set_xlabel("weight step")
    for q in instances:
        axes[0, 0].plot([], [], color=colours[q["name"]], label=f"{q['name']}: d {q['d']}, n {q['n_train']}, "
                                                                 f"log wd* {q['log_opt']:+.2f}")
    axes[0, 0].legend(fontsize=6)
    axes[0, 0].set_ylabel("log wd - log wd*")
    fig.suptitle("Ridge family: solid from 100x above, dashed from 100x below; shaded: the mode's tolerance", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def digits_table(rows, steps):
    fixed = _mean([r["s_per_step"] for r in rows if r["method"] == "fixed"]) if any(r["method"] == "fixed" for r in rows) else None
    out = [f"Digits 1000/400/397, MLP 64-256-256-10, three dropout rates from 0.05, {steps} weight steps, batch 100 "
           "(random search: 4 trials of steps/4; its best is the lowest final validation loss of a trial).", "",
           "| method | best val loss (mean) | per seed | final val | test loss | test acc | time/step vs fixed | final rates |",
           "|---|---|---|---|---|---|---|---|"]
    return "\n".join(out + _method_rows(rows, DIGITS_METHODS, lambda rs: [
        f"{_mean([r['best_val_loss'] for r in rs]):.4f}", ", ".join("%.4f" % r["best_val_loss"] for r in rs),
        f"{_mean([r['val_loss'] for r in rs]):.4f}", f"{_mean([r['test_loss'] for r in rs]):.4f}",
        f"{_mean([r['test_acc'] for r in rs]):.3f}",
        f"{_mean([r['s_per_step'] for r in rs]) / fixed:.2f}x" if fixed else "",
        ", ".join(f"{v:.2f}" for v in rs[0]["hypers"].values()) + f" (seed {rs[0]['seed']})"]))


def plot_ridge(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    combos = sorted({(r["method"], r["perturb"]) for r in rows})
    fig, axes = plt.subplots(1, len(combos), figsize=(3.2 * len(combos), 3.2), sharey=True, squeeze=False)
    for ax, (m, p) in zip(axes[0], combos):
        for r in rows:
            if (r["method"], r["perturb"]) == (m, p) and r["trajectory"]:
                xs, ys = zip(*r["trajectory"])
                ax.plot(xs, ys, color="tab:red" if r["side"] == "above" else "tab:blue", alpha=0.7, lw=1)
        ax.axhline(0, color="k", lw=0.8)
        ax.axhspan(-0.05, 0.05, color="0.85")
        ax.set_title(f"{m}, per {p}", fontsize=9)
        ax.set_xlabel("weight step")
    axes[0, 0].set_ylabel("log wd - log wd*")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _parse_sets(items):
    import ast
    from dataclasses import fields

    names, out = {f.name for f in fields(TrainConfig)}, {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or name not in names:
            raise SystemExit(f"bench_tuning: --set {item!r}: expected NAME=VALUE with NAME a TrainConfig field")
        try:
            out[name] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[name] = value  # a string, e.g. --set hyper_lr_schedule=cosine
    return out


def _sides(text):
    """--sides: 'below', 'above' or both, comma-separated -> [-1], [1] or [-1, 1]."""
    names = {"below": -1, "above": 1}
    if not text or any(x not in names for x in text.split(",")):
        raise argparse.ArgumentTypeError(f"expected below, above or below,above, got {text!r}")
    return [names[x] for x in text.split(",")]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="one seed, 1500 ridge steps, 600 digits steps")
    p.add_argument("--seeds", type=int, default=3,
                   help="seeds per setting (default 3; ridge-family ran one until December 5, which hid the runs "
                        "whose response started at a random pace: docs/trainer.md, \"The response's start and baseline\")")
    p.add_argument("--ridge-steps", type=int, default=3000)
    p.add_argument("--first-seed", type=int, default=0,
                   help="ridge, fashion and cnn: their seeds start here (first-seed .. first-seed + seeds - 1, "
                        "fashion-seeds, cnn-seeds; default 0)")
    p.add_argument("--sides", type=_sides, default=[-1, 1],
                   help="ridge: the starts, below and/or above (100x; default below,above)")
    p.add_argument("--digits-steps", type=int, default=3000)
    p.add_argument("--only", choices=["ridge", "ridge-family", "digits", "fashion", "cnn"], help="run one problem")
    p.add_argument("--family-size", type=int, default=8, help="ridge-family: instances (default 8)")
    p.add_argument("--family-seed", type=int, default=FAMILY_SEED, help="ridge-family: the generator's seed")
    p.add_argument("--instances", type=lambda s: s.split(","),
                   help="ridge-family: these of the family's instances only, e.g. i3,i5 (default all)")
    p.add_argument("--fashion-steps", type=int, default=4000)
    p.add_argument("--fashion-seeds", type=int, default=2)
    p.add_argument("--fashion-methods", type=lambda s: s.split(","),
                   help="fashion: these methods only (default all five; e.g. delta-stn with --set response_fit=...)")
    p.add_argument("--cnn-steps", type=int, default=CNN_SIZES["steps"])
    p.add_argument("--cnn-seeds", type=int, default=3)
    p.add_argument("--cnn-train-size", type=int, default=CNN_SIZES["train_size"])
    p.add_argument("--cnn-val-size", type=int, default=CNN_SIZES["val_size"])
    p.add_argument("--cnn-test-size", type=int, default=CNN_SIZES["test_size"],
                   help="cnn: the first N official test images (0: all 10k)")
    p.add_argument("--cnn-methods", type=lambda s: s.split(","), help="cnn: these methods only (default all five)")
    p.add_argument("--grid", action="store_true",
                   help="also run fixed dropout on a 12-point grid (seed 0, ~3 minutes): what fixed rates can reach")
    p.add_argument("--methods", type=lambda s: s.split(","), help="ridge: these methods only (default stn,delta-stn)")
    p.add_argument("--perturb", type=lambda s: s.split(","), help="ridge: these perturbation modes only (default batch,example)")
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                   help="a TrainConfig field for every run where the problem does not set it, e.g. --set tau=1e-3 "
                        "--set lr=0.03 (a Python literal); repeatable. inits and ranges merge into the problem's own "
                        "(--set inits=\"{'dropout': 0.5}\" starts the cnn protocol's rates at 0.5)")
    p.add_argument("--tag", default="", help="file names tuning-<date>-<tag>.* (default: tuning-<date>.*)")
    p.add_argument("--out", default=RESULTS, help="folder for the table, JSON and plot ('' for none)")
    a = p.parse_args(argv)
    if a.quick:
        a.seeds, a.ridge_steps, a.digits_steps = 1, 1500, 600
        # the cnn protocol end to end in seconds (--quick --only cnn; a plain --quick leaves it out, as fashion)
        a.cnn_seeds, a.cnn_steps, a.cnn_train_size, a.cnn_val_size, a.cnn_test_size = 1, 24, 512, 256, 256
    OVERRIDES.clear()
    OVERRIDES.update(_parse_sets(a.set))
    torch.set_num_threads(1)
    res = {"date": datetime.date.today().isoformat(), "torch": torch.__version__, "seeds": a.seeds, "set": dict(OVERRIDES),
           "config_defaults": {k: v for k, v in TrainConfig().__dict__.items() if not isinstance(v, (dict, tuple))}}
    text = []
    if a.only in (None, "ridge"):
        problem = Ridge()
        u_star = problem.log_optimum()
        res["ridge_log_optimum"] = u_star
        rows = []
        for m in a.methods or ("stn", "delta-stn"):
            for pert in a.perturb or ("batch", "example"):
                for side in a.sides:
                    for seed in range(a.first_seed, a.first_seed + a.seeds):
                        rows.append(ridge_run(problem, u_star, m, pert, side, seed, a.ridge_steps))
                        print(f"ridge {m} {pert} {rows[-1]['side']} seed {seed}: u - u* = {rows[-1]['u_minus_opt']:+.3f}",
                              file=sys.stderr, flush=True)
        res["ridge"] = rows
        text.append(ridge_table(rows, a.ridge_steps))
    if a.only == "ridge-family":
        instances, rejected = ridge_family(a.family_size, a.family_seed)
        unknown = set(a.instances or ()) - {q["name"] for q in instances}
        if unknown:
            p.error(f"--instances: no {', '.join(sorted(unknown))} among the family's {', '.join(q['name'] for q in instances)}")
        instances = [q for q in instances if not a.instances or q["name"] in a.instances]
        methods, modes = a.methods or ("stn", "delta-stn"), a.perturb or ("batch", "example")
        prov = run_provenance(methods, modes)
        rows = []
        t0 = time.perf_counter()
        for q in instances:
            problem = family_problem(q)
            for m in methods:
                for pert in modes:
                    for side in (1, -1):
                        for seed in range(a.seeds):
                            rows.append(dict(ridge_run(problem, q["log_opt"], m, pert, side, seed, a.ridge_steps,
                                                       details=True), instance=q["name"]))
                            r = rows[-1]
                            print(f"ridge-family {q['name']} {m} {pert} {r['side']} seed {seed}: u - u* = "
                                  f"{r['u_minus_opt']:+.3f}, recoveries {r['recoveries']}, {r['wall_s']:.1f} s",
                                  file=sys.stderr, flush=True)
        res["ridge_family"] = {"instances": instances, "rejected": rejected, "rows": rows, "provenance": prov,
                               "family_seed": a.family_seed, "steps": a.ridge_steps, "tolerance": RIDGE_TOL,
                               "within": sum(_within(r) for r in rows), "wall_s": time.perf_counter() - t0}
        text.append(ridge_family_table(instances, rejected, rows, a.ridge_steps, prov, a.family_seed, a.family_size))
    if a.only in (None, "digits"):
        data = digits_protocol()
        rows = []
        for m in DIGITS_METHODS:
            for seed in range(a.seeds):
                rows.append(digits_run(data, m, seed, a.digits_steps))
                print(f"digits {m} seed {seed}: best val {rows[-1]['best_val_loss']:.4f}", file=sys.stderr, flush=True)
        res["digits"] = rows
        text.append(digits_table(rows, a.digits_steps))
        if a.grid:
            res["digits_grid"] = digits_grid(data, a.digits_steps)
            text.append(grid_table(res["digits_grid"], a.digits_steps))
    if a.only == "fashion" or (a.only is None and not a.quick):
        from stn_ext.data import fashion_mnist

        try:
            data = fashion_mnist(train_size=10000)
        except FileNotFoundError as e:
            print(f"fashion: skipped: {e}", file=sys.stderr)
            data = None
        if data is not None:
            rows = []
            for seed in range(a.first_seed, a.first_seed + a.fashion_seeds):
                for m in a.fashion_methods or FASHION_METHODS:
                    rows.append(fashion_run(data, m, seed, a.fashion_steps))
                    print(f"fashion {m} seed {seed}: test loss {rows[-1]['test_loss']:.4f}", file=sys.stderr, flush=True)
            res["fashion"] = rows
            text.append(fashion_table(rows, a.fashion_steps))
    if a.only == "cnn" or (a.only is None and not a.quick):
        sizes = dict(CNN_SIZES, steps=a.cnn_steps, train_size=a.cnn_train_size, val_size=a.cnn_val_size,
                     test_size=a.cnn_test_size)
        try:
            data = fashion_cnn_protocol(a.cnn_train_size, a.cnn_val_size, a.cnn_test_size)
        except FileNotFoundError as e:
            print(f"cnn: skipped: {e}", file=sys.stderr)
            data = None
        if data is not None:
            rows = []
            t0 = time.perf_counter()
            for seed in range(a.first_seed, a.first_seed + a.cnn_seeds):
                for m in a.cnn_methods or CNN_METHODS:
                    rows.append(cnn_run(data, m, seed, a.cnn_steps))
                    r = rows[-1]
                    print(f"cnn {m} seed {seed}: test loss {r['test_loss']:.4f}, best val {r['best_val_loss']:.4f}, "
                          f"{r['train_s_per_step'] * 1e3:.1f} ms/step, {r['s_per_step'] * a.cnn_steps:.0f} s", file=sys.stderr,
                          flush=True)
            res["cnn"], res["cnn_protocol"] = rows, dict(sizes, wall_s=time.perf_counter() - t0)
            text.append(cnn_table(rows, a.cnn_steps, sizes))
    md = "\n\n".join(text)
    print(md)
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        tag = "tuning-quick" if a.quick else f"tuning-{res['date']}" + (f"-{a.tag}" if a.tag else "")
        settings = "TrainConfig defaults" + "".join(f", {k}={v!r}" for k, v in OVERRIDES.items())
        with open(os.path.join(a.out, tag + ".md"), "w") as f:
            f.write(f"# Tuning quality ({res['date']}, torch {res['torch']}, {settings})\n\n{md}\n")
        with open(os.path.join(a.out, tag + ".json"), "w") as f:
            json.dump(res, f, indent=1)
        if "ridge" in res:
            plot_ridge(res["ridge"], os.path.join(a.out, tag + "-ridge.png"))
        if "ridge_family" in res:
            plot_ridge_family(res["ridge_family"]["rows"], res["ridge_family"]["instances"],
                              os.path.join(a.out, tag + "-ridge-family.png"))
        if "fashion" in res:
            plot_fashion(res["fashion"], os.path.join(a.out, tag + "-fashion.png"))
        if "cnn" in res:
            plot_cnn(res["cnn"], os.path.join(a.out, tag + "-cnn.png"))
    return res


if __name__ == "__main__":
    main()
