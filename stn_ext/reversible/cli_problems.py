"""``python -m stn_ext reversible --problem schedules|l2|distill``: the paper's experiments by exact hypergradients.

Each meta-iteration trains the problem's model T steps by exact reversible SGD with momentum
(:func:`stn_ext.reversible.train_and_evaluate`), runs the training backwards bit for bit for the gradient
of the validation loss w.r.t. every hyperparameter and takes an Adam step on them
(:func:`stn_ext.reversible.meta.meta_optimize`: checkpoint after every meta-iteration, resume, chaos stop).
At the end it trains once more at the learned hyperparameters and reports the validation and test
loss and accuracy, and draws the figure.
"""
import argparse
import math
import os
import sys

import torch

from stn_ext import checkpoint
from stn_ext.cli_parser import Parser
from stn_ext.reversible.cli import _HelpFormatter, _ranged
from stn_ext.reversible.examples import DEFAULTS, PROBLEMS, make_problem
from stn_ext.reversible.meta import ChaosRule, meta_optimize

RESUME_FREE = ("meta_iters", "out", "resume", "quiet", "no_plot", "data_path")

DESCRIPTION = """\
The experiments of Maclaurin, Duvenaud & Adams (2015) with exact hypergradients through reversed training:
  schedules  a 784-50-50-50-10 tanh MLP (64-... on digits); per-step learning rate and momentum for
             each layer's weights and biases, and an initialisation scale per tensor (T x 8 x 2 + 8
             hyperparameters); defaults: T = 100, batch 200, 10,000 training images, 50 meta-iterations
             (about 1.7 s each on one CPU thread with Fashion-MNIST)
  l2         logistic regression with an L2 strength per weight (10 x 784), learned in log space;
             T = 100, batch 200, 1,000 training images, 50 meta-iterations (0.6 s each)
  distill    logistic regression trained for T = 20 steps on ten learned images (one per class),
             which the validation loss on real images shapes; 40 meta-iterations (0.15 s each)
Adam on the hyperparameters (their log / logit / pixel values), a fresh training seed (batch order,
initial noise) every meta-iteration unless --same-seed. Without --problem and --data the command runs
the original digits MLP (see `python -m stn_ext reversible --help`)."""

EPILOG = """\
outputs in --out, rewritten atomically after every meta-iteration: state.pt (hyperparameters, Adam's
state, history; for --resume), meta_history.csv (per meta-iteration: validation objective, meta-gradient
norm, validation and test loss and accuracy, seed, seconds), summary.json; at the end result.json
(final validation and test loss/accuracy at the learned hyperparameters) and PROBLEM.png.
Chaos stop: when the meta-gradient norm's least-squares trend (log scale) over the last --chaos-window
meta-iterations grows by --chaos-factor or more, training has turned chaotic (the paper's Fig. 10) and
the run stops with that message (0 disables). Ctrl-C keeps the finished meta-iterations, exits 130;
rerun with --resume (a larger --meta-iters also extends a finished run).

examples:
  python -m stn_ext reversible --problem schedules --data fashion-mnist --out runs/schedules
  python -m stn_ext reversible --problem distill --data digits --meta-iters 20 --out runs/distill
  python -m stn_ext reversible --problem schedules --data fashion-mnist --out runs/schedules --resume
"""


