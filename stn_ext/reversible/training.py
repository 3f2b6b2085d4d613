"""Exact reversible training of any ``nn.Module`` as one node of autograd's graph.

    objective = train_and_evaluate(model, train_loss, val_loss, batches, T, lr, momentum,
                                   init={"0.weight": scale * noise}, meta={"l2": l2}, groups="weight_bias")
    objective.backward()  # exact gradients into lr, momentum, scale, l2 (and model's own initial weights)

The forward runs T steps of exact reversible SGD with momentum (:class:`ReversibleSGD`: fixed-point
weights and an information buffer) on the model's trainable parameters through
``torch.func.functional_call``; the model itself is not modified. The backward runs the training
backwards bit for bit with one gradient and one Hessian-vector product per step
(:func:`stn_ext.reversible.optim.reverse_pass`), checks that the initial state comes back exactly, and
returns the gradients w.r.t. every tensor input: the learning-rate and momentum schedules, the initial
weights and the ``meta`` tensors the losses read. Memory: O(weights) plus the buffer (no trajectory).

Rules that make the reverse pass see the same bits as the forward pass:

* the batch of step t is ``batches(t)`` (or ``batches[t]``), the same in both passes;
* before the training loss of step t (and the validation loss, as step T) torch's CPU generator (and
  the model's CUDA device's) is seeded with ``step_seed(seed, t)`` (one ``torch.random.fork_rng`` around
  each pass), so dropout replays and the caller's own random state is left as it was;
* the training gradients are taken with ``create_graph=True`` in both passes (an op may back-propagate
  other bits when differentiated twice: weight_norm does);
* the validation loss is evaluated once, at the end of the forward pass, with its gradient (kept, O(weights));
* training steps run in ``model.train()``, the validation loss in ``model.eval()`` (modes are restored);
* buffers are constants: a normalisation layer that tracks running statistics (BatchNorm with
  ``track_running_stats=True``) is refused up front, and any buffer found changed after a loss call is
  restored and refused (:class:`UnsupportedBufferError`). BatchNorm built with
  ``track_running_stats=False`` normalises with each batch's statistics and works.
"""
import contextlib
from typing import Callable, Dict, Optional

import torch
from torch.func import functional_call
from torch.nn.modules.batchnorm import _NormBase

from stn_ext.reversible.optim import (FixedPointOverflowError, ReversibilityError, ReversibleSGD, _fold,
                                      _grads_with_graph, _schedule, check_restored, quantize_momentum, reverse_pass)

__all__ = ["train_and_evaluate", "train_reversibly", "FunctionalModule", "UnsupportedBufferError", "parameter_groups",
           "step_seed"]


class UnsupportedBufferError(ValueError):
    """The model has a buffer that training changes (e.g. BatchNorm's running statistics): the
    training would not be a function of the weights alone, so it could not be reversed."""


_NOT_REPRODUCIBLE = (
    "stn_ext: reversible training: {what}. The losses were not reproducible bit for bit between the forward "
    "and the reverse pass: make train_loss a deterministic function of (weights, batches(t), meta) and take "
    "randomness only from torch's generator, which is seeded from (seed, t) (or seed your own generator from t); "
    "use torch.use_deterministic_algorithms(True) on a GPU. The hypergradient would be wrong, so none is returned.")


def step_seed(seed, t):
    """The seed of torch's generator for training step ``t`` (``t = T``: the validation loss): splitmix64 of
    (seed mod 2^32) * 2^32 + t, mod 2^63. Mixed because torch's CPU generator keeps a seed's low 32 bits only."""
    m = 2**64 - 1
    z = ((((int(seed) & 0xFFFFFFFF) << 32) | (int(t) & 0xFFFFFFFF)) + 0x9E3779B97F4A7C15) & m
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & m
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & m
    return (z ^ (z >> 31)) % 2**63


