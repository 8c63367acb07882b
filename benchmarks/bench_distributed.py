"""WoodFisher's Fisher on 1 rank vs 2 ranks (torch.distributed, gloo, 1 thread each), issue 20.

The model is an MLP with about 5.2 M weights (1024 -> 2560 -> 1024 -> 10, block size ``--block``);
``--grads`` per-sample gradients of random data (cross entropy) build the block inverse, then one OBS
step prunes 50 % (global selection). One rank streams Woodbury updates into every block
(``FisherInverse``, float32); with two ranks each owns half of the blocks (``ShardedFisherInverse``):
the ranks take the gradients in rounds, each owner gathers its columns of every rank's rows and
streams them into its blocks only; the threshold is a distributed k-th value search (histograms),
and only the keep flags and the OBS changes are gathered. Measured per rank: wall time of the Fisher
+ the OBS step, peak resident memory, the bytes of the inverse it holds, and the bytes it sent into
torch.distributed's collectives (all_reduce, reduce, gather, all_gather, all_gather_object). The
formula, per rank, for N gradients of d weights in blocks of B, float32 (e = 4 bytes):

    inverse bytes          = ceil(nb / world) * B^2 * e
    into the collectives   = (N / world) * d * e      (its gradients, split among the owners; the
                                                       (world - 1) / world not its own leave it)
                             + d * 8                  (the diagonal Fisher's all_reduce, float64)
                             + (d / world) * (1 + e)  (its share of the gathers: keep flags, OBS changes)
                             (+ the selection's 8 histograms of 2 KB and the counts: negligible)

is checked against the 2-rank measurement and evaluated for 8 and 64 ranks. Writes
results/bench_distributed.{json,md}.

Usage: python benchmarks/bench_distributed.py [--grads 64] [--block 32]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import resource
import tempfile
import time

from harness import ensure_malloc_env

if __name__ == "__main__":
    ensure_malloc_env()

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
from torch import nn  # noqa: E402

import fastprune  # noqa: E402
from harness import machine_info, markdown_table, write_results  # noqa: E402


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(1024, 2560), nn.ReLU(), nn.Linear(2560, 1024), nn.ReLU(), nn.Linear(1024, 10))


def data(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 1024, generator=g), torch.randint(0, 10, (8,), generator=g)) for _ in range(n // 8)]


class Meter:
    """Counts the bytes this rank sends through torch.distributed's collectives."""

    def __init__(self) -> None:
        self.sent = 0
        self._orig = {}

    def __enter__(self) -> Meter:
        for name in ("all_reduce", "reduce", "gather", "all_gather", "all_gather_object"):
            orig = getattr(dist, name)
            self._orig[name] = orig

            def wrap(*args, _orig=orig, _name=name, **kwargs):
                t = args[1] if _name == "all_gather" else args[0]
                if isinstance(t, torch.Tensor):
                    self.sent += t.numel() * t.element_size()
                return _orig(*args, **kwargs)

            setattr(dist, name, wrap)
        return self

    def __exit__(self, *exc) -> None:
        for name, orig in self._orig.items():
            setattr(dist, name, orig)


def run(world: int, rank: int, grads: int, block: int) -> dict:
    torch.set_num_threads(1)
    m = model().eval()
    shard = data(grads)[rank::world]
    d = sum(p.numel() for n, p in m.named_parameters() if n.endswith("weight"))
    t0 = time.perf_counter()
    with Meter() as meter:
        fastprune.prune(m, "woodfisher", sparsity=0.5, data=shard, num_grads=grads, block_size=block, damp=1e-4,
                        progress=False, scope="global")  # fmt: skip
    wall = time.perf_counter() - t0
    nb_layers = [math.ceil(p.numel() / block) for n, p in model().named_parameters() if n.endswith("weight")]
    owned = [math.ceil(nb / world) if world > 1 else nb for nb in nb_layers]
    elem = 4  # float32 Woodbury blocks, one rank or several
    return {
        "world": world,
        "rank": rank,
        "params": d,
        "wall_s": wall,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "inverse_bytes": sum(o * block * block * elem for o in owned),
        "sent_bytes": meter.sent,
        "blocks": sum(nb_layers),
    }


