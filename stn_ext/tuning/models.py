"""Small self-tuning models on StnLinear / StnConv2d, with per-layer dropout whose rates are
hyperparameters (one rate per example).

Models run with the hypernet input supplied by ``stn_ext.hyper_input(z)`` and the regularisers by
``regularisers(rates, rnd)``: ``HyperDropout("h1")`` drops with ``rates["h1"]`` (a (B,) tensor or a
scalar) in training mode and is the identity in eval mode or when no rate is given.

``forward_linearised(x, delta)`` (Delta-STN's linearisation) returns (f(x; W_e), J_w f . (Phi delta)):
the output at delta = 0 and its directional derivative along the weight response Phi delta, i.e. a
forward-mode JVP in delta, computed by carrying tangents through the layers (about 1.5x a forward).
"""
import contextlib
import contextvars

import torch
import torch.nn.functional as F
from torch import nn

import stn_ext
from stn_ext.tuning.augment import dropout_mask
from stn_ext.nn import StnConv2d, StnEmbedding, StnLinear

# Stack (a tuple) set by `regularisers`, per thread / asyncio task as `stn_ext.hyper_input`'s.
_REGULARISERS = contextvars.ContextVar("stn_ext_regularisers", default=())


class _Regs:
    def __init__(self, rates, rnd, values):
        self.rates, self.rnd, self.values = rates, rnd, values
        self.penalties = []  # training-loss terms the model adds (add_penalty)


@contextlib.contextmanager
def regularisers(rates, rnd, values=None):
    """Dropout rates {slot: (B,) tensor or float}, the BatchRandom to draw masks from, and the values of
    all hyperparameters {name: (B,) or scalar tensor} (for ``current_hyperparameters``)."""
    token = _REGULARISERS.set(_REGULARISERS.get() + (_Regs(dict(rates or {}), rnd, dict(values or {})),))
    try:
        yield
    finally:
        _REGULARISERS.reset(token)


def _current_regs():
    stack = _REGULARISERS.get()
    return stack[-1] if stack else None


def current_hyperparameters():
    """Within a training forward: {name: value} of every tuned hyperparameter ((B,) per example, or a
    0-d tensor when the batch shares one), so a model can apply regularisers of its own kinds; draw
    random numbers from ``current_random()`` to keep runs reproducible. None outside training steps
    (evaluation and hyper steps run without regularisers)."""
    regs = _current_regs()
    return regs.values if regs else None


def add_penalty(penalty):
    """Within a training forward: add ``penalty`` ((B,) per example, or a 0-d tensor for the batch) to the
    training loss, as the tuned weight decay's (averaged over the batch's examples). How a model applies a
    regulariser that is a loss term (a language model's AR and TAR). Ignored outside training steps."""
    regs = _current_regs()
    if regs is not None:
        regs.penalties.append(penalty)


def take_penalties():
    """The penalties added in the current training step so far (the tuner adds them to the loss), cleared."""
    regs = _current_regs()
    if regs is None:
        return []
    out, regs.penalties = regs.penalties, []
    return out


_SIDE_RUN = contextvars.ContextVar("stn_ext_side_run", default=None)


@contextlib.contextmanager
def side_run(rows):
    """A run of the model beside the step's own (Delta-STN's response step) on the rows ``rows`` (indices) of
    the step's batch: a model that carries state from batch to batch (a language model's hidden state) starts
    from those rows' state and leaves what it carries on as the step's own run left it."""
    token = _SIDE_RUN.set(rows)
    try:
        yield
    finally:
        _SIDE_RUN.reset(token)


def current_side_run():
    """The rows (indices into the step's batch) of the current side run (see ``side_run``), or None in the step's
    own run."""
    return _SIDE_RUN.get()


def current_random():
    """The BatchRandom of the current training step (its draws are checkpointed and split across ranks)."""
    regs = _current_regs()
    return regs.rnd if regs else None


