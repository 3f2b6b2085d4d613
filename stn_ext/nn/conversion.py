"""convert(model): a model's Linear and Conv2d layers replaced by their STN layers in place."""
from torch import nn

from stn_ext.nn.conv import StnConv2d
from stn_ext.nn.linear import StnLinear


def convert(model, n_hyper, filter=None):
    """Replace, in place, the nn.Linear and nn.Conv2d submodules of ``model`` (all, or those for which
    ``filter(name, module)`` is true) by StnLinear / StnConv2d carrying their weights; returns model.
    With V = C = 0 (as converted) the model computes what it did before. Run it with
    ``with stn_ext.hyper_input(lam): model(x)``."""
    if n_hyper < 1:
        raise ValueError(f"stn_ext.convert: n_hyper must be >= 1, got {n_hyper}")
    if type(model) in (nn.Linear, nn.Conv2d):
        # Nothing holds the model to replace it in; say so instead of returning it unconverted.
        raise ValueError("stn_ext.convert: the model is itself a Linear/Conv2d; use StnLinear.from_linear or "
                         "StnConv2d.from_conv")
    targets = [(name, module) for name, module in model.named_modules()
               if type(module) in (nn.Linear, nn.Conv2d) and (filter is None or filter(name, module))]
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if isinstance(module, nn.Linear):
            new = StnLinear.from_linear(module, n_hyper)
        else:
            new = StnConv2d.from_conv(module, n_hyper)
        setattr(parent, child, new)
    return model
