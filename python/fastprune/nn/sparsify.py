"""``sparsify(model)``: fold eval-mode BatchNorm into the preceding conv, then swap every Linear/Conv2d
that is sparse enough for its CSR form (:class:`SparseLinear`, :class:`SparseConv2d`).

Which layers are swapped: those with at least ``min_sparsity`` zeros when it is given; otherwise,
with ``example_inputs``, those measured faster sparse than dense on their own input shape (a
per-layer calibration: interleaved rounds, a 10 % margin, the table below when timing cannot tell);
otherwise a table of the break-even sparsities measured by
``benchmarks/bench_sparse.py`` on this class of machine. The result computes what the dense (masked)
model computed, to float rounding. ``sparsify_decisions(model)`` says, per layer, what was done and
why. Models FX cannot trace (HuggingFace's) get their layers swapped without fusion; run the result
under ``torch.compile``, which takes the sparse ops whole (custom ops with fake kernels) and fuses the
dense remainder.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from fastprune._modes import eval_mode
from fastprune.masks import detach_masked_weights, finalize
from fastprune.nn.attention import torch_fast_paths_off
from fastprune.nn.fuse import (
    channels_last_pools,
    fuse_activations,
    fuse_attention,
    fuse_bottlenecks,
    fuse_ffn,
    graph_tracer,
    swap_max_pools,
)
from fastprune.nn.microbatch import MicroBatch, check_rows, check_size, prove_per_sample
from fastprune.nn.microbatch import tile_rows as tile_rows_pass
from fastprune.nn.sparse import SparseConv2d, SparseLinear
from fastprune.structure import handlers as H
from fastprune.structure.trace import Ref, structure_tracer, trace

__all__ = ["SwapDecision", "sparsify", "sparsify_decisions", "sparsify_report"]

# Break-even sparsity without calibration (bench_sparse.py, 1 thread, AMD Zen 4, unstructured
# weights): Linear 4096 breaks even near 50 %, Linear 2048 -> 1000 at batch 1 near 75 %, ResNet-50's
# conv layers between 50 % (0.79-1.07x) and 70 % (1.18-1.96x). Rows sharing patterns break even lower.
DEFAULT_MIN_SPARSITY = {"linear": 0.7, "conv": 0.6}


def _fold_bn(model: nn.Module, example_inputs: tuple | None) -> list[str]:
    """Fold every eval BatchNorm2d that directly follows a Conv2d (whose output nothing else reads)."""
    try:
        g = structure_tracer(H.is_handled).trace(model)
        nodes = list(g.nodes)
        users = {n: list(n.users) for n in nodes}
        pairs = []
        for n in nodes:
            if n.op != "call_module" or not isinstance(model.get_submodule(n.target), nn.BatchNorm2d):
                continue
            src = n.args[0] if n.args else None
            if (
                getattr(src, "op", None) == "call_module"
                and isinstance(model.get_submodule(src.target), nn.Conv2d)
                and len(users[src]) == 1
            ):
                pairs.append((src.target, n.target))
    except Exception:  # noqa: BLE001 - untraceable: the recorded run (needs inputs), else no folding
        if example_inputs is None:
            return []
        graph = trace(model, example_inputs, H.is_handled)
        uses: dict[int, int] = {}
        for node in graph.nodes:
            for a in (*node.args, *node.kwargs.values()):
                for r in a if isinstance(a, (list, tuple)) else [a]:
                    if isinstance(r, Ref):
                        uses[r.node] = uses.get(r.node, 0) + 1
        pairs = []
        for node in graph.nodes:
            if node.op == "module" and isinstance(model.get_submodule(node.target), nn.BatchNorm2d):
                src = node.args[0] if node.args else None
                if (
                    isinstance(src, Ref)
                    and graph.nodes[src.node].op == "module"
                    and uses.get(src.node) == 1
                    and isinstance(model.get_submodule(graph.nodes[src.node].target), nn.Conv2d)
                ):
                    pairs.append((graph.nodes[src.node].target, node.target))
    counts: dict[str, int] = {}
    for conv_name, _ in pairs:
        counts[conv_name] = counts.get(conv_name, 0) + 1
    folded = []
    for conv_name, bn_name in pairs:
        conv, bn = model.get_submodule(conv_name), model.get_submodule(bn_name)
        if counts[conv_name] != 1 or bn.running_mean is None:
            continue  # a conv called twice, or BN without running statistics: leave it alone
        with torch.no_grad():
            scale = (bn.weight if bn.affine else torch.ones_like(bn.running_var)) / torch.sqrt(bn.running_var + bn.eps)
            shift = (bn.bias if bn.affine else torch.zeros_like(bn.running_mean)) - bn.running_mean * scale
            w = conv.weight * scale.reshape(-1, 1, 1, 1)
            b = shift if conv.bias is None else conv.bias * scale + shift
            conv.weight = nn.Parameter(w)
            conv.bias = nn.Parameter(b)
        model.set_submodule(bn_name, nn.Identity())
        folded.append(bn_name)
    return folded


# The calibration: interleaved rounds (sparse, dense, sparse, ...), each side's minimum wall time;
# sparse is taken only when it is faster by more than CALIBRATION_MARGIN, dense kept only when it is
# not faster at all, and a layer whose two minima lie within the margin (timing cannot tell them
# apart on a busy machine) gets more rounds, then the sparsity table's verdict: so the choice flips
# only where the noise exceeds the margin (one-shot timings swapped a different number of ResNet-50
# layers from run to run under load).
CALIBRATION_MARGIN = 0.1
CALIBRATION_ROUNDS = (5, 15)  # rounds first, rounds at most


@dataclass(frozen=True)
class SwapDecision:
    """Why ``sparsify`` did or did not swap one layer (``sparsify_decisions(model)``)."""

    name: str
    kind: str  # "linear" or "conv"
    sparsity: float
    swapped: bool
    reason: str
    dense_ms: float | None = None  # calibration minima, when timed
    sparse_ms: float | None = None


def _interleaved_minima(fns: list[Any], rounds: int, clock: Any = time.perf_counter) -> list[float]:
    best = [float("inf")] * len(fns)
    for _ in range(rounds):
        for i, fn in enumerate(fns):
            t = clock()
            fn()
            best[i] = min(best[i], clock() - t)
    return best


def _calibrate(
    sparse_fn: Any, dense_fn: Any, table_says: bool, clock: Any = time.perf_counter
) -> tuple[bool, str, float, float]:
    sparse_fn(), dense_fn()  # warm-up: caches, the kernels' derived data
    first, most = CALIBRATION_ROUNDS
    s_t = d_t = float("inf")
    done = 0
    while True:
        rounds = first if done == 0 else most - done
        s, d = _interleaved_minima([sparse_fn, dense_fn], rounds, clock)
        done += rounds
        s_t, d_t = min(s_t, s), min(d_t, d)
        if s_t * (1 + CALIBRATION_MARGIN) < d_t:
            return True, f"timed faster sparse ({s_t * 1e3:.3f} vs {d_t * 1e3:.3f} ms dense)", s_t, d_t
        if s_t >= d_t:
            return False, f"timed slower sparse ({s_t * 1e3:.3f} vs {d_t * 1e3:.3f} ms dense)", s_t, d_t
        if done >= most:
            verdict = "swapped" if table_says else "kept dense"
            return (
                table_says,
                f"timings within {CALIBRATION_MARGIN:.0%} ({s_t * 1e3:.3f} vs {d_t * 1e3:.3f} ms dense): "
                f"{verdict} by the sparsity table",
                s_t,
                d_t,
            )


def _bottleneck_decider(timed: bool) -> Any:
    """fuse_bottlenecks' verdict: timed like a layer swap (fused taken unless timed slower: it does
    the same work with fewer calls and less memory traffic), or, untimed, always."""

    def decide(fused: Any, unfused: Any) -> tuple[bool, str]:
        if not timed:
            return True, "untimed (min_sparsity given)"
        fused(), unfused()
        f_t, u_t = _interleaved_minima([fused, unfused], CALIBRATION_ROUNDS[0])
        if f_t > u_t * (1 + CALIBRATION_MARGIN):
            return False, f"timed slower ({f_t * 1e3:.3f} vs {u_t * 1e3:.3f} ms as three calls)"
        return True, f"timed {f_t * 1e3:.3f} vs {u_t * 1e3:.3f} ms as three calls"

    return decide


def _weight_readers(model: nn.Module) -> dict[str, str]:
    """Linear layers whose parent reads their weight tensor instead of calling them (a sparse layer
    has none): name -> why they stay dense."""
    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, nn.MultiheadAttention):
            out[f"{name}.out_proj" if name else "out_proj"] = (
                "nn.MultiheadAttention reads out_proj.weight itself (fastprune.nn.swap_attention(model) first "
                "makes its projections Linears that can be sparse)"
            )
    return out


def _attention_decider(timed: bool) -> Any:
    """fuse_attention's verdict: the whole model timed both ways (fastprune's attention taken unless
    slower by more than the calibration margin: the same function, measured 2.0-2.4x faster alone on
    Zen 5), or,
    untimed, always."""

    def decide(ours: Any, sdpa: Any) -> tuple[bool, str]:
        if not timed:
            return True, "untimed (min_sparsity given)"
        ours(), sdpa()
        o_t, s_t = _interleaved_minima([ours, sdpa], CALIBRATION_ROUNDS[0])
        verdict = f"the model timed {o_t * 1e3:.2f} vs {s_t * 1e3:.2f} ms with torch's SDPA"
        return o_t <= s_t * (1 + CALIBRATION_MARGIN), verdict

    return decide


def sparsify(
    model: nn.Module,
    min_sparsity: float | None = None,
    example_inputs: Any = None,
    *,
    inplace: bool = False,
    fold_bn: bool = True,
    fuse: bool = True,
    micro_batch: int | None = None,
    tile_rows: int | None = None,
    depth_first: bool = True,
) -> nn.Module:
    """Sparse execution of a pruned model (see the module docstring).

    Args:
        model: any module; pruned weights may carry torch prune masks (they are made permanent).
        min_sparsity: swap every Linear/Conv2d with at least this fraction of zeros (tests pass it
            explicitly so that they never depend on timing).
        example_inputs: a tensor or tuple; enables the per-layer timing calibration and lets BN
            folding trace models FX cannot trace.
        inplace: modify ``model`` (default: a deep copy is changed and returned).
        fold_bn: fold eval-mode BatchNorm2d into the preceding conv first.
        fuse: afterwards, fold each ReLU that follows a sparse layer, and each residual add (then
            ReLU) after a sparse conv, into the kernel (the add only with ``example_inputs``, which
            show the shapes match), and compute ``nn.MaxPool2d`` with :func:`fastprune.ops.max_pool2d`
            (same values; torch's NCHW CPU max pool is ~7x slower), after a dense conv that only
            feeds it (through a ReLU) on the conv's channels-last output, the ReLU included; and,
            with ``example_inputs``, run each HuggingFace-style feed-forward block whose two
            Linears are sparse as one call (``model.fused_ffn`` names them; kept
            only where the model's outputs on the example inputs do not change); and, with
            ``example_inputs``, make a HuggingFace model whose attention is torch's SDPA, and
            :class:`fastprune.nn.MultiheadSelfAttention` modules, call
            :func:`fastprune.ops.scaled_dot_product_attention` (``model.fused_attention`` says
            whether and why): see :mod:`fastprune.nn.fuse`.
        micro_batch: run batches this many samples at a time through the whole model
            (:class:`fastprune.nn.MicroBatch`): one sample's activations stay in cache, but the
            weights are fetched once per chunk (on ResNet-50 batch 8 now slower at 90 % and 95 %;
            it depends on the model: measure). Only for models proven per-sample on their FX
            graph (ValueError otherwise, before anything is changed).
        tile_rows: run each residual block made of convolutions and per-position operations (two
            convs or more: ResNet's bottlenecks and basic blocks) on tiles of this many output rows,
            one sample at a time, so that a tile's activations stay in L2 from layer to layer
            (:class:`fastprune.nn.RowTiles`; same values). Needs ``example_inputs`` (their shapes)
            and a model FX can trace (ValueError otherwise, before anything is changed); the
            blocks tiled are in ``model.row_tiles``. Measured slower so far (ResNet-50, Zen 5:
            0.68-0.99x; ``benchmarks/bench_depth_first.py``): for experiments, not a default.
        depth_first: with ``fuse`` and ``example_inputs``, run each ResNet bottleneck without
            downsampling (sparse 1x1 -> kxk -> 1x1 convs, the block's input added before the last
            ReLU) as one :func:`fastprune.ops.sparse_bottleneck` call, depth-first in bands of rows
            (:func:`fastprune.nn.fuse.fuse_bottlenecks`; same values; kept unless timed slower on
            the block's input by more than the calibration margin). ``model.fused_bottlenecks``
            says, per block, whether and why. Not with ``tile_rows``.

    Returns:
        The sparse model (in eval mode). ``sparsify_report(model)`` lists its sparse layers. When
        anything was fused it is a ``torch.fx.GraphModule`` (same submodules and parameter names);
        with ``inplace=True`` the input model gets the swapped layers, never a fused flag. With
        ``micro_batch`` it is wrapped in a :class:`fastprune.nn.MicroBatch` (``.module``).
    """
    if min_sparsity is not None and (
        isinstance(min_sparsity, bool) or not isinstance(min_sparsity, (int, float)) or not 0.0 <= min_sparsity <= 1.0
    ):
        raise ValueError(f"min_sparsity must be in [0, 1], got {min_sparsity!r}")
    if micro_batch is not None:
        check_size(micro_batch)
        prove_per_sample(model)  # before the model is changed (folding and fusion keep it per-sample)
    if tile_rows is not None:
        check_rows(tile_rows)
        if example_inputs is None:
            raise ValueError("tile_rows needs example_inputs (the blocks' shapes come from them)")
        try:
            graph_tracer().trace(model)
        except Exception as e:  # noqa: BLE001 - say why
            raise ValueError(f"tile_rows needs a model torch.fx can trace ({type(e).__name__}: {e})") from e
    inputs = None
    if example_inputs is not None:
        inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    if not inplace:
        detach_masked_weights(model)
    m = model if inplace else copy.deepcopy(model)
    finalize(m)
    m.eval()
    if fold_bn:
        _fold_bn(m, inputs)
    shapes: dict[str, tuple[int, ...]] = {}
    if inputs is not None and min_sparsity is None:
        handles = []
        for name, mod in m.named_modules():
            if isinstance(mod, (nn.Linear, nn.Conv2d)):

                def record(mod: nn.Module, args: tuple, name: str = name) -> None:
                    shapes.setdefault(name, tuple(args[0].shape))

                handles.append(mod.register_forward_pre_hook(record))
        try:
            with torch.no_grad(), eval_mode(m):
                m(*inputs)
        finally:
            for h in handles:
                h.remove()
    decisions: list[SwapDecision] = []
    read_as_weights = _weight_readers(m)
    for name, mod in list(m.named_modules()):
        if not isinstance(mod, (nn.Linear, nn.Conv2d)):
            continue
        kind = "linear" if isinstance(mod, nn.Linear) else "conv"
        w = mod.weight.detach()
        sp = float((w == 0).sum()) / max(1, w.numel())
        if name in read_as_weights:
            decisions.append(SwapDecision(name, kind, sp, False, read_as_weights[name]))
            continue
        if w.dtype not in (torch.float32, torch.float64):
            decisions.append(SwapDecision(name, kind, sp, False, f"weight is {w.dtype} (the kernels take float32/64)"))
            continue
        if kind == "conv" and (mod.padding_mode != "zeros" or isinstance(mod.padding, str)):
            decisions.append(SwapDecision(name, kind, sp, False, "padding other than integer zero padding"))
            continue
        sparse_cls = SparseLinear if kind == "linear" else SparseConv2d
        table_says = sp >= DEFAULT_MIN_SPARSITY[kind]
        dense_ms = sparse_ms = None
        if min_sparsity is not None:
            swap = sp >= float(min_sparsity) and sp > 0
            reason = f"sparsity {sp:.3f} {'>=' if swap else '<'} min_sparsity {float(min_sparsity):.3f}"
            if sp == 0 and float(min_sparsity) == 0:
                reason = "no zeros"
        elif name in shapes:
            x = torch.randn(shapes[name], dtype=w.dtype, device=w.device)
            cand = sparse_cls.from_dense(mod)
            with torch.no_grad():
                swap, reason, s_t, d_t = _calibrate(lambda c=cand, x=x: c(x), lambda m=mod, x=x: m(x), table_says)
            sparse_ms, dense_ms = s_t * 1e3, d_t * 1e3
        elif example_inputs is not None:
            swap = table_says
            reason = f"not called on example_inputs: sparsity table ({DEFAULT_MIN_SPARSITY[kind]:.2f} for {kind})"
        else:
            swap = table_says
            reason = f"sparsity {sp:.3f} {'>=' if swap else '<'} table's {DEFAULT_MIN_SPARSITY[kind]:.2f} for {kind}"
        if swap:
            m.set_submodule(name, sparse_cls.from_dense(mod))
        decisions.append(SwapDecision(name, kind, sp, swap, reason, dense_ms, sparse_ms))
    torch_fast_paths_off(m)
    ffn: list[str] = []
    bottlenecks: dict[str, str] = {}
    attention = ""
    if fuse:
        ffn = fuse_ffn(m, inputs)
        attention = fuse_attention(m, inputs, _attention_decider(min_sparsity is None))
        swap_max_pools(m)
        m, _ = fuse_activations(m, inputs)
        if isinstance(m, fx.GraphModule):
            channels_last_pools(m)
            if depth_first and inputs is not None and tile_rows is None:
                bottlenecks = fuse_bottlenecks(m, inputs, _bottleneck_decider(min_sparsity is None))
        m.eval()
    tiled: list[str] = []
    if tile_rows is not None:
        if not isinstance(m, fx.GraphModule):
            m = fx.GraphModule(m, graph_tracer().trace(m), class_name=type(m).__name__)
        with torch.no_grad():
            ShapeProp(m).propagate(*inputs)
        tiled = tile_rows_pass(m, tile_rows)
        m.eval()
    if micro_batch is not None:
        m = MicroBatch(m, micro_batch).eval()
    m._fastprune_swap_decisions = decisions  # type: ignore[assignment]
    m.fused_ffn = ffn  # type: ignore[assignment]
    m.fused_attention = attention  # type: ignore[assignment]
    m.fused_bottlenecks = bottlenecks  # type: ignore[assignment]
    if tile_rows is not None:
        m.row_tiles = tiled  # type: ignore[assignment]
    return m


def sparsify_decisions(model: nn.Module) -> list[SwapDecision]:
    """Per Linear/Conv2d that ``sparsify`` saw: swapped or not, and why (measured times included).

    Raises ValueError for a model that did not come out of ``sparsify``.
    """
    decisions = getattr(model, "_fastprune_swap_decisions", None)
    if decisions is None:
        raise ValueError("this model did not come out of fastprune.sparsify (no swap decisions recorded)")
    return list(decisions)


def sparsify_report(model: nn.Module) -> list[tuple[str, str, int, float]]:
    """(name, class, nonzeros, sparsity) of every sparse layer in ``model``."""
    return [
        (n, type(mod).__name__, mod.nnz, mod.sparsity())
        for n, mod in model.named_modules()
        if isinstance(mod, (SparseLinear, SparseConv2d))
    ]
