"""The one path that applies a plan to a model: :func:`apply`.

``fastprune.prune`` (after a method's runner decided), :meth:`fastprune.Plan.apply` (replay of a
saved plan) and the channel methods all end here. Everything is validated against the model before
anything changes, so a failing call leaves the model as it was:

* a plan with masks: every named parameter must exist with the mask's shape; weight updates (an
  OBS step) are added first, then the masks are installed (torch's prune container, combined with
  masks already there). The returned plan holds the masks in force and the sparsity the pruned
  weights really have (zeros / entries), whatever was asked;
* a plan with channel groups: every member must match the model's tensors; the channels are
  masked and, in compact mode, removed (:func:`fastprune.structure.compact`). The returned plan
  says what compaction really removed (a constant channel it cannot fold exactly is kept).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from fastprune import plan as plan_module
from fastprune.masks import add_to_weights, apply_masks, current_mask, effective_weight, select_parameters
from fastprune.plan import Plan
from fastprune.structure.groups import Group, GroupList, as_inputs
from fastprune.structure.surgery import compact, mask_channels

__all__ = ["apply"]


def apply(
    model: nn.Module,
    plan: Plan,
    *,
    weight_updates: Mapping[str, torch.Tensor] | None = None,
    example_inputs: Any = None,
    trace: GroupList | None = None,
) -> Plan:
    """Apply ``plan`` to ``model`` in place and return the plan as applied.

    Args:
        model: the model the plan was made for, or a fresh one of the same architecture.
        plan: masks (unstructured) or channel groups (structured).
        weight_updates: ``"<module>.<param>" -> delta`` added to the weights before masking.
        example_inputs: for channel plans, inputs compaction may run the model on (default: zeros
            of the shapes recorded in the plan; the removed channels' constants do not depend on them).
        trace: for channel plans, the groups the plan was made from on this very model: compaction
            then proves removed channels are zeros from the trace instead of running the model.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(plan, Plan):
        raise TypeError(f"plan must be a fastprune.Plan, got {type(plan).__name__}")
    if plan.groups:
        if weight_updates:
            raise ValueError("a channel plan takes no weight_updates")
        return _apply_channels(model, plan, example_inputs, trace)
    return _apply_masks(model, plan, weight_updates)


def _apply_masks(model: nn.Module, plan: Plan, updates: Mapping[str, torch.Tensor] | None) -> Plan:
    """Install the masks; the plan returned holds the masks now in force (combined with those the
    model had: masks only grow) and the sparsity the pruned weights really have."""
    if not plan.masks:
        if updates:
            raise ValueError("weight_updates given for a plan that prunes nothing")
        return plan
    known = {r.name for r in select_parameters(model)} | {n.removesuffix("_orig") for n, _ in model.named_parameters()}
    missing = [n for n in plan.masks if n not in known]
    if missing:
        raise ValueError(
            f"the plan prunes {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}, which the model does not "
            f"have: is the plan for another architecture?"
        )
    refs = {r.name: r for r in select_parameters(model, include=list(plan.masks))}
    for name, mask in plan.masks.items():
        ref = refs[name]
        raw = getattr(ref.module, ref.param_name + "_orig", getattr(ref.module, ref.param_name))
        if tuple(mask.shape) != tuple(raw.shape):
            raise ValueError(f"plan's mask for {name} has shape {tuple(mask.shape)}, the model's is {tuple(raw.shape)}")
    for name, delta in (updates or {}).items():
        if name not in refs:
            raise ValueError(f"weight update for {name}, which the plan does not prune")
        if delta.numel() != plan.masks[name].numel():
            raise ValueError(
                f"weight update for {name} has {delta.numel()} entries, the weight {plan.masks[name].numel()}"
            )
    if updates:
        add_to_weights(list(refs.values()), updates)
    apply_masks(list(refs.values()), plan.masks)
    in_force = {n: current_mask(r.module, r.param_name) for n, r in refs.items()}
    weights = [effective_weight(r.module, r.param_name) for r in refs.values()]
    zeros = sum(int((w == 0).sum()) for w in weights)
    total = sum(w.numel() for w in weights)
    return dataclasses.replace(
        plan,
        masks={n: m.cpu() for n, m in in_force.items() if m is not None},
        achieved_sparsity=zeros / total if total else 0.0,
    )


def _zeros_from_specs(specs: Any, model: nn.Module) -> tuple[torch.Tensor, ...]:
    dev = next((p.device for p in model.parameters()), torch.device("cpu"))
    return tuple(torch.zeros(s["shape"], dtype=getattr(torch, s["dtype"]), device=dev) for s in specs)


def _apply_channels(model: nn.Module, plan: Plan, example_inputs: Any, trace: GroupList | None) -> Plan:
    groups = [Group.from_dict(d) for d in plan.groups]
    removed = {g.id: list(d["removed"]) for g, d in zip(groups, plan.groups, strict=True)}
    mode = plan.config.get("mode", "compact")
    modules = dict(model.named_modules())
    for g in groups:  # validate before any change
        for m in g.members:
            mod = modules.get(m.module)
            t = None
            if mod is not None:
                t = (
                    getattr(mod, m.attr + "_orig", None)
                    if hasattr(mod, m.attr + "_mask")
                    else getattr(mod, m.attr, None)
                )
            if not isinstance(t, torch.Tensor) or t.dim() <= m.dim or t.shape[m.dim] != len(m.index):
                raise ValueError(
                    f"plan member {m.tensor} (dim {m.dim}, {len(m.index)} channels) does not match the "
                    "model: is this plan for another architecture, or was it applied already?"
                )
    if mode == "mask":
        mask_channels(model, groups, removed, hard=bool(plan.config.get("hard", True)))
        return plan
    if example_inputs is not None:
        inputs = as_inputs(example_inputs)
    else:
        inputs = _zeros_from_specs(plan.config["input_specs"], model)
    mask_channels(model, groups, removed, hard=False, zero_norm=True)
    report = compact(
        model,
        inputs,
        allow_approximate=bool(plan.config.get("allow_approximate", False)),
        groups=trace if trace is not None else groups,
        channels=removed,
    )
    entries = tuple(
        {
            **d,
            "removed": report.removed.get(g.id, []),
            "kept": [[c, why] for gid, c, why in report.kept if gid == g.id],
        }
        for g, d in zip(groups, plan.groups, strict=True)
    )
    asked = sum(len(v) for v in removed.values())
    done = report.num_removed
    achieved = plan.achieved_sparsity * (done / asked) if asked else plan.achieved_sparsity
    config = {
        **plan.config,
        "compaction": {
            "exact": not report.approximate,
            "approximate_norms": list(report.approximate_norms),
            "max_abs_diff": report.max_abs_diff,
            "folded": list(report.folded),
        },
    }
    return dataclasses.replace(plan, config=config, groups=entries, achieved_sparsity=achieved)


# Plan.apply (replaying a saved plan) is this function: plan.py depends on nothing in the package,
# so the applier is handed to it here, when fastprune (which imports this module) is imported.
plan_module.set_applier(apply)
