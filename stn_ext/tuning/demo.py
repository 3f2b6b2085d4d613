"""``python -m stn_ext demo``: the README comparison of STN, Delta-STN, fixed hyperparameters and random
search on digits, every method and seed in its own run folder, with a table and a comparison figure."""
import argparse
import os
import sys
import time

from stn_ext.cli_parser import Parser
from stn_ext.tuning import options
from stn_ext.tuning.cli import ERRORS, _defaults, _ints, _set_threads, format_table, summarise


def build_demo_parser():
    p = Parser(
        prog="python -m stn_ext demo", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="The README demo: on scikit-learn's digits, STN and Delta-STN tune dropout rates and weight "
                    "decay during one training run; compared with fixed hyperparameters and random search at the "
                    "same number of weight steps. Prints validation/test loss and accuracy and wall time (mean +- "
                    "std over seeds). Sized to run in a few minutes on a laptop CPU.\n\n"
                    "Each run goes to --out/<method>_seed<k>; the demo owns these folders: a rerun replaces them. "
                    "Ctrl-C stops the demo after saving a checkpoint of the current run (exit 130); rerun the same "
                    "command with --resume to keep the finished runs and continue.")
    p.add_argument("--steps", type=int, default=1500, help="weight steps per method and seed (default 1500)")
    p.add_argument("--seeds", type=int, default=3, help="seeds per method (default 3)")
    p.add_argument("--methods", default="stn,delta-stn,fixed,random",
                   help="comma separated, from stn, delta-stn, fixed, random (default all four)")
    p.add_argument("--model", default="mlp", choices=["mlp", "cnn"], help="built-in model (default mlp)")
    p.add_argument("--hypers", default="dropout,weight_decay", help="as for train (default dropout,weight_decay)")
    p.add_argument("--train-size", type=int, default=300,
                   help="training examples (default 300: few enough that regularisation matters)")
    p.add_argument("--trials", type=int, default=4, help="random search trials (default 4)")
    p.add_argument("--hidden", type=_ints, default=(128, 128), help="MLP hidden widths (default 128,128)")
    p.add_argument("--lr", type=float, default=0.03, help="weight SGD learning rate (default 0.03, so that "
                   "random-search trials of steps/trials steps converge too)")
    d = _defaults()
    p.add_argument("--perturb", default=d.perturb, choices=options.PERTURBS,
                   help=f"auto: each method's own (default {d.perturb})")
    p.add_argument("--hyper-lr", type=float, default=d.hyper_lr,
                   help=f"Adam learning rate of the hyperparameters (default {d.hyper_lr})")
    p.add_argument("--warmup", type=int, default=d.warmup_steps,
                   help="weight steps before the response trains and the first hyper step (default -1: steps / 10)")
    p.add_argument("--out", default="runs/demo",
                   help="folder for the runs (default runs/demo; '' for none); a rerun replaces the runs in it")
    p.add_argument("--resume", action="store_true",
                   help="continue a demo stopped by Ctrl-C or kill: runs finished in --out are kept, the stopped "
                        "one resumes, the others run (same options as the stopped demo)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (0: torch's default; small models run fastest on 1) (default 1)")
    p.add_argument("--quiet", action="store_true", help="no progress bars or per-run lines (the table still prints)")
    return p


def _demo_runs(a):
    """Every run of the demo as (seed, method, TrainConfig), all checked before the first one starts."""
    from stn_ext import tuning as trainer

    methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    if not methods or len(set(methods)) != len(methods):
        raise ValueError(f"--methods must name each method once, got {a.methods!r}")
    if a.seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {a.seeds}")
    runs = []
    for seed in range(a.seeds):
        for m in methods:
            out = os.path.join(a.out, f"{m}_seed{seed}") if a.out else ""
            cfg = trainer.TrainConfig(
                method=m, model=a.model, hypers=a.hypers, steps=a.steps, train_size=a.train_size, perturb=a.perturb,
                random_trials=a.trials, seed=seed, out=out, quiet=a.quiet, hidden=a.hidden, lr=a.lr,
                hyper_lr=a.hyper_lr, warmup_steps=a.warmup, overwrite=bool(out))
            if a.resume and out and trainer.can_resume(cfg):
                cfg.resume, cfg.overwrite = True, False
            trainer.preflight(cfg)
            runs.append((seed, m, cfg))
    if a.resume and not any(cfg.resume for _, _, cfg in runs):
        raise FileNotFoundError(f"no demo runs in {a.out!r} to resume (is --out right?); for a new demo leave out "
                                "--resume")
    return runs


