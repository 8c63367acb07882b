"""How channels pass through each module and function (the rules of the group analysis).

A module handler ``fn(analysis, name, module, node, graph, layouts) -> Layout | None`` declares the
module's slots (which tensor dimensions hold channels), unifies them with its input layouts and
returns its output layout. :func:`register_handler` adds one for a new module class. A module with
parameters and no handler is a boundary: its inputs and outputs keep all their channels.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from fastprune.structure.trace import Graph, Node, Ref, refs_in

__all__ = ["Layout", "WEIGHT_ATTRS", "fixup", "is_handled", "module_handler", "register_handler"]

# Attributes whose output dimension defines a group of channels.
WEIGHT_ATTRS = ("weight", "in_proj_weight")


@dataclass(frozen=True)
class Layout:
    """Channels of a value: dimension ``cdim`` holds them; ``ids[p]`` is the element at position p."""

    cdim: int
    ids: np.ndarray


Handler = Callable[..., Any]
_HANDLERS: dict[type, Handler] = {}
_FIXUPS: dict[type, Callable[[nn.Module, dict[str, Any]], None]] = {}


def register_handler(
    cls: type, handler: Handler, fixup_fn: Callable[[nn.Module, dict[str, Any]], None] | None = None
) -> None:
    """Teach the analysis a module class. ``fixup_fn(module, before)`` updates the module's own
    attributes after its tensors were resized (``before`` holds the attributes read earlier)."""
    _HANDLERS[cls] = handler
    if fixup_fn is not None:
        _FIXUPS[cls] = fixup_fn


_transformers_seen = False
# optional imports that failed: module path -> what is lost (reported in every analysis' notes)
IMPORT_FAILURES: dict[str, str] = {}


def _lookup(table: dict[type, Any], module: nn.Module) -> Any:
    global _transformers_seen
    if not _transformers_seen and type(module).__module__.startswith("transformers."):
        # the first HuggingFace module seen: transformers is imported already, teach its attention
        _transformers_seen = True
        _register_transformers()
    for cls in type(module).__mro__:
        if cls in table:
            return table[cls]
    return None


def is_handled(module: nn.Module) -> bool:
    return _lookup(_HANDLERS, module) is not None


def module_handler(module: nn.Module) -> Handler:
    return _lookup(_HANDLERS, module) or _unknown_module


def fixup(module: nn.Module, before: dict[str, Any]) -> None:
    fn = _lookup(_FIXUPS, module)
    if fn is not None:
        fn(module, before)


def snapshot(module: nn.Module) -> dict[str, Any]:
    """Attributes a fixup needs to compare with (read before any tensor is resized)."""
    keys = (
        "in_channels",
        "out_channels",
        "groups",
        "in_features",
        "out_features",
        "num_features",
        "embedding_dim",
        "num_heads",
        "embed_dim",
    )
    return {k: getattr(module, k) for k in keys if hasattr(module, k)}


# ------------------------------------------------------------------------------- helpers
def _arg(node: Node, i: int, name: str, default: Any = None) -> Any:
    if name in node.kwargs:
        return node.kwargs[name]
    return node.args[i] if len(node.args) > i else default


def _input_layout(node: Node, layouts: dict, i: int = 0, name: str = "input") -> Any:
    a = _arg(node, i, name)
    return layouts.get(a) if isinstance(a, Ref) else None


def _all_input_layouts(node: Node, layouts: dict) -> list[Layout]:
    out = []

    def walk(x: Any) -> None:
        if isinstance(x, Ref):
            lay = layouts.get(x)
            if lay is not None:
                out.append(lay)
        elif isinstance(x, (tuple, list)):
            for v in x:
                walk(v)
        elif isinstance(x, dict):
            for v in x.values():
                walk(v)

    walk(node.args)
    walk(node.kwargs)
    return out


def _pin_inputs(an: Any, node: Node, layouts: dict, where: str, reason: str, always: bool = False) -> None:
    """Pin every input's channels; ``always`` records the boundary even when none are tracked."""
    for lay in _all_input_layouts(node, layouts):
        an.pin(lay.ids, where, reason)
    if always:
        an.boundaries.setdefault(where, reason)


def _unknown_module(an: Any, name: str, module: nn.Module, node: Node, graph: Graph, layouts: dict) -> None:
    _pin_inputs(
        an,
        node,
        layouts,
        name,
        f"{type(module).__name__} has parameters and no fastprune handler; "
        "its inputs and outputs keep their channels (register_handler teaches it)",
        always=True,
    )
    return None


def _out_slot(an: Any, name: str, module: nn.Module, dim: int) -> np.ndarray:
    ids = an.slot(name, "weight", dim, "out")
    if getattr(module, "bias", None) is not None:
        an.slot(name, "bias", 0, "out", like=ids)
    return ids


