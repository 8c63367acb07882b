"""``fastprune.prune``: one call from a model to a pruned model. Dispatch only: the methods live in
:mod:`fastprune.methods`, the one path that applies their plans in :mod:`fastprune.apply`."""

from __future__ import annotations

from typing import Any

from torch import nn

from fastprune.apply import apply
from fastprune.methods.registry import config_from_kwargs, method_for_config, spec_for
from fastprune.plan import Plan

__all__ = ["prune"]


def prune(
    model: nn.Module, method: str | None = None, *, config: Any = None, dry_run: bool = False, **kwargs: Any
) -> Plan:
    """Prune ``model`` in place with a registered method and return the :class:`~fastprune.Plan`.

    ``prune(model, "magnitude", sparsity=0.9, scope="global")`` builds the method's config from the
    keywords (an unknown keyword is a ``TypeError`` listing the valid ones); ``prune(model,
    config=MagnitudeConfig(...))`` is the explicit form: the config's type names the method, and a
    ``method`` given beside it must be that method's name. Without either, the method is
    ``"magnitude"``. ``dry_run=True`` computes the plan without touching the model. Everything is
    validated and the whole plan computed before the model changes, so a failed call leaves it
    unchanged. Masks use ``torch.nn.utils.prune``'s container (see :mod:`fastprune.masks`).
    Methods that also change the surviving weights (WoodFisher's OBS update) return the changes
    beside the plan; they are added before the masks are installed, and travel in the
    ``state_dict``, not in the plan. ``fastprune.methods.table()`` lists the methods.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if config is not None:
        if kwargs:
            raise TypeError(f"pass either config= or keyword arguments, not both (got {sorted(kwargs)})")
        spec = method_for_config(config)
        if method is not None and method != spec.name:
            raise ValueError(f"method={method!r} but config is a {type(config).__name__} (method {spec.name!r})")
    else:
        spec = spec_for("magnitude" if method is None else method)
        config = config_from_kwargs(spec.config_cls, kwargs)
    result = spec.run(model, config)
    if dry_run:
        return result.plan
    return apply(
        model,
        result.plan,
        weight_updates=result.weight_updates,
        example_inputs=getattr(config, "example_inputs", None),
        trace=result.trace,
    )
