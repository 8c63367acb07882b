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

    The ``nb`` blocks are split into contiguous ranges of ``ceil(nb / world)`` blocks; each rank
    owns one range and streams Woodbury updates into a :class:`FisherInverse` of only its columns,
    so the state held per rank is ``O(d B / world)`` (plus one chunk of gradients in flight).
    :meth:`update` is a collective that every rank calls in the same round with its own chunk of
    gradients (any number of rows, also none) and every rank's row counts
    (:func:`fastprune.distributed.exchange_counts`): each owner gathers its columns of every rank's
    rows (``dist.gather``; ``k d`` numbers leave a rank per ``k`` gradients, whatever ``B``) and
    feeds them to its inverse. Nothing ever holds a Gram or the whole inverse.

    :meth:`local_diag`, :meth:`local_matvec` and :meth:`local_joint_update` compute on the owned
    entries ``owned_entries = (c0, c1)`` only (no communication); :meth:`diag`, :meth:`matvec`
    and :meth:`joint_update` do the same on full vectors and gather the results (``O(d)`` numbers,
    equal on every rank). Without a process group it is one rank owning every block: the same
    numbers as :class:`FisherInverse`. ``num_samples`` is N over all ranks."""

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
        self.world, self.rank = fd.world_size(), fd.rank()
        self.seen = 0
        self.owned = self._block_range(self.rank)
        self.owned_entries = self._entry_range(self.rank)
        c0, c1 = self.owned_entries
        self._fi = (
            FisherInverse(c1 - c0, self.block_size, damp, num_samples, dtype=dtype, device=device) if c1 > c0 else None
        )

    def _block_range(self, r: int) -> tuple[int, int]:
        per = -(-self.num_blocks // self.world)
        return min(r * per, self.num_blocks), min((r + 1) * per, self.num_blocks)

    def _entry_range(self, r: int) -> tuple[int, int]:
        lo, hi = self._block_range(r)
        return min(lo * self.block_size, self.num_params), min(hi * self.block_size, self.num_params)

    @property
    def held_bytes(self) -> int:
        """Bytes of the inverse blocks this rank holds."""
        c0, c1 = self.owned_entries
        if c1 == c0:
            return 0
        b = min(self.block_size, c1 - c0)
        return -(-(c1 - c0) // b) * b * b * torch.empty(0, dtype=self.dtype).element_size()

    def update(self, grads: torch.Tensor, counts: list[int] | None = None) -> None:
        """This rank's chunk of gradients, shape ``(k, d)`` (``k`` may be 0), and ``counts``: every
        rank's ``k`` in rank order (one process: ``[k]``; ``None`` exchanges them here, an extra
        collective). A collective: every rank calls it in the same round."""
        if grads.dim() == 1:
            grads = grads.unsqueeze(0)
        if grads.dim() != 2 or grads.shape[1] != self.num_params:
            raise ValueError(f"grads must have shape (k, {self.num_params}), got {tuple(grads.shape)}")
        if counts is None:
            counts = fd.exchange_counts(int(grads.shape[0]))
        if len(counts) != self.world or counts[self.rank] != grads.shape[0]:
            raise ValueError(f"counts {counts} do not match this rank's {grads.shape[0]} rows on {self.world} ranks")
        most = max(counts)
        if most == 0:
            return
        g = grads.detach().to(device=self.device, dtype=self.dtype)
        for r in range(self.world):
            c0, c1 = self._entry_range(r)
            if c1 == c0:
                continue
            part = g.new_zeros((most, c1 - c0))
            part[: g.shape[0]] = g[:, c0:c1]
            if fd.is_distributed():
                bufs = [torch.empty_like(part) for _ in range(self.world)] if r == self.rank else None
                dist.gather(part, gather_list=bufs, dst=r)
            else:
                bufs = [part]
            if r == self.rank:
                assert self._fi is not None and bufs is not None
                self._fi.update(torch.cat([b[:n] for b, n in zip(bufs, counts, strict=True)]))
        self.seen += sum(counts)

    def finish(self) -> None:
        """Nothing left to do (kept for callers of the earlier two-phase interface)."""

    def inverse(self) -> torch.Tensor:
        raise RuntimeError(
            "a sharded Fisher holds only this rank's blocks (use diag, matvec or joint_update; nothing gathers "
            "the whole inverse)"
        )

    def local_diag(self) -> torch.Tensor:
        """The diagonal of ``F^-1`` at the owned entries, ``(c1 - c0,)``."""
        return self._fi.diag() if self._fi is not None else torch.zeros(0, dtype=self.dtype, device=self.device)

    def local_matvec(self, v: torch.Tensor) -> torch.Tensor:
        """``(F^-1 v)`` at the owned entries for ``v`` given there, ``(c1 - c0,)`` or ``(m, c1 - c0)``."""
        return self._fi.matvec(v) if self._fi is not None else v.clone()

    def local_joint_update(self, w: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """:meth:`FisherInverse.joint_update` on the owned entries (float64, ``(c1 - c0,)``)."""
        if self._fi is None:
            return torch.zeros(0, dtype=torch.float64, device=self.device)
        return self._fi.joint_update(w, keep)

    def _owned(self, v: torch.Tensor) -> torch.Tensor:
        c0, c1 = self.owned_entries
        return v[..., c0:c1]

    def diag(self) -> torch.Tensor:
        return fd.all_gather_rows(self.local_diag())

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        local = self.local_matvec(self._owned(v).to(self.dtype))
        if local.dim() == 1:
            return fd.all_gather_rows(local).to(v.dtype)
        return fd.all_gather_rows(local.T.contiguous()).T.to(v.dtype)

    def joint_update(self, w: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """Per block, ``-F^-1_{:,Q} ([F^-1]_QQ)^-1 w_Q`` (Q = pruned entries), float64, shape (d,)."""
        return fd.all_gather_rows(self.local_joint_update(self._owned(w.reshape(-1)), self._owned(keep.reshape(-1))))
