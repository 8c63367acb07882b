"""Magnitude criterion: ``|w|``, per weight or averaged over blocks of output rows (selection is in
:mod:`fastprune.select`).

Reference: Han, Pool, Tran, Dally, "Learning both Weights and Connections for Efficient Neural
Networks", NeurIPS 2015 (arXiv:1506.02626).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fastprune.masks import ParamRef, effective_weight

__all__ = ["block_scores", "magnitude_scores"]


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
