"""An exact hypergradient against the plain training run it differentiates (issue 24): time and memory.

The model of the schedules problem (784-50-50-50-10 tanh, batch 200, float64, T steps of SGD with momentum 0.9,
lr 0.1; random inputs of Fashion-MNIST's shape: the cost does not depend on the pixels) trained three ways, each
in a fresh process (peak resident memory is per process):

  plain       torch.optim.SGD(momentum=0.9) for T steps, loss.backward() each step, then the validation loss once
              (no gradient): the run itself, giving the objective whose gradient the two others compute
  reversible  stn_ext.reversible.train_and_evaluate (exact fixed-point SGD, T steps forward), then
              objective.backward(): T reverse steps of one gradient and one Hessian-vector product each, giving
              the hypergradient w.r.t. the (T,) learning-rate and momentum schedules and the initial weights
  unrolled    the same SGD written as differentiable torch ops, create_graph through all T steps, then one
              backward: the same hypergradient by storing the whole trajectory's graph

Reported per T: seconds (median over --rounds interleaved rounds in one process), the ratio to plain (the median of
the rounds' ratios, with its range), and the peak resident memory one run added in a fresh process (ru_maxrss). Writes bench/results/hypergradient-<date>.{md,json}.

    python bench/bench_hypergradient.py                 # T = 50, 100, 200; ~2 minutes on this machine
"""
import argparse
import datetime
import multiprocessing
import os
import resource
import statistics
import time

import torch

from stn_ext.checkpoint import atomic_write_json, atomic_write_text

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
SIZES = (784, 50, 50, 50, 10)
BATCH = 200


def _model():
    layers = []
    for a, b in zip(SIZES[:-1], SIZES[1:]):
        layers += [torch.nn.Linear(a, b), torch.nn.Tanh()]
    return torch.nn.Sequential(*layers[:-1]).double()


def _data(T):
    g = torch.Generator().manual_seed(0)
    xs = torch.randn(T, BATCH, SIZES[0], generator=g, dtype=torch.float64)
    ys = torch.randint(0, SIZES[-1], (T, BATCH), generator=g)
    xv, yv = torch.randn(1000, SIZES[0], generator=g, dtype=torch.float64), torch.randint(0, 10, (1000,), generator=g)
    return xs, ys, xv, yv


def plain(T, model, data):
    xs, ys, xv, yv = data
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    t0 = time.perf_counter()
    for t in range(T):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(xs[t]), ys[t]).backward()
        opt.step()
    with torch.no_grad():
        torch.nn.functional.cross_entropy(model(xv), yv)
    return time.perf_counter() - t0


def reversible(T, model, data):
    from stn_ext.reversible import train_and_evaluate

    xs, ys, xv, yv = data
    lr = torch.full((T,), 0.1, dtype=torch.float64, requires_grad=True)
    mom = torch.full((T,), 0.9, dtype=torch.float64, requires_grad=True)
    t0 = time.perf_counter()
    obj = train_and_evaluate(model, lambda net, t, meta: torch.nn.functional.cross_entropy(net(xs[t]), ys[t]),
                             lambda net, meta: torch.nn.functional.cross_entropy(net(xv), yv), None, T, lr, mom)
    obj.backward()
    return time.perf_counter() - t0


def unrolled(T, model, data):
    xs, ys, xv, yv = data
    names = [n for n, _ in model.named_parameters()]
    lr = torch.full((T,), 0.1, dtype=torch.float64, requires_grad=True)
    mom = torch.full((T,), 0.9, dtype=torch.float64, requires_grad=True)
    t0 = time.perf_counter()
    w = [p.detach().clone().requires_grad_(True) for p in model.parameters()]
    v = [torch.zeros_like(p) for p in w]
    for t in range(T):
        loss = torch.nn.functional.cross_entropy(torch.func.functional_call(model, dict(zip(names, w)), (xs[t],)), ys[t])
        g = torch.autograd.grad(loss, w, create_graph=True)
        v = [mom[t] * vi - (1 - mom[t]) * gi for vi, gi in zip(v, g)]
        w = [wi + lr[t] * vi for wi, vi in zip(w, v)]
    val = torch.nn.functional.cross_entropy(torch.func.functional_call(model, dict(zip(names, w)), (xv,)), yv)
    val.backward()
    return time.perf_counter() - t0


