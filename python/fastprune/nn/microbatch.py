"""Depth-first batches: run a model on a batch a few samples at a time, each chunk through the whole
model before the next.

Sparse layers are bound by memory traffic, not arithmetic: at batch 8 a ResNet-50's activations
(up to 26 MB a layer) leave the caches between layers, while one sample's stay in L2/L3; but each
layer's weights (and generated code) are then fetched once per chunk instead of once per batch.
Which wins depends on the model and the sparsity, so ``sparsify`` only does it when asked
(``micro_batch=``). Measured on the ResNet-50-like model, batch 8, 1 thread
(``benchmarks/bench_sparse.py``): with the vector loops chunks of 1 were faster at 90 % (235 vs
258 ms); with the first generated conv code faster at 95 % (163 vs 187, 191 vs 201 ms) and slower at
90 % (209-215 vs 198-204 ms); with the current code (smaller, values beside it) slower at both
(198 vs 189 ms at 90 %, 158 vs 153 ms at 95 %).

Only models whose every operation treats samples independently can be split: :func:`per_sample_ops`
proves it on the ``torch.fx`` graph (a conservative list of per-sample modules, functions and
methods; anything else, e.g. a ``view`` that might merge the batch dimension or a reduction over
it, is refused with its name).
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from fastprune._modes import eval_mode
from fastprune.nn.fuse import graph_tracer
from fastprune.nn.sparse import SparseConv2d, SparseLinear

__all__ = ["MicroBatch", "per_sample_ops", "prove_per_sample"]

_MODULES = (
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.Linear,
    nn.Identity,
    nn.ReLU,
    nn.ReLU6,
    nn.GELU,
    nn.SiLU,
    nn.Sigmoid,
    nn.Tanh,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.LeakyReLU,
    nn.ELU,
    nn.Mish,
    nn.Dropout,
    nn.Dropout2d,
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.Upsample,
)
_ELEMENTWISE = {
    operator.add,
    operator.iadd,
    operator.mul,
    operator.imul,
    operator.sub,
    operator.truediv,
    operator.neg,
    torch.add,
    torch.mul,
    torch.sub,
    torch.relu,
    torch.relu_,
    torch.sigmoid,
    torch.tanh,
    torch.maximum,
    torch.minimum,
    F.relu,
    F.relu6,
    F.gelu,
    F.silu,
    F.hardswish,
    F.leaky_relu,
    F.dropout,
    F.max_pool2d,
    F.avg_pool2d,
    F.adaptive_avg_pool2d,
    F.adaptive_max_pool2d,
    F.interpolate,
}
_METHODS = {
    "relu",
    "relu_",
    "sigmoid",
    "tanh",
    "contiguous",
    "add",
    "add_",
    "mul",
    "mul_",
    "sub",
    "clamp",
    "clamp_min",
    "clamp_",
}


def _dim_at_least_1(node: fx.Node, pos: int, name: str, default: int) -> bool:
    d = node.args[pos] if len(node.args) > pos else node.kwargs.get(name, default)
    return isinstance(d, int) and d >= 1


def _module_ok(mod: nn.Module) -> bool:
    if isinstance(mod, (SparseConv2d, SparseLinear, *_MODULES)):
        return not isinstance(mod, (nn.Dropout, nn.Dropout2d)) or not mod.training
    if isinstance(mod, nn.modules.batchnorm._BatchNorm):  # eval with running statistics: per sample
        return not mod.training and mod.track_running_stats and mod.running_mean is not None
    if isinstance(mod, nn.Flatten):
        return mod.start_dim >= 1
    if isinstance(mod, (nn.Softmax, nn.LogSoftmax)):
        return isinstance(mod.dim, int) and mod.dim >= 1
    return False


def per_sample_ops(gm: fx.GraphModule) -> list[str]:
    """The nodes of ``gm``'s graph that are not known to treat samples (dim 0) independently; empty
    when the whole model provably does (one input, one tensor output)."""
    mods = dict(gm.named_modules())
    bad = []
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        bad.append(f"{len(placeholders)} inputs (one tensor input only)")
    for n in gm.graph.nodes:
        if n.op in ("placeholder", "output", "get_attr"):
            continue
        if n.op == "call_module":
            ok = _module_ok(mods[n.target])
        elif n.op == "call_function":
            if n.target is torch.flatten:
                ok = _dim_at_least_1(n, 1, "start_dim", 0)
            elif n.target is torch.cat:
                ok = _dim_at_least_1(n, 1, "dim", 0)
            else:
                ok = n.target in _ELEMENTWISE
        else:  # call_method
            if n.target == "flatten":
                ok = _dim_at_least_1(n, 1, "start_dim", 0)
            else:
                ok = n.target in _METHODS
        if not ok:
            bad.append(n.format_node())
    out = next(n for n in gm.graph.nodes if n.op == "output")
    if not isinstance(out.args[0], fx.Node):
        bad.append("the output is not a single tensor")
    return bad


def check_size(size: object) -> None:
    """ValueError unless ``size`` is a positive int (the chunk size)."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"micro_batch must be a positive int, got {size!r}")


def prove_per_sample(module: nn.Module) -> None:
    """ValueError unless ``module`` (in eval mode) provably treats samples independently: its FX
    graph (sparse layers and pools as leaves) holds per-sample operations only."""
    try:
        gm = module if isinstance(module, fx.GraphModule) else fx.GraphModule(module, graph_tracer().trace(module))
    except Exception as e:  # noqa: BLE001 - say why
        raise ValueError(f"micro_batch needs a model torch.fx can trace ({type(e).__name__}: {e})") from e
    with eval_mode(module):
        bad = per_sample_ops(gm)
    if bad:
        raise ValueError(
            "micro_batch: cannot prove that these operations treat samples independently: "
            + "; ".join(bad[:5])
            + (f" (and {len(bad) - 5} more)" if len(bad) > 5 else "")
        )


class MicroBatch(nn.Module):
    """``module`` run on chunks of ``size`` samples (dim 0), each through the whole model, outputs
    concatenated: the same values as ``module(x)`` when every operation is per-sample (checked by
    :meth:`wrap`). Parameters live under ``module.``; ``micro.module`` is the model itself."""

    def __init__(self, module: nn.Module, size: int) -> None:
        super().__init__()
        check_size(size)
        self.module = module
        self.size = size

    @classmethod
    def wrap(cls, module: nn.Module, size: int) -> MicroBatch:
        """``MicroBatch(module, size)`` after proving that ``module`` is per-sample (ValueError if not)."""
        prove_per_sample(module)
        return cls(module, size)

    def forward(self, x: torch.Tensor) -> Any:
        if not isinstance(x, torch.Tensor) or x.dim() == 0 or x.shape[0] <= self.size:
            return self.module(x)
        return torch.cat([self.module(c) for c in x.split(self.size)])

    def extra_repr(self) -> str:
        return f"size={self.size}"
