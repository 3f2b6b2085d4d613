"""``python -m stn_ext reversible``: meta-learn training schedules by exact reversible learning.

The kind of experiment of Maclaurin, Duvenaud & Adams (2015): an MLP on scikit-learn's digits (8x8
images, shipped with scikit-learn, no download) is trained for T steps of SGD with momentum; the
validation loss after training is differentiated exactly w.r.t. the per-step learning rates and
momenta, the L2 strength and per-layer initialisation scales by running the training backwards bit for
bit (stn_ext.reversible.hypergradient), and those hyperparameters are improved by normalised gradient
descent over several meta-iterations. After every meta-iteration it writes (atomically) the learned
schedules (CSV), the meta-training curve (CSV), a summary (JSON) and its state (for --resume); a plot
(PNG) at the end. Ctrl-C keeps what is written and exits 130.
"""
import argparse
import csv
import io
import math
import os
import sys
import time

import torch

from stn_ext import checkpoint
from stn_ext.cli_parser import Parser
from stn_ext.reversible import FixedPointOverflowError, ReversibilityError, hypergradient, quantize_momentum
from stn_ext.reversible.problem import MetaProblem

DIGITS_SIZE = 1797  # examples in scikit-learn's digits
STATE_FILE = "state.pt"
# settings that may differ between a run and its resumption without changing the result
RESUME_FREE = ("meta_iters", "out", "resume", "quiet", "no_plot", "problem")  # problem: only digits-mlp gets here

DESCRIPTION = """\
Meta-learn per-step learning-rate and momentum schedules, an L2 strength and per-layer
initialisation scales of an MLP on scikit-learn's digits, with exact hypergradients through
T steps of SGD with momentum run backwards bit for bit (Maclaurin et al. 2015). Each
meta-iteration trains T steps forward and T steps backwards (one Hessian-vector product per
step); the defaults take about 10 s on a laptop CPU. The paper's experiments on Fashion-MNIST or
digits (learned schedules, per-weight L2, distilled images): --problem schedules|l2|distill
--data fashion-mnist|digits (`python -m stn_ext reversible --problem schedules --help`)."""

EPILOG = """\
outputs (in --out, each rewritten atomically after every meta-iteration): schedules.csv (the lr and
momentum schedules of every meta-iteration), meta_history.csv (validation loss and accuracy, L2,
init scales), summary.json, state.pt (for --resume); schedules.png at the end. When training
diverges at a new point, the meta step size is halved and the step retaken from the last good point.
Ctrl-C stops at once, keeps the meta-iterations finished so far and exits 130; rerun the same
command with --resume to continue (a larger --meta-iters also extends a finished run).

examples:
  python -m stn_ext reversible --out runs/rev
  python -m stn_ext reversible --steps 200 --meta-iters 50 --per-layer --out runs/rev200
  python -m stn_ext reversible --out runs/rev --resume
"""


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults in each option's help (not for flags: "(default: False)" says nothing); the description's
    and epilog's line breaks kept."""

    def _get_help_string(self, action):
        return action.help if action.nargs == 0 else super()._get_help_string(action)


def _ranged(cast, low, high=None, low_open=False, high_open=False):
    """An argparse type: `cast` the text and require a finite value in the interval, so that a bad value
    ends in argparse's usage and `error:` line (exit 2) rather than a traceback or a meaningless run."""
    if high is None:
        want = f"{'>' if low_open else '>='} {low}"
    else:
        want = f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"

    def parse(text):
        try:
            x = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid {cast.__name__} value: {text!r}") from None
        above = x > low if low_open else x >= low
        below = high is None or (x < high if high_open else x <= high)
        if not (math.isfinite(x) and above and below):
            raise argparse.ArgumentTypeError(f"must be {want}, got {text}")
        return x

    return parse


