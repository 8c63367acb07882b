"""Reference Woodbury inverse Fisher: the paper's literal algorithm in plain torch.

Reference: Singh & Alistarh 2020 (arXiv:2004.14340), eq. (12): the recursion
``F_n^-1 = F_{n-1}^-1 - (F_{n-1}^-1 g_n)(F_{n-1}^-1 g_n)^T / (N + g_n^T F_{n-1}^-1 g_n)``
from ``F_0^-1 = damp^-1 I``, batched over blocks.
"""

from __future__ import annotations

import torch


def _blocks(grads: torch.Tensor, block_size: int) -> torch.Tensor:
    """(k, d) -> (nb, k, B), zero-padded past d."""
    k, d = grads.shape
    nb = (d + block_size - 1) // block_size
    padded = grads.new_zeros((k, nb * block_size))
    padded[:, :d] = grads
    return padded.view(k, nb, block_size).transpose(0, 1)


def woodbury_update_(finv: torch.Tensor, grads: torch.Tensor, num_samples: float) -> torch.Tensor:
    """In place: ``F^-1 <- F^-1 - F^-1 G^T (N I + G F^-1 G^T)^-1 G F^-1`` per block."""
    g = _blocks(grads, finv.shape[1])  # (nb, k, B)
    k = g.shape[1]
    if k == 0 or finv.shape[0] == 0:
        return finv
    u = g @ finv  # (nb, k, B) = G F^-1 (F^-1 symmetric)
    m = u @ g.transpose(1, 2) + num_samples * torch.eye(k, dtype=finv.dtype, device=finv.device)
    # m is SPD: Cholesky, not LU (torch 2.13's batched float64 LU fails at random on 2 threads here)
    finv -= u.transpose(1, 2) @ torch.cholesky_solve(u, torch.linalg.cholesky(m))
    return finv


def woodbury_inverse_fisher(grads: torch.Tensor, block_size: int, damp: float) -> torch.Tensor:
    """The published sequential rank-one loop, batched over blocks. ``(nb, B, B)``."""
    n, d = grads.shape
    nb = (d + block_size - 1) // block_size
    finv = torch.eye(block_size, dtype=grads.dtype, device=grads.device).repeat(nb, 1, 1) / damp
    g = _blocks(grads, block_size)  # (nb, N, B)
    for i in range(n):
        gi = g[:, i, :].unsqueeze(2)  # (nb, B, 1)
        u = finv @ gi
        den = n + (gi.transpose(1, 2) @ u)  # (nb, 1, 1)
        finv -= (u @ u.transpose(1, 2)) / den
    return finv
