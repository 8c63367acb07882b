"""Method configs (one frozen dataclass per method) and the method registry.

``fastprune.prune(model, method=..., **kwargs)`` builds the method's config from the keywords
(an unknown keyword is a ``TypeError`` listing the valid ones); ``prune(model, config=...)`` is the
explicit form. New methods register with :func:`register_method` without touching ``prune``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from torch import nn

__all__ = ["MagnitudeConfig", "MethodSpec", "config_from_kwargs", "get_method", "method_names", "register_method"]


def check_sparsity(x: Any, name: str = "sparsity") -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x) or not 0.0 <= x < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {x!r}")
    return float(x)


def _check_scope(scope: Any) -> None:
    if scope not in ("global", "layer"):
        raise ValueError(f"scope must be 'global' or 'layer', got {scope!r}")


def _check_min_remaining(x: Any) -> None:
    if isinstance(x, bool) or not isinstance(x, int) or x < 0:
        raise ValueError(f"min_remaining must be an int >= 0, got {x!r}")


@dataclass(frozen=True)
class MagnitudeConfig:
    """Magnitude pruning (Han, Pool, Tran, Dally 2015; arXiv:1506.02626).

    Either a target ``sparsity`` (exactly ``round(sparsity * n)`` zeros over the pruned
    parameters, globally or per layer; ties broken by position), or Han's threshold mode
    ``threshold_std = q``: prune ``|w| < q * std(W_l)`` per layer (``q`` a float, or a mapping from
    module / parameter names or glob patterns to ``q``).

    Attributes:
        sparsity: fraction of weights to zero, in [0, 1).
        scope: ``"global"`` (one threshold across layers) or ``"layer"`` (each layer to the target).
        include / exclude: module names or glob patterns (see :func:`fastprune.masks.select_parameters`).
        threshold_std: Han's quality parameter q (exclusive with ``sparsity``).
        min_remaining: weights each layer keeps at least (default 1: never prune a layer to nothing).
    """

    sparsity: float | None = None
    scope: Literal["global", "layer"] = "global"
    include: tuple[str, ...] | None = None
    exclude: tuple[str, ...] | None = None
    threshold_std: float | Mapping[str, float] | None = None
    min_remaining: int = 1

    def __post_init__(self) -> None:
        if self.sparsity is None and self.threshold_std is None:
            raise ValueError("magnitude pruning needs sparsity=... or threshold_std=...")
        if self.sparsity is not None and self.threshold_std is not None:
            raise ValueError("give either sparsity or threshold_std, not both")
        if self.sparsity is not None:
            check_sparsity(self.sparsity)
        _check_scope(self.scope)
        _check_min_remaining(self.min_remaining)
        if self.threshold_std is not None:
            qs = self.threshold_std.values() if isinstance(self.threshold_std, Mapping) else [self.threshold_std]
            for q in qs:
                if isinstance(q, bool) or not isinstance(q, (int, float)) or not math.isfinite(q) or q < 0:
                    raise ValueError(f"threshold_std (Han's q) must be a finite number >= 0, got {q!r}")
        for arg in ("include", "exclude"):
            v = getattr(self, arg)
            if isinstance(v, str):
                object.__setattr__(self, arg, (v,))
            elif v is not None:
                object.__setattr__(self, arg, tuple(v))


@dataclass(frozen=True)
class MethodSpec:
    name: str
    config_cls: type
    # run(model, config) -> Plan, without changing the model (prune() applies it)
    run: Callable[[nn.Module, Any], Any]
    description: str = ""


_REGISTRY: dict[str, MethodSpec] = {}


def register_method(name: str, config_cls: type, run: Callable[[nn.Module, Any], Any], description: str = "") -> None:
    """Add a method to ``fastprune.prune``'s registry (``run(model, config) -> Plan``)."""
    if name in _REGISTRY:
        raise ValueError(f"method {name!r} is already registered")
    _REGISTRY[name] = MethodSpec(name, config_cls, run, description)


def method_names() -> list[str]:
    return sorted(_REGISTRY)


def get_method(name: str) -> MethodSpec:
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ValueError(f"unknown method {name!r}; known methods: {', '.join(method_names())}")
    return _REGISTRY[name]


def config_from_kwargs(config_cls: type, kwargs: Mapping[str, Any]) -> Any:
    """Build a config dataclass from keywords; an unknown keyword is a TypeError listing valid ones."""
    valid = [f.name for f in dataclasses.fields(config_cls) if f.init]
    unknown = [k for k in kwargs if k not in valid]
    if unknown:
        raise TypeError(f"{config_cls.__name__} got unexpected keyword(s) {unknown}; valid: {', '.join(valid)}")
    return config_cls(**kwargs)


def iter_patterns(x: str | Iterable[str] | None) -> tuple[str, ...] | None:
    if x is None or isinstance(x, str):
        return None if x is None else (x,)
    return tuple(x)