def build_parser():
    p = Parser(prog="python -m stn_ext reversible --problem", description=DESCRIPTION, epilog=EPILOG,
               formatter_class=_HelpFormatter)
    p.add_argument("--problem", choices=PROBLEMS, default="schedules", help="the experiment")
    p.add_argument("--data", choices=("fashion-mnist", "digits"), default="digits",
                   help="Fashion-MNIST (28x28, installed separately: see stn_ext.data) or scikit-learn's digits "
                        "(8x8, 1797 images split 60/20/20: sizes above the split are capped)")
    p.add_argument("--data-path", default=None, help="folder of Fashion-MNIST's IDX files (default: searched)")
    p.add_argument("--meta-iters", type=_ranged(int, 1), default=None,
                   help="meta-iterations (default per problem: 50, 50, 40); with --resume, the total")
    p.add_argument("--meta-lr", type=_ranged(float, 0, low_open=True), default=None,
                   help="Adam's step size on the hyperparameters (default per problem: 0.04, 0.1, 0.05)")
    p.add_argument("--steps", type=_ranged(int, 1), default=None, help="training steps T (default 100, 100, 20)")
    p.add_argument("--batch", type=_ranged(int, 1), default=None, help="minibatch (default 200; distill: the 10 images)")
    p.add_argument("--train-size", type=_ranged(int, 1), default=None,
                   help="training images (default 10000, 1000; distill uses none)")
    p.add_argument("--val-size", type=_ranged(int, 1), default=None, help="validation images (default 10000)")
    p.add_argument("--test-size", type=_ranged(int, 1), default=None, help="test images (default: all)")
    p.add_argument("--hidden", type=_ranged(int, 1), nargs="+", default=[50, 50, 50],
                   help="schedules: hidden layer widths")
    p.add_argument("--lr", type=_ranged(float, 0, low_open=True), default=None,
                   help="starting learning rate of every step (default 0.3)")
    p.add_argument("--momentum", type=_ranged(float, 0, 1, True, True), default=None,
                   help="starting momentum of every step (default 0.9)")
    p.add_argument("--init-scale", type=_ranged(float, 0, low_open=True), default=None,
                   help="schedules: starting init scale of every tensor (default 0.1)")
    p.add_argument("--l2", type=_ranged(float, 0, low_open=True), default=None,
                   help="l2: starting L2 strength of every weight (default 1e-3)")
    p.add_argument("--seed", type=_ranged(int, 0, 2**31 - 1), default=0,
                   help="seed of the data split; training seed of meta-iteration k: seed + k")
    p.add_argument("--same-seed", action="store_true",
                   help="train with the same seed (batches, initial noise) every meta-iteration")
    p.add_argument("--chaos-window", type=_ranged(int, 0), default=8,
                   help="meta-iterations over which the meta-gradient norm's growth is measured (0: never stop)")
    p.add_argument("--chaos-factor", type=_ranged(float, 1, low_open=True), default=10.0,
                   help="stop when the norm's trend grows by this factor or more within the window")
    p.add_argument("--out", default="runs/reversible-problem", help="output folder")
    p.add_argument("--resume", action="store_true", help="continue the run saved in --out (same settings)")
    p.add_argument("--no-plot", action="store_true", help="skip the figure")
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    return p


def settings(args):
    """The problem's settings: the options given, else the problem's defaults."""
    d = dict(DEFAULTS[args.problem])
    for k in ("steps", "batch", "train_size", "val_size", "meta_iters", "meta_lr", "lr", "momentum", "init_scale",
              "l2"):
        if getattr(args, k) is not None:
            d[k] = getattr(args, k)
    if args.problem == "distill":
        d["batch"] = 10
    return d


def build(args):
    s = settings(args)
    kw = {k: v for k, v in s.items() if k not in ("meta_iters", "meta_lr")}
    problem = make_problem(args.problem, args.data, seed=args.seed, data_path=args.data_path,
                           test_size=args.test_size, hidden=tuple(args.hidden), **kw)
    return problem, s


def final_report(problem, hypers, seed):
    """Train once more (forward only) at ``hypers`` and measure the weights on validation and test."""
    with torch.no_grad():
        _, weights = problem.run(hypers, seed)
    out = {}
    for split in ("val", "test"):
        out[f"{split}_loss"], out[f"{split}_acc"] = problem.metrics(weights, split)
    return out


def _title(args, s, problem, history):
    n = sum(h.numel() for h in problem.hypers.values())
    return (f"{args.problem} on {args.data}: {n:,} hyperparameters, T = {s['steps']}, "
            f"{len(problem.ytr):,} training images, {len(history)} meta-iterations (Adam {s['meta_lr']:g})")


