"""One ONNX runtime (DeepSparse or ONNX Runtime) on one exported model, driven by bench_vs_deepsparse.py.

Runs in the runtime's own venv (DeepSparse pins an old numpy and onnx: it cannot share the torch
venv), so it imports neither torch nor fastprune. Protocol on stdin/stdout, one JSON line each:
it prints {"ready": ...} once the model is compiled and warmed up, then for every line "N" it reads
it runs N inferences and prints their wall and process-CPU seconds; an empty line ends it. Between
rounds the driver stops it (SIGSTOP), so that its idle threads cannot spin while others are timed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np


def serve(run: Callable[[], object], ready: dict[str, Any]) -> None:
    """The protocol: print ``ready``, then per line "N" time N calls of ``run`` (also the torch
    worker's, bench_vs_deepsparse.py)."""
    print(json.dumps(ready), flush=True)
    for line in sys.stdin:
        if not line.strip():
            break
        wall, cpu = [], []
        for _ in range(int(line)):
            w, c = time.perf_counter(), time.process_time()
            run()
            wall.append(time.perf_counter() - w)
            cpu.append(time.process_time() - c)
        print(json.dumps({"wall": wall, "cpu": cpu}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("runtime", choices=["deepsparse", "onnxruntime"])
    ap.add_argument("model")
    ap.add_argument("--inputs", required=True, help="a .npz file of the model's inputs, in order")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    data = np.load(args.inputs)
    inputs = [data[k] for k in sorted(data.files)]
    if args.runtime == "deepsparse":
        import deepsparse

        engine = deepsparse.compile_model(args.model, batch_size=int(inputs[0].shape[0]), num_cores=args.threads)

        def run() -> object:
            return engine.run(inputs)

        version = deepsparse.__version__
    else:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = args.threads
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        sess = ort.InferenceSession(args.model, opts, providers=["CPUExecutionProvider"])
        names = [i.name for i in sess.get_inputs()]
        feed = dict(zip(names, inputs, strict=True))

        def run() -> object:
            return sess.run(None, feed)

        version = ort.__version__
    out = run()
    for _ in range(2):
        run()
    first = np.asarray(out[0])
    serve(run, {"ready": True, "version": version, "checksum": float(np.abs(first).sum())})


if __name__ == "__main__":
    main()
