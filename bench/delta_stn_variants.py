"""Run a bench script with Delta-STN's per-batch response changed in ways the trainer has no option for (issue 22,
docs/trainer.md "Forward mode's lessons for Delta-STN's response" and "Delta-STN's response where masks are drawn"):
measurements of variants, not defaults.

    python bench/delta_stn_variants.py [--v-near-one] [--coordinate] [--difference-pace P] [--path-cap C]
                                       [--row-normalised] [--gradient-where-masked] [--nudge-v K]
                                       [--nudge-weights K] [--near-one-columns K]
                                       [--watch-cap N] SCRIPT [ARGS...]

--v-near-one       the response's start V, C = 1 + N(0, 0.01) (W_h = b_h = 0) on every space; the defaults take it
                   where a tuned rate draws masks (defaults.difference_settings), else V ~ N(0, 1/n) with rows raised
                   to length 1 (models.init_response)
--coordinate       the response step perturbs one hyperparameter at a time, in turn: eps = sqrt(n) s e_k, s a random
                   sign (E[eps eps^T] = I, as for a Gaussian eps), instead of a Gaussian draw on every coordinate
--difference-pace  the pace of the response fitted by difference relative to the weights', on every space
                   (defaults.DIFFERENCE_PACE 0.5 and MASKED_DIFFERENCE_PACE 0.1)
--path-cap         defaults.PATH_CAP (0.5; 0: none): the cap on each gate's path at one sigma, relative to its weights'
                   row, where masks are drawn (models.cap_path)
--row-normalised   per batch, the response's steps by difference divided on each gate by |V_r|^2 + |W_h,r|^2 (its
                   factors' sizes), so that the product steps at the pace whatever they are
--gradient-where-masked
                   response_fit 'auto' fits Delta-STN's response per batch by the gradient where a tuned rate draws
                   masks, as the defaults did until December 7 (twenty-eighth session)
--nudge-v K        V's start (and a roll-back's restart) times 1 + K 1e-7, about K float32 rounding steps: how far a
                   change that small moves a run (docs/trainer.md, "How far one seed's figure can be trusted")
--nudge-weights K  the general weights (W_e, b_e and the rest) times 1 + K 1e-7 once the tuner is built (any method)
--near-one-columns K
                   where the response starts near V = 1, only the first K columns of V and C do; the others start at
                   0.1 N(0, 1) (the CNN protocol's four rates come first, cutout's two after)
--watch-cap N      print, every N response steps, how much of each layer models.cap_path shortened (no value changes)

SCRIPT is a file in bench/ (or a path) run as __main__ with ARGS, in this process, e.g.

    python bench/delta_stn_variants.py --path-cap 0 bench_tuning.py --only cnn --cnn-methods delta-stn
"""
import argparse
import math
import os
import runpy
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from stn_ext.tuning import core, defaults, models  # noqa: E402


def coordinate_response_draws():
    """Tuner._eps, inside Delta-STN's response step (by gradient or by difference) per batch: one coordinate."""
    T = core.Tuner
    eps, response_step, by_difference = T._eps, T._response_step, core.response_steps.general_and_difference

    def one_coordinate(self, rnd):
        if not getattr(self, "_in_response", False) or self.perturb == "example":
            return eps(self, rnd)
        n = len(self.space)
        k = getattr(self, "_next_coordinate", 0)
        self._next_coordinate = k + 1
        out = torch.zeros(n, device=rnd.generator.device)
        out[k % n] = math.sqrt(n) * torch.sign(rnd.shared_randn(1))[0]
        return out

    def in_response(f):
        def step(self, *args, **kw):
            self._in_response = True
            try:
                return f(self, *args, **kw)
            finally:
                self._in_response = False
        return step

    T._eps = one_coordinate
    T._response_step = in_response(response_step)
    core.response_steps.general_and_difference = in_response(by_difference)


def v_near_one():
    init = models.init_response

    def started_near_one(layers, floor=0.0, near_one=False):
        init(layers, floor, True)
    models.init_response = started_near_one  # start_response calls it by its module name


def gradient_where_masked():
    fit = defaults.response_fit

    def response_fit(f, method, perturb, kinds, linearize, rows, centred=True):
        got = fit(f, method, perturb, kinds, linearize, rows, centred)
        if f == "auto" and got == "difference" and not defaults.smooth(kinds):
            return "gradient"
        return got
    defaults.response_fit = response_fit  # the Tuner and config.response_fit_of call it by its module name


def nudge_v(k):
    init = models.init_response

    def nudged(layers, floor=0.0, near_one=False):
        init(layers, floor, near_one)
        for m in layers:
            m.hyper_weight.mul_(1 + 1e-7 * k)
    models.init_response = nudged  # start_response calls it by its module name


def near_one_columns(k):
    """Where the response starts near V = 1, only V's and C's first ``k`` columns do (the protocol's dropout rates,
    listed first); the others start at 0.1 N(0, 1), so those hyperparameters' responses are not tied to the rates'
    shared W_h from the start and learn their own scale and sign per row."""
    init = models.init_response

    def started(layers, floor=0.0, near_one=False):
        init(layers, floor, near_one)
        if near_one:
            for m in layers:
                for v in (m.hyper_weight,) if m.hyper_bias is None else (m.hyper_weight, m.hyper_bias):
                    v[:, k:] = 0.1 * torch.randn_like(v[:, k:])
    models.init_response = started  # start_response calls it by its module name


