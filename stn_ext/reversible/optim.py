"""Exact reversible SGD with momentum and hypergradients through training.

Maclaurin, Duvenaud & Adams (2015), "Gradient-based hyperparameter optimization through reversible
learning". Weights and velocities are int64 fixed point (value = int * 2^-radix_bits); the momentum
multiply is made a bijection by an information buffer per element that stores exactly the bits it
destroys (about -log2(momentum) bits per element per step), so training can be run backwards bit for
bit, and the reverse pass computes exact gradients of a validation loss w.r.t. per-step learning
rates and momenta, the initial weights and any differentiable training-loss hyperparameter at
O(weights) memory plus the compact buffer.

    opt = ReversibleSGD(model.parameters())
    for t in range(T):
        model.zero_grad(); loss(t).backward(); opt.step(lr[t], momentum[t])
    for t in reversed(range(T)):
        opt.unstep_weights(lr[t])
        grads = grads_at(t)              # recomputed at the restored weights, same bits as forward
        opt.unstep_velocity(grads, momentum[t])

Momentum is quantised to n / 2^16 (see :func:`quantize_momentum`); learning rates are used as given
(float64). The float parameters are the model's view of the exact weights and are rewritten by every
step. Gradients must be reproducible bit for bit (deterministic algorithms, fixed data order and
random seeds per step); :func:`hypergradient` checks this and raises :class:`ReversibilityError`.
"""
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch

from stn_ext._messages import count
from stn_ext.reversible import ops as _rops
from stn_ext.reversible.ops import gamma_num, quantize_momentum  # noqa: F401  (public)

__all__ = [
    "ReversibleSGD",
    "hypergradient",
    "HypergradientResult",
    "ReversibilityError",
    "FixedPointOverflowError",
    "quantize_momentum",
]


class ReversibilityError(RuntimeError):
    """The reverse pass did not give back the exact starting state (for example a gradient that
    differs between the forward and the reverse pass)."""


class FixedPointOverflowError(OverflowError):
    """A weight, velocity or step left the fixed-point range (|value| < 2^(63 - radix_bits))."""


def _as_named(params):
    """[(name, tensor)] from tensors, (name, tensor) pairs or a dict."""
    if isinstance(params, torch.Tensor):
        return [("param", params)]
    if isinstance(params, dict):
        return list(params.items())
    items = list(params)
    if items and isinstance(items[0], (tuple, list)) and len(items[0]) == 2 and isinstance(items[0][0], str):
        return [(n, p) for n, p in items]
    return [(f"param[{i}]", p) for i, p in enumerate(items)]


def _per_param(value, n, what):
    """A per-parameter list from a scalar, a sequence or a 1-D tensor of length n."""
    if isinstance(value, torch.Tensor):
        value = value.detach().double().cpu()
        if value.dim() == 0:
            return [float(value)] * n
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"stn_ext: {what}: {count(len(value), 'value')} given for {count(n, 'parameter')} (one each)")
        return [float(a) for a in value]
    return [float(value)] * n


def _to_fixed(t, radix_bits, name):
    y = t.detach().double() * float(2**radix_bits)
    y = torch.round(y)
    limit = float(2**63)
    if not bool(torch.isfinite(y).all()):
        raise FixedPointOverflowError(f"stn_ext: {name} has non-finite values")
    if bool((y.abs() >= limit).any()):
        raise FixedPointOverflowError(
            f"stn_ext: {name} does not fit the fixed-point range |value| < 2^{63 - radix_bits} "
            f"(radix_bits={radix_bits}, largest |value| {float(t.detach().abs().max()):.6g}); lower radix_bits"
        )
    return y.to(torch.int64)


def _from_fixed(x, radix_bits, dtype):
    """The float view the kernels write: (double) x * 2^-radix, one rounding (half types via float)."""
    d = x.double() * (2.0**-radix_bits)
    if dtype in (torch.float16, torch.bfloat16):
        return d.float().to(dtype)
    return d.to(dtype)


def _head_bits(head):
    """log2 of the uint64 heads stored in int64."""
    h = head.double()
    h = torch.where(head < 0, h + float(2**64), h)
    return torch.log2(h)


