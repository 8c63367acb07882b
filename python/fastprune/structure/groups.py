"""Coupled-channel groups: which channels of which tensors must be removed together.

The analysis walks the traced graph (:mod:`fastprune.structure.trace`) once. Every channel of
every prunable tensor dimension (a *slot*: ``conv.weight`` dim 0, ``linear.weight`` dim 1, a
BatchNorm's ``running_mean``...) is an element of a union-find; every value flowing through the
graph carries a *layout*: which dimension holds its channels and, per position along it, which
element it is. Operations unify elements (a residual add unifies its operands position by
position, a depthwise conv its input and output channels, a BatchNorm its parameters with its
input), concatenate or slice layouts (``cat``, ``split``), repeat them (``flatten`` into a Linear:
one channel becomes a block of H*W positions), or pin them (a LayerNorm normalises over its
channels, the model's inputs and outputs are fixed, an unknown op is not understood): a pinned
element is never removed.

A *channel* of the result is one union-find class; a :class:`Group` is a set of channels tied by
the layers that produce them (one conv's output channels form one group, and a residual add
merges the groups of its operands). Each member of a group is one tensor dimension with an index
map from its positions to the group's channels.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from fastprune._modes import eval_mode
from fastprune.structure import handlers as H
from fastprune.structure.trace import Graph, Ref, TraceError, refs_in, trace

__all__ = ["Group", "GroupList", "Member", "as_inputs", "find_groups"]


@dataclass(frozen=True)
class Member:
    """One tensor dimension of a group.

    Attributes:
        tensor: canonical name of the parameter or buffer (``"layer1.0.conv1.weight"``).
        module: qualified name of the module that owns it; attr: its attribute name there.
        dim: the dimension along which channels are removed.
        role: ``"out"`` (a layer's output channels: filter, bias), ``"norm"`` (a normalisation
            layer's per-channel parameters and statistics) or ``"in"`` (a consumer's input channels).
        index: per position along ``dim``, the group channel it belongs to (-1: another group's).
    """

    tensor: str
    module: str
    attr: str
    dim: int
    role: str
    index: tuple[int, ...]

    def positions(self, channels: Iterable[int]) -> list[int]:
        """Positions along ``dim`` that belong to the given group channels."""
        chosen = np.fromiter(channels, dtype=np.int64)
        idx = np.asarray(self.index, dtype=np.int64)
        if not len(chosen) or not len(idx):
            return []
        mark = np.zeros(max(int(idx.max()), int(chosen.max())) + 1, dtype=bool)
        mark[chosen] = True
        return np.flatnonzero((idx >= 0) & mark[np.maximum(idx, 0)]).tolist()


@dataclass(frozen=True)
class Group:
    """Channels that must be removed together; ``channels`` counts them, ``pinned`` lists those
    that can never be removed (they reach a boundary)."""

    id: int
    channels: int
    members: tuple[Member, ...]
    pinned: frozenset[int] = frozenset()

    @property
    def prunable(self) -> list[int]:
        return [c for c in range(self.channels) if c not in self.pinned]

    @property
    def layers(self) -> list[str]:
        seen: dict[str, None] = {}
        for m in self.members:
            seen.setdefault(m.module, None)
        return list(seen)

    @property
    def producers(self) -> list[Member]:
        return [m for m in self.members if m.role == "out" and m.attr in H.WEIGHT_ATTRS]

    def __repr__(self) -> str:
        prod = ", ".join(sorted({m.module for m in self.producers}))
        return (
            f"Group(id={self.id}, channels={self.channels}, prunable={len(self.prunable)}, "
            f"producers=[{prod}], members={len(self.members)})"
        )

    @classmethod
    def from_dict(cls, d: Any) -> Group:
        """Inverse of :meth:`to_dict` (a plan's group entry)."""
        members = tuple(
            Member(m["tensor"], m["module"], m["attr"], int(m["dim"]), m["role"], tuple(m["index"]))
            for m in d["members"]
        )
        return cls(int(d["id"]), int(d["channels"]), members, frozenset(d.get("pinned", ())))

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "channels": self.channels,
            "pinned": sorted(self.pinned),
            "members": [
                {
                    "tensor": m.tensor,
                    "module": m.module,
                    "attr": m.attr,
                    "dim": m.dim,
                    "role": m.role,
                    "index": list(m.index),
                }
                for m in self.members
            ],
        }


class GroupList(list):
    """``list[Group]`` with what the analysis found on the way: ``boundaries`` (name, reason)
    where pruning stops, ``frontend`` (``"fx"`` or ``"dynamic"``), ``notes`` and, with
    ``prune_norms``, ``approximate_norms`` (the normalisations channels may pass)."""

    boundaries: list[tuple[str, str]]
    frontend: str
    notes: list[str]
    approximate_norms: Sequence[str] = ()
    all_channels: int = 0  # channels written by every producing layer, boundaries included
    fixed_channels: int = 0  # of those, the ones a boundary keeps
    _trace: Any = None

    def summary(self) -> str:
        lines = [f"{len(self)} groups (traced with {self.frontend})"]
        lines += [f"  {g!r}" for g in self]
        if self.boundaries:
            lines.append("boundaries:")
            lines += [f"  {n}: {r}" for n, r in self.boundaries]
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


# ------------------------------------------------------------------------------ analysis
class Analysis:
    """Union-find over channel elements, slots and value layouts (used by the handlers)."""

    def __init__(self, model: nn.Module, prune_norms: bool = False) -> None:
        self.model = model
        self.prune_norms = prune_norms
        self.approximate_norms: list[str] = []  # norms whose channels may go (prune_norms): not exact
        self.parent: list[int] = []
        self.pinned: set[int] = set()
        self.slots: dict[tuple[str, int], dict[str, Any]] = {}
        self.boundaries: dict[str, str] = {}
        self.param_views: dict[Ref, tuple[str, str, tuple[int | None, ...]]] = {}
        self.pinned_at: dict[str, list[int]] = {}  # boundary -> the elements it fixed
        # values whose channels span two dims (a channel shuffle's view): Ref -> (first dim, id grid)
        self.split_layouts: dict[Ref, tuple[int, np.ndarray]] = {}
        self.current = -1  # the node being analysed
        self.modules = dict(model.named_modules())
        # canonical tensor names: the first name under which each Parameter/buffer appears
        self.canonical: dict[int, str] = {}
        for name, p in model.named_parameters(remove_duplicate=False):
            self.canonical.setdefault(id(p), name)
        for name, b in model.named_buffers(remove_duplicate=False):
            self.canonical.setdefault(id(b), name)

    # union-find
    def new(self, n: int) -> np.ndarray:
        start = len(self.parent)
        self.parent.extend(range(start, start + n))
        return np.arange(start, start + n, dtype=np.int64)

    def find(self, a: int) -> int:
        p = self.parent
        root = a
        while p[root] != root:
            root = p[root]
        while p[a] != root:
            p[a], a = root, p[a]
        return root

    def unify(self, a: np.ndarray, b: np.ndarray) -> None:
        if len(a) != len(b):
            raise RuntimeError(f"internal: unify of {len(a)} and {len(b)} channels")
        for x, y in zip(a.tolist(), b.tolist(), strict=True):
            rx, ry = self.find(x), self.find(y)
            if rx != ry:
                self.parent[ry] = rx

    def pin(self, ids: np.ndarray | None, where: str, reason: str) -> None:
        if ids is None or len(ids) == 0:
            return
        self.pinned.update(ids.tolist())
        self.boundaries.setdefault(where, reason)
        self.pinned_at.setdefault(where, []).extend(ids.tolist())

    # values that are a parameter or buffer (or a view / broadcast of one): which of its dims each
    # dim of the value is, so a parameter broadcast along the channels can join their group
    _VIEWS = frozenset(
        "view reshape unsqueeze squeeze expand expand_as broadcast_to contiguous clone to permute transpose".split()
    )

    def track_param_view(self, i: int, node: Any, graph: Graph) -> None:
        if node.op != "call":
            return
        if node.target == "get_attr":
            name = node.args[0]
            mname, _, attr = name.rpartition(".")
            mod = self.modules.get(mname)
            t = getattr(mod, attr, None) if mod is not None else None
            if isinstance(t, torch.Tensor) and (attr in mod._parameters or attr in mod._buffers):
                self.param_views[Ref(i)] = (mname, attr, tuple(range(t.dim())))
            return
        src = node.args[0] if node.args else None
        if node.target not in self._VIEWS or not isinstance(src, Ref) or src not in self.param_views:
            return
        mname, attr, dims = self.param_views[src]
        xs, out = graph.shape_of(src), node.shapes
        if xs is None or not isinstance(out, torch.Size):
            return
        if node.target in ("permute", "transpose"):
            nd = len(xs)
            if node.target == "permute":
                order = (
                    node.args[1:] if len(node.args) > 2 or not isinstance(node.args[1], (tuple, list)) else node.args[1]
                )
                order = [int(d) % nd for d in order]
            else:
                a, b = int(node.args[1]) % nd, int(node.args[2]) % nd
                order = list(range(nd))
                order[a], order[b] = order[b], order[a]
            self.param_views[Ref(i)] = (mname, attr, tuple(dims[d] for d in order))
            return
        if node.target in ("expand", "expand_as", "broadcast_to"):
            if len(out) >= len(xs):  # new leading dims, and size-1 dims broadcast
                lead = (None,) * (len(out) - len(xs))
                self.param_views[Ref(i)] = (
                    mname, attr, lead + tuple(d if xs[j] == out[len(lead) + j] else None for j, d in enumerate(dims))
                )  # fmt: skip
            return
        # a re-view: the dims that are not 1 must be the same, in the same order
        src_big = [(j, n) for j, n in enumerate(xs) if n != 1]
        out_big = [(j, n) for j, n in enumerate(out) if n != 1]
        if [n for _, n in src_big] != [n for _, n in out_big]:
            return
        new: list[int | None] = [None] * len(out)
        for (js, _), (jo, _) in zip(src_big, out_big, strict=True):
            new[jo] = dims[js]
        self.param_views[Ref(i)] = (mname, attr, tuple(new))

    def param_dim(self, a: Any, k: int) -> tuple[str, str, int] | None:
        """(module, attribute, parameter dim) when value ``a``'s dim ``k`` is a parameter's dim."""
        v = self.param_views.get(a) if isinstance(a, Ref) else None
        if v is None or k >= len(v[2]) or v[2][k] is None:
            return None
        return v[0], v[1], v[2][k]

    # slots
    def tensor_name(self, module_name: str, attr: str) -> str:
        mod = self.modules[module_name]
        t = getattr(mod, attr + "_orig", None) if hasattr(mod, attr + "_mask") else getattr(mod, attr, None)
        if t is not None and id(t) in self.canonical:
            name = self.canonical[id(t)]
            return name[: -len("_orig")] if name.endswith("_orig") else name
        return f"{module_name}.{attr}" if module_name else attr

    def slot(
        self, module_name: str, attr: str, dim: int, role: str, like: np.ndarray | None = None
    ) -> np.ndarray | None:
        """Element ids of ``module.attr`` along ``dim`` (created on first use; tied tensors share).
        ``like``: ids the slot is unified with (a new slot simply takes them: no union needed)."""
        mod = self.modules[module_name]
        t = getattr(mod, attr, None)
        if not isinstance(t, torch.Tensor):
            return None
        key = (self.tensor_name(module_name, attr), dim)
        s = self.slots.get(key)
        if s is None:
            fresh = like is None or len(like) != t.shape[dim]
            ids = self.new(t.shape[dim]) if fresh else np.array(like, dtype=np.int64)
            s = {"ids": ids, "module": module_name, "attr": attr, "dim": dim, "role": role}
            self.slots[key] = s
            if not fresh:
                return ids
        if like is not None:
            self.unify(s["ids"], like)
        return s["ids"]


def _layout_of(layouts: dict[Ref, Any], a: Any) -> Any:
    return layouts.get(a) if isinstance(a, Ref) else None


def analyse(model: nn.Module, graph: Graph, prune_norms: bool = False) -> Analysis:
    an = Analysis(model, prune_norms)
    layouts: dict[Ref, Any] = {}
    an.layouts = layouts
    for i, node in enumerate(graph.nodes):
        an.current = i
        if node.op == "input":
            continue  # inputs carry no tracked channels: whatever meets them keeps its channels
        if node.op != "call" and an.split_layouts:  # a module or the output reading split channels
            for r in refs_in([*node.args, *node.kwargs.values()]):
                if r in an.split_layouts:
                    an.pin(an.split_layouts[r][1].reshape(-1), str(node.target), "reads channels split over two dims")
        if node.op == "output":
            for r in refs_in(node.args):
                lay = layouts.get(r)
                if lay is not None:
                    an.pin(lay.ids, "<outputs>", "the model's outputs keep their channels")
            continue
        if node.op == "module":
            mod = an.modules[node.target]
            out = H.module_handler(mod)(an, node.target, mod, node, graph, layouts)
        else:
            an.track_param_view(i, node, graph)
            out = H.call(an, node, graph, layouts)
        if isinstance(out, H.Layout):
            layouts[Ref(i)] = out
        elif isinstance(out, (tuple, list)):
            for j, lay in enumerate(out):
                if lay is not None:
                    layouts[Ref(i, j)] = lay
    return an


def _groups_from(an: Analysis) -> list[Group]:
    # full path compression by pointer jumping (vectorised): root[e] is e's class
    root = np.asarray(an.parent, dtype=np.int64)
    while True:
        nxt = root[root]
        if np.array_equal(nxt, root):
            break
        root = nxt
    pinned_roots = set(root[list(an.pinned)].tolist()) if an.pinned else set()
    # group-level union over classes: all output channels of one producer belong together
    gparent: dict[int, int] = {}

    def gfind(a: int) -> int:
        gparent.setdefault(a, a)
        while gparent[a] != a:
            gparent[a] = gparent[gparent[a]]
            a = gparent[a]
        return a

    def ordered_unique(x: np.ndarray) -> np.ndarray:
        _, first = np.unique(x, return_index=True)
        return x[np.sort(first)]

    producer_slots = [s for s in an.slots.values() if s["role"] == "out" and s["attr"] in H.WEIGHT_ATTRS]
    for s in producer_slots:
        comps = ordered_unique(root[s["ids"]]).tolist()
        r0 = gfind(comps[0])
        for c in comps[1:]:
            rc = gfind(c)
            if rc != r0:
                gparent[rc] = r0
    order: dict[int, list[int]] = {}
    seen: set[int] = set()
    for s in producer_slots:
        for c in ordered_unique(root[s["ids"]]).tolist():
            if c not in seen:
                seen.add(c)
                order.setdefault(gfind(c), []).append(c)
    gid = {g: k for k, g in enumerate(order)}
    lookup_group = np.full(len(root), -1, dtype=np.int64)
    lookup_chan = np.full(len(root), -1, dtype=np.int64)
    for g, comps in order.items():
        lookup_group[comps] = gid[g]
        lookup_chan[comps] = np.arange(len(comps))
    members: list[list[Member]] = [[] for _ in order]
    for (tname, dim), s in an.slots.items():
        comps = root[s["ids"]]
        gs, ks = lookup_group[comps], lookup_chan[comps]
        for g in np.unique(gs[gs >= 0]).tolist():
            index = tuple(np.where(gs == g, ks, -1).tolist())
            members[g].append(Member(tname, s["module"], s["attr"], dim, s["role"], index))
    groups = []
    an.root = root
    an.group_roots = []
    for g, comps in order.items():
        pinned = frozenset(k for k, c in enumerate(comps) if c in pinned_roots)
        groups.append(Group(len(groups), len(comps), tuple(members[gid[g]]), pinned))
        an.group_roots.append(comps)
    return groups


def _effect(an: Analysis, groups: Sequence[Group], where: str) -> str:
    """What a boundary costs: the channels it keeps and the layers that write them (``<outputs>``,
    whose channels are the model's interface, is not annotated)."""
    if where == "<outputs>" or where not in an.pinned_at:
        return ""
    roots = set(an.root[an.pinned_at[where]].tolist())
    layers: dict[str, None] = {}
    kept = 0
    for g, comps in zip(groups, an.group_roots, strict=True):
        hit = [c for c in comps if c in roots]
        if hit:
            kept += len(hit)
            for m in g.producers:
                layers.setdefault(m.module, None)
    if not kept:
        return ""
    names = list(layers)
    shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
    return f" [keeps {kept} channels written by {len(names)} layer(s): {shown}]"


def _unknown_attention(model: nn.Module) -> list[str]:
    """Attention modules the analysis has no head description for (never a silent "heads kept")."""
    out = []
    for name, m in model.named_modules():
        cls = type(m).__name__
        if "attention" not in cls.lower() or H.is_handled(m):
            continue
        subs = [d for d in m.modules() if d is not m]
        if any(H.head_spec(d) is not None or isinstance(d, nn.MultiheadAttention) for d in subs):
            continue  # a wrapper around an attention fastprune knows (BertAttention)
        if not any(H.linear_in_dim(d) is not None for d in subs):
            continue
        out.append(
            f"{cls} at {name or '<root>'}: no head description (HeadSpec) for this attention class, so its heads "
            "are not pruned as heads (fastprune.structure.handlers.register_attention teaches it)"
        )
    return out


def as_inputs(example_inputs: Any) -> tuple:
    """A tensor or a sequence of inputs as the tuple of positional inputs."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs)
    raise TypeError(f"example_inputs must be a tensor or a tuple of tensors, got {type(example_inputs).__name__}")


def find_groups(
    model: nn.Module,
    example_inputs: Any,
    *,
    include: Sequence[str] | str | None = None,
    exclude: Sequence[str] | str | None = None,
    prune_norms: bool = False,
) -> GroupList:
    """The model's coupled-channel groups.

    Args:
        model: any ``nn.Module``; traced with ``torch.fx``, or run once under a recorder when FX
            cannot trace it. It is not modified (it runs in eval mode for the trace and gets its
            training flag back).
        example_inputs: a tensor or a tuple of positional inputs; the shapes the analysis sees.
        include / exclude: module-name globs; a group is kept only if one of its producing layers
            matches ``include`` (when given) and none of its members matches ``exclude``.
        prune_norms: let channels pass through LayerNorm / RMSNorm (over the channels) and GroupNorm,
            slicing their affine parameters (Torch-Pruning and LLM width pruning do this). Removing
            a channel then changes the statistics the norm computes for the others, so compaction is
            approximate: it measures and reports the deviation (``approximate_norms`` lists them).

    Returns:
        A :class:`GroupList` (a list of :class:`Group`, each with at least one removable channel),
        with ``boundaries``: ``(name, reason)`` where channels are fixed (LayerNorm, unknown
        modules or functions, the model's inputs and outputs).

    Raises:
        fastprune.structure.TraceError: neither FX nor a run on the example inputs worked; the
            message says why, naming the failing code where torch does.
    """
    inputs = as_inputs(example_inputs)
    try:
        with eval_mode(model):
            graph = trace(model, inputs, H.is_handled)
            an = analyse(model, graph, prune_norms)
    except TraceError:
        raise  # says what failed, with the inputs' dtypes and shapes
    except RuntimeError as e:
        if "shape" in str(e) or "size" in str(e) or "channels" in str(e):
            raise ValueError(f"example_inputs do not fit the model: {e}") from e
        raise
    groups = _groups_from(an)
    inc = [include] if isinstance(include, str) else include
    exc = [exclude] if isinstance(exclude, str) else exclude
    out = GroupList()
    roots: list[list[int]] = []
    for g in groups:
        if not g.prunable:
            continue
        if inc and not any(fnmatch.fnmatchcase(m.module, p) for m in g.producers for p in inc):
            continue
        if exc and any(fnmatch.fnmatchcase(m.module, p) for m in g.members for p in exc):
            continue
        out.append(Group(len(out), g.channels, g.members, g.pinned))
        roots.append(an.group_roots[g.id])
    out.boundaries = [(w, r + _effect(an, groups, w)) for w, r in sorted(an.boundaries.items())]
    # what the zero analysis of compaction needs (see fastprune.structure.zeros)
    out._trace = (graph, an.layouts, an.root, roots)
    out.frontend = graph.frontend
    out.approximate_norms = list(an.approximate_norms)
    out.all_channels = sum(g.channels for g in groups)
    out.fixed_channels = sum(len(g.pinned) for g in groups)
    out.notes = list(graph.notes) + _unknown_attention(model)
    if any(type(m).__module__.startswith("transformers.") for m in model.modules()):
        out.notes += [f"could not import {mod} ({why})" for mod, why in H.IMPORT_FAILURES.items()]
    return out
