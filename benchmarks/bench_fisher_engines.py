"""What the per-sample gradient fallback costs, and what chunking gradients across loader batches saves.

Part 1: collecting the WoodFisher statistics (N per-sample gradients streamed into the block
inverse, B = 128) with ``per_sample="vmap"`` (torch.func) against ``per_sample="loop"`` (one
backward per gradient: the fallback for models vmap refuses, such as HuggingFace BERT) on the
digits LeNet-300-100 and small CNN, and on a BERT-style classifier built from a config (random
weights; vmap refuses it, so only the loop runs). Part 2: the same MLP with loader batches of 4
samples, gradients gathered across batches into chunks of ``max_memory`` bytes against one update
per loader batch (``max_memory`` too small for more). Process CPU seconds, 1 thread, best of
``--repeats``, the two variants alternating.

Usage: python benchmarks/bench_fisher_engines.py [--repeats 3] [--num-grads 512]
"""

from __future__ import annotations

import argparse
import time

from harness import ensure_malloc_env

if __name__ == "__main__":
    ensure_malloc_env()

import torch  # noqa: E402

import fastprune  # noqa: E402
from fastprune.importance.woodfisher import collect_fisher  # noqa: E402
from fastprune.masks import select_parameters  # noqa: E402
from harness import machine_info, markdown_table, write_results  # noqa: E402


def cpu_seconds(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.process_time()
        fn()
        best = min(best, time.process_time() - t)
    return best


def bert_problem(n: int):
    from transformers import BertConfig, BertForSequenceClassification  # optional: the test extra

    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=1000,
        hidden_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=512,
        max_position_embeddings=64,
        num_labels=4,
    )
    model = BertForSequenceClassification(cfg).eval()
    g = torch.Generator().manual_seed(0)
    data = [
        {
            "input_ids": torch.randint(0, 1000, (16, 32), generator=g),
            "attention_mask": torch.ones(16, 32, dtype=torch.long),
            "labels": torch.randint(0, 4, (16,), generator=g),
        }
        for _ in range((n + 15) // 16)
    ]
    return model, select_parameters(model, include="bert.encoder"), data


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--num-grads", type=int, default=512)
    args = p.parse_args()
    torch.set_num_threads(1)
    n = args.num_grads
    digits = fastprune.data.digits()
    rows, out = [], {"engines": {}, "chunks": {}}
    problems = []
    for name, factory in (("lenet_300_100", fastprune.models.lenet_300_100), ("small_cnn", fastprune.models.small_cnn)):
        torch.manual_seed(0)
        model = factory().eval()
        problems.append((name, model, select_parameters(model), digits.train_loader()))
    try:
        problems.append(("bert (2 layers, 128 wide, seq 32)", *bert_problem(n)))
    except ImportError:
        print("transformers not installed: no BERT row")
    for name, model, refs, data in problems:
        times = {}
        for engine in ("vmap", "loop"):

            def run(engine=engine, model=model, refs=refs, data=data):
                collect_fisher(
                    model, refs, data, num_grads=n, block_size=128, damp=1e-5, per_sample=engine, progress=False
                )

            try:
                times[engine] = cpu_seconds(run, args.repeats)
            except RuntimeError as e:  # vmap refuses the model
                times[engine] = None
                print(f"{name}: vmap refused ({str(e).splitlines()[0][:80]})")
        d = sum(r.module.get_parameter(r.param_name).numel() for r in refs)
        ratio = times["loop"] / times["vmap"] if times["vmap"] else None
        rows.append(
            [
                name,
                d,
                n,
                f"{times['vmap']:.2f}" if times["vmap"] else "refused",
                f"{times['loop']:.2f}",
                f"{ratio:.2f}x" if ratio else "-",
            ]
        )
        out["engines"][name] = {"params": d, "num_grads": n, **times}
    md = "### Per-sample gradients: vmap vs one backward per gradient (CPU s, N gradients into B = 128 blocks)\n\n"
    md += markdown_table(["model", "weights", "N", "vmap s", "loop s", "loop / vmap"], rows)
    # chunks across loader batches: batches of 4 samples
    torch.manual_seed(0)
    model = fastprune.models.lenet_300_100().eval()
    refs = select_parameters(model)
    x, y = torch.as_tensor(digits.train_x[:n]), torch.as_tensor(digits.train_y[:n])
    small = [(x[i : i + 4], y[i : i + 4]) for i in range(0, n, 4)]
    d = sum(r.module.weight.numel() for r in refs)
    crow = []
    for label, mem in (
        ("one update per loader batch (4 rows)", 2 * 4 * 4 * d),
        ("chunks across batches (1 GiB)", 1 << 30),
    ):

        def run(mem=mem):
            collect_fisher(model, refs, small, num_grads=n, block_size=128, damp=1e-5, max_memory=mem, progress=False)

        t = cpu_seconds(run, args.repeats)
        out["chunks"][label] = t
        crow.append([label, f"{t:.2f}"])
    md += "\n\n### LeNet-300-100, loader batches of 4 samples (CPU s)\n\n" + markdown_table(["updates", "s"], crow)
    print(md)
    write_results("fisher_engines", {"machine": machine_info(1), **out}, md)


if __name__ == "__main__":
    main()
