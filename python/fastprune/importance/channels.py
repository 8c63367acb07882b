"""Channel (filter) criteria for structured pruning.

A criterion is any callable ``criterion(model, groups, data=None) -> {group id: scores}`` giving
one float64 score per channel of each group it can score (higher = more important; a group left
out is not pruned). Member scores combine over the group's members (``reduction``: sum by default,
so a channel of a residual stage is scored by every layer that writes it).

* :class:`FilterNorm`: the L1 norm of each output filter (``l1_filter``; Li et al. 2017, "Pruning
  filters for efficient ConvNets") or its L2 norm (``l2_filter``);
* :class:`BNScale`: |gamma| of the BatchNorm after the channel (``bn_scale``; Liu et al. 2017,
  network slimming); groups without a BatchNorm get no score and are left alone;
* :class:`RandomScores`: uniform scores from a seeded generator (``random``: the control every
  criterion must beat);
* :class:`ActivationCriterion`: the base of criteria that read data. It hooks the layers that
  produce each group's channels, runs the model on every batch (:func:`fastprune.batches.forward_batch`)
  and hands each layer's output to :meth:`~ActivationCriterion.observe`; :meth:`~ActivationCriterion.score`
  then turns what was gathered into scores. A criterion that needs gradients overrides
  :meth:`~ActivationCriterion.run_batch` (forward and backward) and reads them in its hooks.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal, Protocol

import torch
from torch import nn

from fastprune._modes import eval_mode
from fastprune.batches import forward_batch
from fastprune.masks import effective_weight
from fastprune.structure.groups import Group, Member
from fastprune.structure.handlers import WEIGHT_ATTRS

__all__ = [
    "ActivationCriterion",
    "ActivationNorm",
    "BNScale",
    "Criterion",
    "FilterNorm",
    "RandomScores",
    "group_scores",
    "layer_scores_to_groups",
    "make_criterion",
    "scatter_to_group",
]

Reduction = Literal["sum", "mean", "max"]


class Criterion(Protocol):
    """``(model, groups, data=None) -> {group id: (channels,) float64 scores}``."""

    def __call__(
        self, model: nn.Module, groups: Sequence[Group], data: Iterable[Any] | None = None
    ) -> dict[int, torch.Tensor]: ...


def check_reduction(reduction: Any) -> None:
    if reduction not in ("sum", "mean", "max"):
        raise ValueError(f"reduction must be 'sum', 'mean' or 'max', got {reduction!r}")


def scatter_to_group(
    group: Group, per_member: Sequence[tuple[Member, torch.Tensor]], reduction: Reduction = "sum"
) -> torch.Tensor | None:
    """Combine per-position member scores into one score per group channel.

    ``per_member`` pairs a member with a score per position along its ``dim`` (e.g. one per output
    channel of a conv); positions that belong to another group are skipped. Channels no member
    scores get 0 (``-inf`` under ``max``); None when no member was given."""
    if not per_member:
        return None
    out = torch.zeros(group.channels, dtype=torch.float64)
    count = torch.zeros(group.channels, dtype=torch.float64)
    if reduction == "max":
        out.fill_(-math.inf)
    for mem, per_pos in per_member:
        idx = torch.tensor(mem.index, dtype=torch.long)
        sel = idx >= 0
        vals = per_pos.reshape(-1).to(device="cpu", dtype=torch.float64)[sel]
        if reduction == "max":
            out.scatter_reduce_(0, idx[sel], vals, "amax", include_self=True)
        else:
            out.index_add_(0, idx[sel], vals)
        count.index_add_(0, idx[sel], torch.ones_like(vals))
    return out / count.clamp_min(1) if reduction == "mean" else out


def layer_scores_to_groups(groups: Sequence[Group], per_layer: Mapping[str, torch.Tensor]) -> dict[int, torch.Tensor]:
    """Per-layer scores (one per output channel of each producing layer, by module name) as group
    scores: a channel scores the sum over the group's producing layers [choice: a residual stream's
    channel is written by every block]. Groups no scored layer produces are left out."""
    out = {}
    for g in groups:
        s = scatter_to_group(g, [(m, per_layer[m.module]) for m in g.producers if m.module in per_layer])
        if s is not None:
            out[g.id] = s
    return out


class FilterNorm:
    """The Lp norm (p = 1 or 2) of every output filter (and bias) that writes a channel."""

    def __init__(self, p: float, reduction: Reduction = "sum") -> None:
        if p not in (1, 2):
            raise ValueError(f"p must be 1 or 2, got {p!r}")
        check_reduction(reduction)
        self.p = float(p)
        self.reduction = reduction

    def __call__(
        self, model: nn.Module, groups: Sequence[Group], data: Iterable[Any] | None = None
    ) -> dict[int, torch.Tensor]:
        modules = dict(model.named_modules())
        out = {}
        for g in groups:
            per = []
            for mem in g.members:
                if mem.role != "out" or mem.attr not in WEIGHT_ATTRS:
                    continue
                w = effective_weight(modules[mem.module], mem.attr)
                if w.dtype not in (torch.float32, torch.float64):
                    w = w.to(torch.float64)
                per.append((mem, torch.linalg.vector_norm(w.movedim(mem.dim, 0).flatten(1), ord=self.p, dim=1)))
            s = scatter_to_group(g, per, self.reduction)
            if s is not None:
                out[g.id] = s
        return out


class BNScale:
    """|gamma| of the normalisation layer after each channel (groups without one get no score)."""

    def __init__(self, reduction: Reduction = "sum") -> None:
        check_reduction(reduction)
        self.reduction = reduction

    def __call__(
        self, model: nn.Module, groups: Sequence[Group], data: Iterable[Any] | None = None
    ) -> dict[int, torch.Tensor]:
        modules = dict(model.named_modules())
        out = {}
        for g in groups:
            per = [
                (mem, effective_weight(modules[mem.module], mem.attr).to(torch.float64).abs())
                for mem in g.members
                if mem.role == "norm" and mem.attr == "weight"
            ]
            s = scatter_to_group(g, per, self.reduction)
            if s is not None:
                out[g.id] = s
        return out


class RandomScores:
    """Uniform random scores from a generator seeded with ``seed`` (the same groups, the same scores)."""

    def __init__(self, seed: int = 0) -> None:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {seed!r}")
        self.seed = seed

    def __call__(
        self, model: nn.Module, groups: Sequence[Group], data: Iterable[Any] | None = None
    ) -> dict[int, torch.Tensor]:
        gen = torch.Generator().manual_seed(self.seed)
        return {g.id: torch.rand(g.channels, dtype=torch.float64, generator=gen) for g in groups}


def _channel_dim(module: nn.Module) -> int | None:
    if isinstance(module, nn.Linear):
        return -1
    if isinstance(module, nn.modules.conv._ConvNd):
        return 1
    return None


class ActivationCriterion:
    """Base of criteria that read activations: observe every batch, then score.

    Subclasses implement :meth:`observe` (called once per producing layer and batch, under
    ``torch.no_grad`` unless :meth:`run_batch` is overridden) and :meth:`score`. The producing
    layers are the Linear / ConvNd modules whose output channels are group channels (members with
    ``role="out"`` on their weight); ``output.movedim(channel_dim, -1)`` puts those channels last.
    The model runs in eval mode and gets its training flags back; hooks are removed whatever happens.
    ``num_batches`` caps how many batches are read (None: all).
    """

    def __init__(self, num_batches: int | None = None) -> None:
        if num_batches is not None and (
            isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 1
        ):
            raise ValueError(f"num_batches must be a positive int or None, got {num_batches!r}")
        self.num_batches = num_batches

    # -- to implement
    def reset(self, model: nn.Module, groups: Sequence[Group]) -> None:
        """Clear what earlier calls gathered (called before the first batch)."""

    def observe(self, name: str, module: nn.Module, output: torch.Tensor, channel_dim: int) -> None:
        """One producing layer's output for one batch."""
        raise NotImplementedError

    def score(self, model: nn.Module, groups: Sequence[Group]) -> dict[int, torch.Tensor]:
        """Scores from what :meth:`observe` gathered."""
        raise NotImplementedError

    # -- the loop
    def run_batch(self, model: nn.Module, batch: Any) -> None:
        """Run the model on one batch (forward only, no gradients, by default)."""
        with torch.no_grad():
            forward_batch(model, batch)

    def producers(self, model: nn.Module, groups: Sequence[Group]) -> dict[str, int]:
        """Module name -> channel dim of its output, for every layer that produces group channels."""
        modules = dict(model.named_modules())
        out: dict[str, int] = {}
        for g in groups:
            for mem in g.producers:
                dim = _channel_dim(modules[mem.module])
                if dim is not None:
                    out[mem.module] = dim
        return out

    def __call__(
        self, model: nn.Module, groups: Sequence[Group], data: Iterable[Any] | None = None
    ) -> dict[int, torch.Tensor]:
        if data is None:
            raise ValueError(f"{type(self).__name__} reads activations: pass data= (an iterable of batches)")
        modules = dict(model.named_modules())
        self.reset(model, groups)
        handles = []
        for name, dim in self.producers(model, groups).items():

            def hook(mod: nn.Module, args: Any, output: Any, name: str = name, dim: int = dim) -> None:
                if isinstance(output, torch.Tensor):
                    self.observe(name, mod, output.detach(), dim)

            handles.append(modules[name].register_forward_hook(hook))
        seen = 0
        try:
            with eval_mode(model):
                for batch in data:
                    if self.num_batches is not None and seen >= self.num_batches:
                        break
                    self.run_batch(model, batch)
                    seen += 1
        finally:
            for h in handles:
                h.remove()
        if seen == 0:
            raise ValueError(f"{type(self).__name__}: data yielded no batches")
        return self.score(model, groups)