class FunctionalModule:
    """The model evaluated with given weights: call it like the module; ``params`` maps each trained
    parameter's name to its weight (a tensor in the graph, e.g. for a per-weight L2 penalty).
    ``slots`` (from :func:`_parameter_slots`): where each weight goes, so that a call swaps the tensors in
    directly instead of through ``torch.func.functional_call`` (the same swap, without its per-call
    search of the module tree)."""

    def __init__(self, module: torch.nn.Module, params: Dict[str, torch.Tensor], slots=None):
        self.module = module
        self.params = params
        self.slots = slots

    def __call__(self, *args, **kwargs):
        if self.slots is None:
            return functional_call(self.module, self.params, args, kwargs)
        held = [sub._parameters[leaf] for sub, leaf, _ in self.slots]
        try:
            for sub, leaf, name in self.slots:
                sub._parameters[leaf] = self.params[name]
            return self.module(*args, **kwargs)
        finally:
            for (sub, leaf, _), p in zip(self.slots, held):
                sub._parameters[leaf] = p


def _parameter_slots(module: torch.nn.Module, names):
    """[(submodule, attribute, name)]: every place in ``module`` that holds the parameter called ``name``
    (a parameter shared by several modules, e.g. a tied embedding and decoder, has several), for
    :class:`FunctionalModule`'s direct swap."""
    wanted = set(names)
    canonical = {id(p): n for n, p in module.named_parameters() if n in wanted}
    slots = []
    for full, p in module.named_parameters(remove_duplicate=False):
        if id(p) in canonical:
            path, _, leaf = full.rpartition(".")
            slots.append((module.get_submodule(path), leaf, canonical[id(p)]))
    return slots


