"""Cost of soft filter pruning's zeroing step against the training it interrupts (issue 16 item 6).

SFP / ASFP zero the lowest-norm filters of every group after every epoch: one pass per layer
(norms of every producer's filters, the selection, index_fill of the filters, biases and BN
running means). This times that step (``SoftFilterPruner.zero_step``) on the ResNet-50-like model
against one training step (forward, backward, SGD with momentum) at batch 32, both in process CPU
time, interleaved, and states the ratio per epoch for the epoch lengths of the papers' data:
CIFAR-10 (50 000 images, 32x32 inputs: the shortest step, so the worst case) and ImageNet
(1.28 M images, 224x224; ``--quick`` skips timing that step and scales the 32x32 one by the pixel
count, a rough estimate: measured here it came out 2.7x too high). The group analysis
(``find_groups``, once per pruner) is timed too. Goal: zeroing < 1 % of an epoch.

Usage: python benchmarks/bench_sfp.py [--threads 2] [--reps 5] [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import time

from harness import ensure_malloc_env

if __name__ == "__main__":
    ensure_malloc_env()

import torch  # noqa: E402

import fastprune  # noqa: E402
from fastprune.models.resnet import resnet50  # noqa: E402
from harness import machine_info, markdown_table, write_results  # noqa: E402


def cpu_time(fn, reps: int) -> float:
    """Median process CPU seconds per call over ``reps`` calls (after one warm-up call)."""
    fn()
    ts = []
    for _ in range(reps):
        t = time.process_time()
        fn()
        ts.append(time.process_time() - t)
    return statistics.median(ts)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--sparsity", type=float, default=0.4)
    p.add_argument("--quick", action="store_true", help="do not time the 224x224 step (about 10 s a step here)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    sizes = [32] if args.quick else [32, 224]
    model = resnet50(num_classes=1000)
    x1 = torch.randn(1, 3, 32, 32)
    t0 = time.process_time()
    sfp = fastprune.SoftFilterPruner(model, args.sparsity, example_inputs=x1, epochs=100)
    t_groups = time.process_time() - t0
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)

    def step(xb: torch.Tensor, yb: torch.Tensor) -> None:
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(xb), yb).backward()
        opt.step()

    model.train()
    steps: dict[int, float] = {}
    t_zero_runs: list[float] = []
    for _round in range(2):  # interleaved rounds: zeroing and training see the same machine
        for side in sizes:
            xb = torch.randn(args.batch, 3, side, side)
            yb = torch.randint(0, 1000, (args.batch,))
            t = cpu_time(lambda xb=xb, yb=yb: step(xb, yb), max(2, args.reps // (2 if side > 64 else 1)))
            steps[side] = min(steps.get(side, float("inf")), t)
        t_zero_runs.append(cpu_time(lambda: sfp.zero_step(args.sparsity), args.reps))
    t_zero = min(t_zero_runs)
    n_layers = sum(len(g.producers) for g in sfp.groups)
    epochs = {"CIFAR-10 (50 000 images, 32x32)": (50_000, 32), "ImageNet (1.28 M images, 224x224)": (1_281_167, 224)}
    rows = []
    out = {}
    for label, (n, side) in epochs.items():
        n_steps = -(-n // args.batch)
        if side in steps:
            t_step, how = steps[side], "measured"
        else:
            t_step, how = steps[32] * (side / 32) ** 2, "scaled from 32x32 by pixels (estimate)"
        epoch = n_steps * t_step
        ratio = t_zero / epoch
        out[label] = {"steps": n_steps, "step_s": t_step, "step": how, "epoch_s": epoch, "zero_fraction": ratio}
        rows.append([label, n_steps, f"{1e3 * t_step:.0f} ({how})", f"{epoch:.0f}", f"{100 * ratio:.5f} %"])
    md = (
        f"ResNet-50-like ({sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters, "
        f"{len(sfp.groups)} groups, {n_layers} producing layers), batch {args.batch}, {args.threads} threads, "
        f"process CPU time. Zeroing step ({args.sparsity:.0%} of every group): {1e3 * t_zero:.1f} ms; "
        f"find_groups once per pruner: {1e3 * t_groups:.0f} ms.\n\n"
    )
    md += markdown_table(["epoch", "steps", "train step ms", "epoch s (est.)", "zeroing / epoch"], rows)
    print(md)
    write_results(
        "bench_sfp",
        {
            "machine": machine_info(args.threads),
            "args": vars(args),
            "zero_step_s": t_zero,
            "zero_step_runs_s": t_zero_runs,
            "find_groups_s": t_groups,
            "train_step_s": {str(k): v for k, v in steps.items()},
            "epochs": out,
        },
        md,
    )


if __name__ == "__main__":
    main()
