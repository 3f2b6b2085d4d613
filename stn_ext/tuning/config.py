"""TrainConfig: everything a run of the trainer depends on (saved as config.json in its run folder), and
the checks of its values."""
from dataclasses import asdict, dataclass, field, fields

import torch

import stn_ext
from stn_ext.tuning import defaults, options
from stn_ext.tuning.core import METHODS as STEP_METHODS
from stn_ext.tuning.space import BUILTINS, GROUPS

DEFAULT_HYPERS = ("dropout", "weight_decay")
# the STN paper's LSTM: locked dropout on the input, between the layers and on the output, embedding dropout,
# DropConnect on the hidden-to-hidden weights, AR and TAR
LANGUAGE_HYPERS = ("dropout", "embed_dropout", "dropconnect", "ar", "tar")
SEARCHES = ("random", "tpe")  # searches over fixed runs, each trial steps // random_trials weight steps
METHODS = STEP_METHODS + SEARCHES  # stn, delta-stn, fixed (the Tuner's), random, tpe
# fields added with a default other than what runs written before them did: a resume compares with these
EARLIER_VALUES = {"hyper_plain_every": 0, "response_gain_max": 1.0, "response_baseline": 0.0, "response_fit": "gradient"}
# TrainConfig fields passed to the Tuner unchanged; clip is not among them (its -1 is resolved by the data first)
TUNER_OPTIONS = ("perturb", "hyper_lr_schedule", "hyper_input", "response_init", "hyper_lr", "hyper_beta2",
                 "scale_init", "scale_max", "tau", "hyper_plain_every", "train_per_cycle", "val_per_cycle",
                 "warmup_steps", "response_gain_max", "response_baseline", "response_fit")


def response_fit_of(fields):
    """The response fit (defaults.response_fit) a config's fields (a dict, as config.json holds them) resolve to;
    'gradient' for the methods that fit none."""
    method = fields.get("method")
    if method not in ("stn", "delta-stn"):
        return "gradient"
    held = {name for name, r in (fields.get("ranges") or {}).items() if r[0] == r[1]}  # as the Tuner, held skipped
    names = [name.split(".")[0] for name in fields.get("hypers", DEFAULT_HYPERS) if name not in held]  # "dropout.in"
    kinds = [k for name in names for k in GROUPS.get(name, (name,))]
    hyper_input = fields.get("hyper_input", "auto")
    centred = hyper_input == "recentred" or hyper_input == "auto" and all(
        k in BUILTINS and BUILTINS[k][3] != "logit" for k in kinds)
    perturb = defaults.resolve(method, fields.get("perturb", "auto"))[0]
    return defaults.response_fit(fields.get("response_fit", "auto"), method, perturb, kinds,
                                 fields.get("linearize", False), defaults.response_rows(fields.get("response_rows", 0.0)),
                                 centred)