def build_parser():
    p = Parser(prog="python -m stn_ext reversible", description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=_HelpFormatter)
    p.add_argument("--problem", choices=["digits-mlp", "schedules", "l2", "distill"], default="digits-mlp",
                   help="digits-mlp: this command's own problem (the options below); the others (and any --data) "
                        "run the paper's experiments, whose options `--problem schedules --help` lists")
    p.add_argument("--steps", type=_ranged(int, 1), default=100, help="training steps T per meta-iteration")
    p.add_argument("--meta-iters", type=_ranged(int, 1), default=25,
                   help="meta-iterations (one hypergradient each); with --resume, the total including those done")
    p.add_argument("--meta-lr", type=_ranged(float, 0, low_open=True), default=0.05,
                   help="meta step size: each block (log lrs, logit momenta, log L2, log init scales) moves by "
                        "this much in RMS per meta-iteration, along its RMS-normalised hypergradient; halved "
                        "whenever training diverges")
    p.add_argument("--meta-momentum", type=_ranged(float, 0, 1, high_open=True), default=0.5,
                   help="momentum of the meta-optimiser, in [0, 1)")
    p.add_argument("--hidden", type=_ranged(int, 1), default=50,
                   help="hidden units of the MLP (64 -> hidden -> 10, tanh)")
    p.add_argument("--batch", type=_ranged(int, 1), default=100,
                   help="training minibatch size (a fixed batch per step), at most --train-size")
    p.add_argument("--train-size", type=_ranged(int, 1, DIGITS_SIZE - 1), default=1000,
                   help=f"training examples (the rest of the {DIGITS_SIZE} is validation)")
    p.add_argument("--lr", type=_ranged(float, 0, low_open=True), default=0.3,
                   help="initial learning rate of every step (> 0; tuned in log space)")
    p.add_argument("--momentum", type=_ranged(float, 0, 1, True, True), default=0.9,
                   help="initial momentum of every step, in (0, 1) (tuned as a logit; used as a multiple of 2^-16)")
    p.add_argument("--l2", type=_ranged(float, 0), default=1e-3,
                   help="initial L2 strength on the weight matrices (tuned in log space, so > 0; 0 only with "
                        "--no-l2, for no L2 penalty at all)")
    p.add_argument("--init-scale", type=_ranged(float, 0, low_open=True), default=1.0,
                   help="initial scale of the weight matrices (times N(0, 1/fan_in)); > 0, tuned in log space")
    p.add_argument("--per-layer", action="store_true",
                   help="separate schedules for each layer (its weight and bias share one)")
    p.add_argument("--no-l2", action="store_true", help="do not meta-learn the L2 strength")
    p.add_argument("--no-init-scale", action="store_true", help="do not meta-learn the initialisation scales")
    p.add_argument("--radix-bits", type=_ranged(int, 24, 62), default=52,
                   help="fixed-point radix of the exact weights, in [24, 62]: weights must stay below "
                        "2^(63 - radix) in magnitude, and momentum leaves noise of about 2^(16 - radix) in each "
                        "velocity")
    p.add_argument("--dtype", choices=["float64", "float32"], default="float64",
                   help="precision of the model's forward and backward passes (the weights are exact either way)")
    p.add_argument("--seed", type=_ranged(int, 0, 2**32 - 1), default=0,
                   help="seed of the data split, batch order and initial weights")
    p.add_argument("--out", default="runs/reversible", help="output folder for CSV, JSON, state and PNG")
    p.add_argument("--resume", action="store_true",
                   help="continue the run saved in --out (same settings; --meta-iters may be larger); an error "
                        "if --out holds no state.pt")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG (no matplotlib needed)")
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    return p


def check_args(args):
    """The checks that involve two options or the file system; a ValueError, printed as one `error:` line
    (exit 2), as `train` does."""
    if args.batch > args.train_size:
        raise ValueError(f"--batch ({args.batch}) must not exceed --train-size ({args.train_size})")
    if args.l2 == 0 and not args.no_l2:
        raise ValueError("--l2 0 needs --no-l2: the L2 strength is tuned in log space, so it cannot start at 0")
    if not args.out:
        raise ValueError("--out must name a folder")
    checkpoint.check_folder_creatable(args.out, option="--out")


