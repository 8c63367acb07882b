"""ResNet's stem pool: ``fastprune.ops.max_pool2d`` (ReLU and 3x3/2 max pool in one pass, channels-last
in, NCHW out) against what sparsify ran before it (ReLU and torch's channels-last pool, then a copy to
NCHW for the sparse convs), and torch's NCHW pool against the op's NCHW loop; then whole ResNet-50
models that differ only there, in one process.

Op level: the stem conv's output shape (64 x 112 x 112), batch 1 and 8, each variant the median of
alternating rounds (torch.utils.benchmark). Whole model: bench_vs_deepsparse's weights, ``sparsify``
with ``min_sparsity=0.5`` (no timing calibration: both models swap the same layers); the "before"
model is the same graph with the op's call replaced by ReLU + torch's pool + ``.contiguous()``;
medians over alternating rounds (30; the machine's noise is a few per cent); 1 thread process CPU time.

    python benchmarks/bench_pool.py [--quick]
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


def torch_stem_pool(x: Any, kernel_size: Any, stride: Any, padding: Any, relu: bool) -> Any:
    """The path before max_pool2d: ReLU, torch's pool (channels-last in and out), an NCHW copy."""
    import torch
    import torch.nn.functional as F

    return F.max_pool2d(torch.relu(x) if relu else x, kernel_size, stride, padding).contiguous()


def unfused(gm: Any) -> Any:
    import fastprune

    before = copy.deepcopy(gm)
    n = 0
    for node in before.graph.nodes:
        if node.op == "call_function" and node.target is fastprune.ops.max_pool2d:
            node.target = torch_stem_pool
            n += 1
    assert n == 1, f"expected one fused stem pool, found {n}"
    before.recompile()
    return before


def alternating(fns: list, rounds: int) -> list[float]:
    for f in fns:
        f()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(rounds):
        for i, f in enumerate(fns):
            t = time.process_time()
            f()
            times[i].append(time.process_time() - t)
    return [statistics.median(t) for t in times]


def main() -> None:
    harness.ensure_malloc_env()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="batch 1 and 90 %% only, fewer rounds")
    args = ap.parse_args()
    import torch
    import torch.nn.functional as F

    import fastprune
    from fastprune.nn.fuse import FastMaxPool2d

    torch.set_num_threads(1)
    info = harness.machine_info(1)
    print(f"{info['cpu']}, torch {torch.__version__}, git {info['git_sha']}")
    op_rows, results = [], []
    pool = FastMaxPool2d(3, 2, 1)
    for batch in (1,) if args.quick else (1, 8):
        x = torch.relu(torch.randn(batch, 64, 112, 112))
        xc = x.contiguous(memory_format=torch.channels_last)
        fns = {
            "relu + torch channels-last pool + NCHW copy": lambda xc=xc: torch_stem_pool(xc, 3, 2, 1, True),
            "fastprune.ops.max_pool2d(relu=True), channels-last in": lambda xc=xc: fastprune.ops.max_pool2d(
                xc, 3, 2, 1, True
            ),
            "torch max_pool2d, NCHW": lambda x=x: F.max_pool2d(x, 3, 2, 1),
            "FastMaxPool2d (the op), NCHW": lambda x=x: pool(x),
        }
        want = F.max_pool2d(x, 3, 2, 1)
        for f in fns.values():
            assert torch.equal(f(), want)
        with torch.no_grad():
            ts = harness.time_interleaved(list(fns.values()), min_run_time=1.0 if args.quick else 3.0, rounds=3)
        names = list(fns)
        for name, t in zip(names, ts, strict=True):
            base = ts[0] if "channels-last" in name else ts[2]
            op_rows.append([batch, name, f"{t * 1e3 / batch:.3f}", f"{base / t:.2f}x"])
        results.append(
            {
                "level": "op",
                "batch": batch,
                "ms_per_image": {n: t * 1e3 / batch for n, t in zip(names, ts, strict=True)},
            }
        )
    op_md = harness.markdown_table(["batch", "variant", "ms / image", "vs torch's same-layout path"], op_rows)
    print(op_md, flush=True)
    model_rows = []
    cells = [(0.9, 1)] if args.quick else [(0.9, 1), (0.95, 1), (0.9, 8), (0.95, 8)]
    rounds = 10 if args.quick else 30
    for sparsity, batch in cells:
        model = build_model("resnet50", sparsity)
        (x,) = make_inputs("resnet50", batch)
        with torch.no_grad():
            after = fastprune.sparsify(model, example_inputs=(x,), min_sparsity=0.5)
            before = unfused(after)
            assert torch.equal(after(x), before(x)), "the two models computed different values"
            t_before, t_after = alternating([lambda: before(x), lambda: after(x)], rounds)
        model_rows.append(
            [f"{sparsity:.0%}", batch, f"{t_before * 1e3:.1f}", f"{t_after * 1e3:.1f}", f"{t_before / t_after:.3f}x"]
        )
        print(harness.markdown_table(["sparsity", "batch", "before ms", "max_pool2d ms", "speed-up"], model_rows[-1:]))
        results.append(
            {
                "level": "model",
                "sparsity": sparsity,
                "batch": batch,
                "before_ms": t_before * 1e3,
                "after_ms": t_after * 1e3,
            }
        )
    model_md = harness.markdown_table(["sparsity", "batch", "before ms", "max_pool2d ms", "speed-up"], model_rows)
    print(model_md)
    harness.write_results(
        "pool",
        {"machine": info, "rounds": rounds, "results": results},
        "1 thread. Op level: ms per image, medians of alternating rounds (torch.utils.benchmark), the ratio "
        "against torch's path for the same input layout\n\n" + op_md + "\n\nResNet-50 (bench_vs_deepsparse's "
        "weights), whole model, process CPU time, medians over alternating rounds; before: ReLU + torch's "
        "channels-last pool + NCHW copy in the stem\n\n" + model_md,
    )


if __name__ == "__main__":
    main()
