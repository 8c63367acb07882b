"""A small graph of a model's forward, for channel-dependency analysis.

Two front ends produce the same :class:`Graph`:

* :func:`trace_fx`: ``torch.fx`` symbolic tracing with fastprune's own leaf rule (modules that a
  handler claims are leaves; everything else is traced through, its own parameters becoming
  ``get_attr`` values), shapes filled in by running the traced module once on the example inputs.
* :func:`trace_dynamic`: the fallback for code FX cannot trace (data-dependent control flow,
  ``len()`` of proxies, ...): the model runs once on the example inputs under a
  ``TorchFunctionMode`` that records every torch call outside leaf modules, and forward hooks
  record the leaf-module calls. It sees exactly the path taken on those inputs. Here modules that
  own parameters directly are leaves too (their parameters would arrive unnamed).

Nodes refer to the values they consume with :class:`Ref`; a value is a tensor with a known shape.
Function targets are normalised to short names (``"add"``, ``"cat"``, ``"flatten"``...) so the
analysis has one table for ``torch.add``, ``Tensor.add``, ``Tensor.__add__`` and ``operator.add``.
"""

from __future__ import annotations

import contextlib
import io
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp
from torch.nn.utils.stateless import _reparametrize_module
from torch.overrides import TorchFunctionMode

__all__ = [
    "Graph",
    "LeafTracer",
    "Node",
    "Ref",
    "TraceError",
    "is_leaf",
    "refs_in",
    "structure_tracer",
    "trace",
    "trace_dynamic",
    "trace_fx",
]


class TraceError(RuntimeError, ValueError):
    """Neither front end could build a graph of the model."""


@dataclass(frozen=True)
class Ref:
    """A value: output ``index`` (None for a single tensor output) of node ``node``."""

    node: int
    index: int | None = None


@dataclass
class Node:
    """One call. ``op`` is ``"input"``, ``"module"`` (``target`` = qualified module name),
    ``"call"`` (``target`` = normalised function name) or ``"output"``."""

    op: str
    target: str
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    shapes: Any = None  # torch.Size for a tensor output, a tuple of them for tuple outputs, else None
    raw: Any = None  # the original callable, for error messages


@dataclass
class Graph:
    nodes: list[Node]
    frontend: str
    notes: list[str] = field(default_factory=list)

    def shape_of(self, ref: Ref) -> torch.Size | None:
        s = self.nodes[ref.node].shapes
        if ref.index is None:
            return s if isinstance(s, torch.Size) else None
        if isinstance(s, tuple) and ref.index < len(s) and isinstance(s[ref.index], torch.Size):
            return s[ref.index]
        return None


_ALIASES = {
    "iadd": "add",
    "radd": "add",
    "isub": "sub",
    "rsub": "rsub",
    "imul": "mul",
    "rmul": "mul",
    "truediv": "div",
    "itruediv": "div",
    "rtruediv": "rdiv",
    "concat": "cat",
    "concatenate": "cat",
    "multiply": "mul",
    "subtract": "sub",
    "divide": "div",
    "true_divide": "div",
}


def refs_in(x: Any) -> list[Ref]:
    """Every :class:`Ref` in a node's (nested) arguments."""
    if isinstance(x, Ref):
        return [x]
    if isinstance(x, (tuple, list)):
        return [r for v in x for r in refs_in(v)]
    if isinstance(x, dict):
        return [r for v in x.values() for r in refs_in(v)]
    if isinstance(x, slice):
        return refs_in((x.start, x.stop, x.step))
    return []


def normalise(fn: Any) -> str:
    """Short, canonical name of a function, method or operator (``Tensor.__iadd__`` -> ``add``)."""
    if isinstance(fn, str):
        name = fn
    else:
        name = getattr(fn, "__name__", None) or type(fn).__name__
        if name == "__get__":  # Tensor.shape and other properties seen by a TorchFunctionMode
            name = getattr(getattr(fn, "__self__", None), "__name__", name)
    name = name.strip("_")
    if name.endswith("_") and name not in ("_",):
        name = name.rstrip("_")
    return _ALIASES.get(name, name)


def is_leaf(module: nn.Module, handled: Callable[[nn.Module], bool]) -> bool:
    """Leaf = a module a handler claims, or one that owns parameters directly (its forward may use
    them in ways the analysis cannot see). Parameter-free modules are traced through."""
    if handled(module):
        return True
    return any(True for _ in module.parameters(recurse=False))


