"""Selection: from scores to what is removed (the stage between the criteria and the plan).

* :func:`topk_masks`: keep-masks pruning exactly ``round(sparsity * n)`` of the lowest-scored
  weights, globally or per layer (magnitude, WoodFisher, the diagonal Fisher);
* :func:`threshold_masks`: Han et al.'s per-layer rule ``|w| < q * std(W_l)``;
* :func:`select_channels`: the channels each coupled-channel group loses (structured methods);
  :func:`select_lowest_channels`: the k lowest over the model, never emptying a group.

Every function is deterministic: ties break by position (weights) or channel index (channels).
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import torch

from fastprune import distributed as fd
from fastprune.importance.magnitude import block_scores
from fastprune.masks import ParamRef, effective_weight

if TYPE_CHECKING:
    from fastprune.structure.groups import Group

__all__ = ["select_channels", "select_lowest_channels", "sharded_topk_keep", "threshold_masks", "topk_masks"]


def _protected(score: torch.Tensor, keep: int) -> torch.Tensor:
    """Bool mask of the ``keep`` highest scores (ties: the earlier position wins)."""
    flat = score.reshape(-1)
    prot = torch.zeros_like(flat, dtype=torch.bool)
    if keep > 0:
        order = torch.sort(flat, descending=True, stable=True).indices[:keep]
        prot[order] = True
    return prot


def _lowest(flat: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k lowest entries, ties broken by position (deterministic)."""
    return torch.sort(flat, stable=True).indices[:k]


def topk_masks(
    names: Sequence[str], scores: Sequence[torch.Tensor], sparsity: float, scope: str, min_remaining: int
) -> dict[str, torch.Tensor]:
    """Keep-masks pruning exactly ``round(sparsity * n)`` lowest-scored entries (globally over all
    ``n`` entries, or per layer), never leaving a layer with fewer than ``min_remaining`` entries."""
    if scope == "layer":
        out = {}
        for name, s in zip(names, scores, strict=True):
            n = s.numel()
            k = round(sparsity * n)
            if k > n - min(min_remaining, n):
                raise ValueError(
                    f"sparsity {sparsity} would leave {name} with fewer than min_remaining={min_remaining} weights"
                )
            flat = s.reshape(-1).to(torch.float64)
            keep = torch.ones_like(flat, dtype=torch.bool)
            keep[_lowest(flat, k)] = False
            out[name] = keep.reshape(s.shape)
        return out
    flats, prots = [], []
    for s in scores:
        f = s.reshape(-1).to(device="cpu", dtype=torch.float64)
        p = _protected(f, min(min_remaining, f.numel()))
        flats.append(f)
        prots.append(p)
    allf = torch.cat(flats) if flats else torch.zeros(0, dtype=torch.float64)
    allp = torch.cat(prots) if prots else torch.zeros(0, dtype=torch.bool)
    n = allf.numel()
    k = round(sparsity * n)
    if k > n - int(allp.sum()):
        raise ValueError(f"sparsity {sparsity} would prune some layer below min_remaining={min_remaining} weights")
    ranked = allf.masked_fill(allp, float("inf"))
    keep = torch.ones(n, dtype=torch.bool)
    keep[_lowest(ranked, k)] = False
    out, i = {}, 0
    for name, s in zip(names, scores, strict=True):
        out[name] = keep[i : i + s.numel()].reshape(s.shape).to(s.device)
        i += s.numel()
    return out


