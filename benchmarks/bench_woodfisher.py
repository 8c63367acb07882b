"""WoodFisher pipeline throughput: gradients -> inverse Fisher -> selection -> OBS update.

A ~5M-parameter MLP (1024-2048-1536-10) on random data, N = 1024 Fisher rows, B = 128, global
selection to 90 %, with per-sample gradients and with fisher_batch_size = 16 (each row the mean of
16 samples). The same pipeline with the published rank-one loop for the inverse (plain torch,
fastprune.reference.woodbury_update_ one gradient at a time) is timed over `--loop-grads` rows and
scaled to N (each step costs the same). Prints the time split, so that the next bottleneck is
visible, and peak memory; writes JSON + markdown to benchmarks/results/.

Usage: python benchmarks/bench_woodfisher.py [--quick] [--threads 2]
"""

from __future__ import annotations

import argparse
import time

from harness import ensure_malloc_env

if __name__ == "__main__":
    ensure_malloc_env()

import torch  # noqa: E402
from torch import nn  # noqa: E402

from fastprune import reference  # noqa: E402
from fastprune.fisher import FisherInverse  # noqa: E402
from fastprune.importance.woodfisher import FisherStats, obs_updates, per_sample_gradients  # noqa: E402
from fastprune.masks import add_to_weights, apply_masks, effective_weight, select_parameters  # noqa: E402
from fastprune.select import topk_masks  # noqa: E402
from harness import machine_info, markdown_table, peak_extra_bytes, write_results  # noqa: E402

B, DAMP, SPARSITY = 128, 1e-5, 0.9


def make_model(width: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(1024, 2 * width),
        nn.ReLU(),
        nn.Linear(2 * width, (3 * width) // 2),
        nn.ReLU(),
        nn.Linear((3 * width) // 2, 10),
    ).eval()


def run_pipeline(model: nn.Module, n: int, fbs: int, chunk_rows: int, use_loop: bool, loop_rows: int) -> dict:
    refs = select_parameters(model)
    sizes = [effective_weight(r.module, r.param_name).numel() for r in refs]
    t = {"gradients": 0.0, "inverse": 0.0, "selection": 0.0, "update": 0.0}
    fis = [FisherInverse(d, B, DAMP, n) for d in sizes]
    if use_loop:
        states = [torch.eye(B).repeat((d + B - 1) // B, 1, 1) / DAMP for d in sizes]
    gen = torch.Generator().manual_seed(1)
    rows_done = 0
    target = loop_rows if use_loop else n
    while rows_done < target:
        k = min(chunk_rows, target - rows_done)
        x = torch.randn(k * fbs, 1024, generator=gen)
        y = torch.randint(0, 10, (k * fbs,), generator=gen)
        t0 = time.perf_counter()
        gs = per_sample_gradients(model, refs, x, y, nn.functional.cross_entropy, fbs)
        t1 = time.perf_counter()
        if use_loop:
            for st, g in zip(states, gs, strict=True):
                for i in range(g.shape[0]):
                    reference.woodbury_update_(st, g[i : i + 1], n)
        else:
            for fi, g in zip(fis, gs, strict=True):
                fi.update(g)
        t2 = time.perf_counter()
        t["gradients"] += t1 - t0
        t["inverse"] += t2 - t1
        rows_done += k
    if use_loop:  # scale the per-row costs to N rows
        scale = n / loop_rows
        t = {key: v * scale for key, v in t.items()}
        for fi, st in zip(fis, states, strict=True):
            fi._finv = st
    stats = FisherStats(refs, fis, "layer", [torch.zeros(1)] * len(refs), n)
    t0 = time.perf_counter()
    weights = [effective_weight(r.module, r.param_name) for r in refs]
    sal = [
        (w.double() ** 2) / (2 * dg.double().reshape(w.shape))
        for w, dg in zip(weights, stats.inverse_diag(), strict=True)
    ]
    masks = topk_masks([r.name for r in refs], sal, SPARSITY, "global", 1)
    t1 = time.perf_counter()
    dws = obs_updates(stats, weights, [masks[r.name] for r in refs])
    add_to_weights(refs, {r.name: dw.reshape(w.shape).float() for r, dw, w in zip(refs, dws, weights, strict=True)})
    apply_masks(refs, masks)
    t2 = time.perf_counter()
    t["selection"] = t1 - t0
    t["update"] = t2 - t1
    t["total"] = sum(t.values())
    return t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a ~1.3M-parameter MLP and N = 256")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--loop-grads", type=int, default=8, help="rows the rank-one loop is timed on")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    width, n = (512, 256) if args.quick else (1024, 1024)
    numel = sum(p.numel() for p in make_model(width).parameters())
    weights = sum(p.numel() for p in make_model(width).parameters() if p.dim() > 1)
    # rows per chunk: the gradient chunk (and vmap temporaries, about 3x it) fit the goal's memory
    # budget beside the (d, B) float32 state: chunk bytes ~ (budget - state) / 3 ~ B / 3 rows
    chunk_rows = B // 3
    rows = []
    results = {}
    for fbs in (1, 16):
        for label, use_loop in (("fastprune", False), ("rank-one loop", True)):
            model = make_model(width)
            holder: dict = {}

            def go(model=model, use_loop=use_loop, fbs=fbs) -> None:
                holder.update(run_pipeline(model, n, fbs, chunk_rows, use_loop, args.loop_grads))

            peak = peak_extra_bytes(go) or 0
            t = holder
            results[f"{label}, fisher_batch_size={fbs}"] = {**t, "peak_mb": peak / 2**20}
            rows.append(
                [
                    label + (" (extrapolated)" if use_loop else ""),
                    fbs,
                    t["gradients"],
                    t["inverse"],
                    t["selection"],
                    t["update"],
                    t["total"],
                    peak / 2**20,
                ]
            )
            print(f"  {label}, fisher_batch_size={fbs}: total {t['total']:.1f} s", flush=True)
    for fbs in (1, 16):
        fp = results[f"fastprune, fisher_batch_size={fbs}"]["total"]
        lp = results[f"rank-one loop, fisher_batch_size={fbs}"]["total"]
        results[f"speedup, fisher_batch_size={fbs}"] = lp / fp
    md = markdown_table(
        ["pipeline", "fisher_batch_size", "gradients s", "inverse s", "selection s", "update s", "total s", "peak MB"],
        rows,
    )
    budget = 2 * (weights * B * 4 + numel * 4) / 2**20
    md += (
        f"\n\n{weights / 1e6:.2f} M weights, N = {n}, B = {B}, damp {DAMP}, global selection to {SPARSITY:.0%}, "
        f"{args.threads} threads. Speedup of the whole pipeline over the rank-one loop: "
        f"{results['speedup, fisher_batch_size=1']:.1f}x (per-sample), "
        f"{results['speedup, fisher_batch_size=16']:.1f}x (fisher_batch_size=16). Memory budget of the goal, "
        f"2 x (d B 4 bytes + model): {budget:.0f} MB. Loop rows timed: {args.loop_grads}, scaled to N."
    )
    print()
    print(md)
    name = "woodfisher_pipeline_quick" if args.quick else "woodfisher_pipeline"
    jpath, mpath = write_results(name, {"machine": machine_info(args.threads), "results": results}, md)
    print(f"\nwrote {jpath} and {mpath}")


if __name__ == "__main__":
    main()