def _shape(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.shape
    if isinstance(x, (tuple, list)) and any(isinstance(v, torch.Tensor) for v in x):
        return tuple(v.shape if isinstance(v, torch.Tensor) else None for v in x)
    return None


# -------------------------------------------------------------------------------------- FX
class LeafTracer(torch.fx.Tracer):
    """The package's one ``torch.fx`` tracer: a module is a leaf (called, not traced into) when
    ``leaf(module)`` says so, or, with ``torch_leaves``, when it is one of torch's own layers (FX's
    default). The structure analysis traces into everything it does not handle; ``sparsify``'s passes
    keep torch's layers and fastprune's sparse layers whole."""

    def __init__(self, leaf: Callable[[nn.Module], bool], *, torch_leaves: bool = False) -> None:
        super().__init__()
        self._leaf = leaf
        self._torch_leaves = torch_leaves

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return self._leaf(m) or (self._torch_leaves and super().is_leaf_module(m, qualname))


def structure_tracer(handled: Callable[[nn.Module], bool]) -> LeafTracer:
    """The tracer of the structure analysis: leaves are the modules a handler claims. A module that
    owns parameters directly but has no handler (a ConvNeXt block's layer scale, a ViT's position
    embedding) is traced through: its parameters appear as ``get_attr`` values, which the analysis
    follows (a parameter broadcast along the channels joins their group) or treats as untracked."""
    return LeafTracer(handled)


class _MetaShapeProp(ShapeProp):
    """Normalisation layers keep their input's shape: skip their (Python-decomposed, slow) meta
    kernels."""

    def call_module(self, target: Any, args: Any, kwargs: Any) -> Any:
        mod = self.fetch_attr(target)
        if isinstance(mod, _SAME_SHAPE) and args and isinstance(args[0], torch.Tensor):
            return torch.empty_like(args[0])
        return super().call_module(target, args, kwargs)


_SAME_SHAPE = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm)


def _propagate_shapes(gm: torch.fx.GraphModule, inputs: Sequence[Any]) -> None:
    """Fill ``node.meta["tensor_meta"]``: on the meta device first (shapes only, no arithmetic:
    several times faster on a large model), on the real tensors when some op has no meta kernel."""
    with torch.no_grad():
        try:
            meta = {
                k: torch.empty_like(v, device="meta")
                for k, v in [*gm.named_parameters(remove_duplicate=False), *gm.named_buffers(remove_duplicate=False)]
            }
            # ShapeProp prints a traceback before it raises: the caller reports the error itself
            with _reparametrize_module(gm, meta, tie_weights=True), contextlib.redirect_stderr(io.StringIO()):
                _MetaShapeProp(gm).propagate(*[x.to("meta") if isinstance(x, torch.Tensor) else x for x in inputs])
            return
        except Exception:  # noqa: BLE001 - no meta kernel, data-dependent code...: run it for real
            pass
        with contextlib.redirect_stderr(io.StringIO()):
            ShapeProp(gm).propagate(*inputs)


def trace_fx(model: nn.Module, inputs: Sequence[Any], handled: Callable[[nn.Module], bool]) -> Graph:
    """Symbolic trace; raises whatever FX raises when the code is not traceable."""
    tracer = structure_tracer(handled)
    fx_graph = tracer.trace(model)
    gm = torch.fx.GraphModule(model, fx_graph)

    placeholders = [n for n in fx_graph.nodes if n.op == "placeholder"]
    if len(placeholders) < len(inputs):
        raise TraceError(f"the model's forward takes {len(placeholders)} inputs, {len(inputs)} were given")
    _propagate_shapes(gm, inputs)

    index: dict[torch.fx.Node, int] = {}
    nodes: list[Node] = []

    def conv(a: Any) -> Any:
        if isinstance(a, torch.fx.Node):
            return Ref(index[a])
        if isinstance(a, (tuple, list)):
            return type(a)(conv(v) for v in a)
        if isinstance(a, dict):
            return {k: conv(v) for k, v in a.items()}
        if isinstance(a, slice):
            return slice(conv(a.start), conv(a.stop), conv(a.step))
        return a

    def meta_shape(n: torch.fx.Node) -> Any:
        tm = n.meta.get("tensor_meta")
        if tm is None:
            return None
        if hasattr(tm, "shape"):
            return torch.Size(tm.shape)
        if isinstance(tm, (tuple, list)):
            return tuple(torch.Size(t.shape) if hasattr(t, "shape") else None for t in tm)
        return None

    for n in fx_graph.nodes:
        args, kwargs = conv(n.args), conv(n.kwargs)
        if n.op == "placeholder":
            node = Node("input", n.target, shapes=meta_shape(n))
        elif n.op == "call_module":
            node = Node("module", n.target, args, kwargs, meta_shape(n))
        elif n.op == "get_attr":
            node = Node("call", "get_attr", (n.target,), {}, meta_shape(n))
        elif n.op == "call_function":
            name = "getitem" if n.target is operator.getitem else normalise(n.target)
            node = Node("call", name, args, kwargs, meta_shape(n), raw=n.target)
        elif n.op == "call_method":
            node = Node("call", normalise(n.target), args, kwargs, meta_shape(n), raw=n.target)
        elif n.op == "output":
            node = Node("output", "output", args)
        else:  # pragma: no cover - FX has no other ops
            raise TraceError(f"unknown FX op {n.op}")
        index[n] = len(nodes)
        nodes.append(node)
    return Graph(nodes, "fx")


