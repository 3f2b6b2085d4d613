"""Hyperparameter spaces for best-response training.

Each hyperparameter lives in an unconstrained space ``u`` (what the optimiser updates and what is
perturbed); its value is ``to_value(u)``:

    logit    value = low + (high - low) * sigmoid(u)          rates, any bounded interval
    log      value = exp(u), clipped into [low, high]          positive scales (weight decay, noise)
    linear   value = low + (high - low) * u / 4, clipped into [low, high]   counts, lengths (u in [0, 4])

A linear range spans 4 units of u whatever its width, as the middle of a logit range does (u in (-2, 2) covers
rates from 12% to 88% of it): the perturbation scale and the hyper learning rate, in units of u, then move any
range by the same fraction of itself. (u = value would leave a 22-pixel cutout length with sigma 0.3 pixels:
rounded, its value would change in few steps, and a hyper step of 0.02 would need 1000 steps to cross it.)

A discrete hyperparameter (``discrete=True``, e.g. the number of cutout holes) is rounded to the
nearest integer after the transform. A range of one value (low == high) holds the hyperparameter there: it is
applied, but its u stays 0 and is never perturbed, so nothing tunes it (e.g. an augmentation the user trusts
beside rates that are tuned). The trainer feeds the hypernet unconstrained values shifted by
a constant (STN: z = u - u_init; Delta-STN: z = u~ - stopgrad(u)), so log-scale hyperparameters such
as weight decay (u about -9) do not feed a large constant into every layer.

Built-in names (``HyperSpace.build`` expands group names):

    dropout            one rate per dropout slot of the model (``dropout.in``, ``dropout.h1``, ...)
    dropout.<slot>     the rate of one slot
    noise              std of additive Gaussian input noise
    weight_decay       L2 strength on the effective STN weights (training loss only)
    cutout             cutout_length and cutout_holes
    cutout_length      side of each square hole in pixels (discrete)
    cutout_holes       number of holes (discrete)
    shift              maximum random shift in pixels, each direction (discrete)

Language models (stn_ext.tuning.language; their dropout slots are locked: one mask per sequence):

    embed_dropout      rate at which whole words are dropped from the embedding table (one per batch)
    dropconnect        DropConnect rate on the LSTMs' hidden-to-hidden weights (one per batch)
    ar                 activation regularisation: alpha * mean(h^2) of the last layer's dropped output
    tar                temporal activation regularisation: beta * mean((h_t - h_{t-1})^2), undropped output

A hyperparameter with ``per_batch`` (the four above) takes one value per batch even where the others are
perturbed per example: it acts on something the batch shares (the weights, the embedding table), or the
paper's model draws it so (the STN paper's LSTM: dropouts per example, the rest per batch).
"""
import math
from dataclasses import dataclass, field, replace

import torch

TRANSFORMS = ("logit", "log", "linear")
LINEAR_SPAN = 4.0  # units of u across a linear range


