"""Run a bench script with Delta-STN's per-batch response changed in ways the trainer has no option for (issue 22,
docs/trainer.md "Forward mode's lessons for Delta-STN's response"): measurements of variants, not defaults.

    python bench/delta_stn_variants.py [--v-near-one] [--coordinate] [--difference-pace P] SCRIPT [ARGS...]

--v-near-one       the response's start V, C = 1 + N(0, 0.01) (W_h = b_h = 0) instead of N(0, 1/n) with rows raised
                   to length 1 (models.init_response): every rate's response alike at the start, each row's pace about
                   n times the default's
--coordinate       the response step perturbs one hyperparameter at a time, in turn: eps = sqrt(n) s e_k, s a random
                   sign (E[eps eps^T] = I, as for a Gaussian eps), instead of a Gaussian draw on every coordinate
--difference-pace  defaults.DIFFERENCE_PACE (0.5): the pace of the response fitted by difference (response_fit
                   'difference'), relative to the weights'
--delta-stn-difference
                   response_fit 'auto' takes the difference for Delta-STN per batch whatever it tunes (the defaults
                   take it where every tuned hyperparameter acts smoothly), so that a bench's other methods keep theirs

SCRIPT is a file in bench/ (or a path) run as __main__ with ARGS, in this process, e.g.

    python bench/delta_stn_variants.py --v-near-one --difference-pace 0.1 bench_tuning.py --only fashion \\
        --fashion-methods delta-stn --fashion-seeds 2 --set response_fit=difference --set response_gain_max=1.0
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
    def init_response(layers, floor=0.0):
        for m in layers:
            m.weight_hyper.zero_()
            m.hyper_weight.copy_(1 + 0.1 * torch.randn_like(m.hyper_weight))
            if m.bias_hyper is not None:
                m.bias_hyper.zero_()
                m.hyper_bias.copy_(1 + 0.1 * torch.randn_like(m.hyper_bias))
    models.init_response = init_response  # start_response calls it by its module name


def delta_stn_difference():
    fit = defaults.response_fit

    def response_fit(f, method, perturb, kinds, linearize, rows, centred=True):
        if f == "auto" and method == "delta-stn" and perturb == "batch" and not linearize and rows == 1:
            return "difference"
        return fit(f, method, perturb, kinds, linearize, rows, centred)
    defaults.response_fit = response_fit  # the Tuner and config.response_fit_of call it by its module name


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--v-near-one", action="store_true")
    p.add_argument("--coordinate", action="store_true")
    p.add_argument("--difference-pace", type=float, default=None)
    p.add_argument("--delta-stn-difference", action="store_true")
    p.add_argument("script")
    p.add_argument("args", nargs=argparse.REMAINDER)
    a = p.parse_args()
    if a.coordinate:
        coordinate_response_draws()
    if a.v_near_one:
        v_near_one()
    if a.delta_stn_difference:
        delta_stn_difference()
    if a.difference_pace is not None:
        defaults.DIFFERENCE_PACE = a.difference_pace
    print(f"delta_stn_variants: v_near_one={a.v_near_one} coordinate={a.coordinate} "
          f"DIFFERENCE_PACE={defaults.DIFFERENCE_PACE} delta_stn_difference={a.delta_stn_difference}", file=sys.stderr, flush=True)
    script = a.script if os.path.sep in a.script else os.path.join(HERE, a.script)
    sys.argv = [script] + a.args
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
