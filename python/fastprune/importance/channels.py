"""Channel (filter) criteria for structured pruning, and the selection of channels to remove.

A criterion maps a :class:`~fastprune.structure.Group` to one score per group channel (higher =
more important). Member scores are combined over the group's members (sum by default: a channel
of a residual stage is scored by every conv that writes it).

* ``l1_filter``: the L1 norm of each output filter (Li et al. 2017, "Pruning filters for efficient
  ConvNets"), ``l2_filter`` the L2 norm;
* ``bn_scale``: |gamma| of the BatchNorm after the channel (Liu et al. 2017, network slimming);
  groups without a BatchNorm get no score and are left alone;
* ``random``: uniform scores from a seeded generator (the control every criterion must beat).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

from fastprune.structure.groups import Group, Member
from fastprune.structure.handlers import WEIGHT_ATTRS

__all__ = ["CRITERIA", "group_scores", "select_channels"]


def _member_values(modules: Mapping[str, nn.Module], mem: Member, exact: bool = True) -> torch.Tensor:
    """The member's tensor as the forward sees it; in float64 when ``exact`` (else as stored, for
    reductions that accumulate in float64 themselves)."""
    from fastprune.masks import effective_weight

    w = effective_weight(modules[mem.module], mem.attr)
    return w.to(torch.float64) if exact or w.dtype not in (torch.float32, torch.float64) else w


def _scatter(group: Group, mem: Member, per_pos: torch.Tensor, out: torch.Tensor, reduce: str) -> None:
    idx = torch.tensor(mem.index, dtype=torch.long)
    sel = idx >= 0
    vals = per_pos[sel]
    tgt = idx[sel]
    if reduce == "max":
        out.scatter_reduce_(0, tgt, vals, "amax", include_self=True)
    else:
        out.index_add_(0, tgt, vals)


def _norm_scores(p: float) -> Callable[[nn.Module, Group, str], torch.Tensor | None]:
    def score(model: nn.Module, group: Group, reduce: str) -> torch.Tensor | None:
        modules = dict(model.named_modules())
        out = torch.zeros(group.channels, dtype=torch.float64)
        if reduce == "max":
            out.fill_(-math.inf)
        count = torch.zeros(group.channels, dtype=torch.float64)
        for mem in group.members:
            if mem.role != "out" or mem.attr not in WEIGHT_ATTRS:
                continue
            w = _member_values(modules, mem, exact=False).movedim(mem.dim, 0).flatten(1)
            per = torch.linalg.vector_norm(w, ord=p, dim=1).to(torch.float64)
            _scatter(group, mem, per, out, reduce)
            _scatter(group, mem, torch.ones_like(per), count, "sum")
        if not bool((count > 0).any()):
            return None
        return out / count.clamp_min(1) if reduce == "mean" else out
    return score


def _bn_scale(model: nn.Module, group: Group, reduce: str) -> torch.Tensor | None:
    modules = dict(model.named_modules())
    out = torch.zeros(group.channels, dtype=torch.float64)
    if reduce == "max":
        out.fill_(-math.inf)
    found = False
    for mem in group.members:
        if mem.role == "norm" and mem.attr == "weight":
            _scatter(group, mem, _member_values(modules, mem).abs(), out, reduce)
            found = True
    return out if found else None


def _random(model: nn.Module, group: Group, reduce: str, generator: torch.Generator | None = None) -> torch.Tensor:  # noqa: ARG001
    return torch.rand(group.channels, dtype=torch.float64, generator=generator)


CRITERIA: dict[str, Callable[..., torch.Tensor | None]] = {
    "l1_filter": _norm_scores(1),
    "l2_filter": _norm_scores(2),
    "bn_scale": _bn_scale,
    "random": _random,
}


def group_scores(model: nn.Module, groups: Sequence[Group], criterion: str, *, reduction: str = "sum",
                 seed: int = 0) -> dict[int, torch.Tensor]:
    """Score of every channel of every group (groups the criterion cannot score are left out)."""
    if criterion not in CRITERIA:
        raise ValueError(f"unknown channel criterion {criterion!r}; known: {', '.join(CRITERIA)}")
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for g in groups:
        s = _random(model, g, reduction, gen) if criterion == "random" else CRITERIA[criterion](model, g, reduction)
        if s is not None:
            if not bool(torch.isfinite(s).all()):
                raise ValueError(f"{criterion} scores of group {g.id} (layers {g.layers}) are not finite: "
                                 "the weights hold NaN or Inf")
            out[g.id] = s
    return out


def _keep_after_rounding(channels: int, remove: int, round_to: int | None) -> int:
    if not round_to or remove == 0:
        return remove
    keep = channels - remove
    keep = min(channels, math.ceil(keep / round_to) * round_to)
    return channels - keep


def select_channels(groups: Sequence[Group], scores: Mapping[int, torch.Tensor], sparsity: float, *,
                    scope: str = "layer", round_to: int | None = None) -> dict[int, list[int]]:
    """Channels to remove per group id: the lowest-scoring ``floor(sparsity * n)`` of each group's
    n removable channels (``scope="layer"``), or the lowest ``floor(sparsity * N)`` of all N
    removable channels with scores normalised by each group's mean (``scope="global"``).
    ``round_to`` keeps every group's remaining channel count a multiple of it. Refuses (ValueError)
    a selection that would empty a group. Ties break by channel index."""
    out: dict[int, list[int]] = {}
    scored = [g for g in groups if g.id in scores and g.prunable]
    if scope == "layer":
        for g in scored:
            cand = g.prunable
            k = _keep_after_rounding(g.channels, math.floor(sparsity * len(cand) + 1e-9), round_to)
            k = min(k, len(cand))
            s = scores[g.id][cand]
            order = sorted(range(len(cand)), key=lambda i: (float(s[i]), cand[i]))
            out[g.id] = sorted(cand[i] for i in order[:k])
        return {k: v for k, v in out.items() if v}
    entries = []
    for g in scored:
        cand = g.prunable
        s = scores[g.id][cand]
        mean = float(s.mean()) if len(cand) else 1.0
        norm = s / mean if mean > 0 else s
        entries += [(float(norm[i]), g.id, cand[i]) for i in range(len(cand))]
    total = math.floor(sparsity * len(entries) + 1e-9)
    entries.sort()
    for _, gid, c in entries[:total]:
        out.setdefault(gid, []).append(c)
    by_id = {g.id: g for g in scored}
    for gid, chans in out.items():
        g = by_id[gid]
        if len(chans) >= g.channels:
            raise ValueError(f"global selection at sparsity {sparsity} would remove every channel of group {gid} "
                             f"(layers {', '.join(g.layers)}); use scope='layer' or a lower sparsity")
        k = _keep_after_rounding(g.channels, len(chans), round_to)
        s = scores[gid]
        chans.sort(key=lambda c: (float(s[c]), c))
        out[gid] = sorted(chans[:k])
    return {k: v for k, v in out.items() if v}