def watch_cap(every, out=sys.stderr):
    """Print, every ``every`` calls of models.cap_path (one a response step), per layer over those calls: the share of
    gate rows it shortened, the median and the largest ratio of a row's path at one sigma to its limit. Changes no
    value: the cap runs as it is after the reading."""
    cap, seen = models.cap_path, []

    def watched(layers, sigma, limit):
        with torch.no_grad():
            rows = []
            for m in layers:
                path, allowed = models.path_and_limit(m, sigma, limit)
                r = path / allowed
                rows.append(((r > 1).float().mean().item(), r.median().item(), r.max().item()))
            seen.append(rows)
        cap(layers, sigma, limit)
        if len(seen) % every == 0:
            window = seen[-every:]
            print(f"cap_path calls {len(seen) - every + 1}-{len(seen)}: " + " | ".join(
                f"layer {k}: shortened {sum(w[k][0] for w in window) / every:.2f}, ratio median "
                f"{sum(w[k][1] for w in window) / every:.2f} max {max(w[k][2] for w in window):.2f}"
                for k in range(len(window[0]))), file=out, flush=True)
    models.cap_path = watched  # response_steps calls it by its module name


def nudge_weights(k):
    build = core.Tuner.__init__

    def nudged(self, *args, **kw):
        build(self, *args, **kw)
        with torch.no_grad():
            for p in self.general_params:
                p.mul_(1 + 1e-7 * k)
    core.Tuner.__init__ = nudged


def _row_scales(m):
    """1 / (|V_r|^2 + |W_h,r|^2) per gate r, and 1 / (|C_r|^2 + b_h,r^2) per bias entry (or None): gradient
    descent on a product V_r W_h,r steps the product at the sum of its factors' squares times the step, so dividing
    both factors' steps by it steps the product at the pace whatever their sizes."""
    w = 1 / (m.hyper_weight.detach().square().sum(1) + m.gate_rows(m.weight_hyper.detach()).square().sum(1))
    b = None
    if m.hyper_bias is not None:
        b = 1 / (m.hyper_bias.detach().square().sum(1) + m.bias_hyper.detach().square())
    return w, b


def row_normalised():
    """Per batch, the response's steps by difference divided, on each gate r, by |V_r|^2 + |W_h,r|^2 (and on each bias
    entry by |C_r|^2 + b_h,r^2; ``_row_scales``), after the draw's own scaling: the product J_r = V_r W_h,r then
    steps at DIFFERENCE_PACE whatever its factors' sizes, where plain gradient steps grow with them."""
    rs = core.response_steps
    scaled = rs._scaled

    def by_rows(t, diffs, d, sigma, weights=None):
        out = scaled(t, diffs, d, sigma, weights)
        if d.dim() != 1:
            return out
        scales = []  # in response_params' order: W_h, V[, b_h, C] per layer
        for m in t.layers:
            w, b = _row_scales(m)
            scales += [w.view(m.gate_shape()), w[:, None]] + ([] if b is None else [b, b[:, None]])
        for g, s in zip(out, scales, strict=True):
            g.mul_(s)
        return out
    rs._scaled = by_rows


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--v-near-one", action="store_true")
    p.add_argument("--coordinate", action="store_true")
    p.add_argument("--difference-pace", type=float, default=None)
    p.add_argument("--path-cap", type=float, default=None)
    p.add_argument("--row-normalised", action="store_true")
    p.add_argument("--gradient-where-masked", action="store_true")
    p.add_argument("--nudge-v", type=float, default=0.0)
    p.add_argument("--nudge-weights", type=float, default=0.0)
    p.add_argument("--near-one-columns", type=int, default=None)
    p.add_argument("--watch-cap", type=int, default=0)
    p.add_argument("script")
    p.add_argument("args", nargs=argparse.REMAINDER)
    a = p.parse_args()
    if a.coordinate:
        coordinate_response_draws()
    if a.v_near_one:
        v_near_one()
    if a.row_normalised:
        row_normalised()
    if a.gradient_where_masked:
        gradient_where_masked()
    if a.nudge_v:
        nudge_v(a.nudge_v)
    if a.nudge_weights:
        nudge_weights(a.nudge_weights)
    if a.near_one_columns is not None:
        near_one_columns(a.near_one_columns)
    if a.watch_cap:
        watch_cap(a.watch_cap)
    if a.path_cap is not None:
        defaults.PATH_CAP = a.path_cap
    if a.difference_pace is not None:
        defaults.DIFFERENCE_PACE = defaults.MASKED_DIFFERENCE_PACE = a.difference_pace
    print(f"delta_stn_variants: v_near_one={a.v_near_one} coordinate={a.coordinate} difference paces "
          f"{defaults.DIFFERENCE_PACE}, {defaults.MASKED_DIFFERENCE_PACE} path_cap={defaults.PATH_CAP} "
          f"row_normalised={a.row_normalised} gradient_where_masked={a.gradient_where_masked} nudge_v={a.nudge_v} "
          f"nudge_weights={a.nudge_weights} near_one_columns={a.near_one_columns} watch_cap={a.watch_cap}",
          file=sys.stderr, flush=True)
    script = a.script if os.path.sep in a.script else os.path.join(HERE, a.script)
    sys.argv = [script] + a.args
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
