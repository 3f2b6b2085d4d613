"""The entry points of the trainer: ``train`` (one run, or a search) and ``preflight`` (the checks the CLI
runs before any work). Above the loop, the searches and the run folders, which do not import it."""
from torch import nn

from stn_ext.data import fashion_mnist_folder
from stn_ext.tuning import language, models
from stn_ext.tuning.config import SEARCHES, TrainConfig, resolved
from stn_ext.tuning.loop import Trainer
from stn_ext.tuning.runfolder import check_run_folder
from stn_ext.tuning.search import random_search
from stn_ext.tuning.space import HyperSpace


def preflight(cfg):
    """The checks of a run of the built-in data and models that need no data loaded nor model built:
    config values, device, run folder, hyperparameter space (what the CLI runs before any training)."""
    cfg.validate()
    check_run_folder(cfg)
    if cfg.data == "fashion-mnist":  # files missing: say so before any run starts
        fashion_mnist_folder(cfg.data_path or None)
    text = cfg.data in language.TEXT_DATA
    language.check_model_for_data(cfg.model, text, cfg.data)
    if text:
        HyperSpace.build(resolved(cfg, True)["hypers"], language.dropout_slots(cfg.hidden), cfg.ranges, cfg.inits,
                         image_data=False)
        return
    slots = models.dropout_slots(cfg.model, cfg.hidden, cfg.channels)
    HyperSpace.build(cfg.hypers, slots, cfg.ranges, cfg.inits, image_data=True)


def train(config, data=None, model=None, space=None):
    """Run ``config`` (a TrainConfig or dict) and return its summary; the API behind the CLI.
    ``data``: a stn_ext.data.Dataset or None (config.data); ``model``: an STN nn.Module or None (the
    built-in config.model); for the searches ('random', 'tpe'), a zero-argument function returning a fresh model.
    ``space``: a HyperSpace to use instead of config.hypers (it may hold hyperparameters of your own
    kind: your model reads their per-example values from stn_ext.tuning.models.current_hyperparameters())."""
    cfg = config if isinstance(config, TrainConfig) else TrainConfig.from_dict(dict(config))
    cfg.validate()
    if cfg.method in SEARCHES:
        if isinstance(model, nn.Module) or (model is not None and not callable(model)):
            raise TypeError(f"stn_ext: a search ({cfg.method}) trains several models; pass model as a zero-argument "
                            "function returning a fresh model")
        if space is not None:
            raise ValueError(f"stn_ext: a search ({cfg.method}) builds its space from config.hypers")
        return random_search(cfg, data, model)
    if model is not None and not isinstance(model, nn.Module):
        model = model()
    return Trainer(cfg, data=data, model=model, space=space).fit()


__all__ = ["train", "preflight"]