def _run_one(cfg):
    """The summary of a demo run: read back when a resumed run had finished, else trained (or resumed)."""
    from stn_ext import tuning as trainer

    if cfg.resume:
        done = trainer.finished_summary(cfg.out)
        if done:
            return done
    return trainer.train(cfg)


def demo(argv=None):
    a = build_demo_parser().parse_args(argv)
    _set_threads(a.threads)
    results, dirs, current = [], [], None
    t_all = time.perf_counter()
    try:
        for seed, m, cfg in _demo_runs(a):
            current = cfg
            t0 = time.perf_counter()
            s = _run_one(cfg)
            s["label"] = m
            if not s.get("complete", True):  # stopped by Ctrl-C / SIGTERM: the rest would not be comparable
                print(_demo_stopped_message(a, seed, m, s, len(results)), file=sys.stderr)
                return 130
            results.append(s)
            dirs.append(cfg.out)
            if not a.quiet:
                print(f"seed {seed} {m:<9} val_loss {s['val_loss']:.4f} val_acc {s.get('val_acc', 0):.3f} "
                      f"test_loss {s['test_loss']:.4f} test_acc {s.get('test_acc', 0):.3f} "
                      f"(train {s['wall_s']:.1f} s of {time.perf_counter() - t0:.1f} s) " +
                      " ".join(f"{k}={v:.3g}" for k, v in s["hypers"].items()), flush=True)
    except ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # between runs, or without --out (no signal handler, no checkpoint)
        where = f" during {current.method} seed {current.seed}" if current else ""
        tail = (f"; finished runs are in {a.out}: rerun with --resume to continue" if a.out and results else "")
        print(f"interrupted{where}{tail}", file=sys.stderr)
        return 130
    table = format_table(summarise(results), title=(
        f"\ndigits ({a.train_size or 'all'} training examples), {a.model}, tuning {a.hypers}; {a.steps} weight steps "
        f"per run (random search: {a.trials} trials x {a.steps // a.trials}); mean +- std over {a.seeds} seed(s)"))
    print(table)
    print(TIME_NOTE)
    print(f"total {time.perf_counter() - t_all:.0f} s")
    if a.out:
        from stn_ext.checkpoint import atomic_write_json, atomic_write_text

        atomic_write_json(os.path.join(a.out, "demo_results.json"), results)
        atomic_write_text(os.path.join(a.out, "demo_table.txt"), table + "\n")
        import importlib.util

        if importlib.util.find_spec("matplotlib"):
            from stn_ext.tuning.plots import plot_comparison

            plot_comparison(os.path.join(a.out, "comparison.png"), results, dirs)
            print(f"methods compared in {a.out}/comparison.png")
        print(f"runs, schedules and plots in {a.out}/<method>_seed<k>/")
    return 0


TIME_NOTE = ("train_s: seconds in weight and hyper steps (random search: its trials together). A run's own line "
             "gives it as 'train X s of Y s', Y adding evaluation, checkpoints and plots.")


def _demo_stopped_message(a, seed, method, s, n_finished):
    where = f" (in trial {s['trial']})" if "trial" in s else ""
    # only runs with a folder catch the signal (the others raise KeyboardInterrupt), so a.out is set
    return (f"demo stopped: {method} seed {seed} stopped at step {s['steps']} of {a.steps}{where}. Saved in "
            f"{a.out}: {n_finished} finished run(s) and the checkpoint of {method}_seed{seed}. Rerun the same "
            "command with --resume to continue.")


if __name__ == "__main__":
    sys.exit(demo())
