"""Depth-first bottlenecks: ResNet-50's blocks without downsampling as one ``sparse_bottleneck`` call
(:class:`fastprune.nn.SparseBottleneck`, bands of rows through conv1 -> conv2 -> conv3 while they
are in L2) against the same three sparse convs called one after the other, per stage and for the
whole model, in one process.

Weights: bench_vs_deepsparse's (magnitude per layer, every conv but the stem). The two models share
every layer decision: the per-layer one is ``sparsify(..., depth_first=False)``, the fused one the
same model after ``fuse_bottlenecks`` (every block fused, untimed), so only the fusion differs.
Per stage: each fused block's input is recorded once, then the fused and the three-call forms run on
it in alternating calls (minimum over the rounds; a stage is the sum of its blocks). Whole model:
medians over alternating rounds. 1 thread: process CPU time; 2 threads: wall time.

    python benchmarks/bench_bottleneck.py [--quick]
"""

from __future__ import annotations

import argparse
import copy
import pathlib
import statistics
import sys
import time
from typing import Any

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import harness  # noqa: E402
from bench_vs_deepsparse import build_model, make_inputs  # noqa: E402


def alternating(fns: list, rounds: int, clock: Any, reduce: Any) -> list[float]:
    for f in fns:
        f()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(rounds):
        for i, f in enumerate(fns):
            t = clock()
            f()
            times[i].append(clock() - t)
    return [reduce(t) for t in times]


def main() -> None:
    harness.ensure_malloc_env()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="90 %% only, fewer rounds")
    args = ap.parse_args()
    import torch

    import fastprune
    from fastprune.nn import SparseBottleneck
    from fastprune.nn.fuse import fuse_bottlenecks

    cells = [(0.9, 1, 1), (0.9, 8, 1), (0.9, 1, 2)]
    if not args.quick:
        cells += [(0.95, 1, 1), (0.95, 8, 1)]
    rounds = 5 if args.quick else 10
    info = harness.machine_info(1)
    print(f"{info['cpu']}, torch {torch.__version__}, git {info['git_sha']}")
    headers = ["sparsity", "batch", "threads", "stage", "three calls ms", "sparse_bottleneck ms", "speed-up"]
    table, results = [], []
    for sparsity, batch, threads in cells:
        torch.set_num_threads(threads)
        clock = time.process_time if threads == 1 else time.perf_counter
        model = build_model("resnet50", sparsity)
        (x,) = make_inputs("resnet50", batch)
        with torch.no_grad():
            plain = fastprune.sparsify(model, example_inputs=(x,), depth_first=False)
            fused = copy.deepcopy(plain)
            reasons = fuse_bottlenecks(fused, (x,), lambda f, u: (True, "always (benchmark)"))
            blocks = {n: m for n, m in fused.named_modules() if isinstance(m, SparseBottleneck)}
            seen: dict[str, torch.Tensor] = {}
            hooks = [
                m.register_forward_pre_hook(lambda mod, a, n=n: seen.setdefault(n, a[0])) for n, m in blocks.items()
            ]
            out = fused(x)
            for h in hooks:
                h.remove()
            # (bit for bit at batch 1; with several samples the three-call form's 1x1 convs run the
            # vector loops, which sum in another order)
            torch.testing.assert_close(
                out, plain(x), rtol=1e-5, atol=1e-5, msg="the fused model computed something else"
            )
            per_stage: dict[str, list[float]] = {}
            for name, blk in blocks.items():
                c1, c2, c3 = blk.convs
                xin = seen[name]
                t3, tf = alternating([lambda: c3(c2(c1(xin)), xin), lambda b=blk: b(xin)], 2 * rounds, clock, min)
                acc = per_stage.setdefault(name.split(".")[0], [0.0, 0.0])
                acc[0] += t3
                acc[1] += tf
            t_plain, t_fused = alternating([lambda: plain(x), lambda: fused(x)], rounds, clock, statistics.median)
        for stage, (t3, tf) in per_stage.items():
            table.append(
                [f"{sparsity:.0%}", batch, threads, stage, f"{t3 * 1e3:.2f}", f"{tf * 1e3:.2f}", f"{t3 / tf:.2f}x"]
            )
        table.append(
            [f"{sparsity:.0%}", batch, threads, "whole model", f"{t_plain * 1e3:.1f}", f"{t_fused * 1e3:.1f}",
             f"{t_plain / t_fused:.2f}x"]
        )  # fmt: skip
        print(harness.markdown_table(headers, table[-len(per_stage) - 1 :]), flush=True)
        results.append(
            {
                "sparsity": sparsity,
                "batch": batch,
                "threads": threads,
                "blocks": sorted(blocks),
                "reasons": reasons,
                "stages_ms": {
                    s: {"three_calls": v[0] * 1e3, "sparse_bottleneck": v[1] * 1e3} for s, v in per_stage.items()
                },
                "model_ms": {"three_calls": t_plain * 1e3, "sparse_bottleneck": t_fused * 1e3},
            }
        )
    md = harness.markdown_table(headers, table)
    print(md)
    harness.write_results(
        "bottleneck",
        {"machine": info, "rounds": rounds, "results": results},
        "ms per call; stages: the sum of the stage's fused blocks, each the minimum over alternating calls on "
        "its recorded input; whole model: medians over alternating rounds; 1 thread process CPU time, "
        "2 threads wall time\n\n" + md,
    )


if __name__ == "__main__":
    main()
