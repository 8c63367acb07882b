"""What each consumer reads on each channel, proved from the traced graph without running the model.

Every channel value in the graph is in one of three states: **zero** (exactly 0 everywhere),
**fixed** (the same for every model input: a constant map, not necessarily uniform over space) or
**unknown**. The rules, channel by channel, in eval mode:

* a conv / Linear / Embedding output channel whose filter is all zero is its bias: zero when the
  bias is 0 (or absent), else fixed;
* a depthwise conv reads only its own channel: fixed in -> fixed out (a padded kernel makes the
  border differ from the interior, so the map need not be uniform), zero in -> its bias;
* BatchNorm maps zero to ``beta - gamma * mean / sigma`` (zero only when that is 0) and fixed to
  fixed; with gamma = 0 it outputs beta whatever comes in;
* an elementwise function of a fixed value is fixed, of a zero value zero when f(0) = 0 (ReLU,
  ReLU6, GELU, SiLU, tanh..., not sigmoid); pooling, padding with 0, reshapes, slicing,
  concatenation, reductions over other dimensions keep both states;
* a sum is zero / fixed where every operand is (a model parameter broadcast over the channels
  counts as fixed); a product is zero where one factor is, fixed where all are.

A value that reaches a consumer (a conv or Linear mixing channels) fixed is input-independent: it
can be measured once and folded into the consumer's bias (exact for a Linear or an unpadded conv
when the map is uniform). :func:`fastprune.compact` uses this to remove channels through
channel-wise chains (expansion -> BN -> act -> depthwise -> BN -> act -> projection, with a
squeeze-excite gate after the depthwise) and skips the measuring forward when every removed
channel reads exact zeros.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from fastprune.structure import handlers as H
from fastprune.structure.trace import Ref, refs_in

__all__ = ["ChannelStates", "channel_states", "following_norm", "zero_consumers", "zero_rows"]

# elementwise with f(0) == 0 exactly (clamp-like functions are checked on their bounds below)
_ZERO_UNARY = frozenset(
    """relu relu6 gelu silu tanh hardswish leaky_relu elu selu celu mish softsign tanhshrink dropout
dropout1d dropout2d dropout3d alpha_dropout feature_alpha_dropout identity clone contiguous detach to
float double half bfloat16 type_as abs neg square sin sqrt sign erf hardshrink softshrink silu_ gelu_
relu_ nan_to_num stochastic_depth""".split()
)
_CLAMPS = {"hardtanh": (-1.0, 1.0), "clamp": (None, None), "clip": (None, None)}
# channel-preserving ops whose output position reads only the same channel
_SHAPE = frozenset(
    """flatten view reshape unflatten permute transpose swapaxes t movedim getitem split chunk
