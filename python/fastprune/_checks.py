"""Argument checks shared by the method configs (each raises a ValueError / TypeError naming the argument)."""

from __future__ import annotations

import math
from typing import Any

__all__ = [
    "check_damp",
    "check_loader",
    "check_min_remaining",
    "check_positive_int",
    "check_scope",
    "check_sparsity",
    "normalise_patterns",
]


def check_sparsity(x: Any, name: str = "sparsity") -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x) or not 0.0 <= x < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {x!r}")
    return float(x)


def check_scope(scope: Any) -> None:
    if scope not in ("global", "layer"):
        raise ValueError(f"scope must be 'global' or 'layer', got {scope!r}")


def check_min_remaining(x: Any) -> None:
    if isinstance(x, bool) or not isinstance(x, int) or x < 0:
        raise ValueError(f"min_remaining must be an int >= 0, got {x!r}")


def check_positive_int(x: Any, name: str) -> None:
    if isinstance(x, bool) or not isinstance(x, int) or x < 1:
        raise ValueError(f"{name} must be an int >= 1, got {x!r}")


def check_damp(x: Any) -> None:
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x) or x <= 0:
        raise ValueError(f"damp must be finite and > 0, got {x!r}")


def check_loader(data: Any, method: str) -> None:
    if data is None:
        raise ValueError(f"{method} needs data=: an iterable of (inputs, targets) batches")
    if not hasattr(data, "__iter__"):
        raise TypeError(f"data must be an iterable of (inputs, targets) batches, got {type(data).__name__}")


def normalise_patterns(cfg: Any) -> None:
    """Store a frozen config's include / exclude as tuples (a single name or pattern becomes a 1-tuple)."""
    for arg in ("include", "exclude"):
        v = getattr(cfg, arg)
        if isinstance(v, str):
            object.__setattr__(cfg, arg, (v,))
        elif v is not None:
            object.__setattr__(cfg, arg, tuple(v))
