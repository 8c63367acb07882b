"""Sparse inference against DeepSparse: ResNet-50 (90 / 95 %, batch 1 and 8) and BERT-base (90 %,
sequence 128, batch 1) on the same pruned weights, every runtime in its own process.

Runtimes: dense torch (NCHW and channels-last for ResNet-50; for BERT F.linear and oneDNN's Linear
through ``torch.utils.mkldnn``, since MKL runs AVX2 code on AMD CPUs: the best one is the baseline), torch.compile of
the dense model, fastprune (``sparsify`` with its per-layer calibration; and the same under
``torch.compile``), DeepSparse 1.8 and ONNX Runtime (dense) from the exported ONNX file, run by
``onnx_worker.py`` in their own venv (``--onnx-python``; ``make bench`` builds it when the registry
has DeepSparse, else these columns are skipped with a message).

Fairness: one runtime per process (DeepSparse's and ONNX Runtime's threads spin); all of a cell's
processes load and warm up first, then run alternating rounds, each process stopped (SIGSTOP)
while the others are timed; process CPU time and wall time per inference, medians over the rounds;
the load average is printed per round. Each runtime's output checksum is compared with dense
torch's, so a runtime that computed something else cannot win.

    python benchmarks/bench_vs_deepsparse.py [--quick] [--no-compile] [--onnx-python PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import signal
import statistics
import subprocess
import sys
from typing import Any

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import harness  # noqa: E402
from onnx_worker import serve  # noqa: E402  (the same protocol for every runtime)

ROOT = pathlib.Path(__file__).resolve().parents[1]
CACHE = ROOT / "build" / "bench_vs_deepsparse"
DEFAULT_ONNX_PYTHON = ROOT / "build" / "ds-venv" / "bin" / "python"
TORCH_RUNTIMES = ["dense", "dense-cl", "dense-onednn", "dense-compile", "fastprune", "fastprune-compile"]
ONNX_RUNTIMES = ["deepsparse", "onnxruntime"]
CELLS = [("resnet50", 0.9, 1), ("resnet50", 0.9, 8), ("resnet50", 0.95, 1), ("resnet50", 0.95, 8), ("bert", 0.9, 1)]


# ---- models, inputs, exports (the driver makes them once; every process loads the same files) ----


def architecture(kind: str) -> Any:
    """ResNet-50 (fastprune.models) or BERT-base's encoder (transformers config), random weights."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    if kind == "resnet50":
        from fastprune.models import resnet50

        return resnet50().eval()
    import transformers

    class Encoder(nn.Module):  # BERT-base, its last hidden state as the output
        def __init__(self) -> None:
            super().__init__()
            self.bert = transformers.BertModel(transformers.BertConfig(), add_pooling_layer=False)

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            return self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    return Encoder().eval()


def build_model(kind: str, sparsity: float) -> Any:
    """The architecture magnitude-pruned per layer: every conv but the stem, and the fc (ResNet-50);
    every Linear of the encoder (BERT)."""
    import fastprune

    model = architecture(kind)
    if kind == "resnet50":
        fastprune.prune(model, "magnitude", sparsity=sparsity, scope="layer", exclude="conv1")
    else:
        fastprune.prune(model, "magnitude", sparsity=sparsity, include="bert.encoder", scope="layer")
    fastprune.finalize(model)
    return model


def make_inputs(kind: str, batch: int) -> tuple:
    import torch

    g = torch.Generator().manual_seed(1)
    if kind == "resnet50":
        return (torch.randn(batch, 3, 224, 224, generator=g),)
    ids = torch.randint(0, 30522, (batch, 128), generator=g)
    return ids, torch.ones(batch, 128, dtype=torch.long)


def model_name(kind: str, sparsity: float) -> str:
    return f"{kind}-{round(sparsity * 100)}"


