"""nisp_propagate over every conv and Linear weight of the ResNet-50-like model (25 M weights).

(a) One score vector per layer: the op against the memory floor (one read of every weight: a sum
over each weight tensor) and against plain torch per layer (``s @ W.abs().sum(kernel dims)``);
goals: <= 1.5x the floor and >= 2.5x faster than plain torch at 1 thread. (b) m = 1000 vectors:
GFLOP/s (2 m out in per layer) against this machine's sgemm rate; goal >= 60 %. Times are medians of
``torch.utils.benchmark`` in alternating rounds (harness.time_interleaved), 1 thread by default.

Usage: python benchmarks/bench_nisp.py [--threads 1] [--min-run-time 3]
"""

from __future__ import annotations

import argparse

from harness import ensure_malloc_env

if __name__ == "__main__":
    ensure_malloc_env()

import torch  # noqa: E402
from torch import nn  # noqa: E402

from fastprune import ops, reference  # noqa: E402
from fastprune.models import resnet50  # noqa: E402
from harness import gemm_rates, machine_info, markdown_table, time_interleaved, write_results  # noqa: E402


def layers() -> list[tuple[torch.Tensor, int]]:
    torch.manual_seed(0)
    model = resnet50()
    return [
        (m.weight.detach().contiguous(), getattr(m, "groups", 1))
        for m in model.modules()
        if isinstance(m, (nn.Conv2d, nn.Linear))
    ]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--min-run-time", type=float, default=3.0)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    ws = layers()
    numel = sum(w.numel() for w, _ in ws)
    out: dict = {"weights": numel, "layers": len(ws)}
    rows = []
    for m in (1, 1000):
        scores = [torch.rand(m, w.shape[0]) for w, _ in ws]
        for (w, g), s in zip(ws, scores, strict=True):  # correctness first
            torch.testing.assert_close(
                ops.nisp_propagate(w, s, g), reference.nisp_propagate(w, s, g), rtol=1e-4, atol=1e-3
            )

        def op(scores=scores):
            for (w, g), s in zip(ws, scores, strict=True):
                ops.nisp_propagate(w, s, g)

        def plain(scores=scores):
            for (w, g), s in zip(ws, scores, strict=True):
                reference.nisp_propagate(w, s, g)

        def floor():
            for w, _ in ws:
                w.sum()

        t_op, t_plain, t_floor = time_interleaved([op, plain, floor], min_run_time=args.min_run_time)
        flops = sum(2 * m * w.shape[0] * w[0].numel() for w, _ in ws)
        entry = {"op_s": t_op, "plain_s": t_plain, "floor_s": t_floor, "gflops": flops / t_op / 1e9}
        out[f"m={m}"] = entry
        rows.append(
            [
                m,
                f"{1e3 * t_op:.2f}",
                f"{1e3 * t_plain:.2f}",
                f"{1e3 * t_floor:.2f}",
                f"{t_op / t_floor:.2f}x",
                f"{t_plain / t_op:.2f}x",
                f"{entry['gflops']:.1f}",
            ]
        )
    rates = gemm_rates(args.threads)
    out["sgemm_gflops"] = rates["sgemm"]
    md = (
        f"### nisp_propagate over the ResNet-50-like model's {len(ws)} conv / Linear weights ({numel / 1e6:.1f} M), "
        f"{args.threads} thread(s); sgemm {rates['sgemm']:.0f} GFLOP/s\n\n"
    )
    md += markdown_table(
        ["m", "op ms", "plain torch ms", "floor ms (one read)", "op / floor", "speedup vs plain", "GFLOP/s"], rows
    )
    md += (
        f"\n\nm = 1000: {100 * out['m=1000']['gflops'] / rates['sgemm']:.0f} % of sgemm. Goals: op / floor <= 1.5 "
        "(m = 1), speedup vs plain >= 2.5x (m = 1), >= 60 % of sgemm (m = 1000)."
    )
    print(md)
    write_results("nisp", {"machine": machine_info(args.threads), **out}, md)


if __name__ == "__main__":
    main()
