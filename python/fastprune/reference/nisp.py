"""Plain-PyTorch twin of ``nisp_propagate`` (the test oracle)."""

from __future__ import annotations

import torch

__all__ = ["nisp_propagate"]


def nisp_propagate(weight: torch.Tensor, scores: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """``S_in[:, c] = sum_o S_out[:, o] * sum_k |W[o, c, k]|`` within each group: per group, the
    scores times the absolute weight summed over its kernel dimensions."""
    a = weight.abs().flatten(2).sum(2) if weight.dim() > 2 else weight.abs()
    s = scores.reshape(-1, weight.shape[0])
    og = weight.shape[0] // groups
    out = torch.cat([s[:, g * og : (g + 1) * og] @ a[g * og : (g + 1) * og] for g in range(groups)], dim=1)
    return out.reshape(-1) if scores.dim() == 1 else out
