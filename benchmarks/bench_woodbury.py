"""Blocked inverse empirical Fisher: fastprune vs the published rank-one loop vs plain torch.

Ops benchmarked: fastprune::woodbury_inverse_fisher and fastprune::woodbury_update_.

Baselines, all in one run on the same gradients:
  loop      the paper's sequential rank-one Woodbury recursion (fastprune.reference), float32,
            batched over blocks; timed over the first `--loop-steps` gradients and scaled by N/steps
            (each step costs the same, so the scaling is exact up to noise; marked "extrapolated").
  plain32   plain torch: float32 batched Gram (baddbmm) + Cholesky + cholesky_inverse, chunked over
            blocks. Fast, but inaccurate on low-rank gradients at small damp (see the err columns).
  plain64   the same in float64: the accurate plain-torch version.
Correctness is checked first on a slice of the gradients against float64 torch.linalg.inv.

Usage: python benchmarks/bench_woodbury.py [--quick] [--threads 2]
"""

from __future__ import annotations

import argparse
import math
import sys

from harness import ensure_malloc_env

if __name__ == "__main__":
    ensure_malloc_env()

import torch  # noqa: E402

from fastprune import ops, reference  # noqa: E402
from harness import gemm_rates, machine_info, markdown_table, peak_extra_bytes, time_it, write_results  # noqa: E402

DAMP = 1e-5  # the paper's absolute dampening; gradients here have unit variance


def padded_blocks(g: torch.Tensor, block: int) -> torch.Tensor:
    """(N, d) -> (nb, N, B) view (zero-padded copy only when B does not divide d)."""
    n, d = g.shape
    nb = math.ceil(d / block)
    if nb * block != d:
        p = g.new_zeros(n, nb * block)
        p[:, :d] = g
        g = p
    return g.view(n, nb, block).transpose(0, 1)


def plain_gram_cholesky(g: torch.Tensor, block: int, damp: float, dtype: torch.dtype, chunk: int = 512) -> torch.Tensor:
    """Plain torch: per chunk of blocks, Gram by baddbmm, Cholesky, cholesky_inverse."""
    n = g.shape[0]
    gb = padded_blocks(g, block)
    nb = gb.shape[0]
    out = torch.empty(nb, block, block, dtype=g.dtype)
    eye = damp * torch.eye(block, dtype=dtype)
    for s in range(0, nb, chunk):
        x = gb[s : s + chunk].to(dtype)
        f = torch.baddbmm(eye.expand(x.shape[0], block, block), x.transpose(1, 2), x, alpha=1.0 / n)
        chol, _ = torch.linalg.cholesky_ex(f)
        out[s : s + chunk] = torch.cholesky_inverse(chol)
    return out


def dense_truth(g: torch.Tensor, block: int, damp: float) -> torch.Tensor:
    gb = padded_blocks(g.double(), block)
    f = damp * torch.eye(block, dtype=torch.float64) + gb.transpose(1, 2) @ gb / g.shape[0]
    # one block at a time: torch 2.13's batched float64 LU inverse fails at random here (2 threads)
    return torch.stack([torch.linalg.inv(x) for x in f])


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    e = float((a.double() - b).norm() / b.norm())
    return e if math.isfinite(e) else float("nan")


def low_rank(n: int, d: int) -> torch.Tensor:
    u, v = torch.randn(n, 32, dtype=torch.float64), torch.randn(32, d, dtype=torch.float64)
    g = u @ v / 32**0.5
    return (g + 0.01 * g.std() * torch.randn(n, d, dtype=torch.float64)).float()


def check_accuracy(n: int, block: int, loop_steps: int) -> dict[str, float]:
    """Relative Frobenius errors on 4 blocks: Gaussian gradients (damp 1e-5) and low-rank ones
    (damp 1e-5 x mean Gram diagonal), against float64 torch.linalg.inv."""
    errs = {}
    for kind in ("gauss", "lowrank"):
        g = torch.randn(n, 4 * block) if kind == "gauss" else low_rank(n, 4 * block)
        damp = DAMP if kind == "gauss" else 1e-5 * float((g.double() ** 2).mean())
        truth = dense_truth(g, block, damp)
        errs[f"err_fastprune_{kind}"] = rel_err(ops.woodbury_inverse_fisher(g, block, damp), truth)
        errs[f"err_plain32_{kind}"] = rel_err(plain_gram_cholesky(g, block, damp, torch.float32), truth)
        errs[f"err_loop_{kind}"] = rel_err(reference.woodbury_inverse_fisher(g, block, damp), truth)
    if not errs["err_fastprune_gauss"] <= 1e-4:
        sys.exit(f"fastprune inverse is wrong: relative error {errs['err_fastprune_gauss']:.2e} (N={n}, B={block})")
    return errs


