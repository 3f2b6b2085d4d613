"""Tuning quality of the trainer's defaults on problems with a known answer (issue 11).

ridge   one StnLinear(40, 1, bias=False) with its weight decay tuned (range 1e-4..1e4), full batch,
        started 100x above and 100x below the closed-form optimum (stn_ext.tuning.problems.Ridge); every
        method (stn, delta-stn) and perturbation mode (batch, example), 3 seeds; reports |u - u*| in
        log units after --ridge-steps weight steps, and whether any run ended non-finite.
fashion Fashion-MNIST (stn_ext.data.fashion_mnist: a 10k training subset, 10k validation images from the
        training set, the official 10k test set), MLP 784-256-256-10 with three dropout rates from 0.05,
        batch 100, --fashion-steps weight steps: fixed, random search and Optuna's TPE (4 trials each,
        splitting the same steps), stn, delta-stn, 2 seeds; final test loss, and the tuned schedules
        plotted (tuning-<date>-fashion.png). Skipped, with a note, where the IDX files are not installed.
digits  the 1000/400/397 protocol (stn_ext.tuning.problems.digits_protocol), MLP 64-256-256-10 with three
        dropout rates from 0.05, batch 100, --digits-steps weight steps: fixed, random search (4 trials
        splitting the same steps), stn, delta-stn; best and final validation loss, test loss, seconds per
        weight step relative to fixed.

Everything runs with TrainConfig's defaults except what the problem sets (hyperparameter, range, start,
steps, batch size, perturbation mode). Writes bench/results/tuning-<date>.{md,json} and
tuning-ridge-<date>.png (u - u* against weight steps).

    python bench/bench_tuning.py                      # ~17 minutes on one core (fashion ~10 of them)
    python bench/bench_tuning.py --quick              # one seed, fewer steps (what the test runs)
"""
import argparse
import datetime
import json
import math
import os
import sys
import time
import warnings

import torch

from stn_ext.checkpoint import atomic_write_text
from stn_ext.tuning.problems import Ridge, digits_mlp, digits_protocol
from stn_ext.tuning import TrainConfig, Trainer, train

DIGITS_METHODS = ("fixed", "random", "stn (no hyper steps)", "stn", "delta-stn")
FASHION_METHODS = ("fixed", "random", "tpe", "stn", "delta-stn")
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
OVERRIDES = {}  # --set NAME=VALUE: TrainConfig fields a problem does not set itself (to measure an alternative)


def config(**settings):
    """The run's TrainConfig: the defaults, then --set, then what the problem itself sets."""
    return TrainConfig(**{**OVERRIDES, **settings})


def ridge_run(problem, u_star, method, perturb, side, seed, steps):
    cfg = config(method=method, hypers=("weight_decay",), ranges={"weight_decay": (1e-4, 1e4)},
                 inits={"weight_decay": math.exp(u_star + side * math.log(100))}, steps=steps,
                 batch_size=problem.n_train, perturb=perturb, seed=seed, quiet=True)
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
    return {"method": method, "perturb": perturb, "side": "above" if side > 0 else "below", "seed": seed,
            "u_minus_opt": u - u_star, "finite": math.isfinite(u), "error": error, "recoveries": tr.recoveries,
            "sigma": tr.sigmas()["weight_decay"], "diverged_warnings": sum("diverged" in str(w.message) for w in caught),
            "trajectory": traj}


