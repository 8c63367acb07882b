"""Sparse Linear for many rows (tokens x batch): fastprune.ops.sparse_linear against dense F.linear
(MKL) on BERT-base's shapes, 1 thread, unstructured magnitude-like weights.

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
    print(table)
    name = "sparse_tokens_quick" if args.quick else "sparse_tokens"
    jpath, mpath = harness.write_results(name, {"machine": harness.machine_info(1), "results": out}, table)
    print(f"wrote {jpath} and {mpath}")


if __name__ == "__main__":
    main()
