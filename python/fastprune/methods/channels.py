"""Structured (channel) pruning with a filter criterion: one config type per criterion.

``l1_filter`` (Li et al. 2017), ``l2_filter``, ``bn_scale`` (Liu et al. 2017, network slimming)
and ``random`` (the control). Every channel method runs the same pipeline, :func:`run_channels`:
find the coupled-channel groups (:func:`fastprune.find_groups`), score them with the config's
criterion (:mod:`fastprune.importance.channels`; data-reading criteria get the config's
calibration data), select (:func:`fastprune.select.select_channels`) and record the plan.
:func:`fastprune.apply` then masks the channels and, in compact mode, removes them.

A new channel method is a :class:`ChannelConfig` subclass whose :meth:`~ChannelConfig.criterion`
returns its criterion, registered with ``register_method(TheConfig, name=...)(run_channels)``.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from fastprune._checks import check_loader, check_scope, check_sparsity, normalise_patterns
from fastprune.importance.channels import (
    ActivationNorm,
    BNScale,
    Criterion,
    FilterNorm,
    RandomScores,
    check_reduction,
    group_scores,
)
from fastprune.methods.registry import MethodResult, method_for_config, register_method
from fastprune.plan import Plan
from fastprune.select import select_channels
from fastprune.structure.groups import Group, GroupList, as_inputs, find_groups

__all__ = [
    "ActivationNormConfig",
    "BNScaleConfig",
    "ChannelConfig",
    "L1FilterConfig",
    "L2FilterConfig",
    "RandomChannelConfig",
    "channel_plan",
    "channel_scores",
    "input_specs",
    "run_channels",
]


@dataclass(frozen=True)
class ChannelConfig:
    """Fields every channel method shares. The base of the channel configs, not a method itself:
    use :class:`L1FilterConfig`, :class:`L2FilterConfig`, :class:`BNScaleConfig`,
    :class:`RandomChannelConfig` (or ``prune(model, "l1_filter", ...)``), or subclass it.

    Attributes:
        sparsity: fraction of channels removed, in [0, 1): in each group (``scope="layer"``) or
            over all removable channels (``scope="global"``, scores normalised per group).
        example_inputs: a tensor or tuple of inputs; the shapes the graph is traced with.
        scope: ``"layer"`` (default) or ``"global"``.
        round_to: keep each group's channel count a multiple of this (SIMD-friendly widths).
        include / exclude: module-name globs (see :func:`fastprune.structure.find_groups`).
        mode: ``"compact"`` (default) removes the channels physically; ``"mask"`` keeps shapes and
            zeroes whole channels (see ``hard``).
        hard: in mask mode, zero filters, biases and the BN's gamma and beta and keep them zero
            through training (torch prune reparametrisation); False zeroes filters and biases once
            and leaves BN alone, so they can regrow (soft filter pruning, as SFP does).
        allow_approximate: let compaction fold a constant channel where that is not exact (reported).
        reduction: how member scores combine into a group channel's score: sum, mean or max.
        layer_sparsity: per-layer ratios, as NISP's paper prunes: ``{module name or glob: fraction}``;
            a group takes the ratio of the first pattern matching one of its producing layers, else
            ``sparsity`` (``scope="layer"`` only; a pattern that matches no group is an error).
        prune_norms: let channels through LayerNorm / RMSNorm / GroupNorm (their affine parameters
            sliced): a transformer's hidden width, a ConvNeXt's channels can shrink; compaction is
            then approximate (the norms' statistics change), measured and reported in the plan's
            ``config["compaction"]``. Default False: exact.
    """

    sparsity: float | None = None
    example_inputs: Any = None
    scope: Literal["layer", "global"] = "layer"
    round_to: int | None = None
    include: tuple[str, ...] | None = None
    exclude: tuple[str, ...] | None = None
    mode: Literal["compact", "mask"] = "compact"
    hard: bool = True
    allow_approximate: bool = False
    reduction: Literal["sum", "mean", "max"] = "sum"
    layer_sparsity: Mapping[str, float] | None = None
    prune_norms: bool = False

    def __post_init__(self) -> None:
        if type(self) is ChannelConfig:
            raise TypeError(
                "ChannelConfig is the base of the channel methods' configs; use L1FilterConfig, L2FilterConfig, "
                "BNScaleConfig or RandomChannelConfig (or prune(model, 'l1_filter', ...))"
            )
        if self.sparsity is None:
            raise ValueError("channel pruning needs sparsity=")
        check_sparsity(self.sparsity)
        x = self.example_inputs
        if isinstance(x, torch.Tensor):
            pass
        elif isinstance(x, (tuple, list)) and x and all(isinstance(v, torch.Tensor) for v in x):
            object.__setattr__(self, "example_inputs", tuple(x))
        else:
            raise ValueError(
                "channel pruning needs example_inputs= (a tensor or a tuple of tensors) to trace the model"
            )
        check_scope(self.scope)
        if self.round_to is not None and (
            isinstance(self.round_to, bool) or not isinstance(self.round_to, int) or self.round_to < 1
        ):
            raise ValueError(f"round_to must be a positive int or None, got {self.round_to!r}")
        if self.mode not in ("compact", "mask"):
            raise ValueError(f"mode must be 'compact' or 'mask', got {self.mode!r}")
        check_reduction(self.reduction)
        normalise_patterns(self)
        if self.layer_sparsity is not None:
            if not isinstance(self.layer_sparsity, Mapping) or not all(isinstance(k, str) for k in self.layer_sparsity):
                raise TypeError("layer_sparsity must map module names or glob patterns to fractions")
            for k, v in self.layer_sparsity.items():
                check_sparsity(v, f"layer_sparsity[{k!r}]")
            if self.scope != "layer":
                raise ValueError("layer_sparsity sets each layer's ratio: it needs scope='layer'")
            object.__setattr__(self, "layer_sparsity", dict(self.layer_sparsity))

    def criterion(self) -> Criterion:
        """The criterion that scores this method's channels."""
        raise NotImplementedError

    def calibration_data(self) -> Iterable[Any] | None:
        """Batches a data-reading criterion observes (None: the criterion reads only weights)."""
        return None


@dataclass(frozen=True)
class L1FilterConfig(ChannelConfig):
    """``l1_filter``: the L1 norm of each filter (Li et al. 2017, arXiv:1608.08710)."""

    def criterion(self) -> Criterion:
        return FilterNorm(1, self.reduction)


@dataclass(frozen=True)
class L2FilterConfig(ChannelConfig):
    """``l2_filter``: the L2 norm of each filter."""

    def criterion(self) -> Criterion:
        return FilterNorm(2, self.reduction)


@dataclass(frozen=True)
class BNScaleConfig(ChannelConfig):
    """``bn_scale``: |gamma| of the BatchNorm after each channel (Liu et al. 2017, arXiv:1708.06519)."""

    def criterion(self) -> Criterion:
        return BNScale(self.reduction)


@dataclass(frozen=True)
class RandomChannelConfig(ChannelConfig):
    """``random``: uniform random scores (the control every criterion must beat); ``seed`` fixes them."""

    seed: int = 0

    def criterion(self) -> Criterion:
        return RandomScores(self.seed)


@dataclass(frozen=True)
class ActivationNormConfig(ChannelConfig):
    """``activation_norm``: each channel's mean |output| over ``data`` (at most ``num_batches``
    batches): a layer-by-layer, data-driven criterion (NISP's comparison baseline)."""

    data: Any = None
    num_batches: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_loader(self.data, "activation_norm")

    def criterion(self) -> Criterion:
        return ActivationNorm(self.num_batches, self.reduction)

    def calibration_data(self) -> Iterable[Any] | None:
        return self.data


def input_specs(inputs: tuple[torch.Tensor, ...]) -> list[dict[str, Any]]:
    """Shapes and dtypes of the example inputs, as plain data for the plan."""
    return [{"shape": list(x.shape), "dtype": str(x.dtype).removeprefix("torch.")} for x in inputs]


_NOT_IN_PLAN = ("example_inputs", "data", "loss_fn", "forward")


def _per_group_sparsity(groups: Sequence[Group], ratios: Mapping[str, float]) -> dict[int, float]:
    """Each group's ratio: the first pattern (in the mapping's order) matching one of its producers."""
    out: dict[int, float] = {}
    used: set[str] = set()
    for g in groups:
        names = [m.module for m in g.producers]
        for pattern, ratio in ratios.items():
            if any(n == pattern or fnmatch.fnmatchcase(n, pattern) for n in names):
                out[g.id] = float(ratio)
                used.add(pattern)
                break
    missing = [p for p in ratios if p not in used]
    if missing:
        raise ValueError(f"layer_sparsity pattern(s) {missing} match no prunable layer of the model")
    return out


def channel_scores(
    model: nn.Module, cfg: ChannelConfig, groups: GroupList | None = None
) -> tuple[GroupList, dict[int, torch.Tensor]]:
    """The groups (traced under the config's include / exclude unless given) and the scores the
    config's criterion gives them on its calibration data."""
    name = method_for_config(cfg).name
    if groups is None:
        groups = find_groups(
            model, as_inputs(cfg.example_inputs), include=cfg.include, exclude=cfg.exclude, prune_norms=cfg.prune_norms
        )
    if not isinstance(groups, GroupList):
        groups = GroupList(groups)
    if not groups:
        raise ValueError(
            "the model has no prunable channel groups under include/exclude; boundaries: "
            + "; ".join(f"{n}: {r}" for n, r in getattr(groups, "boundaries", []))
        )
    scores = group_scores(model, groups, cfg.criterion(), data=cfg.calibration_data())
    if not scores:
        raise ValueError(
            f"criterion {name!r} scores none of the {len(groups)} groups (bn_scale needs BatchNorm layers)"
        )
    return groups, scores


def channel_plan(
    cfg: ChannelConfig,
    groups: Sequence[Group],
    scores: Mapping[int, torch.Tensor],
    removed: Mapping[int, Sequence[int]],
    sparsity: float | None = None,
) -> Plan:
    """The Plan of a selection: the config as plain data, every group that loses channels."""
    config = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name not in _NOT_IN_PLAN}
    config["input_specs"] = input_specs(as_inputs(cfg.example_inputs))
    # where pruning stopped, and what the analysis could not do: the plan says so
    config["boundaries"] = [[n, r] for n, r in getattr(groups, "boundaries", [])]
    config["notes"] = list(getattr(groups, "notes", []))
    # the achieved sparsity is over the removable channels: say how many of all channels those are
    config["coverage"] = {
        "removable_channels": sum(len(g.prunable) for g in groups if g.id in scores),
        "all_channels": int(getattr(groups, "all_channels", 0)),
        "fixed_by_boundaries": int(getattr(groups, "fixed_channels", 0)),
    }
    total = sum(len(g.prunable) for g in groups if g.id in scores)
    n_removed = sum(len(v) for v in removed.values())
    entries = tuple({**g.to_dict(), "removed": list(removed[g.id])} for g in groups if removed.get(g.id))
    target = cfg.sparsity if sparsity is None else sparsity
    return Plan(method_for_config(cfg).name, config, target, n_removed / total if total else 0.0, groups=entries)


def run_channels(model: nn.Module, cfg: ChannelConfig) -> MethodResult:
    """Score and select; the model is not changed. The result carries the groups (its ``trace``):
    their trace lets compaction prove that removed channels are zeros without running the model."""
    assert cfg.sparsity is not None  # the config requires it
    groups, scores = channel_scores(model, cfg)
    per_group = _per_group_sparsity(groups, cfg.layer_sparsity) if cfg.layer_sparsity else None
    removed = select_channels(groups, scores, cfg.sparsity, scope=cfg.scope, round_to=cfg.round_to, per_group=per_group)
    return MethodResult(channel_plan(cfg, groups, scores, removed), trace=groups)


for _cls, _name, _desc in (
    (L1FilterConfig, "l1_filter", "L1 norm of each filter (Li et al. 2017), structured"),
    (L2FilterConfig, "l2_filter", "L2 norm of each filter, structured"),
    (BNScaleConfig, "bn_scale", "|BatchNorm gamma| (Liu et al. 2017), structured"),
    (RandomChannelConfig, "random", "random channels (the control), structured"),
    (ActivationNormConfig, "activation_norm", "mean |activation| of each channel on data, structured"),
):
    register_method(_cls, name=_name, description=_desc)(run_channels)
