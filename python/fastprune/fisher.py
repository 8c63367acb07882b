"""Streaming block-diagonal inverse empirical Fisher.

Reference: Singh & Alistarh 2020 (arXiv:2004.14340), Section 3 (WoodFisher).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from fastprune import distributed as fd
from fastprune.ops import woodbury_inverse_fisher, woodbury_update_

__all__ = ["FisherInverse", "ShardedFisherInverse"]


def _as_blocks(w: torch.Tensor, keep: torch.Tensor, nb: int, B: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(nb, B) float64 weights (zero-padded) and keep flags (padding kept)."""
    d = w.numel()
    wb = torch.zeros(nb * B, dtype=torch.float64, device=w.device)
    wb[:d] = w.reshape(-1).double()
    kb = torch.ones(nb * B, dtype=torch.bool, device=w.device)
    kb[:d] = keep.reshape(-1)
    return wb.view(nb, B), kb.view(nb, B)


def _joint_obs(inv: torch.Tensor, wb: torch.Tensor, kb: torch.Tensor) -> torch.Tensor:
    """Per block b: ``-inv_b[:, Q] (inv_b[Q, Q])^-1 w_b[Q]`` with Q the pruned entries; (n, B)."""
    dw = torch.zeros_like(wb)
    for b in range(inv.shape[0]):
        q = (~kb[b]).nonzero().flatten()
        if q.numel():
            blk = inv[b].to(torch.float64)
            dw[b] = -(blk[:, q] @ torch.linalg.solve(blk[q][:, q], wb[b][q]))
    return dw


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

    def joint_update(self, w: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """Per block, the exact joint OBS change ``-F^-1_{:,Q} ([F^-1]_QQ)^-1 w_Q`` (Q = the entries
        where ``keep`` is False), float64, shape (d,)."""
        wb, kb = _as_blocks(w, keep, self.num_blocks, self.block_size)
        return _joint_obs(self.inverse().double(), wb, kb).reshape(-1)[: self.num_params]

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


class ShardedFisherInverse:
    """:class:`FisherInverse` across the ranks of a ``torch.distributed`` process group.

    Every rank feeds the gradients of its own shard of the data (:meth:`update` adds them to local
    per-block Grams ``sum_n g_n g_n^T``, float64). :meth:`finish` (a collective: every rank calls
    it) sums each block's Gram onto the rank that owns it (contiguous ranges of about
    ``nb / world`` blocks, one ``reduce`` per owner) and inverts only the owned blocks,
    ``(damp I + G / N)^-1`` by Cholesky, so the inverse held per rank is ``O(d B / world)``; the
    local Grams (``O(d B)``) are freed then. :meth:`diag`, :meth:`matvec` and :meth:`joint_update`
    compute the owned blocks and gather the results (``O(d)`` numbers per call), so every rank gets
    the same values; nothing gathers the inverse. Without a process group it is a one-rank version
    of the same computation. ``num_samples`` is N over all ranks."""

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
        ref = FisherInverse(num_params, block_size, damp, num_samples, dtype=dtype, device=device)  # validates
        self.num_params, self.block_size, self.damp = ref.num_params, ref.block_size, ref.damp
        self.num_samples, self.dtype, self.device, self.num_blocks = ref.num_samples, dtype, ref.device, ref.num_blocks
        self.seen = 0
        self._gram: torch.Tensor | None = torch.zeros(
            self.num_blocks, self.block_size, self.block_size, dtype=torch.float64, device=self.device
        )
        self._inv: torch.Tensor | None = None  # (owned, B, B)
        self.owned = (0, 0)

    def _blocks(self, v: torch.Tensor) -> torch.Tensor:
        """(m, d) -> (m, nb, B), zero-padded."""
        B, nb = self.block_size, self.num_blocks
        out = v.new_zeros((v.shape[0], nb * B), dtype=torch.float64)
        out[:, : self.num_params] = v.to(torch.float64)
        return out.view(v.shape[0], nb, B)

    def update(self, grads: torch.Tensor) -> None:
        """Add a chunk of this rank's gradients, shape ``(k, d)`` (or ``(d,)``)."""
        if self._gram is None:
            raise RuntimeError("ShardedFisherInverse.update after finish()")
        if grads.dim() == 1:
            grads = grads.unsqueeze(0)
        if grads.dim() != 2 or grads.shape[1] != self.num_params:
            raise ValueError(f"grads must have shape (k, {self.num_params}), got {tuple(grads.shape)}")
        if grads.shape[0] == 0:
            return
        g = self._blocks(grads.detach().to(self.device))
        if not bool(torch.isfinite(g).all()):
            raise ValueError("grads contains NaN or Inf")
        self._gram += torch.einsum("kbi,kbj->bij", g, g)
        self.seen += grads.shape[0]

    def finish(self) -> None:
        """Sum the Grams onto their owners and invert the owned blocks (collective)."""
        assert self._gram is not None
        world, me = fd.world_size(), fd.rank()
        per = -(-self.num_blocks // world)
        lo, hi = min(me * per, self.num_blocks), min((me + 1) * per, self.num_blocks)
        if fd.is_distributed():
            for r in range(world):
                a, b = min(r * per, self.num_blocks), min((r + 1) * per, self.num_blocks)
                if a < b:
                    chunk = self._gram[a:b].contiguous()
                    dist.reduce(chunk, dst=r, op=dist.ReduceOp.SUM)
                    if r == me:
                        self._gram[a:b] = chunk
        owned = self._gram[lo:hi]
        eye = torch.eye(self.block_size, dtype=torch.float64, device=self.device)
        fisher = self.damp * eye + owned / self.num_samples
        self._inv = torch.cholesky_inverse(torch.linalg.cholesky(fisher)) if hi > lo else owned.clone()
        self.owned = (lo, hi)
        self._gram = None  # only the owned inverse stays

    def inverse(self) -> torch.Tensor:
        raise RuntimeError(
            "a sharded Fisher holds only this rank's blocks (use diag, matvec or joint_update; nothing gathers "
            "the whole inverse)"
        )

    def _gather(self, local: torch.Tensor) -> torch.Tensor:
        """(owned * B, ...) rows of every rank, in block order."""
        return fd.all_gather_rows(local)

    def diag(self) -> torch.Tensor:
        assert self._inv is not None, "finish() first"
        local = torch.diagonal(self._inv, dim1=1, dim2=2).reshape(-1)
        return self._gather(local)[: self.num_params].to(self.dtype)

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        assert self._inv is not None, "finish() first"
        squeeze = v.dim() == 1
        vm = v.unsqueeze(0) if squeeze else v
        lo, hi = self.owned
        blocks = self._blocks(vm)[:, lo:hi]  # (m, owned, B)
        local = torch.einsum("bij,mbj->mbi", self._inv, blocks).reshape(vm.shape[0], -1)
        out = self._gather(local.T.contiguous()).T[:, : self.num_params].to(v.dtype)
        return out.squeeze(0) if squeeze else out

    def joint_update(self, w: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """Per block, ``-F^-1_{:,Q} ([F^-1]_QQ)^-1 w_Q`` (Q = pruned entries), float64, shape (d,)."""
        assert self._inv is not None, "finish() first"
        lo, hi = self.owned
        wb, kb = _as_blocks(w, keep, self.num_blocks, self.block_size)
        local = _joint_obs(self._inv, wb[lo:hi], kb[lo:hi]).reshape(-1)
        return self._gather(local)[: self.num_params]
