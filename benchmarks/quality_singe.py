"""Quality of SInGE (Yvinec et al., NeurIPS 2022, arXiv:2207.04089) against its baselines at equal
structured sparsity and an equal fine-tune budget, on the digits MLP (LeNet-300-100) and CNN (BN,
residual block).

For each dense model (``--seeds`` seeds) and each parameter target (``--targets``: fractions of the
dense model's parameters kept, 0.7 / 0.5 / 0.3 = 30 / 50 / 70 % removed):

* entwined (the paper's flow, :func:`fastprune.recipes.entwined`): score, remove ``--step`` of the
  channels still prunable, fine-tune ``--per-step`` optimizer steps, repeat; the last step removes just
  what the target needs. Criteria: ``singe`` (K = ``--steps``), ``taylor`` (Molchanov 2019),
  ``grad_weight`` (SInGE at mu = 1), ``l1_filter``, ``random``;
* one-shot + fine-tune: each criterion removes everything at once (to the same target); its accuracy
  right after the removal, before any fine-tune, is the criterion alone (second table).

Every variant then fine-tunes until it has used exactly ``--budget`` optimizer steps in all (SGD lr
0.02, momentum 0.9, weight decay 1e-4), so all end with the same parameter count (to a channel) and
the same training. Data-reading criteria score on ``--cal-batches`` training batches.

Also: the Spearman rank correlation per layer between SInGE's ``path="layer"`` and its exact
``path="neuron"`` scores on the dense models, and the scoring time of each path against the
definition taken literally (``batching="reference"``), process CPU time.

Writes results/quality_singe.{json,md,png} (accuracy vs parameters kept, mean ± std over seeds).

Usage: python benchmarks/quality_singe.py [--seeds 3] [--targets 0.7,0.5,0.3] [--budget 96] [--threads 2]
"""

from __future__ import annotations

import argparse
import copy
import itertools
import statistics
import time

from harness import ensure_malloc_env

if __name__ == "__main__":
    ensure_malloc_env()

import torch  # noqa: E402

import fastprune  # noqa: E402
from fastprune import recipes  # noqa: E402
from fastprune.importance.singe import singe_scores, spearman  # noqa: E402
from fastprune.train import evaluate  # noqa: E402
from harness import RESULTS, machine_info, markdown_table, write_results  # noqa: E402

ENTWINED = ("singe", "taylor", "grad_weight", "l1_filter", "random")
ONE_SHOT = ENTWINED
MODELS = {"mlp": (fastprune.models.lenet_300_100, 20), "cnn": (fastprune.models.small_cnn, 8)}


class FineTune:
    """``n`` SGD steps per call over the training loader (cycled), counting the steps used."""

    def __init__(self, data, seed: int, lr: float = 0.02) -> None:
        self.data, self.seed, self.lr, self.used = data, seed, lr, 0

    def run(self, model, n: int) -> None:
        if n <= 0:
            return
        torch.manual_seed(self.seed * 7919 + self.used)
        opt = torch.optim.SGD(model.parameters(), lr=self.lr, momentum=0.9, weight_decay=1e-4)
        model.train()
        batches = itertools.cycle(self.data.train_loader())
        for _ in range(n):
            x, y = next(batches)
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        self.used += n
        model.eval()


def run(kind, method, dense, data, target, args, seed):
    model = copy.deepcopy(dense)
    x = torch.as_tensor(data.test_x[:1])
    cal = list(data.train_loader())[: args.cal_batches]
    ft = FineTune(data, seed)
    kw = {"steps": args.steps} if method == "singe" else {}
    t0 = time.process_time()
    if kind == "entwined":
        plan = recipes.entwined(
            model,
            method,
            example_inputs=x,
            data=cal,
            target_params=target,
            step=args.step,
            finetune=lambda m: ft.run(m, min(args.per_step, args.budget - ft.used)),
            **kw,
        )
    else:  # one step of (almost) everything: the bisection stops it at the target
        plan = recipes.entwined(model, method, example_inputs=x, data=cal, target_params=target, step=0.999, **kw)
    t_prune = time.process_time() - t0
    acc_before_topup = evaluate(model, data.test_loader())
    ft.run(model, args.budget - ft.used)
    macs, params = fastprune.count(model, x)
    return {
        "accuracy": evaluate(model, data.test_loader()),
        "accuracy_before_final_finetune": acc_before_topup,
        "params": params,
        "macs": macs,
        "steps": len(plan.config["history"]) - 1,
        "finetune_steps": ft.used,
        "seconds": t_prune,
    }