class ActivationNorm(ActivationCriterion):
    """Mean |output| of each channel of each producing layer over the data: a layer-by-layer
    criterion (each layer judged by its own output alone, the baseline NISP is compared with)."""

    def __init__(self, num_batches: int | None = None, reduction: Reduction = "sum") -> None:
        super().__init__(num_batches)
        check_reduction(reduction)
        self.reduction = reduction

    def reset(self, model: nn.Module, groups: Sequence[Group]) -> None:
        self._sums: dict[str, torch.Tensor] = {}
        self._counts: dict[str, int] = {}

    def observe(self, name: str, module: nn.Module, output: torch.Tensor, channel_dim: int) -> None:
        per = output.abs().movedim(channel_dim, -1).reshape(-1, output.shape[channel_dim]).to(torch.float64)
        self._sums[name] = self._sums.get(name, 0) + per.sum(0)
        self._counts[name] = self._counts.get(name, 0) + per.shape[0]

    def score(self, model: nn.Module, groups: Sequence[Group]) -> dict[int, torch.Tensor]:
        out = {}
        for g in groups:
            per = [(m, self._sums[m.module] / self._counts[m.module]) for m in g.producers if m.module in self._sums]
            s = scatter_to_group(g, per, self.reduction)
            if s is not None:
                out[g.id] = s
        return out