def write_figure(args, s, problem, initial, result, path):
    curves = None
    if args.problem == "schedules":
        curves = (problem.learning_curve(initial, args.seed), problem.learning_curve(result.hypers, args.seed))
    from stn_ext.reversible.figures import figure

    png = figure(problem, initial, result.hypers, result.history, _title(args, s, problem, result.history), curves)
    checkpoint.atomic_write_bytes(path, png)


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        if not args.out:
            raise ValueError("--out must name a folder")
        checkpoint.check_folder_creatable(args.out, option="--out")
        if args.resume and not os.path.exists(os.path.join(args.out, "state.pt")):
            raise ValueError(f"no {os.path.join(args.out, 'state.pt')} to resume from (is --out right?); for a new "
                             "run leave out --resume")
        torch.use_deterministic_algorithms(True)
        problem, s = build(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {str(err).removeprefix('stn_ext: ')}", file=sys.stderr)
        return 2
    initial = problem.initial_hypers()
    opt = torch.optim.Adam(problem.hypers.values(), lr=s["meta_lr"])
    config = {k: v for k, v in vars(args).items() if k not in RESUME_FREE}
    try:
        result = meta_optimize(problem.objective, problem.hypers, opt, s["meta_iters"], seed=args.seed,
                               fresh_seed=not args.same_seed, out=args.out, resume=args.resume,
                               chaos=ChaosRule(args.chaos_window, args.chaos_factor), progress=not args.quiet,
                               config=config)
    except ValueError as err:
        print(f"error: {str(err).removeprefix('stn_ext: ')}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"stn_ext reversible: interrupted; the finished meta-iterations are saved in {args.out}; rerun the "
              "same command with --resume to continue", file=sys.stderr)
        return 130
    good = [r for r in result.history if math.isfinite(r.get("objective", math.nan)) and "note" not in r]
    final = final_report(problem, result.hypers, args.seed + len(result.history))
    report = {"problem": args.problem, "data": args.data, "settings": s, "meta_iters_done": len(result.history),
              "stopped": result.stopped, "seconds": result.seconds,
              "first": good[0] if good else None, "best": result.best, "final": final,
              "hyperparameters": sum(h.numel() for h in problem.hypers.values()),
              "train_images": len(problem.ytr)}
    checkpoint.atomic_write_json(os.path.join(args.out, "result.json"), report)
    if not args.no_plot:
        write_figure(args, s, problem, initial, result, os.path.join(args.out, f"{args.problem}.png"))
    if not args.quiet:
        first = good[0] if good else {"val_loss": math.nan, "test_acc": math.nan}
        print(f"{args.problem} on {args.data}: validation loss {first['val_loss']:.4f} -> {final['val_loss']:.4f}, "
              f"test loss {final['test_loss']:.4f}, test accuracy {first['test_acc']:.3f} -> {final['test_acc']:.3f} "
              f"({len(result.history)} meta-iterations, {result.seconds:.1f} s); wrote {args.out}/"
              + (f"{args.problem}.png, " if not args.no_plot else "") + "result.json, meta_history.csv, state.pt")
    if result.stopped:
        if args.quiet:  # meta_optimize printed it otherwise
            print(f"stn_ext reversible: {result.stopped}", file=sys.stderr)
        return 1
    return 0


def wants_problems(argv):
    """Whether a ``reversible`` command line is for this CLI (it names --problem other than digits-mlp, or --data)."""
    for i, a in enumerate(argv):
        if a == "--data" or a.startswith("--data="):
            return True
        if a.startswith("--problem"):
            value = a.split("=", 1)[1] if "=" in a else (argv[i + 1] if i + 1 < len(argv) else "")
            return value != "digits-mlp"
    return False


if __name__ == "__main__":
    sys.exit(main())
