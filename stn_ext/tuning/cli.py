"""``python -m stn_ext train``: one run of the trainer (or a search) from the command line."""
import argparse
import os
import statistics
import sys

from stn_ext.cli_parser import Parser
from stn_ext.data import BUILTIN as BUILTIN_DATA
from stn_ext.tuning import options
from stn_ext.tuning.config import DEFAULT_HYPERS, METHODS, SEARCHES
from stn_ext.tuning.language import TEXT_DATA
from stn_ext.tuning.space import BUILTINS, GROUPS

HYPER_HELP = (
    "hyperparameters to tune, comma separated: dropout (one rate per dropout slot of the model: mlp has "
    "dropout.in, dropout.h1, dropout.h2; cnn has dropout.c1, dropout.c2, dropout.h1; name one as e.g. "
    "dropout.h1), noise (std of additive Gaussian input noise), weight_decay (L2 on the weights in the "
    "training loss), cutout (= cutout_length,cutout_holes; discrete), shift (max random shift in pixels; "
    "discrete); for --model lstm (default: dropout,embed_dropout,dropconnect,ar,tar, the STN paper's seven; its "
    "dropout slots dropout.in, dropout.h1, dropout.out are locked: one mask per sequence): embed_dropout (whole "
    "words dropped from the embedding), dropconnect (on the hidden-to-hidden weights), ar and tar (activation "
    "and temporal activation regularisation coefficients). Built-in ranges/initial values: " +
    "; ".join(f"{k} [{lo:g}, {hi:g}] init {init:g} ({tr}{', discrete' if d else ''})"
              for k, (lo, hi, init, tr, d) in BUILTINS.items()) + f"; groups: {', '.join(GROUPS)}"
)

EPILOG = """\
methods:
  stn        Self-Tuning Networks (MacKay et al. 2019): perturbed hyperparameters feed a hypernet in
             every layer; Ttrain weight steps on training batches, then Tval hyper steps on
             validation batches (eval mode), after a warm-up.
  delta-stn  Delta-STN (Bae & Grosse 2020): centred hypernet input, general + response weight steps,
             optional --linearize; evaluation at delta = 0.
  fixed      plain training at the initial hyperparameters (--init).
  random     random search: --trials fixed runs drawn from the same space, splitting --steps.
  tpe        Optuna's TPE (optional: pip install optuna): --trials fixed runs, each at values TPE
             proposes from the finished trials' validation losses, splitting --steps.

outputs (in --out): config.json, steps.jsonl (per weight step: train loss, hyperparameters, scales),
epochs.jsonl (per evaluation: val/test loss and accuracy), schedule.csv (the hyperparameter schedule),
losses.png, accuracy.png, hypers.png, checkpoint.pt, summary.json, best.pt (the model at the evaluation
with the lowest validation loss; summary.json's "best" names it). Interrupt with Ctrl-C (saves at the
next step boundary, exits 130) or kill, then rerun with --resume to continue to the same result. A new
run into a folder that holds a run is refused: --resume continues it, --overwrite replaces it.

examples:
  python -m stn_ext train --method delta-stn --hypers dropout,weight_decay --steps 1500 --out runs/dstn
  python -m stn_ext train --model cnn --method stn --hypers dropout,cutout,shift --out runs/cnn
  python -m stn_ext train --method random --trials 4 --range weight_decay=1e-5:1e-1 --out runs/rs
  python -m stn_ext train --data fashion-mnist --train-size 10000 --model cnn --hypers dropout,cutout,shift --out runs/fm
  python -m stn_ext train --data austen --model lstm --method stn --hidden 200,200 --batch-size 20 --out runs/lm
  python -m stn_ext train --method delta-stn --out runs/dstn --resume    # the first run, after Ctrl-C or kill
"""


