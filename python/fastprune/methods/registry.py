"""The method registry: config type -> runner, and the name that ``prune(model, "name", ...)`` uses.

A method is a frozen config dataclass and a runner ``run(model, config) -> MethodResult`` that
computes what to remove without changing the model (:func:`fastprune.apply` then applies it).
The runner registers itself beside its config with the :func:`register_method` decorator, keyed
by the config's exact type, so that ``prune(model, config=cfg)`` finds it from the config alone
and a config can never run another method's code (the pattern of torchao's
``quantize_(model, config)`` handler table).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from torch import nn

from fastprune.plan import Plan

if TYPE_CHECKING:
    from fastprune.structure.groups import GroupList

__all__ = [
    "MethodResult",
    "MethodSpec",
    "config_from_kwargs",
    "method_for_config",
    "method_names",
    "methods",
    "register_method",
    "spec_for",
    "table",
    "unregister_method",
]


@dataclass(frozen=True)
class MethodResult:
    """What a runner decided.

    Attributes:
        plan: the plan (masks or channel groups).
        weight_updates: ``"<module>.<param>" -> delta`` added to the surviving weights before the
            masks are installed (WoodFisher's OBS update); None when the method changes no values.
        trace: for channel plans, the groups the plan was made from (on this model), which lets
            compaction prove that removed channels read zeros without running the model.
    """

    plan: Plan
    weight_updates: Mapping[str, torch.Tensor] | None = None
    trace: GroupList | None = None


Runner = Callable[[nn.Module, Any], MethodResult]
R = TypeVar("R", bound=Runner)


@dataclass(frozen=True)
class MethodSpec:
    name: str
    config_cls: type
    run: Runner
    description: str = ""


_BY_CONFIG: dict[type, MethodSpec] = {}
_BY_NAME: dict[str, MethodSpec] = {}


def register_method(config_cls: type, *, name: str, description: str = "") -> Callable[[R], R]:
    """Decorator: register ``run(model, config) -> MethodResult`` for configs of type ``config_cls``
    under ``name``. One runner per config type and one per name (a second is a ValueError)."""
    if not (isinstance(config_cls, type) and dataclasses.is_dataclass(config_cls)):
        raise TypeError(f"config_cls must be a dataclass type, got {config_cls!r}")
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"a method name must be an identifier, got {name!r}")

    def decorate(run: R) -> R:
        if config_cls in _BY_CONFIG:
            raise ValueError(f"{config_cls.__name__} already belongs to method {_BY_CONFIG[config_cls].name!r}")
        if name in _BY_NAME:
            raise ValueError(f"method {name!r} is already registered")
        spec = MethodSpec(name, config_cls, run, description)
        _BY_CONFIG[config_cls] = spec
        _BY_NAME[name] = spec
        return run

    return decorate


def unregister_method(name: str) -> None:
    """Remove a method (tests and notebooks that redefine one)."""
    spec = _BY_NAME.pop(name)
    del _BY_CONFIG[spec.config_cls]


def method_names() -> list[str]:
    return sorted(_BY_NAME)


def methods() -> dict[str, MethodSpec]:
    """Every registered method by name (a copy)."""
    return dict(sorted(_BY_NAME.items()))


def spec_for(name: str) -> MethodSpec:
    if not isinstance(name, str) or name not in _BY_NAME:
        raise ValueError(f"unknown method {name!r}; known methods: {', '.join(method_names())}")
    return _BY_NAME[name]


def method_for_config(config: Any) -> MethodSpec:
    spec = _BY_CONFIG.get(type(config))
    if spec is None:
        known = ", ".join(sorted(c.__name__ for c in _BY_CONFIG))
        raise TypeError(f"config of type {type(config).__name__} belongs to no registered method (configs: {known})")
    return spec


def config_from_kwargs(config_cls: type, kwargs: Mapping[str, Any]) -> Any:
    """Build a config dataclass from keywords; an unknown keyword is a TypeError listing valid ones."""
    valid = [f.name for f in dataclasses.fields(config_cls) if f.init]
    unknown = [k for k in kwargs if k not in valid]
    if unknown:
        raise TypeError(f"{config_cls.__name__} got unexpected keyword(s) {unknown}; valid: {', '.join(valid)}")
    return config_cls(**kwargs)


def table() -> str:
    """The registry as a table: name, config class, description."""
    rows = [("method", "config", "description")]
    rows += [(s.name, s.config_cls.__name__, s.description) for s in methods().values()]
    widths = [max(len(r[i]) for r in rows) for i in range(2)]
    return "\n".join(f"{r[0].ljust(widths[0])}  {r[1].ljust(widths[1])}  {r[2]}" for r in rows)