# --- the meta-optimisation ----------------------------------------------------------------------------
# Its whole state is one dict (saved as state.pt after every meta-iteration, so --resume continues it):
# next_iter; meta (the unconstrained hyperparameters to evaluate next); vel (meta-momentum); meta_lr;
# good and good_dir (the last point that trained without diverging, and its descent directions);
# history and schedules (the rows of the two CSVs); seconds.


def learned(args):
    return ["log_lr", "logit_momentum"] + ([] if args.no_l2 else ["log_l2"]) + \
        ([] if args.no_init_scale else ["log_init_scale"])


def _clone(tensors):
    return {k: v.clone() for k, v in tensors.items()}


def initial_state(args, n_matrices):
    shape = (args.steps, 2) if args.per_layer else (args.steps,)
    meta = {
        "log_lr": torch.full(shape, math.log(args.lr), dtype=torch.float64),
        "logit_momentum": torch.full(shape, math.log(args.momentum / (1 - args.momentum)), dtype=torch.float64),
        # --l2 0 (only with --no-l2): exp(-inf) = 0, no L2 penalty at all
        "log_l2": torch.tensor(math.log(args.l2) if args.l2 > 0 else -math.inf, dtype=torch.float64),
        "log_init_scale": torch.full((n_matrices,), math.log(args.init_scale), dtype=torch.float64),
    }
    return {"next_iter": 0, "meta": meta, "vel": {k: torch.zeros_like(meta[k]) for k in learned(args)},
            "meta_lr": args.meta_lr, "good": _clone(meta), "good_dir": None, "history": [], "schedules": [],
            "seconds": 0.0}


def resumed_state(args):
    """The state saved in --out when --resume asks for it (None without --resume); ValueError if there is
    none (as `train --resume`: a mistyped --out should not start a new run) or if it was saved with
    settings that would change the result."""
    path = os.path.join(args.out, STATE_FILE)
    if not args.resume:
        return None
    if not os.path.exists(path):
        raise ValueError(f"no {path} to resume from (is --out right?); for a new run leave out --resume")
    state = checkpoint.load(path)
    old, new = state.pop("args"), vars(args)
    diff = sorted(k for k in new if k not in RESUME_FREE and old.get(k) != new[k])
    if diff:
        raise ValueError(f"cannot resume {args.out} with different settings: " +
                         ", ".join(f"--{k.replace('_', '-')} was {old.get(k)!r}, now {new[k]!r}" for k in diff) +
                         "; use the original settings or a new --out")
    return state


def schedules_of(meta):
    """The learning rates and (quantised) momenta that training uses at the meta-parameters `meta`."""
    lrs = torch.exp(meta["log_lr"])
    moms = quantize_momentum(torch.sigmoid(meta["logit_momentum"]).clamp(2.0**-16, 1 - 2.0**-16))
    return lrs, moms


def evaluate(prob, args, meta):
    """One hypergradient at `meta`: (HypergradientResult, None), or (None, why) if training diverged."""
    lrs, moms = schedules_of(meta)
    groups = [0, 0, 1, 1] if args.per_layer else None  # layer of each tensor (weight, bias, weight, bias)
    try:
        res = hypergradient(prob.init_params(meta["log_init_scale"]), prob.train_loss, prob.val_loss, lrs, moms,
                            hypers={"log_l2": meta["log_l2"]}, radix_bits=args.radix_bits, groups=groups)
    except (FixedPointOverflowError, FloatingPointError, ReversibilityError) as err:
        return None, str(err)
    if not math.isfinite(res.val_loss):
        return None, f"validation loss {res.val_loss}"
    return res, None


def descent_directions(res, prob, meta, learn):
    """Each learned block's hypergradient w.r.t. its unconstrained meta-parameters (chain rule), divided
    by its RMS, so the shape of a schedule's gradient (not only its signs, as with Adam) shapes the
    schedule. Blocks with a zero gradient are left out (they do not move)."""
    lrs, moms = schedules_of(meta)
    scale = meta["log_init_scale"]
    grads = {
        "log_lr": res.grad_lrs * lrs,
        "logit_momentum": res.grad_momenta * moms * (1 - moms),
        "log_l2": res.grad_hypers["log_l2"].double(),
        "log_init_scale": torch.stack([
            (res.grad_params[i].double() * prob.base[i].double()).sum() * torch.exp(scale[j])
            for j, i in enumerate(prob.matrices)]),
    }
    out = {}
    for k in learn:
        g = grads[k].reshape(meta[k].shape).to(meta[k].dtype)
        rms = g.pow(2).mean().sqrt()
        if float(rms) > 0:
            out[k] = g / rms
    return out