# --------------------------------------------------------------------------------- dynamic
class _Recorder(TorchFunctionMode):
    def __init__(self, graph: list[Node], ids: dict[int, Ref], keep: list[Any]) -> None:
        super().__init__()
        self.graph, self.ids, self.keep = graph, ids, keep
        self.depth = 0  # > 0 while inside a leaf module

    def ref_args(self, a: Any) -> Any:
        if isinstance(a, torch.Tensor):
            r = self.ids.get(id(a))
            if r is not None:
                return r
            if isinstance(a, nn.Parameter):
                return ("param", tuple(a.shape))
            return ("tensor", tuple(a.shape))
        if isinstance(a, (tuple, list)):
            return type(a)(self.ref_args(v) for v in a)
        if isinstance(a, dict):
            return {k: self.ref_args(v) for k, v in a.items()}
        if isinstance(a, slice):
            return slice(self.ref_args(a.start), self.ref_args(a.stop), self.ref_args(a.step))
        return a

    def record(self, op: str, target: str, args: Any, kwargs: Any, out: Any, raw: Any = None) -> None:
        node = Node(op, target, self.ref_args(tuple(args)), self.ref_args(dict(kwargs or {})), _shape(out), raw)
        i = len(self.graph)
        self.graph.append(node)
        if isinstance(out, torch.Tensor):
            self.ids[id(out)] = Ref(i)
            self.keep.append(out)
        elif isinstance(out, (tuple, list)):
            for j, v in enumerate(out):
                if isinstance(v, torch.Tensor):
                    self.ids[id(v)] = Ref(i, j)
                    self.keep.append(v)

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.depth == 0:
            name = normalise(func)
            if name not in (
                "dim",
                "size",
                "shape",
                "numel",
                "ndim",
                "is_floating_point",
                "get_device",
                "device",
                "dtype",
                "requires_grad",
                "data_ptr",
                "is_contiguous",
                "__len__",
                "len",
            ):
                self.record("call", name, args, kwargs, out, func)
        return out


def trace_dynamic(model: nn.Module, inputs: Sequence[Any], handled: Callable[[nn.Module], bool]) -> Graph:
    """Run the model once, recording torch calls outside leaf modules and the leaf calls."""
    nodes: list[Node] = []
    ids: dict[int, Ref] = {}
    keep: list[Any] = []
    rec = _Recorder(nodes, ids, keep)
    names = {m: n for n, m in model.named_modules()}
    handles = []

    def pre(mod: nn.Module, args: tuple, kwargs: dict) -> None:
        if rec.depth == 0:
            mod._fp_call = (rec.ref_args(args), rec.ref_args(kwargs))  # type: ignore[attr-defined]
        rec.depth += 1

    def post(mod: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:  # noqa: ARG001
        rec.depth -= 1
        if rec.depth == 0:
            a, k = mod.__dict__.pop("_fp_call")
            node = Node("module", names[mod], a, k, _shape(out))
            i = len(nodes)
            nodes.append(node)
            if isinstance(out, torch.Tensor):
                ids[id(out)] = Ref(i)
                keep.append(out)
            elif isinstance(out, (tuple, list)):
                for j, v in enumerate(out):
                    if isinstance(v, torch.Tensor):
                        ids[id(v)] = Ref(i, j)
                        keep.append(v)

    for m in model.modules():
        if m is not model and is_leaf(m, handled):
            handles.append(m.register_forward_pre_hook(pre, with_kwargs=True))
            handles.append(m.register_forward_hook(post, with_kwargs=True))
    for j, x in enumerate(inputs):
        nodes.append(Node("input", f"input_{j}", shapes=_shape(x)))
        if isinstance(x, torch.Tensor):
            ids[id(x)] = Ref(j)
    try:
        with torch.no_grad(), rec:
            out = model(*inputs)
    finally:
        for h in handles:
            h.remove()
        for m in model.modules():
            m.__dict__.pop("_fp_call", None)
    nodes.append(Node("output", "output", (rec.ref_args(out),)))
    return Graph(nodes, "dynamic")


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[0][:300] if lines else ""


def _describe(inputs: Sequence[Any]) -> str:
    return ", ".join(
        f"{str(x.dtype).removeprefix('torch.')} tensor of shape {tuple(x.shape)}"
        if isinstance(x, torch.Tensor)
        else type(x).__name__
        for x in inputs
    )


def trace(model: nn.Module, inputs: Sequence[Any], handled: Callable[[nn.Module], bool]) -> Graph:
    """FX first; on any tracing failure, the dynamic tracer (the reason is kept in ``notes``)."""
    try:
        return trace_fx(model, inputs, handled)
    except Exception as fx_err:  # noqa: BLE001 - any FX failure sends us to the fallback
        try:
            g = trace_dynamic(model, inputs, handled)
        except Exception as dyn_err:
            # the model's own error first (usually the inputs do not fit it), FX's internals last
            raise TraceError(
                f"could not trace {type(model).__name__} on example_inputs ({_describe(inputs)}): running it "
                f"failed with {type(dyn_err).__name__}: {_first_line(dyn_err)} (torch.fx failed too: "
                f"{type(fx_err).__name__})"
            ) from dyn_err
        g.notes.append(
            f"torch.fx could not trace the model ({type(fx_err).__name__}: {str(fx_err)[:200]}); "
            "used the dynamic tracer (the path taken on the example inputs)"
        )
        return g
