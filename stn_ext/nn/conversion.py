"""convert(model): a model's Linear, Conv2d, LSTM and Embedding layers replaced by their STN layers in place."""
from torch import nn

from stn_ext.nn.conv import StnConv2d
from stn_ext.nn.embedding import StnEmbedding
from stn_ext.nn.linear import StnLinear
from stn_ext.nn.recurrent import StnLSTM

# Each kind converted, and the constructor that copies it.
_CONVERTERS = {
    nn.Linear: ("StnLinear.from_linear", StnLinear.from_linear),
    nn.Conv2d: ("StnConv2d.from_conv", StnConv2d.from_conv),
    nn.LSTM: ("StnLSTM.from_lstm", StnLSTM.from_lstm),
    nn.Embedding: ("StnEmbedding.from_embedding", StnEmbedding.from_embedding),
}


def _unsupported(module):
    """Why ``module`` cannot become an STN layer, or None."""
    if isinstance(module, nn.LSTM) and (module.bidirectional or module.proj_size):
        return "a bidirectional LSTM or one with proj_size > 0"
    if isinstance(module, nn.Embedding) and module.max_norm is not None:
        return "an Embedding with max_norm"
    return None


def convert(model, n_hyper, filter=None, dropout=False):
    """Replace, in place, the nn.Linear, nn.Conv2d, nn.LSTM and nn.Embedding submodules of ``model`` (all, or
    those for which ``filter(name, module)`` is true) by StnLinear / StnConv2d / StnLSTM / StnEmbedding carrying
    their weights; returns model. With V = C = 0 (as converted) the model computes what it did before. Run it
    with ``with stn_ext.hyper_input(lam): model(x)``. A layer of a kind the STN layers do not cover
    (bidirectional LSTM, LSTM with proj_size, Embedding with max_norm) is an error: leave it out with filter.

    ``dropout=True``: each nn.Dropout (that filter passes) also becomes a tunable dropout slot,
    ``stn_ext.tuning.models.HyperDropout`` named by its module path (tuned as ``dropout.<path>``), keeping its p
    where the slot is not tuned; count them in n_hyper when you tune them (``dropout_slots(model)``)."""
    if n_hyper < 1:
        raise ValueError(f"stn_ext.convert: n_hyper must be >= 1, got {n_hyper}")
    if type(model) in _CONVERTERS:
        # Nothing holds the model to replace it in; say so instead of returning it unconverted.
        raise ValueError(f"stn_ext.convert: the model is itself a {type(model).__name__}; use "
                         f"{_CONVERTERS[type(model)][0]}")
    targets = [(name, module) for name, module in model.named_modules()
               if type(module) in _CONVERTERS and (filter is None or filter(name, module))]
    if dropout:
        from stn_ext.tuning.models import HyperDropout  # the tuner's slot (stn_ext.tuning imports this package)

        targets += [(name, module) for name, module in model.named_modules()
                    if type(module) is nn.Dropout and (filter is None or filter(name, module))]
        if type(model) is nn.Dropout:
            raise ValueError("stn_ext.convert: the model is itself an nn.Dropout; use HyperDropout(slot, p)")
    for name, module in targets:
        why = _unsupported(module)
        if why is not None:
            raise ValueError(f"stn_ext.convert: {name!r} is {why}, which has no STN layer; leave it out with "
                             f"filter=lambda name, m: name != {name!r}")
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if type(module) is nn.Dropout:
            new = HyperDropout(name, module.p).train(module.training)
        else:
            new = _CONVERTERS[type(module)][1](module, n_hyper)
        setattr(parent, child, new)
    return model


def dropout_slots(model):
    """The tunable dropout slots of ``model`` (``HyperDropout`` modules; after ``convert(..., dropout=True)``
    their module paths), in module order: ``HyperSpace.build(("dropout", ...), dropout_slots(model))``."""
    from stn_ext.tuning.models import HyperDropout

    return [m.slot for m in model.modules() if isinstance(m, HyperDropout)]