def sharded_topk_keep(
    names: Sequence[str],
    sizes: Sequence[int],
    pieces: Sequence[tuple[int, torch.Tensor]],
    sparsity: float,
    scope: str,
    min_remaining: int,
) -> list[torch.Tensor]:
    """:func:`topk_masks` over scores spread across the ranks of a process group: ``pieces[l] =
    (offset, scores)`` is this rank's contiguous slice of layer ``l``'s flattened scores (``sizes[l]``
    entries in all; slices of different ranks do not overlap). Returns this rank's keep flags, one
    per piece: together exactly the entries :func:`topk_masks` on the whole vectors keeps (the
    same ``round(sparsity * n)``, the same ties broken by position, the same ``min_remaining``
    rule). Nothing is gathered but counts: the threshold comes from
    :func:`fastprune.distributed.kth_smallest` (8 histogram all_reduces), the ties from one
    exchange of per-piece counts, and with ``scope="global"`` the protected entries from one gather
    of every rank's ``min_remaining`` best per layer. One process: the same, without collectives."""
    L = len(pieces)
    scores = [s.reshape(-1).to(torch.float64) for _, s in pieces]
    if any(bool(torch.isnan(s).any()) for s in scores):
        raise ValueError("a score is NaN")
    keys = [fd.order_keys(s) for s in scores]
    if scope == "layer":
        ks = []
        for name, n in zip(names, sizes, strict=True):
            k = round(sparsity * n)
            if k > n - min(min_remaining, n):
                raise ValueError(
                    f"sparsity {sparsity} would leave {name} with fewer than min_remaining={min_remaining} weights"
                )
            ks.append(k)
        groups = [[layer] for layer in range(L)]
    else:
        keep_best = [min(min_remaining, n) for n in sizes]
        rows = []
        for layer, ((off, _), s, m) in enumerate(zip(pieces, scores, keep_best, strict=True)):
            best = torch.sort(s, descending=True, stable=True).indices[:m]
            rows += [(float(layer), float(s[i]), float(off + int(i))) for i in best.tolist()]
        cand = fd.all_gather_rows(torch.tensor(rows, dtype=torch.float64).reshape(-1, 3))
        inf_key = int(fd.order_keys(torch.tensor([float("inf")]))[0])
        for layer, ((off, _), m) in enumerate(zip(pieces, keep_best, strict=True)):
            c = cand[cand[:, 0] == layer]
            c = c[torch.sort(c[:, 2], stable=True).indices]  # by position, then by score: ties to the earlier
            top = c[torch.sort(c[:, 1], descending=True, stable=True).indices[:m], 2].long() - off
            top = top[(top >= 0) & (top < keys[layer].numel())]
            keys[layer][top] = inf_key
        n = sum(sizes)
        k = round(sparsity * n)
        if k > n - sum(keep_best):
            raise ValueError(f"sparsity {sparsity} would prune some layer below min_remaining={min_remaining} weights")
        ks, groups = [k], [list(range(L))]
    live = [g for g, k in enumerate(ks) if k > 0]
    found = fd.kth_smallest([torch.cat([keys[layer] for layer in groups[g]]) for g in live], [ks[g] for g in live])
    thr = dict(zip(live, found, strict=True))
    keep = [torch.ones(s.numel(), dtype=torch.bool) for s in scores]
    ties = [torch.zeros(0, dtype=torch.long)] * L
    for g, (t, _) in thr.items():
        for layer in groups[g]:
            keep[layer] = keys[layer] > t
            ties[layer] = (keys[layer] == t).nonzero().flatten()
            keep[layer][ties[layer]] = True
    # ties at the threshold: the earliest positions over all ranks (layer, then offset)
    table = fd.all_gather_ints([x for layer in range(L) for x in (int(ties[layer].numel()), pieces[layer][0])])
    me = fd.rank()
    for g, (_, below) in thr.items():
        need = ks[g] - below
        order = sorted((layer, row[2 * layer + 1], r) for layer in groups[g] for r, row in enumerate(table))
        for layer, _, r in order:
            take = min(need, table[r][2 * layer])
            need -= take
            if r == me and take:
                keep[layer][ties[layer][:take]] = False
    return [kp.to(s.device) for kp, (_, s) in zip(keep, pieces, strict=True)]


def _q_for(name: str, module_name: str, q: float | Mapping[str, float]) -> float | None:
    if not isinstance(q, Mapping):
        return float(q)
    for pattern, value in q.items():
        if (
            pattern in (name, module_name)
            or fnmatch.fnmatchcase(name, pattern)
            or fnmatch.fnmatchcase(module_name, pattern)
        ):
            return float(value)
    return None


def threshold_masks(
    refs: Sequence[ParamRef], q: float | Mapping[str, float], min_remaining: int, block: int = 1
) -> dict[str, torch.Tensor]:
    """Han's rule: prune ``|w| < q * std(W_l)`` in each layer (layers without a q are left as they are);
    with ``block > 1`` the group mean of ``|w|`` (:func:`block_scores`) is compared instead."""
    out = {}
    for ref in refs:
        ql = _q_for(ref.name, ref.module_name, q)
        if ql is None:
            continue
        w = effective_weight(ref.module, ref.param_name)
        thr = ql * float(w.double().std()) if w.numel() > 1 else 0.0
        keep = block_scores(w.abs(), block) >= thr
        if int(keep.sum()) < min(min_remaining, w.numel()):
            keep = keep | _protected(w.abs().reshape(-1), min(min_remaining, w.numel())).reshape(w.shape)
        out[ref.name] = keep
    return out


