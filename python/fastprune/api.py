"""``fastprune.prune`` (one call) and ``fastprune.Pruner`` (iterative and gradual pruning)."""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import nn

from fastprune.config import MagnitudeConfig, config_from_kwargs, get_method, register_method
from fastprune.importance.magnitude import magnitude_scores, threshold_masks, topk_masks
from fastprune.masks import apply_masks, select_parameters
from fastprune.plan import Plan
from fastprune.schedules import Schedule

__all__ = ["Pruner", "prune"]


def _sparsity_of(masks: dict, refs) -> float:
    total = sum(m.numel() for m in masks.values())
    zeros = sum(int((~m).sum()) for m in masks.values())
    return zeros / total if total else 0.0


def _run_magnitude(model: nn.Module, cfg: MagnitudeConfig) -> Plan:
    refs = select_parameters(model, cfg.include, cfg.exclude)
    if not refs:
        raise ValueError("the model has no prunable parameters (weights of Linear/Conv layers) under include/exclude")
    names = [r.name for r in refs]
    if cfg.threshold_std is not None:
        masks = threshold_masks(refs, cfg.threshold_std, cfg.min_remaining)
    else:
        masks = topk_masks(names, magnitude_scores(refs), cfg.sparsity, cfg.scope, cfg.min_remaining)
    return Plan("magnitude", dataclasses.asdict(cfg), cfg.sparsity, _sparsity_of(masks, refs), masks)


register_method("magnitude", MagnitudeConfig, _run_magnitude, "|w|, global or per layer (Han et al. 2015)")


def prune(model: nn.Module, method: str = "magnitude", *, config: Any = None, dry_run: bool = False,
          **kwargs: Any) -> Plan:
    """Prune ``model`` in place with a registered method and return the :class:`~fastprune.Plan`.

    ``prune(model, method="magnitude", sparsity=0.9, scope="global")`` builds the method's config
    from the keywords (an unknown keyword is a ``TypeError`` listing the valid ones);
    ``prune(model, config=MagnitudeConfig(...))`` is the explicit form. ``dry_run=True`` computes
    the plan without touching the model. Everything is validated and the whole plan computed
    before the model changes, so a failed call leaves it unchanged. Masks use
    ``torch.nn.utils.prune``'s container (see :mod:`fastprune.masks`).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if config is not None:
        if kwargs:
            raise TypeError(f"pass either config= or keyword arguments, not both (got {sorted(kwargs)})")
        spec = next((get_method(m) for m in _methods_for(type(config))), None)
        if spec is None:
            raise TypeError(f"config of type {type(config).__name__} belongs to no registered method")
        if method != "magnitude" and method != spec.name:
            raise ValueError(f"method={method!r} but config is a {type(config).__name__} ({spec.name!r})")
    else:
        spec = get_method(method)
        config = config_from_kwargs(spec.config_cls, kwargs)
    plan = spec.run(model, config)
    if not dry_run and plan.masks:
        refs = select_parameters(model, include=list(plan.masks))
        apply_masks(refs, plan.masks)
    return plan


def _methods_for(config_cls: type) -> list[str]:
    from fastprune.config import _REGISTRY

    return [name for name, spec in _REGISTRY.items() if spec.config_cls is config_cls]


class Pruner:
    """Iterative / gradual pruning: each :meth:`step` prunes to ``schedule(step_index)``.

    Example (Han et al.'s iterative prune-retrain loop)::

        pruner = fastprune.Pruner(model, "magnitude", schedule=fastprune.schedules.linear(0.5, 0.95, 0, 4))
        for _ in range(5):
            pruner.step()
            fastprune.train.fit(model, loader, epochs=3, lr=0.01)

    Masks only grow: a weight pruned at one step stays pruned. Extra keywords go to the method's
    config (``scope``, ``include``, ...).
    """

    def __init__(self, model: nn.Module, method: str = "magnitude", *, schedule: Schedule, **kwargs: Any) -> None:
        if not callable(schedule):
            raise TypeError("schedule must be a callable step -> sparsity (see fastprune.schedules)")
        if "sparsity" in kwargs:
            raise TypeError("Pruner takes its sparsity from the schedule; do not pass sparsity=")
        spec = get_method(method)
        config_from_kwargs(spec.config_cls, {"sparsity": schedule(0), **kwargs})  # validate early
        self.model = model
        self.method = method
        self.schedule = schedule
        self.kwargs = kwargs
        self.step_index = 0
        self.plans: list[Plan] = []

    def step(self) -> Plan:
        """Prune to the schedule's next sparsity and return that step's plan."""
        plan = prune(self.model, self.method, sparsity=self.schedule(self.step_index), **self.kwargs)
        self.step_index += 1
        self.plans.append(plan)
        return plan
