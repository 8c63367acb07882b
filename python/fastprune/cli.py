"""The ``fastprune`` command.

    fastprune demo [--out DIR] [--quick]
    fastprune methods
    fastprune prune MODEL --method magnitude --sparsity 0.9 -o OUT [--weights W.pt] [--scope global|layer] [--block 4]
    fastprune bench MODEL --input-shape 1,3,224,224 [--sparsity 0.9] [--block 4] [--weights W.pt]

MODEL is ``package.module:factory``: an importable function returning the ``nn.Module``.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import importlib
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

import torch
import torch.distributed as dist
from torch import nn
from torch.utils import benchmark

import fastprune
from fastprune import recipes
from fastprune.methods import ChannelConfig, spec_for
from fastprune.methods.registry import table
from fastprune.nn import sparsify, sparsify_decisions, sparsify_report
from fastprune.train import evaluate, fit

__all__ = ["UserError", "main"]


class UserError(Exception):
    """A mistake in the command line or its inputs: printed as one line ``fastprune: error: ...``, exit 2."""


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors as one line (no usage dump) and exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"fastprune: error: {message}\n")


def _shape(text: str) -> list[int]:
    try:
        dims = [int(t) for t in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated positive ints like 1,3,224,224, got {text!r}"
        ) from None
    if not dims or any(d < 1 for d in dims):
        raise argparse.ArgumentTypeError(f"every dimension must be >= 1, got {text!r}")
    return dims


def _number(
    convert: Callable[[str], float], ok: Callable[[float], bool], expected: str, rule: str
) -> Callable[[str], Any]:
    """An argparse type: ``convert`` the text, then check it (each failure one line naming the rule)."""

    def parse(text: str) -> Any:
        try:
            v = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if not ok(v):
            raise argparse.ArgumentTypeError(f"must be {rule}, got {text}")
        return v

    return parse


_positive_int = _number(int, lambda v: v >= 1, "a positive int", ">= 1")
_positive_float = _number(float, lambda v: 0 < v < float("inf"), "a number", "a finite number > 0")
_fraction = _number(float, lambda v: 0.0 <= v < 1.0, "a sparsity in [0, 1)", "in [0, 1)")


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _import_callable(spec: str, what: str) -> Any:
    """``package.module:name`` -> the callable it names (any failure of the import is one line)."""
    if not isinstance(spec, str) or ":" not in spec:
        raise UserError(f"{what} must be 'package.module:factory', got {spec!r}")
    mod_name, _, attr = spec.partition(":")
    sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(mod_name)
    except Exception as e:  # noqa: BLE001 - the user's module may raise anything while importing
        raise UserError(f"cannot import {mod_name!r}: {_one_line(e)}") from e
    finally:
        sys.path.pop(0)
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise UserError(f"{mod_name!r} has no callable {attr!r}")
    return factory


def _call_factory(spec: str, factory: Any) -> Any:
    try:
        return factory()
    except Exception as e:  # noqa: BLE001 - the user's factory may raise anything
        raise UserError(f"{spec} raised {_one_line(e)}") from e


def _load_factory(spec: str) -> nn.Module:
    model = _call_factory(spec, _import_callable(spec, "MODEL"))
    if isinstance(model, torch.jit.ScriptModule):
        raise UserError(
            "TorchScript models cannot be pruned or have their layers swapped in place; "
            "pass the eager nn.Module factory"
        )
    if not isinstance(model, nn.Module):
        raise UserError(f"{spec} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def _load_data(spec: str) -> Any:
    """``--data package.module:factory``: a function returning an iterable of batches (a DataLoader)."""
    data = _call_factory(spec, _import_callable(spec, "--data"))
    if not hasattr(data, "__iter__"):
        raise UserError(f"{spec} returned {type(data).__name__}, not an iterable of batches (a DataLoader)")
    return data


def _load_model(spec: str, weights: str | None) -> nn.Module:
    """The factory's model, with a (possibly pruned) state_dict loaded when given (weights_only)."""
    model = _load_factory(spec)
    if weights:
        try:
            state = torch.load(weights, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - report any load failure clearly
            raise UserError(f"cannot load weights {weights!r}: {_one_line(e)}") from e
        try:
            fastprune.load_pruned(model, state)
        except (ValueError, TypeError, RuntimeError) as e:
            raise UserError(f"weights {weights!r} do not fit {spec}: {_one_line(e)}") from e
    return model


def _check_output(path: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UserError(f"the output folder {folder!r} does not exist")
    if os.path.isdir(path):
        raise UserError(f"the output {path!r} is a folder; give a file name")


def _table(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(
            str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))
        )
        for r in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _stage(k: int, n: int, text: str) -> float:
    """One line per stage of the demo (visible when stderr is not a terminal and the bars are off)."""
    print(f"[{k}/{n}] {text}", flush=True)
    return time.perf_counter()


def cmd_demo(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    args.no_progress = args.no_progress or not sys.stderr.isatty()
    progress = not args.no_progress
    start = time.perf_counter()
    data = fastprune.data.digits(seed=0)
    epochs = 10 if args.quick else 30
    retrain = 8 if args.quick else 20
    print(f"digits: {len(data.train_y)} train / {len(data.test_y)} test images; LeNet-300-100-like MLP (64-300-100-10)")
    t0 = _stage(1, 5, "training the dense MLP")
    dense = recipes.train_dense(fastprune.models.lenet_300_100, data, epochs=epochs, progress=progress)
    dense_acc = evaluate(dense, data.test_loader())
    t_dense = time.perf_counter() - t0
    total = fastprune.sparsity_report(dense).numel
    rows = [
        ("method", "sparsity", "accuracy", "before retrain", "nonzero weights", "time s"),
        ("dense", "0.0%", f"{dense_acc:.2%}", "-", f"{total}", f"{t_dense:.1f}"),
    ]
    fisher = {"data": data.train_loader(), "num_grads": 256 if args.quick else 512}
    runs = (
        ("magnitude one-shot + retrain", recipes.one_shot, {}),
        ("magnitude iterative (4 steps)", recipes.iterative, {}),
        ("woodfisher one-shot + retrain", recipes.one_shot, {"method": "woodfisher", "method_kwargs": fisher}),
        ("woodfisher gradual (4 steps)", recipes.iterative, {"method": "woodfisher", "method_kwargs": fisher}),
    )
    kept: dict[str, nn.Module] = {}
    sparsities = (0.9,) if args.quick else (0.9, 0.95)
    _stage(2, 5, f"pruning it with {len(runs)} recipes at {', '.join(f'{s:.0%}' for s in sparsities)}, then retraining")
    for sparsity in sparsities:
        for name, fn, kw in runs:
            t0 = time.perf_counter()
            pruned, out = fn(dense, data, sparsity, retrain_epochs=retrain, progress=progress, **kw)
            kept[f"{name} {sparsity:.0%}"] = pruned
            rows.append(
                (
                    name,
                    f"{sparsity:.1%}",
                    f"{out.acc_retrained:.2%}",
                    f"{out.acc_pruned:.2%}",
                    f"{out.nonzero}",
                    f"{time.perf_counter() - t0:.1f}",
                )
            )
    print()
    print(_table(rows))
    print("(360 test images: one image is 0.28 points of accuracy)\n")
    seeds = (0, 1) if args.quick else (0, 1, 2)
    sweep = (0.5, 0.9, 0.98) if args.quick else (0.5, 0.7, 0.8, 0.9, 0.95, 0.98)
    _stage(3, 5, f"accuracy vs sparsity for the plot: {len(sweep)} sparsities x {len(seeds)} seeds, one-shot + retrain")
    dense_accs, curves = _accuracy_sweep(data, seeds, sweep, epochs, retrain, fisher, progress)
    path = os.path.join(args.out, "demo_accuracy.png")
    _plot_demo(path, dense_accs, curves)
    print(f"plot: {path}\n")
    _stage(4, 5, "structured pruning of the digits CNN")
    print(_table(_structured_demo(data, epochs, 3 if args.quick else 8, progress)))
    print()
    _stage(5, 5, "sparse execution")
    sparse_rows, noisy = _sparse_demo(data, dense, kept, quick=args.quick)
    print(_table(sparse_rows))
    if noisy:
        print(
            "* timings that varied more than 20 % between repeats: the machine is busy, read them as rough "
            "(benchmarks/bench_sparse.py measures properly)"
        )
    print(f"\ndemo done in {time.perf_counter() - start:.0f} s")
    return 0


def _accuracy_sweep(
    data: Any,
    seeds: Sequence[int],
    sparsities: Sequence[float],
    epochs: int,
    retrain: int,
    fisher: dict[str, Any],
    progress: bool,
) -> tuple[list[float], dict[str, dict[float, list[float]]]]:
    """Test accuracy after one-shot pruning + retraining, per method, sparsity and seed (dense per seed too)."""
    dense_accs: list[float] = []
    curves: dict[str, dict[float, list[float]]] = {"magnitude": {}, "woodfisher": {}}
    for seed in seeds:
        dense = recipes.train_dense(fastprune.models.lenet_300_100, data, epochs=epochs, seed=seed, progress=progress)
        dense_accs.append(evaluate(dense, data.test_loader()))
        for method, kw in (("magnitude", {}), ("woodfisher", {"method": "woodfisher", "method_kwargs": fisher})):
            for sparsity in sparsities:
                _, out = recipes.one_shot(
                    dense, data, sparsity, retrain_epochs=retrain, seed=seed, progress=progress, **kw
                )
                curves[method].setdefault(sparsity, []).append(out.acc_retrained)
    return dense_accs, curves


def _median_time(fn, repeats: int = 15) -> tuple[float, bool]:
    """(median seconds, noisy): noisy when the interquartile range of the repeats exceeds 20 % of
    the median (a busy machine)."""
    with torch.no_grad():
        for _ in range(3):
            fn()
        ts = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
    ts.sort()
    med = ts[len(ts) // 2]
    q1, q3 = ts[len(ts) // 4], ts[(3 * len(ts)) // 4]
    return med, (q3 - q1) > 0.2 * med


def _sparse_demo(
    data: Any, dense: nn.Module, pruned: dict[str, nn.Module], quick: bool
) -> tuple[list[tuple[str, ...]], bool]:
    """Sparse execution (fastprune.sparsify) of the pruned digits MLPs and of a ResNet-50-like model;
    also whether any timing was noisy."""
    side = 112 if quick else 224
    print(
        f"sparse execution: the pruned MLPs with every pruned layer sparse (one image, and the 360-image test set), "
        f"and a ResNet-50-like model (random weights, magnitude-pruned per layer to 90 %, first conv dense, "
        f"1 x 3 x {side} x {side}) through fastprune.sparsify with per-layer calibration; "
        f"{torch.get_num_threads()} thread(s)"
    )
    rows = [("model", "input", "dense ms", "sparse ms", "speedup", "sparse layers")]
    noisy = False
    one = data.test_x[:1]
    for name in [k for k in pruned if k.startswith("magnitude one-shot")]:
        model = pruned[name].eval()
        fastprune.finalize(model)
        sparse = sparsify(model, min_sparsity=0.5)  # every pruned layer sparse, to show the kernels on it
        for label, x in (("1 image", one), ("360 images", data.test_x)):
            td, nd = _median_time(lambda m=model, x=x: m(x))
            ts, ns = _median_time(lambda s=sparse, x=x: s(x))
            noisy = noisy or nd or ns
            rows.append(
                (
                    f"MLP, {name}",
                    label,
                    f"{1e3 * td:.3f}{'*' if nd else ''}",
                    f"{1e3 * ts:.3f}{'*' if ns else ''}",
                    f"{td / ts:.2f}x",
                    str(len(sparsify_report(sparse))),
                )
            )
    x = torch.randn(1, 3, side, side)
    # plain magnitude pruning, and block=4 (groups of 4 output channels share positions: the kernels
    # feed each input load to 4 rows)
    for label, block in (("unstructured", 1), ("4 rows share", 4)):
        torch.manual_seed(0)
        net = fastprune.models.resnet50().eval()
        fastprune.prune(net, "magnitude", sparsity=0.9, scope="layer", exclude="conv1", block=block)
        fastprune.finalize(net)
        sparse = sparsify(net, example_inputs=x)
        (td, nd), (ts, ns) = _median_time(lambda n=net: n(x), 7), _median_time(lambda s=sparse: s(x), 7)
        noisy = noisy or nd or ns
        rows.append(
            (
                f"ResNet-50-like, 90 %, {label}",
                f"1x3x{side}x{side}",
                f"{1e3 * td:.1f}{'*' if nd else ''}",
                f"{1e3 * ts:.1f}{'*' if ns else ''}",
                f"{td / ts:.2f}x",
                str(len(sparsify_report(sparse))),
            )
        )
    return rows, noisy


def _speed(base: float, t: float) -> str:
    """``1.73x faster`` or ``1.82x slower`` (never "0.55x faster")."""
    return f"{base / t:.2f}x faster" if t <= base else f"{t / base:.2f}x slower"


def _structured_demo(data: Any, epochs: int, finetune: int, progress: bool) -> list[tuple[str, ...]]:
    """Channel pruning of the digits CNN at 50 % by L1 filter norm and by NISP: compact models, the same
    short fine-tune, parameters, MACs and batch latency before and after (median of repeated runs)."""
    print(
        "digits CNN (conv-BN-ReLU stem, residual block, strided conv, pooling, Linear): 50 % of the channels "
        "removed by L1 filter norm and by NISP (Inf-FS on the classifier's inputs, propagated), compacted, then "
        f"fine-tuned {finetune} epochs; ASFP (40 % of the filters, asymptotic rate) trains the dense model "
        f"{finetune} epochs instead, zeroing after each (SGD restarted each epoch, as benchmarks/quality_sfp.py), "
        "then removes the zeroed channels; its 'before fine-tune' column is the zeroed model, what the paper reports"
    )
    dense = recipes.train_dense(fastprune.models.small_cnn, data, epochs=epochs, progress=progress).eval()
    x = torch.as_tensor(data.test_x[:1], dtype=torch.float32)
    batch = torch.as_tensor(data.test_x, dtype=torch.float32)

    def latency(m: nn.Module) -> float:
        with torch.no_grad():
            for _ in range(3):
                m(batch)
            ts = []
            for _ in range(15):
                t = time.perf_counter()
                m(batch)
                ts.append(time.perf_counter() - t)
        return sorted(ts)[len(ts) // 2]

    macs, params = fastprune.count(dense, x)
    t_dense = latency(dense)
    rows = [
        ("model", "accuracy", "before fine-tune", "params", "MACs / image", "latency (360 images)", "prune s"),
        (
            "dense",
            f"{evaluate(dense, data.test_loader()):.2%}",
            "-",
            f"{params}",
            f"{macs}",
            f"{1e3 * t_dense:.2f} ms",
            "-",
        ),
    ]
    for label, method, kw in (
        ("L1 filter, 50 % channels", "l1_filter", {}),
        ("NISP, 50 % channels", "nisp", {"data": data.train_loader(), "num_batches": 8}),
    ):
        model = copy.deepcopy(dense)
        t0 = time.perf_counter()
        fastprune.prune(model, method, sparsity=0.5, example_inputs=x, **kw)
        t_prune = time.perf_counter() - t0
        acc_pruned = evaluate(model, data.test_loader())
        torch.manual_seed(0)
        fit(model, data.train_loader(), epochs=finetune, lr=0.02, l2=1e-4, progress=progress, desc="fine-tune")
        model.eval()
        macs, params = fastprune.count(model, x)
        t = latency(model)
        rows.append(
            (
                label,
                f"{evaluate(model, data.test_loader()):.2%}",
                f"{acc_pruned:.2%}",
                f"{params}",
                f"{macs}",
                f"{1e3 * t:.2f} ms ({_speed(t_dense, t)})",
                f"{t_prune:.2f}",
            )
        )
    # ASFP trains the dense model for the same epochs, zeroing after each, then removes the channels
    model = copy.deepcopy(dense)
    t0 = time.perf_counter()
    sfp = fastprune.SoftFilterPruner(model, 0.4, example_inputs=x, epochs=finetune)
    sfp.on_start()
    t_prune = time.perf_counter() - t0
    for e in range(finetune):
        torch.manual_seed(e)
        fit(model, data.train_loader(), epochs=1, lr=0.02, l2=1e-4, progress=progress, desc=f"ASFP epoch {e + 1}")
        t0 = time.perf_counter()
        sfp.on_epoch_end(e)
        t_prune += time.perf_counter() - t0
    acc_zeroed = evaluate(model, data.test_loader())
    t0 = time.perf_counter()
    plan = sfp.finalize()
    t_prune += time.perf_counter() - t0
    model.eval()
    macs, params = fastprune.count(model, x)
    t = latency(model)
    exact = "exact" if plan.config["compaction_exact"] else f"approximate, max |diff| {plan.config['max_abs_diff']:.2g}"
    rows.append(
        (
            f"ASFP, 40 % filters ({plan.achieved_sparsity:.0%} removed, {exact})",
            f"{evaluate(model, data.test_loader()):.2%}",
            f"zeroed {acc_zeroed:.2%}",
            f"{params}",
            f"{macs}",
            f"{1e3 * t:.2f} ms ({_speed(t_dense, t)})",
            f"{t_prune:.2f}",
        )
    )
    return rows


def _plot_demo(path: str, dense_accs: list[float], curves: dict[str, dict[float, list[float]]]) -> None:
    """Accuracy vs sparsity, mean and standard deviation over seeds, the dense model as a labelled band."""
    import matplotlib  # optional (the demo extra), and slow to import: only for the plot

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after choosing the Agg backend

    def stats(v: list[float]) -> tuple[float, float]:
        t = torch.tensor(v, dtype=torch.float64) * 100
        return float(t.mean()), float(t.std()) if len(v) > 1 else 0.0

    fig, ax = plt.subplots(figsize=(7, 4.5))
    dm, ds = stats(dense_accs)
    ax.axhspan(dm - ds, dm + ds, color="gray", alpha=0.2, lw=0)
    ax.axhline(dm, color="gray", linestyle="--", lw=1)
    lows = [dm - ds]
    styles = {"magnitude": ("o", "tab:blue", -0.4), "woodfisher": ("s", "tab:orange", 0.4)}
    for name, by_s in curves.items():
        xs = sorted(by_s)
        ms = [stats(by_s[x]) for x in xs]
        marker, color, dx = styles.get(name, ("^", None, 0.0))
        ax.errorbar(
            [100 * x + dx for x in xs],
            [m for m, _ in ms],
            yerr=[e for _, e in ms],
            marker=marker,
            color=color,
            capsize=3,
            lw=1.5,
            ms=5,
            label=f"{name} one-shot + retrain",
        )
        lows += [m - e for m, e in ms]
    xmax = 100 * max(x for by_s in curves.values() for x in by_s)
    ax.text(xmax + 0.5, dm, f" dense {dm:.1f} %", va="center", ha="left", color="dimgray", fontsize=8)
    ax.set_xlim(100 * min(x for by_s in curves.values() for x in by_s) - 2, xmax + 7)
    ax.set_ylim(max(0.0, min(lows) - 2.0), 100.0)
    ax.set_xlabel("sparsity (% of weights removed)")
    ax.set_ylabel("test accuracy (%), mean +- std over seeds")
    n = len(dense_accs)
    ax.set_title(f"digits MLP (LeNet-300-100-like), {n} seed{'s' if n > 1 else ''}; 360 test images")
    ax.legend(loc="lower left", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _join_torchrun() -> bool:
    """Under torchrun (WORLD_SIZE > 1 in the environment) join its process group (NCCL with a GPU,
    gloo without); the data-driven methods then split their work across the ranks."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return True


class _Shard:
    """The batches ``i`` of a loader with ``i % world == rank``: this rank's shard (re-iterable)."""

    def __init__(self, data: Any, rank: int, world: int) -> None:
        self.data, self.rank, self.world = data, rank, world

    def __iter__(self) -> Any:
        for i, batch in enumerate(self.data):
            if i % self.world == self.rank:
                yield batch


def cmd_prune(args: argparse.Namespace) -> int:
    try:
        return _prune(args)
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def _prune(args: argparse.Namespace) -> int:
    args.scope_given = args.scope is not None
    args.scope = args.scope or "global"
    if args.method not in fastprune.method_names():
        raise UserError(f"unknown method {args.method!r}; known methods: {', '.join(fastprune.method_names())}")
    _check_output(args.output)
    config_cls = spec_for(args.method).config_cls
    needs_data = "data" in {f.name for f in dataclasses.fields(config_cls)}
    if needs_data and not args.data:
        raise UserError(
            f"method {args.method!r} reads data: pass --data package.module:factory (a function returning a "
            "DataLoader of (inputs, targets) batches)"
        )
    if args.data and not needs_data:
        raise UserError(f"method {args.method!r} reads no data; --data is for data-driven methods")

    distributed = _join_torchrun()
    model = _load_model(args.model, args.weights)
    kwargs: dict[str, Any] = {"sparsity": args.sparsity, "scope": args.scope}
    if needs_data:
        kwargs["data"] = _load_data(args.data)
        if distributed:  # each rank reads its shard: batch i goes to rank i % world
            kwargs["data"] = _Shard(kwargs["data"], fastprune.distributed.rank(), fastprune.distributed.world_size())
    structured = issubclass(config_cls, ChannelConfig)
    if structured:
        if not args.input_shape:
            raise UserError(f"method {args.method!r} removes channels and needs --input-shape (e.g. 1,3,224,224)")
        kwargs["example_inputs"] = torch.randn(*args.input_shape)
        kwargs["scope"] = args.scope if args.scope_given else "layer"
    if args.block != 1:
        if args.method != "magnitude":
            raise UserError("--block applies to --method magnitude")
        kwargs["block"] = args.block
    if args.include:
        kwargs["include"] = args.include
    if args.exclude:
        kwargs["exclude"] = args.exclude
    plan = fastprune.prune(model, args.method, **kwargs)  # its ValueError / TypeError: one line (main)
    if distributed and fastprune.distributed.rank() != 0:
        return 0  # every rank holds the same pruned model; rank 0 reports and writes it
    if structured:
        x = kwargs["example_inputs"]
        macs, params = fastprune.count(model, x)
        cov = plan.config.get("coverage", {})
        of = (
            f" ({cov['removable_channels']} of the model's {cov['all_channels']} channels are removable)"
            if cov.get("all_channels")
            else ""
        )
        print(
            f"{plan.method}: {plan.achieved_sparsity:.1%} of the removable channels removed{of}; now {params} "
            f"parameters, {macs} MACs for input {tuple(x.shape)}"
        )
    else:
        print(fastprune.sparsity_report(model))
    if args.finalize:
        fastprune.finalize(model)
    torch.save(model.state_dict(), args.output)
    plan.to_json(args.output + ".plan.json")
    print(f"\nwrote {args.output} (load with fastprune.load_pruned) and {args.output}.plan.json")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    """Dense vs sparsify() latency of a user's model on random inputs of --input-shape."""
    torch.set_num_threads(args.threads)
    model = _load_model(args.model, args.weights).eval()
    fastprune.finalize(model)
    layers = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    if not layers:
        raise UserError("the model has no Linear or Conv2d layers to run sparse")
    zeros = sum(int((m.weight == 0).sum()) for m in layers)
    total = sum(m.weight.numel() for m in layers)
    pruned_here = zeros / total < 0.5
    if pruned_here:  # dense weights: magnitude-prune each layer to --sparsity first
        fastprune.prune(model, "magnitude", sparsity=args.sparsity, scope="layer", block=args.block)
        fastprune.finalize(model)
    x = torch.randn(*args.input_shape)
    try:
        with torch.no_grad():
            want = model(x)
    except Exception as e:  # noqa: BLE001 - the user's model may raise anything on a wrong shape
        raise UserError(f"the model does not run on input shape {tuple(x.shape)}: {_one_line(e)}") from e
    sparse = sparsify(model, example_inputs=x[:1] if args.micro_batch else x, micro_batch=args.micro_batch)

    def t(fn) -> float:
        return float(
            benchmark.Timer(stmt="fn()", globals={"fn": fn}).blocked_autorange(min_run_time=args.min_run_time).median
        )

    with torch.no_grad():
        got = sparse(x)
        diff = float((got - want).abs().max() / want.abs().max().clamp_min(1e-30))
        t_dense, t_sparse = t(lambda: model(x)), t(lambda: sparse(x))
    zeros = sum(int((m.weight == 0).sum()) for m in layers)
    rows = [
        ("model", "weights sparsity", "sparse layers", "latency ms", "speedup"),
        ("dense (masked)", f"{zeros / total:.1%}", "0", f"{1e3 * t_dense:.2f}", "1.00x"),
        (
            "fastprune.sparsify",
            f"{zeros / total:.1%}",
            str(len(sparsify_report(sparse))),
            f"{1e3 * t_sparse:.2f}",
            f"{t_dense / t_sparse:.2f}x",
        ),
    ]
    print(
        f"input {tuple(x.shape)}, {args.threads} thread(s)"
        + (f", magnitude-pruned per layer to {args.sparsity:.0%}" if pruned_here else ", weights already sparse")
        + (f", sparse model run {args.micro_batch} sample(s) at a time" if args.micro_batch else "")
    )
    print(_table(rows))
    print(f"max |sparse - dense| / max |dense| = {diff:.2e}")
    if args.layers:
        print("\nper layer (what sparsify did, and why):")
        print(
            _table(
                [("layer", "sparsity", "sparse", "why")]
                + [
                    (d.name, f"{d.sparsity:.1%}", "yes" if d.swapped else "no", d.reason)
                    for d in sparsify_decisions(sparse)
                ]
            )
        )
    return 0


def cmd_methods(args: argparse.Namespace) -> int:
    """The registered methods (fastprune.methods), one line each."""
    print(table())
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="fastprune", description="Prune neural networks fast.")
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="train the digits MLP, prune it (magnitude, WoodFisher), print a table")
    d.add_argument("--out", default="fastprune-demo", help="folder for the plot (default: ./fastprune-demo)")
    d.add_argument("--quick", action="store_true", help="fewer epochs")
    d.add_argument("--threads", type=_positive_int, default=2)
    d.add_argument(
        "--no-progress", action="store_true", help="no progress bars (the default when stderr is not a terminal)"
    )
    d.set_defaults(func=cmd_demo)
    m = sub.add_parser("methods", help="list the pruning methods (name, config class, description)")
    m.set_defaults(func=cmd_methods)
    q = sub.add_parser("prune", help="prune a model given as package.module:factory")
    q.add_argument("model", help="package.module:factory returning the nn.Module")
    q.add_argument("--method", default="magnitude", help="a registered method (see: fastprune methods)")
    q.add_argument("--sparsity", type=_fraction, required=True, help="in [0, 1)")
    q.add_argument(
        "--scope",
        choices=["global", "layer"],
        default=None,
        help="global (default for weight pruning) or layer (default for channel methods)",
    )
    q.add_argument(
        "--input-shape", type=_shape, help="example input shape for channel (structured) methods, e.g. 1,3,224,224"
    )
    q.add_argument(
        "--data",
        help="package.module:factory returning a DataLoader of (inputs, targets) batches, for methods that read "
        "data (woodfisher, fisher_diag)",
    )
    q.add_argument(
        "--block",
        type=_positive_int,
        default=1,
        help="magnitude: prune groups of this many output channels together (4: rows that share a pattern, "
        "about 2x faster sparse kernels at 90 %%)",
    )
    q.add_argument("--include", nargs="*", help="module names or glob patterns")
    q.add_argument("--exclude", nargs="*", help="module names or glob patterns")
    q.add_argument("--weights", help="state_dict to load first (torch.load weights_only=True)")
    q.add_argument("--finalize", action="store_true", help="save plain weights (masks made permanent)")
    q.add_argument("-o", "--output", required=True, help="where to write the pruned state_dict")
    q.set_defaults(func=cmd_prune)
    b = sub.add_parser("bench", help="time a model dense vs sparse (fastprune.sparsify) on random inputs")
    b.add_argument("model", help="package.module:factory returning the nn.Module")
    b.add_argument("--input-shape", required=True, type=_shape, help="e.g. 1,3,224,224")
    b.add_argument(
        "--sparsity", type=_fraction, default=0.9, help="per-layer magnitude pruning when the weights are dense"
    )
    b.add_argument(
        "--block",
        type=_positive_int,
        default=1,
        help="with dense weights: magnitude-prune groups of this many output channels together",
    )
    b.add_argument("--weights", help="state_dict to load first (torch.load weights_only=True)")
    b.add_argument(
        "--layers", action="store_true", help="also list every layer: swapped or not, and why (measured times)"
    )
    b.add_argument(
        "--micro-batch",
        type=_positive_int,
        default=None,
        help="run the sparse model this many samples at a time (models proven per-sample only)",
    )
    b.add_argument("--threads", type=_positive_int, default=1)
    b.add_argument("--min-run-time", type=_positive_float, default=1.0, help="seconds per timing (> 0)")
    b.set_defaults(func=cmd_bench)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; a user error (bad arguments, a model or file that does not fit, a value a
    method refuses) is one line on stderr, ``fastprune: error: ...``, and exit status 2."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except UserError as e:
        message = str(e)
    except (ValueError, TypeError) as e:  # fastprune's own checks name the argument
        message = _one_line(e) if not str(e) else " ".join(str(e).split())
    except OSError as e:
        message = _one_line(e)
    print(f"fastprune: error: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
