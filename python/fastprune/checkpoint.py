"""Loading pruned checkpoints into fresh models: masks re-installed, compacted shapes followed."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

from fastprune.masks import is_pruned
from fastprune.structure import handlers

__all__ = ["load_pruned"]


def load_pruned(model: nn.Module, state_dict: Mapping[str, torch.Tensor], strict: bool = True) -> nn.Module:
    """Load a pruned model's ``state_dict`` into a fresh, unpruned model of the same architecture.

    Tensors whose shapes differ from the model's (a structurally pruned, compacted checkpoint) are
    resized first, and the modules' own attributes (``out_channels``, ``in_features``, the groups of
    a depthwise conv, an attention module's head count...) follow the shapes read from the state dict.
    For every ``<module>.<param>_orig`` / ``<module>.<param>_mask`` pair in the state dict, the
    mask is installed on the fresh model first (torch's prune container), then the state dict is
    loaded. A finalised (mask-free) state dict loads as usual. Returns ``model``.
    """
    modules = dict(model.named_modules())
    _resize_to(model, modules, state_dict)
    for key, value in state_dict.items():
        if not key.endswith("_mask"):
            continue
        base = key[: -len("_mask")]
        if base + "_orig" not in state_dict:
            continue
        mname, _, pname = base.rpartition(".")
        module = modules.get(mname)
        if module is None or not hasattr(module, pname):
            raise ValueError(f"state_dict holds a mask for {base}, which the model does not have")
        if not is_pruned(module, pname):
            param = getattr(module, pname)
            if tuple(param.shape) != tuple(value.shape):
                raise ValueError(f"mask {key} has shape {tuple(value.shape)}, model's {base} has {tuple(param.shape)}")
            torch_prune.custom_from_mask(module, pname, value.to(device=param.device, dtype=param.dtype))
    model.load_state_dict(dict(state_dict), strict=strict)
    return model


def _resize_to(model: nn.Module, modules: Mapping[str, nn.Module], state_dict: Mapping[str, torch.Tensor]) -> None:
    changes = []
    for key, value in state_dict.items():
        mname, _, attr = key.rpartition(".")
        if attr.endswith("_orig"):
            attr = attr[: -len("_orig")]
        elif attr.endswith("_mask"):
            continue
        module = modules.get(mname)
        if module is None:
            continue
        cur = module._parameters.get(attr) if attr in module._parameters else module._buffers.get(attr)
        if isinstance(cur, torch.Tensor) and tuple(cur.shape) != tuple(value.shape):
            if cur.dim() != value.dim():
                raise ValueError(f"state_dict's {key} has {value.dim()} dims, the model's has {cur.dim()}")
            changes.append((module, attr, cur, tuple(value.shape)))
    snapshots = {}
    for module, attr, cur, shape in changes:
        snapshots.setdefault(module, handlers.snapshot(module))
        new = torch.zeros(shape, dtype=cur.dtype, device=cur.device)
        if attr in module._parameters:
            module._parameters[attr] = nn.Parameter(new, requires_grad=cur.requires_grad)
        else:
            module._buffers[attr] = new
    for module, snap in snapshots.items():
        handlers.fixup(module, snap)
    for module in model.modules():
        if module not in snapshots and any(c in snapshots for c in module.children()):
            handlers.fixup(module, handlers.snapshot(module))