def take_step(state, directions, meta_momentum):
    """Gradient descent with momentum on the validation loss."""
    for k, d in directions.items():
        state["vel"][k].mul_(meta_momentum).add_(d)
        state["meta"][k].sub_(state["meta_lr"] * state["vel"][k])


def back_off(state, meta_momentum):
    """Training diverged at the new point, so the meta step went too far: retake it from the last good
    point with half the step size and no meta-momentum. The good point's directions are kept, so this
    needs no second hypergradient there (it would repeat the first bit for bit: training is deterministic)."""
    state["meta"] = _clone(state["good"])
    state["meta_lr"] *= 0.5
    for v in state["vel"].values():
        v.zero_()
    take_step(state, state["good_dir"], meta_momentum)


def record(state, prob, res, it):
    lrs, moms = schedules_of(state["meta"])
    acc = prob.val_accuracy(res.final_params)
    row = {"meta_iter": it, "val_loss": res.val_loss, "val_acc": acc,
           "l2": float(torch.exp(state["meta"]["log_l2"])),
           "bits_per_element_per_step": res.bits_per_element_per_step}
    for j, i in enumerate(prob.matrices):
        row[f"init_scale_{i}"] = float(torch.exp(state["meta"]["log_init_scale"][j]))
    state["history"].append(row)
    state["schedules"].append((it, lrs, moms))
    return row


def meta_iteration(state, prob, args):
    """Evaluate the hypergradient at state["meta"] and move on. Returns the history row, None if
    training diverged."""
    it = state["next_iter"]
    res, why = evaluate(prob, args, state["meta"])
    state["next_iter"] = it + 1
    if res is None:
        start = state["good_dir"] is None
        state["history"].append({"meta_iter": it, "val_loss": float("nan"), "val_acc": float("nan"),
                                 "note": ("diverged at the starting hyperparameters" if start else
                                          "diverged, meta lr halved") + f" ({why[:80]})"})
        if not start:
            back_off(state, args.meta_momentum)
        return None
    row = record(state, prob, res, it)
    state["good"] = _clone(state["meta"])
    state["good_dir"] = descent_directions(res, prob, state["meta"], learned(args))
    take_step(state, state["good_dir"], args.meta_momentum)
    return row


def progress_bar(args, done):
    if args.quiet:
        return None
    try:
        from tqdm import tqdm
    except ImportError:  # no progress bar without tqdm
        return None
    return tqdm(total=args.meta_iters, initial=min(done, args.meta_iters), desc="meta-iterations", unit="it",
                file=sys.stderr)


def run(args, prob, state):
    """Meta-iterate from state["next_iter"] up to --meta-iters, saving the results after each one.
    Returns (finished, saved): finished is False when Ctrl-C stopped it; saved is what save_results last
    wrote (None if nothing, as when the starting point diverges). The state is left as it was when
    interrupted (possibly mid-iteration), so only `saved` may be reported then."""
    saved = save_results(args, state) if state["schedules"] else None  # a resumed run: new args, summary
    bar = progress_bar(args, state["next_iter"])
    try:
        while state["next_iter"] < args.meta_iters:
            started = time.perf_counter()
            row = meta_iteration(state, prob, args)
            state["seconds"] += time.perf_counter() - started
            if state["good_dir"] is None:
                break  # the start diverged: every later evaluation would repeat it exactly
            saved = save_results(args, state)
            if bar is not None:
                bar.update(1)
                if row is not None:
                    bar.set_postfix(val_loss=f"{row['val_loss']:.4f}", val_acc=f"{row['val_acc']:.3f}")
        return True, saved
    except KeyboardInterrupt:
        return False, saved
    finally:
        if bar is not None:
            bar.close()


# --- outputs ----------------------------------------------------------------------------------------


