"""The STN paper's LSTM experiment on text nobody here wrote (issue 23): seven regularisation hyperparameters of
an LSTM language model tuned in one run, against fixed values and the searches at equal weight steps.

Data: Jane Austen's six novels (stn_ext.corpus: 4 novels train, Northanger Abbey validation, Persuasion test,
10k vocabulary), the first --train-tokens of the training split (a short run on this CPU must reach the regime
where regularisation matters). Model (stn_ext.tuning.language.LanguageModel): --hidden LSTM layers, a tied
embedding of the last one's size, every LSTM matrix and the embedding STN layers. The seven hyperparameters
(TrainConfig's default on text): locked dropout on the input, between the layers and on the output, embedding
dropout, DropConnect on the hidden-to-hidden weights, AR and TAR. TrainConfig's defaults on text otherwise
(plain SGD lr 20, clipping 0.25, BPTT 35).

Methods, each --steps weight steps:
  fixed            every hyperparameter at 0.05 (the tuned runs' start, as the paper's)
  fixed (awd)      AWD-LSTM's hand-set PTB values (Merity et al. 2018: dropouti 0.65, dropouth 0.3 (0.25 in its
                   code), dropout 0.4, dropoute 0.1, wdrop 0.5, alpha 2, beta 1)
  random, tpe      4 trials each, splitting the same steps; the trial with the lowest final validation loss
  stn, delta-stn   TrainConfig defaults

Reported: validation and test perplexity (the last evaluation), time per weight step against fixed's (the
trainer's own step time), the final hyperparameters; JSON, table and a figure of the seven schedules.

    python bench/bench_lm.py                         # 2 seeds; ~1 hour on this 2-core machine (2 runs at once)
    python bench/bench_lm.py --quick                 # seconds: the whole table on a tiny run (what the test runs)
    # the paper's size, for a GPU (PTB at --data-path; 650 units, batch 40, BPTT 70; lr 30):
    python bench/bench_lm.py --corpus ptb --data-path data/penn --hidden 650,650 --batch-size 40 --bptt 70 \\
        --set lr=30 --train-tokens 0 --steps 30000 --device cuda
"""
import argparse
import datetime
import json
import math
import multiprocessing
import os
import sys
import time

import torch

from stn_ext.checkpoint import atomic_write_json, atomic_write_text
from stn_ext.tuning import TrainConfig, Trainer, train
from stn_ext.tuning.language import load_text

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
METHODS = ("fixed", "fixed (awd)", "random", "tpe", "stn", "delta-stn")
AWD = {"dropout.in": 0.65, "dropout.h1": 0.3, "dropout.out": 0.4, "embed_dropout": 0.1, "dropconnect": 0.5,
       "ar": 2.0, "tar": 1.0}


