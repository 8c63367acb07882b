"""NISP score propagation through one layer (Yu et al., CVPR 2018, arXiv:1711.05908)."""

from __future__ import annotations

import torch

__all__ = ["nisp_propagate"]


def nisp_propagate(weight: torch.Tensor, scores: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """Importance scores of a layer's inputs from those of its outputs: ``|W|^T s``.

    ``S_in[:, c] = sum_o S_out[:, o] * sum_k |W[o, c, k]|`` within each group (biases ignored), the
    vector-Jacobian product of NISP's "absolute, linearised" layer. Shapes: ``weight`` (out,
    in/groups, *kernel) of a Linear (no kernel dims) or ConvNd (grouped and depthwise included);
    ``scores`` (m, out) or (out,) -> (m, in) or (in,). float32 / float64, CPU (one read of W: the
    kernel taps summed inside the loop; a fused pass for up to 8 vectors, a GEMM per group beyond)
    and CUDA. Not differentiable (scores are statistics); the fake kernel gives shapes for
    torch.compile.
    """
    for name, t in (("weight", weight), ("scores", scores)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if weight.dtype not in (torch.float32, torch.float64) or scores.dtype != weight.dtype:
        raise TypeError(f"weight and scores must both be float32 or both float64, got {weight.dtype}, {scores.dtype}")
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"groups must be a positive int, got {groups!r}")
    if weight.dim() < 2 or weight.shape[0] % groups:
        raise ValueError(
            f"weight must be (out, in/groups, *kernel) with groups dividing out, got {tuple(weight.shape)}"
        )
    if scores.dim() not in (1, 2) or scores.shape[-1] != weight.shape[0]:
        raise ValueError(f"scores must be (out,) or (m, out) with out = {weight.shape[0]}, got {tuple(scores.shape)}")
    return torch.ops.fastprune.nisp_propagate(weight, scores, groups)
