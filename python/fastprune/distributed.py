"""torch.distributed for the data-driven criteria: each rank reads its own shard of the data, the
statistics are summed (or, where ranks do not add up, gathered) across ranks, and every rank ends
with the same scores. Without an initialised process group (or with one rank) every helper is a
no-op, so the same code runs on one machine.

* :func:`all_reduce_sum_`: in-place sums of a list of tensors across ranks, as one flat buffer in
  float64 (one collective, sums independent of the ranks' dtypes).
* :func:`all_gather_rows`: the row blocks of every rank, concatenated in rank order (blocks may
  differ in length): for statistics that are not sums (NISP's Inf-FS ranks all responses).
* :func:`all_or_none`: a block every rank runs; if it raises on any rank, it raises on every rank
  (the failing rank's own exception there, a ``RuntimeError`` naming it elsewhere), so no rank
  waits forever in the next collective and no rank goes on with partial statistics.

Used by SInGE, Taylor (:mod:`fastprune.importance.singe`) and NISP (:mod:`fastprune.importance.nisp`).
Launch with ``torchrun --nproc-per-node N`` (gloo on CPU, NCCL on GPU) and give each rank its shard
(``torch.utils.data.DistributedSampler``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
import torch.distributed as dist

__all__ = ["all_gather_rows", "all_or_none", "all_reduce_sum_", "is_distributed", "rank", "world_size"]


def is_distributed() -> bool:
    """A process group with more than one rank is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def _device() -> torch.device:
    """Where this backend's collectives run (NCCL: the current GPU; gloo: the CPU)."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum_(tensors: Sequence[torch.Tensor]) -> None:
    """Sum every tensor across ranks, in place (one flat float64 buffer, one collective)."""
    if not is_distributed() or not tensors:
        return
    dev = _device()
    flat = torch.cat([t.detach().reshape(-1).to(device=dev, dtype=torch.float64) for t in tensors])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    i = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[i : i + n].view(t.shape).to(device=t.device, dtype=t.dtype))
        i += n


def all_gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Every rank's (M_r, ...) block, concatenated in rank order (M_r may differ between ranks)."""
    if not is_distributed():
        return x
    dev = _device()
    n = torch.tensor([x.shape[0]], device=dev, dtype=torch.int64)
    sizes = [torch.zeros_like(n) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, n)
    most = int(max(int(s) for s in sizes))
    pad = torch.zeros((most, *x.shape[1:]), device=dev, dtype=x.dtype)
    pad[: x.shape[0]] = x.to(dev)
    parts = [torch.empty_like(pad) for _ in sizes]
    dist.all_gather(parts, pad)
    return torch.cat([p[: int(s)] for p, s in zip(parts, sizes, strict=True)]).to(x.device)


@contextlib.contextmanager
def all_or_none(what: str = "the computation") -> Iterator[None]:
    """Run a block on every rank; if it raises anywhere, raise everywhere (see the module docstring)."""
    if not is_distributed():
        yield
        return
    error: BaseException | None = None
    try:
        yield
    except BaseException as e:  # noqa: BLE001 - re-raised below, on every rank
        error = e
    failed = torch.tensor([0 if error is None else 1], device=_device(), dtype=torch.int64)
    dist.all_reduce(failed, op=dist.ReduceOp.MAX)
    if not int(failed):
        return
    messages: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(messages, None if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    bad = [(r, m) for r, m in enumerate(messages) if m is not None]
    raise RuntimeError(f"{what} failed on rank(s) {', '.join(f'{r} ({m})' for r, m in bad)}")
