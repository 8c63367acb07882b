"""Channel pruning as a plan: score the groups, select channels, record them, apply or replay.

The plan of a channel method holds, per group with removed channels, the group itself (its members
and their index maps, :meth:`Group.to_dict`) and the removed channels, plus the example inputs'
shapes and dtypes. :func:`apply_channel_plan` masks the channels and, in compact mode, removes
them; replaying onto a fresh model of the same architecture reproduces the shapes (compaction
measures the removed channels' constants on zero inputs of the recorded shapes: they do not depend
on the inputs).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from fastprune.config import ChannelConfig
from fastprune.importance.channels import group_scores, select_channels
from fastprune.plan import Plan
from fastprune.structure.groups import Group, GroupList, Member, _as_inputs, find_groups
from fastprune.structure.surgery import compact, mask_channels

__all__ = ["apply_channel_plan", "group_from_dict", "run_channels"]


def group_from_dict(d: Mapping[str, Any]) -> Group:
    members = tuple(Member(m["tensor"], m["module"], m["attr"], int(m["dim"]), m["role"], tuple(m["index"]))
                    for m in d["members"])
    return Group(int(d["id"]), int(d["channels"]), members, frozenset(d.get("pinned", ())))


def _input_specs(inputs: tuple) -> list[dict[str, Any]]:
    return [{"shape": list(x.shape), "dtype": str(x.dtype).removeprefix("torch.")} for x in inputs]


def _zeros_from_specs(specs: Any, model: nn.Module) -> tuple:
    dev = next((p.device for p in model.parameters()), torch.device("cpu"))
    return tuple(torch.zeros(s["shape"], dtype=getattr(torch, s["dtype"]), device=dev) for s in specs)


def run_channels(model: nn.Module, cfg: ChannelConfig, criterion: str) -> tuple[Plan, GroupList]:
    """Score and select; the model is not changed (prune() applies the plan, with the groups: their
    trace lets compaction prove removed channels are zeros without running the model)."""
    inputs = _as_inputs(cfg.example_inputs)
    groups = find_groups(model, inputs, include=cfg.include, exclude=cfg.exclude)
    if not groups:
        raise ValueError("the model has no prunable channel groups under include/exclude; boundaries: "
                         + "; ".join(f"{n}: {r}" for n, r in groups.boundaries))
    scores = group_scores(model, groups, criterion, reduction=cfg.reduction, seed=cfg.seed)
    if not scores:
        raise ValueError(f"criterion {criterion!r} scores none of the {len(groups)} groups (bn_scale needs BatchNorm layers)")
    removed = select_channels(groups, scores, cfg.sparsity, scope=cfg.scope, round_to=cfg.round_to)
    config = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "example_inputs"}
    config["input_specs"] = _input_specs(inputs)
    total = sum(len(g.prunable) for g in groups if g.id in scores)
    n_removed = sum(len(v) for v in removed.values())
    entries = tuple({**g.to_dict(), "removed": removed[g.id]} for g in groups if g.id in removed)
    return Plan(criterion, config, cfg.sparsity, n_removed / total if total else 0.0, groups=entries), groups


def apply_channel_plan(model: nn.Module, plan: Plan, example_inputs: Any = None,
                       traced: GroupList | None = None) -> Plan:
    """Mask (and in compact mode remove) the plan's channels on ``model``; returns the plan with
    what compaction actually removed (a constant channel that cannot be folded exactly is kept).
    ``traced``: the groups the plan was made from (same model), when at hand."""
    groups = [group_from_dict(d) for d in plan.groups]
    removed = {g.id: list(d["removed"]) for g, d in zip(groups, plan.groups)}
    mode = plan.config.get("mode", "compact")
    modules = dict(model.named_modules())
    for g in groups:  # validate before any change
        for m in g.members:
            mod = modules.get(m.module)
            t = None if mod is None else (getattr(mod, m.attr + "_orig", None) if hasattr(mod, m.attr + "_mask")
                                           else getattr(mod, m.attr, None))
            if not isinstance(t, torch.Tensor) or t.dim() <= m.dim or t.shape[m.dim] != len(m.index):
                raise ValueError(f"plan member {m.tensor} (dim {m.dim}, {len(m.index)} channels) does not match the "
                                 f"model: is this plan for another architecture, or was it applied already?")
    inputs = _as_inputs(example_inputs) if example_inputs is not None else _zeros_from_specs(plan.config["input_specs"], model)
    if mode == "mask":
        mask_channels(model, groups, removed, hard=bool(plan.config.get("hard", True)))
        return plan
    mask_channels(model, groups, removed, hard=False, zero_norm=True)
    report = compact(model, inputs, allow_approximate=bool(plan.config.get("allow_approximate", False)),
                     groups=traced if traced is not None else groups, channels=removed)
    entries = tuple({**d, "removed": report.removed.get(g.id, []),
                     "kept": [[c, why] for gid, c, why in report.kept if gid == g.id]}
                    for g, d in zip(groups, plan.groups))
    asked = sum(len(v) for v in removed.values())
    done = report.num_removed
    achieved = plan.achieved_sparsity * (done / asked) if asked else plan.achieved_sparsity
    return dataclasses.replace(plan, groups=entries, achieved_sparsity=achieved)