@dataclass
class TrainConfig:
    """Everything a run depends on (saved as config.json in the run folder)."""

    method: str = "stn"               # the default: ahead on every real-data protocol of the bench (docs/trainer.md)
    model: str = "mlp"                # mlp | cnn | lstm (ignored when a model is passed to Trainer)
    data: str = "digits"              # digits | fashion-mnist | austen | ptb (ignored when data is passed to Trainer)
    data_path: str = ""               # folder of Fashion-MNIST's IDX files or of PTB's ptb.*.txt ("" : found)
    hypers: tuple = DEFAULT_HYPERS    # on language data: LANGUAGE_HYPERS, the STN paper's seven, where left so
    ranges: dict = field(default_factory=dict)   # {name: (low, high)}
    inits: dict = field(default_factory=dict)    # {name: initial value}
    steps: int = 1500                 # weight steps (total over all trials for random search)
    batch_size: int = 64              # global batch (all ranks together)
    lr: float = 0.0                   # SGD for the weights (0: 0.01; on language data 20)
    momentum: float = -1.0            # (-1: 0.9; on language data 0)
    clip: float = -1.0                # gradient norm clipping (-1: none; on language data 0.25; 0: none)
    bptt: int = 0                     # language data: tokens per window of truncated backpropagation (0: 35)
    hyper_lr: float = 0.02            # Adam for u and the perturbation scales
    hyper_beta2: float = -1.0         # Adam's second-moment decay for u and the scales (-1: 0.95; 0.99 per example
                                      # with the gradient's response fit; 0.999 until December 5, then 0.99 in both
                                      # modes until late that day: they kept a far start's large hypergradients;
                                      # docs/trainer.md, "Defaults")
    hyper_lr_schedule: str = "auto"   # cosine | constant | tail (constant, then cosine over the last half) |
                                      # auto (tail; cosine per example with the gradient's response fit)
    scale_init: float = -1.0          # initial sigma in unconstrained units (-1: 0.5 with per-example perturbation,
                                      # 0.3 per batch; STN per example by difference 0.3: defaults.STN_EXAMPLE_DIFFERENCE_SCALE)
    scale_max: float = 0.0            # cap on sigma (0: scale_init, so the entropy term cannot grow it)
    tau: float = 1e-2                 # entropy weight on the perturbation scales (-1, from older configs: 1e-2)
    hyper_plain_every: int = 2        # every k-th hyper step at u itself, stepping u alone (0: none; 1: sigma never
                                      # tuned, the official code's default); docs/trainer.md, "Defaults"
    train_per_cycle: int = 5          # Ttrain
    val_per_cycle: int = 1            # Tval
    warmup_steps: int = -1            # weight steps before the response trains and the first hyper step (-1: steps/10)
    perturb: str = "auto"             # batch (one perturbation per batch) | example (one per example, the papers') |
                                      # auto (the method's, stn_ext.tuning.defaults: batch for both)
    response_init: str = "v"          # start of the hypernet path: "v" (V, C random, rows >= 1 where z is centred;
                                      # W_h, b_h zero) | "zero" (V, C zero)
    hyper_input: str = "auto"         # STN hypernet input z = u~ - anchor: "centre" (the range's centre: raw logits),
                                      # "recentred" (u, moved after each hyper step by an exact reparameterisation),
                                      # "auto" (centre for logit-scale hyperparameters, recentred for the others),
                                      # "init" (u at the start)
    linearize: bool = False           # Delta-STN: response and hyper steps on the linearised network
    response_every: int = 0           # delta-stn: a response step after every k-th general step; per batch, STN's
                                      # response fitted by difference steps after every k-th step too (0: 2;
                                      # per batch by difference, Delta-STN's 1, and STN's at full batch)
    response_rows: float = 0.0        # delta-stn: the response step on this part of the batch (0: 1.0, all of it)
    response_gain_max: float = 4.0    # the response's gradients x (sigma_0 / sigma)^2, at most this, so its pace does
                                      # not fall as sigma shrinks; 1 after a roll-back (1: off, the rule until December
                                      # 5); docs/trainer.md, "The response's pace"
    response_baseline: float = 0.9    # per batch, > 0: the response's gradients less those of a running mean (this
                                      # decay) of earlier steps' weight gradients along its path, while the weights
                                      # descend (it stops for good once they do not); 0: off; tuning/response_baseline.py
    response_fit: str = "auto"        # "gradient" (the paper's) | "difference" (less the gradient at u along the
                                      # path, over the perturbation's square: half the weights' pace times the gain;
                                      # hyper_lr_schedule's auto is then tail) | "auto" (difference for Delta-STN per
                                      # batch but on a language model's kinds, where masks are drawn at a tenth of the
                                      # pace, started near V = 1 and capped; else where every tuned hyperparameter acts smoothly: weight decay,
                                      # noise, AR, TAR; per example weight decay and noise); docs/trainer.md, "The
                                      # response by finite difference", "Delta-STN's response where masks are drawn"
    hidden: tuple = (128, 128)
    channels: tuple = (16, 32)
    train_size: int = 0               # cap on the training split (0: all): digits examples, or text tokens
    random_trials: int = 4
    seed: int = 0
    data_seed: int = 0
    eval_every: int = 0               # weight steps between evaluations (0: one epoch, at least steps/50)
    checkpoint_every: int = 0         # weight steps between checkpoints (0: at each evaluation)
    out: str = ""                     # run folder ("" : no files)
    resume: bool = False              # continue the run in out from its checkpoint
    overwrite: bool = False           # a new run may replace an earlier run's files in out
    quiet: bool = False
    plots: bool = True
    tensorboard: bool = False         # also write the records as TensorBoard scalars to out/tensorboard
    device: str = "cpu"
    stop_after: int = 0               # stop (as if interrupted) at this weight step (random search: counted
                                      # over all trials); a run resumed at or past it goes on; 0: never
    # searches as users run them (random, tpe; stn_ext.tuning.study): any of pruner, workers > 1 or storage
    # runs the search as an Optuna study on a storage
    trial_steps: int = 0              # weight steps per trial (0: steps // random_trials, the equal-total budget)
    pruner: str = "none"              # none | median | hyperband (Optuna's, on the val loss of each evaluation)
    workers: int = 1                  # processes running trials in parallel on one study
    storage: str = ""                 # Optuna storage URL ("" : sqlite:///<out>/study.db)
    study_name: str = ""              # the study's name in the storage ("" : "stn_ext")
    worker_threads: int = 1           # torch threads per search worker process (0: torch's default)

    @classmethod
    def from_dict(cls, d):
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"stn_ext: unknown TrainConfig fields {unknown}")
        return cls(**d)

    def validate(self):
        if self.method not in METHODS:
            raise ValueError(f"stn_ext: unknown method {self.method!r}; expected one of {METHODS}")
        # the options the Tuner takes as they are (stn_ext.tuning.options: the Tuner checks them the same way)
        options.check(**{name: getattr(self, name) for name in TUNER_OPTIONS})
        for name in ("steps", "batch_size", "random_trials"):
            if getattr(self, name) < 1:
                raise ValueError(f"stn_ext: {name} must be >= 1, got {getattr(self, name)}")
        for name in ("eval_every", "checkpoint_every", "stop_after", "train_size", "response_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"stn_ext: {name} must be >= 0, got {getattr(self, name)}")
        defaults.response_rows(self.response_rows)  # the Tuner's own check, at configuration time
        if self.trial_steps < 0 or self.worker_threads < 0 or self.workers < 1:
            raise ValueError("stn_ext: trial_steps and worker_threads must be >= 0 and workers >= 1")
        if self.pruner not in ("none", "median", "hyperband"):
            raise ValueError(f"stn_ext: pruner must be 'none', 'median' or 'hyperband', got {self.pruner!r}")
        if self.method not in SEARCHES and (self.pruner != "none" or self.workers > 1 or self.storage):
            raise ValueError(f"stn_ext: pruner, workers and storage are for the searches {SEARCHES}, not {self.method!r}")
        if self.method in SEARCHES and self.trial_steps == 0 and self.steps < self.random_trials:
            raise ValueError(f"stn_ext: a search ({self.method}) with {self.random_trials} trials needs steps >= trials")
        if self.lr < 0:
            raise ValueError(f"stn_ext: lr must be > 0 (or 0: auto), got {self.lr}")
        if not (0 <= self.momentum < 1 or self.momentum == -1) or not (self.clip >= 0 or self.clip == -1) \
                or self.bptt < 0:
            raise ValueError("stn_ext: momentum must be in [0, 1) (or -1: auto), clip >= 0 (or -1: auto), bptt >= 0")
        if self.resume and not self.out:
            raise ValueError("stn_ext: resume needs the run folder (out)")
        if self.tensorboard and not self.out:
            raise ValueError("stn_ext: tensorboard writes into the run folder: give out (--out)")
        if self.resume and self.overwrite:
            raise ValueError("stn_ext: resume continues the run in out and overwrite replaces it; choose one")
        if isinstance(self.hypers, str):
            self.hypers = tuple(h.strip() for h in self.hypers.split(",") if h.strip())
        self.hypers = tuple(self.hypers)
        self.hidden, self.channels = tuple(self.hidden), tuple(self.channels)
        _check_device(self.device)
        return self


def resolved(cfg, language):
    """The settings whose defaults depend on the data (``language``: a language-modelling data set):
    {lr, momentum, clip, bptt, hypers}."""
    hypers = LANGUAGE_HYPERS if language and tuple(cfg.hypers) == DEFAULT_HYPERS else tuple(cfg.hypers)
    return {"lr": cfg.lr or (20.0 if language else 0.01),
            "momentum": cfg.momentum if cfg.momentum >= 0 else (0.0 if language else 0.9),
            "clip": cfg.clip if cfg.clip >= 0 else (0.25 if language else 0.0),
            "bptt": cfg.bptt or 35, "hypers": hypers}


def _check_device(device):
    """Refuse a device this process cannot train on, before any work (torch would fail late and raw)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"stn_ext: cannot parse device {device!r}; expected cpu, cuda or cuda:N") from None
    if dev.type == "cpu":
        return
    if dev.type != "cuda":
        raise ValueError(f"stn_ext: device {device!r}: stn_ext has CPU and CUDA kernels only")
    if not torch.cuda.is_available():
        raise ValueError(f"stn_ext: device {device!r} asked for, but torch finds no CUDA GPU "
                         "(torch.cuda.is_available() is False); use device 'cpu'")
    if not stn_ext.has_cuda():
        raise ValueError(f"stn_ext: device {device!r} asked for, but this stn_ext build has no CUDA kernels "
                         "(stn_ext.has_cuda() is False); rebuild it with FORCE_CUDA=1 or use device 'cpu'")
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"stn_ext: device {device!r} asked for, but torch finds {torch.cuda.device_count()} GPU(s)")


def _dist():
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def replace_config(cfg, **kw):
    d = asdict(cfg)
    d.update(kw)
    return TrainConfig(**d).validate()


__all__ = ["TrainConfig", "METHODS", "SEARCHES", "replace_config"]