def digits_config(method, seed, steps, **settings):
    """The digits protocol's TrainConfig: three dropout rates, batch 100, ~60 evaluations a run."""
    return config(method=method, hypers=("dropout",), steps=steps, batch_size=100, seed=seed, quiet=True,
                  eval_every=max(10, steps // 60), **settings)


def write_results(name, lines):
    """A markdown table of bench/results, written whole or not at all."""
    path = os.path.join(RESULTS, name)
    atomic_write_text(path, "\n".join(lines) + "\n")
    print("wrote", path)


def digits_run(data, method, seed, steps, inits=None):
    # "stn (no hyper steps)": STN's parameterisation with the hyperparameters frozen at their start, the
    # control that separates what the schedule earns from what the hypernet's extra gate does
    frozen = method == "stn (no hyper steps)"
    cfg = digits_config("stn" if frozen else method, seed, steps, inits=dict(inits or {}),
                        **({"hyper_lr": 0.0} if frozen else {}))
    torch.manual_seed(seed)
    t = time.perf_counter()
    if method == "random":
        s = train(cfg, data=data, model=lambda: digits_mlp(3))
        best = min(s["trial_val_losses"])
    else:
        tr = Trainer(cfg, data=data, model=digits_mlp(3))
        s = tr.fit()
        best = min(e["val_loss"] for e in tr.log.epochs)
    wall = time.perf_counter() - t
    return {"method": method, "seed": seed, "best_val_loss": best, "val_loss": s["val_loss"], "test_loss": s["test_loss"],
            "test_acc": s.get("test_acc"), "s_per_step": wall / steps, "hypers": s["hypers"], "sigmas": s.get("sigmas")}


def fashion_run(data, method, seed, steps):
    from stn_ext.tuning.models import mlp

    cfg = config(method=method, hypers=("dropout",), steps=steps, batch_size=100, seed=seed, quiet=True,
                 eval_every=max(10, steps // 40), plots=False)
    model = lambda: mlp(784, 10, 3, (256, 256))  # noqa: E731
    torch.manual_seed(seed)
    t = time.perf_counter()
    traj = []
    if method in ("random", "tpe"):
        s = train(cfg, data=data, model=model)
    else:
        tr = Trainer(cfg, data=data, model=model())
        s = tr.fit()
        traj = [(r["step"], r["hypers"]) for r in tr.log.steps[::20]]
    return {"method": method, "seed": seed, "test_loss": s["test_loss"], "test_acc": s.get("test_acc"),
            "val_loss": s["val_loss"], "s_per_step": (time.perf_counter() - t) / steps, "hypers": s["hypers"],
            "trial_hypers": s.get("trial_hypers"), "trajectory": traj}


def fashion_table(rows, steps):
    fixed = _mean([r["s_per_step"] for r in rows if r["method"] == "fixed"])
    out = [f"Fashion-MNIST (10k training subset, 10k validation from the training set, official test set), MLP "
           f"784-256-256-10, three dropout rates from 0.05, {steps} weight steps, batch 100 (random, tpe: 4 trials "
           f"of {steps // 4} steps; the trial with the best final validation loss is reported).", "",
           "| method | test loss (mean) | per seed | test acc | final val loss | time/step vs fixed | final rates (seed 0) |",
           "|---|---|---|---|---|---|---|"]
    return "\n".join(out + _method_rows(rows, FASHION_METHODS, lambda rs: [
        f"{_mean([r['test_loss'] for r in rs]):.4f}", ", ".join("%.4f" % r["test_loss"] for r in rs),
        f"{_mean([r['test_acc'] for r in rs]):.3f}", f"{_mean([r['val_loss'] for r in rs]):.4f}",
        f"{_mean([r['s_per_step'] for r in rs]) / fixed:.2f}x", ", ".join(f"{v:.2f}" for v in rs[0]["hypers"].values())]))


def plot_fashion(rows, path):
    """The tuned dropout schedules (stn, delta-stn; one line per seed) beside the values the baselines used."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(rows[0]["hypers"])
    fig, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 3.4), sharey=True, squeeze=False)
    colours = {m: f"C{i}" for i, m in enumerate(FASHION_METHODS)}
    steps = max((t[-1][0] for r in rows if r["trajectory"] for t in [r["trajectory"]]), default=1)
    for ax, n in zip(axes[0], names):
        for r in rows:
            label = r["method"] if r["seed"] == 0 else None
            if r["trajectory"]:
                xs, hs = zip(*r["trajectory"])
                ax.plot(xs, [h[n] for h in hs], color=colours[r["method"]], lw=1, label=label)
            else:
                ax.hlines(r["hypers"][n], 0, steps, colors=colours[r["method"]], linestyles="--", lw=1, label=label)
        ax.set(title=n, xlabel="weight step")
    axes[0, 0].set_ylabel("dropout rate")
    axes[0, 0].legend(fontsize=7)
    fig.suptitle("Fashion-MNIST: tuned dropout schedules (lines) and the baselines' rates (dashed: fixed, best trial)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


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
    out = [f"Ridge (d=40, n=50, noise 1; optimum wd* from the closed form), |u - u*| in log units after {steps} "
           "weight steps, per seed; `x` marks a run that stopped (Diverged) or ended non-finite.", "",
           "| method | perturb | start | seeds | max | recoveries |", "|---|---|---|---|---|---|"]
    keys = sorted({(r["method"], r["perturb"], r["side"]) for r in rows})
    for m, p, side in keys:
        rs = [r for r in rows if (r["method"], r["perturb"], r["side"]) == (m, p, side)]
        cells = [("x " if r["error"] or not r["finite"] else "") + f"{abs(r['u_minus_opt']):.3f}" for r in rs]
        out.append(f"| {m} | {p} | 100x {side} | {', '.join(cells)} | {max(abs(r['u_minus_opt']) for r in rs):.3f} | "
                   f"{sum(r['recoveries'] for r in rs)} |")
    return "\n".join(out)


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


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="one seed, 1500 ridge steps, 600 digits steps")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--ridge-steps", type=int, default=3000)
    p.add_argument("--digits-steps", type=int, default=3000)
    p.add_argument("--only", choices=["ridge", "digits", "fashion"], help="run one problem")
    p.add_argument("--fashion-steps", type=int, default=4000)
    p.add_argument("--fashion-seeds", type=int, default=2)
    p.add_argument("--grid", action="store_true",
                   help="also run fixed dropout on a 12-point grid (seed 0, ~3 minutes): what fixed rates can reach")
    p.add_argument("--methods", type=lambda s: s.split(","), help="ridge: these methods only (default stn,delta-stn)")
    p.add_argument("--perturb", type=lambda s: s.split(","), help="ridge: these perturbation modes only (default batch,example)")
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                   help="a TrainConfig field for every run where the problem does not set it, e.g. --set tau=1e-3 "
                        "--set lr=0.03 (a Python literal); repeatable")
    p.add_argument("--tag", default="", help="file names tuning-<date>-<tag>.* (default: tuning-<date>.*)")
    p.add_argument("--out", default=RESULTS, help="folder for the table, JSON and plot ('' for none)")
    a = p.parse_args(argv)
    if a.quick:
        a.seeds, a.ridge_steps, a.digits_steps = 1, 1500, 600
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
                for side in (-1, 1):
                    for seed in range(a.seeds):
                        rows.append(ridge_run(problem, u_star, m, pert, side, seed, a.ridge_steps))
                        print(f"ridge {m} {pert} {rows[-1]['side']} seed {seed}: u - u* = {rows[-1]['u_minus_opt']:+.3f}",
                              file=sys.stderr, flush=True)
        res["ridge"] = rows
        text.append(ridge_table(rows, a.ridge_steps))
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
            for seed in range(a.fashion_seeds):
                for m in FASHION_METHODS:
                    rows.append(fashion_run(data, m, seed, a.fashion_steps))
                    print(f"fashion {m} seed {seed}: test loss {rows[-1]['test_loss']:.4f}", file=sys.stderr, flush=True)
            res["fashion"] = rows
            text.append(fashion_table(rows, a.fashion_steps))
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
        if "fashion" in res:
            plot_fashion(res["fashion"], os.path.join(a.out, tag + "-fashion.png"))
    return res


if __name__ == "__main__":
    main()