def lm_config(a, method, seed):
    inits = {}
    if method == "fixed (awd)":  # the slots this depth has: h1 .. h<layers - 1> all at dropouth
        inits = {k: v for k, v in AWD.items() if k != "dropout.h1"}
        inits.update({f"dropout.h{k}": AWD["dropout.h1"] for k in range(1, len(a.hidden))})
    settings = dict(method="fixed" if method == "fixed (awd)" else method, model="lstm", data=a.corpus,
                    data_path=a.data_path, hidden=tuple(a.hidden), batch_size=a.batch_size, bptt=a.bptt,
                    steps=a.steps, eval_every=max(1, a.steps // a.evals), seed=seed, quiet=True, plots=False,
                    train_size=a.train_tokens, inits=inits, device=a.device)
    return TrainConfig(**{**a.set, **settings})


def lm_run(a, method, seed, data):
    """One run: its summary's perplexities, step time, hyperparameters and (tuned) their trajectory."""
    torch.set_num_threads(a.threads)
    cfg = lm_config(a, method, seed)
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    traj, evals = [], []
    if method in ("random", "tpe"):
        s = train(cfg, data=data)
    else:
        tr = Trainer(cfg, data=data)
        s = tr.fit()
        every = max(1, a.steps // 100)
        traj = [(r["step"], r["hypers"]) for r in tr.log.steps[::every]] + [(tr.log.steps[-1]["step"],
                                                                            tr.log.steps[-1]["hypers"])]
        evals = [(r["step"], r["val_loss"], r["test_loss"]) for r in tr.log.epochs]
    return {"method": method, "seed": seed, "val_loss": s["val_loss"], "test_loss": s["test_loss"],
            "val_ppl": math.exp(s["val_loss"]), "test_ppl": math.exp(s["test_loss"]),
            "train_s_per_step": s["wall_s"] / a.steps, "elapsed_s": time.perf_counter() - t0, "hypers": s["hypers"],
            "trial_hypers": s.get("trial_hypers"), "trial_val_losses": s.get("trial_val_losses"),
            "recoveries": s.get("recoveries", 0), "trajectory": traj, "evals": evals}


def _job(args):
    a, method, seed = args
    return lm_run(a, method, seed, _data(a))


def _data(a):
    return load_text(a.corpus, a.batch_size, a.bptt, a.data_path or None, a.train_tokens, a.eval_tokens)


def _resumed(path, settings):
    """The runs an earlier bench with the same settings saved to path (none if it differs or is absent)."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        old = json.load(f)
    same = json.loads(json.dumps(settings))
    diff = sorted(k for k in same if k not in ("seeds", "methods", "jobs") and old["settings"].get(k) != same[k])
    if diff:
        raise SystemExit(f"bench_lm: {path} was written with other settings ({', '.join(diff)}); "
                         "drop --resume or give another --tag")
    return old["rows"]


def _best(r):
    """(validation perplexity, test perplexity) at the run's best evaluation (its last where none are kept)."""
    evals = [e for e in r.get("evals") or [] if e[0] > 0] or [(0, r["val_loss"], r["test_loss"])]
    _, v, t = min(evals, key=lambda e: e[1])
    return math.exp(v), math.exp(t)


def _mean(xs):
    return sum(xs) / len(xs)


def _spread(xs):
    m = _mean(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0


def table(rows, a, data_desc):
    fixed = [r["train_s_per_step"] for r in rows if r["method"] == "fixed"]
    ft = _mean(fixed) if fixed else None
    out = [f"Jane Austen (stn_ext.corpus; {data_desc}), LSTM {'-'.join(map(str, a.hidden))} with a tied embedding, "
           f"the seven hyperparameters from 0.05 (fixed (awd): AWD-LSTM's values); {a.steps} weight steps of "
           f"{a.batch_size} x {a.bptt} tokens; random, tpe: 4 trials of {a.steps // 4} steps. Perplexity at the "
           "last evaluation; +- the spread (std) over seeds; best val: the lowest validation perplexity of the run's "
           "evaluations (for random and tpe: of the chosen trial's last), with the test perplexity there; time: "
           "the trainer's step time against fixed's.", "",
           "| method | val ppl | test ppl | per seed (test) | best val (test there) | time/step vs fixed | "
           "final hyperparameters (seed 0) |",
           "|---|---|---|---|---|---|---|"]
    for m in METHODS:
        rs = [r for r in rows if r["method"] == m]
        if not rs:
            continue
        v, t = [r["val_ppl"] for r in rs], [r["test_ppl"] for r in rs]
        hyp = ", ".join(f"{k.replace('dropout.', '')} {x:.2g}" for k, x in rs[0]["hypers"].items())
        best = [_best(r) for r in rs]
        ratio = f"{_mean([r['train_s_per_step'] for r in rs]) / ft:.2f}x" if fixed else "- (no fixed run)"
        out.append(f"| {m} | {_mean(v):.1f} +- {_spread(v):.1f} | {_mean(t):.1f} +- {_spread(t):.1f} | "
                   f"{', '.join(f'{x:.1f}' for x in t)} | {_mean([b[0] for b in best]):.1f} "
                   f"({_mean([b[1] for b in best]):.1f}) | "
                   f"{ratio} | {hyp} |")
    return "\n".join(out)


def plot(rows, path):
    """The seven schedules of stn and delta-stn (one line per seed) beside the values the baselines used."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench_tuning import plot_schedules

    plot_schedules([r for r in rows if r["method"] != "fixed (awd)"], path, METHODS,
                   "LSTM language model on Jane Austen: the seven hyperparameters", columns=4)


def _parse_sets(items):
    import ast

    out = {}
    for item in items:
        k, v = item.split("=", 1)
        out[k.strip()] = ast.literal_eval(v)
    return out


def parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", default="austen", choices=["austen", "ptb"])
    p.add_argument("--data-path", default="")
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--evals", type=int, default=4, help="evaluations per run (each reads the validation and test "
                                                        "splits: ~20 s here)")
    p.add_argument("--hidden", type=lambda s: [int(x) for x in s.split(",")], default=[128, 128])
    p.add_argument("--batch-size", type=int, default=20)
    p.add_argument("--bptt", type=int, default=35)
    p.add_argument("--train-tokens", type=int, default=100000, help="training tokens (default 100k: fixed 0.05 overfits within the run; 0: all 677k)")
    p.add_argument("--eval-tokens", type=int, default=0, help="validation and test tokens (0: all)")
    p.add_argument("--methods", type=lambda s: s.split(","), default=list(METHODS))
    p.add_argument("--jobs", type=int, default=2, help="runs at once, one process each (default 2)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run (default 1)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="a TrainConfig field for every run")
    p.add_argument("--quick", action="store_true", help="a tiny run of every method (what the test runs)")
    p.add_argument("--resume", action="store_true", help="keep the runs the JSON of this date and tag already holds "
                                                         "(written after each run) and run the others")
    p.add_argument("--tag", default="")
    p.add_argument("--out", default=RESULTS)
    return p


def parse(argv=None):
    """The bench's settings (--set parsed into a dict), from the command line or argv."""
    a = parser().parse_args(argv)
    a.set = _parse_sets(a.set)
    return a


def main(argv=None):
    p = parser()
    a = parse(argv)
    bad = set(a.methods) - set(METHODS)
    if bad:
        p.error(f"unknown methods {sorted(bad)}; choose from {', '.join(METHODS)}")
    if a.quick:
        a.seeds, a.steps, a.evals, a.hidden, a.train_tokens, a.eval_tokens, a.jobs = 1, 16, 2, [8, 8], 20000, 3000, 1
        a.set.setdefault("warmup_steps", 4)
    stem = "lm-" + ("quick" if a.quick else datetime.date.today().isoformat()) + (f"-{a.tag}" if a.tag else "")
    os.makedirs(a.out, exist_ok=True)
    json_path = os.path.join(a.out, stem + ".json")
    settings = {k: v for k, v in vars(a).items() if k not in ("out", "resume")}
    rows = _resumed(json_path, settings) if a.resume else []
    held = {(r["method"], r["seed"]) for r in rows}
    jobs = [(a, m, seed) for seed in range(a.seeds) for m in METHODS if m in a.methods and (m, seed) not in held]
    t0 = time.perf_counter()

    def save(r):  # each run is in the JSON as soon as it ends: an interrupted bench loses only the runs under way
        rows.append(r)
        print(f"lm {r['method']} seed {r['seed']}: val ppl {r['val_ppl']:.1f}, test ppl {r['test_ppl']:.1f}, "
              f"{r['elapsed_s']:.0f} s", file=sys.stderr, flush=True)
        atomic_write_json(json_path, json.loads(json.dumps({"settings": settings, "rows": rows, "partial": True})))

    data = None
    if a.jobs > 1 and len(jobs) > 1:
        with multiprocessing.get_context("spawn").Pool(min(a.jobs, len(jobs))) as pool:
            for r in pool.imap(_job, jobs):
                save(r)
    else:
        data = _data(a)
        for a_, m, seed in jobs:
            save(lm_run(a_, m, seed, data))
    rows.sort(key=lambda r: (r["seed"], METHODS.index(r["method"])))
    if data is None:  # the split sizes for the table (the workers loaded their own)
        data = _data(a)
    desc = (f"{len(data.train.x) * a.bptt} training tokens in {len(data.train.x) // a.batch_size} batches, "
            f"{len(data.val.x) * a.bptt} validation, {len(data.test.x) * a.bptt} test")
    res = {"date": datetime.date.today().isoformat(), "torch": torch.__version__, "wall_s": time.perf_counter() - t0,
           "settings": settings, "data": desc, "rows": rows}
    atomic_write_json(json_path, json.loads(json.dumps(res)))
    md = [f"# LSTM language model, seven hyperparameters ({res['date']}, torch {res['torch']})", "",
          table(rows, a, desc), "", f"Whole bench: {res['wall_s'] / 60:.0f} minutes, {a.jobs} runs at once, "
          f"{a.threads} thread(s) each."]
    atomic_write_text(os.path.join(a.out, stem + ".md"), "\n".join(md) + "\n")
    if any(r["trajectory"] for r in rows):
        plot(rows, os.path.join(a.out, stem + ".png"))
    print("wrote", os.path.join(a.out, stem + ".md"))
    return res


if __name__ == "__main__":
    main()
