"""One tuned run against the searches users run instead (issue 25): best validation loss found so far against
wall-clock time and against total weight steps.

Methods, on each protocol and seed:
  fixed        one run at the protocol's start values (dropout 0.05, cutout 4 / 1)
  stn          one self-tuning run (TrainConfig defaults)
  delta-stn    one self-tuning run (TrainConfig defaults)
  random       Optuna's random sampler, --trials full-length trials over --workers worker processes (one study on
               SQLite in the run folder, as `--method random --trial-steps N --workers W` runs it)
  tpe          Optuna's TPE (a quarter of the trials random first, the constant liar across workers), the same
  tpe+median   tpe with Optuna's median pruner on each evaluation's validation loss
All use the same machine: the one-process runs with --workers torch threads, each search worker with one thread.

Protocols (as bench_tuning.py's, same data, model, steps, batch and evaluation interval):
  fashion  Fashion-MNIST 10k training subset / 10k validation / official test, MLP 784-256-256-10, three dropout
           rates, 4000 steps of batch 100, 40 evaluations
  cnn      the Delta-STN code's CNN experiment sized for this machine (problems.fashion_cnn_protocol): 5k / 2k /
           10k, four dropout rates and cutout length and holes, 1500 steps of batch 128, 10 evaluations

"Best validation loss so far" counts every evaluation of every run or trial (pruned trials' too: a user keeps the
best checkpoint), known at the time stamp the trainer logs with it; the chosen model of a method is that
evaluation, and its test loss is reported. The table also gives Optuna's own choice for the searches (the
complete trial with the lowest final validation loss) and its test loss. Weight steps: all steps taken by then,
summed over trials running in parallel (interpolated between their evaluations).

Writes bench/results/anytime-<date>[-tag].{md,json} and anytime-<date>[-tag]-<protocol>.png. Every finished run
is saved to the JSON at once; --resume skips the runs it holds (a search cut short runs again whole).

    python bench/bench_anytime.py                  # both protocols, 2 seeds, 16 trials over 2 workers (~90 min here)
    python bench/bench_anytime.py --only fashion   # ~25 minutes on this 2-core machine
    python bench/bench_anytime.py --quick          # seconds-sized data and steps (what the test runs)
"""
import argparse
import bisect
import datetime
import functools
import json
import math
import os
import shutil
import sys
import tempfile
import time

import torch

from stn_ext.checkpoint import atomic_write_json, atomic_write_text
from stn_ext.tuning import TrainConfig, Trainer, train
from stn_ext.tuning.models import mlp
from stn_ext.tuning.problems import CNN_HYPERS, CNN_INITS, CNN_RANGES, CNN_SIZES, fashion_cnn, fashion_cnn_protocol

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
TUNED = ("fixed", "stn", "delta-stn")
SEARCHES = {"random": ("random", "none"), "tpe": ("tpe", "none"), "tpe+median": ("tpe", "median")}
METHODS = TUNED + tuple(SEARCHES)


