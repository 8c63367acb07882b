"""Quality of NISP channel pruning (Yu et al., CVPR 2018) on the digits: the small CNN and the MLP.

At 30 / 50 / 70 % of the prunable channels removed (compacted, per layer), every criterion gets the
same fine-tune (``--epochs`` epochs, SGD 0.02, weight decay 1e-4) from the same dense model:
NISP, L1 filter norm (Li et al.), random, and a layer-by-layer baseline (``activation_norm``: each
channel's mean |output| on the data, each layer judged by its own output). Accuracy before the
fine-tune, after each epoch (the paper says NISP recovers faster) and at the end; mean and std over
``--seeds`` seeds (360 test images: one image is 0.28 points). Writes results/quality_nisp.{json,md,png}.

Usage: python benchmarks/quality_nisp.py [--seeds 3] [--epochs 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import copy
import statistics

from harness import ensure_malloc_env

if __name__ == "__main__":
    ensure_malloc_env()

import torch  # noqa: E402

import fastprune  # noqa: E402
from fastprune import recipes  # noqa: E402
from fastprune.train import evaluate, fit  # noqa: E402
from harness import RESULTS, machine_info, markdown_table, write_results  # noqa: E402

CRITERIA = ("nisp", "l1_filter", "activation_norm", "random")
SPARSITIES = (0.3, 0.5, 0.7)


def run(model_name: str, seed: int, epochs: int, dense_epochs: int, data) -> dict:
    factory = fastprune.models.small_cnn if model_name == "cnn" else fastprune.models.lenet_300_100
    dense = recipes.train_dense(factory, data, epochs=dense_epochs, seed=seed).eval()
    x = torch.as_tensor(data.test_x[:1])
    out = {"dense": evaluate(dense, data.test_loader())}
    for s in SPARSITIES:
        for crit in CRITERIA:
            kw = {
                "nisp": {"data": data.train_loader(), "num_batches": 8},
                "activation_norm": {"data": data.train_loader(), "num_batches": 8},
                "random": {"seed": seed},
            }.get(crit, {})
            m = copy.deepcopy(dense)
            fastprune.prune(m, crit, sparsity=s, example_inputs=x, **kw)
            curve = [evaluate(m, data.test_loader())]
            torch.manual_seed(seed)
            for _ in range(epochs):
                fit(m, data.train_loader(), epochs=1, lr=0.02, l2=1e-4, progress=False)
                curve.append(evaluate(m, data.test_loader()))
            out[f"{crit}@{s}"] = curve
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--plot-only", action="store_true", help="redraw the plot from results/quality_nisp.json")
    args = p.parse_args()
    if args.plot_only:
        import json

        saved = json.loads((RESULTS / "quality_nisp.json").read_text())
        plot(saved["results"], saved["epochs"])
        return
    torch.set_num_threads(args.threads)
    data = fastprune.data.digits(seed=0)
    results = {}
    for model_name, dense_epochs in (("cnn", 20), ("mlp", 30)):
        results[model_name] = [run(model_name, seed, args.epochs, dense_epochs, data) for seed in range(args.seeds)]
    md = ""
    for model_name, runs in results.items():
        dm = statistics.mean(r["dense"] for r in runs)
        rows = []
        for s in SPARSITIES:
            for crit in CRITERIA:
                curves = [r[f"{crit}@{s}"] for r in runs]
                before = [c[0] for c in curves]
                after = [c[-1] for c in curves]
                first = [c[1] for c in curves]
                rows.append(
                    [
                        f"{s:.0%}",
                        crit,
                        f"{100 * statistics.mean(before):.2f}",
                        f"{100 * statistics.mean(first):.2f}",
                        f"{100 * statistics.mean(after):.2f} ± {100 * statistics.pstdev(after):.2f}",
                    ]
                )
        md += (
            f"#### {model_name}: channels removed, then {args.epochs} fine-tune epochs (dense {100 * dm:.2f} %, "
            f"{len(runs)} seeds)\n\n"
        )
        md += (
            markdown_table(
                ["removed", "criterion", "before fine-tune", "after 1 epoch", "after all (mean ± std)"], rows
            )
            + "\n\n"
        )
    print(md)
    write_results(
        "quality_nisp", {"machine": machine_info(args.threads), "epochs": args.epochs, "results": results}, md
    )
    plot(results, args.epochs)


def plot(results: dict, epochs: int) -> None:
    import matplotlib  # optional: the bench extra

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after choosing the backend

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, (model_name, runs) in zip(axes, results.items(), strict=True):
        styles = (
            ("tab:orange", "o", -0.09),
            ("tab:blue", "s", -0.03),
            ("tab:green", "^", 0.03),
            ("tab:gray", "D", 0.09),
        )
        for crit, (color, marker, dx) in zip(CRITERIA, styles, strict=True):
            curves = torch.tensor([r[f"{crit}@0.5"] for r in runs]) * 100
            mean, std = curves.mean(0), curves.std(0) if len(runs) > 1 else torch.zeros(curves.shape[1])
            xs = [e + dx for e in range(epochs + 1)]  # offset: overlapping curves stay visible
            ax.errorbar(xs, mean, yerr=std, marker=marker, ms=5, capsize=3, color=color, label=crit)
        dm = 100 * statistics.mean(r["dense"] for r in runs)
        ax.axhline(dm, color="gray", ls="--", lw=1)
        ax.text(epochs, dm, " dense", va="bottom", ha="right", color="dimgray", fontsize=8)
        ax.set_xticks(range(epochs + 1))
        ax.set_xlabel("fine-tune epochs")
        ax.set_ylabel("test accuracy (%), mean ± std over seeds")
        ax.set_title(f"digits {model_name}, 50 % of channels removed")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(RESULTS / "quality_nisp.png", dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