tensor_split unbind split_with_sizes cat stack interpolate upsample""".split()
)
_ZERO_REDUCTIONS = frozenset("mean sum amax amin max min prod norm std var".split())


@dataclass
class ChannelStates:
    """Per consumer module and call: ``(present, zero, fixed)``, the roots of interest its input
    carries, those that are exactly zero and those that are fixed (zero ones included).
    ``heads``: attention output projections, per call, whether every head whose value rows are
    zero contributes exactly zero (those channels are judged by their producers' zeros)."""

    reads: dict[str, list[tuple[frozenset[int], frozenset[int], frozenset[int]]]] = field(default_factory=dict)
    heads: dict[str, list[bool]] = field(default_factory=dict)

    def fixed_everywhere(self, module: str, r: int) -> bool | None:
        """Whether root ``r`` is fixed in every call of ``module`` (None: the module was not seen)."""
        calls = self.reads.get(module)
        if calls is None:
            return None
        return all(r not in present or r in fixed for present, _, fixed in calls)

    def zero_everywhere(self, module: str, r: int) -> bool:
        calls = self.reads.get(module)
        return calls is not None and all(r not in present or r in zero for present, zero, _ in calls)


def _roots(layout: Any, root: np.ndarray) -> set[int]:
    return set(root[layout.ids].tolist()) if layout is not None else set()


def _all_roots(flags: torch.Tensor | np.ndarray, ids: np.ndarray, root: np.ndarray, among: set[int]) -> set[int]:
    """Roots r in ``among`` for which every position of ``ids`` mapping to r has ``flags`` True."""
    f = flags.cpu().numpy() if isinstance(flags, torch.Tensor) else np.asarray(flags)
    if len(f) != len(ids):
        return set()
    r = root[ids]
    bad = set(r[~f].tolist())
    return {x for x in among if x not in bad}


def zero_rows(
    t: torch.Tensor | None, dim: int, n: int, cache: dict[tuple[int, int], torch.Tensor] | None = None
) -> torch.Tensor:
    """Per index along ``dim`` (length n): every element is exactly 0 (True for a missing tensor).
    ``cache``: results by (tensor id, dim), for callers that ask about the same weights twice."""
    if t is None:
        return torch.ones(n, dtype=torch.bool)
    key = (id(t), dim)
    if cache is not None and key in cache:
        return cache[key]
    d = t.detach()
    out = ~d.ne(0).movedim(dim, 0).reshape(d.shape[dim], -1).any(1)
    if cache is not None:
        cache[key] = out
    return out


def _scalar(a: Any) -> float | None:
    if isinstance(a, bool) or not isinstance(a, (int, float)):
        return None
    return float(a)


def channel_states(
    model: nn.Module,
    trace: Any,
    roots: Iterable[int],
    *,
    zero_filters: Iterable[int] = (),
    cache: dict[tuple[int, int], torch.Tensor] | None = None,
) -> ChannelStates | None:
    """The three-state analysis of the module docstring for the given union-find roots (the
    channels asked about); None when the trace is not available. ``zero_filters``: roots already
    known to have every producing filter zero (their weights are not read again); ``cache``: see
    :func:`zero_rows`."""
    if trace is None:
        return None
    walk = _Walk(model, trace, set(roots), set(zero_filters), cache)
    for i, node in enumerate(walk.graph.nodes):
        if node.op == "module":
            walk.module_node(walk.modules[node.target], node, i)
        elif node.op not in ("input", "output"):
            walk.call_node(node, i)
    return walk.out


class _Walk:
    """The analysis' state: per value, its zero (Z) and fixed (K, Z included) roots of interest."""

    def __init__(self, model: nn.Module, trace: Any, interest: set[int], known_zero: set[int], cache: Any) -> None:
        self.graph, self.layouts, self.root, _ = trace
        self.interest, self.known_zero, self.cache = interest, known_zero, cache
        self.modules = dict(model.named_modules())
        self.Z: dict[Ref, set[int]] = {}
        self.K: dict[Ref, set[int]] = {}
        self.out = ChannelStates()

    def here(self, ref: Ref) -> set[int]:
        return _roots(self.layouts.get(ref), self.root) & self.interest

    def zk(self, a: Any) -> tuple[set[int], set[int]]:
        return (self.Z.get(a, set()), self.K.get(a, set())) if isinstance(a, Ref) else (set(), set())

    def note(self, module: str, inp: Any) -> None:
        """``module`` reads ``inp``: record what it sees on the channels of interest."""
        lay = self.layouts.get(inp) if isinstance(inp, Ref) else None
        present = _roots(lay, self.root) & self.interest
        z, k = self.zk(inp)
        self.out.reads.setdefault(module, []).append(
            (frozenset(present), frozenset(z & present), frozenset(k & present))
        )

    def put(self, ref: Ref, z: set[int], k: set[int]) -> None:
        h = self.here(ref)
        self.Z[ref], self.K[ref] = z & h, (k | z) & h

    def module_node(self, mod: nn.Module, node: Any, i: int) -> None:
        ref = Ref(i)
        x = node.args[0] if node.args else next(iter(node.kwargs.values()), None)
        lay = self.layouts.get(ref)
        if isinstance(mod, nn.modules.conv._ConvNd) or H.linear_in_dim(mod) is not None:
            self.note(node.target, x)
        if (spec := H.head_spec(mod)) is not None:
            if spec.self_only:
                q = k = v = x
            else:
                q = node.args[0] if node.args else node.kwargs.get("query")
                k = (node.args[1] if len(node.args) > 1 else node.kwargs.get("key")) or q
                v = (node.args[2] if len(node.args) > 2 else node.kwargs.get("value")) or k
            for proj, inp in ((spec.q, q), (spec.k, k), (spec.v, v)):
                self.note(f"{node.target}.{proj}", inp)
            # a head whose v rows are zero has context softmax(.) @ v = its v bias: zero where that is
            vproj = getattr(mod, spec.v)
            dead = ~vproj.weight.detach().ne(0).any(1)
            ok = vproj.bias is None or not bool(vproj.bias.detach()[dead].any())
            o = Ref(i, 0)
            if spec.out is not None:
                self.out.heads.setdefault(f"{node.target}.{spec.out}", []).append(ok)
                olay = self.layouts.get(o)
                if olay is not None:
                    oproj = getattr(mod, spec.out)
                    n = oproj.weight.shape[0]
                    among = self.here(o)
                    fz = _all_roots(zero_rows(oproj.weight, 0, n), olay.ids, self.root, among)
                    self.put(o, fz & _all_roots(zero_rows(oproj.bias, 0, n), olay.ids, self.root, among), fz)
            elif ok and self.layouts.get(o) is not None:
                # the removed heads' context columns: zero (their v rows and bias are)
                olay = self.layouts[o]
                n = vproj.weight.shape[0]
                z = _all_roots(dead & zero_rows(vproj.bias, 0, n), olay.ids, self.root, self.here(o))
                self.put(o, z, z)
            return
        if lay is None:
            return
        among = self.here(ref)
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            zin, kin = self.zk(x)
            n = len(lay.ids)
            beta0 = _all_roots(zero_rows(mod.bias, 0, n), lay.ids, self.root, among)
            gamma0 = (
                _all_roots(zero_rows(mod.weight, 0, n), lay.ids, self.root, among) if mod.weight is not None else set()
            )
            mean0 = _all_roots(zero_rows(mod.running_mean, 0, n), lay.ids, self.root, among)
            # BN(0) = beta - gamma * mean / sigma (batch statistics of a zero channel: mean 0)
            zero_of_zero = beta0 & (gamma0 | mean0 | (among if mod.running_mean is None or mod.training else set()))
            self.put(ref, (zin & zero_of_zero) | (gamma0 & beta0), kin | gamma0)
            return
        if isinstance(mod, (nn.modules.conv._ConvNd, nn.Embedding)) or H.linear_in_dim(mod) is not None:
            w = mod.weight
            if isinstance(mod, nn.Embedding):
                dim = 1
            elif (ind := H.linear_in_dim(mod)) is not None:
                dim = 1 - ind
            elif isinstance(mod, nn.modules.conv._ConvNd) and mod.transposed:
                if mod.groups != 1:
                    return
                dim = 1
            else:
                dim = 0
            n = w.shape[dim]
            fz = among & self.known_zero
            if among - fz:
                fz |= _all_roots(zero_rows(w, dim, n, self.cache), lay.ids, self.root, among - fz)
            bz = _all_roots(zero_rows(getattr(mod, "bias", None), 0, n), lay.ids, self.root, among)
            z, k = fz & bz, set(fz)
            if (
                isinstance(mod, nn.modules.conv._ConvNd)
                and not mod.transposed
                and mod.groups > 1
                and mod.groups == mod.in_channels == mod.out_channels
            ):
                zin, kin = self.zk(x)  # depthwise: channel c reads only channel c
                z |= zin & bz
                k |= kin
            self.put(ref, z, k)
            return

    def call_node(self, node: Any, i: int) -> None:
        ref = Ref(i)
        name = node.target
        args = [*node.args, *node.kwargs.values()]
        refs = refs_in(args)
        laid = [a for a in refs if self.layouts.get(a) is not None]
        unlaid = [a for a in refs if self.layouts.get(a) is None]
        params = [a for a in args if isinstance(a, tuple) and len(a) == 2 and a[0] == "param"]
        scalars = [s for a in node.args if (s := _scalar(a)) is not None]
        zsets = [self.zk(a)[0] for a in laid]
        ksets = [self.zk(a)[1] for a in laid]

        def inter(sets: Sequence[set[int]]) -> set[int]:
            return set.intersection(*sets) if sets else set()

        def union(sets: Sequence[set[int]]) -> set[int]:
            return set.union(*sets) if sets else set()

        z: set[int] = set()
        k: set[int] = set()
        if name in ("cat", "stack"):
            z, k = union(zsets), union(ksets)  # each operand brings its own channels
        elif name in _SHAPE or "pool" in name:
            z, k = inter(zsets), inter(ksets)
        elif name == "pad":
            value = node.kwargs.get("value", node.args[3] if len(node.args) > 3 else 0)
            k = inter(ksets)
            z = inter(zsets) if value is None or _scalar(value) == 0.0 else set()
        elif name in H.UNARY or name in ("softmax", "log_softmax") or name in H.REDUCTIONS:
            if len(refs) == 1 and laid:  # one tensor in (other arguments are constants of the code)
                k = set(ksets[0])
                if name in _ZERO_UNARY or name in _ZERO_REDUCTIONS:
                    z = set(zsets[0])
                elif name in _CLAMPS:
                    lo, hi = _CLAMPS[name]
                    lo = _scalar(node.args[1]) if len(node.args) > 1 else _scalar(node.kwargs.get("min", lo))
                    hi = _scalar(node.args[2]) if len(node.args) > 2 else _scalar(node.kwargs.get("max", hi))
                    if name == "hardtanh":  # hardtanh(x, min_val=-1, max_val=1)
                        lo = _scalar(node.kwargs.get("min_val", lo if lo is not None else -1.0))
                        hi = _scalar(node.kwargs.get("max_val", hi if hi is not None else 1.0))
                    if (lo is None or lo <= 0.0) and (hi is None or hi >= 0.0):
                        z = set(zsets[0])
        elif name in H.BINARY and laid:
            constant_operands = not unlaid  # parameters and numbers are the same for every input
            if name in ("add", "sub", "rsub", "maximum", "minimum"):
                k = inter(ksets) if constant_operands else set()
                if constant_operands and not params and all(s == 0.0 for s in scalars):
                    z = inter(zsets)
            elif name == "mul":
                z = union(zsets)
                k = inter(ksets) if constant_operands else set()
            elif name == "div":
                num = node.args[0] if node.args else None
                if isinstance(num, Ref) and self.layouts.get(num) is not None:
                    z = set(self.zk(num)[0])
                k = inter(ksets) if constant_operands else set()
            else:
                k = inter(ksets) if constant_operands else set()
        shapes = node.shapes
        if isinstance(shapes, tuple) and not isinstance(shapes, torch.Size):
            for j in range(len(shapes)):
                self.put(Ref(i, j), z, k)
        self.put(ref, z, k)
        if name == "getitem" and node.args and isinstance(node.args[0], Ref) and isinstance(node.args[1], int):
            src = Ref(node.args[0].node, node.args[1])
            zs, ks = self.zk(src)
            self.put(ref, zs, ks)


def zero_consumers(model: nn.Module, trace: Any, removed: Mapping[int, Sequence[int]]) -> dict[str, bool] | None:
    """Per consumer module (of any removed channel): True when every removed channel it reads is an
    exact zero in every call. None when the trace is not available."""
    if trace is None:
        return None
    group_roots = trace[3]
    zero_roots = {group_roots[g][c] for g, chans in removed.items() for c in chans}
    states = channel_states(model, trace, zero_roots)
    assert states is not None
    known = {m: all(present <= zero for present, zero, _ in calls) for m, calls in states.reads.items()}
    known.update({m: all(calls) for m, calls in states.heads.items()})
    return known


def following_norm(model: nn.Module, trace: Any, module: str) -> str | None:
    """The BatchNorm (with running statistics) that is the only reader of ``module``'s only call,
    if there is one: a constant added to ``module``'s output can then go into its running mean."""
    if trace is None:
        return None
    graph = trace[0]
    calls = [i for i, n in enumerate(graph.nodes) if n.op == "module" and n.target == module]
    if len(calls) != 1:
        return None
    i = calls[0]
    users = [n for n in graph.nodes if any(r.node == i for r in refs_in([*n.args, *n.kwargs.values()]))]
    if len(users) != 1 or users[0].op != "module" or not users[0].args or users[0].args[0] != Ref(i):
        return None
    bn = dict(model.named_modules()).get(users[0].target)
    if not isinstance(bn, nn.modules.batchnorm._BatchNorm) or bn.running_mean is None:
        return None
    return users[0].target