def history_csv(history):
    buf = io.StringIO()
    keys = sorted({k for row in history for k in row}, key=lambda k: (k != "meta_iter", k))
    w = csv.DictWriter(buf, fieldnames=keys)
    w.writeheader()
    w.writerows(history)
    return buf.getvalue()


def schedules_csv(schedules):
    buf = io.StringIO()
    w = csv.writer(buf)
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
    return buf.getvalue()


def summarise(args, state):
    good = [r for r in state["history"] if math.isfinite(r.get("val_loss", float("nan")))]
    return {
        "seconds": state["seconds"],
        "meta_iters": len(state["history"]),
        "complete": state["next_iter"] >= args.meta_iters,
        "meta_lr": state["meta_lr"],
        "first_val_loss": good[0]["val_loss"] if good else None,
        "final_val_loss": good[-1]["val_loss"] if good else None,
        "best_val_loss": min(r["val_loss"] for r in good) if good else None,
        "first_val_acc": good[0]["val_acc"] if good else None,
        "final_val_acc": good[-1]["val_acc"] if good else None,
        "args": vars(args),
    }


def save_results(args, state):
    """Write the CSVs, summary.json and state.pt, each atomically (a kill leaves the old or the new
    file, never a torn one). Returns what was written, for the plot and the final report."""
    saved = {"history": list(state["history"]), "schedules": list(state["schedules"]),
             "summary": summarise(args, state)}
    checkpoint.atomic_write_text(os.path.join(args.out, "meta_history.csv"), history_csv(saved["history"]))
    checkpoint.atomic_write_text(os.path.join(args.out, "schedules.csv"), schedules_csv(saved["schedules"]))
    checkpoint.atomic_write_json(os.path.join(args.out, "summary.json"), saved["summary"])
    checkpoint.save(os.path.join(args.out, STATE_FILE), dict(state, args=vars(args)))
    return saved


def plot(args, history, schedules):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

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
    axes[2].xaxis.set_major_locator(MaxNLocator(integer=True))  # meta-iterations are whole numbers
    fig.suptitle(f"Exact hypergradients through {args.steps} reversed SGD steps, digits MLP")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    checkpoint.atomic_write_bytes(os.path.join(args.out, "schedules.png"), buf.getvalue())


def report_interrupt(args, saved):
    if saved is None:
        print("stn_ext reversible: interrupted before a meta-iteration finished; nothing saved", file=sys.stderr)
        return 130
    done = saved["history"][-1]["meta_iter"] + 1
    print(f"stn_ext reversible: interrupted; the first {done} meta-iterations are saved in {args.out} (schedules.csv, "
          f"meta_history.csv, summary.json, {STATE_FILE}" + ("" if args.no_plot else ", schedules.png") +
          "); rerun the same command with --resume to continue", file=sys.stderr)
    return 130


def main(argv=None):
    from stn_ext.reversible import cli_problems  # imported here: it builds on this module's parser helpers

    argv = sys.argv[1:] if argv is None else list(argv)
    if cli_problems.wants_problems(argv):
        return cli_problems.main(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        check_args(args)
        torch.use_deterministic_algorithms(True)
        prob = MetaProblem(args)
        state = resumed_state(args) or initial_state(args, len(prob.matrices))
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finished, saved = run(args, prob, state)
    if saved is None and finished:
        print("stn_ext reversible: training diverged at the starting hyperparameters; lower --lr or --init-scale",
              file=sys.stderr)
        return 1
    if saved is not None and not args.no_plot:
        plot(args, saved["history"], saved["schedules"])
    if not finished:
        return report_interrupt(args, saved)
    summary = saved["summary"]
    if not args.quiet:
        print(f"validation loss {summary['first_val_loss']:.4f} -> {summary['final_val_loss']:.4f} "
              f"(accuracy {summary['first_val_acc']:.3f} -> {summary['final_val_acc']:.3f}) "
              f"in {summary['seconds']:.1f} s; wrote {args.out}/schedules.csv, meta_history.csv, summary.json, "
              f"{STATE_FILE}" + ("" if args.no_plot else ", schedules.png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