class ReversibleSGD:
    """SGD with momentum, ``v <- m v - (1 - m) g; x <- x + lr v``, exactly reversible.

    ``params``: tensors (float32, float64, float16 or bfloat16; contiguous, all on one device),
    ``(name, tensor)`` pairs (``model.named_parameters()``) or a dict; their data is the float view
    of the exact weights and is rewritten by each step. ``radix_bits``: weights and velocities are
    stored as int64 multiples of 2^-radix_bits, so |value| < 2^(63 - radix_bits) (2048 by default).
    ``velocities``: optional initial velocities (default zero). ``check_every``: on CUDA, the
    status (overflow flags, buffer fill) is read every that many ops instead of every op (each read
    synchronises); on CPU it is read after every op.
    """

    def __init__(self, params, radix_bits: int = 52, velocities=None, check_every: Optional[int] = None,
                 initial_capacity: int = 4):
        named = _as_named(params)
        if not named:
            raise ValueError("stn_ext: ReversibleSGD got no parameters")
        if not (0 <= int(radix_bits) <= 62):
            raise ValueError(f"stn_ext: radix_bits must be in [0, 62], got {radix_bits}")
        self.radix_bits = int(radix_bits)
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        device = self.params[0].device
        for name, p in named:
            if not isinstance(p, torch.Tensor) or not p.is_floating_point():
                raise TypeError(f"stn_ext: parameter {name} must be a floating-point tensor")
            if p.device != device:
                raise ValueError(f"stn_ext: parameter {name} is on {p.device} but {self.names[0]} is on {device}")
            if not p.is_contiguous():
                raise ValueError(f"stn_ext: parameter {name} must be contiguous (its data is updated in place)")
        _rops._library.check_device_supported(*self.params)
        self.device = device
        self.check_every = int(check_every) if check_every else (1 if device.type == "cpu" else 8)
        self._x = [_to_fixed(p, self.radix_bits, n) for n, p in named]
        if velocities is None:
            self._v = [torch.zeros_like(x) for x in self._x]
        else:
            vel = list(velocities.values()) if isinstance(velocities, dict) else list(velocities)
            if len(vel) != len(self.params):
                raise ValueError(f"stn_ext: {count(len(vel), 'velocity', 'velocities')} for {count(len(self.params), 'parameter')}")
            self._v = []
            for (n, p), v in zip(named, vel):
                if tuple(v.shape) != tuple(p.shape):
                    raise ValueError(f"stn_ext: velocity of {n} has shape {tuple(v.shape)}, expected {tuple(p.shape)}")
                self._v.append(_to_fixed(v.to(device), self.radix_bits, f"velocity of {n}"))
        self._head = [torch.full_like(x, _rops.HEAD_EMPTY) for x in self._x]
        self._count = [torch.zeros(p.shape, dtype=torch.int32, device=device) for p in self.params]
        self._words = [torch.zeros((int(initial_capacity), p.numel()), dtype=torch.int32, device=device)
                       for p in self.params]
        self._status = torch.zeros((len(self.params), 2), dtype=torch.int64, device=device)
        self._bound = 0           # an upper bound on every stack count
        self._unchecked = 0       # ops since the status was last read
        self.steps = 0            # forward steps minus reverse steps
        self._sync_views()

    # --- state ---------------------------------------------------------------------------------

    def _sync_views(self):
        with torch.no_grad():
            for p, x in zip(self.params, self._x):
                p.copy_(_from_fixed(x, self.radix_bits, p.dtype))

    @property
    def capacity(self):
        return self._words[0].shape[0]

    def _prepare(self):
        """Before an op: make sure every stack has room for one more word."""
        if self._bound + 1 >= self.capacity or self._unchecked >= self.check_every:
            self.check()
        if self._bound + 2 > self.capacity:
            new = max(self._bound + 2 * self.check_every + 2, int(self.capacity * 1.25) + 1)
            for i, w in enumerate(self._words):
                grown = torch.zeros((new, w.shape[1]), dtype=w.dtype, device=w.device)
                grown[: w.shape[0]].copy_(w)
                self._words[i] = grown

    def _done(self):
        self._bound += 1  # one op spills at most one word per element
        self._unchecked += 1
        if self._unchecked >= self.check_every:
            self.check()

    def check(self):
        """Read the kernels' status (synchronises): raise on overflow or a corrupted buffer."""
        status = self._status.cpu().clone()
        self._unchecked = 0
        self._bound = int(status[:, 1].max())
        flags = status[:, 0]
        if bool((flags != 0).any()):
            msgs = []
            for i in torch.nonzero(flags).flatten().tolist():
                f = int(flags[i])
                what = ", ".join(text for bit, text in _rops.FLAG_NAMES.items() if f & bit)
                msgs.append(f"{self.names[i]} (shape {tuple(self.params[i].shape)}): {what}")
            self._status[:, 0].zero_()
            detail = "; ".join(msgs)
            tail = (" The optimizer state is no longer consistent (the elements concerned were not updated);"
                    " restore it from a state_dict.")
            if any(int(f) & _rops.OVERFLOW for f in flags):
                raise FixedPointOverflowError(
                    f"stn_ext: fixed-point range |value| < 2^{63 - self.radix_bits} exceeded near step {self.steps}: "
                    f"{detail}. Lower radix_bits or the learning rate.{tail}")
            if any(int(f) & _rops.NON_FINITE for f in flags):
                raise FloatingPointError(f"stn_ext: non-finite gradient near step {self.steps}: {detail}.{tail}")
            raise ReversibilityError(f"stn_ext: information buffer error near step {self.steps}: {detail}.{tail}")

    def state_dict(self):
        """The whole exact state (fixed-point weights and velocities, buffers), as tensors."""
        self.check()
        used = self._bound
        return {
            "radix_bits": self.radix_bits,
            "steps": self.steps,
            "names": list(self.names),
            "x": [x.clone() for x in self._x],
            "v": [v.clone() for v in self._v],
            "head": [h.clone() for h in self._head],
            "count": [c.clone() for c in self._count],
            "words": [w[:used].clone() for w in self._words],
        }

    def load_state_dict(self, state):
        if int(state["radix_bits"]) != self.radix_bits:
            raise ValueError(f"stn_ext: state has radix_bits={state['radix_bits']}, optimizer has {self.radix_bits}")
        if len(state["x"]) != len(self.params):
            raise ValueError(f"stn_ext: state has {count(len(state['x']), 'parameter')}, optimizer has {len(self.params)}")
        for i, p in enumerate(self.params):
            if tuple(state["x"][i].shape) != tuple(p.shape):
                raise ValueError(f"stn_ext: state of {self.names[i]} has shape {tuple(state['x'][i].shape)}")
        dev = self.device
        self._x = [x.to(dev, torch.int64).clone() for x in state["x"]]
        self._v = [v.to(dev, torch.int64).clone() for v in state["v"]]
        self._head = [h.to(dev, torch.int64).clone() for h in state["head"]]
        self._count = [c.to(dev, torch.int32).clone() for c in state["count"]]
        used = max([int(c.max()) if c.numel() else 0 for c in self._count] + [0])
        cap = used + 2 * self.check_every + 2
        self._words = []
        for w in state["words"]:
            full = torch.zeros((cap, w.shape[1]), dtype=torch.int32, device=dev)
            full[: w.shape[0]].copy_(w)
            self._words.append(full)
        self._status.zero_()
        self._bound = used
        self._unchecked = 0
        self.steps = int(state["steps"])
        self._sync_views()

    def exact_state(self):
        """(x, v) fixed-point tensors (copies), for checks."""
        return [x.clone() for x in self._x], [v.clone() for v in self._v]

    def velocities(self):
        """Velocities as float64 tensors."""
        return [v.double() * (2.0**-self.radix_bits) for v in self._v]

    def buffer_is_empty(self):
        return all(bool((c == 0).all()) and bool((h == _rops.HEAD_EMPTY).all())
                   for c, h in zip(self._count, self._head))

    def buffer_bits(self):
        """Information held in the buffers, in bits (32 per spilled word plus log2(head) - 32)."""
        total = 0.0
        for c, h in zip(self._count, self._head):
            total += float(32.0 * c.double().sum() + (_head_bits(h) - 32.0).sum())
        return total

    def buffer_storage_bits(self):
        """Bits the buffers need in memory: 64 per element (head, incl. 32 fixed overhead) + 32 per word."""
        return float(sum(64 * c.numel() + 32 * int(c.long().sum()) for c in self._count))

    @property
    def numel(self):
        return sum(p.numel() for p in self.params)

    @property
    def bits_per_element_per_step(self):
        """buffer_bits() / (elements * net forward steps); compare with -log2(momentum)."""
        if self.steps <= 0:
            return 0.0
        return self.buffer_bits() / (self.numel * self.steps)

    # --- steps ---------------------------------------------------------------------------------

    def step(self, lr, momentum, grads=None):
        """One exact step with learning rate ``lr`` and momentum ``momentum`` (scalars or one per
        parameter) from ``grads`` (default each parameter's ``.grad``; None counts as zero)."""
        n = len(self.params)
        lrs = _per_param(lr, n, "lr")
        nums = [gamma_num(m) for m in _per_param(momentum, n, "momentum")]
        if grads is None:
            grads = [p.grad for p in self.params]
        grads = list(grads)
        if len(grads) != n:
            raise ValueError(f"stn_ext: {count(len(grads), 'gradient')} for {count(n, 'parameter')}")
        self._prepare()
        with torch.no_grad():
            for i, p in enumerate(self.params):
                g = grads[i]
                g = torch.zeros_like(p) if g is None else g.detach().to(p.dtype)
                _rops.step(self._x[i], self._v[i], self._head[i], self._count[i], self._words[i], p.detach(), g,
                           self._status[i], lrs[i], nums[i], self.radix_bits)
        self.steps += 1
        self._done()

    def unstep_weights(self, lr, dx=None):
        """Undo the weight update of the last step: x <- x - lr v. With ``dx`` (gradients of an
        objective w.r.t. the weights, one per parameter) returns the per-parameter ``dx . v`` (the
        gradient w.r.t. that step's learning rate) as a float64 tensor, else None."""
        n = len(self.params)
        lrs = _per_param(lr, n, "lr")
        out = []
        self._prepare()
        with torch.no_grad():
            for i, p in enumerate(self.params):
                d = None if dx is None else dx[i]
                out.append(_rops.unstep_weights(self._x[i], self._v[i], p.detach(), d, self._status[i], lrs[i],
                                                self.radix_bits))
        self._done()
        return torch.stack(out) if dx is not None else None

    def unstep_velocity(self, grads, momentum, lr=None, dx=None, dv=None):
        """Undo the velocity update of the last step given the gradients at the restored weights
        (bit-identical to the forward pass's): v <- (v + (1 - m) g) / m. With ``dv`` (and ``lr``,
        ``dx``): dv += lr dx in place and returns the per-parameter ``dv . (v + g)`` (the gradient
        w.r.t. that step's momentum) as a float64 tensor."""
        n = len(self.params)
        nums = [gamma_num(m) for m in _per_param(momentum, n, "momentum")]
        lrs = _per_param(0.0 if lr is None else lr, n, "lr")
        grads = list(grads)
        if len(grads) != n:
            raise ValueError(f"stn_ext: {count(len(grads), 'gradient')} for {count(n, 'parameter')}")
        if dx is not None and lr is None:
            raise ValueError("stn_ext: unstep_velocity needs lr with dx")
        out = []
        self._prepare()
        with torch.no_grad():
            for i, p in enumerate(self.params):
                g = grads[i]
                g = torch.zeros_like(p) if g is None else g.detach().to(p.dtype)
                out.append(_rops.unstep_velocity(
                    self._v[i], self._head[i], self._count[i], self._words[i], g,
                    None if dx is None else dx[i], None if dv is None else dv[i], self._status[i],
                    lrs[i], nums[i], self.radix_bits))
        self.steps -= 1
        self._done()
        return torch.stack(out) if dv is not None else None

    def reverse_step(self, lr, momentum, grad_fn: Callable[[], List[torch.Tensor]]):
        """unstep_weights(lr), then grads = grad_fn() (at the restored weights), then unstep_velocity."""
        self.unstep_weights(lr)
        self.unstep_velocity(grad_fn(), momentum)


