"""Loading pruned checkpoints into fresh models: masks re-installed, compacted shapes followed."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

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
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict must be a mapping of names to tensors, got {type(state_dict).__name__}")
    modules = dict(model.named_modules())
    masks = _validate(model, modules, state_dict, strict)  # everything checked: nothing changes on failure
    _resize_to(model, modules, state_dict)
    for key, (module, pname) in masks.items():
        if not is_pruned(module, pname):
            param = getattr(module, pname)
            value = state_dict[key]
            torch_prune.custom_from_mask(module, pname, value.to(device=param.device, dtype=param.dtype))
    model.load_state_dict(_with_metadata(state_dict), strict=strict)
    return model


def _with_metadata(state_dict: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
    """The state dict as ``load_state_dict`` wants it, its ``_metadata`` (each module's saved version,
    which some modules' loaders read) kept."""
    out: OrderedDict[str, torch.Tensor] = OrderedDict(state_dict)
    meta = getattr(state_dict, "_metadata", None)
    if meta is not None:
        out._metadata = meta  # type: ignore[attr-defined]
    return out


def _validate(
    model: nn.Module, modules: Mapping[str, nn.Module], state_dict: Mapping[str, Any], strict: bool
) -> dict[str, tuple[nn.Module, str]]:
    """Check the whole state dict against the model before anything is changed; returns the masks
    to install: ``{"<module>.<param>_mask": (module, param name)}``."""
    bad = [k for k, v in state_dict.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"state_dict values must be tensors; not for {', '.join(map(str, bad[:3]))}")
    masks: dict[str, tuple[nn.Module, str]] = {}
    for key, value in state_dict.items():
        if key.endswith("_mask"):
            base = key[: -len("_mask")]
            if base + "_orig" not in state_dict:
                raise ValueError(f"state_dict holds {key} without {base}_orig: a pruned checkpoint has both")
            mname, _, pname = base.rpartition(".")
            module = modules.get(mname)
            if module is None or not hasattr(module, pname):
                raise ValueError(f"state_dict holds a mask for {base}, which the model does not have")
            orig = state_dict[base + "_orig"]
            if tuple(orig.shape) != tuple(value.shape):
                raise ValueError(f"mask {key} has shape {tuple(value.shape)}, its {base}_orig {tuple(orig.shape)}")
            masks[key] = (module, pname)
        elif key.endswith("_orig") and key[: -len("_orig")] + "_mask" not in state_dict:
            raise ValueError(
                f"state_dict holds {key} without {key[: -len('_orig')]}_mask: a pruned checkpoint has both"
            )
    if strict:
        expected = set()
        pruned_here = {k[: -len("_mask")] for k in masks}
        for key in model.state_dict():
            base = key[: -len("_orig")] if key.endswith("_orig") else key
            if key.endswith("_mask"):
                continue
            if base in pruned_here or key.endswith("_orig"):
                expected |= {base + "_orig", base + "_mask"}
            else:
                expected.add(key)
        missing = sorted(expected - set(state_dict))
        unexpected = sorted(set(state_dict) - expected)
        if missing or unexpected:
            parts = ([f"missing {', '.join(missing[:5])}"] if missing else []) + (
                [f"unexpected {', '.join(unexpected[:5])}"] if unexpected else []
            )
            raise ValueError(f"state_dict does not fit the model (strict=True): {'; '.join(parts)}")
    return masks


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