def _keep_after_rounding(channels: int, remove: int, round_to: int | None) -> int:
    if not round_to or remove == 0:
        return remove
    keep = channels - remove
    keep = min(channels, math.ceil(keep / round_to) * round_to)
    return channels - keep


def _global_entries(groups: Sequence[Group], scores: Mapping[int, torch.Tensor]) -> list[tuple[float, int, int]]:
    """(score normalised by its group's mean, group id, channel) of every removable channel, lowest
    first (ties: group id, then channel index)."""
    entries = []
    for g in groups:
        cand = g.prunable
        s = scores[g.id][cand]
        mean = float(s.mean()) if len(cand) else 1.0
        norm = s / mean if mean > 0 else s
        entries += [(float(norm[i]), g.id, cand[i]) for i in range(len(cand))]
    entries.sort()
    return entries


def select_lowest_channels(groups: Sequence[Group], scores: Mapping[int, torch.Tensor], k: int) -> dict[int, list[int]]:
    """The ``k`` lowest removable channels over all scored groups, scores normalised by each group's
    mean (as ``scope="global"``), skipping a group's last removable channel instead of refusing: for
    loops that remove a few channels at a time (:class:`fastprune.EntwinedPruner`)."""
    scored = [g for g in groups if g.id in scores and g.prunable]
    room = {g.id: len(g.prunable) - 1 for g in scored}
    out: dict[int, list[int]] = {}
    for _, gid, c in _global_entries(scored, scores):
        if k <= 0:
            break
        if room[gid] > 0:
            out.setdefault(gid, []).append(c)
            room[gid] -= 1
            k -= 1
    return {g: sorted(v) for g, v in out.items()}


def select_channels(
    groups: Sequence[Group],
    scores: Mapping[int, torch.Tensor],
    sparsity: float,
    *,
    scope: str = "layer",
    round_to: int | None = None,
    per_group: Mapping[int, float] | None = None,
) -> dict[int, list[int]]:
    """Channels to remove per group id: the lowest-scoring ``floor(sparsity * n)`` of each group's
    n removable channels (``scope="layer"``; ``per_group`` overrides the ratio of the groups it
    names), or the lowest ``floor(sparsity * N)`` of all N removable channels with scores
    normalised by each group's mean (``scope="global"``). ``round_to`` keeps every group's
    remaining channel count a multiple of it. Refuses (ValueError) a selection that would empty a
    group. Ties break by channel index."""
    out: dict[int, list[int]] = {}
    scored = [g for g in groups if g.id in scores and g.prunable]
    if per_group and scope != "layer":
        raise ValueError("per-group ratios need scope='layer'")
    if scope == "layer":
        for g in scored:
            cand = g.prunable
            ratio = per_group.get(g.id, sparsity) if per_group else sparsity
            k = _keep_after_rounding(g.channels, math.floor(ratio * len(cand) + 1e-9), round_to)
            k = min(k, len(cand))
            s = scores[g.id][cand]
            order = sorted(range(len(cand)), key=lambda i: (float(s[i]), cand[i]))
            out[g.id] = sorted(cand[i] for i in order[:k])
        return {k: v for k, v in out.items() if v}
    entries = _global_entries(scored, scores)
    total = math.floor(sparsity * len(entries) + 1e-9)
    for _, gid, c in entries[:total]:
        out.setdefault(gid, []).append(c)
    by_id = {g.id: g for g in scored}
    for gid, chans in out.items():
        g = by_id[gid]
        if len(chans) >= g.channels:
            raise ValueError(
                f"global selection at sparsity {sparsity} would remove every channel of group {gid} "
                f"(layers {', '.join(g.layers)}); use scope='layer' or a lower sparsity"
            )
        k = _keep_after_rounding(g.channels, len(chans), round_to)
        s = scores[gid]
        chans.sort(key=lambda c: (float(s[c]), c))
        out[gid] = sorted(chans[:k])
    return {k: v for k, v in out.items() if v}