def prepare(kind: str, sparsity: float, batch: int, want_onnx: bool) -> dict[str, pathlib.Path]:
    import numpy as np
    import torch

    CACHE.mkdir(parents=True, exist_ok=True)
    name = model_name(kind, sparsity)
    weights, onnx_path = CACHE / f"{name}.pt", CACHE / f"{name}.onnx"
    inputs_pt, inputs_npz = CACHE / f"{name}-b{batch}.inputs.pt", CACHE / f"{name}-b{batch}.inputs.npz"
    if not weights.exists() or (want_onnx and not onnx_path.exists()):
        model = build_model(kind, sparsity)
        torch.save(model.state_dict(), weights)
        if want_onnx:
            example = make_inputs(kind, 1)
            names = ["x"] if kind == "resnet50" else ["input_ids", "attention_mask"]
            torch.onnx.export(
                model,
                example,
                str(onnx_path),
                input_names=names,
                output_names=["y"],
                dynamic_axes={n: {0: "batch"} for n in [*names, "y"]},
                opset_version=17,
                dynamo=False,
            )
    inputs = make_inputs(kind, batch)
    torch.save(inputs, inputs_pt)
    np.savez(inputs_npz, **{f"{i:02d}": t.numpy() for i, t in enumerate(inputs)})
    return {"weights": weights, "onnx": onnx_path, "inputs_pt": inputs_pt, "inputs_npz": inputs_npz}


# ---- the torch worker (same protocol as onnx_worker.py) ----


def torch_worker(runtime: str, kind: str, sparsity: float, threads: int, weights: str, inputs_pt: str) -> None:
    import torch

    import fastprune

    torch.set_num_threads(threads)
    model = architecture(kind)
    model.load_state_dict(torch.load(weights))
    inputs = torch.load(inputs_pt)
    note = ""
    layout: dict[str, Any] = {}
    with torch.no_grad():
        if runtime == "dense-cl":
            model = model.to(memory_format=torch.channels_last)
            inputs = tuple(t.to(memory_format=torch.channels_last) if t.dim() == 4 else t for t in inputs)
        elif runtime == "dense-onednn":  # every Linear through oneDNN (in and out as dense tensors)
            import torch.utils.mkldnn

            model = torch.utils.mkldnn.to_mkldnn(model)
        elif runtime == "dense-compile":
            model = torch.compile(model)
        elif runtime.startswith("fastprune"):
            model = fastprune.sparsify(model, example_inputs=inputs)
            dec = fastprune.sparsify_decisions(model)
            note = f"{sum(d.swapped for d in dec)} of {len(dec)} layers sparse"
            # what the calibration decided, for the JSON: which layers stayed dense and why, which
            # blocks were fused (a run that is slower than the others can be traced to a decision)
            layout = {
                "dense_layers": {d.name: d.reason for d in dec if not d.swapped},
                "fused_bottlenecks": dict(getattr(model, "fused_bottlenecks", {})),
                "fused_ffn": list(getattr(model, "fused_ffn", [])),
                "fused_attention": getattr(model, "fused_attention", ""),
            }
            if runtime == "fastprune-compile":
                model = torch.compile(model)

        def run() -> Any:
            return model(*inputs)

        out = run()
        for _ in range(2):
            run()
        serve(run, {"ready": True, "note": note, "checksum": float(out.abs().sum()), **layout})


# ---- the driver ----


class Worker:
    def __init__(self, runtime: str, cmd: list[str], env: dict[str, str]) -> None:
        self.runtime = runtime
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self.ready: dict[str, Any] | None = None
        self.wall: list[float] = []
        self.cpu: list[float] = []

    def wait_ready(self) -> bool:
        line = self.proc.stdout.readline() if self.proc.stdout else ""
        if not line:
            self.proc.wait()
            return False
        self.ready = json.loads(line)
        os.kill(self.proc.pid, signal.SIGSTOP)
        return True

    def round(self, reps: int) -> None:
        assert self.proc.stdin and self.proc.stdout
        os.kill(self.proc.pid, signal.SIGCONT)
        self.proc.stdin.write(f"{reps}\n")
        self.proc.stdin.flush()
        got = json.loads(self.proc.stdout.readline())
        os.kill(self.proc.pid, signal.SIGSTOP)
        self.wall += got["wall"]
        self.cpu += got["cpu"]

    def close(self) -> None:
        os.kill(self.proc.pid, signal.SIGCONT)
        try:
            if self.proc.stdin:
                self.proc.stdin.write("\n")
                self.proc.stdin.flush()
            self.proc.wait(timeout=60)
        except (BrokenPipeError, subprocess.TimeoutExpired):
            self.proc.kill()


