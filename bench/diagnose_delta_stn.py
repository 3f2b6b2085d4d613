"""Why Delta-STN's dropout rates move little (issue 22): three measurements (docs/trainer.md, "Why Delta-STN
tunes little"; results in bench/results/delta-stn-diagnosis-*.md).

toy        input dropout on linear regression (stn_ext.tuning.problems.DropoutRegression): the rate a method
           reaches from 0.05 against the closed-form optimum, and its learned response V W_h against the closed
           form dw/du (cosine, length ratio) over the run.
hypergrad  Fashion-MNIST MLP 784-256-256-10, three dropout rates: the hypergradient of u at every hyper step,
           summarised over six windows (mean, spread, fraction negative).
lookahead  after --steps weight steps of a Delta-STN run: the hypergradient through the learned response on the
           whole validation set, against finite differences of plain training continued K steps at u +- h with
           common random numbers (the same batches and uniform draws for the dropout masks).

    python bench/diagnose_delta_stn.py toy
    python bench/diagnose_delta_stn.py hypergrad --method delta-stn --set perturb=example --set scale_init=1.0
    python bench/diagnose_delta_stn.py lookahead --steps 2000 --K 100 500 1500
"""
import argparse
import ast
import copy

import torch
import torch.nn.functional as F

import stn_ext
from stn_ext.tuning import TrainConfig, Trainer
from stn_ext.tuning.augment import BatchRandom
from stn_ext.tuning.divergence import Diverged
from stn_ext.tuning.models import mlp, regularisers
from stn_ext.tuning.problems import DropoutRegression


def toy(a, sets):
    prob = DropoutRegression()
    print(f"closed-form optimal rate {prob.optimum():.3f}; from 0.05, {a.steps} steps, full batch")
    for method in ("delta-stn", "stn"):
        for perturb in ("batch", "example"):
            cfg = TrainConfig(method=method, hypers=("dropout",), inits={"dropout": 0.05}, steps=a.steps,
                              batch_size=prob.n_train, perturb=perturb, seed=a.seed, quiet=True, **sets)
            torch.manual_seed(a.seed)
            tr = Trainer(cfg, data=prob.dataset(), model=prob.model())
            layer = tr.tuner.layers[0]
            rows = []
            for chunk in range(10):
                tr.cfg.steps = (chunk + 1) * a.steps // 10  # fit() runs to cfg.steps; continue chunk by chunk
                try:
                    tr.fit()
                except Diverged as e:
                    print(f"{method} per {perturb}: {e}")
                    break
                u = float(tr.u.detach())
                learned = (layer.hyper_weight[:, 0:1] * layer.weight_hyper).detach().double().reshape(-1)
                true = prob.response_jacobian(u)
                cos = float(learned @ true / (learned.norm() * true.norm() + 1e-30))
                rows.append((tr.step, prob.rate(u), cos, float(learned.norm() / true.norm())))
            if len(rows) > 1:
                print(f"{method} per {perturb}: " + "; ".join(f"step {s} rate {p:.3f} cos {c:.2f} ratio {r:.2f}"
                                                             for s, p, c, r in rows[1::3]))


def fashion_trainer(a, sets, eval_every):
    from stn_ext.data import fashion_mnist

    cfg = TrainConfig(method=a.method, hypers=("dropout",), steps=a.steps, batch_size=100, seed=a.seed, quiet=True,
                      plots=False, eval_every=eval_every, **sets)
    torch.manual_seed(a.seed)
    return Trainer(cfg, data=fashion_mnist(train_size=10000), model=mlp(784, 10, 3, (256, 256)))


def hypergrad(a, sets):
    tr = fashion_trainer(a, sets, max(10, a.steps // 40))
    grads, step = [], tr.tuner.hyper_step

    def recording(*args, **kw):
        out = step(*args, **kw)
        grads.append(tr.tuner.u.grad.detach().clone())
        return out

    tr.tuner.hyper_step = recording
    s = tr.fit()
    g = torch.stack(grads)
    print(f"{a.method} {sets}: final test loss {s['test_loss']:.4f}, rates",
          {k: round(v, 3) for k, v in s["hypers"].items()})
    k = max(1, len(g) // 6)
    for i in range(0, len(g), k):
        w = g[i:i + k]
        print(f"  hyper steps {i}-{i + len(w)}: mean {[round(float(x), 5) for x in w.mean(0)]}, "
              f"sd {[round(float(x), 5) for x in w.std(0)]}, negative {[round(float(x), 2) for x in (w < 0).double().mean(0)]}")


def lookahead(a, sets):
    tr = fashion_trainer(a, sets, a.steps)
    tr.fit()
    tu, model = tr.tuner, tr.tuner.model
    xv, yv, xt, yt = tr.data.val.x, tr.data.val.y, tr.data.train.x, tr.data.train.y
    model.eval()
    z = torch.zeros(len(tu.space), requires_grad=True)
    with stn_ext.hyper_input(z):
        (g,) = torch.autograd.grad(F.cross_entropy(model(xv), yv), z)
    print(f"rates {tu.hyperparameters()}; through the learned response, all validation images: "
          f"{[round(float(x), 5) for x in g]}")
    u0 = tu.u.detach().clone()

    def val_after(du, K):
        m = copy.deepcopy(model).train()
        opt = torch.optim.SGD(m.parameters(), lr=tr.cfg.lr, momentum=tr.cfg.momentum)
        gen = torch.Generator().manual_seed(123)  # the same batches and mask draws at u + du and u - du
        vals = tu.space.to_values(u0 + du)
        rates = {slot: vals[i] for slot, i in tu.drop.items()}
        for _ in range(K):
            idx = torch.randint(0, len(yt), (100,), generator=gen)
            with regularisers(rates, BatchRandom(gen, 100)), stn_ext.elementary():
                loss = F.cross_entropy(m(xt[idx]), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad(), stn_ext.elementary():
            return float(F.cross_entropy(m.eval()(xv), yv))

    for K in a.K:
        fd = []
        for i in range(len(u0)):
            e = torch.zeros_like(u0)
            e[i] = a.h
            fd.append((val_after(e, K) - val_after(-e, K)) / (2 * a.h))
        print(f"K = {K}: finite-difference lookahead (h = {a.h}): {[round(x, 5) for x in fd]}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["toy", "hypergrad", "lookahead"])
    p.add_argument("--method", default="delta-stn", choices=["stn", "delta-stn"], help="hypergrad, lookahead")
    p.add_argument("--steps", type=int, default=None, help="weight steps (toy 3000, hypergrad 4000, lookahead 2000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--K", type=int, nargs="+", default=[100, 500, 1500], help="lookahead: steps of plain training")
    p.add_argument("--h", type=float, default=0.5, help="lookahead: the step in u of the finite difference")
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="a TrainConfig field (repeatable)")
    a = p.parse_args(argv)
    a.steps = a.steps or {"toy": 3000, "hypergrad": 4000, "lookahead": 2000}[a.what]
    sets = {}
    for item in a.set:
        name, _, value = item.partition("=")
        try:
            sets[name] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            sets[name] = value
    torch.set_num_threads(1)
    {"toy": toy, "hypergrad": hypergrad, "lookahead": lookahead}[a.what](a, sets)


if __name__ == "__main__":
    main()