def worker(rank: int, world: int, grads: int, block: int, out: str) -> None:
    if world == 1:  # no process group: the one-process path
        pathlib.Path(out, "r0.json").write_text(json.dumps(run(1, 0, grads, block)))
        return
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    dist.init_process_group("gloo", init_method=pathlib.Path(out, "rdzv").as_uri(), rank=rank, world_size=world)
    try:
        res = run(world, rank, grads, block)
        pathlib.Path(out, f"r{rank}.json").write_text(json.dumps(res))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def spawn(world: int, grads: int, block: int) -> list[dict]:
    """Every run in fresh processes: a process's peak RSS (ru_maxrss) starts at its parent's peak
    when it is spawned, so the parent must stay small."""
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(worker, args=(world, grads, block, tmp), nprocs=world, start_method="spawn")
        return [json.loads(pathlib.Path(tmp, f"r{r}.json").read_text()) for r in range(world)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--grads", type=int, default=64)
    p.add_argument("--block", type=int, default=32)
    args = p.parse_args()
    info = machine_info(1)
    (one,) = spawn(1, args.grads, args.block)
    two = spawn(2, args.grads, args.block)
    B, nb = args.block, one["blocks"]

    d = one["params"]

    def formula(world: int) -> dict:
        grads = math.ceil(args.grads / world) * d * 4
        return {
            "inverse_bytes": math.ceil(nb / world) * B * B * 4,
            "into_collectives_bytes": grads + d * 8 + d / world * 5,
            "leaves_rank_bytes": grads * (world - 1) / world + d * 8 + d / world * 5,
        }

    rows = [["1 rank (Woodbury, float32)", f"{one['wall_s']:.1f}", f"{one['peak_rss_mb']:.0f}",
             f"{one['inverse_bytes'] / 2**20:.0f}", "0"]]  # fmt: skip
    # (the 1-rank process also ran nothing else; its RSS includes the interpreter and torch)
    for r in two:
        rows.append([f"2 ranks: rank {r['rank']} (its blocks, float32)", f"{r['wall_s']:.1f}",
                     f"{r['peak_rss_mb']:.0f}", f"{r['inverse_bytes'] / 2**20:.0f}",
                     f"{r['sent_bytes'] / 2**20:.0f}"])  # fmt: skip
    md = (
        f"{info['cpu']}. MLP with {one['params'] / 1e6:.2f} M weights, {nb} blocks of {B}, {args.grads} gradients, "
        "50 % global WoodFisher, 1 thread per rank, gloo on loopback.\n\n"
    )
    md += markdown_table(["run", "wall s", "peak RSS MB", "inverse MB held", "MB into collectives"], rows)
    md += "\n\nThe formula, per rank (MB): " + "; ".join(
        f"{w} ranks: inverse {formula(w)['inverse_bytes'] / 2**20:.0f}, "
        f"into the collectives {formula(w)['into_collectives_bytes'] / 2**20:.0f} "
        f"(leaving the rank {formula(w)['leaves_rank_bytes'] / 2**20:.0f})"
        for w in (2, 8, 64)
    )
    sent = " / ".join(f"{r['sent_bytes'] / 2**20:.1f}" for r in two)
    md += (
        f"\n\nCheck at 2 ranks: measured into the collectives per rank {sent} MB, formula "
        f"{formula(2)['into_collectives_bytes'] / 2**20:.1f} MB. Each rank's peak RSS is mostly the buffered chunk "
        "of gradients (max_memory, 1 GiB by default) and vmap's working memory, the same at any world size; "
        "the inverse held is what shrinks with the ranks."
    )
    print(md)
    write_results(
        "bench_distributed",
        {"machine": info, "args": vars(args), "one": one, "two": two,
         "formula": {w: formula(w) for w in (2, 8, 64)}},
        md,
    )  # fmt: skip


if __name__ == "__main__":
    main()
