"""Streaming block-diagonal inverse empirical Fisher.

Reference: Singh & Alistarh 2020 (arXiv:2004.14340), Section 3 (WoodFisher).
"""

from __future__ import annotations

import math

import torch

from fastprune.ops import woodbury_inverse_fisher, woodbury_update_

__all__ = ["FisherInverse"]


class FisherInverse:
    """Accumulates ``F^-1 = (damp I + (1/N) sum_n g_n g_n^T)^-1``, block-diagonal, from chunks.

    Gradients arrive in chunks of shape ``(k, d)`` through :meth:`update`; each chunk is one exact
    rank-k Woodbury update of the ``(nb, B, B)`` state, so memory stays ``O(d * B)`` however many
    gradients are fed. ``num_samples`` is the ``N`` of the formula: the total the caller intends to
    feed. Feeding a different count is allowed: the result is then
    ``(damp I + (1/num_samples) sum g g^T)^-1`` over the gradients actually fed.

    The first chunk is handled by :func:`fastprune.ops.woodbury_inverse_fisher`'s float64 path (with
    the ``1/N`` scaling folded into the gradients when the chunk is not all ``N``); later chunks by
    :func:`fastprune.ops.woodbury_update_`. Feeding all N gradients in one chunk therefore gives
    exactly ``woodbury_inverse_fisher`` on them; chunked feeding agrees to float rounding.

    Args:
        num_params: ``d``, the length of the flattened parameter vector.
        block_size: ``B`` (clipped to ``d`` if larger: one block).
        damp: absolute dampening ``lambda > 0``.
        num_samples: ``N``.
        dtype: dtype of the stored blocks (float32 default; float64 for the whole computation).
        device: where the state lives.

    Shapes: :meth:`inverse` ``(nb, B, B)``; :meth:`diag` ``(d,)``; :meth:`matvec` ``(d,)`` or ``(m, d)``.
    """

    def __init__(
        self,
        num_params: int,
        block_size: int,
        damp: float,
        num_samples: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        if isinstance(num_params, bool) or not isinstance(num_params, int) or num_params < 1:
            raise ValueError(f"num_params must be a positive int, got {num_params!r}")
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size must be a positive int, got {block_size!r}")
        if isinstance(damp, bool) or not isinstance(damp, (int, float)) or not math.isfinite(damp) or damp <= 0:
            raise ValueError(f"damp must be finite and > 0, got {damp!r}")
        if isinstance(num_samples, bool) or not isinstance(num_samples, (int, float)) or not num_samples > 0:
            raise ValueError(f"num_samples must be > 0, got {num_samples!r}")
        if dtype not in (torch.float32, torch.float64):
            raise TypeError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
        self.num_params = num_params
        self.block_size = min(block_size, num_params)
        self.damp = float(damp)
        self.num_samples = float(num_samples)
        self.dtype = dtype
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        try:  # an unavailable device (cuda on a CPU-only build) fails here, not at the first update
            torch.empty(0, device=self.device)
        except (RuntimeError, AssertionError) as e:
            raise ValueError(f"device {self.device} is not available here ({e})") from e
        self.num_blocks = (num_params + self.block_size - 1) // self.block_size
        self.seen = 0
        self._finv: torch.Tensor | None = None

    def update(self, grads: torch.Tensor) -> None:
        """Feed a chunk of gradients, shape ``(k, d)`` (or ``(d,)`` for one)."""
        if not isinstance(grads, torch.Tensor):
            raise TypeError(f"grads must be a torch.Tensor, got {type(grads).__name__}")
        if grads.dim() == 1:
            grads = grads.unsqueeze(0)
        if grads.dim() != 2 or grads.shape[1] != self.num_params:
            raise ValueError(f"grads must have shape (k, {self.num_params}), got {tuple(grads.shape)}")
        if not grads.is_floating_point():
            raise TypeError(f"grads must be a floating-point tensor, got {grads.dtype}")
        if grads.shape[0] == 0:
            return
        g = grads.detach().to(device=self.device, dtype=self.dtype)
        if not bool(torch.isfinite(g).all()):
            raise ValueError("grads contains NaN or Inf")
        if self._finv is None:
            k = g.shape[0]
            if k != self.num_samples:
                # (1/k) sum (s g)(s g)^T == (1/N) sum g g^T  with  s^2 = k / N
                g = g * math.sqrt(k / self.num_samples)
            self._finv = woodbury_inverse_fisher(g, self.block_size, self.damp)
        else:
            woodbury_update_(self._finv, g, self.num_samples)
        self.seen += grads.shape[0]

    def inverse(self) -> torch.Tensor:
        """``(nb, B, B)`` inverse blocks (``I / damp`` before any update). Not a copy."""
        if self._finv is None:
            eye = torch.eye(self.block_size, dtype=self.dtype, device=self.device) / self.damp
            return eye.expand(self.num_blocks, -1, -1).contiguous()
        return self._finv

    def diag(self) -> torch.Tensor:
        """``(d,)`` diagonal of ``F^-1``."""
        return torch.diagonal(self.inverse(), dim1=1, dim2=2).reshape(-1)[: self.num_params]

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """``F^-1 v`` for ``v`` of shape ``(d,)`` or ``(m, d)``; same shape out."""
        if not isinstance(v, torch.Tensor):
            raise TypeError(f"v must be a torch.Tensor, got {type(v).__name__}")
        squeeze = v.dim() == 1
        vm = v.unsqueeze(0) if squeeze else v
        if vm.dim() != 2 or vm.shape[1] != self.num_params:
            raise ValueError(f"v must have shape ({self.num_params},) or (m, {self.num_params}), got {tuple(v.shape)}")
        m = vm.shape[0]
        B, nb = self.block_size, self.num_blocks
        padded = vm.new_zeros((m, nb * B), dtype=self.dtype)
        padded[:, : self.num_params] = vm.to(self.dtype)
        out = torch.einsum("bij,mbj->mbi", self.inverse(), padded.view(m, nb, B)).reshape(m, nb * B)
        out = out[:, : self.num_params].to(v.dtype)
        return out.squeeze(0) if squeeze else out