def run_cell(kind: str, sparsity: float, batch: int, threads: int, args: argparse.Namespace) -> dict[str, Any]:
    onnx_python = pathlib.Path(args.onnx_python)
    have_onnx = onnx_python.exists()
    files = prepare(kind, sparsity, batch, have_onnx)
    env = dict(os.environ, **harness.MALLOC_ENV, OMP_NUM_THREADS=str(threads))
    # (ResNet-50's convs are oneDNN's already; BERT has no images to lay out channels-last)
    runtimes = [r for r in TORCH_RUNTIMES if r != ("dense-cl" if kind == "bert" else "dense-onednn")]
    if args.no_compile or model_name(kind, sparsity) + f"-{batch}" not in args.compile_cells.split(","):
        runtimes = [r for r in runtimes if not r.endswith("compile")]
    workers = []
    for r in runtimes:
        cmd = [sys.executable, __file__, "--worker", r, "--kind", kind, "--sparsity", str(sparsity)]
        cmd += ["--threads", str(threads), "--weights", str(files["weights"]), "--inputs-pt", str(files["inputs_pt"])]
        workers.append(Worker(r, cmd, env))
        if not workers[-1].wait_ready():
            print(f"  {r}: failed to start", flush=True)
            workers.pop()
    if have_onnx:
        worker = str(pathlib.Path(__file__).resolve().parent / "onnx_worker.py")
        for r in ONNX_RUNTIMES:
            cmd = [str(onnx_python), worker, r, str(files["onnx"]), "--inputs", str(files["inputs_npz"])]
            workers.append(Worker(r, [*cmd, "--threads", str(threads)], env))
            if not workers[-1].wait_ready():
                print(f"  {r}: failed to start (see its output above)", flush=True)
                workers.pop()
    loads = []
    try:
        for i in range(args.rounds):
            loads.append(os.getloadavg()[0])
            order = workers[i % len(workers) :] + workers[: i % len(workers)]
            for w in order:
                w.round(args.reps)
            print(f"  round {i + 1}/{args.rounds} done, load average {loads[-1]:.2f}", flush=True)
    finally:
        for w in workers:
            w.close()
    ref = next(w.ready["checksum"] for w in workers if w.runtime == "dense")
    res: dict[str, Any] = {}
    for w in workers:
        assert w.ready is not None
        agree = abs(w.ready["checksum"] - ref) <= 1e-3 * abs(ref)
        res[w.runtime] = {
            "cpu_ms": 1e3 * statistics.median(w.cpu),
            "wall_ms": 1e3 * statistics.median(w.wall),
            "checksum": w.ready["checksum"],
            "agrees_with_dense": agree,
            "note": w.ready.get("note", ""),
            "version": w.ready.get("version"),
            **{
                k: w.ready[k]
                for k in ("dense_layers", "fused_bottlenecks", "fused_ffn", "fused_attention")
                if k in w.ready
            },
        }
        if not agree:
            print(f"  WARNING {w.runtime}: output checksum {w.ready['checksum']:.6g} vs dense {ref:.6g}", flush=True)
    return {"model": kind, "sparsity": sparsity, "batch": batch, "threads": threads, "load": loads, "runtimes": res}


def fmt(r: dict[str, Any] | None, key: str) -> str:
    return "-" if r is None else f"{r[key]:.1f}"


