"""Quality of WoodFisher pruning (Singh & Alistarh 2020) on the digits: MLP and small CNN.

One-shot accuracy with no fine-tuning at 50/70/80/90/95 % (global selection; the CNN also per layer)
for global magnitude, diagonal Fisher, WoodFisher without the OBS update (saliency only), WoodFisher with it, and
WoodFisher recomputing the inverse over 5 sub-steps; then gradual pruning to 95 % (cubic schedule,
4 steps, 3 fine-tuning epochs after each) for WoodFisher and magnitude. Mean over seeds. Writes
JSON, markdown and a PNG under benchmarks/results/.

The paper's claim, in direction: at equal sparsity one-shot WoodFisher keeps clearly more accuracy
than global magnitude and than diagonal Fisher (MNIST MLP at 95 %: WoodFisher 84.2 %, diagonal
Fisher 19.9 %, from 94.0 % dense).

Usage: python benchmarks/quality_woodfisher.py [--seeds 2] [--quick]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

from harness import ensure_malloc_env

if __name__ == "__main__":
    ensure_malloc_env()

import torch  # noqa: E402

import fastprune  # noqa: E402
from fastprune import recipes, schedules  # noqa: E402
from fastprune.train import evaluate, fit  # noqa: E402
from harness import RESULTS, machine_info, markdown_table, write_results  # noqa: E402

SPARSITIES = (0.5, 0.7, 0.8, 0.9, 0.95)
METHODS = ("magnitude", "fisher_diag", "woodfisher (no update)", "woodfisher", "woodfisher (recompute 5)")


def prune_kwargs(method: str, data, num_grads: int, scope: str = "global") -> tuple[str, dict]:
    common = {"data": data.train_loader(), "num_grads": num_grads, "progress": False, "scope": scope}
    return {
        "magnitude": ("magnitude", {"scope": scope}),
        "fisher_diag": ("fisher_diag", common),
        "woodfisher (no update)": ("woodfisher", {**common, "update_weights": False}),
        "woodfisher": ("woodfisher", common),
        "woodfisher (recompute 5)": ("woodfisher", {**common, "recompute_steps": 5}),
    }[method]


def gradual(dense, data, method: str, num_grads: int, seed: int, scope: str) -> float:
    model = copy.deepcopy(dense)
    sched = schedules.cubic(0.0, 0.95, 0, 3)
    torch.manual_seed(seed)
    for step in range(4):
        name, kw = prune_kwargs(method, data, num_grads, scope)
        fastprune.prune(model, name, sparsity=sched(step + 1 if step < 3 else 3), **kw)
        fit(model, data.train_loader(), epochs=3, lr=0.01, l2=1e-4, progress=False)
    return evaluate(model, data.test_loader())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="one seed, the MLP only")
    p.add_argument("--num-grads", type=int, default=1024)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    seeds = range(1 if args.quick else args.seeds)
    data = fastprune.data.digits(seed=0)
    # The small CNN's layers differ in size by 50x, so one global threshold empties its small layers
    # beyond 70 %; per-layer selection ("cnn, per layer") is the meaningful one-shot comparison there.
    nets = {
        "mlp": (fastprune.models.lenet_300_100, "global"),
        "cnn": (fastprune.models.small_cnn, "global"),
        "cnn, per layer": (fastprune.models.small_cnn, "layer"),
    }
    if args.quick:
        nets = {"mlp": nets["mlp"]}
    out: dict = {}
    for net, (factory, scope) in nets.items():
        acc = {m: {s: [] for s in SPARSITIES} for m in METHODS}
        dense_acc, grad_acc, times = [], {"woodfisher": [], "magnitude": []}, {m: [] for m in METHODS}
        for seed in seeds:
            dense = recipes.train_dense(factory, data, epochs=30, lr=0.05, seed=seed)
            dense_acc.append(evaluate(dense, data.test_loader()))
            for s in SPARSITIES:
                for m in METHODS:
                    model = copy.deepcopy(dense)
                    name, kw = prune_kwargs(m, data, args.num_grads, scope)
                    t0 = time.perf_counter()
                    fastprune.prune(model, name, sparsity=s, **kw)
                    times[m].append(time.perf_counter() - t0)
                    acc[m][s].append(evaluate(model, data.test_loader()))
            for m in grad_acc:
                grad_acc[m].append(gradual(dense, data, m, args.num_grads, seed, scope))
            print(f"  {net} seed {seed}: dense {dense_acc[-1]:.4f}", flush=True)
        out[net] = {
            "scope": scope,
            "dense": dense_acc,
            "one_shot": {m: {str(s): v for s, v in d.items()} for m, d in acc.items()},
            "gradual_95": grad_acc,
            "seconds": {m: statistics.fmean(v) for m, v in times.items()},
        }
    md = ""
    for net, r in out.items():
        dm = statistics.fmean(r["dense"])
        rows = [
            [f"{s:.0%}"] + [f"{100 * statistics.fmean(r['one_shot'][m][str(s)]):.2f}" for m in METHODS]
            for s in SPARSITIES
        ]
        md += f"### {net}: one-shot, no fine-tuning, {r['scope']} selection (dense {100 * dm:.2f} %)\n\n"
        md += markdown_table(["sparsity", *METHODS], rows) + "\n\n"
        md += (
            f"gradual to 95 % (cubic, 4 steps, 3 epochs each): woodfisher "
            f"{100 * statistics.fmean(r['gradual_95']['woodfisher']):.2f} %, magnitude "
            f"{100 * statistics.fmean(r['gradual_95']['magnitude']):.2f} %. Mean seconds per prune call: "
            + ", ".join(f"{m} {t:.2f}" for m, t in r["seconds"].items())
            + "\n\n"
        )
    md += (
        f"{len(seeds)} seed(s); digits test set of 360 images (1 point = 3.6 images); N = {args.num_grads} "
        "per-sample gradients, B = 128, damp 1e-5."
    )
    print()
    print(md)
    name = "quality_woodfisher_quick" if args.quick else "quality_woodfisher"
    jpath, mpath = write_results(name, {"machine": machine_info(args.threads), "results": out}, md)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(out), figsize=(6.2 * len(out), 4.2), squeeze=False)
    for ax, (net, r) in zip(axes[0], out.items(), strict=True):
        ax.axhline(100 * statistics.fmean(r["dense"]), color="gray", linestyle="--", label="dense")
        for m in METHODS:
            ax.plot(
                [100 * s for s in SPARSITIES],
                [100 * statistics.fmean(r["one_shot"][m][str(s)]) for s in SPARSITIES],
                marker="o",
                label=m,
            )
        ax.set_title(f"{net}: one-shot, no fine-tuning", fontsize=10)
        ax.set_xlabel("sparsity (%)")
        ax.set_ylabel("test accuracy (%)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    png = RESULTS / f"{name}.png"
    fig.savefig(png, dpi=120)
    plt.close(fig)
    print(f"\nwrote {jpath}, {mpath} and {png}")


if __name__ == "__main__":
    main()