def _kv(items, what, parse):
    out = {}
    for item in items or ():
        if "=" not in item:
            raise ValueError(f"{what} must look like NAME=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        try:
            out[k.strip()] = parse(v)
        except ValueError:
            raise ValueError(f"cannot parse {what} {item!r}") from None
    return out


def _range(v):
    lo, sep, hi = v.partition(":")
    if not sep:
        raise ValueError(v)
    return (float(lo), float(hi))


def _ints(v):
    return tuple(int(x) for x in v.split(",") if x.strip())


def _defaults():
    from stn_ext.tuning import TrainConfig

    return TrainConfig()


def build_parser():
    p = Parser(
        prog="python -m stn_ext train", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="Bilevel training of a small network whose hyperparameters (dropout, noise, weight decay, "
                    "augmentation; a language model's dropouts, DropConnect and activation regularisers) tune "
                    "themselves during training through self-tuning layers, or the fixed baseline and the "
                    "searches (random, TPE: at the same number of weight steps, or full trials in parallel).")
    g = p.add_argument_group("what to train")
    g.add_argument("--method", default=_defaults().method, choices=METHODS,
                   help=f"see methods below (default {_defaults().method})")
    g.add_argument("--model", default="mlp", choices=["mlp", "cnn", "lstm"],
                   help="built-in model (default mlp; lstm: an LSTM language model for --data austen or ptb, "
                        "--hidden its layers' sizes, the decoder tied to the embedding)")
    g.add_argument("--data", default="digits", choices=BUILTIN_DATA + TEXT_DATA,
                   help="data set (default digits: scikit-learn's 8x8 digits, shipped; fashion-mnist: 28x28, its "
                        "IDX files from --data-path, $STN_EXT_FASHION_MNIST or Debian's dataset-fashion-mnist; "
                        "austen: Jane Austen's six novels (Debian's r-cran-janeaustenr, fetched by "
                        "scripts/setup_env.sh), ptb: the Penn Treebank's ptb.{train,valid,test}.txt in --data-path; "
                        "own arrays go through the Python API)")
    g.add_argument("--data-path", default="",
                   help="folder of Fashion-MNIST's four IDX files or of PTB's text files (default: found as --data says)")
    g.add_argument("--hypers", default=",".join(DEFAULT_HYPERS), help=HYPER_HELP)
    g.add_argument("--range", action="append", metavar="NAME=LOW:HIGH",
                   help="search range of a hyperparameter or group, e.g. weight_decay=1e-5:1e-1; equal ends hold it "
                        "there, applied but not tuned, e.g. cutout_length=8:8 (repeatable)")
    g.add_argument("--init", action="append", metavar="NAME=VALUE",
                   help="initial value (the value used by --method fixed), e.g. dropout=0.2 (repeatable)")
    g.add_argument("--hidden", type=_ints, default=(128, 128), help="hidden widths, e.g. 128,128 (mlp; cnn uses the first; lstm: the LSTM layers)")
    g.add_argument("--channels", type=_ints, default=(16, 32), help="cnn channels per conv stage, e.g. 16,32")
    g.add_argument("--train-size", type=int, default=0,
                   help="cap the training split (default 0: all of it, 1079 digits (validation and test keep 359 "
                        "each) or 50,000 Fashion-MNIST images (validation 10,000 of the training set, test the official "
                        "10,000); text: the first N tokens of the training split)")
    g.add_argument("--data-seed", type=int, default=0, help="seed of the train/val/test split")
    g = p.add_argument_group("optimisation")
    g.add_argument("--steps", type=int, default=1500, help="weight steps (random search, tpe: in total) (default 1500)")
    g.add_argument("--batch-size", type=int, default=64,
                   help="global mini-batch (all processes) (default 64); the hyper steps' validation batches have its "
                        "size, or hold the whole validation split where it equals the training split's size (full batch)")
    g.add_argument("--lr", type=float, default=0.0,
                   help="weight SGD learning rate (default 0: 0.01; for text 20, AWD-LSTM's plain SGD)")
    g.add_argument("--momentum", type=float, default=-1.0, help="weight SGD momentum (default -1: 0.9; for text 0)")
    g.add_argument("--clip", type=float, default=-1.0,
                   help="clip each step's gradient to this norm (default -1: none; for text 0.25; 0: none)")
    g.add_argument("--bptt", type=int, default=0,
                   help="text: tokens per window of truncated backpropagation through time (default 0: 35); the "
                        "hidden state is carried from window to window")
    d = _defaults()
    g.add_argument("--hyper-lr", type=float, default=d.hyper_lr,
                   help=f"Adam learning rate for the hyperparameters (default {d.hyper_lr})")
    g.add_argument("--hyper-beta2", type=float, default=d.hyper_beta2,
                   help="Adam's second-moment decay for the hyperparameters: shorter than Adam's usual 0.999, so a "
                        "far start's large hypergradients do not slow the arrival (docs/trainer.md, \"The ridge "
                        f"family's misses\"); -1: 0.95, and 0.99 per example where the response is fitted on the gradient "
                        f"(default {d.hyper_beta2})")
    g.add_argument("--hyper-lr-schedule", default=d.hyper_lr_schedule, choices=options.SCHEDULES,
                   help="decay of the hyper learning rate: cosine settles the hyperparameters, tail keeps it constant "
                        "for the first half; auto is tail, and cosine with per-example perturbation where the response "
                        f"is fitted on the gradient (--response-fit) (default {d.hyper_lr_schedule})")
    g.add_argument("--hyper-plain-every", type=int, default=d.hyper_plain_every,
                   help="take every k-th hyper step at the hyperparameters themselves, unperturbed, stepping them "
                        "and not the perturbation scales: its gradient carries no perturbation noise (0: none; 1: "
                        f"the scales are never tuned) (default {d.hyper_plain_every})")
    g.add_argument("--scale-init", type=float, default=d.scale_init,
                   help="initial perturbation scale sigma, in unconstrained units (default -1: 0.5 with per-example "
                        "perturbation, 0.3 per batch; STN per example with its response fitted by difference 0.3, as "
                        "its weights train at the perturbed values)")
    g.add_argument("--scale-max", type=float, default=d.scale_max,
                   help="cap on sigma (0: the initial scale, so the entropy term cannot grow it) (default 0)")
    g.add_argument("--tau", type=float, default=d.tau, help=f"entropy weight on the perturbation scales (default {d.tau})")
    g.add_argument("--ttrain", type=int, default=d.train_per_cycle, help=f"weight steps per cycle (default {d.train_per_cycle})")
    g.add_argument("--tval", type=int, default=d.val_per_cycle, help=f"hyper steps per cycle (default {d.val_per_cycle})")
    g.add_argument("--warmup", type=int, default=d.warmup_steps,
                   help="weight steps before the response trains and the first hyper step (default -1: steps / 10)")
    g.add_argument("--hyper-input", default=d.hyper_input, choices=options.HYPER_INPUTS,
                   help="stn: what the hypernet sees, u~ minus an anchor: the range's centre (raw logits, as the "
                        "official STN), u itself (recentred after each hyper step, exactly), auto (centre for "
                        f"rates, recentred for the rest) or the initial u (default {d.hyper_input})")
    g.add_argument("--response-init", default=d.response_init, choices=options.RESPONSE_INITS,
                   help="start of the hypernet path: v (V, C random, W_h, b_h zero: learns at once; where the input "
                        "is centred, rows of V, C at least 1 long, so that no row learns slowly) or zero (V, C zero, "
                        f"as the papers) (default {d.response_init})")
    g.add_argument("--perturb", default=d.perturb, choices=options.PERTURBS,
                   help="one perturbation per batch (one fused GEMM per layer) or one per example (the papers'; about "
                        "twice the GEMM work per step); auto is the method's (batch for both; docs/trainer.md says why) "
                        f"(default {d.perturb})")
    g.add_argument("--response-gain-max", type=float, default=d.response_gain_max,
                   help="multiply the response's gradients by (sigma_0 / sigma)^2, at most this, so that it learns as "
                        "fast near an optimum, where sigma has shrunk, as at the start; off after a roll-back; 1: off "
                        f"(default {d.response_gain_max})")
    g.add_argument("--response-baseline", type=float, default=d.response_baseline,
                   help="per batch, > 0: subtract from the response's gradients those of a running mean (this "
                        "decay) of earlier steps' weight gradients along its path, a zero-mean control variate that "
                        "keeps the weights' own descent out of the response while they converge (ridge from far "
                        "below: the response's sign); it stops for good once a step's weight gradient no longer "
                        "follows the mean (on real data by the warm-up's end); 0: off "
                        f"(default {d.response_baseline})")
    g.add_argument("--response-fit", default=d.response_fit, choices=options.RESPONSE_FITS,
                   help="fit the response on the training loss's gradient at the perturbed values (gradient, the "
                        "paper's) or on that gradient less the one at u along the response's path, at the same "
                        "weights and noise draws, over the perturbation's square (difference: at half the weights' pace "
                        "times the gain of --response-gain-max, where the gradient's is sigma^2 times theirs, its "
                        "noise taken out; delta-stn per batch where masks are drawn (dropout, cutout, shift) at a "
                        "tenth, started near V = 1, each gate's path capped at half its weights (not for a language "
                        "model's kinds); per example, each "
                        "example's gradient at u through the tangent of its path, for weight decay and noise only; "
                        "the hyper lr schedule's auto is tail with it); auto: difference for delta-stn per batch (not with "
                        "embed_dropout, dropconnect, ar or tar), and "
                        "where every tuned hyperparameter is weight decay, noise, ar or tar (per example: weight decay "
                        f"or noise) (default {d.response_fit})")
    g.add_argument("--response-rows", type=float, default=d.response_rows,
                   help="delta-stn: take its response step on this part of each batch's rows (spread evenly), to save time "
                        "(default 0: all of it)")
    g.add_argument("--response-every", type=int, default=d.response_every,
                   help="delta-stn: take its response step after every k-th general step, to save time "
                        "(default 0: every 2nd, 1.83x fixed's time per step against 2.37x, quality inside the seed "
                        "spread; per batch by difference every one, which ridge runs from far above need); per "
                        "batch, STN's response fitted by difference steps (and takes that fit's second pass) after "
                        "every k-th weight step too (default: every 2nd; every one where each batch is the whole "
                        "training split)")
    g.add_argument("--linearize", action="store_true", help="delta-stn: linearised response (forward-mode JVP)")
    g.add_argument("--trials", type=int, default=4, help="trials of random search and tpe (default 4)")
    g.add_argument("--trial-steps", type=int, default=0,
                   help="random, tpe: weight steps per trial (default 0: --steps / --trials, the same total as one "
                        "tuned run); e.g. --trial-steps 1500 --trials 32 for 32 full-length trials")
    g.add_argument("--pruner", default="none", choices=["none", "median", "hyperband"],
                   help="random, tpe: Optuna's pruner on the validation loss of each evaluation; a pruned trial "
                        "stops there and is recorded as pruned (default none)")
    g.add_argument("--workers", type=int, default=1,
                   help="random, tpe: processes running trials in parallel on one Optuna study (each with "
                        "--threads torch threads) (default 1)")
    g.add_argument("--storage", default="",
                   help="random, tpe: Optuna storage URL of the study (default: sqlite:///OUT/study.db once "
                        "--pruner, --workers > 1 or --storage is given); machines pointing at one database "
                        "(e.g. postgresql://user:pw@host/db) share one study")
    g.add_argument("--study-name", default="",
                   help="random, tpe: the study's name in --storage (default stn_ext)")
    g.add_argument("--seed", type=int, default=0,
                   help="seed of the initial weights, data order and random draws (default 0)")
    g = p.add_argument_group("run")
    g.add_argument("--out", default="", help="run folder (metrics, schedule, plots, checkpoint) (default none: "
                   "nothing is saved, and a warning says so)")
    g.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its checkpoint, with the same settings (an error if there "
                        "is none); random search keeps its finished trials and resumes the current one")
    g.add_argument("--overwrite", action="store_true",
                   help="replace the run already in --out: delete its checkpoint, logs, plots and trials first "
                        "(other files stay); without it a new run into such a folder is refused")
    g.add_argument("--eval-every", type=int, default=0, help="weight steps between evaluations (0: each epoch)")
    g.add_argument("--checkpoint-every", type=int, default=0, help="weight steps between checkpoints (0: each evaluation)")
    g.add_argument("--stop-after", type=int, default=0,
                   help="stop as if interrupted (checkpoint, exit 130) when this many weight steps are done, "
                        "counted over all trials for random search; a run resumed at or past it goes on (0: never)")
    g.add_argument("--device", default="cpu", help="cpu, cuda, cuda:0, ... (default cpu)")
    g.add_argument("--nproc", type=int, default=1, help="data-parallel processes on this machine (gloo on CPU, nccl on CUDA)")
    g.add_argument("--threads", type=int, default=1, help="torch threads per process (0: torch's default; small models "
                   "run fastest on 1) (default 1)")
    g.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    g.add_argument("--tensorboard", action="store_true",
                   help="also write losses, accuracies, hyperparameters and scales as TensorBoard scalars to "
                        "--out/tensorboard (needs the tensorboard package)")
    g.add_argument("--quiet", action="store_true", help="no progress bars or tables (CI)")
    return p


def config_from_args(a):
    from stn_ext.tuning import TrainConfig

    return TrainConfig(
        method=a.method, model=a.model, data=a.data, hypers=a.hypers, ranges=_kv(a.range, "--range", _range),
        inits=_kv(a.init, "--init", float), steps=a.steps, batch_size=a.batch_size, lr=a.lr, momentum=a.momentum,
        clip=a.clip, bptt=a.bptt,
        hyper_lr=a.hyper_lr, hyper_lr_schedule=a.hyper_lr_schedule, hyper_beta2=a.hyper_beta2,
        hyper_plain_every=a.hyper_plain_every,
        scale_init=a.scale_init, scale_max=a.scale_max,
        tau=a.tau, train_per_cycle=a.ttrain, val_per_cycle=a.tval, warmup_steps=a.warmup, perturb=a.perturb,
        response_every=a.response_every, response_rows=a.response_rows, response_gain_max=a.response_gain_max,
        response_baseline=a.response_baseline, response_fit=a.response_fit,
        hyper_input=a.hyper_input, response_init=a.response_init,
        linearize=a.linearize, hidden=a.hidden, channels=a.channels, train_size=a.train_size,
        random_trials=a.trials, seed=a.seed, data_seed=a.data_seed, data_path=a.data_path, eval_every=a.eval_every,
        checkpoint_every=a.checkpoint_every, out=a.out, resume=a.resume, overwrite=a.overwrite, quiet=a.quiet,
        plots=not a.no_plots, tensorboard=a.tensorboard, device=a.device, stop_after=a.stop_after,
        trial_steps=a.trial_steps, pruner=a.pruner, workers=a.workers, storage=a.storage, study_name=a.study_name,
        worker_threads=a.threads if a.method in SEARCHES else 1)


COLUMNS = ("method", "seeds", "val_loss", "val_acc", "val_ppl", "test_loss", "test_acc", "test_ppl", "train_s")


def format_table(rows, title=""):
    """rows: dicts of already formatted cells (``summarise``), one column per name in ``COLUMNS`` that some row
    fills (accuracy for classification, perplexity for text)."""
    cols = [c for c in COLUMNS if c == "method" or any(str(r.get(c, "")) for r in rows)]
    lines = [title] if title else []
    body = [[str(r.get(c, "")) for c in cols] for r in rows]
    widths = [max([len(c)] + [len(b[i]) for b in body]) for i, c in enumerate(cols)]
    lines.append("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.ljust(w) for v, w in zip(b, widths)) for b in body]
    return "\n".join(lines)


def _fmt(xs, digits=4):
    xs = [x for x in xs if x is not None]
    if not xs:
        return ""
    if len(xs) == 1:
        return f"{xs[0]:.{digits}f}"
    return f"{statistics.mean(xs):.{digits}f} +- {statistics.stdev(xs):.{digits}f}"


def summarise(results):
    """Group summaries by method: mean +- std over seeds. A group holding a run cut short (summary
    "complete": false) is labelled "(incomplete)"."""
    order, groups = [], {}
    for r in results:
        key = r["label"] if "label" in r else r["method"]
        if key not in groups:
            order.append(key)
            groups[key] = []
        groups[key].append(r)
    rows = []
    for key in order:
        g = groups[key]
        label = key if all(r.get("complete", True) for r in g) else f"{key} (incomplete)"
        rows.append({"method": label, "seeds": len(g), "val_loss": _fmt([r["val_loss"] for r in g]),
                     "val_acc": _fmt([r.get("val_acc") for r in g], 3), "test_loss": _fmt([r["test_loss"] for r in g]),
                     "test_acc": _fmt([r.get("test_acc") for r in g], 3), "train_s": _fmt([r["wall_s"] for r in g], 1),
                     "val_ppl": _fmt([r.get("val_ppl") for r in g], 1), "test_ppl": _fmt([r.get("test_ppl") for r in g], 1)})
    return rows


def _set_threads(n):
    if n > 0:
        import torch

        torch.set_num_threads(n)


ERRORS = (ValueError, FileNotFoundError, FileExistsError)  # bad settings: one line, exit 2, as argparse


def main(argv=None):
    a = build_parser().parse_args(argv)
    _set_threads(a.threads)
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ  # torchrun
    if launched and a.nproc > 1:
        print("error: --nproc spawns its own processes; under torchrun leave it at 1", file=sys.stderr)
        return 2
    try:
        from stn_ext import tuning as trainer

        from stn_ext.tuning.divergence import Diverged

        cfg = config_from_args(a)
        trainer.preflight(cfg)  # every rank, before init_process_group: no rank has written yet
        if not cfg.out and not a.quiet:
            print("note: no --out, so nothing of this run is saved (no checkpoint, logs or plots)", file=sys.stderr)
        summary = _train(cfg, a.nproc, launched)
    except ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (Diverged, trainer.WorkerDied) as e:  # the message names the step and the checkpoint kept
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # outside the training loop, or without --out (no checkpoint to save)
        print("interrupted", file=sys.stderr)
        return 130
    if summary is None:  # not rank 0 under torchrun
        return 0
    if not a.quiet:
        _print_run(cfg, summary)
    if not summary.get("complete", True):
        print(_stopped_message(cfg, summary), file=sys.stderr)
        return 130
    return 0


def _train(cfg, nproc, launched):
    """Run cfg in this process, on nproc spawned ones, or as one rank under torchrun (None but on rank 0)."""
    from stn_ext import tuning as trainer

    if nproc > 1:
        return trainer.run_distributed(cfg, nproc)
    if not launched:
        return trainer.train(cfg)
    import torch

    backend = "nccl" if cfg.device.startswith("cuda") else "gloo"
    if cfg.device.startswith("cuda"):
        cfg.device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        torch.cuda.set_device(cfg.device)
    torch.distributed.init_process_group(backend)
    try:
        summary = trainer.train(cfg)
    finally:
        torch.distributed.destroy_process_group()
    return summary if int(os.environ["RANK"]) == 0 else None


def _print_run(cfg, summary):
    print(format_table(summarise([summary]), title=f"\n{cfg.method} on {cfg.data} ({cfg.model}), "
                                                     f"{summary['steps']} weight steps"))
    if "trial_val_losses" in summary:  # a finished random search
        for k, (loss, hp) in enumerate(zip(summary["trial_val_losses"], summary["trial_hypers"])):
            print(f"  trial {k}{' (best)' if k == summary['best_trial'] else ''}: val_loss {loss:.4f}  " +
                  " ".join(f"{n}={v:.4g}" for n, v in hp.items()))
    print("final hyperparameters: " + ", ".join(f"{k}={v:.4g}" for k, v in summary["hypers"].items()))
    if "best" in summary and summary["best"]["step"] != summary["steps"]:
        b = summary["best"]
        where = f" (its model: {os.path.join(cfg.out, 'best.pt')})" if cfg.out else ""
        print(f"best evaluation: step {b['step']}, val_loss {b['val_loss']:.4f}, test_loss {b['test_loss']:.4f}{where}")
    if cfg.out:
        print(f"run folder: {cfg.out}")


def _stopped_message(cfg, summary):
    if "trial_records" in summary:  # a study: its progress is in trials, each of its own length
        msg = f"stopped with {summary['trials']} of {cfg.random_trials} trials finished; "
    else:
        where = f" (in trial {summary['trial']})" if "trial" in summary else ""
        msg = f"stopped at step {summary['steps']} of {cfg.steps}{where}; "
    if not cfg.out:
        return msg + "nothing was saved (no --out)"
    return msg + f"the checkpoint is in {cfg.out}; continue with --resume"


if __name__ == "__main__":
    sys.exit(main())