class HyperDropout(nn.Module):
    """Inverted dropout whose rate is a hyperparameter, per example (see ``regularisers``). Where the slot is not
    tuned (no rate given), the fixed rate ``p`` (0: none), as nn.Dropout (stn_ext.convert(..., dropout=True)
    keeps each converted nn.Dropout's p so)."""

    def __init__(self, slot, p=0.0):
        super().__init__()
        self.slot, self.p = slot, float(p)

    def mask(self, x):
        """The mask of a training step (the tuner's random numbers), or None: not training, outside the tuner's
        steps, or no rate to apply."""
        regs = _current_regs()
        if not self.training or regs is None:
            return None
        rate = regs.rates.get(self.slot, self.p or None)
        return None if rate is None else dropout_mask(x, rate, regs.rnd)

    def forward(self, x):
        m = self.mask(x)
        if m is None and self.training and self.p and _current_regs() is None:  # outside the tuner: nn.Dropout
            return F.dropout(x, self.p, training=True)
        return x if m is None else x * m

    def extra_repr(self):
        return f"slot={self.slot!r}" + (f", p={self.p}" if self.p else "")


def _dual_stn(layer, x, xdot, delta):
    """Primal at lam = 0 and tangent along delta of an STN layer (weights W_e + (V delta) (.) W_h). W_e and W_h go
    through GEMMs of their own: the primal then depends on W_e alone, so a loss's backward does not run through
    W_h's GEMM, nor a tangent's backward to the response through the primal's."""
    s = delta @ layer.hyper_weight.t()  # (out,) or (B, out)
    t = delta @ layer.hyper_bias.t() if layer.hyper_bias is not None else None
    if isinstance(layer, StnLinear):
        e, h = F.linear(x, layer.weight_elem), F.linear(x, layer.weight_hyper)
        y = e if layer.bias_elem is None else e + layer.bias_elem
        ydot = s * h if xdot is None else F.linear(xdot, layer.weight_elem) + s * h
        if t is not None:
            ydot = ydot + t * layer.bias_hyper
        return y, ydot
    if layer.padding_mode != "zeros" or layer.groups != 1:
        raise NotImplementedError("stn_ext: the linearised forward supports StnConv2d with groups=1, zero padding")
    conv = lambda inp, w: F.conv2d(inp, w, None, layer.stride, layer.padding, layer.dilation)  # noqa: E731
    e, h = conv(x, layer.weight_elem), conv(x, layer.weight_hyper)
    y = e if layer.bias_elem is None else e + layer.bias_elem[:, None, None]
    sv = s[..., None, None] if s.dim() == 2 else s[:, None, None]
    ydot = sv * h if xdot is None else conv(xdot, layer.weight_elem) + sv * h
    if t is not None:
        tb = t * layer.bias_hyper
        ydot = ydot + (tb[..., None, None] if tb.dim() == 2 else tb[:, None, None])
    return y, ydot


class StnSequential(nn.Module):
    """A chain of STN layers, ReLU, HyperDropout, Flatten and MaxPool2d with a linearised forward."""

    def __init__(self, *layers):
        super().__init__()
        self.layers = nn.ModuleList(layers)

    @property
    def dropout_slots(self):
        return stn_ext.dropout_slots(self)

    def forward(self, x):
        for m in self.layers:
            x = m(x)
        return x

    def forward_linearised(self, x, delta):
        xdot = None  # the input does not depend on delta
        for m in self.layers:
            if isinstance(m, (StnLinear, StnConv2d)):
                x, xdot = _dual_stn(m, x, xdot, delta)
            elif isinstance(m, HyperDropout):
                mask = m.mask(x)
                if mask is not None:
                    x = x * mask
                    xdot = None if xdot is None else xdot * mask
            elif isinstance(m, nn.ReLU):
                xdot = None if xdot is None else xdot * (x > 0).to(x.dtype)
                x = torch.relu(x)
            elif isinstance(m, nn.Flatten):
                x = m(x)
                xdot = None if xdot is None else m(xdot)
            elif isinstance(m, nn.MaxPool2d):
                y, idx = F.max_pool2d(x, m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode, True)
                if xdot is not None:
                    xdot = xdot.flatten(2).gather(2, idx.flatten(2)).view_as(y)
                x = y
            else:
                raise NotImplementedError(f"stn_ext: no linearised forward for {type(m).__name__}")
        return x, xdot