@dataclass(frozen=True)
class Hyper:
    """One hyperparameter: ``name`` (unique), ``kind`` (which regulariser consumes it: dropout,
    noise, weight_decay, cutout_length, cutout_holes, shift or custom), range, transform and
    initial value. ``slot`` names the dropout slot for kind 'dropout'."""

    name: str
    kind: str
    low: float
    high: float
    init: float
    transform: str = "logit"
    discrete: bool = False
    slot: str = ""
    per_batch: bool = False

    def __post_init__(self):
        if self.transform not in TRANSFORMS:
            raise ValueError(f"stn_ext: hyperparameter {self.name!r}: unknown transform {self.transform!r}; "
                             f"expected one of {TRANSFORMS}")
        if not (math.isfinite(self.low) and math.isfinite(self.high)):
            raise ValueError(f"stn_ext: hyperparameter {self.name!r}: range [{self.low}, {self.high}] must be finite")
        if not self.low <= self.high:
            raise ValueError(f"stn_ext: hyperparameter {self.name!r}: empty range [{self.low}, {self.high}]; "
                             "low must be <= high (equal: held at that value)")
        if self.transform == "log" and self.low <= 0:
            raise ValueError(f"stn_ext: hyperparameter {self.name!r}: a log transform needs low > 0, got {self.low}")
        if not self.low <= self.init <= self.high:
            raise ValueError(f"stn_ext: hyperparameter {self.name!r}: initial value {self.init} is outside "
                             f"[{self.low}, {self.high}]")
        if self.transform == "logit" and not self.held and not self.low < self.init < self.high:
            raise ValueError(f"stn_ext: hyperparameter {self.name!r}: with a logit transform the initial value "
                             f"{self.init} must lie strictly inside ({self.low}, {self.high})")

    @property
    def held(self):
        """A range of one value: applied at that value, never tuned (u stays 0, unperturbed)."""
        return self.low == self.high

    # --- unconstrained <-> value -------------------------------------------------------------------

    def to_value(self, u):
        """Value(s) of the hyperparameter for unconstrained ``u`` (tensor), rounded if discrete."""
        if self.held:
            v = torch.full_like(u, self.low)
        elif self.transform == "logit":
            v = self.low + (self.high - self.low) * torch.sigmoid(u)
        elif self.transform == "log":
            v = torch.exp(u.clamp(math.log(self.low), math.log(self.high)))
        else:
            v = (self.low + (self.high - self.low) / LINEAR_SPAN * u).clamp(self.low, self.high)
        if self.discrete:
            v = torch.round(v).clamp(math.ceil(self.low), math.floor(self.high))
        return v

    def to_unconstrained(self, value):
        """Inverse of ``to_value`` (a float or tensor) on the open range."""
        v = torch.as_tensor(value, dtype=torch.float64)
        if self.held:
            return torch.zeros_like(v)
        if self.transform == "logit":
            # Discrete values on the boundary map slightly inside so they round back to themselves.
            p = ((v - self.low) / (self.high - self.low)).clamp(1e-6, 1 - 1e-6)
            return torch.log(p) - torch.log1p(-p)
        if self.transform == "log":
            return torch.log(v.clamp(self.low, self.high))
        return (v.clamp(self.low, self.high) - self.low) * (LINEAR_SPAN / (self.high - self.low))

    def u_bounds(self):
        """The interval of u that maps onto the range (log, linear), or onto its middle 96% (logit: (-4, 4),
        as the range's ends lie at u = -inf, +inf). The trainer does not use it (random search draws
        values: ``sample_value``). Held: (0, 0)."""
        if self.held:
            return (0.0, 0.0)
        if self.transform == "logit":
            return (-4.0, 4.0)
        if self.transform == "log":
            return (math.log(self.low), math.log(self.high))
        return (0.0, LINEAR_SPAN)

    def sample_value(self, gen):
        """One value drawn uniformly (log-uniformly for log, uniform integers if discrete)."""
        r = torch.rand((), generator=gen, dtype=torch.float64).item()  # drawn even when held: the same stream
        if self.held:
            return self.low
        if self.discrete:
            lo, hi = math.ceil(self.low), math.floor(self.high)
            return float(min(hi, lo + int(r * (hi - lo + 1))))
        if self.transform == "log":
            return math.exp(math.log(self.low) + r * (math.log(self.high) - math.log(self.low)))
        return self.low + r * (self.high - self.low) * (1 - 2e-3) + 1e-3 * (self.high - self.low)


# Built-in hyperparameters: kind -> (low, high, init, transform, discrete)
BUILTINS = {
    "dropout": (0.0, 0.9, 0.05, "logit", False),
    "noise": (1e-3, 1.0, 0.02, "log", False),
    "weight_decay": (1e-6, 1e-2, 1e-4, "log", False),
    "cutout_length": (0.0, 6.0, 2.0, "linear", True),
    "cutout_holes": (0.0, 4.0, 1.0, "linear", True),
    "shift": (0.0, 3.0, 1.0, "linear", True),
    "embed_dropout": (0.0, 0.9, 0.05, "logit", False),
    "dropconnect": (0.0, 0.9, 0.05, "logit", False),
    "ar": (1e-4, 10.0, 0.05, "log", False),
    "tar": (1e-4, 10.0, 0.05, "log", False),
}
GROUPS = {"cutout": ("cutout_length", "cutout_holes")}
IMAGE_KINDS = ("cutout_length", "cutout_holes", "shift")
LANGUAGE_KINDS = ("embed_dropout", "dropconnect", "ar", "tar")  # consumed by a language model (its hyper_kinds)
PER_BATCH_KINDS = LANGUAGE_KINDS


def builtin_names(dropout_slots=()):
    names = ["dropout"] + [f"dropout.{s}" for s in dropout_slots]
    return names + [n for n in BUILTINS if n != "dropout"] + list(GROUPS)


