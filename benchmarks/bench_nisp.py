"""nisp_propagate over every conv and Linear weight of the ResNet-50-like model (25 M weights).

(a) One score vector per layer: the op against the memory floor (one read of every weight: a sum
over each weight tensor) and against plain torch per layer (``s @ W.abs().sum(kernel dims)``);
goals: <= 1.5x the floor and >= 2.5x faster than plain torch at 1 thread. (b) m = 1000 vectors:
GFLOP/s (2 m out in per layer) against this machine's sgemm rate; goal >= 60 %. (c) nisp_scores end
to end on the digits CNN (360 test images) and the ResNet-50-like model (64 random 3 x 112 x 112
images): seconds split into tracing, the final-response forward, Inf-FS and the propagation. Times are medians of
``torch.utils.benchmark`` in alternating rounds (harness.time_interleaved), 1 thread by default.

Usage: python benchmarks/bench_nisp.py [--threads 1] [--min-run-time 3]
"""

from __future__ import annotations

import argparse
import time

from harness import ensure_malloc_env

if __name__ == "__main__":
    ensure_malloc_env()

import torch  # noqa: E402
from torch import nn  # noqa: E402

import fastprune  # noqa: E402
from fastprune import ops, reference  # noqa: E402
from fastprune.importance import inf_fs  # noqa: E402
from fastprune.importance.nisp import _frl_node, _responses, propagate_scores  # noqa: E402
from fastprune.models import resnet50  # noqa: E402
from fastprune.structure.handlers import is_handled  # noqa: E402
from fastprune.structure.trace import trace  # noqa: E402
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
    md_c, out["end_to_end"] = end_to_end()
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
    md += "\n\n" + md_c
    print(md)
    write_results("nisp", {"machine": machine_info(args.threads), **out}, md)


def end_to_end() -> tuple[str, dict]:
    digits = fastprune.data.digits(seed=0)
    torch.manual_seed(0)
    cases = [
        ("digits CNN", fastprune.models.small_cnn().eval(), [torch.as_tensor(digits.test_x)]),
        ("ResNet-50-like", resnet50().eval(), [torch.randn(16, 3, 112, 112) for _ in range(4)]),
    ]
    rows, out = [], {}
    for name, model, data in cases:
        t0 = time.perf_counter()
        graph = trace(model, (data[0][:1],), is_handled)
        t1 = time.perf_counter()
        modules = dict(model.named_modules())
        node = graph.nodes[_frl_node(graph, modules, None)]
        x = _responses(model, modules[node.target], data, None)
        t2 = time.perf_counter()
        s = inf_fs(x).unsqueeze(0)
        t3 = time.perf_counter()
        scores = propagate_scores(model, graph, node.args[0], s)
        t4 = time.perf_counter()
        entry = {
            "trace_s": t1 - t0,
            "forward_s": t2 - t1,
            "inf_fs_s": t3 - t2,
            "propagate_s": t4 - t3,
            "samples": x.shape[0],
            "frl_units": x.shape[1],
            "layers_scored": len(scores),
        }
        out[name] = entry
        rows.append(
            [
                name,
                x.shape[0],
                x.shape[1],
                len(scores),
                f"{entry['trace_s']:.3f}",
                f"{entry['forward_s']:.3f}",
                f"{entry['inf_fs_s']:.3f}",
                f"{entry['propagate_s']:.3f}",
            ]
        )
    md = "### nisp_scores end to end (seconds)\n\n" + markdown_table(
        ["model", "samples", "FRL units", "layers scored", "trace", "FRL forward", "Inf-FS", "propagation"], rows
    )
    return md, out


if __name__ == "__main__":
    main()