# --- hypergradients -------------------------------------------------------------------------------


@dataclass
class HypergradientResult:
    val_loss: float
    final_params: List[torch.Tensor]
    grad_lrs: torch.Tensor
    grad_momenta: torch.Tensor
    grad_params: List[torch.Tensor]
    grad_hypers: Dict[str, torch.Tensor] = field(default_factory=dict)
    grad_velocities: List[torch.Tensor] = field(default_factory=list)
    buffer_bits: float = 0.0
    bits_per_element_per_step: float = 0.0
    momenta_used: Optional[torch.Tensor] = None


_NOT_REPRODUCIBLE = (
    "stn_ext: hypergradient: {what}. The training gradients were not reproducible bit for bit between the "
    "forward and the reverse pass: make train_loss deterministic given (params, t) "
    "(torch.use_deterministic_algorithms(True), a fixed data order, and random seeds such as dropout's set from t). "
    "The hypergradient would be wrong, so none is returned.")


def _schedule(s, T, group_of, what):
    """A (T,) or (T, n_groups) schedule as (T, n_params) columns, and its own shape."""
    s = torch.as_tensor(s).detach().double().cpu()
    n_groups = max(group_of) + 1
    if s.dim() == 1:
        if s.shape[0] != T:
            raise ValueError(f"stn_ext: {what} has length {s.shape[0]}, lrs has {T}")
        return s[:, None].expand(T, len(group_of)), s.shape
    if s.dim() == 2 and s.shape == (T, n_groups):
        return s[:, group_of], s.shape
    raise ValueError(f"stn_ext: {what} must have shape (T,) or (T, {n_groups}) (one column per group), "
                     f"got {tuple(s.shape)}")


