"""Han et al.'s dropout rescaling after pruning.

Reference: Han, Pool, Tran, Dally 2015 (arXiv:1506.02626), Section 3.2: with ``C`` a layer's number
of connections before (o) and after (r) pruning, retraining uses ``D_r = D_o * sqrt(C_r / C_o)``.
"""

from __future__ import annotations

import math

from torch import nn

from fastprune.masks import effective_weight
from fastprune.plan import Plan

__all__ = ["rescale_dropout"]

_LAYERS = (nn.Linear, nn.modules.conv._ConvNd)


def rescale_dropout(model: nn.Module, plan: Plan | None = None) -> dict[str, tuple[float, float]]:
    """Scale every ``nn.Dropout`` by ``sqrt(C_r / C_o)`` of the layer it feeds.

    The layer a dropout feeds is the next Linear/Conv in module registration order (the
    ``nn.Sequential`` convention); a dropout with no such layer is left alone. ``C_o`` is that
    layer's weight count and ``C_r`` its nonzero count now (or, when ``plan`` is given, its kept
    count in the plan). Returns ``{dropout name: (old p, new p)}``. Apply it once per pruning step
    to the dropout rates of the dense model (it rescales the current ``p``).
    """
    modules = list(model.named_modules())
    changes: dict[str, tuple[float, float]] = {}
    for i, (name, module) in enumerate(modules):
        if not isinstance(module, nn.modules.dropout._DropoutNd):
            continue
        target = next(((n, m) for n, m in modules[i + 1 :] if isinstance(m, _LAYERS)), None)
        if target is None:
            continue
        tname, layer = target
        key = f"{tname}.weight" if tname else "weight"
        c_o = layer.weight_orig.numel() if hasattr(layer, "weight_orig") else layer.weight.numel()
        if plan is not None and key in plan.masks:
            c_r = int(plan.masks[key].sum())
        else:
            c_r = int((effective_weight(layer, "weight") != 0).sum())
        new_p = module.p * math.sqrt(c_r / c_o) if c_o else module.p
        changes[name] = (module.p, new_p)
        module.p = new_p
    return changes
