"""WoodFisher's Fisher on 1 rank vs 2 ranks (torch.distributed, gloo, 1 thread each), issue 20.

The model is an MLP with about 5.2 M weights (1024 -> 2560 -> 1024 -> 10, block size ``--block``);
``--grads`` per-sample gradients of random data (cross entropy) build the block inverse, then one OBS
step prunes 50 %. One rank streams Woodbury updates (``FisherInverse``, float32); two ranks each take
half of the gradients, keep float64 block Grams, sum them onto the blocks' owners and invert only
those (``ShardedFisherInverse``). Measured per rank: wall time of the Fisher + the OBS step, peak
resident memory, the bytes of the inverse it holds, and the bytes it moved (counted in the
collectives of fastprune.distributed and the reduces of ShardedFisherInverse). The formula

    inverse bytes per rank = ceil(nb / world) * B^2 * 8
    Gram bytes per rank    = nb * B^2 * 8               (held until finish(): the known gap)
    through the collectives per rank = nb * B^2 * 8     (its whole Gram goes into the reduces; the
                                                        (world - 1) / world not owned leaves it)
                             + d * 8                    (the Fisher diagonal's all_reduce)
                             + 2 * d / world * 8        (this rank's share of the gathers: the
                                                        inverse diagonal, one OBS matvec)

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
        for name in ("all_reduce", "reduce", "all_gather", "all_gather_object"):
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
    elem = 8 if world > 1 else 4  # sharded float64 vs Woodbury float32
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
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    dist.init_process_group("gloo", init_method=pathlib.Path(out, "rdzv").as_uri(), rank=rank, world_size=world)
    try:
        res = run(world, rank, grads, block)
        pathlib.Path(out, f"r{rank}.json").write_text(json.dumps(res))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--grads", type=int, default=64)
    p.add_argument("--block", type=int, default=32)
    args = p.parse_args()
    one = run(1, 0, args.grads, args.block)
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(worker, args=(2, args.grads, args.block, tmp), nprocs=2, start_method="spawn")
        two = [json.loads(pathlib.Path(tmp, f"r{r}.json").read_text()) for r in range(2)]
    B, nb = args.block, one["blocks"]

    d = one["params"]

    def formula(world: int) -> dict:
        return {
            "inverse_bytes": math.ceil(nb / world) * B * B * 8,
            "gram_bytes": nb * B * B * 8,
            "through_collectives_bytes": nb * B * B * 8 + d * 8 + 2 * d / world * 8,
            "leaves_rank_bytes": nb * B * B * 8 * (world - 1) / world,
        }

    rows = [["1 rank (Woodbury, float32)", f"{one['wall_s']:.1f}", f"{one['peak_rss_mb']:.0f}",
             f"{one['inverse_bytes'] / 2**20:.0f}", "0"]]  # fmt: skip
    # (the 1-rank process also ran nothing else; its RSS includes the interpreter and torch)
    for r in two:
        rows.append([f"2 ranks: rank {r['rank']} (Grams, float64)", f"{r['wall_s']:.1f}", f"{r['peak_rss_mb']:.0f}",
                     f"{r['inverse_bytes'] / 2**20:.0f}", f"{r['sent_bytes'] / 2**20:.0f}"])  # fmt: skip
    md = (
        f"MLP with {one['params'] / 1e6:.2f} M weights, {nb} blocks of {B}, {args.grads} gradients, 50 % global "
        "WoodFisher, 1 thread per rank, gloo on loopback.\n\n"
    )
    md += markdown_table(["run", "wall s", "peak RSS MB", "inverse MB held", "MB through collectives"], rows)
    md += "\n\nThe formula, per rank (MB): " + "; ".join(
        f"{w} ranks: inverse {formula(w)['inverse_bytes'] / 2**20:.0f}, Grams {formula(w)['gram_bytes'] / 2**20:.0f}, "
        f"through collectives {formula(w)['through_collectives_bytes'] / 2**20:.0f} "
        f"(leaving the rank {formula(w)['leaves_rank_bytes'] / 2**20:.0f})"
        for w in (2, 8, 64)
    )
    sent = " / ".join(f"{r['sent_bytes'] / 2**20:.0f}" for r in two)
    md += (
        f"\n\nCheck at 2 ranks: measured through the collectives per rank {sent} MB, formula "
        f"{formula(2)['through_collectives_bytes'] / 2**20:.0f} MB."
    )
    print(md)
    write_results(
        "bench_distributed",
        {"machine": machine_info(1), "args": vars(args), "one": one, "two": two,
         "formula": {w: formula(w) for w in (2, 8, 64)}},
        md,
    )  # fmt: skip


if __name__ == "__main__":
    main()
