"""An exact hypergradient against the plain training run it differentiates (issue 24): time and memory.

The model of the schedules problem (784-50-50-50-10 tanh, batch 200, float64, T steps of SGD with momentum 0.9,
lr 0.1; random inputs of Fashion-MNIST's shape: the cost does not depend on the pixels) trained three ways, each
in a fresh process (peak resident memory is per process):

  plain       torch.optim.SGD(momentum=0.9) for T steps, loss.backward() each step: the run itself
  reversible  stn_ext.reversible.train_and_evaluate (exact fixed-point SGD, T steps forward), then
              objective.backward(): T reverse steps of one gradient and one Hessian-vector product each, giving
              the hypergradient w.r.t. the (T,) learning-rate and momentum schedules and the initial weights
  unrolled    the same SGD written as differentiable torch ops, create_graph through all T steps, then one
              backward: the same hypergradient by storing the whole trajectory's graph

Reported: seconds (median of --repeats), the ratio to plain, and the peak resident memory each process added
over its state before the run (ru_maxrss), per T. Writes bench/results/hypergradient-<date>.{md,json}.

    python bench/bench_hypergradient.py                 # T = 50, 100, 200; ~3 minutes on this machine
"""
import argparse
import datetime
import json
import multiprocessing
import os
import resource
import statistics
import time

import torch

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
    xs, ys, _, _ = data
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    t0 = time.perf_counter()
    for t in range(T):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(xs[t]), ys[t]).backward()
        opt.step()
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


def _measure(args):
    """In a fresh process: one warm-up call at a small T, then the timed call; seconds and the peak resident
    memory it added over the model and data (MiB)."""
    name, T, threads = args
    torch.set_num_threads(threads)
    VARIANTS[name](2, _model(), _data(2))
    model, data = _model(), _data(T)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    s = VARIANTS[name](T, model, data)
    return s, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--T", type=lambda s: [int(x) for x in s.split(",")], default=[50, 100, 200])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=RESULTS)
    p.add_argument("--tag", default="")
    a = p.parse_args(argv)
    ctx = multiprocessing.get_context("spawn")
    rows = []
    for T in a.T:
        row = {"T": T}
        for name in VARIANTS:
            runs = []
            for _ in range(a.repeats):
                with ctx.Pool(1) as pool:
                    runs.append(pool.apply(_measure, ((name, T, a.threads),)))
            row[name] = {"s": statistics.median(r[0] for r in runs), "mib": max(r[1] for r in runs)}
        rows.append(row)
        print(f"T {T}: " + ", ".join(f"{n} {row[n]['s']:.2f} s / {row[n]['mib']:.0f} MiB" for n in VARIANTS), flush=True)
    date = datetime.date.today().isoformat()
    lines = [f"# Exact hypergradient against plain training ({date}, torch {torch.__version__}, {a.threads} thread(s))",
             "", "MLP 784-50-50-50-10 tanh, batch 200, float64; median of "
             f"{a.repeats} runs, each in a fresh process; memory: the peak resident memory the run added over its model "
             "and data (the T batches are made before).", "",
             "| T | plain s | reversible s (x plain) | unrolled s (x plain) | plain MiB | reversible MiB | unrolled MiB |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        pl = r["plain"]["s"]
        lines.append(f"| {r['T']} | {pl:.2f} | {r['reversible']['s']:.2f} ({r['reversible']['s'] / pl:.2f}x) | "
                     f"{r['unrolled']['s']:.2f} ({r['unrolled']['s'] / pl:.2f}x) | {r['plain']['mib']:.0f} | "
                     f"{r['reversible']['mib']:.0f} | {r['unrolled']['mib']:.0f} |")
    stem = f"hypergradient-{date}" + (f"-{a.tag}" if a.tag else "")
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, stem + ".md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(a.out, stem + ".json"), "w") as f:
        json.dump({"date": date, "torch": torch.__version__, "threads": a.threads, "rows": rows}, f, indent=1)
    print("\n".join(lines))
    return rows


if __name__ == "__main__":
    main()