def main() -> None:
    harness.ensure_malloc_env()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worker", choices=TORCH_RUNTIMES)
    ap.add_argument("--kind")
    ap.add_argument("--sparsity", type=float)
    ap.add_argument("--weights")
    ap.add_argument("--inputs-pt")
    ap.add_argument("--threads", type=int, default=1, help="(worker) threads")
    ap.add_argument("--onnx-python", default=str(DEFAULT_ONNX_PYTHON), help="python of the DeepSparse venv")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--reps", type=int, default=3, help="inferences per process per round")
    ap.add_argument("--quick", action="store_true", help="batch-1 cells only, 2 rounds")
    ap.add_argument("--only", help="cells of this model only (resnet50 or bert); the results files are not written")
    ap.add_argument("--no-compile", action="store_true", help="leave out the torch.compile runtimes")
    ap.add_argument(
        "--compile-cells",
        default="bert-90-1",
        help="cells that also run the torch.compile runtimes (compiling ResNet-50 takes minutes per cell "
        "here and gained 2 %% dense, 6 %% fastprune at 90 %% batch 1)",
    )
    ap.add_argument(
        "--two-thread-cells", default="resnet50-90-1,bert-90-1", help="cells also run at 2 threads ('' for none)"
    )
    args = ap.parse_args()
    if args.worker:
        torch_worker(args.worker, args.kind, args.sparsity, args.threads, args.weights, args.inputs_pt)
        return
    if not pathlib.Path(args.onnx_python).exists():
        print(
            f"DeepSparse / ONNX Runtime venv not found at {args.onnx_python} (make bench builds it when the "
            "package registry has deepsparse 1.8.0): their columns are skipped",
            flush=True,
        )
    cells = [(k, s, b, 1) for k, s, b in CELLS if not (args.quick and b > 1)]
    two = set(filter(None, args.two_thread_cells.split(",")))
    cells += [(k, s, b, 2) for k, s, b in CELLS if f"{model_name(k, s)}-{b}" in two]
    if args.only:
        cells = [c for c in cells if c[0] == args.only]
    if args.quick:
        args.rounds = 2
    info = harness.machine_info(1)
    print(f"{info['cpu']}, torch {info['torch']}, git {info['git_sha']}", flush=True)
    results = []
    for kind, sp, batch, threads in cells:
        print(f"{model_name(kind, sp)} batch {batch}, {threads} thread(s):", flush=True)
        results.append(run_cell(kind, sp, batch, threads, args))
        rt = results[-1]["runtimes"]
        print(
            "  " + ", ".join(f"{k} {v['cpu_ms']:.1f} ms cpu / {v['wall_ms']:.1f} wall" for k, v in rt.items()),
            flush=True,
        )
    rows = []
    for r in results:
        rt = r["runtimes"]
        key = "cpu_ms" if r["threads"] == 1 else "wall_ms"
        dense_opts = {k: rt[k] for k in ("dense", "dense-cl", "dense-onednn") if k in rt}
        dense_name, dense = min(dense_opts.items(), key=lambda kv: kv[1][key])
        fp_opts = {k: rt[k] for k in ("fastprune", "fastprune-compile") if k in rt}
        fp_name, fp = min(fp_opts.items(), key=lambda kv: kv[1][key])
        ds = rt.get("deepsparse")
        rows.append(
            [
                f"{'ResNet-50' if r['model'] == 'resnet50' else 'BERT-base seq 128'} {r['sparsity']:.0%}",
                r["batch"],
                r["threads"],
                "cpu" if key == "cpu_ms" else "wall",
                f"{dense[key]:.1f} ({dense_name})",
                fmt(rt.get("dense-compile"), key),
                f"{fp[key]:.1f} ({fp_name}; {fp['note']})",
                fmt(ds, key),
                fmt(rt.get("onnxruntime"), key),
                f"{dense[key] / fp[key]:.2f}x",
                "-" if ds is None else f"{ds[key] / fp[key]:.2f}x",
                f"{statistics.mean(r['load']):.2f}",
            ]
        )
    headers = [
        "model",
        "batch",
        "threads",
        "time",
        "dense torch ms",
        "torch.compile ms",
        "fastprune ms",
        "DeepSparse ms",
        "ONNX Runtime ms",
        "fastprune vs dense",
        "fastprune vs DeepSparse",
        "load",
    ]
    table = harness.markdown_table(headers, rows)
    print(table)
    note = (
        "\n\nms per inference, medians over alternating rounds, one runtime per process (the others stopped); "
        "'cpu' = process CPU time (1 thread), 'wall' for 2 threads. dense torch = the best of NCHW and "
        "channels-last (ResNet-50), F.linear and oneDNN's Linear (BERT). Ratios > 1: fastprune faster.\n"
    )
    if args.only:
        return
    name = "vs_deepsparse_quick" if args.quick else "vs_deepsparse"
    payload = {"machine": info, "rounds": args.rounds, "reps": args.reps, "cells": results}
    jpath, mpath = harness.write_results(name, payload, table + note)
    print(f"wrote {jpath} and {mpath}")


if __name__ == "__main__":
    main()
