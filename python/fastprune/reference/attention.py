"""Plain-PyTorch reference of :func:`fastprune.ops.scaled_dot_product_attention`."""

from __future__ import annotations

import math

import torch

__all__ = ["scaled_dot_product_attention"]


def scaled_dot_product_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """``softmax(scale * query @ key^T + mask) @ value`` written out; a bool mask's False is -inf;
    rows whose every score is -inf give 0 (as torch's SDPA), not NaN."""
    s = (query @ key.transpose(-2, -1)) * (1.0 / math.sqrt(max(1, query.shape[-1])) if scale is None else scale)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            attn_mask = torch.zeros((), dtype=s.dtype, device=s.device).masked_fill(~attn_mask, float("-inf"))
        s = s + attn_mask
    if s.shape[-1] == 0:  # no keys: every row fully masked
        return value.new_zeros((*query.shape[:-1], value.shape[-1]))
    m = s.amax(-1, keepdim=True)
    dead = m == float("-inf")
    p = torch.exp(s - torch.where(dead, torch.zeros_like(m), m))
    total = p.sum(-1, keepdim=True)
    out = (p @ value) / torch.where(dead, torch.ones_like(total), total)
    return torch.where(dead, torch.zeros_like(out), out)
