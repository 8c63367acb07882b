"""Magnitude criterion and Han et al.'s pruning rule.

Reference: Han, Pool, Tran, Dally, "Learning both Weights and Connections for Efficient Neural
Networks", NeurIPS 2015 (arXiv:1506.02626).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence

import torch

from fastprune.masks import ParamRef, effective_weight

__all__ = ["block_scores", "magnitude_scores", "threshold_masks", "topk_masks"]


def magnitude_scores(refs: Sequence[ParamRef]) -> list[torch.Tensor]:
    """``|w|`` of each parameter as the forward sees it (already-pruned entries score 0)."""
    return [effective_weight(r.module, r.param_name).abs() for r in refs]


def block_scores(score: torch.Tensor, block: int) -> torch.Tensor:
    """Each entry's score replaced by the mean over its group of ``block`` consecutive rows (output
    channels, dim 0) at the same position (the last group may be shorter), so that a threshold keeps
    or prunes a group's position as a whole. 1-D scores and ``block=1`` are returned as they are."""
    if block == 1 or score.dim() < 2 or score.shape[0] == 0:
        return score
    rows = score.shape[0]
    flat = score.reshape(rows, -1)
    groups = -(-rows // block)
    padded = torch.cat([flat, flat.new_zeros(groups * block - rows, flat.shape[1])])
    counts = torch.full((groups, 1), float(block), dtype=flat.dtype, device=flat.device)
    counts[-1] = rows - (groups - 1) * block
    means = padded.reshape(groups, block, -1).sum(1) / counts
    return means.repeat_interleave(block, 0)[:rows].reshape(score.shape)


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
        for name, s in zip(names, scores):
            n = s.numel()
            k = round(sparsity * n)
            if k > n - min(min_remaining, n):
                raise ValueError(f"sparsity {sparsity} would leave {name} with fewer than min_remaining="
                                 f"{min_remaining} weights")
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
    for name, s in zip(names, scores):
        out[name] = keep[i : i + s.numel()].reshape(s.shape).to(s.device)
        i += s.numel()
    return out


def _q_for(name: str, module_name: str, q: float | Mapping[str, float]) -> float | None:
    if not isinstance(q, Mapping):
        return float(q)
    for pattern, value in q.items():
        if pattern in (name, module_name) or fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(module_name, pattern):
            return float(value)
    return None


def threshold_masks(refs: Sequence[ParamRef], q: float | Mapping[str, float], min_remaining: int,
                    block: int = 1) -> dict[str, torch.Tensor]:
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
