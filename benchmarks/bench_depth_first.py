"""Depth-first CNN stages: ResNet-50's residual blocks run whole (as sparsify leaves them) against the
same blocks on tiles of rows (``sparsify(..., tile_rows=T)``, :class:`fastprune.nn.microbatch.RowTiles`)
and against chunks of one sample (``micro_batch=1``), per stage and for the whole model.

Weights: bench_vs_deepsparse's (magnitude per layer, every conv but the stem). Per stage: each
block's input is recorded once, then the plain block and its tiled forms run on it in alternating
calls (1 thread, process CPU time, minimum over the rounds); a stage's time is the sum of its blocks'.
The whole model is timed the same way, in the same process.

    python benchmarks/bench_depth_first.py [--quick] [--rows 2,4,7,8,14]
"""

from __future__ import annotations

import argparse
import pathlib
import sys
from typing import Any

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import harness  # noqa: E402
from bench_sparse_tokens import minima  # noqa: E402
from bench_vs_deepsparse import build_model, make_inputs  # noqa: E402


def block_module(gm: Any, block: list) -> Any:
    """The block's nodes as a GraphModule of their own (the plain, whole-image execution)."""
    from torch import fx

    g = fx.Graph()
    env = {block[0]: g.placeholder("x")}
    for n in block[1:]:
        env[n] = g.node_copy(n, lambda a: env[a])
    g.output(env[block[-1]])
    return fx.GraphModule(gm, g)


def main() -> None:
    harness.ensure_malloc_env()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="90 %% only, fewer rounds")
    ap.add_argument("--rows", default="2,4,7,8,14", help="tile heights to try")
    args = ap.parse_args()
    import torch
    from torch.fx.passes.shape_prop import ShapeProp

    import fastprune
    from fastprune.nn.microbatch import _blocks, _plan

    torch.set_num_threads(1)
    rows_list = [int(r) for r in args.rows.split(",")]
    rounds = 4 if args.quick else 8
    cells = [(0.9, 1), (0.9, 8)] if args.quick else [(0.9, 1), (0.9, 8), (0.95, 1), (0.95, 8)]
    info = harness.machine_info(1)
    print(f"{info['cpu']}, torch {torch.__version__}, git {info['git_sha']}")
    results, table = [], []
    for sparsity, batch in cells:
        model = build_model("resnet50", sparsity)
        (x,) = make_inputs("resnet50", batch)
        sp = fastprune.sparsify(model, example_inputs=(x[:1],), depth_first=False)  # (blocks RowTiles can tile)
        ShapeProp(sp).propagate(x)
        mods = dict(sp.named_modules())
        blocks = [b for b in _blocks(sp.graph) if isinstance(_plan(b, mods, 8), torch.nn.Module)]
        with torch.no_grad():
            vals: dict[Any, torch.Tensor] = {}

            def keep(n: Any, v: torch.Tensor, vals: dict = vals) -> torch.Tensor:
                vals[n] = v
                return v

            torch.fx.Interpreter(sp).run(x)  # warm
            interp = torch.fx.Interpreter(sp)
            orig = interp.run_node
            interp.run_node = lambda n, orig=orig: keep(n, orig(n))  # type: ignore[method-assign]
            interp.run(x)
        stage_of = {}
        for b in blocks:
            name = next(n.target for n in b[1:] if n.op == "call_module")
            stage_of[id(b)] = name.split(".")[0]
        per_stage: dict[str, list[float]] = {}
        with torch.no_grad():
            for b in blocks:
                xin = vals[b[0]]
                plain = block_module(sp, b)
                tiled = [_plan(b, mods, r) for r in rows_list]
                ref = plain(xin)
                for t in tiled:
                    err = (t(xin) - ref).abs().max().item()
                    assert err <= 1e-4 * max(1.0, ref.abs().max().item()), err
                fns = [lambda: plain(xin)] + [lambda t=t: t(xin) for t in tiled]
                for i, v in enumerate(minima(fns, rounds)):
                    per_stage.setdefault(stage_of[id(b)], [0.0] * len(fns))[i] += v
            whole = [sp]  # (depth_first=False: the native bottleneck op is bench_bottleneck.py's)
            labels = ["whole blocks"] + [f"tile_rows={r}" for r in rows_list]
            for r in rows_list:
                whole.append(fastprune.sparsify(model, example_inputs=(x[:1],), tile_rows=r))
            if batch > 1:
                whole.append(fastprune.sparsify(model, example_inputs=(x[:1],), micro_batch=1, depth_first=False))
                labels.append("micro_batch=1")
            ref = sp(x)
            for m in whole[1:]:
                assert (m(x) - ref).abs().max().item() <= 1e-4 * max(1.0, ref.abs().max().item())
            model_t = minima([lambda m=m: m(x) for m in whole], max(3, rounds // 2))
        for stage, ts in per_stage.items():
            best = min(range(1, len(ts)), key=lambda i: ts[i])
            table.append(
                [f"{sparsity:.0%}", batch, stage]
                + [f"{v * 1e3:.2f}" for v in ts]
                + ["", f"{ts[0] / ts[best]:.2f}x ({labels[best]})"]
            )
        best = min(range(1, len(model_t)), key=lambda i: model_t[i])
        table.append(
            [f"{sparsity:.0%}", batch, "whole model"]
            + [f"{v * 1e3:.2f}" for v in model_t[: 1 + len(rows_list)]]
            + [f"{model_t[-1] * 1e3:.2f}" if batch > 1 else "", f"{model_t[0] / model_t[best]:.2f}x ({labels[best]})"]
        )
        results.append(
            {
                "sparsity": sparsity,
                "batch": batch,
                "stages_ms": {s: dict(zip(labels, [v * 1e3 for v in ts], strict=False)) for s, ts in per_stage.items()},
                "model_ms": dict(zip(labels, [v * 1e3 for v in model_t], strict=True)),
            }
        )
        print(harness.markdown_table(_headers(rows_list), table[-len(per_stage) - 1 :]))
    md = harness.markdown_table(_headers(rows_list), table)
    print(md)
    harness.write_results(
        "depth_first",
        {"machine": info, "rows": rows_list, "rounds": rounds, "results": results},
        "ms (1 thread, process CPU time, minimum over alternating rounds); a stage is the sum of its "
        "residual blocks, each timed on its recorded input\n\n" + md,
    )


def _headers(rows_list: list[int]) -> list[str]:
    return (
        ["sparsity", "batch", "stage", "whole blocks ms"]
        + [f"rows {r} ms" for r in rows_list]
        + ["micro_batch=1 ms", "best vs whole"]
    )


if __name__ == "__main__":
    main()
