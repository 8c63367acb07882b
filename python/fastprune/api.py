"""``fastprune.prune`` (one call) and ``fastprune.Pruner`` (iterative and gradual pruning)."""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import nn

from fastprune.config import (
    ChannelConfig,
    FisherDiagConfig,
    MagnitudeConfig,
    WoodFisherConfig,
    config_from_kwargs,
    get_method,
    register_method,
)
from fastprune.importance.magnitude import block_scores, magnitude_scores, threshold_masks, topk_masks
from fastprune.masks import add_to_weights, apply_masks, select_parameters
from fastprune.plan import Plan
from fastprune.schedules import Schedule

__all__ = ["Pruner", "prune"]


def _sparsity_of(masks: dict) -> float:
    total = sum(m.numel() for m in masks.values())
    zeros = sum(int((~m).sum()) for m in masks.values())
    return zeros / total if total else 0.0


def _run_magnitude(model: nn.Module, cfg: MagnitudeConfig) -> Plan:
    refs = select_parameters(model, cfg.include, cfg.exclude)
    if not refs:
        raise ValueError("the model has no prunable parameters (weights of Linear/Conv layers) under include/exclude")
    names = [r.name for r in refs]
    if cfg.threshold_std is not None:
        masks = threshold_masks(refs, cfg.threshold_std, cfg.min_remaining, cfg.block)
    else:
        scores = [block_scores(s, cfg.block) for s in magnitude_scores(refs)]
        masks = topk_masks(names, scores, cfg.sparsity, cfg.scope, cfg.min_remaining)
    return Plan("magnitude", dataclasses.asdict(cfg), cfg.sparsity, _sparsity_of(masks), masks)


register_method("magnitude", MagnitudeConfig, _run_magnitude, "|w|, global or per layer (Han et al. 2015)")


def _channel_runner(criterion: str):
    def run(model: nn.Module, cfg: ChannelConfig) -> Plan:
        from fastprune.structure.pruning import run_channels

        return run_channels(model, cfg, criterion)
    return run


for _name, _desc in (("l1_filter", "L1 norm of each filter (Li et al. 2017), structured"),
                     ("l2_filter", "L2 norm of each filter, structured"),
                     ("bn_scale", "|BatchNorm gamma| (Liu et al. 2017), structured"),
                     ("random", "random channels (the control), structured")):
    register_method(_name, ChannelConfig, _channel_runner(_name), _desc)