def make_criterion(name: str, *, reduction: Reduction = "sum", seed: int = 0) -> Criterion:
    """The built-in criterion called ``name`` (``l1_filter``, ``l2_filter``, ``bn_scale``, ``random``)."""
    if name == "l1_filter":
        return FilterNorm(1, reduction)
    if name == "l2_filter":
        return FilterNorm(2, reduction)
    if name == "bn_scale":
        return BNScale(reduction)
    if name == "random":
        return RandomScores(seed)
    raise ValueError(f"unknown channel criterion {name!r}; known: l1_filter, l2_filter, bn_scale, random")


def group_scores(
    model: nn.Module,
    groups: Sequence[Group],
    criterion: str | Criterion,
    *,
    data: Iterable[Any] | None = None,
    reduction: Reduction = "sum",
    seed: int = 0,
) -> dict[int, torch.Tensor]:
    """Every channel's score in every group the criterion scores (a name, or any :class:`Criterion`).

    Checks what the criterion returned: known group ids, one finite score per channel."""
    crit = make_criterion(criterion, reduction=reduction, seed=seed) if isinstance(criterion, str) else criterion
    if not callable(crit):
        raise TypeError(f"criterion must be a name or a callable (model, groups, data) -> scores, got {crit!r}")
    scores = crit(model, groups, data)
    if not isinstance(scores, Mapping):
        raise TypeError(f"criterion {crit!r} returned {type(scores).__name__}, not a dict of group id -> scores")
    by_id = {g.id: g for g in groups}
    out = {}
    for gid, s in scores.items():
        g = by_id.get(gid)
        if g is None:
            raise ValueError(f"criterion {crit!r} scored group {gid!r}, which is not one of the groups")
        s = torch.as_tensor(s).detach().to(device="cpu", dtype=torch.float64).reshape(-1)
        if s.numel() != g.channels:
            raise ValueError(f"criterion {crit!r} gave {s.numel()} scores for group {gid} of {g.channels} channels")
        if not bool(torch.isfinite(s).all()):
            raise ValueError(
                f"scores of group {gid} (layers {g.layers}) are not finite: the weights or activations hold NaN or Inf"
            )
        out[gid] = s
    return out
