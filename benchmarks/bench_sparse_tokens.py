"""Sparse Linear for many rows (tokens x batch): fastprune.ops.sparse_linear against dense F.linear
(MKL) on BERT-base's shapes, 1 thread, unstructured magnitude-like weights; and the feed-forward
block as one fastprune.ops.sparse_ffn call against the two layers one after the other.

Both are timed in the same process in alternating calls (process CPU time, minimum over the
rounds: the VM's speed drifts by 2x within minutes, so only the same-run ratio means anything).

    python benchmarks/bench_sparse_tokens.py [--quick]
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import harness  # noqa: E402

SHAPES = [(768, 768, "attention q/k/v/out"), (768, 3072, "FFN up"), (3072, 768, "FFN down")]


def minima(fns: list, rounds: int) -> list[float]:
    best = [float("inf")] * len(fns)
    for f in fns:
        f()
        f()
    for _ in range(rounds):
        for i, f in enumerate(fns):
            t = time.process_time()
            f()
            best[i] = min(best[i], time.process_time() - t)
    return best


def main() -> None:
    harness.ensure_malloc_env()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    import torch
    import torch.nn.functional as F

    from fastprune import ops

    torch.set_num_threads(1)
    torch.manual_seed(0)
    rows_list = [128] if args.quick else [16, 128, 512]
    rounds = 10 if args.quick else 30
    out, rows = [], []
    for n in rows_list:
        for k_in, k_out, what in SHAPES:
            x = torch.randn(n, k_in)
            for sp in (0.9, 0.95):
                w = torch.randn(k_out, k_in)
                w[w.abs() < w.abs().flatten().kthvalue(int(sp * w.numel())).values] = 0
                packed = ops.pack_sparse(w)
                b = torch.randn(k_out)
                torch.testing.assert_close(
                    ops.sparse_linear(x, *packed, k_in, b), F.linear(x, w, b), rtol=1e-4, atol=1e-4
                )
                t_sparse, t_dense = minima(
                    [lambda: ops.sparse_linear(x, *packed, k_in, b), lambda: F.linear(x, w, b)], rounds
                )
                out.append(
                    {
                        "rows": n,
                        "in": k_in,
                        "out": k_out,
                        "sparsity": sp,
                        "dense_ms": 1e3 * t_dense,
                        "sparse_ms": 1e3 * t_sparse,
                        "speedup": t_dense / t_sparse,
                    }
                )
                rows.append(
                    [
                        n,
                        f"{k_in}->{k_out} ({what})",
                        f"{sp:.0%}",
                        1e3 * t_dense,
                        1e3 * t_sparse,
                        f"{t_dense / t_sparse:.2f}x",
                    ]
                )
                print(rows[-1], flush=True)
    table = harness.markdown_table(["rows", "layer", "sparsity", "dense ms", "fastprune ms", "speedup"], rows)
    # BERT-base's feed-forward block, 768 -> 3072 -> GELU -> 768: dense, the two sparse layers one
    # after the other, and fastprune.ops.sparse_ffn (the hidden activations kept blocked, in cache)
    ffn, ffn_rows = [], []
    for n in rows_list:
        x = torch.randn(n, 768)
        for sp in (0.9, 0.95):
            ws = [torch.randn(3072, 768), torch.randn(768, 3072)]
            for w in ws:
                w[w.abs() < w.abs().flatten().kthvalue(int(sp * w.numel())).values] = 0
            b1, b2 = torch.randn(3072), torch.randn(768)
            up, down = ops.pack_sparse(ws[0]), ops.pack_sparse(ws[1])

            def dense(x=x, ws=ws, b1=b1, b2=b2):
                return F.linear(F.gelu(F.linear(x, ws[0], b1)), ws[1], b2)

            def composed(x=x, up=up, down=down, b1=b1, b2=b2):
                return ops.sparse_linear(F.gelu(ops.sparse_linear(x, *up, 768, b1)), *down, 3072, b2)

            def fused(x=x, up=up, down=down, b1=b1, b2=b2):
                return ops.sparse_ffn(x, up, b1, down, b2, 768, "gelu")

            torch.testing.assert_close(fused(), dense(), rtol=1e-4, atol=1e-3)
            t_f, t_c, t_d = minima([fused, composed, dense], rounds)
            ffn.append({"rows": n, "sparsity": sp, "dense_ms": 1e3 * t_d, "composed_ms": 1e3 * t_c,
                        "fused_ms": 1e3 * t_f})  # fmt: skip
            ffn_rows.append([n, f"{sp:.0%}", 1e3 * t_d, 1e3 * t_c, 1e3 * t_f, f"{t_c / t_f:.2f}x", f"{t_d / t_f:.2f}x"])
            print(ffn_rows[-1], flush=True)
    table += (
        "\n\nFeed-forward block 768 -> 3072 -> GELU -> 768 (sparse_ffn against the two layers one after the other):\n\n"
    )
    table += harness.markdown_table(
        ["rows", "sparsity", "dense ms", "two sparse_linear ms", "sparse_ffn ms", "vs two calls", "vs dense"], ffn_rows
    )
    print(table)
    name = "sparse_tokens_quick" if args.quick else "sparse_tokens"
    payload = {"machine": harness.machine_info(1), "results": out, "ffn": ffn}
    jpath, mpath = harness.write_results(name, payload, table)
    print(f"wrote {jpath} and {mpath}")


if __name__ == "__main__":
    main()