def prune(model: nn.Module, method: str = "magnitude", *, config: Any = None, dry_run: bool = False,
          **kwargs: Any) -> Plan:
    """Prune ``model`` in place with a registered method and return the :class:`~fastprune.Plan`.

    ``prune(model, method="magnitude", sparsity=0.9, scope="global")`` builds the method's config
    from the keywords (an unknown keyword is a ``TypeError`` listing the valid ones);
    ``prune(model, config=MagnitudeConfig(...))`` is the explicit form. ``dry_run=True`` computes
    the plan without touching the model. Everything is validated and the whole plan computed
    before the model changes, so a failed call leaves it unchanged. Masks use
    ``torch.nn.utils.prune``'s container (see :mod:`fastprune.masks`). Methods that also change
    the surviving weights (WoodFisher's OBS update) return the changes with the plan; they are
    added before the masks are installed, and travel in the ``state_dict``, not in the plan.
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
    result = spec.run(model, config)
    plan, updates = (result if isinstance(result, tuple) else (result, None))
    if not dry_run and plan.groups:
        from fastprune.structure.pruning import apply_channel_plan

        return apply_channel_plan(model, plan, getattr(config, "example_inputs", None), traced=updates)
    if not dry_run and plan.masks:
        refs = select_parameters(model, include=list(plan.masks))
        if updates:
            add_to_weights(refs, updates)
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


def _data_refs(model: nn.Module, cfg: Any):
    refs = select_parameters(model, cfg.include, cfg.exclude)
    if not refs:
        raise ValueError("the model has no prunable parameters (weights of Linear/Conv layers) under include/exclude")
    frozen = [r.name for r in refs if not getattr(r.module, r.param_name + "_orig", getattr(r.module, r.param_name)).requires_grad]
    if frozen:
        raise ValueError(f"parameters {frozen} do not require grad: the Fisher needs their gradients "
                         "(set requires_grad, or leave them out with exclude=)")
    return refs


def _woodfisher_step(model: nn.Module, cfg: WoodFisherConfig, sparsity: float):
    """One OBS step: (masks, updates) for ``sparsity``, without changing the model."""
    import torch

    from fastprune.importance.woodfisher import collect_fisher, obs_updates
    from fastprune.masks import effective_weight

    refs = _data_refs(model, cfg)
    loss_fn = cfg.loss_fn or torch.nn.functional.cross_entropy
    stats = collect_fisher(model, refs, cfg.data, loss_fn, num_grads=cfg.num_grads, block_size=cfg.block_size,
                           damp=cfg.damp, blocks=cfg.blocks, fisher_batch_size=cfg.fisher_batch_size,
                           progress=cfg.progress)
    weights = [effective_weight(r.module, r.param_name) for r in refs]
    inv_diag = stats.inverse_diag()
    sal = [(w.double() ** 2).reshape(-1) / (2 * dg.double()) for w, dg in zip(weights, inv_diag)]
    names = [r.name for r in refs]
    masks = topk_masks(names, [s.reshape(w.shape) for s, w in zip(sal, weights)], sparsity, cfg.scope,
                       cfg.min_remaining)
    updates = None
    if cfg.update_weights:
        dws = obs_updates(stats, weights, [masks[n] for n in names], joint=cfg.joint)
        for n, dw in zip(names, dws):
            if not bool(torch.isfinite(dw).all()):
                raise ValueError(f"the OBS update of {n} is not finite; increase damp")
        updates = {n: dw.reshape(w.shape).to(w.dtype) for n, dw, w in zip(names, dws, weights)}
    return refs, masks, updates


def _run_woodfisher(model: nn.Module, cfg: WoodFisherConfig):
    import copy

    from fastprune.masks import effective_weight

    if cfg.recompute_steps == 1:
        _, masks, updates = _woodfisher_step(model, cfg, cfg.sparsity)
    else:
        # sub-steps on a copy (the model changes only once everything succeeded)
        work = copy.deepcopy(model)
        start = {r.name: effective_weight(r.module, r.param_name).clone() for r in _data_refs(model, cfg)}
        current = _sparsity_of({r.name: effective_weight(r.module, r.param_name) != 0
                                for r in _data_refs(work, cfg)})
        for i in range(1, cfg.recompute_steps + 1):
            target = current + (cfg.sparsity - current) * i / cfg.recompute_steps
            wrefs, wmasks, wupdates = _woodfisher_step(work, cfg, target)
            if wupdates:
                add_to_weights(wrefs, wupdates)
            apply_masks(wrefs, wmasks)
        wrefs = {r.name: r for r in _data_refs(work, cfg)}
        masks = {n: getattr(wrefs[n].module, wrefs[n].param_name + "_mask") != 0 for n in start}
        updates = {n: effective_weight(wrefs[n].module, wrefs[n].param_name) - start[n] for n in start} \
            if cfg.update_weights else None
    config = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("data", "loss_fn")}
    plan = Plan("woodfisher", config, cfg.sparsity, _sparsity_of(masks), masks)
    return plan, updates


def _run_fisher_diag(model: nn.Module, cfg: FisherDiagConfig):
    import torch

    from fastprune.importance.woodfisher import collect_fisher
    from fastprune.masks import effective_weight

    refs = _data_refs(model, cfg)
    loss_fn = cfg.loss_fn or torch.nn.functional.cross_entropy
    stats = collect_fisher(model, refs, cfg.data, loss_fn, num_grads=cfg.num_grads, block_size=1, damp=cfg.damp,
                           fisher_batch_size=cfg.fisher_batch_size, need_inverse=False, progress=cfg.progress)
    weights = [effective_weight(r.module, r.param_name) for r in refs]
    sal = [(w.double() ** 2) * (cfg.damp + fd.reshape(w.shape)) / 2 for w, fd in zip(weights, stats.fisher_diag)]
    names = [r.name for r in refs]
    masks = topk_masks(names, sal, cfg.sparsity, cfg.scope, cfg.min_remaining)
    config = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("data", "loss_fn")}
    return Plan("fisher_diag", config, cfg.sparsity, _sparsity_of(masks), masks)


register_method("woodfisher", WoodFisherConfig, _run_woodfisher, "OBS with a block Woodbury inverse Fisher (Singh & Alistarh 2020)")
register_method("fisher_diag", FisherDiagConfig, _run_fisher_diag, "diagonal empirical Fisher saliency (WoodFisher's baseline)")
