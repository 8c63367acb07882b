"""Structured (channel) pruning: graph + prune time vs Torch-Pruning, and whether fewer MACs run faster.

Part 1, graph + prune time: L1-filter pruning at 50 % of the ResNet-18-like and ResNet-50-like models
(random weights, 1 x 3 x 224 x 224 example input, classifier kept), fastprune's one call
(trace, groups, scores, selection, masking, compaction) vs Torch-Pruning's MetaPruner with
MagnitudeImportance(p=1) (graph + step), when torch-pruning is installed. Median CPU seconds of
``--repeats`` runs after a warm-up (the model is copied outside the timing); both produce the same
MACs and parameter counts, which the table shows.

Part 2, latency vs FLOPs: the compact ResNet-50-like (and ResNet-18-like) model at 30/50/70 % channel
sparsity, with channel counts as selected and rounded to multiples of 8 and 16 (``round_to``), batch 1
and 8, 1 thread: latency ratio (pruned / dense, torch.utils.benchmark medians; dense and pruned timed
in turn, ``--rounds`` times, the median of the per-round ratios) next to the MACs ratio. The goal: at
50 % on the ResNet-50-like model, latency ratio within 1.25x of the MACs ratio.

Usage: python benchmarks/bench_structured.py [--quick] [--repeats 5]
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import statistics
import time

from harness import ensure_malloc_env

if __name__ == "__main__":
    ensure_malloc_env()

import torch  # noqa: E402

import fastprune  # noqa: E402
from fastprune.models import resnet18, resnet50  # noqa: E402
from harness import machine_info, markdown_table, time_it, write_results  # noqa: E402

MODELS = {"resnet18": resnet18, "resnet50": resnet50}


def cpu_seconds(fn, model: torch.nn.Module, repeats: int) -> float:
    fn(copy.deepcopy(model))  # warm-up: imports, kernel selection, allocator
    times = []
    for _ in range(repeats):
        m = copy.deepcopy(model)
        t0 = time.process_time()
        fn(m)
        times.append(time.process_time() - t0)
    return statistics.median(times)


def prune_fastprune(x: torch.Tensor, sparsity: float, round_to: int | None = None):
    def run(m: torch.nn.Module) -> torch.nn.Module:
        fastprune.prune(m, "l1_filter", sparsity=sparsity, example_inputs=x, round_to=round_to)
        return m

    return run


def prune_torch_pruning(x: torch.Tensor, sparsity: float):
    import torch_pruning as tp

    def run(m: torch.nn.Module) -> torch.nn.Module:
        pruner = tp.pruner.MetaPruner(
            m, x, importance=tp.importance.MagnitudeImportance(p=1), pruning_ratio=sparsity, ignored_layers=[m.fc]
        )
        pruner.step()
        return m

    return run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="ResNet-18-like only, batch 1, fewer points")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--rounds", type=int, default=3, help="latency: dense/pruned timing rounds")
    args = p.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    have_tp = importlib.util.find_spec("torch_pruning") is not None
    x1 = torch.randn(1, 3, 224, 224)
    names = ["resnet18"] if args.quick else ["resnet18", "resnet50"]
    out: dict = {"prune_time": {}, "latency": {}}

    # ---- part 1: graph + prune time
    rows = []
    for name in names:
        model = MODELS[name]().eval()
        ours = cpu_seconds(prune_fastprune(x1, 0.5), model, args.repeats)
        m_ours = prune_fastprune(x1, 0.5)(copy.deepcopy(model))
        c_ours = fastprune.count(m_ours, x1)
        entry = {"fastprune_s": ours, "fastprune_macs": c_ours[0], "fastprune_params": c_ours[1]}
        row = [name, f"{ours:.3f}", f"{c_ours[0] / 1e9:.3f} G / {c_ours[1] / 1e6:.2f} M"]
        if have_tp:
            theirs = cpu_seconds(prune_torch_pruning(x1, 0.5), model, args.repeats)
            m_tp = prune_torch_pruning(x1, 0.5)(copy.deepcopy(model))
            c_tp = fastprune.count(m_tp, x1)
            entry.update(torch_pruning_s=theirs, torch_pruning_macs=c_tp[0], torch_pruning_params=c_tp[1])
            row += [f"{theirs:.3f}", f"{c_tp[0] / 1e9:.3f} G / {c_tp[1] / 1e6:.2f} M", f"{theirs / ours:.2f}x"]
        else:
            row += ["not installed", "-", "-"]
        out["prune_time"][name] = entry
        rows.append(row)
        print(row, flush=True)
    md = f"### Graph + prune time, L1 filter pruning at 50 % (CPU seconds, median of {args.repeats}, 1 thread)\n\n"
    md += (
        markdown_table(
            [
                "model",
                "fastprune s",
                "fastprune MACs / params",
                "Torch-Pruning s",
                "Torch-Pruning MACs / params",
                "speed vs TP",
            ],
            rows,
        )
        + "\n\n"
    )

    # ---- part 2: latency ratio vs MACs ratio
    batches = [1] if args.quick else [1, 8]
    sparsities = [0.5] if args.quick else [0.3, 0.5, 0.7]
    rows = []
    for name in names:
        dense = MODELS[name]().eval()
        variants = {(s, r): prune_fastprune(x1, s, r)(copy.deepcopy(dense)) for s in sparsities for r in (None, 8, 16)}
        for b in batches:
            x = torch.randn(b, 3, 224, 224)
            macs0, _ = fastprune.count(dense, x)
            # dense and every variant timed in turn, `rounds` times: each ratio is taken within a
            # round (machine speed drifts over minutes on this VM), then the median over rounds
            ratios: dict = {k: [] for k in variants}
            dense_t = []
            with torch.no_grad():
                for _ in range(args.rounds):
                    t_dense = time_it(lambda: dense(x), min_run_time=1.0)
                    dense_t.append(t_dense)
                    for k, m in variants.items():
                        ratios[k].append(time_it(lambda m=m: m(x), min_run_time=1.0) / t_dense)
            for (s, r), m in variants.items():
                macs, params = fastprune.count(m, x)
                lat, fl = statistics.median(ratios[(s, r)]), macs / macs0
                out["latency"].setdefault(name, []).append(
                    {
                        "batch": b,
                        "sparsity": s,
                        "round_to": r,
                        "dense_s": statistics.median(dense_t),
                        "latency_ratio": lat,
                        "latency_ratios": ratios[(s, r)],
                        "macs_ratio": fl,
                        "params": params,
                    }
                )
                rows.append(
                    [name, b, f"{s:.0%}", r or "-", f"{fl:.3f}", f"{lat:.3f}", f"{lat / fl:.2f}", f"{1 / lat:.2f}x"]
                )
                print(rows[-1], flush=True)
    md += "### Compact model latency vs MACs (1 thread; ratio = pruned / dense, same run)\n\n"
    md += (
        markdown_table(
            [
                "model",
                "batch",
                "channels removed",
                "round_to",
                "MACs ratio",
                "latency ratio",
                "latency / MACs",
                "speedup",
            ],
            rows,
        )
        + "\n"
    )
    print()
    print(md)
    jpath, mpath = write_results(
        "structured_quick" if args.quick else "structured", {"machine": machine_info(1), "results": out}, md
    )
    print(f"wrote {jpath} and {mpath}")


if __name__ == "__main__":
    main()
