"""Which removed channels are provably exact zeros at their consumers, without running the model.

After :func:`~fastprune.structure.surgery.mask_channels` with ``zero_norm`` (filters, biases, BN
gamma, beta and running mean zeroed), a removed channel leaves its producers as an exact zero. This
pass follows those zeros through the traced graph: zero-preserving activations (f(0) = 0), pooling,
reshapes, concatenation and splitting keep them, a sum stays zero where every operand is zero, a
product where one factor is, a BatchNorm where its own channel was zeroed; anything else (a
sigmoid, an unknown op) makes the channel unknown. When every consumer of every removed channel is
known to read zeros, compaction removes them without a forward pass; otherwise it measures.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from fastprune.structure import handlers as H
from fastprune.structure.trace import Ref

__all__ = ["zero_consumers"]

# f(0) == 0 exactly, channel by channel
_PRESERVE = frozenset(
    """relu relu6 gelu silu tanh hardswish hardtanh leaky_relu elu selu celu mish softsign
tanhshrink dropout dropout1d dropout2d dropout3d alpha_dropout feature_alpha_dropout identity clone
contiguous detach to float double half bfloat16 type_as abs neg square sin sqrt hardshrink softshrink
flatten view reshape unflatten permute transpose swapaxes t movedim interpolate upsample pad
max_pool1d max_pool2d max_pool3d avg_pool1d avg_pool2d avg_pool3d adaptive_avg_pool1d
adaptive_avg_pool2d adaptive_avg_pool3d adaptive_max_pool1d adaptive_max_pool2d adaptive_max_pool3d
max_pool2d_with_indices adaptive_max_pool2d_with_indices mean sum amax amin max min getitem split chunk
tensor_split unbind cat stack""".split()
)


def _roots_of(layout: Any, root: Any) -> set[int]:
    return set(root[layout.ids].tolist()) if layout is not None else set()


def _zero_roots_of(t: Any, ids: Any, root: Any, among: set[int]) -> set[int]:
    """Roots r in ``among`` whose every position in ``t`` (1-D, aligned with ``ids``) is exactly 0."""
    if t is None:
        return set(among)
    r = root[ids]
    nz = set(r[(t.detach() != 0).cpu().numpy()].tolist())
    return {x for x in among if x not in nz}


def zero_consumers(model: nn.Module, trace: Any, removed: Mapping[int, Sequence[int]]) -> dict[str, bool] | None:
    """Per consumer module (of any removed channel): True when every removed channel it reads is an
    exact zero in every call. None when the trace is not available."""
    if trace is None:
        return None
    graph, layouts, root, group_roots = trace
    zero_roots = {group_roots[g][c] for g, chans in removed.items() for c in chans}
    modules = dict(model.named_modules())
    Z: dict[Ref, set[int]] = {}
    seen_by: dict[str, list[bool]] = {}

    def zs(a: Any) -> set[int] | None:
        return Z.get(a) if isinstance(a, Ref) else None

    def note(module: str, inp: Any) -> None:
        lay = layouts.get(inp) if isinstance(inp, Ref) else None
        needed = _roots_of(lay, root) & zero_roots
        seen_by.setdefault(module, []).append(needed <= Z.get(inp, set()))

    for i, node in enumerate(graph.nodes):
        ref = Ref(i)
        if node.op in ("input", "output"):
            continue
        if node.op == "module":
            mod = modules[node.target]
            x = node.args[0] if node.args else next(iter(node.kwargs.values()), None)
            if isinstance(mod, (nn.modules.conv._ConvNd, nn.Linear)):
                note(node.target, x)
            elif (spec := H.head_spec(mod)) is not None:
                if spec.self_only:
                    q = k = v = x
                else:
                    q = node.args[0] if node.args else node.kwargs.get("query")
                    k = (node.args[1] if len(node.args) > 1 else node.kwargs.get("key")) or q
                    v = (node.args[2] if len(node.args) > 2 else node.kwargs.get("value")) or k
                for proj, inp in ((spec.q, q), (spec.k, k), (spec.v, v)):
                    note(f"{node.target}.{proj}", inp)
                # a removed head's v rows are zero: its context softmax(.) @ v is zero where v's bias is
                vproj = getattr(mod, spec.v)
                dead = ~vproj.weight.detach().ne(0).any(1)
                ok = vproj.bias is None or not bool(vproj.bias.detach()[dead].any())
                if spec.out is not None:
                    seen_by.setdefault(f"{node.target}.{spec.out}", []).append(ok)
                elif ok and layouts.get(Ref(i, 0)) is not None:
                    Z[Ref(i, 0)] = _roots_of(layouts[Ref(i, 0)], root) & zero_roots
            if isinstance(mod, nn.modules.batchnorm._BatchNorm):
                # BN(0) = beta - gamma * mean / sigma: zero where beta = 0 and gamma or mean = 0
                lay = layouts.get(ref)
                zin = (zs(x) or set()) & zero_roots
                if lay is not None and zin:
                    zb = _zero_roots_of(mod.bias, lay.ids, root, zin)
                    zg = _zero_roots_of(mod.weight, lay.ids, root, zb) | _zero_roots_of(
                        mod.running_mean, lay.ids, root, zb
                    )
                    Z[ref] = zg
                continue
            if isinstance(mod, (nn.modules.conv._ConvNd, nn.Linear, nn.Embedding)):
                # a producer: its candidate channels have all-zero filters; zero where the bias is
                lay = layouts.get(ref)
                if lay is not None:
                    Z[ref] = _zero_roots_of(
                        getattr(mod, "bias", None), lay.ids, root, _roots_of(lay, root) & zero_roots
                    )
                continue
            spec = H.head_spec(mod)
            if spec is not None and spec.out is not None:
                lay = layouts.get(Ref(i, 0))
                if lay is not None:
                    Z[Ref(i, 0)] = _zero_roots_of(
                        getattr(mod, spec.out).bias, lay.ids, root, _roots_of(lay, root) & zero_roots
                    )
            continue
        name = node.target
        ins = [a for a in (*node.args, *node.kwargs.values())]
        flat = []
        for a in ins:
            if isinstance(a, (list, tuple)):
                flat += [b for b in a if isinstance(b, Ref)]
            elif isinstance(a, Ref):
                flat.append(a)
        if name in _PRESERVE:
            zsets = [Z.get(a, set()) for a in flat if layouts.get(a) is not None]
            base = set.union(*zsets) if zsets else set()
        elif name in ("add", "sub", "maximum", "minimum"):
            scalars = [a for a in node.args[:2] if not isinstance(a, (Ref, tuple))]
            if any(s != 0 for s in scalars):
                base = set()
            else:
                zsets = [Z.get(a, set()) for a in flat if layouts.get(a) is not None]
                base = set.intersection(*zsets) if zsets else set()
                if any(layouts.get(a) is None for a in flat):
                    base = set()
        elif name == "mul":
            zsets = [Z.get(a, set()) for a in flat if layouts.get(a) is not None]
            base = set.union(*zsets) if zsets else set()
        else:
            base = set()
        shapes = node.shapes
        if isinstance(shapes, tuple) and not hasattr(shapes, "numel"):
            for j in range(len(shapes)):
                Z[Ref(i, j)] = base & _roots_of(layouts.get(Ref(i, j)), root)
        Z[ref] = base & _roots_of(layouts.get(ref), root)
        if name == "getitem" and isinstance(node.args[0], Ref) and isinstance(node.args[1], int):
            src = Ref(node.args[0].node, node.args[1])
            if src in Z:
                Z[ref] = Z[src]
    return {m: all(calls) for m, calls in seen_by.items()}