def parameter_groups(model, groups=None):
    """[(name, group index)] of the model's trainable parameters, in ``named_parameters()`` order.

    ``groups``: None or ``"all"`` (one group), ``"param"`` (one group per parameter), ``"weight_bias"``
    (group 0: names not ending in ``bias``; group 1: biases), a dict name -> group, or a callable
    name -> group. Groups must be numbered 0 .. G-1, each with a parameter; a schedule of shape
    (T, G) gives group g's values in column g."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    if not names:
        raise ValueError("stn_ext: the model has no parameter with requires_grad=True to train")
    if groups is None or groups == "all":
        of = [0] * len(names)
    elif groups == "param":
        of = list(range(len(names)))
    elif groups == "weight_bias":
        of = [int(n.endswith("bias")) for n in names]
        if len(set(of)) == 1:
            of = [0] * len(names)
    elif isinstance(groups, dict):
        missing = [n for n in names if n not in groups]
        unknown = [n for n in groups if n not in names]
        if missing or unknown:
            raise ValueError(f"stn_ext: groups must map every trainable parameter to a group: missing {missing}, "
                             f"unknown {unknown} (trainable: {names})")
        of = [int(groups[n]) for n in names]
    elif callable(groups):
        of = [int(groups(n)) for n in names]
    else:
        raise ValueError(f"stn_ext: groups must be None, 'all', 'param', 'weight_bias', a dict or a callable, "
                         f"got {groups!r}")
    empty = sorted(set(range(max(of) + 1)) - set(of))
    if min(of) < 0 or empty:
        raise ValueError(f"stn_ext: groups must be numbered 0 .. G-1 with a parameter in each; got "
                         f"{dict(zip(names, of))}")
    return list(zip(names, of))


def _refuse_tracked_norms(model):
    tracked = [f"{n or '(the model)'} ({type(m).__name__})" for n, m in model.named_modules()
               if isinstance(m, _NormBase) and m.track_running_stats]
    if tracked:
        raise UnsupportedBufferError(
            f"stn_ext: reversible training cannot update running statistics: {', '.join(tracked)} has "
            "track_running_stats=True, so the training would not be a function of the weights alone. Build these "
            "layers with track_running_stats=False (they then normalise with each batch's statistics, in training "
            "and validation alike), or replace them (e.g. LayerNorm, GroupNorm).")


def _schedule_checked(s, T, n_groups, what):
    """A float64 CPU copy of a (T,) or (T, n_groups) schedule, with a message naming the shapes allowed."""
    if not isinstance(s, torch.Tensor):
        s = torch.as_tensor(s, dtype=torch.float64)
    if not s.is_floating_point():
        raise TypeError(f"stn_ext: {what} must be a floating-point tensor (or floats), got {s.dtype}")
    allowed = [(T,), (T, n_groups)]
    if tuple(s.shape) not in allowed:
        raise ValueError(f"stn_ext: {what} must have shape (T,) = {allowed[0]} or (T, n_groups) = {allowed[1]}, "
                         f"got {tuple(s.shape)}")
    s = s.detach().double().cpu()
    if not bool(torch.isfinite(s).all()):
        raise ValueError(f"stn_ext: {what} has non-finite values")
    return s


def _batch_getter(batches, T):
    if batches is None:
        return lambda t: t
    if callable(batches):
        return batches
    if len(batches) < T:
        raise ValueError(f"stn_ext: batches has {len(batches)} entries for T = {T} steps")
    return batches.__getitem__


def _refuse_learned_batch(batch, t):
    """A batch tensor that needs a gradient would get none (batches are not inputs of the node)."""
    if isinstance(batch, torch.Tensor) and batch.requires_grad:
        raise ValueError(f"stn_ext: the batch of step {t} requires grad, but batches are not differentiated: "
                         "pass learned training data in meta={...} and index it in train_loss")
    if isinstance(batch, (list, tuple)):
        for b in batch:
            _refuse_learned_batch(b, t)
    elif isinstance(batch, dict):
        for b in batch.values():
            _refuse_learned_batch(b, t)


class _Run:
    """One reversible training run: the model and losses, the schedules and the exact optimiser state."""

    def __init__(self, model, train_loss, val_loss, batches, T, groups, seed, radix_bits, return_weights):
        if int(T) < 1:
            raise ValueError(f"stn_ext: T must be at least 1, got {T}")
        _refuse_tracked_norms(model)
        self.model, self.train_loss, self.val_loss = model, train_loss, val_loss
        self.T, self.seed, self.radix_bits, self.return_weights = int(T), int(seed), int(radix_bits), return_weights
        self.batch = _batch_getter(batches, self.T)
        named = parameter_groups(model, groups)
        self.names = [n for n, _ in named]
        self.group_of = [g for _, g in named]
        self.n_groups = max(self.group_of) + 1
        params = dict(model.named_parameters())
        self.params = [params[n] for n in self.names]
        self.device = self.params[0].device
        self.buffers0 = {n: b.detach().clone() for n, b in model.named_buffers()}
        self.slots = _parameter_slots(model, self.names)
        self.modules = list(model.modules())

    # --- the losses, with the rules that make them reproducible ----------------------------------

    @contextlib.contextmanager
    def _pass(self):
        """One pass over the steps (forward or reverse): torch's generator forked and the model's modes
        saved once, both restored at its end (per step they are only set, see :meth:`_replay`)."""
        modes = [(m, m.training) for m in self.modules]
        cuda = self.device.type == "cuda"
        with torch.random.fork_rng(devices=[self.device] if cuda else [], device_type="cuda"):
            try:
                yield
            finally:
                for m, mode in modes:
                    m.training = mode

    def _replay(self, t, train):
        """Seed torch's generator from (seed, t) and set the model's mode, inside :meth:`_pass`."""
        seed = step_seed(self.seed, t)
        torch.random.default_generator.manual_seed(seed)
        if self.device.type == "cuda":
            with torch.cuda.device(self.device):
                torch.cuda.manual_seed(seed)
        if any(m.training != train for m in self.modules):  # model.train() costs more than this check
            self.model.train(train)

    def _check_buffers(self, where):
        if not self.buffers0:
            return  # no buffer to watch (the walk over the modules costs more than a small model's step)
        buffers = [(n, b) for n, b in self.model.named_buffers() if n in self.buffers0]
        changed = [n for n, b in buffers if not torch.equal(b, self.buffers0[n])]
        if changed:
            with torch.no_grad():
                for n, b in buffers:
                    b.copy_(self.buffers0[n])
            raise UnsupportedBufferError(
                f"stn_ext: the model changed its buffers {changed} during {where} (restored): reversible training "
                "needs buffers that stay constant, so that training is a function of the weights alone")

    def _scalar(self, loss, what):
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1 or not loss.is_floating_point():
            raise ValueError(f"stn_ext: {what} must return a floating-point scalar tensor, got "
                             f"{type(loss).__name__} {tuple(getattr(loss, 'shape', ()))}")
        return loss.reshape(())

    def _net(self, w):
        return FunctionalModule(self.model, dict(zip(self.names, w)), self.slots)

    def _leaves(self):
        return [x.detach().requires_grad_(True) for x in self.work]

    def grads_at(self, t):
        """(weight leaves, training gradients at step t, with graph) at the current weights."""
        w = self._leaves()
        batch = self.batch(t)
        _refuse_learned_batch(batch, t)
        self._replay(t, train=True)
        loss = self._scalar(self.train_loss(self._net(w), batch, self.meta), "train_loss")
        self._check_buffers(f"the training loss of step {t}")
        return w, _grads_with_graph(loss, w)

    def val_at_end(self):
        """(weight leaves, validation loss) at the current (final) weights."""
        w = self._leaves()
        self._replay(self.T, train=False)
        vl = self._scalar(self.val_loss(self._net(w), self.meta), "val_loss")
        self._check_buffers("the validation loss")
        return w, vl

    # --- forward and reverse ---------------------------------------------------------------------

    def forward(self, lr, momentum, inits, metas, meta_names, needs_meta, differentiable):
        self.lr_like, self.mom_like, self.differentiable = lr, momentum, differentiable
        lr_s = _schedule_checked(lr, self.T, self.n_groups, "lr")
        mom_s = _schedule_checked(momentum, self.T, self.n_groups, "momentum")
        if not bool(((mom_s > 0) & (mom_s <= 1)).all()):
            raise ValueError(f"stn_ext: momentum must be in (0, 1] at every step, got min {float(mom_s.min()):.6g}, "
                             f"max {float(mom_s.max()):.6g}")
        self.lr_sched, self.lr_shape = _schedule(lr_s, self.T, self.group_of, "lr")
        mom_cols, self.mom_shape = _schedule(mom_s, self.T, self.group_of, "momentum")
        self.mom_q = quantize_momentum(mom_cols)
        self.init_like = inits
        self.work = []
        for name, p, x in zip(self.names, self.params, inits):
            if tuple(x.shape) != tuple(p.shape) or not x.is_floating_point():
                raise ValueError(f"stn_ext: init[{name!r}] must be a floating-point tensor of shape {tuple(p.shape)}, "
                                 f"got {x.dtype} {tuple(x.shape)}")
            self.work.append(x.detach().to(p.device, p.dtype).clone().contiguous())
        # the same leaves in both passes: only the meta tensors that need a gradient require one
        self.meta = {k: (m.detach().requires_grad_(True) if need else m.detach())
                     for k, m, need in zip(meta_names, metas, needs_meta)}
        self.meta_targets = {k: m for k, m in self.meta.items() if m.requires_grad}
        # the status read once per few ops (as on CUDA), not after each: a failure still raises, a few ops later
        self.opt = ReversibleSGD(list(zip(self.names, self.work)), radix_bits=self.radix_bits, check_every=8)
        self.x0, self.v0 = self.opt.exact_state()
        return self._train()

    def _train(self):
        with torch.enable_grad(), self._pass():
            for t in range(self.T):
                _, g = self.grads_at(t)
                self.opt.step(self.lr_sched[t].tolist(), self.mom_q[t].tolist(), grads=g)
            self.opt.check()
            outs = []
            if self.val_loss is not None:
                w, vl = self.val_at_end()
                self.objective = vl.detach().clone()
                # its gradient now, while the graph is here (the backward scales it): no second evaluation
                self.val_grads = self._val_grads(w, vl) if self.differentiable else None
                outs.append(self.objective)
        if self.return_weights:
            outs += [x.detach().clone() for x in self.work]
        return tuple(outs)

    def _val_grads(self, w, vl):
        """d val_loss / d (final weights, meta tensors that need a gradient); None where it does not depend."""
        targets = w + list(self.meta_targets.values())
        if not vl.requires_grad:
            return [None] * len(targets)  # a constant objective
        return [None if g is None else g.detach() for g in torch.autograd.grad(vl, targets, allow_unused=True)]

    def backward(self, grads, needs):
        if self.opt.steps == 0:
            self._train()  # a second backward (retain_graph=True): train again, the same bits
        grad_obj = grads[0] if self.val_loss is not None else None
        grad_w = grads[1 if self.val_loss is not None else 0:] if self.return_weights else [None] * len(self.work)
        dx = [torch.zeros_like(x) for x in self.work]
        d_meta = {k: torch.zeros_like(m) for k, m in self.meta_targets.items()}
        if grad_obj is not None:
            scale = grad_obj.reshape(()).double()
            for d, g in zip(dx + list(d_meta.values()), self.val_grads):
                if g is not None:
                    d.add_(g * scale.to(g.dtype))
        for d, g in zip(dx, grad_w):
            if g is not None:
                d.add_(g.to(d.dtype))
        with torch.enable_grad(), self._pass():
            try:
                g_lr, g_mom, _, d_hyp = reverse_pass(self.opt, self.grads_at, self.lr_sched, self.mom_q, dx,
                                                     self.meta_targets)
            except (ReversibilityError, FixedPointOverflowError, FloatingPointError) as err:
                raise ReversibilityError(_NOT_REPRODUCIBLE.format(what=f"the reverse pass failed: {err}")) from err
        check_restored(self.opt, self.x0, self.v0, _NOT_REPRODUCIBLE)
        n = len(self.work)
        out = [_like(_fold(g_lr, self.lr_shape, self.group_of), self.lr_like) if needs[0] else None,
               _like(_fold(g_mom, self.mom_shape, self.group_of), self.mom_like) if needs[1] else None]
        out += [_like(d, x) if need else None for d, x, need in zip(dx, self.init_like, needs[2:2 + n])]
        out += [(d_hyp[k] + d_meta[k]) if k in d_meta else None for k in self.meta]
        return tuple(out)


def _like(grad, like):
    """A gradient in the dtype, device and shape of the input it is for."""
    if isinstance(like, torch.Tensor):
        return grad.to(like.device, like.dtype).reshape(like.shape)
    return None


class _ReversibleTraining(torch.autograd.Function):
    """Inputs: (run, meta names, lr, momentum, *initial weights, *meta tensors); outputs: the objective
    and/or the final weights."""

    @staticmethod
    def forward(ctx, run, meta_names, lr, momentum, *tensors):
        n = len(run.names)
        ctx.run = run
        ctx.set_materialize_grads(False)
        return run.forward(lr, momentum, tensors[:n], tensors[n:], meta_names, ctx.needs_input_grad[4 + n:],
                           any(ctx.needs_input_grad))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grads):
        return (None, None) + ctx.run.backward(grads, ctx.needs_input_grad[2:])


def _as_schedule(s, T):
    """A tensor schedule; a number or 0-dim tensor expanded to (T,) outside the node, so autograd sums."""
    s = s if isinstance(s, torch.Tensor) else torch.as_tensor(s, dtype=torch.float64)
    return s.expand(int(T)) if s.dim() == 0 else s


def _run(model, train_loss, val_loss, batches, T, lr, momentum, init, meta, groups, seed, radix_bits, return_weights):
    run = _Run(model, train_loss, val_loss, batches, T, groups, seed, radix_bits, return_weights)
    init = dict(init or {})
    unknown = [k for k in init if k not in run.names]
    if unknown:
        raise ValueError(f"stn_ext: init has {unknown}, which are not trainable parameters of the model "
                         f"({run.names})")
    inits = [init.get(n, p) for n, p in zip(run.names, run.params)]
    meta = dict(meta or {})
    for k, m in meta.items():
        if not isinstance(m, torch.Tensor):
            raise TypeError(f"stn_ext: meta[{k!r}] must be a tensor, got {type(m).__name__}")
    outs = _ReversibleTraining.apply(run, list(meta), _as_schedule(lr, T), _as_schedule(momentum, T), *inits,
                                     *meta.values())
    return outs, run.names


def train_and_evaluate(model: torch.nn.Module, train_loss: Callable, val_loss: Callable, batches, T: int, lr,
                       momentum, *, init: Optional[dict] = None, meta: Optional[dict] = None, groups=None,
                       seed: int = 0, radix_bits: int = 52, return_weights: bool = False):
    """``val_loss`` after T steps of exact reversible SGD with momentum on ``model``, as a tensor in
    autograd's graph: its backward reverses the training bit for bit and gives exact gradients w.r.t.
    ``lr``, ``momentum``, the initial weights and the ``meta`` tensors.

    ``train_loss(net, batch, meta)`` -> scalar: the training loss of one step, where ``net`` is a
    :class:`FunctionalModule` (call it like the model; ``net.params`` holds the current weights),
    ``batch = batches(t)`` (a callable), ``batches[t]`` (a sequence) or ``t`` (``batches=None``) and
    ``meta`` the dict given below. ``val_loss(net, meta)`` -> scalar: the objective at the final weights.
    ``lr``, ``momentum``: schedules of shape (T,) or (T, G) (or a number); G groups of parameters
    by name (see :func:`parameter_groups`). The momentum used is quantised to a multiple of 2^-16 and
    its gradient is the one at the quantised value. ``init``: dict name -> initial weight (any tensor,
    e.g. ``scale * noise``; default the model's parameter itself, whose ``.grad`` then receives the
    gradient). ``meta``: dict name -> tensor the losses read (L2 strengths, learned training data);
    gradients flow to them and to whatever produced them. ``seed``: randomness of step t is seeded
    with ``step_seed(seed, t)``. ``return_weights``: also return a dict name -> final weight (in the
    graph too). The model's parameters and buffers are not modified.
    Raises :class:`ReversibilityError` if the reverse pass does not give back the initial state exactly,
    :class:`FixedPointOverflowError` if a weight leaves |value| < 2^(63 - radix_bits),
    :class:`UnsupportedBufferError` for buffers that training changes (BatchNorm's running statistics),
    ``FloatingPointError`` for a non-finite training gradient.
    """
    if val_loss is None:
        raise ValueError("stn_ext: train_and_evaluate needs val_loss (train_reversibly returns the final weights)")
    outs, names = _run(model, train_loss, val_loss, batches, T, lr, momentum, init, meta, groups, seed, radix_bits,
                       return_weights)
    if return_weights:
        return outs[0], dict(zip(names, outs[1:]))
    return outs[0]


def train_reversibly(model: torch.nn.Module, train_loss: Callable, batches, T: int, lr, momentum, *,
                     init: Optional[dict] = None, meta: Optional[dict] = None, groups=None, seed: int = 0,
                     radix_bits: int = 52) -> Dict[str, torch.Tensor]:
    """The final weights (dict name -> tensor in autograd's graph) after T steps of exact reversible SGD;
    any differentiable function of them back-propagates exactly through the training (arguments as
    :func:`train_and_evaluate`)."""
    outs, names = _run(model, train_loss, None, batches, T, lr, momentum, init, meta, groups, seed, radix_bits, True)
    return dict(zip(names, outs))
