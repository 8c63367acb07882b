"""Quality of soft filter pruning (SFP, He et al. IJCAI 2018) and its asymptotic schedule (ASFP,
arXiv:1808.07471) on the digits CNN (BN, residual block).

Every variant starts from the same dense model (``--warm`` epochs) and trains ``--epochs`` more
(SGD 0.02, momentum 0.9, weight decay 1e-4), at 30 % and 40 % of each group's filters:
ASFP (asymptotic rate, D = ``--d``) and SFP (constant rate) zero the lowest-L2 filters after every
epoch and let them regrow, then remove them at the end; "hard" prunes once at the start (masks, the
zeroed filters held at zero) and trains; "after" trains dense for half the epochs, removes the
lowest-L2 filters, fine-tunes the other half. Accuracy after every epoch (for SFP / ASFP: the zeroed
model at that point) and of the final compact model; mean over ``--seeds`` seeds. Writes
results/quality_sfp.{json,md,png} (accuracy per epoch, and the ASFP schedule).

Usage: python benchmarks/quality_sfp.py [--seeds 3] [--epochs 8] [--warm 3] [--threads 2]
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
from fastprune import recipes, schedules  # noqa: E402
from fastprune.train import evaluate, fit  # noqa: E402
from harness import RESULTS, machine_info, markdown_table, write_results  # noqa: E402

VARIANTS = ("asfp", "sfp", "hard", "after")


def train_epoch(model, data, seed, epoch, callbacks=()):
    torch.manual_seed(seed * 1000 + epoch)
    fit(model, data.train_loader(), epochs=1, lr=0.02, l2=1e-4, progress=False, callbacks=callbacks)


def run_variant(variant, dense, data, sparsity, epochs, d, seed):
    model = copy.deepcopy(dense)
    x = torch.as_tensor(data.test_x[:1])
    curve = []
    if variant in ("asfp", "sfp"):
        sfp = fastprune.SoftFilterPruner(
            model,
            sparsity,
            example_inputs=x,
            epochs=epochs,
            d=d,
            schedule="asymptotic" if variant == "asfp" else "constant",
        )
        sfp.on_start()
        for e in range(epochs):
            train_epoch(model, data, seed, e)
            sfp.on_epoch_end(e)
            curve.append(evaluate(model, data.test_loader()))
        sfp.finalize()
    elif variant == "hard":
        fastprune.prune(model, "l2_filter", sparsity=sparsity, example_inputs=x, mode="mask", hard=True)
        for e in range(epochs):
            train_epoch(model, data, seed, e)
            curve.append(evaluate(model, data.test_loader()))
        fastprune.finalize(model)
        fastprune.compact(model, x)
    else:
        half = epochs // 2
        for e in range(epochs):
            if e == half:
                fastprune.prune(model, "l2_filter", sparsity=sparsity, example_inputs=x)
            train_epoch(model, data, seed, e)
            curve.append(evaluate(model, data.test_loader()))
    macs, params = fastprune.count(model, x)
    return {"curve": curve, "final": evaluate(model, data.test_loader()), "params": params, "macs": macs}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--warm", type=int, default=3)
    p.add_argument("--d", type=float, default=8.0)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    data = fastprune.data.digits(seed=0)
    results: dict = {}
    for seed in range(args.seeds):
        dense = recipes.train_dense(fastprune.models.small_cnn, data, epochs=args.warm, seed=seed)
        results.setdefault("dense_warm", []).append(evaluate(dense, data.test_loader()))
        for sparsity in (0.3, 0.4):
            for v in VARIANTS:
                r = run_variant(v, dense, data, sparsity, args.epochs, args.d, seed)
                results.setdefault(f"{v}@{sparsity}", []).append(r)
    rows = []
    for sparsity in (0.3, 0.4):
        for v in VARIANTS:
            rs = results[f"{v}@{sparsity}"]
            finals = [r["final"] for r in rs]
            early = [r["curve"][1] for r in rs]
            rows.append(
                [
                    f"{sparsity:.0%}",
                    v,
                    f"{100 * statistics.mean(early):.2f}",
                    f"{100 * statistics.mean(r['curve'][-1] for r in rs):.2f}",
                    f"{100 * statistics.mean(finals):.2f} ± {100 * statistics.pstdev(finals):.2f}",
                    rs[0]["params"],
                ]
            )
    md = (
        f"#### digits CNN, {args.warm} warm-up epochs, then {args.epochs} epochs per variant "
        f"({args.seeds} seeds; warm dense {100 * statistics.mean(results['dense_warm']):.2f} %)\n\n"
    )
    md += markdown_table(
        ["filters", "variant", "after epoch 2", "after the last epoch", "final compact (mean ± std)", "params"], rows
    )
    print(md)
    write_results("quality_sfp", {"machine": machine_info(args.threads), "args": vars(args), "results": results}, md)
    plot(results, args)


def plot(results, args) -> None:
    import matplotlib  # optional: the bench extra

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after choosing the backend

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    styles = {
        "asfp": ("tab:orange", "o"),
        "sfp": ("tab:blue", "s"),
        "hard": ("tab:gray", "^"),
        "after": ("tab:green", "D"),
    }
    for ax, sparsity in zip(axes[:2], (0.3, 0.4), strict=True):
        for v in VARIANTS:
            curves = torch.tensor([r["curve"] for r in results[f"{v}@{sparsity}"]]) * 100
            color, marker = styles[v]
            ax.errorbar(
                range(1, args.epochs + 1),
                curves.mean(0),
                yerr=curves.std(0) if len(curves) > 1 else None,
                color=color,
                marker=marker,
                ms=4,
                capsize=2,
                label=v,
            )
        ax.set_title(f"digits CNN, {sparsity:.0%} of filters")
        ax.set_xlabel("epoch")
        ax.set_ylabel("test accuracy (%), mean ± std")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    s = schedules.asymptotic(0.4, args.epochs, args.d)
    ts = [i / 10 for i in range(10 * args.epochs + 1)]
    axes[2].plot(ts, [100 * s(t) for t in ts], color="tab:orange", label=f"ASFP, D = {args.d:g}")
    axes[2].axhline(40, color="tab:blue", ls="--", label="SFP (constant)")
    axes[2].set_title("pruning rate per epoch (P = 40 %)")
    axes[2].set_xlabel("epoch")
    axes[2].set_ylabel("filters zeroed (%)")
    axes[2].grid(alpha=0.3)
    axes[2].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS / "quality_sfp.png", dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
