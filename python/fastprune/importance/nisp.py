"""NISP's scores (Yu et al., "NISP: Pruning Networks using Neuron Importance Score Propagation",
CVPR 2018, arXiv:1711.05908): the final response layer's units ranked by Infinite Feature Selection.

Inf-FS (Roffo, Melzi, Cristani, "Infinite Feature Selection", ICCV 2015) scores N features from M
samples of them: every feature is a node of a fully connected graph whose edge weights mix how much
two features vary and how little they are correlated; a feature's score sums the weights of every
path through it, of every length, in closed form.
"""

from __future__ import annotations

from typing import Literal

import torch

__all__ = ["inf_fs", "spearman"]


def _average_ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks 1..M of each column of ``x`` (M, N), ties given the mean of the ranks they span."""
    m, n = x.shape
    order = torch.argsort(x, dim=0, stable=True)
    sorted_x = torch.gather(x, 0, order)
    pos = torch.arange(1, m + 1, dtype=torch.float64).unsqueeze(1).expand(m, n)
    # runs of equal values: start a new run where the sorted value changes
    new_run = torch.ones(m, n, dtype=torch.bool)
    new_run[1:] = sorted_x[1:] != sorted_x[:-1]
    run_id = torch.cumsum(new_run.to(torch.int64), dim=0) - 1  # (M, N) run index per sorted position
    offset = torch.arange(n, dtype=torch.int64) * m  # runs of different columns apart
    flat = (run_id + offset).reshape(-1)
    sums = torch.zeros(m * n, dtype=torch.float64).index_add_(0, flat, pos.reshape(-1))
    counts = torch.zeros(m * n, dtype=torch.float64).index_add_(0, flat, torch.ones(m * n, dtype=torch.float64))
    mean_rank = (sums / counts.clamp_min(1))[flat].reshape(m, n)
    ranks = torch.empty_like(mean_rank)
    ranks.scatter_(0, order, mean_rank)
    return ranks


def spearman(x: torch.Tensor) -> torch.Tensor:
    """(N, N) Spearman rank correlation between the columns of ``x`` (M, N), float64: the Pearson
    correlation of average ranks. A constant column has no correlation: its row and column
    (diagonal included) are 0, where the formula gives NaN."""
    r = _average_ranks(x.to(torch.float64))
    r = r - r.mean(dim=0, keepdim=True)
    norm = torch.linalg.vector_norm(r, dim=0)
    ok = norm > 0
    z = torch.where(ok, r / torch.where(ok, norm, torch.ones_like(norm)), torch.zeros_like(r))
    c = z.T @ z
    return c.clamp(-1.0, 1.0)


def inf_fs(x: torch.Tensor, alpha: float = 0.5, variant: Literal["paper", "code"] = "paper") -> torch.Tensor:
    """Infinite Feature Selection scores of the N units of a response matrix ``x`` (M samples, N units).

    ``variant="paper"`` (default; Roffo et al., ICCV 2015, and NISP's use of it):
    ``sigma_ij = max(std_i, std_j)``, ``c_ij = 1 - |rho_ij|`` (Spearman, average ranks for ties, a
    constant unit's correlations 0), ``A = alpha * sigma + (1 - alpha) * c``, ``r = 0.9 /
    spectral_radius(A)``, ``score = (I - r A)^-1 1 - 1`` (the row sums of ``S = (I - r A)^-1 - I``,
    the sum over paths of every length >= 1).

    ``variant="code"``: the authors' later MATLAB ``infFS.m``: ``A = alpha * c + (1 - alpha) *
    sigma`` with ``sigma`` min-max normalised to [0, 1], ``r = 0.99 / spectral_radius(A)`` and
    ``score = (I - r A)^-1 1`` (the row sums of the inverse itself: the same ranking as subtracting 1).

    Standard deviations are the sample ones (M - 1 in the denominator, MATLAB's ``std``). A is
    symmetric and non-negative: its spectral radius is its largest eigenvalue, from the symmetric
    eigensolver (``torch.linalg.eigvalsh``); the scores come from one linear solve, never an inverse.
    Everything runs in float64; the result is float64, shape (N,) (higher = more important).
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise ValueError(f"x must be a 2-D (samples, units) tensor, got {getattr(x, 'shape', type(x).__name__)}")
    m, n = x.shape
    if m < 2:
        raise ValueError(f"Inf-FS needs at least 2 samples (standard deviations and correlations), got {m}")
    if n == 0:
        return torch.zeros(0, dtype=torch.float64)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
    if variant not in ("paper", "code"):
        raise ValueError(f"variant must be 'paper' or 'code', got {variant!r}")
    xd = x.detach().to(device="cpu", dtype=torch.float64)
    if not bool(torch.isfinite(xd).all()):
        raise ValueError("the responses hold NaN or Inf")
    std = xd.std(dim=0, unbiased=True)
    sigma = torch.maximum(std.unsqueeze(0), std.unsqueeze(1))
    c = 1.0 - spearman(xd).abs()
    if variant == "paper":
        a = alpha * sigma + (1.0 - alpha) * c
        factor = 0.9
    else:
        lo, hi = sigma.min(), sigma.max()
        sigma = (sigma - lo) / (hi - lo) if float(hi - lo) > 0 else torch.zeros_like(sigma)
        a = alpha * c + (1.0 - alpha) * sigma
        factor = 0.99
    rho = float(torch.linalg.eigvalsh(a).abs().max())
    ones = torch.ones(n, 1, dtype=torch.float64)
    if rho == 0.0:  # A = 0: no paths, every unit alike
        return torch.zeros(n, dtype=torch.float64) if variant == "paper" else torch.ones(n, dtype=torch.float64)
    s = torch.linalg.solve(torch.eye(n, dtype=torch.float64) - (factor / rho) * a, ones).reshape(n)
    return s - 1.0 if variant == "paper" else s
