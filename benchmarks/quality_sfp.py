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

"asfp-channel" is ASFP with zero="channel" (the BN's gamma and beta zeroed too: nothing regrows).
A second table explains the soft variants' figures: accuracy before and after the last zeroing and
after BN recalibration, how much of the zeroed set changes per epoch, the pruner as one fit callback
(one optimizer across the zeroings, constant lr), and the gradient a zeroed filter receives.
``--cosine`` decays the learning rate over the epochs (cosine) and writes quality_sfp_cosine.*.

Usage: python benchmarks/quality_sfp.py [--seeds 3] [--epochs 8] [--warm 3] [--threads 2] [--cosine]
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics

from harness import ensure_malloc_env

if __name__ == "__main__":
    ensure_malloc_env()

import torch  # noqa: E402

import fastprune  # noqa: E402
from fastprune import recipes, schedules  # noqa: E402
from fastprune.train import evaluate, fit, recalibrate_bn  # noqa: E402
from harness import RESULTS, machine_info, markdown_table, write_results  # noqa: E402

VARIANTS = ("asfp", "sfp", "asfp-channel", "hard", "after")
LR = {"schedule": "constant", "epochs": 8}  # set by main(): --cosine decays the rate over the epochs


def lr_at(epoch: int) -> float:
    if LR["schedule"] == "cosine":
        return max(0.02 * 0.5 * (1 + math.cos(math.pi * epoch / LR["epochs"])), 1e-4)
    return 0.02


def train_epoch(model, data, seed, epoch, callbacks=()):
    torch.manual_seed(seed * 1000 + epoch)
    fit(model, data.train_loader(), epochs=1, lr=lr_at(epoch), l2=1e-4, progress=False, callbacks=callbacks)


def soft_pruner(variant, model, x, sparsity, epochs, d):
    """The SoftFilterPruner of a variant: asfp / asfp-channel (asymptotic rate), sfp (constant)."""
    return fastprune.SoftFilterPruner(
        model,
        sparsity,
        example_inputs=x,
        epochs=epochs,
        d=d,
        schedule="constant" if variant == "sfp" else "asymptotic",
        zero="channel" if variant == "asfp-channel" else "filter",
    )


def run_variant(variant, dense, data, sparsity, epochs, d, seed):
    model = copy.deepcopy(dense)
    x = torch.as_tensor(data.test_x[:1])
    curve = []
    extra: dict = {}
    if variant in ("asfp", "sfp", "asfp-channel"):
        sfp = soft_pruner(variant, model, x, sparsity, epochs, d)
        sfp.on_start()
        sets, pre = [], []
        for e in range(epochs):
            train_epoch(model, data, seed, e)
            pre.append(evaluate(model, data.test_loader()))  # trained, before this epoch's zeroing
            sfp.on_epoch_end(e)
            curve.append(evaluate(model, data.test_loader()))
            sets.append({(g, c) for g, cs in sfp.zeroed.items() for c in cs})
        recal = copy.deepcopy(model)
        recalibrate_bn(recal, data.train_loader())
        sfp.finalize()
        extra = {
            "before_zeroing": pre,
            "recalibrated": evaluate(recal, data.test_loader()),
            # fraction of the zeroed filters that were not zeroed the epoch before
            "churn": [len(b - a) / max(len(b), 1) for a, b in zip(sets, sets[1:], strict=False)],
        }
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
    return {"curve": curve, "final": evaluate(model, data.test_loader()), "params": params, "macs": macs, **extra}


def one_optimizer(variant, dense, data, sparsity, epochs, d, seed):
    """The pruner as a fit callback over all epochs: one SGD optimizer, momentum kept across the
    zeroings (the paper's training loop), instead of the per-epoch fit calls above."""
    model = copy.deepcopy(dense)
    sfp = soft_pruner(variant, model, torch.as_tensor(data.test_x[:1]), sparsity, epochs, d)
    torch.manual_seed(seed * 1000)
    hist = fit(model, data.train_loader(), epochs=epochs, lr=0.02, l2=1e-4, progress=False, callbacks=[sfp])
    acc = evaluate(model, data.test_loader())
    recalibrate_bn(model, data.train_loader())
    return {"losses": hist.losses, "final": acc, "recalibrated": evaluate(model, data.test_loader())}


def regrowth_gradients(dense, data, sparsity):
    """Per producing layer: median gradient norm of the just-zeroed filters over that of the kept
    ones, on one training batch (train-mode BN), and the norm one SGD step (lr 0.02) gives them
    over the kept filters' median norm."""
    model = copy.deepcopy(dense)
    sfp = fastprune.SoftFilterPruner(
        model, sparsity, example_inputs=torch.as_tensor(data.test_x[:1]), epochs=1, schedule="constant"
    )
    sfp.on_start()
    model.train()
    xb, yb = next(iter(data.train_loader()))
    torch.nn.functional.cross_entropy(model(xb), yb).backward()
    mods = dict(model.named_modules())
    out = {}
    for g in sfp.groups:
        for mem in g.producers:
            w = mods[mem.module].weight
            pos = mem.positions(sfp.zeroed.get(g.id, []))
            keep = [q for q in range(w.shape[mem.dim]) if q not in set(pos)]
            gz = w.grad[pos].flatten(1).norm(dim=1).median()
            gk = w.grad[keep].flatten(1).norm(dim=1).median()
            wk = w.detach()[keep].flatten(1).norm(dim=1).median()
            out[mem.module] = {"grad_ratio": float(gz / gk), "one_step_norm_ratio": float(0.02 * gz / wk)}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--warm", type=int, default=3)
    p.add_argument("--d", type=float, default=8.0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--cosine", action="store_true", help="cosine learning-rate decay over the epochs (results: _cosine)"
    )
    args = p.parse_args()
    LR.update(schedule="cosine" if args.cosine else "constant", epochs=args.epochs)
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
        for v in ("asfp", "sfp"):
            r = one_optimizer(v, dense, data, 0.4, args.epochs, args.d, seed)
            results.setdefault(f"{v}-one-optimizer@0.4", []).append(r)
        if seed == 0:
            results["regrowth_gradients@0.4"] = regrowth_gradients(dense, data, 0.4)
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
    md += "\n\n" + diagnostics(results)
    print(md)
    name = "quality_sfp_cosine" if args.cosine else "quality_sfp"
    write_results(name, {"machine": machine_info(args.threads), "args": vars(args), "results": results}, md)
    plot(results, args, name)


def diagnostics(results) -> str:
    def pct(v) -> str:
        return f"{100 * statistics.mean(v):.1f}"

    rows = []
    for v in ("asfp", "sfp"):
        rs = results[f"{v}@0.4"]
        churn = [statistics.mean(c) for c in zip(*[r["churn"] for r in rs], strict=True)]
        rows.append(
            [
                v,
                pct([r["before_zeroing"][-1] for r in rs]),
                pct([r["curve"][-1] for r in rs]),
                pct([r["recalibrated"] for r in rs]),
                " ".join(f"{c:.2f}" for c in churn),
                pct([r["final"] for r in results[f"{v}-one-optimizer@0.4"]]),
                pct([r["recalibrated"] for r in results[f"{v}-one-optimizer@0.4"]]),
                " ".join(f"{x:.2f}" for x in results[f"{v}-one-optimizer@0.4"][0]["losses"]),
            ]
        )
    md = "#### Why soft pruning loses here (40 %, mean over seeds)\n\n" + markdown_table(
        [
            "variant",
            "last epoch, before its zeroing",
            "after it",
            "after it + BN recalibration",
            "zeroed set: new fraction per epoch",
            "one optimizer (fit callback)",
            "+ BN recalibration",
            "one optimizer: training loss per epoch (seed 0)",
        ],
        rows,
    )
    grads = results["regrowth_gradients@0.4"]
    md += "\n\n" + markdown_table(
        ["layer", "gradient of a zeroed filter / of a kept one (median)", "after one SGD step: norm / kept median"],
        [[k, f"{v['grad_ratio']:.0f}x", f"{v['one_step_norm_ratio']:.2f}"] for k, v in grads.items()],
    )
    return md


def plot(results, args, name: str) -> None:
    import matplotlib  # optional: the bench extra

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after choosing the backend

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    styles = {
        "asfp": ("tab:orange", "o"),
        "sfp": ("tab:blue", "s"),
        "hard": ("tab:gray", "^"),
        "after": ("tab:green", "D"),
        "asfp-channel": ("tab:red", "v"),
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
    fig.savefig(RESULTS / f"{name}.png", dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
