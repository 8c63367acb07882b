"""Fake (meta) kernels for every native op: shapes and dtypes only, for torch.compile/export."""

from __future__ import annotations

import torch


@torch.library.register_fake("fastprune::woodbury_inverse_fisher")
def _woodbury_inverse_fisher_fake(grads: torch.Tensor, block_size: int, damp: float) -> torch.Tensor:
    torch._check(grads.dim() == 2, lambda: "grads must be 2-D")
    torch._check(block_size >= 1, lambda: "block_size must be >= 1")
    d = grads.shape[1]
    nb = (d + block_size - 1) // block_size
    return grads.new_empty((nb, block_size, block_size))


@torch.library.register_fake("fastprune::woodbury_update_")
def _woodbury_update_fake(finv: torch.Tensor, grads: torch.Tensor, num_samples: float) -> None:
    torch._check(finv.dim() == 3 and grads.dim() == 2, lambda: "finv must be 3-D and grads 2-D")
