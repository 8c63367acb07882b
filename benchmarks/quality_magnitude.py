"""Quality of magnitude pruning with retraining (Han et al. 2015) on the digits MLP.

Dense accuracy; at 50/80/90/95/98 % sparsity: one-shot (accuracy right after pruning, and after
retraining) and iterative prune -> retrain (4 cubic steps, the same total retraining epochs);
L1 vs L2 regularisation at 90 % (right after pruning and after retraining). Mean and std over
seeds. Writes JSON, a markdown table and a PNG plot under benchmarks/results/.

Han's claims, in direction: >= 10x fewer weights (>= 90 % sparsity) with <= 1 point loss after
retraining; iterative >= one-shot at high sparsity; L1 better right after pruning, L2 after
retraining. Also one-shot + retraining with ``block=4`` (groups of 4 output channels pruned together:
the rows that fastprune's sparse kernels run fastest), the price of that speed in accuracy.

Usage: python benchmarks/quality_magnitude.py [--seeds 3] [--quick]
"""

from __future__ import annotations

import argparse
import statistics

from harness import ensure_malloc_env

if __name__ == "__main__":
    ensure_malloc_env()

import torch  # noqa: E402

import fastprune  # noqa: E402
from fastprune import recipes  # noqa: E402
from fastprune.train import evaluate  # noqa: E402
from harness import RESULTS, machine_info, markdown_table, write_results  # noqa: E402

SPARSITIES = (0.5, 0.8, 0.9, 0.95, 0.98)


def mean_std(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="one seed, fewer epochs")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    seeds = range(1 if args.quick else args.seeds)
    epochs, retrain = (12, 8) if args.quick else (30, 20)
    data = fastprune.data.digits(seed=0)
    dense_accs: list[float] = []
    res: dict[str, dict[float, list[float]]] = {
        k: {s: [] for s in SPARSITIES} for k in ("oneshot_pruned", "oneshot", "iterative", "block4")
    }
    reg: dict[str, list[float]] = {k: [] for k in ("l1_pruned", "l1_retrained", "l2_pruned", "l2_retrained")}
    for seed in seeds:
        dense = recipes.train_dense(fastprune.models.lenet_300_100, data, epochs=epochs, l2=1e-4, seed=seed)
        dense_accs.append(evaluate(dense, data.test_loader()))
        for s in SPARSITIES:
            _, o = recipes.one_shot(dense, data, s, retrain_epochs=retrain, seed=seed)
            res["oneshot_pruned"][s].append(o.acc_pruned)
            res["oneshot"][s].append(o.acc_retrained)
            _, o = recipes.iterative(dense, data, s, retrain_epochs=retrain, seed=seed)
            res["iterative"][s].append(o.acc_retrained)
            _, o = recipes.one_shot(dense, data, s, retrain_epochs=retrain, seed=seed, method_kwargs={"block": 4})
            res["block4"][s].append(o.acc_retrained)
        for name, l1, l2 in (("l1", 1e-4, 0.0), ("l2", 0.0, 1e-3)):
            m = recipes.train_dense(fastprune.models.lenet_300_100, data, epochs=epochs, l1=l1, l2=l2, seed=seed)
            _, o = recipes.one_shot(m, data, 0.9, retrain_epochs=retrain, seed=seed)
            reg[f"{name}_pruned"].append(o.acc_pruned)
            reg[f"{name}_retrained"].append(o.acc_retrained)
        print(f"  seed {seed}: dense {dense_accs[-1]:.4f}", flush=True)
    dm, ds = mean_std(dense_accs)
    rows = []
    for s in SPARSITIES:
        row = [f"{s:.0%}", f"{1 / (1 - s):.0f}x"]
        for k in ("oneshot_pruned", "oneshot", "iterative", "block4"):
            m, sd = mean_std(res[k][s])
            row.append(f"{100 * m:.2f} ± {100 * sd:.2f}")
        row.append(f"{100 * (mean_std(res['oneshot'][s])[0] - dm):+.2f}")
        row.append(f"{100 * (mean_std(res['iterative'][s])[0] - dm):+.2f}")
        rows.append(row)
    md = markdown_table(
        [
            "sparsity",
            "compression",
            "one-shot, no retrain %",
            "one-shot + retrain %",
            "iterative %",
            "one-shot block=4 + retrain %",
            "Δ one-shot pts",
            "Δ iterative pts",
        ],
        rows,
    )
    md += (
        f"\n\ndense: {100 * dm:.2f} ± {100 * ds:.2f} % over {len(dense_accs)} seed(s) "
        "(360 test images: 1 point = 3.6 images)\n\n"
    )
    md += markdown_table(
        ["regulariser (90 %)", "right after pruning %", "after retraining %"],
        [
            [
                name,
                f"{100 * mean_std(reg[f'{key}_pruned'])[0]:.2f}",
                f"{100 * mean_std(reg[f'{key}_retrained'])[0]:.2f}",
            ]
            for name, key in (("L1 (1e-4)", "l1"), ("L2 (1e-3)", "l2"))
        ],
    )
    print()
    print(md)
    name = "quality_magnitude_quick" if args.quick else "quality_magnitude"
    payload = {
        "machine": machine_info(args.threads),
        "dense": dense_accs,
        "results": {k: {str(s): v for s, v in d.items()} for k, d in res.items()},
        "regularisation": reg,
        "epochs": epochs,
        "retrain_epochs": retrain,
    }
    jpath, mpath = write_results(name, payload, md)
    png = RESULTS / f"{name}.png"
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    xs = [100 * s for s in SPARSITIES]
    ax.axhline(100 * dm, color="gray", linestyle="--", label="dense")
    for k, label in (
        ("oneshot_pruned", "one-shot, no retraining"),
        ("oneshot", "one-shot + retraining"),
        ("iterative", "iterative prune-retrain"),
        ("block4", "one-shot block=4 + retraining"),
    ):
        ms = [mean_std(res[k][s]) for s in SPARSITIES]
        ax.errorbar(xs, [100 * m for m, _ in ms], yerr=[100 * sd for _, sd in ms], marker="o", capsize=3, label=label)
    ax.set_xlabel("sparsity (%)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Magnitude pruning, digits MLP (LeNet-300-100-like)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)
    print(f"\nwrote {jpath}, {mpath} and {png}")


if __name__ == "__main__":
    main()
