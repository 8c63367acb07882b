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
* :func:`exchange_counts`: every rank's count, for loops whose ranks move in lock step (the
  sharded Fisher's rounds), with :func:`all_or_none`'s error rule folded into the same collective.
* :func:`check_same_everywhere`: raises on every rank unless some tensors are bitwise equal on all
  ranks (a hash each): the model WoodFisher starts from, and what it ends with.
* :func:`kth_smallest` (with :func:`order_keys`): the k-th smallest value over every rank's values,
  by a radix selection on histograms (WoodFisher's global threshold without gathering saliencies).

Used by SInGE, Taylor (:mod:`fastprune.importance.singe`), NISP (:mod:`fastprune.importance.nisp`)
and WoodFisher (:class:`fastprune.fisher.ShardedFisherInverse`, :func:`fastprune.select.sharded_topk_keep`).
Launch with ``torchrun --nproc-per-node N`` (gloo on CPU, NCCL on GPU) and give each rank its shard
(``torch.utils.data.DistributedSampler``). Import fastprune before ``init_process_group`` (see the
import of torch.distributed.nn.functional below: otherwise the group outlives destroy_process_group).
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator, Sequence

import torch
import torch.distributed as dist

# torch.distributed.nn's collectives take ``group=group.WORLD`` as a default argument, evaluated when
# that module is first imported. Imported after init_process_group (functorch's grad imports it,
# through torch._dynamo and FSDP, the first time WoodFisher or SInGE take per-sample gradients), they
# hold the process group past destroy_process_group: its gloo threads then outlive Python and abort
# the process at exit, at random (libstdc++ "terminate called without an active exception"). Imported
# here, with ``import fastprune``, before any process group exists, the default they hold is None.
import torch.distributed.nn.functional  # noqa: F401

__all__ = [
    "all_gather_ints",
    "all_gather_rows",
    "all_or_none",
    "all_reduce_sum_",
    "check_same_everywhere",
    "digest",
    "exchange_counts",
    "is_distributed",
    "kth_smallest",
    "order_keys",
    "rank",
    "world_size",
]


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


def _raise_everywhere(error: BaseException | None, what: str) -> None:
    """After a collective told every rank that some rank failed: the failing rank re-raises its own
    exception, the others a RuntimeError naming the rank(s) and their messages."""
    messages: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(messages, None if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    bad = [(r, m) for r, m in enumerate(messages) if m is not None]
    raise RuntimeError(f"{what} failed on rank(s) {', '.join(f'{r} ({m})' for r, m in bad)}")


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
    if int(failed):
        _raise_everywhere(error, what)


def exchange_counts(count: int, error: BaseException | None = None, what: str = "the computation") -> list[int]:
    """Every rank's ``count`` in rank order (one collective), for loops whose ranks move in lock
    step; if ``error`` is set on any rank, it is raised on every rank instead (as :func:`all_or_none`).
    Without a process group: ``[count]``, or ``error`` raised."""
    if not is_distributed():
        if error is not None:
            raise error
        return [count]
    world, me = dist.get_world_size(), dist.get_rank()
    slots = torch.zeros(2 * world, device=_device(), dtype=torch.int64)
    slots[me] = 0 if error is None else 1
    slots[world + me] = count
    dist.all_reduce(slots, op=dist.ReduceOp.SUM)
    if int(slots[:world].sum()):
        _raise_everywhere(error, what)
    return [int(c) for c in slots[world:].tolist()]


def all_gather_ints(values: Sequence[int]) -> list[list[int]]:
    """Every rank's list of ints (the same length on every rank), in rank order: one collective."""
    if not is_distributed():
        return [list(values)]
    world, me, n = dist.get_world_size(), dist.get_rank(), len(values)
    table = torch.zeros(world, n, device=_device(), dtype=torch.int64)
    table[me] = torch.tensor(list(values), dtype=torch.int64)
    dist.all_reduce(table, op=dist.ReduceOp.SUM)
    return table.cpu().tolist()


def digest(tensors: Sequence[torch.Tensor]) -> str:
    """A SHA-256 of the tensors' shapes, dtypes and bytes (bitwise identity, not closeness)."""
    h = hashlib.sha256()
    for t in tensors:
        c = t.detach().cpu().contiguous()
        h.update(f"{tuple(c.shape)} {c.dtype};".encode())
        h.update(c.reshape(-1).view(torch.uint8).numpy().tobytes() if c.numel() else b"")
    return h.hexdigest()


def check_same_everywhere(tensors: Sequence[torch.Tensor], what: str, hint: str = "") -> None:
    """Raise on every rank (ValueError naming the ranks that differ from rank 0, then ``hint``)
    unless ``tensors`` are bitwise the same on every rank: one all_gather of a 64-character digest."""
    if not is_distributed():
        return
    mine = digest(tensors)
    all_digests: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(all_digests, mine)
    odd = [r for r, h in enumerate(all_digests) if h != all_digests[0]]
    if odd:
        raise ValueError(
            f"{what} differ between ranks: rank(s) {', '.join(map(str, odd))} hold other values than rank 0{hint}"
        )


def order_keys(x: torch.Tensor) -> torch.Tensor:
    """int64 keys ordered as the float64 values of ``x`` (-0.0 counts as 0.0; no NaNs)."""
    k = (x.to(torch.float64) + 0.0).contiguous().view(torch.int64)  # + 0.0: -0.0 becomes 0.0
    return k ^ ((k >> 63) & 0x7FFFFFFFFFFFFFFF)


def kth_smallest(keys: Sequence[torch.Tensor], ks: Sequence[int]) -> list[tuple[int, int]]:
    """For each group g: the ``ks[g]``-th smallest (1-based) of the int64 ``keys[g]`` of every rank
    together, and how many of them are smaller: a list of ``(key, below)``, equal on every rank.

    A radix selection over the keys' 8 bytes, most significant first: per byte, one all_reduce of a
    (groups, 256) histogram of the keys still matching the prefix, so 8 collectives of
    ``2 KB x groups`` whatever the number of keys; nothing is gathered. Requires
    ``1 <= ks[g] <=`` the group's total count."""
    n = len(keys)
    prefix, below, rank_in = [0] * n, [0] * n, [int(k) for k in ks]
    live = [k.reshape(-1) for k in keys]  # per group, the keys still matching the prefix
    for j in range(8):
        shift = 56 - 8 * j
        digits = [((k >> shift) & 0xFF) ^ (0x80 if j == 0 else 0) for k in live]  # j == 0: the sign bit
        hist = torch.zeros(n, 256, dtype=torch.int64)
        for g, d in enumerate(digits):
            if d.numel():
                hist[g] = torch.bincount(d, minlength=256).cpu()
        if is_distributed():
            h = hist.to(_device())
            dist.all_reduce(h, op=dist.ReduceOp.SUM)
            hist = h.cpu()
        cum = hist.cumsum(1)
        for g in range(n):
            b = int(torch.searchsorted(cum[g], torch.tensor([rank_in[g]]), right=False))
            if b > 255:
                raise ValueError(f"kth_smallest: k={ks[g]} exceeds the group's {int(cum[g, -1])} keys")
            before = int(cum[g, b - 1]) if b else 0
            below[g] += before
            rank_in[g] -= before
            prefix[g] |= b << shift
            live[g] = live[g][digits[g] == b]
    # the prefix is the key with its sign bit flipped (key + 2**63 modulo 2**64)
    return [(p - (1 << 63), below[g]) for g, p in enumerate(prefix)]