def protocols(quick):
    """name -> (data loader, model factory (picklable: the workers are spawned), TrainConfig fields)."""
    from stn_ext.data import fashion_mnist

    f_sizes = dict(train_size=1000, val_size=1000) if quick else dict(train_size=10000)
    c_sizes = (512, 256, 256) if quick else (CNN_SIZES["train_size"], CNN_SIZES["val_size"], CNN_SIZES["test_size"])
    f_steps, c_steps = (40, 24) if quick else (4000, CNN_SIZES["steps"])
    return {
        "fashion": (lambda: fashion_mnist(**f_sizes), functools.partial(mlp, 784, 10, 3, (256, 256)),
                    dict(hypers=("dropout",), steps=f_steps, batch_size=100, eval_every=max(10, f_steps // 40))),
        "cnn": (lambda: fashion_cnn_protocol(*c_sizes), functools.partial(fashion_cnn, len(CNN_RANGES) + 4),
                dict(hypers=CNN_HYPERS, ranges=dict(CNN_RANGES), inits=dict(CNN_INITS), steps=c_steps,
                     batch_size=CNN_SIZES["batch_size"], eval_every=max(10, c_steps // 10))),
    }


def _evals(path):
    """The evaluation records of a run folder (step > 0: the untrained model is nobody's choice)."""
    with open(os.path.join(path, "epochs.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["step"] > 0]


def tuned_run(data, model_fn, settings, method, seed, out, threads):
    """One fixed / stn / delta-stn run: its evaluations as events (seconds since start, steps so far, val, test)."""
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    t0 = time.time()
    cfg = TrainConfig(method=method, seed=seed, out=out, overwrite=True, quiet=True, plots=False, **settings)
    s = Trainer(cfg, data=data, model=model_fn()).fit()
    events = [(r["time"] - t0, r["step"], r["val_loss"], r["test_loss"]) for r in _evals(out)]
    return {"events": events, "elapsed_s": time.time() - t0, "steps": s["steps"], "final_val": s["val_loss"],
            "final_test": s["test_loss"], "hypers": s["hypers"]}


def _steps_by(curves, t):
    """Weight steps all trials had taken by time t: each trial's (time, step) curve, linear between points."""
    total = 0.0
    for ts, ss in curves:
        if t <= ts[0]:
            continue
        k = bisect.bisect_right(ts, t)
        if k == len(ts):
            total += ss[-1]
        else:
            total += ss[k - 1] + (ss[k] - ss[k - 1]) * (t - ts[k - 1]) / max(ts[k] - ts[k - 1], 1e-9)
    return total


def search_run(data, model_fn, settings, method, seed, out, trials, workers):
    """A search as users run it: an Optuna study of ``trials`` full-length trials over ``workers`` processes."""
    from stn_ext.tuning.study import load_study

    sampler, pruner = SEARCHES[method]
    steps = settings["steps"]
    cfg = TrainConfig(method=sampler, seed=seed, out=out, overwrite=True, quiet=True, plots=False, trial_steps=steps,
                      random_trials=trials, workers=workers, worker_threads=1, pruner=pruner, **settings)
    t0 = time.time()
    s = train(cfg, data=data, model=model_fn)
    elapsed = time.time() - t0
    study = load_study(cfg)
    curves, events, records = [], [], []
    for t in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number):
        folder = os.path.join(out, f"trial_{t.number}")
        if t.state.name not in ("COMPLETE", "PRUNED") or not os.path.exists(os.path.join(folder, "epochs.jsonl")):
            continue
        evs = _evals(folder)
        start = t.datetime_start.timestamp() - t0
        curves.append(([start] + [r["time"] - t0 for r in evs], [0] + [r["step"] for r in evs]))
        events += [(r["time"] - t0, r["val_loss"], r["test_loss"]) for r in evs]
        records.append({"number": t.number, "state": t.state.name, "steps": evs[-1]["step"] if evs else 0,
                        "final_val": evs[-1]["val_loss"] if evs else None, "params": dict(t.params)})
    events = [(t, _steps_by(curves, t), v, te) for t, v, te in sorted(events)]
    return {"events": events, "elapsed_s": elapsed, "steps": s["steps"], "final_val": s["val_loss"],
            "final_test": s["test_loss"], "hypers": s["hypers"], "trials": records, "states": s["states"]}


def incumbent(events):
    """Best-so-far curve: (time, steps, best val, test of that model) at each improvement, in time order."""
    out, best = [], math.inf
    for t, st, v, te in sorted(events):
        if v < best:
            best = v
            out.append((t, st, v, te))
    return out


def best_at(events, key, budget):
    """The best validation loss among events with ``key`` (0: time, 1: steps) <= budget (inf if none)."""
    return min((e[2] for e in events if e[key] <= budget), default=math.inf)


def catch_up(events, target):
    """The first event (time, steps) at which ``events`` reach a validation loss <= target, else None."""
    for t, st, v, _ in sorted(events):
        if v <= target:
            return t, st
    return None


def _mean(xs):
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    return sum(xs) / len(xs) if xs else math.nan


def summarise(runs, protocol):
    """Per method: best val (any evaluation), its model's test loss, Optuna-style final choice, budget."""
    rows = {}
    for m in METHODS:
        rs = [r for r in runs if r["protocol"] == protocol and r["method"] == m]
        if not rs:
            continue
        inc = [incumbent(r["events"])[-1] for r in rs]
        rows[m] = {"seeds": [r["seed"] for r in rs], "best_val": [i[2] for i in inc], "best_test": [i[3] for i in inc],
                   "final_val": [r["final_val"] for r in rs], "final_test": [r["final_test"] for r in rs],
                   "steps": [r["events"][-1][1] for r in rs], "elapsed_s": [r["elapsed_s"] for r in rs]}
    return rows


def goal_lines(runs, protocol):
    """Per seed and tuned method: TPE's best val within 10x the tuned run's wall-clock and weight steps, and the
    budget (as a multiple of the tuned run's) at which each search first matches the tuned run's best."""
    lines = []
    for seed in sorted({r["seed"] for r in runs if r["protocol"] == protocol}):
        by = {r["method"]: r for r in runs if r["protocol"] == protocol and r["seed"] == seed}
        for m in ("stn", "delta-stn"):
            if m not in by:
                continue
            tuned = by[m]
            best = incumbent(tuned["events"])[-1][2]
            T, S = tuned["elapsed_s"], tuned["events"][-1][1]
            parts = []
            for q in SEARCHES:
                if q not in by:
                    continue
                ev = by[q]["events"]
                at = catch_up(ev, best)
                when = (f"matches it at {at[0] / T:.1f}x its wall-clock, {at[1] / S:.1f}x its weight steps" if at
                        else "never matches it")
                parts.append(f"{q}: {best_at(ev, 0, 10 * T):.4f} within 10x its wall-clock, "
                             f"{best_at(ev, 1, 10 * S):.4f} within 10x its steps, {when}")
            lines.append(f"- seed {seed}, {m} best val {best:.4f} ({T:.0f} s, {S:.0f} steps). " + "; ".join(parts))
    return lines


def table(runs, protocol, meta):
    rows = summarise(runs, protocol)
    f = lambda xs, d=4: f"{_mean(xs):.{d}f}"  # noqa: E731
    per = lambda xs: ", ".join(f"{x:.4f}" for x in xs)  # noqa: E731
    out = [f"### {protocol}: {meta['describe']}", "",
           "| method | best val (mean) | per seed | test loss of that model | per seed | final choice: val | test | "
           "weight steps | wall-clock s |", "|---|---|---|---|---|---|---|---|---|"]
    for m, r in rows.items():
        out.append(f"| {m} | {f(r['best_val'])} | {per(r['best_val'])} | {f(r['best_test'])} | {per(r['best_test'])} | "
                   f"{f(r['final_val'])} | {f(r['final_test'])} | {f(r['steps'], 0)} | {f(r['elapsed_s'], 0)} |")
    out += ["", "The searches against one tuned run, per seed:", ""] + goal_lines(runs, protocol)
    return "\n".join(out)


def plot(runs, protocol, path):
    """Best validation loss so far against wall-clock (left) and weight steps (right), one line per method and seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    colours = {m: f"C{i}" for i, m in enumerate(METHODS)}
    vals = []
    for r in (r for r in runs if r["protocol"] == protocol):
        inc = incumbent(r["events"])
        if not inc:
            continue
        end = (r["elapsed_s"], r["events"][-1][1])
        for ax, k in zip(axes, (0, 1)):
            xs = [i[k] for i in inc] + [max(end[k], inc[-1][k])]
            ys = [i[2] for i in inc] + [inc[-1][2]]
            ax.plot(xs, ys, drawstyle="steps-post", color=colours[r["method"]], lw=1.2,
                    ls="-" if r["seed"] == 0 else "--", label=f"{r['method']} seed {r['seed']}")
        vals += [i[2] for i in inc]
    lo, hi = min(vals), sorted(vals)[int(0.8 * (len(vals) - 1))]  # the tail of early, bad trials off the top
    for ax, name in zip(axes, ("wall-clock seconds (this machine, 2 cores)", "weight steps (all trials)")):
        ax.set(xscale="log", xlabel=name)
        ax.set_ylim(lo - 0.02 * (hi - lo + 1e-3), hi + 0.05 * (hi - lo + 1e-3))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("best validation loss so far")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=6, fontsize=7)
    fig.suptitle(f"{protocol}: one tuned run against the searches (solid: seed 0, dashed: seed 1)")
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", choices=["fashion", "cnn"], help="one protocol (default both)")
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--trials", type=int, default=16, help="full-length trials per search (default 16)")
    p.add_argument("--workers", type=int, default=2, help="search worker processes, and torch threads of the "
                                                           "one-process runs (default 2)")
    p.add_argument("--methods", type=lambda s: s.split(","), default=list(METHODS),
                   help="these methods only (default: " + ",".join(METHODS) + ")")
    p.add_argument("--quick", action="store_true", help="tiny data and steps, 4 trials, one seed")
    p.add_argument("--tag", default="")
    p.add_argument("--out", default=RESULTS, help="folder for the table, JSON and figures")
    p.add_argument("--work", default="", help="folder for the runs' folders (default: a temporary one, removed)")
    p.add_argument("--resume", action="store_true", help="keep the runs the JSON already holds")
    a = p.parse_args(argv)
    bad = set(a.methods) - set(METHODS)
    if bad:
        p.error(f"unknown methods {sorted(bad)}; choose from {', '.join(METHODS)}")
    if a.quick:
        a.seeds, a.trials = 1, 4
    stem = "anytime-" + ("quick" if a.quick else datetime.date.today().isoformat()) + (f"-{a.tag}" if a.tag else "")
    json_path = os.path.join(a.out, stem + ".json")
    res = {"date": datetime.date.today().isoformat(), "torch": torch.__version__, "trials": a.trials,
           "workers": a.workers, "seeds": a.seeds, "quick": a.quick, "runs": [], "protocols": {}}
    if a.resume and os.path.exists(json_path):
        with open(json_path) as f:
            res["runs"] = json.load(f)["runs"]
    work = a.work or tempfile.mkdtemp(prefix="stn_anytime_")
    os.makedirs(a.out, exist_ok=True)
    text = [f"# One tuned run against the searches ({res['date']}, torch {res['torch']})", "",
            f"Searches: {a.trials} full-length trials over {a.workers} worker processes (one thread each); fixed, stn "
            f"and delta-stn: one process with {a.workers} threads. Best validation loss: the lowest of every "
            "evaluation so far (pruned trials' too); its model's test loss beside it. Final choice: Optuna's (the "
            "complete trial with the lowest final validation loss) and the tuned runs' last evaluation.", ""]
    try:
        for name, (load, model_fn, settings) in protocols(a.quick).items():
            if a.only and name != a.only:
                continue
            try:
                data = load()
            except FileNotFoundError as e:
                print(f"{name}: skipped: {e}", file=sys.stderr)
                continue
            res["protocols"][name] = {"describe": _describe(name, settings, data), **{
                k: v for k, v in settings.items() if k in ("steps", "batch_size", "eval_every")}}
            for seed in range(a.seeds):
                for m in (m for m in METHODS if m in a.methods):
                    if any(r["protocol"] == name and r["method"] == m and r["seed"] == seed for r in res["runs"]):
                        continue
                    out = os.path.join(work, name, f"{m}-seed{seed}")
                    if m in SEARCHES:
                        r = search_run(data, model_fn, settings, m, seed, out, a.trials, a.workers)
                    else:
                        r = tuned_run(data, model_fn, settings, m, seed, out, a.workers)
                    r.update(protocol=name, method=m, seed=seed)
                    res["runs"].append(r)
                    atomic_write_json(json_path, res)
                    best = incumbent(r["events"])[-1]
                    print(f"{name} {m} seed {seed}: best val {best[2]:.4f} (test {best[3]:.4f}), "
                          f"{r['elapsed_s']:.0f} s, {r['events'][-1][1]:.0f} steps", file=sys.stderr, flush=True)
            text += [table(res["runs"], name, res["protocols"][name]), ""]
            plot(res["runs"], name, os.path.join(a.out, f"{stem}-{name}.png"))
    finally:
        if not a.work:
            shutil.rmtree(work, ignore_errors=True)
    atomic_write_json(json_path, res)
    atomic_write_text(os.path.join(a.out, stem + ".md"), "\n".join(text) + "\n")
    print("wrote", os.path.join(a.out, stem + ".md"))
    return res


def _describe(name, settings, data):
    sizes = f"{len(data.train.x)} / {len(data.val.x)} / {len(data.test.x)} images (train / val / test)"
    model = "MLP 784-256-256-10, three dropout rates" if name == "fashion" else \
        "conv 16 - conv 32 - FC 256 - 10, four dropout rates, cutout length and holes"
    return f"{model}; {sizes}; {settings['steps']} weight steps of batch {settings['batch_size']} per run or trial"


if __name__ == "__main__":
    main()