VARIANTS = {"plain": plain, "reversible": reversible, "unrolled": unrolled}


def _memory(args):
    """In a fresh process: one warm-up call at a small T, then one call; the peak resident memory it added over
    the model and data (MiB)."""
    name, T, threads = args
    torch.set_num_threads(threads)
    VARIANTS[name](2, _model(), _data(2))
    model, data = _model(), _data(T)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    VARIANTS[name](T, model, data)
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024


def _times(args):
    """In a fresh process: a warm-up round, then ``rounds`` rounds that each time every variant once, one after
    the other (so that a slow spell of a shared machine falls on all of them); {name: [seconds per round]}."""
    T, threads, rounds = args
    torch.set_num_threads(threads)
    data = _data(T)
    out = {name: [] for name in VARIANTS}
    for r in range(rounds + 1):
        for name, run in VARIANTS.items():
            s = run(T, _model(), data)
            if r:
                out[name].append(s)
    return out


def _row(T, times, mib):
    """Median seconds, the per-round ratio to plain (median, min, max) and the memory of each variant."""
    row = {"T": T}
    for name in VARIANTS:
        ratios = [s / p for s, p in zip(times[name], times["plain"])]
        row[name] = {"s": statistics.median(times[name]), "rounds": times[name], "x_plain": statistics.median(ratios),
                     "x_min": min(ratios), "x_max": max(ratios), "mib": mib[name]}
    return row


def _table(rows, date, threads, rounds):
    lines = [f"# Exact hypergradient against plain training ({date}, torch {torch.__version__}, {threads} thread(s))",
             "", "MLP 784-50-50-50-10 tanh, batch 200, float64. Time: in one fresh process per T, a warm-up round "
             f"then {rounds} rounds, each running plain, reversible and unrolled once, one after the other; seconds are "
             "the median over rounds, x plain the median of the rounds' ratios [lowest-highest]. Plain includes one "
             "evaluation of the validation loss (the objective the others differentiate). Memory: in a fresh process "
             "per variant, the peak resident memory one run added over its model and data (the T batches are made "
             "before).", "",
             "| T | plain s | reversible s | x plain | unrolled s | x plain | plain MiB | reversible MiB | unrolled MiB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cells = [str(r["T"]), f"{r['plain']['s']:.3f}"]
        for name in ("reversible", "unrolled"):
            v = r[name]
            cells += [f"{v['s']:.3f}", f"{v['x_plain']:.2f}x [{v['x_min']:.2f}-{v['x_max']:.2f}]"]
        cells += [f"{r[name]['mib']:.0f}" for name in VARIANTS]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--T", type=lambda s: [int(x) for x in s.split(",")], default=[50, 100, 200])
    p.add_argument("--rounds", type=int, default=9, help="timed rounds per T (default 9)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=RESULTS)
    p.add_argument("--tag", default="")
    a = p.parse_args(argv)
    ctx = multiprocessing.get_context("spawn")
    rows = []
    for T in a.T:
        with ctx.Pool(1) as pool:
            times = pool.apply(_times, ((T, a.threads, a.rounds),))
        mib = {}
        for name in VARIANTS:
            with ctx.Pool(1) as pool:
                mib[name] = pool.apply(_memory, ((name, T, a.threads),))
        rows.append(_row(T, times, mib))
        print(f"T {T}: " + ", ".join(f"{n} {rows[-1][n]['s']:.3f} s ({rows[-1][n]['x_plain']:.2f}x) / "
                                     f"{mib[n]:.0f} MiB" for n in VARIANTS), flush=True)
    date = datetime.date.today().isoformat()
    lines = _table(rows, date, a.threads, a.rounds)
    stem = f"hypergradient-{date}" + (f"-{a.tag}" if a.tag else "")
    os.makedirs(a.out, exist_ok=True)
    atomic_write_text(os.path.join(a.out, stem + ".md"), "\n".join(lines) + "\n")
    atomic_write_json(os.path.join(a.out, stem + ".json"),
                      {"date": date, "torch": torch.__version__, "threads": a.threads, "rounds": a.rounds, "rows": rows})
    print("\n".join(lines))
    return rows


if __name__ == "__main__":
    main()
