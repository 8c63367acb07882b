"""A plan is data: which weights (or channels) a method removes, frozen and JSON-serialisable.

A plan describes structure, not values: :meth:`Plan.apply` on a model with the same architecture
(and, for value-dependent checks, the same starting weights) reproduces the masks exactly. Weights
a method changes (OBS updates, fine-tuning) travel in the ``state_dict``.
"""

from __future__ import annotations

import base64
import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = ["Plan"]

FORMAT_VERSION = 1


def _encode_mask(mask: torch.Tensor) -> dict[str, Any]:
    flat = mask.detach().to("cpu", torch.bool).reshape(-1).numpy()
    return {"shape": list(mask.shape), "bits": base64.b64encode(np.packbits(flat).tobytes()).decode("ascii")}


def _decode_mask(obj: Mapping[str, Any]) -> torch.Tensor:
    shape = tuple(int(s) for s in obj["shape"])
    n = math.prod(shape)
    bits = np.unpackbits(np.frombuffer(base64.b64decode(obj["bits"]), dtype=np.uint8))[:n]
    return torch.from_numpy(bits.astype(np.bool_)).reshape(shape)


@dataclass(frozen=True)
class Plan:
    """What a pruning call decided.

    Attributes:
        method: registry name (``"magnitude"``, ...).
        config: the method's config as plain data (``dataclasses.asdict`` of it).
        target_sparsity: the requested sparsity over the pruned parameters (None in threshold mode).
        achieved_sparsity: zeros / elements over the pruned parameters after pruning.
        masks: ``"<module>.<param>" -> bool tensor`` (True = kept), for unstructured methods.
        groups: structured decisions (filled in by structured methods): per group, its member
            layers and the removed channel indices.
    """

    method: str
    config: Mapping[str, Any]
    target_sparsity: float | None
    achieved_sparsity: float
    masks: Mapping[str, torch.Tensor] = field(default_factory=dict)
    groups: tuple[Mapping[str, Any], ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "config", MappingProxyType(dict(self.config)))
        object.__setattr__(self, "masks", MappingProxyType({k: v.to(torch.bool) for k, v in self.masks.items()}))

    # -- inspection
    def __repr__(self) -> str:
        target = "-" if self.target_sparsity is None else f"{self.target_sparsity:.4f}"
        return (
            f"Plan(method={self.method!r}, target_sparsity={target}, achieved_sparsity="
            f"{self.achieved_sparsity:.4f}, masks={len(self.masks)} parameters, groups={len(self.groups)})"
        )

    def num_pruned(self) -> int:
        return int(sum(int((~m).sum()) for m in self.masks.values()))

    # -- JSON
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT_VERSION,
            "method": self.method,
            "config": _jsonable(dict(self.config)),
            "target_sparsity": self.target_sparsity,
            "achieved_sparsity": self.achieved_sparsity,
            "masks": {k: _encode_mask(v) for k, v in self.masks.items()},
            "groups": [dict(g) for g in self.groups],
        }

    def to_json(self, path: str | None = None) -> str:
        """The plan as JSON (masks bit-packed and base64-encoded); also written to ``path`` if given."""
        text = json.dumps(self.to_dict(), indent=1)
        if path is not None:
            with open(path, "w", encoding="utf-8") as f:
                f.write(text)
        return text

    @classmethod
    def from_json(cls, text_or_path: str) -> Plan:
        """Inverse of :meth:`to_json`: a JSON string, or the path of a file holding one."""
        text = text_or_path
        if not text.lstrip().startswith("{"):
            with open(text_or_path, encoding="utf-8") as f:
                text = f.read()
        obj = json.loads(text)
        if obj.get("format") != FORMAT_VERSION:
            raise ValueError(f"unsupported plan format {obj.get('format')!r} (this fastprune reads {FORMAT_VERSION})")
        return cls(
            method=obj["method"],
            config=obj["config"],
            target_sparsity=obj["target_sparsity"],
            achieved_sparsity=obj["achieved_sparsity"],
            masks={k: _decode_mask(v) for k, v in obj["masks"].items()},
            groups=tuple(obj.get("groups", ())),
        )

    # -- replay
    def apply(self, model: nn.Module) -> nn.Module:
        """Apply this plan to ``model`` (same architecture) with :func:`fastprune.apply`: validates
        every name and shape before changing anything; a structured plan masks its channels and, in
        compact mode, removes them (the shapes come out as in the original call). Returns ``model``."""
        if _applier is None:  # pragma: no cover - fastprune/__init__ imports fastprune.apply
            raise RuntimeError("import fastprune first: Plan.apply runs fastprune.apply")
        _applier(model, self)
        return model


# fastprune.apply.apply, handed over by that module when it is imported (this module imports
# nothing from the package, so that a plan is plain data at the bottom of the dependency graph)
_applier: Callable[[nn.Module, Plan], Any] | None = None


def set_applier(fn: Callable[[nn.Module, Plan], Any]) -> None:
    """Called once by :mod:`fastprune.apply`."""
    global _applier
    _applier = fn


def _jsonable(x: Any) -> Any:
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    return repr(x)
