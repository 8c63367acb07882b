"""A plan is data: which weights (or channels) a method removes, frozen and JSON-serialisable.

A plan describes structure, not values: :meth:`Plan.apply` on a model with the same architecture
(and, for value-dependent checks, the same starting weights) reproduces the masks exactly. Weights
a method changes (OBS updates, fine-tuning) travel in the ``state_dict``.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import os
import zlib
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
    packed = np.packbits(flat).tobytes()
    return {
        "shape": list(mask.shape),
        "bits": base64.b64encode(packed).decode("ascii"),
        # a checksum of the packed bits: an edited or corrupted mask is refused, not decoded differently
        "crc32": zlib.crc32(packed),
    }


def _decode_mask(name: str, obj: Any, source: str) -> torch.Tensor:
    where = f"{source}: mask {name!r}"
    if not isinstance(obj, Mapping) or "shape" not in obj or "bits" not in obj:
        raise ValueError(f"{where} must be an object with 'shape' and 'bits'")
    shape = obj["shape"]
    if not isinstance(shape, list) or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in shape):
        raise ValueError(f"{where}: 'shape' must be a list of non-negative ints, got {shape!r}")
    n = math.prod(shape)
    try:
        packed = base64.b64decode(obj["bits"], validate=True)
    except (binascii.Error, TypeError, ValueError) as e:
        raise ValueError(f"{where}: 'bits' is not valid base64 ({e})") from e
    if len(packed) != (n + 7) // 8:
        raise ValueError(f"{where}: {len(packed)} bytes of bits for shape {shape} ({n} entries need {(n + 7) // 8})")
    if "crc32" in obj and obj["crc32"] != zlib.crc32(packed):
        raise ValueError(f"{where}: the bits do not match their checksum (the file was edited or corrupted)")
    bits = np.unpackbits(np.frombuffer(packed, dtype=np.uint8))[:n]
    return torch.from_numpy(bits.astype(np.bool_)).reshape(shape)


_FIELDS = ("method", "config", "target_sparsity", "achieved_sparsity", "masks")


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

    def to_json(self, path: str | os.PathLike[str] | None = None) -> str:
        """The plan as JSON (masks bit-packed and base64-encoded); also written to ``path`` if given."""
        text = json.dumps(self.to_dict(), indent=1)
        if path is not None:
            with open(path, "w", encoding="utf-8") as f:
                f.write(text)
        return text

    @classmethod
    def from_json(cls, text_or_path: str | os.PathLike[str]) -> Plan:
        """Inverse of :meth:`to_json`: a JSON string, or the path of a file holding one. Anything
        else (a missing file, invalid JSON, a missing field, a mask that does not match its shape
        or its checksum) is a ValueError naming the file (or "plan JSON") and the field."""
        if isinstance(text_or_path, os.PathLike) or not str(text_or_path).lstrip().startswith("{"):
            source = os.fspath(text_or_path)
            try:
                with open(source, encoding="utf-8") as f:
                    text = f.read()
            except OSError as e:
                raise ValueError(f"cannot read plan file {source!r}: {e.strerror or e}") from e
        else:
            source, text = "plan JSON", str(text_or_path)
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{source}: not a fastprune plan (invalid JSON: {e})") from e
        if not isinstance(obj, dict):
            raise ValueError(f"{source}: not a fastprune plan (a JSON {type(obj).__name__}, not an object)")
        if obj.get("format") != FORMAT_VERSION:
            raise ValueError(
                f"{source}: unsupported plan format {obj.get('format')!r} (this fastprune reads {FORMAT_VERSION})"
            )
        missing = [k for k in _FIELDS if k not in obj]
        if missing:
            raise ValueError(f"{source}: not a complete plan: missing {', '.join(missing)}")
        if not isinstance(obj["masks"], dict) or not isinstance(obj["config"], dict):
            raise ValueError(f"{source}: 'masks' and 'config' must be JSON objects")
        groups = obj.get("groups", [])
        if not isinstance(groups, list) or not all(isinstance(g, dict) for g in groups):
            raise ValueError(f"{source}: 'groups' must be a list of objects")
        return cls(
            method=obj["method"],
            config=obj["config"],
            target_sparsity=obj["target_sparsity"],
            achieved_sparsity=obj["achieved_sparsity"],
            masks={k: _decode_mask(k, v, source) for k, v in obj["masks"].items()},
            groups=tuple(groups),
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
