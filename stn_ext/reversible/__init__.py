"""Exact reversible learning (Maclaurin, Duvenaud & Adams 2015): ``ReversibleSGD`` and ``hypergradient``.

The parts: ``optim`` (the optimiser and the hypergradient through reversed training), ``training`` (any
``nn.Module``'s training as one autograd node: ``train_and_evaluate``), ``meta`` (the meta-optimisation
loop over it: ``meta_optimize``, checkpointed, with a chaos stop), ``examples`` and ``figures`` (the
paper's three experiments as problems), ``ops`` (the fused
step kernels as torch ops, fixed-point helpers), ``reference`` (the same maths in pure Python, for the
tests), ``problem`` (the digits meta-learning problem of the CLI) and ``cli`` / ``cli_problems`` (``python -m
stn_ext reversible [--problem schedules|l2|distill]``).
"""
from stn_ext.reversible.optim import (FixedPointOverflowError, HypergradientResult, ReversibilityError, ReversibleSGD,
                                      gamma_num, hypergradient, quantize_momentum)
from stn_ext.reversible.training import (FunctionalModule, UnsupportedBufferError, parameter_groups, step_seed,
                                         train_and_evaluate, train_reversibly)
from stn_ext.reversible.meta import ChaosRule, MetaResult, meta_optimize

__all__ = ["ReversibleSGD", "hypergradient", "HypergradientResult", "ReversibilityError", "FixedPointOverflowError",
           "quantize_momentum", "gamma_num", "train_and_evaluate", "train_reversibly", "FunctionalModule",
           "UnsupportedBufferError", "parameter_groups", "step_seed", "meta_optimize", "MetaResult", "ChaosRule"]