def _fold(per_param, shape, group_of):
    """(T, n_params) per-parameter gradients -> the schedule's own shape (summed within groups)."""
    if len(shape) == 1:
        return per_param.sum(1)
    out = torch.zeros(shape, dtype=per_param.dtype)
    out.index_add_(1, torch.tensor(group_of), per_param)
    return out


def _grads_with_graph(loss, w):
    """d loss / d w (zeros where unused), with create_graph in both passes: some ops back-propagate other bits
    when differentiated twice (weight_norm), and the reverse pass must recompute the forward pass's bits."""
    g = torch.autograd.grad(loss, w, create_graph=True, allow_unused=True)
    return [torch.zeros_like(a) if gi is None else gi for a, gi in zip(w, g)]


def reverse_pass(opt, grads_at, lr_sched, mom_q, dx, hyper_leaves):
    """Run ``opt``'s T steps backwards exactly with one Hessian-vector product per step. ``grads_at(t)`` ->
    (weight leaves, training gradients with graph, as :func:`_grads_with_graph`) at the restored weights;
    ``lr_sched``, ``mom_q``: (T, n_params), momenta quantised; ``dx``: d objective / d final weights, turned in
    place into d / d initial weights; ``hyper_leaves``: the training loss's leaves to differentiate (dict).
    Returns (d lrs, d momenta: (T, n_params) float64, d initial velocities, d hypers)."""
    n, T = len(dx), lr_sched.shape[0]
    names = list(hyper_leaves)
    dv = [torch.zeros_like(a) for a in dx]
    d_hyp = {k: torch.zeros_like(h) for k, h in hyper_leaves.items()}
    g_lr = torch.zeros(T, n, dtype=torch.float64)
    g_mom = torch.zeros(T, n, dtype=torch.float64)
    for t in reversed(range(T)):
        lr_t, m_t = lr_sched[t].tolist(), mom_q[t].tolist()
        g_lr[t] = opt.unstep_weights(lr_t, dx=dx).cpu()
        w, g = grads_at(t)
        g_mom[t] = opt.unstep_velocity([gi.detach() for gi in g], m_t, lr=lr_t, dx=dx, dv=dv).cpu()
        # One Hessian-vector product: with v_i' = m_i v_i - (1 - m_i) g_i(x, hypers), the reverse
        # pass subtracts the vector-Jacobian product of g with (1 - m_i) dv_i from dx and d_hypers.
        outs = [(gi, (1.0 - m_t[i]) * dv[i]) for i, gi in enumerate(g) if gi.requires_grad]
        if outs:
            targets = list(w) + [hyper_leaves[k] for k in names]
            hv = torch.autograd.grad([o for o, _ in outs], targets, grad_outputs=[d for _, d in outs],
                                     allow_unused=True)
            for i in range(n):
                if hv[i] is not None:
                    dx[i].sub_(hv[i].detach())
            for j, k in enumerate(names):
                if hv[n + j] is not None:
                    d_hyp[k].sub_(hv[n + j].detach())
        for i in range(n):
            dv[i].mul_(m_t[i])
    opt.check()
    return g_lr, g_mom, dv, d_hyp