def mlp(in_features, n_out, n_hyper, hidden=(128, 128), input_dropout=True):
    """Flatten -> [dropout 'in'] -> (StnLinear -> ReLU -> dropout 'h<i>') per hidden layer -> StnLinear."""
    layers = [nn.Flatten()]
    if input_dropout:
        layers.append(HyperDropout("in"))
    prev = in_features
    for i, width in enumerate(hidden, 1):
        layers += [StnLinear(prev, width, n_hyper), nn.ReLU(), HyperDropout(f"h{i}")]
        prev = width
    layers.append(StnLinear(prev, n_out, n_hyper))
    return StnSequential(*layers)


def cnn(in_shape, n_out, n_hyper, channels=(16, 32), hidden=64, input_dropout=False):
    """For small images (C, H, W): [dropout 'in' on the pixels] -> (StnConv2d 3x3 -> ReLU -> MaxPool 2 ->
    dropout 'c<i>') per entry of ``channels`` -> Flatten -> StnLinear(hidden) -> ReLU -> dropout 'h1' ->
    StnLinear. ``input_dropout`` adds the fourth slot of the Delta-STN paper's Fashion-MNIST CNN (off by default:
    the built-in model's slots are c1, c2, h1)."""
    c, h, w = in_shape
    layers = [HyperDropout("in")] if input_dropout else []
    for i, ch in enumerate(channels, 1):
        layers += [StnConv2d(c, ch, 3, n_hyper, padding=1), nn.ReLU(), nn.MaxPool2d(2), HyperDropout(f"c{i}")]
        c, h, w = ch, h // 2, w // 2
        if h < 1 or w < 1:
            raise ValueError(f"stn_ext: images of shape {tuple(in_shape)} are too small for {len(channels)} "
                             "conv+pool stages")
    layers += [nn.Flatten(), StnLinear(c * h * w, hidden, n_hyper), nn.ReLU(), HyperDropout("h1"),
               StnLinear(hidden, n_out, n_hyper)]
    return StnSequential(*layers)


def dropout_slots(kind, hidden=(128, 128), channels=(16, 32), input_dropout=False):
    """The dropout slots the built-in model ``kind`` will have (to build its hyperparameter space first);
    ``input_dropout``: cnn's optional slot 'in' (the mlp always has it)."""
    if kind == "mlp":
        return ["in"] + [f"h{i}" for i in range(1, len(hidden) + 1)]
    if kind == "cnn":
        return (["in"] if input_dropout else []) + [f"c{i}" for i in range(1, len(channels) + 1)] + ["h1"]
    raise ValueError(f"stn_ext: unknown model {kind!r}; built in: 'mlp', 'cnn'")


def build(kind, in_shape, n_out, n_hyper, hidden=(128, 128), channels=(16, 32)):
    if kind == "mlp":
        n_in = 1
        for d in in_shape:
            n_in *= d
        return mlp(n_in, n_out, n_hyper, hidden)
    if kind == "cnn":
        if len(in_shape) != 3:
            raise ValueError(f"stn_ext: model 'cnn' needs image data (N, C, H, W); got examples of shape {tuple(in_shape)}")
        return cnn(in_shape, n_out, n_hyper, channels, hidden[0] if hidden else 64)
    raise ValueError(f"stn_ext: unknown model {kind!r}; built in: 'mlp', 'cnn'")


def stn_layers(model):
    return [m for m in model.modules() if isinstance(m, (StnLinear, StnConv2d, StnEmbedding))]


ROW_FLOOR = 1.0  # the shortest row of V and C at the start where the hypernet input is centred (Tuner.row_floor)


