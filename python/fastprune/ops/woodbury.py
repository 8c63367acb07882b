"""Blocked inverse empirical Fisher (WoodFisher's Hessian estimate).

Reference: Singh & Alistarh, "WoodFisher: Efficient Second-Order Approximation for Neural
Network Compression", NeurIPS 2020 (arXiv:2004.14340), Section 3.
"""

from __future__ import annotations

import math

import torch

__all__ = ["woodbury_inverse_fisher", "woodbury_update_"]


def _check_float_tensor(t: object, name: str, dim: int) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{name} must be float32 or float64, got {t.dtype}")
    if t.dim() != dim:
        raise ValueError(f"{name} must have {dim} dimensions, got shape {tuple(t.shape)}")
    return t


def _check_finite_positive(x: float, name: str) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(x).__name__}")
    if not math.isfinite(x) or x <= 0:
        raise ValueError(f"{name} must be finite and > 0, got {x}")
    return float(x)


def woodbury_inverse_fisher(
    grads: torch.Tensor, block_size: int, damp: float, *, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Block-diagonal inverse of the damped empirical Fisher.

    Computes, for each block of ``block_size`` consecutive coordinates,
    ``(damp * I + (1/N) * sum_n g_n g_n^T)^-1`` restricted to that block.

    Args:
        grads: ``(N, d)`` per-sample (or per-minibatch) gradients, float32 or float64, any strides.
        block_size: ``B``, the block size along the flattened parameter vector.
        damp: ``lambda > 0``, absolute dampening (the paper uses 1e-5).
        dtype: ``torch.float64`` runs (and returns) the whole computation in float64. The default
            keeps ``grads.dtype`` for the result; accumulation and factorisation are float64 either way.

    Returns:
        ``(ceil(d / B), B, B)`` stack of inverse blocks. When ``B`` does not divide ``d`` the last
        block is padded: padded coordinates hold exactly ``1/damp`` on the diagonal, 0 elsewhere.

    The algorithm is chosen per regime by a flop model: for ``N`` above about ``0.65 B`` the
    symmetric Gram plus an in-place SPD inverse (``N B^2 + B^3`` flops a block), below it one exact
    rank-N Woodbury step from ``damp^-1 I`` (``N B^2 + 2 N^2 B + N^3/3``). Products are exact and
    accumulated in float64 whatever the input dtype, so both are accurate at small damp. If a
    factorisation fails the other algorithm is tried; a block that fails both raises ``ValueError``,
    and so does a float32 result beyond float32's range (never NaN or Inf).

    Reference: Singh & Alistarh 2020 (arXiv:2004.14340), eq. (10)-(12).
    """
    _check_float_tensor(grads, "grads", 2)
    if isinstance(block_size, bool) or not isinstance(block_size, int):
        raise TypeError(f"block_size must be an int, got {type(block_size).__name__}")
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    damp = _check_finite_positive(damp, "damp")
    if grads.shape[0] < 1:
        raise ValueError(f"grads must hold at least one gradient (row), got shape {tuple(grads.shape)}")
    if dtype is not None:
        if dtype not in (torch.float32, torch.float64):
            raise TypeError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
        grads = grads.to(dtype)
    return torch.ops.fastprune.woodbury_inverse_fisher(grads, block_size, damp)


def woodbury_update_(finv: torch.Tensor, grads: torch.Tensor, num_samples: float) -> torch.Tensor:
    """In-place rank-k Woodbury update of a stack of inverse Fisher blocks.

    Per block: ``F^-1 <- F^-1 - F^-1 G^T (N I + G F^-1 G^T)^-1 G F^-1`` with ``G`` the block's
    ``(k, B)`` slice of ``grads`` (zero-padded past ``d``) and ``N = num_samples``. Starting from
    ``finv = I / damp`` and feeding all N gradients (in any chunking) gives
    ``(damp I + (1/N) sum g g^T)^-1``; with k = 1 this is the paper's rank-one recursion.

    Args:
        finv: ``(nb, B, B)`` symmetric positive definite blocks, updated in place.
        grads: ``(k, d)`` with ``ceil(d / B) == nb``; same dtype and device as ``finv``.
        num_samples: ``N`` of the Fisher's ``1/N`` (the total number of gradients to be fed).

    Returns:
        ``finv``. Inputs are validated before anything is written: a ``finv`` whose diagonal has an
        entry <= 0 or not finite (so not positive definite) raises ``ValueError`` and is left as it was.
    """
    _check_float_tensor(finv, "finv", 3)
    _check_float_tensor(grads, "grads", 2)
    if finv.dtype != grads.dtype:
        raise TypeError(f"finv and grads must have the same dtype, got {finv.dtype} and {grads.dtype}")
    if finv.device != grads.device:
        raise ValueError(f"finv and grads must be on the same device, got {finv.device} and {grads.device}")
    num_samples = _check_finite_positive(num_samples, "num_samples")
    nb, b1, b2 = finv.shape
    if b1 != b2 or b1 < 1:
        raise ValueError(f"finv must have shape (num_blocks, B, B), got {tuple(finv.shape)}")
    need = (grads.shape[1] + b1 - 1) // b1
    if nb != need:
        raise ValueError(
            f"finv has {nb} blocks of size {b1} but grads has d = {grads.shape[1]} columns, "
            f"which needs ceil(d / B) = {need} blocks"
        )
    torch.ops.fastprune.woodbury_update_(finv, grads, num_samples)
    return finv
