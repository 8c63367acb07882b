"""The generated conv code (csrc/sparse/sparse_jit.*) against the vector loops, in one process.

FASTPRUNE_JIT is read at every call, so the same packed weights and the same sparse model run both
ways in alternating rounds (this VM's speed drifts over seconds; ratios within one run hold better
than between runs):

1. every distinct conv shape of ResNet-50 (22), random weights magnitude-pruned to 90 %, batch 1:
   dense F.conv2d, sparse_conv2d with the vector loops (FASTPRUNE_JIT=0) and with the generated code
   (FASTPRUNE_JIT=1); totals weighted by how often each shape occurs in ResNet-50;
2. the ResNet-50-like model (fastprune.models.resnet50, first conv dense) at 90 %, batch 1 and 8:
   dense eager vs fastprune.sparsify run both ways.

Writes benchmarks/results/sparse_jit.{md,json}. Usage: python benchmarks/bench_sparse_jit.py [--sparsity 0.9]
"""

from __future__ import annotations

import argparse
import os

from harness import ensure_malloc_env

if __name__ == "__main__":
    ensure_malloc_env()

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import fastprune  # noqa: E402
from fastprune import ops  # noqa: E402
from harness import machine_info, markdown_table, time_interleaved, write_results  # noqa: E402

# (in, out, kernel, input side, stride, occurrences in ResNet-50)
SHAPES = [
    (64, 64, 1, 56, 1, 1),
    (64, 64, 3, 56, 1, 3),
    (64, 256, 1, 56, 1, 4),
    (256, 64, 1, 56, 1, 2),
    (256, 128, 1, 56, 1, 1),
    (128, 128, 3, 56, 2, 1),
    (128, 512, 1, 28, 1, 4),
    (256, 512, 1, 56, 2, 1),
    (512, 128, 1, 28, 1, 3),
    (128, 128, 3, 28, 1, 3),
    (512, 256, 1, 28, 1, 1),
    (256, 256, 3, 28, 2, 1),
    (256, 1024, 1, 14, 1, 6),
    (512, 1024, 1, 28, 2, 1),
    (1024, 256, 1, 14, 1, 5),
    (256, 256, 3, 14, 1, 5),
    (1024, 512, 1, 14, 1, 1),
    (512, 512, 3, 14, 2, 1),
    (512, 2048, 1, 7, 1, 3),
    (1024, 2048, 1, 14, 2, 1),
    (2048, 512, 1, 7, 1, 2),
    (512, 512, 3, 7, 1, 2),
]


def with_jit(mode: str, fn):
    def run():
        os.environ["FASTPRUNE_JIT"] = mode
        return fn()

    return run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sparsity", type=float, default=0.9)
    p.add_argument("--min-run-time", type=float, default=0.6)
    args = p.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    s = args.sparsity
    layer_rows, layer_recs, tot = [], [], [0.0, 0.0, 0.0]
    for ci, co, k, side, st, count in SHAPES:
        w = torch.randn(co, ci, k, k)
        w = w * (w.abs() > w.abs().flatten().kthvalue(int(s * w.numel())).values)
        bias = torch.randn(co)
        packed = ops.pack_sparse(w.flatten(1))
        x = torch.randn(1, ci, side, side)
        pad = k // 2
        want = F.conv2d(x, w, bias, st, pad)
        for mode in ("0", "1"):
            os.environ["FASTPRUNE_JIT"] = mode
            torch.testing.assert_close(
                ops.sparse_conv2d(x, *packed, list(w.shape), bias, st, pad), want, rtol=1e-4, atol=1e-3
            )
        sparse = lambda: ops.sparse_conv2d(x, *packed, list(w.shape), bias, st, pad)  # noqa: E731
        ts = time_interleaved(
            [lambda: F.conv2d(x, w, bias, st, pad), with_jit("0", sparse), with_jit("1", sparse)], args.min_run_time
        )
        for i in range(3):
            tot[i] += count * ts[i]
        name = f"{k}x{k} {ci}->{co} @{side}" + (f" s{st}" if st > 1 else "")
        layer_recs.append({"layer": name, "count": count, "dense_s": ts[0], "loops_s": ts[1], "jit_s": ts[2]})
        layer_rows.append(
            [
                name,
                count,
                f"{1e3 * ts[0]:.3f}",
                f"{1e3 * ts[1]:.3f}",
                f"{1e3 * ts[2]:.3f}",
                f"{ts[0] / ts[1]:.2f}x",
                f"{ts[0] / ts[2]:.2f}x",
            ]
        )
        print(layer_rows[-1], flush=True)
    layer_rows.append(
        [
            "weighted total",
            "",
            f"{1e3 * tot[0]:.1f}",
            f"{1e3 * tot[1]:.1f}",
            f"{1e3 * tot[2]:.1f}",
            f"{tot[0] / tot[1]:.2f}x",
            f"{tot[0] / tot[2]:.2f}x",
        ]
    )

    from fastprune.models import resnet50

    torch.manual_seed(0)
    model = resnet50().eval()
    fastprune.prune(model, "magnitude", sparsity=s, scope="layer", exclude="conv1")
    fastprune.finalize(model)
    e2e_rows, e2e_recs = [], []
    for b in (1, 8):
        x = torch.randn(b, 3, 224, 224)
        os.environ["FASTPRUNE_JIT"] = "0"  # the calibration's choices do not depend on the generated code
        sparse = fastprune.sparsify(model, example_inputs=x[:1])
        with torch.no_grad():
            want = model(x)
            for mode in ("0", "1"):
                os.environ["FASTPRUNE_JIT"] = mode
                torch.testing.assert_close(sparse(x), want, rtol=1e-3, atol=1e-3 * float(want.abs().max()))
            ts = time_interleaved(
                [lambda: model(x), with_jit("0", lambda: sparse(x)), with_jit("1", lambda: sparse(x))],
                8.0 if b == 1 else 24.0,
                rounds=6,
            )
        e2e_recs.append({"batch": b, "dense_s": ts[0], "loops_s": ts[1], "jit_s": ts[2]})
        e2e_rows.append(
            [
                b,
                f"{1e3 * ts[0]:.1f}",
                f"{1e3 * ts[1]:.1f}",
                f"{1e3 * ts[2]:.1f}",
                f"{ts[0] / ts[1]:.2f}x",
                f"{ts[0] / ts[2]:.2f}x",
            ]
        )
        print(e2e_rows[-1], flush=True)
    os.environ.pop("FASTPRUNE_JIT", None)
    md = (
        f"### ResNet-50 conv shapes at {s:.0%}, batch 1, 1 thread (ms, medians; speedup = dense / sparse)\n\n"
        + markdown_table(
            ["layer", "in ResNet-50", "dense", "vector loops", "generated code", "loops speedup", "generated speedup"],
            layer_rows,
        )
        + f"\n\n### ResNet-50-like model at {s:.0%}, 1 thread (ms, medians of 6 alternating rounds)\n\n"
        + markdown_table(
            [
                "batch",
                "dense",
                "sparsify, vector loops",
                "sparsify, generated code",
                "loops speedup",
                "generated speedup",
            ],
            e2e_rows,
        )
        + "\n"
    )
    print()
    print(md)
    write_results(
        "sparse_jit", {"machine": machine_info(1), "sparsity": s, "layers": layer_recs, "end_to_end": e2e_recs}, md
    )


if __name__ == "__main__":
    main()