def check_restored(opt, x0, v0, message):
    """Raise ReversibilityError (``message`` formatted with ``what``) unless ``opt`` is back at the exact
    state (x0, v0) with an empty buffer."""
    xr, vr = opt.exact_state()
    bad = [opt.names[i] for i in range(len(x0)) if not (torch.equal(xr[i], x0[i]) and torch.equal(vr[i], v0[i]))]
    if bad or not opt.buffer_is_empty() or opt.steps != 0:
        what = f"weights or velocities of {', '.join(bad)} differ" if bad else "the information buffer is not empty"
        raise ReversibilityError(message.format(what=f"the initial state did not come back exactly: {what}"))


def hypergradient(params, train_loss, val_loss, lrs, momenta, hypers=None, velocities=None, radix_bits: int = 52,
                  groups=None, progress=None) -> HypergradientResult:
    """Exact gradients of ``val_loss`` after T steps of SGD with momentum, through the training.

    ``params``: the initial weights (tensors; not modified). ``train_loss(params, t, hypers)``: the
    training loss at step t (a scalar; must give the same bits each time it is called with the same
    weights and t). ``val_loss(params)``: the objective. ``lrs``, ``momenta``: schedules of shape
    (T,) or (T, len(params)); momenta are quantised to multiples of 2^-16 (``momenta_used``).
    ``hypers``: dict name -> tensor of differentiable training-loss hyperparameters (e.g. an L2
    strength); ``velocities``: initial velocities (default zero).

    Trains forward with :class:`ReversibleSGD`, then runs the training backwards exactly, with one
    Hessian-vector product per step (autograd), and checks that the initial weights, velocities and
    an empty buffer come back bit for bit (else raises :class:`ReversibilityError`).
    Returns a :class:`HypergradientResult`; ``grad_params`` is w.r.t. the initial weights (so
    gradients w.r.t. initialisation scales follow by the chain rule).
    """
    named = _as_named(params)
    names = [n for n, _ in named]
    init = [p.detach() for _, p in named]
    n = len(init)
    group_of = list(range(n)) if groups is None else [int(g) for g in groups]
    if len(group_of) != n or min(group_of) < 0:
        raise ValueError(f"stn_ext: groups must give a non-negative group index for each parameter ({count(n, 'parameter')})")
    lr_sched, lr_shape = _schedule(lrs, torch.as_tensor(lrs).shape[0], group_of, "lrs")
    T = lr_sched.shape[0]
    mom_sched, mom_shape = _schedule(momenta, T, group_of, "momenta")
    mom_q = quantize_momentum(mom_sched)
    hyper_leaves = {k: h.detach().clone().requires_grad_(True) for k, h in dict(hypers or {}).items()}

    work = [p.clone().contiguous() for p in init]
    opt = ReversibleSGD(list(zip(names, work)), radix_bits=radix_bits, velocities=velocities)
    x0, v0 = opt.exact_state()

    def leaves():
        return [w.detach().requires_grad_(True) for w in work]

    def grads_at(t):
        w = leaves()
        return w, _grads_with_graph(train_loss(w, t, hyper_leaves), w)

    it = range(T) if progress is None else progress(range(T))
    with torch.enable_grad():
        for t in it:
            _, g = grads_at(t)
            opt.step(lr_sched[t].tolist(), mom_q[t].tolist(), grads=g)
        opt.check()
        final_params = [w.detach().clone() for w in work]
        buffer_bits, bits_rate = opt.buffer_bits(), opt.bits_per_element_per_step
        w = leaves()
        vl = val_loss(w)
        dx = [torch.zeros_like(a) if d is None else d.detach().clone()
              for a, d in zip(w, torch.autograd.grad(vl, w, allow_unused=True))]
        try:
            g_lr, g_mom, dv, d_hyp = reverse_pass(opt, grads_at, lr_sched, mom_q, dx, hyper_leaves)
        except (ReversibilityError, FixedPointOverflowError, FloatingPointError) as err:
            raise ReversibilityError(_NOT_REPRODUCIBLE.format(what=f"the reverse pass failed: {err}")) from err
    check_restored(opt, x0, v0, _NOT_REPRODUCIBLE)
    return HypergradientResult(
        val_loss=float(vl.detach()),
        final_params=final_params,
        grad_lrs=_fold(g_lr, lr_shape, group_of),
        grad_momenta=_fold(g_mom, mom_shape, group_of),
        grad_params=[d.clone() for d in dx],
        grad_hypers={k: v.detach() for k, v in d_hyp.items()},
        grad_velocities=[d.clone() for d in dv],
        buffer_bits=buffer_bits,
        bits_per_element_per_step=bits_rate,
        momenta_used=quantize_momentum(torch.as_tensor(momenta).detach().double().cpu()),
    )
