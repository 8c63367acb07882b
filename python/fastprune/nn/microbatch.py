"""Depth-first execution: a batch a few samples at a time through the whole model
(:class:`MicroBatch`), and a residual block a few rows at a time (:class:`RowTiles`).

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

import copy
import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from fastprune import ops
from fastprune._modes import eval_mode
from fastprune.nn.fuse import graph_tracer
from fastprune.nn.sparse import SparseConv2d, SparseLinear
from fastprune.ops.pool import max_pool2d

__all__ = ["MicroBatch", "RowTiles", "per_sample_ops", "prove_per_sample", "tile_rows"]

# modules that act on each position (and each sample) alone
_PER_POSITION = (
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
)
_MODULES = (
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.Linear,
    *_PER_POSITION,
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
}
# per sample, not per position (they mix rows)
_SPATIAL_FUNCS = {F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d, F.interpolate, max_pool2d}
_ELEMENTWISE |= _SPATIAL_FUNCS
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
    if getattr(mod, "_fastprune_leaf", False):  # RowTiles: one sample at a time by construction
        return True
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


def check_rows(rows: object) -> None:
    """ValueError unless ``rows`` is a positive int (the tile height)."""
    if isinstance(rows, bool) or not isinstance(rows, int) or rows < 1:
        raise ValueError(f"tile_rows must be a positive int, got {rows!r}")


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


# --- row tiles -------------------------------------------------------------------------------------
#
# A residual block (a stretch of the graph between two values that every later node reaches only
# through them) made of convolutions and per-position operations is run on tiles of T output rows,
# one sample at a time: each node computes only the rows its consumers need (a conv's halo: the
# rows its kernel reaches above and below), so a tile's activations stay in L2 from one layer to
# the next instead of every layer's whole output passing through memory. Rows of node v for tile t
# are [t * step_v + lo_v, t * step_v + hi_v): step_v is T times the product of the strides between
# v and the block's output, lo_v / hi_v come from the consumers' needs (the hull when several read
# v). Rows outside a node's image are set to zero, so a conv reading them sees its zero padding
# and runs with no row padding of its own (the same geometry, so the same cached kernel data, in
# every tile). Rows a kernel computes twice (the halos of tiles that meet) are the cost.
#
# Measured (benchmarks/bench_depth_first.py, ResNet-50 at 90 / 95 %, Zen 5, 1 thread): slower than
# whole blocks at every tile height, per stage 0.44-0.95x over two runs, the whole model 0.68-0.73x
# (batch 1) and 0.85-0.99x (batch 8). Each tile pays copies the whole block does not (the
# zero-padded input slab, the residual and the output rows made contiguous for the kernels, the
# tile copied into the output) and a call per layer; and there is little to win on that CPU: per
# sample, batch 8 ran layers 1 and 2 only 5-25 % slower than batch 1 (its 32 MB L3 holds a
# sample's activations), layers 3 and 4 faster. Winning needs the tile loop inside the kernels.

_POINTWISE_MODULES = (*_PER_POSITION, nn.BatchNorm2d)
# per position, out of place, no randomness
_POINTWISE_FUNCS = _ELEMENTWISE - _SPATIAL_FUNCS - {operator.iadd, operator.imul, torch.relu_, F.dropout}
_POINTWISE_METHODS = {"relu", "sigmoid", "tanh", "contiguous", "add", "mul", "sub", "clamp", "clamp_min"}


def _conv_rows(mod: nn.Module) -> tuple[int, int, int, int, int] | None:
    """(kernel rows, row stride, row padding, row dilation, column padding) of a conv the tiles can
    run, else None."""
    if isinstance(mod, SparseConv2d):
        return mod.kernel_size[0], mod.stride[0], mod.padding[0], mod.dilation[0], mod.padding[1]
    if type(mod) is nn.Conv2d and mod.padding_mode == "zeros" and not isinstance(mod.padding, str):
        return mod.kernel_size[0], mod.stride[0], mod.padding[0], mod.dilation[0], mod.padding[1]
    return None


def _pointwise(node: fx.Node, mods: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        mod = mods[node.target]
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            return type(mod) is nn.BatchNorm2d and _module_ok(mod)
        return isinstance(mod, _POINTWISE_MODULES) and _module_ok(mod)
    if node.op == "call_function":
        return node.target in _POINTWISE_FUNCS and not node.kwargs.get("inplace", False)
    return node.op == "call_method" and node.target in _POINTWISE_METHODS


class _Step:
    """One node of a tiled block: what it calls and which rows of which earlier slabs it reads."""

    __slots__ = ("args", "conv", "fn", "kwargs", "lo", "n_rows", "rows", "step")

    def __init__(self) -> None:
        self.args: tuple = ()
        self.kwargs: dict = {}
        self.fn: Any = None
        self.conv: tuple | None = None  # (module, (k, s, p, d, pw)) for convolutions
        self.step = self.lo = self.n_rows = 0
        self.rows: tuple = ()  # (k, s, p, d) for a conv: its height from its input's


class _Slab:
    """Rows [offset, offset + length) of slab ``index`` (an earlier step's output; -1: the input)."""

    __slots__ = ("index", "length", "offset")

    def __init__(self, index: int, offset: int, length: int) -> None:
        self.index, self.offset, self.length = index, offset, length


class RowTiles(nn.Module):
    """A residual block of ``root`` (its nodes ``nodes``, reading one value and producing one) run on
    tiles of ``rows`` output rows, one sample at a time (see the comment above: measured slower
    than the whole block so far). Same values as the block itself, for any input size (a last,
    partial tile computes rows that are then dropped).
    Holds no parameters of its own: it calls ``root``'s modules (not registered here, so the model's
    ``state_dict`` keeps its names)."""

    _fastprune_leaf = True

    def __init__(self, steps: list[_Step], in_rows: tuple[int, int, int], rows: int, names: list[str]) -> None:
        super().__init__()
        self.rows = rows
        self.block = names  # the module names the block calls (for repr and reports)
        object.__setattr__(self, "_steps", steps)
        object.__setattr__(self, "_in", in_rows)  # (step, lo, hi) of the input

    def extra_repr(self) -> str:
        return f"rows={self.rows}, block=[{', '.join(self.block)}]"

    def _heights(self, h: int) -> list[int]:
        hs: list[int] = []
        for st in self._steps:
            if st.rows:
                k, s, p, d = st.rows
                src = st.args[0]
                hin = h if src.index < 0 else hs[src.index]
                hs.append((hin + 2 * p - d * (k - 1) - 1) // s + 1)
            else:
                src = next(a for a in (*st.args, *st.kwargs.values()) if isinstance(a, _Slab))
                hs.append(h if src.index < 0 else hs[src.index])
        return hs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise ValueError(f"RowTiles takes (N, C, H, W) input, got {getattr(x, 'shape', type(x))}")
        heights = self._heights(x.shape[2])
        h_out = heights[-1]
        if h_out < 1:
            raise ValueError(f"input height {x.shape[2]} leaves no output rows in {self.block}")
        in_step, in_lo, in_hi = self._in
        out = None
        for n in range(x.shape[0]):
            xn = x[n : n + 1]
            for r0 in range(0, h_out, self.rows):
                g0 = r0 // self.rows * in_step + in_lo
                src = xn[:, :, max(g0, 0) : max(min(g0 + in_hi - in_lo, x.shape[2]), 0)]
                top = max(-g0, 0)
                bottom = in_hi - in_lo - src.shape[2] - top
                y = self._tile(F.pad(src, (0, 0, top, bottom)) if top or bottom else src, r0 // self.rows, heights)
                r1 = min(r0 + self.rows, h_out)
                if out is None:
                    out = y.new_empty((x.shape[0], y.shape[1], h_out, y.shape[3]))
                out[n : n + 1, :, r0:r1] = y[:, :, : r1 - r0]
        if out is None:  # no samples: the block's output shape from one zero sample
            return self.forward(x.new_zeros((1, *x.shape[1:])))[:0]
        return out

    def _tile(self, slab_in: torch.Tensor, t: int, heights: list[int]) -> torch.Tensor:
        slabs: list[torch.Tensor] = []

        def get(a: Any) -> Any:
            if not isinstance(a, _Slab):
                return a
            s = slab_in if a.index < 0 else slabs[a.index]
            return s if a.offset == 0 and a.length == s.shape[2] else s.narrow(2, a.offset, a.length)

        for st, h in zip(self._steps, heights, strict=True):
            args = [get(a) for a in st.args]
            kwargs = {k: get(v) for k, v in st.kwargs.items()}
            if st.conv is not None:
                mod, (_, _, _, _, pw) = st.conv
                if isinstance(mod, SparseConv2d):
                    y = ops.sparse_conv2d(
                        args[0],
                        mod.row_ptr,
                        mod.col_idx,
                        mod.values,
                        mod.weight_shape,
                        mod.bias,
                        mod.stride,
                        (0, pw),
                        mod.dilation,
                        mod.groups,
                        mod.relu,
                        kwargs.get("residual"),
                    )
                else:
                    y = F.conv2d(args[0], mod.weight, mod.bias, mod.stride, (0, pw), mod.dilation, mod.groups)
            else:
                y = st.fn(*args, **kwargs)
            g0 = t * st.step + st.lo
            top = min(max(-g0, 0), st.n_rows)
            bottom = min(max(h - g0, 0), st.n_rows)
            if top or bottom < st.n_rows:
                if torch.is_grad_enabled() or any(
                    isinstance(a, torch.Tensor) and a.untyped_storage().data_ptr() == y.untyped_storage().data_ptr()
                    for a in (*args, *kwargs.values())
                ):
                    y = y.clone()  # not an input's rows, nor a tensor autograd saved
                y[:, :, :top] = 0
                y[:, :, bottom:] = 0
            slabs.append(y)
        return slabs[-1]


def _blocks(graph: fx.Graph) -> list[list[fx.Node]]:
    """The stretches of ``graph`` between cuts: a cut is a node that, once computed, is the only value
    anything after it still reads. Each stretch: its nodes after the cut that feeds it."""
    nodes = list(graph.nodes)
    pos = {n: i for i, n in enumerate(nodes)}
    last_use = {n: max((pos[u] for u in n.users), default=pos[n]) for n in nodes}
    out: list[list[fx.Node]] = []
    start, live = None, 0  # live: values computed so far that a later node still reads
    ends: dict[int, int] = {}
    for i, n in enumerate(nodes):
        if last_use[n] > i:
            live += 1
            ends[last_use[n]] = ends.get(last_use[n], 0) + 1
        live -= ends.pop(i, 0)
        if live == 1 and last_use[n] > i:  # n is a cut
            if start is not None:
                out.append(nodes[start : i + 1])
            start = i
    return out


def _plan(block: list[fx.Node], mods: dict[str, nn.Module], rows: int) -> RowTiles | str:
    """The tiled form of ``block`` (``block[0]`` the value it reads), or why it cannot be tiled."""
    src, body = block[0], block[1:]
    index = {n: i for i, n in enumerate(body)}
    index[src] = -1
    convs = 0
    for n in body:
        if n.op == "call_module" and _conv_rows(mods[n.target]) is not None:
            if set(n.kwargs) - {"residual"} or len(n.args) != 1:
                return f"{n.name}: a conv called with other arguments"
            convs += 1
        elif not _pointwise(n, mods):
            return f"{n.format_node()} is not a convolution or per-position operation"
        for a in (*n.args, *n.kwargs.values()):
            if isinstance(a, fx.Node) and a not in index:
                return f"{n.name} reads {a.name}, from outside the block"
            if isinstance(a, (list, tuple, dict, slice)):
                return f"{n.name} takes a container argument"
        meta = n.meta.get("tensor_meta")
        if meta is None or not isinstance(meta, fx.passes.shape_prop.TensorMetadata) or len(meta.shape) != 4:
            return f"{n.name}: not a 4-D tensor on the example input"
    if convs < 2:
        return "fewer than two convolutions (nothing for the tiles to keep in cache)"
    # rows each node must provide: (step, lo, hi), from the block's output back
    need: dict[fx.Node, list[int]] = {body[-1]: [rows, 0, rows]}
    reads: dict[tuple[fx.Node, int | str], tuple[int, int, int]] = {}
    for n in reversed(body):
        if n not in need:
            return f"{n.name} does not reach the block's output"
        step, lo, hi = need[n]
        for key, a in [*enumerate(n.args), *n.kwargs.items()]:
            if not isinstance(a, fx.Node):
                continue
            if n.op == "call_module" and key == 0 and (c := _conv_rows(mods[n.target])) is not None:
                k, s, p, d, _ = c
                r = (step * s, lo * s - p, (hi - 1) * s - p + d * (k - 1) + 1)
            else:
                r = (step, lo, hi)
            reads[(n, key)] = r
            if a in need:
                if need[a][0] != r[0]:
                    return f"{a.name} is read at two different strides"
                need[a] = [r[0], min(need[a][1], r[1]), max(need[a][2], r[2])]
            else:
                need[a] = list(r)
    steps: list[_Step] = []
    for n in body:
        st = _Step()
        st.step, st.lo, hi = need[n]
        st.n_rows = hi - st.lo

        def slab(key: int | str, a: Any, n: fx.Node = n) -> Any:
            if not isinstance(a, fx.Node):
                return a
            _, lo_r, hi_r = reads[(n, key)]
            return _Slab(index[a], lo_r - need[a][1], hi_r - lo_r)

        st.args = tuple(slab(i, a) for i, a in enumerate(n.args))
        st.kwargs = {k: slab(k, v) for k, v in n.kwargs.items()}
        if n.op == "call_module":
            mod = mods[n.target]
            c = _conv_rows(mod)
            if c is not None:
                st.conv, st.rows = (mod, c), c[:4]
            elif getattr(mod, "inplace", False):
                mod = copy.copy(mod)
                mod.inplace = False
                st.fn = mod
            else:
                st.fn = mod
        elif n.op == "call_function":
            st.fn = n.target
        else:
            st.fn = lambda self, *a, _m=n.target, **k: getattr(self, _m)(*a, **k)
        steps.append(st)
    names = [n.target for n in body if n.op == "call_module"]
    return RowTiles(steps, tuple(need[src]), rows, names)


def tile_rows(gm: fx.GraphModule, rows: int, min_height: int = 1) -> list[str]:
    """Replace each residual block of ``gm`` made of convolutions and per-position operations (at
    least two convs, output taller than one tile and at least ``min_height`` rows high on the
    example input that shape propagation recorded in the nodes' ``tensor_meta``) by a
    :class:`RowTiles` call. In place;
    returns one line per block: the RowTiles module's name and the modules it runs."""
    check_rows(rows)
    mods = dict(gm.named_modules())
    done = []
    replaced: dict[fx.Node, fx.Node] = {}  # a block's output -> the RowTiles call now producing it
    for k, block in enumerate(_blocks(gm.graph)):
        block = [replaced.get(block[0], block[0]), *block[1:]]
        out_meta = block[-1].meta.get("tensor_meta")
        if not isinstance(out_meta, fx.passes.shape_prop.TensorMetadata) or len(out_meta.shape) != 4:
            continue
        if out_meta.shape[2] < min_height or out_meta.shape[2] <= rows:
            continue  # (one tile: nothing stays in cache that would not anyway, and rows are wasted)
        tiled = _plan(block, mods, rows)
        if isinstance(tiled, str):
            continue
        name = f"row_tiles_{k}"
        gm.add_submodule(name, tiled)
        with gm.graph.inserting_after(block[-1]):
            call = gm.graph.call_module(name, (block[0],))
        call.meta = dict(block[-1].meta)
        block[-1].replace_all_uses_with(call, delete_user_cb=lambda u, c=call: u is not c)
        for n in reversed(block[1:]):
            gm.graph.erase_node(n)
        replaced[block[-1]] = call
        done.append(f"{name}: {', '.join(tiled.block)}")
    if done:
        gm.graph.lint()
        gm.recompile()
    return done