def bench_config(d: int, block: int, n: int, args: argparse.Namespace) -> dict:
    row: dict = {"d": d, "B": block, "N": n}
    row.update(check_accuracy(n, block, args.loop_steps))
    g = torch.randn(n, d)
    nb = math.ceil(d / block)
    mrt = 0.5 if d * n < 5e8 else 0.0
    row["t_fastprune"] = time_it(lambda: ops.woodbury_inverse_fisher(g, block, DAMP), mrt)
    row["t_plain32"] = time_it(lambda: plain_gram_cholesky(g, block, DAMP, torch.float32), mrt)
    if not args.no_plain64:
        row["t_plain64"] = time_it(lambda: plain_gram_cholesky(g, block, DAMP, torch.float64), mrt)
    steps = min(args.loop_steps, n)
    gs = g[:steps]
    row["t_loop"] = time_it(lambda: reference.woodbury_inverse_fisher(gs, block, DAMP), 0.0) * n / steps
    row["loop_extrapolated_from_steps"] = steps
    row["x_loop"] = row["t_loop"] / row["t_fastprune"]
    row["x_plain32"] = row["t_plain32"] / row["t_fastprune"]
    if "t_plain64" in row:
        row["x_plain64"] = row["t_plain64"] / row["t_fastprune"]
    # flop model: symmetric Gram (N B (B+1) per block) + SPD inverse (B^3 per block)
    row["gflops_fastprune"] = nb * (n * block * (block + 1) + block**3) / row["t_fastprune"] / 1e9
    row["peak_mb_fastprune"] = (peak_extra_bytes(lambda: ops.woodbury_inverse_fisher(g, block, DAMP)) or 0) / 2**20
    row["peak_mb_plain32"] = (peak_extra_bytes(lambda: plain_gram_cholesky(g, block, DAMP, torch.float32)) or 0) / 2**20
    row["output_mb"] = nb * block * block * 4 / 2**20
    if (d, block, n) in args.update_configs:
        k = 64

        def feed() -> torch.Tensor:
            finv = torch.eye(block).repeat(nb, 1, 1) / DAMP
            for c in g.split(k):
                ops.woodbury_update_(finv, c, n)
            return finv

        row["t_update_k64"] = time_it(feed, 0.0)
        row["update_over_inverse"] = row["t_update_k64"] / row["t_fastprune"]
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="d = 1e5, B = 128 only (about a minute)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--loop-steps", type=int, default=32)
    p.add_argument("--no-plain64", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.quick:
        configs = [(100_000, 128, 256), (100_000, 128, 1024)]
        args.update_configs = {(100_000, 128, 1024)}
    else:
        configs = [(d, b, n) for d in (100_000, 1_000_000) for b in (64, 128, 256) for n in (256, 1024)]
        args.update_configs = {(100_000, 128, 1024), (1_000_000, 128, 1024)}
    info = machine_info(args.threads)
    rates = gemm_rates(args.threads)
    info.update({f"{k}_gflops": v for k, v in rates.items()})
    rows = []
    for d, b, n in configs:
        r = bench_config(d, b, n, args)
        rows.append(r)
        print(
            f"  d={d} B={b} N={n}: fastprune {r['t_fastprune']:.3f}s  x{r['x_loop']:.1f} vs loop  "
            f"x{r['x_plain32']:.2f} vs plain32",
            flush=True,
        )
    headers = [
        "d",
        "B",
        "N",
        "fastprune s",
        "loop s*",
        "plain32 s",
        "plain64 s",
        "x loop",
        "x plain32",
        "x plain64",
        "GFLOP/s",
        "% dgemm",
        "peak MB",
        "plain32 peak MB",
        "err lowrank fp/plain32/loop",
        "update k=64 / inverse",
    ]
    table = []
    for r in rows:
        table.append(
            [
                r["d"],
                r["B"],
                r["N"],
                r["t_fastprune"],
                r["t_loop"],
                r["t_plain32"],
                r.get("t_plain64", "-"),
                r["x_loop"],
                r["x_plain32"],
                r.get("x_plain64", "-"),
                r["gflops_fastprune"],
                100 * r["gflops_fastprune"] / rates["dgemm"],
                r["peak_mb_fastprune"],
                r["peak_mb_plain32"],
                f"{r['err_fastprune_lowrank']:.1e} / {r['err_plain32_lowrank']:.1e} / {r['err_loop_lowrank']:.1e}",
                r.get("update_over_inverse", "-"),
            ]
        )
    md = markdown_table(headers, table)
    md += (
        f"\n\nfloat32 inputs, damp {DAMP}, {args.threads} threads; machine GEMM rates: sgemm "
        f"{rates['sgemm']:.0f} GFLOP/s, dgemm {rates['dgemm']:.0f} GFLOP/s (torch.mm 2048^3). "
        f"* loop time extrapolated from {args.loop_steps} steps. GFLOP/s counts the symmetric Gram and the "
        "B^3 inverse per block; fastprune accumulates and inverts in float64, so dgemm is its ceiling. "
        "err: relative Frobenius error vs float64 inverse on low-rank gradients (rank 32 + 1 % noise, "
        "damp 1e-5 x mean Gram diagonal)."
    )
    print()
    print(md)
    name = "woodbury_quick" if args.quick else "woodbury"
    jpath, mpath = write_results(name, {"machine": info, "rows": rows}, md)
    print(f"\nwrote {jpath} and {mpath}")


if __name__ == "__main__":
    main()