# ------------------------------------------------------------------------------- modules
def _conv(an: Any, name: str, m: nn.modules.conv._ConvNd, node: Node, graph: Graph, layouts: dict) -> Layout:
    lay = _input_layout(node, layouts)
    if lay is not None and lay.cdim != 1:
        an.pin(lay.ids, name, "input channels not on dim 1")
        lay = None
    transposed = bool(getattr(m, "transposed", False))
    out_ids = _out_slot(an, name, m, 1 if transposed else 0)
    if m.groups == 1:
        if lay is not None:
            an.slot(name, "weight", 0 if transposed else 1, "in", like=lay.ids)
    elif not transposed and m.groups == m.in_channels == m.out_channels:
        # depthwise: output channel c reads only input channel c
        if lay is not None:
            an.unify(out_ids, lay.ids)
        else:
            an.pin(out_ids, name, "depthwise conv on an input whose channels are fixed")
    elif not transposed:
        # grouped (ResNeXt, RegNet): `groups` stays fixed, so every group must lose the same channels:
        # channel l of each group (input and output side alike) is removed together [choice: equal
        # numbers per group rather than whole groups; the cardinality is kept]
        g = m.groups
        _tie_within_groups(an, out_ids, g)
        if lay is not None:
            _tie_within_groups(an, lay.ids, g)
            an.slot(name, "weight", 1, "in", like=lay.ids[: len(lay.ids) // g])
    else:
        if lay is not None:
            an.pin(lay.ids, name, f"grouped transposed conv (groups={m.groups}): channels are kept")
        an.pin(out_ids, name, f"grouped transposed conv (groups={m.groups}): channels are kept")
    return Layout(1, out_ids)


def _tie_within_groups(an: Any, ids: np.ndarray, groups: int) -> None:
    """Unify position l of every one of ``groups`` equal blocks of ``ids`` (block-local index l)."""
    per = len(ids) // groups
    blocks = ids.reshape(groups, per)
    for k in range(1, groups):
        an.unify(blocks[0], blocks[k])


def _conv_fixup(m: nn.modules.conv._ConvNd, before: dict[str, Any]) -> None:
    w = m.weight
    if m.transposed:
        m.in_channels, m.out_channels = w.shape[0], w.shape[1] * m.groups
        return
    if before.get("groups", 1) > 1 and before["groups"] == before["in_channels"] == before["out_channels"]:
        m.groups = m.in_channels = m.out_channels = w.shape[0]
    else:
        m.out_channels, m.in_channels = w.shape[0], w.shape[1] * m.groups


def _linear(an: Any, name: str, m: nn.Module, node: Node, graph: Graph, layouts: dict) -> Layout:
    """nn.Linear, and every Linear-like layer of LINEAR_LIKE (GPT-2's Conv1D: weight (in, out))."""
    in_dim = linear_in_dim(m)
    assert in_dim is not None
    x = _arg(node, 0, "input") if node.args or "input" in node.kwargs else next(iter(node.kwargs.values()), None)
    lay = layouts.get(x) if isinstance(x, Ref) else None
    shape = graph.shape_of(x) if isinstance(x, Ref) else None
    if lay is not None:
        if shape is not None and lay.cdim == len(shape) - 1:
            an.slot(name, "weight", in_dim, "in", like=lay.ids)
        else:
            an.pin(lay.ids, name, f"{type(m).__name__} applied along a dimension that is not the channel dimension")
    out_ids = _out_slot(an, name, m, 1 - in_dim)
    nd = len(node.shapes) if isinstance(node.shapes, torch.Size) else 2
    return Layout(nd - 1, out_ids)


def _linear_fixup(m: nn.Linear, before: dict[str, Any]) -> None:  # noqa: ARG001
    m.out_features, m.in_features = m.weight.shape


def _batchnorm(an: Any, name: str, m: nn.modules.batchnorm._NormBase, node: Node, graph: Graph, layouts: dict) -> Any:
    lay = _input_layout(node, layouts)
    if lay is None or lay.cdim != 1:
        if lay is not None:
            an.pin(lay.ids, name, "BatchNorm input channels not on dim 1")
        return None
    for attr in ("weight", "bias", "running_mean", "running_var"):
        an.slot(name, attr, 0, "norm", like=lay.ids)
    return lay


def _batchnorm_fixup(m: nn.modules.batchnorm._NormBase, before: dict[str, Any]) -> None:  # noqa: ARG001
    t = m.weight if m.weight is not None else m.running_mean
    if t is not None:
        m.num_features = t.shape[0]


def _channel_norm(an: Any, name: str, m: nn.Module, node: Node, graph: Graph, layouts: dict) -> Any:
    lay = _input_layout(node, layouts)
    if getattr(an, "prune_norms", False) and lay is not None:
        out = _prunable_norm(an, name, m, node, graph, lay)
        if out is not None:
            return out
    _pin_inputs(
        an,
        node,
        layouts,
        name,
        f"{type(m).__name__} normalises over the channels: removing one changes "
        "the others' statistics, so pruning does not pass through it",
        always=True,
    )
    return None


def _embedding(an: Any, name: str, m: nn.Embedding, node: Node, graph: Graph, layouts: dict) -> Layout:
    ids = an.slot(name, "weight", 1, "out")
    nd = len(node.shapes) if isinstance(node.shapes, torch.Size) else 2
    return Layout(nd - 1, ids)


def _embedding_fixup(m: nn.Embedding, before: dict[str, Any]) -> None:  # noqa: ARG001
    m.embedding_dim = m.weight.shape[1]


def _mha(an: Any, name: str, m: nn.MultiheadAttention, node: Node, graph: Graph, layouts: dict) -> None:
    _pin_inputs(
        an,
        node,
        layouts,
        name,
        "nn.MultiheadAttention ties its projections to embed_dim; swap in "
        "fastprune.nn.MultiheadSelfAttention (fastprune.nn.swap_attention) to prune its heads",
        always=True,
    )
    return None


register_handler(nn.modules.conv._ConvNd, _conv, _conv_fixup)
register_handler(nn.Linear, _linear, _linear_fixup)
register_handler(nn.modules.batchnorm._NormBase, _batchnorm, _batchnorm_fixup)


def _prunable_norm(an: Any, name: str, m: nn.Module, node: Node, graph: Graph, lay: Layout) -> Layout | None:
    """``prune_norms=True``: a LayerNorm / RMSNorm over the channels alone, or a GroupNorm (each
    group losing the same channels, ``num_groups`` fixed), passes the channels through and its
    affine parameters are sliced with them. Its statistics then change: compaction is approximate
    (measured and reported). Other normalisations keep their channels."""
    x = _arg(node, 0, "input")
    shape = graph.shape_of(x) if isinstance(x, Ref) else None
    if shape is None:
        return None
    if isinstance(m, (nn.LayerNorm, nn.RMSNorm)) or type(m) in NORM_LIKE:
        norm_shape = tuple(getattr(m, "normalized_shape", None) or tuple(m.weight.shape))
        if norm_shape != (shape[-1],) or lay.cdim != len(shape) - 1:
            return None  # normalised over more than the channels
    elif isinstance(m, nn.GroupNorm):
        if lay.cdim != 1:
            return None
        _tie_within_groups(an, lay.ids, m.num_groups)
    else:
        return None
    for attr in ("weight", "bias"):
        an.slot(name, attr, 0, "norm", like=lay.ids)
    an.approximate_norms.append(name)
    return lay


def _norm_fixup(m: nn.Module, before: dict[str, Any]) -> None:  # noqa: ARG001
    w = m.weight if getattr(m, "weight", None) is not None else getattr(m, "bias", None)
    if w is None:
        return
    if isinstance(m, nn.GroupNorm):
        m.num_channels = w.shape[0]
    elif hasattr(m, "normalized_shape"):
        m.normalized_shape = (w.shape[0],)


for _cls in (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm):
    register_handler(_cls, _channel_norm, _norm_fixup)
register_handler(nn.LocalResponseNorm, _channel_norm)
register_handler(nn.modules.instancenorm._InstanceNorm, _channel_norm)
register_handler(nn.Embedding, _embedding, _embedding_fixup)
register_handler(nn.MultiheadAttention, _mha)


# ------------------------------------------------------------------------------ functions
UNARY = frozenset(
    """relu relu6 gelu silu sigmoid tanh hardswish hardsigmoid hardtanh leaky_relu elu selu
celu mish softplus softsign tanhshrink logsigmoid dropout dropout1d dropout2d dropout3d alpha_dropout
feature_alpha_dropout identity clone contiguous detach to float double half bfloat16 type_as abs neg
exp log sqrt rsqrt square clamp clip clamp_min clamp_max sign erf sin cos reciprocal threshold
hardshrink softshrink silu_ gelu_ sigmoid_ relu_ nan_to_num stochastic_depth""".split()
)
BINARY = frozenset("add sub rsub mul div rdiv maximum minimum pow fmod remainder floor_divide".split())
REDUCTIONS = frozenset("mean sum amax amin max min std var logsumexp norm prod".split())
QUIET = frozenset("size dim numel getattr get_attr eq ne lt gt le ge".split())
KNOWN = (
    frozenset(
        """cat stack split chunk tensor_split unbind split_with_sizes flatten view reshape unflatten
permute transpose swapaxes t movedim softmax log_softmax interpolate upsample pad max_pool1d max_pool2d
max_pool3d avg_pool1d avg_pool2d avg_pool3d adaptive_avg_pool1d adaptive_avg_pool2d adaptive_avg_pool3d
adaptive_max_pool1d adaptive_max_pool2d adaptive_max_pool3d max_pool2d_with_indices
adaptive_max_pool2d_with_indices lp_pool2d""".split()
    )
    | REDUCTIONS
)


def _multi(x: Any) -> bool:
    return isinstance(x, tuple) and not isinstance(x, torch.Size)


def _norm_dim(d: int, nd: int) -> int:
    return d + nd if d < 0 else d


def _foreign_shape(graph: Graph, a: Any) -> torch.Size | None:
    if isinstance(a, Ref):
        return graph.shape_of(a)
    if isinstance(a, tuple) and len(a) == 2 and a[0] in ("param", "tensor"):
        return torch.Size(a[1])
    return None


def call(an: Any, node: Node, graph: Graph, layouts: dict) -> Any:
    name = node.target
    where = f"{name}()"
    out = node.shapes
    if name in QUIET:
        return None
    if not isinstance(out, (torch.Size, tuple)):
        return None  # non-tensor result (a size, a bool)
    x = _arg(node, 0, "input")
    lay = layouts.get(x) if isinstance(x, Ref) else None
    xs = _foreign_shape(graph, x)
    splits = getattr(an, "split_layouts", {})
    if splits and any(r in splits for r in _all_refs(node)):
        return _on_split(an, node, graph, x, xs, out, where)
    if name in ("view", "reshape") and lay is not None and isinstance(out, torch.Size) and xs is not None:
        if _split_channels(an, node, lay, xs, out, where):
            return None  # the channels now span two dims: followed in an.split_layouts

    if name in UNARY:
        if lay is not None and isinstance(out, torch.Size) and out == xs:
            return lay
        _pin_inputs(an, node, layouts, where, "changes the shape")
        return None
    if name in BINARY:
        return _binary(an, node, graph, layouts, where)
    if name == "getitem":
        return _getitem(an, node, graph, layouts, where)
    if name not in KNOWN:
        _pin_inputs(
            an,
            node,
            layouts,
            where,
            f"fastprune does not know how channels pass through {name}; its inputs keep their channels",
        )
        return None
    if name in ("cat", "stack"):
        return _cat(an, node, graph, layouts, where, stack=name == "stack")
    if lay is None:
        return None
    if name in ("cat", "stack"):
        return _cat(an, node, graph, layouts, where, stack=name == "stack")
    if name in ("split", "chunk", "tensor_split", "unbind", "split_with_sizes"):
        dim = _norm_dim(_arg(node, 2 if name != "unbind" else 1, "dim", 0), len(xs))
        if not _multi(out):
            an.pin(lay.ids, where, "unexpected result")
            return None
        if name == "unbind":
            if dim == lay.cdim:
                an.pin(lay.ids, where, "unbinds the channel dimension")
                return None
            return [Layout(lay.cdim - (dim < lay.cdim), lay.ids) for _ in out]
        if dim != lay.cdim:
            return [lay for _ in out]
        sizes = [s[dim] for s in out]
        if name != "chunk" or len(set(sizes)) != 1:
            # split sizes and slice bounds are constants in the model's code: they would point at
            # the wrong channels after surgery, so the channels they cut are kept
            an.pin(lay.ids, where, f"{name} along the channels with sizes fixed in the code")
            return [None for _ in out]
        # chunk(k): every chunk must lose the same number of channels, so position j of each
        # chunk is removed together (this keeps the code's chunk count valid after surgery)
        n = sizes[0]
        res = [Layout(lay.cdim, lay.ids[k * n : (k + 1) * n]) for k in range(len(sizes))]
        for r in res[1:]:
            an.unify(res[0].ids, r.ids)
        return res
    if name in ("flatten", "view", "reshape", "unflatten"):
        return _reshape(an, lay, xs, out, where)
    if name in ("permute", "transpose", "swapaxes", "t", "movedim"):
        return _permute(an, node, lay, xs, out, where)
    if name in REDUCTIONS:
        dims = _arg(node, 1, "dim")
        keep = bool(_arg(node, 2, "keepdim", False))
        if dims is None or isinstance(dims, Ref):
            an.pin(lay.ids, where, "reduces over every dimension")
            return None
        dims = [_norm_dim(d, len(xs)) for d in (dims if isinstance(dims, (tuple, list)) else [dims])]
        if lay.cdim in dims:
            an.pin(lay.ids, where, "reduces over the channels")
            return None
        new = lay.cdim if keep else lay.cdim - sum(d < lay.cdim for d in dims)
        res = Layout(new, lay.ids)
        return [res, None] if _multi(out) else res
    if "pool" in name or name in ("interpolate", "upsample", "pad"):
        shape = out[0] if _multi(out) else out
        if isinstance(shape, torch.Size) and len(shape) == len(xs) and shape[lay.cdim] == xs[lay.cdim]:
            return [lay, None] if _multi(out) else lay
        an.pin(lay.ids, where, "changes the channel count")
        return None
    if name in ("softmax", "log_softmax"):
        dim = _norm_dim(_arg(node, 1, "dim", -1), len(xs))
        if dim == lay.cdim:
            an.pin(lay.ids, where, "normalises over the channels")
            return None
        return lay
    _pin_inputs(an, node, layouts, where, f"{name} is not understood here")
    return None


def _all_refs(node: Node) -> list[Ref]:
    return refs_in([*node.args, *node.kwargs.values()])


def _view_sizes(node: Node) -> list[Any]:
    args = list(node.args[1:])
    if len(args) == 1 and isinstance(args[0], (tuple, list)):
        args = list(args[0])
    return args if args else list(node.kwargs.get("shape", node.kwargs.get("size", ())))


def _split_channels(an: Any, node: Node, lay: Layout, xs: torch.Size, out: torch.Size, where: str) -> bool:
    """A view splitting the channel dim C into (A, B) (channel shuffle's ``view(b, groups, C // groups,
    h, w)``). The factor written as a constant in the code stays fixed after surgery, so: a fixed A
    (groups) means every block of B loses the same positions (position j tied across the A blocks); a
    fixed B means whole blocks go. Two constants, or none, are ambiguous: the channels are kept.
    Recorded in ``an.split_layouts``; True when the view is such a split."""
    c = lay.cdim
    if len(out) != len(xs) + 1 or tuple(out[:c]) != tuple(xs[:c]) or tuple(out[c + 2 :]) != tuple(xs[c + 1 :]):
        return False
    a_size, b_size = out[c], out[c + 1]
    if a_size * b_size != xs[c] or a_size == 1 or b_size == 1:
        return False
    sizes = _view_sizes(node)
    if len(sizes) != len(out):
        an.pin(lay.ids, where, "splits the channel dimension")
        return True

    def fixed(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v != -1

    grid = lay.ids.reshape(a_size, b_size)
    if fixed(sizes[c]) and not fixed(sizes[c + 1]):
        for k in range(1, a_size):
            an.unify(grid[0], grid[k])
    elif fixed(sizes[c + 1]) and not fixed(sizes[c]):
        for k in range(1, b_size):
            an.unify(grid[:, 0], grid[:, k])
    else:
        an.pin(lay.ids, where, "splits the channel dimension with both factors fixed (or computed) in the code")
        return True
    an.split_layouts[Ref(an.current)] = (c, grid)
    return True


def _on_split(an: Any, node: Node, graph: Graph, x: Any, xs: Any, out: Any, where: str) -> Any:
    """Ops on a value whose channels span two dims: a swap of the two (a channel shuffle's
    transpose), a shape-keeping op, the view merging them back (a permutation of the channels);
    anything else keeps them."""
    splits = an.split_layouts
    name = node.target
    src = splits.get(x) if isinstance(x, Ref) else None
    others = [r for r in _all_refs(node) if r in splits and r != x]
    if src is not None and not others and isinstance(out, torch.Size):
        c, grid = src
        if (name in UNARY or name == "contiguous") and xs is not None and tuple(out) == tuple(xs):
            splits[Ref(an.current)] = (c, grid)
            return None
        if name == "transpose":
            nd = len(xs)
            dims = sorted((_norm_dim(_arg(node, 1, "dim0"), nd), _norm_dim(_arg(node, 2, "dim1"), nd)))
            if dims == [c, c + 1]:
                splits[Ref(an.current)] = (c, grid.T.copy())
                return None
        if name in ("view", "reshape") and xs is not None:
            if len(out) == len(xs) - 1 and out[c] == xs[c] * xs[c + 1] and tuple(out[:c]) == tuple(xs[:c]):
                return Layout(c, grid.reshape(-1))
    for r in _all_refs(node):
        if r in splits:
            an.pin(splits[r][1].reshape(-1), where, "reshapes the channel dimension")
    return None


def _binary(an: Any, node: Node, graph: Graph, layouts: dict, where: str) -> Any:
    out = node.shapes
    if not isinstance(out, torch.Size):
        _pin_inputs(an, node, layouts, where, "unexpected result")
        return None
    nd = len(out)
    ops = [_arg(node, 0, "input"), _arg(node, 1, "other")]
    tensors = [(a, layouts.get(a) if isinstance(a, Ref) else None, _foreign_shape(graph, a)) for a in ops]
    tensors = [t for t in tensors if t[2] is not None]
    with_layout = [(a, lay, s) for a, lay, s in tensors if lay is not None]
    if not with_layout:
        return None
    cdims = {lay.cdim + nd - len(s) for _, lay, s in with_layout}
    if len(cdims) != 1:
        for _, lay, _ in with_layout:
            an.pin(lay.ids, where, "operands carry channels on different dimensions")
        return None
    c = cdims.pop()
    full = [lay for _, lay, s in with_layout if len(lay.ids) == out[c]]
    for _, lay, _ in with_layout:
        if len(lay.ids) != out[c]:  # a broadcast single channel
            an.pin(lay.ids, where, "broadcast over the channels")
    params = []
    for a, lay, s in tensors:
        if lay is None:
            k = c - (nd - len(s))
            if 0 <= k < len(s) and s[k] != 1:
                origin = an.param_dim(a, k) if full and s[k] == len(full[0].ids) else None
                if origin is not None:
                    params.append(origin)  # a layer scale, a position embedding: sliced with the channels
                    continue
                for f in full:
                    an.pin(f.ids, where, "combined with a tensor whose channels are not tracked")
    if not full:
        return None
    for f in full[1:]:
        an.unify(full[0].ids, f.ids)
    for module, attr, dim in params:
        an.slot(module, attr, dim, "norm", like=full[0].ids)
    return Layout(c, full[0].ids)


def _cat(an: Any, node: Node, graph: Graph, layouts: dict, where: str, stack: bool) -> Any:
    seq = _arg(node, 0, "tensors")
    out = node.shapes
    if not isinstance(seq, (tuple, list)) or not isinstance(out, torch.Size):
        _pin_inputs(an, node, layouts, where, "unexpected arguments")
        return None
    dim = _norm_dim(_arg(node, 1, "dim", 0), len(out))
    items = [(layouts.get(a) if isinstance(a, Ref) else None, _foreign_shape(graph, a)) for a in seq]
    lays = [lay for lay, _ in items if lay is not None]
    if not lays:
        return None
    if stack:
        cd = {lay.cdim for lay in lays}
        if len(cd) == 1 and len(lays) == len(items):
            c = cd.pop()
            for lay in lays[1:]:
                an.unify(lays[0].ids, lay.ids)
            return Layout(c + (dim <= c), lays[0].ids)
        for lay in lays:
            an.pin(lay.ids, where, "stacks tensors whose channels do not line up")
        return None
    if all(lay.cdim == dim for lay in lays):
        parts = []
        for lay, s in items:
            if lay is None:
                if s is None:
                    for l2 in lays:
                        an.pin(l2.ids, where, "concatenated with a value of unknown shape")
                    return None
                ids = an.new(s[dim])
                an.pin(ids, where, "concatenated with untracked channels")
                parts.append(ids)
            else:
                parts.append(lay.ids)
        return Layout(dim, np.concatenate(parts))
    cd = {lay.cdim for lay in lays}
    if len(cd) == 1:
        c = next(iter(cd))
        params = []
        for a, (lay, s) in zip(seq, items, strict=True):
            if lay is None:  # a class token or another parameter joined along the tokens
                origin = an.param_dim(a, c) if s is not None and s[c] == len(lays[0].ids) else None
                if origin is None:
                    params = None
                    break
                params.append(origin)
        if params is not None:
            for lay in lays[1:]:
                an.unify(lays[0].ids, lay.ids)
            for module, attr, pdim in params:
                an.slot(module, attr, pdim, "norm", like=lays[0].ids)
            return lays[0]
    for lay in lays:
        an.pin(lay.ids, where, "concatenates along a dimension that is not the channel dimension")
    return None


def _getitem(an: Any, node: Node, graph: Graph, layouts: dict, where: str) -> Any:
    base, idx = node.args[0], node.args[1]
    if not isinstance(base, Ref):
        return None
    bshape = graph.nodes[base.node].shapes if base.index is None else graph.shape_of(base)
    if _multi(bshape):
        if isinstance(idx, int) and base.index is None:
            return layouts.get(Ref(base.node, idx))
        return None
    lay = layouts.get(base)
    if lay is None:
        return None
    nd = len(bshape)
    items = list(idx) if isinstance(idx, tuple) else [idx]
    if any(i is Ellipsis for i in items):
        k = items.index(Ellipsis)
        fill = nd - sum(1 for i in items if i is not None and i is not Ellipsis)
        items = items[:k] + [slice(None)] * fill + items[k + 1 :]
    in_d = out_d = 0
    new_cdim, new_ids = None, lay.ids
    for it in items:
        if it is None:
            out_d += 1
            continue
        if isinstance(it, int) and not isinstance(it, bool):
            if in_d == lay.cdim:
                an.pin(lay.ids, where, "indexes a single channel")
                return None
            in_d += 1
            continue
        if isinstance(it, slice) and all(v is None or isinstance(v, int) for v in (it.start, it.stop, it.step)):
            if in_d == lay.cdim:
                if it != slice(None):
                    # slice bounds are constants in the code: keep the channels they cut
                    an.pin(lay.ids, where, "slices the channels with bounds fixed in the code")
                    return None
                new_cdim = out_d
            in_d += 1
            out_d += 1
            continue
        an.pin(lay.ids, where, "advanced indexing")
        return None
    if new_cdim is None:
        new_cdim = out_d + (lay.cdim - in_d)
    return Layout(new_cdim, new_ids)


def _reshape(an: Any, lay: Layout, xs: torch.Size, out: Any, where: str) -> Any:
    if not isinstance(out, torch.Size) or xs is None:
        an.pin(lay.ids, where, "unexpected result")
        return None
    c = lay.cdim
    if tuple(out[: c + 1]) == tuple(xs[: c + 1]):
        return lay  # everything up to and including the channels unchanged
    tail = len(xs) - c
    if len(out) >= tail and tuple(out[len(out) - tail :]) == tuple(xs[c:]):
        return Layout(len(out) - tail, lay.ids)  # leading dims merged or split
    # merge of dims s..e (s <= c <= e) into one: channels repeat in blocks
    for s in range(c + 1):
        if tuple(out[:s]) != tuple(xs[:s]):
            break
        for e in range(c, len(xs)):
            merged = math.prod(xs[s : e + 1])
            if len(out) == len(xs) - (e - s) and out[s] == merged and tuple(out[s + 1 :]) == tuple(xs[e + 1 :]):
                inner = math.prod(xs[c + 1 : e + 1])
                pos = np.arange(merged)
                ids = lay.ids[(pos // inner) % xs[c]]
                return Layout(s, ids)
    an.pin(lay.ids, where, "reshapes the channel dimension")
    return None


def _permute(an: Any, node: Node, lay: Layout, xs: torch.Size, out: Any, where: str) -> Any:
    name = node.target
    nd = len(xs)
    c = lay.cdim
    if name == "permute":
        dims = (
            node.args[1:]
            if len(node.args) > 2 or not isinstance(_arg(node, 1, "dims"), (tuple, list))
            else _arg(node, 1, "dims")
        )
        dims = [_norm_dim(int(d), nd) for d in dims]
        return Layout(dims.index(c), lay.ids)
    if name == "t":
        return Layout(1 - c if nd == 2 else c, lay.ids)
    if name == "movedim":
        src, dst = _norm_dim(_arg(node, 1, "source"), nd), _norm_dim(_arg(node, 2, "destination"), nd)
        order = [d for d in range(nd) if d != src]
        order.insert(dst, src)
        return Layout(order.index(c), lay.ids)
    a, b = _norm_dim(_arg(node, 1, "dim0"), nd), _norm_dim(_arg(node, 2, "dim1"), nd)
    return Layout(b if c == a else a if c == b else c, lay.ids)


# ------------------------------------------------------------------------------ attention
@dataclass(frozen=True)
class HeadSpec:
    """Where a multi-head attention module keeps its projections: ``q``/``k``/``v`` (and ``out``,
    or None when the output projection lives outside the module) are Linear attribute names, ``heads``
    and ``head_dim`` the attributes holding H and D (``heads`` None: H is read from q's width, as
    for Llama, whose code infers it); ``self_only``: one input feeds q, k and v. Fewer key / value
    rows than query rows is grouped-query attention: whole KV groups are pruned."""

    q: str
    k: str
    v: str
    out: str | None
    heads: str | None
    head_dim: str
    self_only: bool = False
    per_head: tuple[tuple[str, int], ...] = ()  # (parameter path under the module, dim): one entry per head


HEAD_SPECS: dict[type, HeadSpec] = {}


def head_spec(module: nn.Module) -> HeadSpec | None:
    return _lookup(HEAD_SPECS, module)


def _attention(an: Any, name: str, m: Any, node: Node, graph: Graph, layouts: dict) -> list:
    spec = head_spec(m)
    if spec.self_only:
        q_in = k_in = v_in = _arg(node, 0, "hidden_states")
    else:
        q_in = _arg(node, 0, "query")
        k_in = _arg(node, 1, "key") or q_in
        v_in = _arg(node, 2, "value") or k_in
    for proj, inp in ((spec.q, q_in), (spec.k, k_in), (spec.v, v_in)):
        lay = layouts.get(inp) if isinstance(inp, Ref) else None
        shape = graph.shape_of(inp) if isinstance(inp, Ref) else None
        if lay is None:
            continue
        if shape is not None and lay.cdim == len(shape) - 1:
            an.slot(f"{name}.{proj}", "weight", 1, "in", like=lay.ids)
        else:
            an.pin(lay.ids, name, "attention input channels not on the last dimension")
    # one element per head: every row of a head (in q, k and v) and its output columns go together.
    # Grouped-query attention (fewer key / value heads than query heads, Llama): one element per
    # key / value head, with the query heads that share it [choice: whole KV groups go, so the
    # number of query heads per KV head stays what the code assumes]
    d = int(getattr(m, spec.head_dim))
    h = int(getattr(m, spec.heads)) if spec.heads else getattr(m, spec.q).weight.shape[0] // d
    kv = getattr(m, spec.k).weight.shape[0] // d
    if kv == h:
        per_query = an.new(h)
        rows = kv_rows = np.repeat(per_query, d)
    else:
        heads_kv = an.new(kv)
        per_query = np.repeat(heads_kv, h // kv)
        kv_rows, rows = np.repeat(heads_kv, d), np.repeat(per_query, d)
    for path, dim in spec.per_head:  # a relative-position bias table indexed by head (Swin)
        mname, _, attr = f"{name}.{path}".rpartition(".")
        an.slot(mname, attr, dim, "norm", like=per_query)
    an.unify(_out_slot(an, f"{name}.{spec.q}", getattr(m, spec.q), 0), rows)
    for proj in (spec.k, spec.v):
        an.unify(_out_slot(an, f"{name}.{proj}", getattr(m, proj), 0), kv_rows)
    shapes = node.shapes
    first = shapes[0] if _multi(shapes) else shapes
    nd = len(first) if isinstance(first, torch.Size) else 3
    if spec.out is None:  # the heads' concatenated context leaves the module
        return [Layout(nd - 1, rows), None]
    an.slot(f"{name}.{spec.out}", "weight", 1, "in", like=rows)
    out_ids = _out_slot(an, f"{name}.{spec.out}", getattr(m, spec.out), 0)
    return [Layout(nd - 1, out_ids), None]


def _attention_fixup(m: Any, before: dict[str, Any]) -> None:  # noqa: ARG001
    spec = head_spec(m)
    d = getattr(m, spec.head_dim)
    heads = getattr(m, spec.q).weight.shape[0] // d
    if spec.heads:
        setattr(m, spec.heads, heads)
    for attr, value in (("num_heads", heads), ("num_key_value_heads", getattr(m, spec.k).weight.shape[0] // d)):
        if isinstance(getattr(m, attr, None), int):
            setattr(m, attr, value)
    if hasattr(m, "all_head_size"):
        m.all_head_size = heads * d


def register_attention(cls: type, spec: HeadSpec) -> None:
    """Teach the analysis a multi-head attention class whose heads can be pruned."""
    HEAD_SPECS[cls] = spec
    register_handler(cls, _attention, _attention_fixup)


def _register_transformers() -> None:
    # Teaches the analysis transformers' layers (Conv1D, attention classes, RMSNorms, BERT heads).
    # Called when the analysis first meets a transformers module, not when fastprune is imported
    # (importing transformers costs ~2.4 s here). fastprune.nn.MultiheadSelfAttention registers
    # itself (fastprune/nn/attention.py).
    _register_gpt_conv1d()
    _register_llama_family()
    _register_hf_attention()
    try:  # HuggingFace BERT-style self-attention; transformers is optional and heavy
        from transformers.models.bert.modeling_bert import BertSelfAttention
    except Exception as e:  # noqa: BLE001 - transformers missing or incompatible: no BERT heads, said so
        IMPORT_FAILURES["transformers.models.bert.modeling_bert"] = (
            f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}; BERT-style self-attention "
            "heads are not pruned (its q/k/v/output widths are kept)"
        )
        return
    register_attention(
        BertSelfAttention,
        HeadSpec("query", "key", "value", None, "num_attention_heads", "attention_head_size", self_only=True),
    )


# Linear-like layers: class -> the weight dim holding the input features (the output features are
# the other one). nn.Linear is (out, in); transformers' Conv1D (GPT-2) is (in, out).
LINEAR_LIKE: dict[type, int] = {nn.Linear: 1}


def linear_in_dim(module: nn.Module) -> int | None:
    """The weight dim of a Linear-like layer's input features, None for other modules."""
    for cls in type(module).__mro__:
        if cls in LINEAR_LIKE:
            return LINEAR_LIKE[cls]
    return None


def _gpt_conv1d_fixup(m: Any, before: dict[str, Any]) -> None:  # noqa: ARG001
    m.nx, m.nf = m.weight.shape


def _register_gpt_conv1d() -> None:
    try:  # transformers is optional and heavy: read only once a transformers module was seen
        from transformers.pytorch_utils import Conv1D
    except Exception as e:  # noqa: BLE001 - transformers missing or incompatible
        IMPORT_FAILURES["transformers.pytorch_utils"] = (
            f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}; GPT-2's Conv1D layers are "
            "boundaries"
        )
        return
    LINEAR_LIKE[Conv1D] = 0
    register_handler(Conv1D, _linear, _gpt_conv1d_fixup)


# Llama-style decoders (grouped-query attention, RMSNorm): the module paths and class prefixes of
# the families that share LlamaAttention's layout (q/k/v/o_proj, head_dim, heads inferred)
_LLAMA_FAMILY = (("llama", "Llama"), ("mistral", "Mistral"), ("qwen2", "Qwen2"))
NORM_LIKE: set[type] = set()  # RMSNorm-style modules over the last dim with a (C,) weight


def normalises_channels(m: nn.Module) -> bool:
    """A normalisation whose statistics run over the channels (what ``prune_norms`` lets channels
    through, never exactly)."""
    return isinstance(m, (nn.LayerNorm, nn.RMSNorm, nn.GroupNorm)) or type(m) in NORM_LIKE


def _register_llama_family() -> None:
    for mod, prefix in _LLAMA_FAMILY:
        path = f"transformers.models.{mod}.modeling_{mod}"
        try:
            module = importlib.import_module(path)
        except Exception as e:  # noqa: BLE001 - transformers without this family, or incompatible
            if mod == "llama":
                IMPORT_FAILURES[path] = (
                    f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}; Llama attention heads "
                    "are not pruned"
                )
            continue
        attn = getattr(module, f"{prefix}Attention", None)
        if attn is not None:
            register_attention(attn, HeadSpec("q_proj", "k_proj", "v_proj", "o_proj", None, "head_dim", self_only=True))
        norm = getattr(module, f"{prefix}RMSNorm", None)
        if norm is not None:
            NORM_LIKE.add(norm)
            register_handler(norm, _channel_norm, _norm_fixup)


def _gpt2_attention(an: Any, name: str, m: Any, node: Node, graph: Graph, layouts: dict) -> Any:
    """GPT-2's attention: one fused Conv1D ``c_attn`` (in, 3 C) split into q | k | v, heads of
    ``head_dim`` in each, and ``c_proj``. One element per head: its rows in each third of c_attn and its
    columns of c_proj. Cross-attention keeps its channels."""
    if getattr(m, "is_cross_attention", False):
        _pin_inputs(an, node, layouts, name, "GPT-2 cross-attention: its heads are kept", always=True)
        return None
    x = _arg(node, 0, "hidden_states")
    lay = layouts.get(x) if isinstance(x, Ref) else None
    shape = graph.shape_of(x) if isinstance(x, Ref) else None
    if lay is not None:
        if shape is not None and lay.cdim == len(shape) - 1:
            an.slot(f"{name}.c_attn", "weight", 0, "in", like=lay.ids)
        else:
            an.pin(lay.ids, name, "attention input channels not on the last dimension")
    rows = np.repeat(an.new(int(m.num_heads)), int(m.head_dim))
    an.unify(_out_slot(an, f"{name}.c_attn", m.c_attn, 1), np.concatenate([rows, rows, rows]))
    an.slot(f"{name}.c_proj", "weight", 0, "in", like=rows)
    out_ids = _out_slot(an, f"{name}.c_proj", m.c_proj, 1)
    shapes = node.shapes
    first = shapes[0] if _multi(shapes) else shapes
    nd = len(first) if isinstance(first, torch.Size) else 3
    return [Layout(nd - 1, out_ids), None]


def _gpt2_attention_fixup(m: Any, before: dict[str, Any]) -> None:  # noqa: ARG001
    m.num_heads = m.c_proj.weight.shape[0] // m.head_dim
    m.split_size = m.num_heads * m.head_dim


def _register_hf_attention() -> None:
    """transformers 5.x attention classes with the Llama layout (q/k/v/o_proj), GPT-2's fused one."""
    families = (
        ("vit", "ViTAttention", HeadSpec("q_proj", "k_proj", "v_proj", "o_proj", "num_attention_heads", "head_dim",
                                         self_only=True)),
        ("swin", "SwinAttention", HeadSpec("q_proj", "k_proj", "v_proj", "o_proj", "num_attention_heads", "head_dim",
                                           self_only=True,
                                           per_head=(("relative_position_bias.relative_position_bias_table", 1),))),
    )  # fmt: skip
    for mod, cls_name, spec in families:
        path = f"transformers.models.{mod}.modeling_{mod}"
        try:
            cls = getattr(importlib.import_module(path), cls_name)
        except Exception as e:  # noqa: BLE001 - transformers without this family, or incompatible
            IMPORT_FAILURES[path] = f"{type(e).__name__}: {str(e)[:160]}; {cls_name} heads are not pruned"
            continue
        register_attention(cls, spec)
    path = "transformers.models.gpt2.modeling_gpt2"
    try:
        gpt2 = importlib.import_module(path).GPT2Attention
    except Exception as e:  # noqa: BLE001
        IMPORT_FAILURES[path] = f"{type(e).__name__}: {str(e)[:160]}; GPT-2 attention heads are not pruned"
        return
    register_handler(gpt2, _gpt2_attention, _gpt2_attention_fixup)