@dataclass
class HyperSpace:
    """An ordered set of hyperparameters; index ``i`` of every (..., n) tensor is ``hypers[i]``."""

    hypers: list = field(default_factory=list)

    def __post_init__(self):
        if not self.hypers:
            raise ValueError("stn_ext: the hyperparameter space is empty; name at least one hyperparameter")
        names = [h.name for h in self.hypers]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"stn_ext: hyperparameters named more than once: {dup}")

    @classmethod
    def build(cls, names, dropout_slots=(), ranges=None, inits=None, image_data=True):
        """Space from built-in ``names`` (a list or a comma-separated string), expanding groups.
        ``dropout_slots``: the model's dropout slots; ``ranges``: {name: (low, high)}; ``inits``:
        {name: value}. Range/init keys may name a group (``dropout``, ``cutout``) to apply to all."""
        if isinstance(names, str):
            names = [n.strip() for n in names.split(",") if n.strip()]
        ranges, inits = dict(ranges or {}), dict(inits or {})
        valid = builtin_names(dropout_slots)
        hypers = []
        for name in names:
            if name not in valid:
                hint = "" if dropout_slots or not name.startswith("dropout") else \
                    " (this model has no dropout slots)"
                raise ValueError(f"stn_ext: unknown hyperparameter {name!r}{hint}; known: {', '.join(valid)}")
            if name == "dropout":
                if not dropout_slots:
                    raise ValueError("stn_ext: hyperparameter 'dropout' needs a model with dropout slots "
                                     "(stn_ext.tuning.models.HyperDropout); this model has none")
                expanded = [(f"dropout.{s}", "dropout", s) for s in dropout_slots]
            elif name.startswith("dropout."):
                expanded = [(name, "dropout", name.split(".", 1)[1])]
            elif name in GROUPS:
                expanded = [(k, k, "") for k in GROUPS[name]]
            else:
                expanded = [(name, name, "")]
            for full, kind, slot in expanded:
                if kind in IMAGE_KINDS and not image_data:
                    raise ValueError(f"stn_ext: hyperparameter {full!r} augments images and needs data shaped "
                                     "(N, C, H, W)")
                low, high, init, transform, discrete = BUILTINS[kind]
                for key in (full, kind if kind != full else None, name if name != full else None):
                    if key and key in ranges:
                        low, high = (float(v) for v in ranges[key])
                        break
                for key in (full, kind if kind != full else None, name if name != full else None):
                    if key and key in inits:
                        init = float(inits[key])
                        break
                else:
                    if not low <= init <= high or (transform == "logit" and not low < init < high):
                        init = _default_init(low, high, transform, discrete)
                hypers.append(Hyper(full, kind, low, high, init, transform, discrete, slot, kind in PER_BATCH_KINDS))
        known = {h.name for h in hypers} | {h.kind for h in hypers} | set(names)
        for what, d in (("range", ranges), ("initial value", inits)):
            for key in d:
                if key not in known:
                    raise ValueError(f"stn_ext: {what} given for {key!r}, which is not among the tuned "
                                     f"hyperparameters {[h.name for h in hypers]}")
        return cls(hypers)

    # --- vectors -------------------------------------------------------------------------------------

    @property
    def names(self):
        return [h.name for h in self.hypers]

    def __len__(self):
        return len(self.hypers)

    def init_unconstrained(self, dtype=torch.float32, device=None):
        return torch.stack([h.to_unconstrained(h.init) for h in self.hypers]).to(dtype=dtype, device=device)

    def to_unconstrained(self, values, dtype=torch.float32, device=None):
        """(n,) unconstrained vector from {name: value}."""
        missing = [n for n in self.names if n not in values]
        if missing:
            raise ValueError(f"stn_ext: no value for hyperparameters {missing}")
        return torch.stack([h.to_unconstrained(values[h.name]) for h in self.hypers]).to(dtype=dtype, device=device)

    def to_values(self, u):
        """Values (..., n) for unconstrained u (..., n); discrete entries are integral."""
        if u.shape[-1] != len(self):
            raise ValueError(f"stn_ext: expected {len(self)} hyperparameters in the last dim, got shape {tuple(u.shape)}")
        return torch.stack([h.to_value(u[..., i]) for i, h in enumerate(self.hypers)], dim=-1)

    def as_dict(self, u):
        v = self.to_values(u.detach().double().cpu())
        return {h.name: float(v[i]) for i, h in enumerate(self.hypers)}

    def u_limits(self, dtype=torch.float32, device=None):
        """(lo, hi) vectors of u beyond which the value no longer moves (log, linear: the clamp; logit: none; held:
        0, so its perturbed u~ and its u stay 0)."""
        lim = [(-math.inf, math.inf) if h.transform == "logit" and not h.held else h.u_bounds() for h in self.hypers]
        return tuple(torch.tensor([b[k] for b in lim], dtype=dtype, device=device) for k in (0, 1))

    def u_centre(self, dtype=torch.float32, device=None):
        """The middle of each hyperparameter's range in u (logit: 0, log: log of the geometric mean)."""
        return torch.tensor([sum(h.u_bounds()) / 2 for h in self.hypers], dtype=dtype, device=device)

    def sample(self, gen):
        """{name: value} drawn at random from the space (random search)."""
        return {h.name: h.sample_value(gen) for h in self.hypers}

    def tuned_kinds(self):
        """The kinds of the hyperparameters tuned (not held): a held rate draws the same masks at any u."""
        return [h.kind for h in self.hypers if not h.held]

    def index(self, kind):
        return [i for i, h in enumerate(self.hypers) if h.kind == kind]

    def with_inits(self, values):
        return HyperSpace([replace(h, init=float(values[h.name])) if h.name in values else h for h in self.hypers])


def _default_init(low, high, transform, discrete):
    if transform == "log":
        return math.sqrt(low * high)
    mid = (low + high) / 2
    return float(round(mid)) if discrete else mid