def layer_vs_neuron(dense, data, args):
    cal = list(data.train_loader())[: args.cal_batches]
    x = torch.as_tensor(data.test_x[:1])
    out = {}
    times = {}
    for path, batching in (("neuron", "auto"), ("layer", "auto"), ("neuron", "reference")):
        t0 = time.process_time()
        s = singe_scores(dense, cal, example_inputs=x, steps=args.steps, path=path, batching=batching)
        times[f"{path}/{batching}"] = time.process_time() - t0
        out[f"{path}/{batching}"] = s
    rho = {k: spearman(out["neuron/auto"][k], out["layer/auto"][k]) for k in out["neuron/auto"]}
    return rho, times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--targets", default="0.7,0.5,0.3")
    p.add_argument("--budget", type=int, default=96, help="fine-tune optimizer steps per variant, in all")
    p.add_argument("--per-step", type=int, default=12, help="fine-tune steps after each entwined removal")
    p.add_argument("--step", type=float, default=0.1, help="fraction of the prunable channels removed per step")
    p.add_argument("--steps", type=int, default=8, help="SInGE's K")
    p.add_argument("--cal-batches", type=int, default=2)
    p.add_argument("--models", default="mlp,cnn")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    targets = [float(t) for t in args.targets.split(",")]
    data = fastprune.data.digits(seed=0)
    results: dict = {}
    for name in args.models.split(","):
        fn, epochs = MODELS[name]
        for seed in range(args.seeds):
            dense = recipes.train_dense(fn, data, epochs=epochs, seed=seed).eval()
            results.setdefault(f"{name}/dense", []).append(
                {"accuracy": evaluate(dense, data.test_loader()), "params": fastprune.count(dense, data.test_x[:1])[1]}
            )
            rho, times = layer_vs_neuron(dense, data, args)
            results.setdefault(f"{name}/spearman", []).append(rho)
            results.setdefault(f"{name}/score_seconds", []).append(times)
            for target in targets:
                for kind, methods in (("entwined", ENTWINED), ("one-shot", ONE_SHOT)):
                    for method in methods:
                        r = run(kind, method, dense, data, target, args, seed)
                        results.setdefault(f"{name}/{kind}/{method}/{target}", []).append(r)
                        print(name, seed, target, kind, method, f"{100 * r['accuracy']:.1f}", r["params"], flush=True)
    md = report(results, args, targets)
    print(md)
    write_results("quality_singe", {"machine": machine_info(args.threads), "args": vars(args), "results": results}, md)
    plot(results, args, targets)


def _pm(v) -> str:
    return f"{100 * statistics.mean(v):.1f} ± {100 * statistics.pstdev(v):.1f}" if len(v) > 1 else f"{100 * v[0]:.1f}"


def report(results, args, targets) -> str:
    md = ""
    for name in args.models.split(","):
        dense = results[f"{name}/dense"]
        md += (
            f"#### {name}: accuracy after pruning to a parameter target and {args.budget} fine-tune steps "
            f"(dense {_pm([d['accuracy'] for d in dense])} %, {dense[0]['params']} params; {args.seeds} seeds)\n\n"
        )
        rows = []
        for kind, methods in (("entwined", ENTWINED), ("one-shot", ONE_SHOT)):
            for method in methods:
                row = [f"{method} ({kind})"]
                for t in targets:
                    rs = results[f"{name}/{kind}/{method}/{t}"]
                    row.append(f"{_pm([r['accuracy'] for r in rs])} ({statistics.mean(r['params'] for r in rs):.0f})")
                rows.append(row)
        md += markdown_table(["criterion"] + [f"{1 - t:.0%} of params removed (params)" for t in targets], rows)
        md += f"\n\n##### {name}: one-shot, right after the removal (no fine-tune)\n\n"
        md += markdown_table(
            ["criterion"] + [f"{1 - t:.0%} of params removed" for t in targets],
            [
                [method]
                + [
                    _pm([r["accuracy_before_final_finetune"] for r in results[f"{name}/one-shot/{method}/{t}"]])
                    for t in targets
                ]
                for method in ONE_SHOT
            ],
        )
        sp = results[f"{name}/spearman"]
        layers = list(sp[0])
        md += "\n\nSpearman(layer path, neuron path) per layer, mean over seeds: " + ", ".join(
            f"{k} {statistics.mean(s[k] for s in sp):.2f}" for k in layers
        )
        ts = results[f"{name}/score_seconds"]
        md += "; scoring CPU s (dense model): " + ", ".join(
            f"{k} {statistics.mean(t[k] for t in ts):.2f}" for k in ts[0]
        )
        md += "\n\n"
    return md


def plot(results, args, targets) -> None:
    import matplotlib  # optional: the bench extra

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after choosing the backend

    names = args.models.split(",")
    fig, axes = plt.subplots(1, len(names), figsize=(6.5 * len(names), 4.5), squeeze=False)
    styles = {
        "singe": ("tab:red", "o"),
        "taylor": ("tab:blue", "s"),
        "grad_weight": ("tab:purple", "^"),
        "l1_filter": ("tab:green", "D"),
        "random": ("tab:gray", "v"),
    }
    for ax, name in zip(axes[0], names, strict=True):
        dense = results[f"{name}/dense"]
        d = [100 * r["accuracy"] for r in dense]
        ax.axhline(statistics.mean(d), color="k", ls=":", lw=1, label="dense")
        for kind, methods in (("entwined", ENTWINED), ("one-shot", ONE_SHOT)):
            for method in methods:
                xs, ys, es = [], [], []
                for t in targets:
                    rs = results[f"{name}/{kind}/{method}/{t}"]
                    xs.append(100 * statistics.mean(r["params"] for r in rs) / dense[0]["params"])
                    acc = [100 * r["accuracy"] for r in rs]
                    ys.append(statistics.mean(acc))
                    es.append(statistics.pstdev(acc) if len(acc) > 1 else 0.0)
                color, marker = styles[method]
                ax.errorbar(xs, ys, yerr=es, color=color, marker=marker, ms=5, capsize=3,
                            ls="-" if kind == "entwined" else "--", label=f"{method} ({kind})")  # fmt: skip
        ax.set_title(f"digits {name}: {args.budget} fine-tune steps for every variant")
        ax.set_xlabel("parameters kept (% of dense)")
        ax.set_ylabel("test accuracy (%), mean ± std")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(RESULTS / "quality_singe.png", dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