@torch.no_grad()
def init_response(layers, floor=0.0, near_one=False):
    """Start the hypernet path where it learns at once: W_h = b_h = 0 and V, C ~ N(0, 1/n), with rows shorter than
    ``floor`` raised to that length. The layers' own init (V = C = 0, W_h random) sits on a saddle of the product
    (V lam) W_h: neither factor gets a gradient while the other is zero, so the response grows from noise only,
    slowest in the directions where the weights themselves converge slowest. With W_h = 0 the output is still
    independent of lam at the start, and the gradient on W_h is the response's own least-squares signal. A row's
    response learns at |V_i|^2 times its pace, which the plain draw makes random (with one hyperparameter |V| was
    0.04-1.9 over seeds 0-26, and on ridge the slow draws ended 0.3-1.1 log units off); a floor takes out the slow
    end of that lottery and keeps the fast one (docs/trainer.md, "A floor under the response's pace").
    ``near_one``: V, C = 1 + N(0, 0.01) instead, every rate's response alike at the start (Delta-STN's where masks
    are drawn, defaults.difference_settings)."""
    for m in layers:
        rows = (m.hyper_weight,) if m.bias_hyper is None else (m.hyper_weight, m.hyper_bias)
        m.weight_hyper.zero_()
        if m.bias_hyper is not None:
            m.bias_hyper.zero_()
        for v in rows:
            if near_one:
                v.copy_(1 + 0.1 * torch.randn_like(v))
            else:
                v.normal_(0, v.shape[1] ** -0.5)
                _raise_short_rows(v, floor)


def _raise_short_rows(w, floor):
    if floor > 0:
        n = w.norm(dim=1, keepdim=True)
        w.mul_(torch.where(n < floor, floor / n.clamp_min(1e-12), torch.ones_like(n)))


@torch.no_grad()
def start_response(layers, seed, floor=0.0, pace=1.0, near_one=False):
    """``init_response`` (rows of V and C at least ``floor`` long, or near 1) drawn from generator seed ``seed``: the
    same start every time (a roll-back returns to it), the global generator left as it was. ``pace`` < 1 scales
    those rows by its square root (the response then learns at ``pace`` times the rate; a roll-back's restart slows
    it so)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        init_response(layers, floor, near_one)
    if pace != 1.0:
        for m in layers:
            m.hyper_weight.mul_(pace ** 0.5)
            if m.bias_hyper is not None:
                m.hyper_bias.mul_(pace ** 0.5)


@torch.no_grad()
def cap_path(layers, sigma, cap):
    """Scale down W_h's rows where a gate's path at one sigma, |V_r (.) sigma| |W_h,r|, is longer than ``cap`` times
    its weights' row |W_e,r|: a linear response that moves the weights by more than they are is outside where its
    fit by difference measured it, and V's steps, which grow with |W_h,r|^2, then run away with it (Delta-STN's
    response where masks are drawn, defaults.PATH_CAP). b_h is left as it is: b_e may well be near 0."""
    for m in layers:
        path, limit = path_and_limit(m, sigma, cap)
        shrink = (limit / path.clamp_min(torch.finfo(path.dtype).tiny)).clamp(max=1.0)
        m.weight_hyper.mul_(shrink.view(m.gate_shape()))


def path_and_limit(m, sigma, cap):
    """Per gate row of the STN layer ``m``: its path's length at one sigma, |V_r (.) sigma| |W_h,r|, and what
    ``cap_path`` allows it, ``cap`` |W_e,r|."""
    path = (m.hyper_weight * sigma).norm(dim=1) * m.gate_rows(m.weight_hyper).norm(dim=1)
    return path, cap * m.gate_rows(m.weight_elem).norm(dim=1)


def linearised(model, x, delta):
    """(f(x; W_e), J_w f . (Phi delta)): the model's own ``forward_linearised``, else the double-backward JVP."""
    if hasattr(model, "forward_linearised"):
        return model.forward_linearised(x, delta)

    def fn(lam):
        with stn_ext.hyper_input(lam):
            return model(x)
    return jvp_by_double_backward(fn, delta)


def jvp_by_double_backward(fn, delta):
    """Generic linearisation for any model (no forward-mode formulas needed): with y(a) = fn(a * delta),
    returns (y(0), dy/da at 0) by the double-backward trick. Costs about 3 forwards; models with a
    ``forward_linearised`` use that instead."""
    a = torch.zeros((), dtype=delta.dtype, device=delta.device, requires_grad=True)
    y = fn(a * delta)
    v = torch.zeros_like(y, requires_grad=True)
    (g,) = torch.autograd.grad(y, a, v, create_graph=True)
    (ydot,) = torch.autograd.grad(g, v, create_graph=True)
    return y, ydot
