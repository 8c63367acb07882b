"""What :func:`fastprune.sparsify` does beyond swapping layers, so that the rest of a sparse model does
not eat the time the sparse kernels save:

- :class:`FastMaxPool2d`: NCHW max pooling through :func:`fastprune.ops.max_pool2d`. torch's CPU
  ``max_pool2d`` on NCHW input is slow (ResNet's stem pool, 64 x 112 x 112, batch 1: 6.2 ms
  against 0.96 ms for the separable form this class used before and 0.32 ms on channels-last
  input, measured with ``torch.utils.benchmark``, 1 thread, torch 2.13); the op's plane loop runs
  it 6.7-7.0x faster than torch's NCHW pool (``benchmarks/bench_pool.py``, results/pool.md, Xeon,
  2026-12-03); the values are the same (a max is exact). Channels-last input goes to torch's own
  (fast) pool.
- :func:`channels_last_pools`: a dense conv whose output only feeds (a ReLU, then) a max pool
  computes channels-last (its weight in that memory format), and the ReLU and the pool become one
  :func:`fastprune.ops.max_pool2d` call (``relu=True``: ``max`` and ``relu`` commute) that reads
  channels-last and writes NCHW for the sparse layers after it.
- :func:`fuse_activations`: a ReLU after a sparse layer, and a residual add (then ReLU) after a sparse
  conv, become the kernels' fused ``relu`` / ``residual`` (one pass over the output instead of three).
  Works on the ``torch.fx`` graph; a model FX cannot trace is left as it is.
- :func:`fuse_bottlenecks`: a ResNet bottleneck without downsampling (1x1 -> kxk -> 1x1 sparse convs
  with their ReLUs, the block's input as the last one's residual) runs as one
  :func:`fastprune.ops.sparse_bottleneck` call (:class:`fastprune.nn.SparseBottleneck`), depth-first
  in bands of rows; kept where it computes the same output and is not slower on the block's input.
- :func:`fuse_ffn`: a transformer's feed-forward block in the HuggingFace form (``*Intermediate``:
  ``dense`` then ``intermediate_act_fn``; ``output.dense`` after it) with both layers sparse runs as
  one :func:`fastprune.ops.sparse_ffn` call (:class:`fastprune.nn.SparseFFNOutput`), kept only where
  the whole model gives the same outputs on the example inputs.
- :func:`fuse_attention`: a HuggingFace model whose attention runs torch's SDPA
  (``config._attn_implementation == "sdpa"``), and each :class:`fastprune.nn.MultiheadSelfAttention`,
  call :func:`fastprune.ops.scaled_dot_product_attention` instead (HuggingFace:
  :func:`use_fastprune_attention`, registered with HuggingFace's ``AttentionInterface`` under
  :data:`HF_ATTENTION`, with SDPA's mask function; calls the op cannot compute, such as
  causal, dropout, grouped-query, soft-capped or off the CPU, go on to torch's SDPA), kept where the
  model gives the same outputs on the example inputs and is not timed slower by the calibration
  margin.
"""

from __future__ import annotations

import copy
import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from fastprune.nn.attention import MultiheadSelfAttention
from fastprune.nn.sparse import SparseBottleneck, SparseConv2d, SparseFFNOutput, SparseLinear, bottleneck_mismatch
from fastprune.ops.attention import scaled_dot_product_attention
from fastprune.ops.pool import max_pool2d
from fastprune.structure.trace import LeafTracer

__all__ = [
    "FastMaxPool2d",
    "channels_last_pools",
    "HF_ATTENTION",
    "fuse_activations",
    "fuse_attention",
    "fuse_bottlenecks",
    "fuse_ffn",
    "graph_tracer",
    "swap_max_pools",
    "use_fastprune_attention",
]


def _pair(v: Any) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


class FastMaxPool2d(nn.MaxPool2d):
    """``nn.MaxPool2d`` (no dilation, no ceil_mode, no indices) whose NCHW input goes to
    :func:`fastprune.ops.max_pool2d` (a C++ kernel: per output row, the max of its window's input
    rows, then of their columns) and channels-last input to torch's own channels-last pool (the
    output keeps the input's format, as torch's). Same values as ``F.max_pool2d``; under autograd,
    off the CPU, or for other dtypes it is ``F.max_pool2d`` itself."""

    @classmethod
    def supports(cls, pool: nn.MaxPool2d) -> bool:
        return (
            not pool.return_indices
            and not pool.ceil_mode
            and _pair(pool.dilation) == (1, 1)
            and all(2 * p <= k for p, k in zip(_pair(pool.padding), _pair(pool.kernel_size), strict=True))
        )

    @classmethod
    def from_pool(cls, pool: nn.MaxPool2d) -> FastMaxPool2d:
        if not cls.supports(pool):
            raise ValueError(f"{pool} uses dilation, ceil_mode or return_indices: keep nn.MaxPool2d")
        return cls(pool.kernel_size, pool.stride, pool.padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (
            x.device.type != "cpu"
            or (torch.is_grad_enabled() and x.requires_grad)
            or x.dim() not in (3, 4)
            or x.dtype not in (torch.float32, torch.float64)
        ):
            return super().forward(x)
        if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
            return super().forward(x)  # torch's channels-last pool is the fast one, and keeps the format
        k, s, p = _pair(self.kernel_size), _pair(self.stride), _pair(self.padding)
        if any(n + 2 * pi < ki for n, pi, ki in zip(x.shape[-2:], p, k, strict=True)):
            return super().forward(x)  # torch's own error message
        x4 = x if x.dim() == 4 else x.unsqueeze(0)
        out = max_pool2d(x4, k, s, p)
        return out if x.dim() == 4 else out.squeeze(0)


def swap_max_pools(model: nn.Module) -> list[str]:
    """Replace every supported ``nn.MaxPool2d`` in ``model`` by :class:`FastMaxPool2d`; returns
    the names replaced."""
    done = []
    for name, mod in list(model.named_modules()):
        if type(mod) is nn.MaxPool2d and FastMaxPool2d.supports(mod):
            model.set_submodule(name, FastMaxPool2d.from_pool(mod))
            done.append(name)
    return done


def graph_tracer() -> LeafTracer:
    """The tracer of sparsify's graph passes: torch's layers, the sparse layers, the separable pool
    and row-tiled blocks (:class:`fastprune.nn.microbatch.RowTiles`) are leaves."""
    return LeafTracer(
        lambda m: isinstance(m, (SparseConv2d, SparseLinear, FastMaxPool2d)) or getattr(m, "_fastprune_leaf", False),
        torch_leaves=True,
    )


_RELU_FUNCS = {torch.relu, torch.relu_, F.relu}
_ADD_FUNCS = {operator.add, operator.iadd, torch.add}


def _is_relu(node: fx.Node, mods: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return type(mods.get(node.target)) is nn.ReLU
    if node.op == "call_function":
        return node.target in _RELU_FUNCS and len(node.args) == 1
    return node.op == "call_method" and node.target in ("relu", "relu_") and len(node.args) == 1


def _is_add(node: fx.Node) -> bool:
    if node.kwargs.get("alpha", 1) != 1 or len(node.args) != 2 or set(node.kwargs) - {"alpha"}:
        return False
    return (node.op == "call_function" and node.target in _ADD_FUNCS) or (
        node.op == "call_method" and node.target in ("add", "add_")
    )


def fuse_activations(model: nn.Module, example_inputs: tuple | None = None) -> tuple[nn.Module, list[str]]:
    """Fold ReLUs and residual adds into the sparse layers that produce their input.

    ``relu(sparse(x))`` -> ``sparse(x)`` with ``relu=True``; ``sparse_conv(x) + r`` (then a ReLU) ->
    ``sparse_conv(x, residual=r)``, only where ``example_inputs`` show ``r`` has the conv output's
    shape and dtype (the kernel does not broadcast). A layer whose output anything else reads, or that
    is called more than once, is left alone. Returns ``(model, fused layer names)``: a
    ``torch.fx.GraphModule`` (same submodules and parameter names) when anything was fused, else
    ``model`` itself (also when FX cannot trace it).
    """
    try:
        graph = graph_tracer().trace(model)
    except Exception:  # noqa: BLE001 - untraceable models run unfused
        return model, []
    gm = fx.GraphModule(model, graph, class_name=type(model).__name__)
    mods = dict(gm.named_modules())
    for node in list(graph.nodes):  # folded BatchNorms are nn.Identity: out of the way
        if node.op == "call_module" and type(mods.get(node.target)) is nn.Identity and len(node.args) == 1:
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    if example_inputs is not None:
        try:
            with torch.no_grad():
                ShapeProp(gm).propagate(*example_inputs)
        except Exception:  # noqa: BLE001 - no shapes: no residual fusion
            example_inputs = None

    def fusable(n: Any, cls: tuple) -> bool:
        return (
            isinstance(n, fx.Node)
            and n.op == "call_module"
            and isinstance(mods.get(n.target), cls)
            and not isinstance(mods[n.target], SparseFFNOutput)  # (its op has no output ReLU)
            and calls[n.target] == 1
            and len(n.users) == 1
            and not mods[n.target].relu
            and "residual" not in n.kwargs
        )

    def meta(n: Any) -> Any:
        return n.meta.get("tensor_meta") if isinstance(n, fx.Node) else None

    def set_relu(target: str) -> None:
        # a shallow copy (same parameters and buffers) in the graph module only: the model given
        # keeps its own layers, whose forward applies the ReLU itself
        mod = copy.copy(mods[target])
        mod.relu = True
        parent, _, attr = target.rpartition(".")
        setattr(gm.get_submodule(parent) if parent else gm, attr, mod)
        mods[target] = mod

    fused: list[str] = []
    for node in list(graph.nodes):
        if node.graph is None:  # erased on an earlier step
            continue
        if example_inputs is not None and _is_add(node):
            for i in (0, 1):
                conv, other = node.args[i], node.args[1 - i]
                mc, mo = meta(conv), meta(other)
                if not fusable(conv, (SparseConv2d,)) or mc is None or mo is None:
                    continue
                if tuple(mc.shape) != tuple(mo.shape) or mc.dtype != mo.dtype or other.op == "get_attr":
                    continue  # (a parameter as residual would not follow the batch size)
                with graph.inserting_before(node):
                    new = graph.call_module(conv.target, conv.args, {"residual": other})
                new.meta = dict(node.meta)
                node.replace_all_uses_with(new)
                graph.erase_node(node)
                graph.erase_node(conv)
                fused.append(conv.target)
                break
        elif _is_relu(node, mods):
            src = node.args[0]
            if fusable(src, (SparseConv2d, SparseLinear)) or (
                isinstance(src, fx.Node)
                and src.op == "call_module"
                and "residual" in src.kwargs
                and calls[src.target] == 1
                and len(src.users) == 1
                and not mods[src.target].relu
            ):
                set_relu(src.target)
                node.replace_all_uses_with(src)
                graph.erase_node(node)
                fused.append(src.target)
    if not fused:
        return model, []
    graph.lint()
    gm.recompile()
    return gm, sorted(set(fused))


def _is_pool(node: fx.Node, mods: dict[str, nn.Module]) -> bool:
    return (
        node.op == "call_module"
        and isinstance(mods.get(node.target), nn.MaxPool2d)
        and not mods[node.target].return_indices
    )


def channels_last_pools(gm: fx.GraphModule) -> list[str]:
    """For each dense ``nn.Conv2d`` whose output only feeds a max pool (directly or through one ReLU
    that nothing else reads): store the conv's weight channels-last, so that torch computes the conv
    in that format, and run the ReLU and the pool as one :func:`fastprune.ops.max_pool2d` call
    (``relu=True`` where the ReLU was: max and ReLU commute), which reads channels-last and writes
    NCHW for the layers after it. ResNet-50's stem at 95 %, batch 8, 1 thread, Xeon (AVX-512):
    ReLU 0.35 + torch's channels-last pool and the NCHW copy 0.92 ms per image before. A pool the
    op does not compute (dilation, ceil_mode) stays torch's channels-last one, its output made
    NCHW-contiguous. Same values. Changes ``gm`` in place (the conv's weight is its own:
    ``sparsify`` works on a copy unless ``inplace``); returns the convs' names."""
    mods = dict(gm.named_modules())
    done = []
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or type(mods.get(node.target)) is not nn.Conv2d or len(node.users) != 1:
            continue
        conv = mods[node.target]
        if conv.weight.device.type != "cpu" or conv.weight.dim() != 4:
            continue
        relu = None
        nxt = next(iter(node.users))
        if _is_relu(nxt, mods) and len(nxt.users) == 1:
            relu, nxt = nxt, next(iter(nxt.users))
        if not _is_pool(nxt, mods) or any(u.op == "call_method" and u.target == "contiguous" for u in nxt.users):
            continue
        with torch.no_grad():
            conv.weight.data = conv.weight.data.contiguous(memory_format=torch.channels_last)
        pool = mods[nxt.target]
        if FastMaxPool2d.supports(pool):
            k, s, p = _pair(pool.kernel_size), _pair(pool.stride), _pair(pool.padding)
            with gm.graph.inserting_after(nxt):
                fused = gm.graph.call_function(max_pool2d, (node, k, s, p, relu is not None))
            nxt.replace_all_uses_with(fused)
            fused.meta = dict(nxt.meta)
            gm.graph.erase_node(nxt)
            if relu is not None:
                gm.graph.erase_node(relu)
        else:
            with gm.graph.inserting_after(nxt):
                back = gm.graph.call_method("contiguous", (nxt,))
            nxt.replace_all_uses_with(back, delete_user_cb=lambda u, back=back: u is not back)
            back.meta = dict(nxt.meta)
        done.append(node.target)
    if done:
        gm.graph.lint()
        gm.recompile()
    return done


class PassThrough(nn.Module):
    """Where a feed-forward block's first layer was called: returns its input; the layer and its
    activation stay here as children (their names in the state dict unchanged) and run inside the
    :class:`fastprune.nn.SparseFFNOutput` that follows."""

    def __init__(self, replaced: nn.Module) -> None:
        super().__init__()
        for name, child in replaced.named_children():
            self.add_module(name, child)
        self.replaced = type(replaced).__name__

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return hidden_states

    def extra_repr(self) -> str:
        return f"was {self.replaced}, now computed by the following SparseFFNOutput"


def _activation_of(act: nn.Module) -> str | None:
    """'gelu' / 'relu' for the exact GELU (torch's, or transformers' GELUActivation) or a ReLU."""
    if type(act) is nn.GELU and act.approximate == "none":
        return "gelu"
    if type(act) is nn.ReLU:
        return "relu"
    if type(act).__name__ == "GELUActivation" and getattr(act, "act", None) is F.gelu:
        return "gelu"
    return None


def _ffn_parts(block: nn.Module) -> tuple[SparseLinear, SparseLinear, str] | None:
    inter, out = getattr(block, "intermediate", None), getattr(block, "output", None)
    if not isinstance(inter, nn.Module) or not type(inter).__name__.endswith("Intermediate"):
        return None
    if set(dict(inter.named_children())) != {"dense", "intermediate_act_fn"}:
        return None
    up, down = inter.dense, getattr(out, "dense", None)
    if type(up) is not SparseLinear or type(down) is not SparseLinear or up.relu or down.relu:
        return None
    act = _activation_of(inter.intermediate_act_fn)
    if act is None or down.in_features != up.out_features or up.values.dtype != down.values.dtype:
        return None
    return up, down, act


def _tensors(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for v in out.values() for t in _tensors(v)]
    if isinstance(out, (list, tuple)):
        return [t for v in out for t in _tensors(v)]
    return []


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    if len(a) != len(b) or not a:
        return False
    for x, y in zip(a, b, strict=True):
        if x.shape != y.shape or x.dtype != y.dtype:
            return False
        if x.is_floating_point():
            scale = float(x.abs().max()) if x.numel() else 0.0
            if not torch.allclose(x, y, rtol=1e-5, atol=1e-6 * max(scale, 1.0)):
                return False
        elif not torch.equal(x, y):
            return False
    return True


def fuse_ffn(model: nn.Module, example_inputs: tuple | None) -> list[str]:
    """Run each HuggingFace-style feed-forward block with both layers sparse as one
    :func:`fastprune.ops.sparse_ffn` call: ``block.intermediate`` (``dense``, then the exact GELU or a
    ReLU) becomes a :class:`PassThrough` and ``block.output.dense`` a
    :class:`fastprune.nn.SparseFFNOutput` computing ``dense(act(intermediate.dense(x)))``. Changes
    ``model`` in place; returns the blocks fused.

    Kept only when the whole model, run on ``example_inputs`` before and after, gives the same
    outputs (to float rounding: the fused op computes the same sums): a model whose blocks read the
    intermediate output elsewhere is left as it was. Without ``example_inputs`` nothing is fused."""
    if example_inputs is None:
        return []
    found = [(name, block, parts) for name, block in model.named_modules() if (parts := _ffn_parts(block))]
    if not found:
        return []
    with torch.no_grad():
        before = _tensors(model(*example_inputs))
    undo = []
    for _, block, (up, down, act) in found:
        undo.append((block, block.intermediate, down))
        block.intermediate = PassThrough(block.intermediate)
        block.output.dense = SparseFFNOutput(up, down, act)
    try:
        with torch.no_grad():
            ok = _same(before, _tensors(model(*example_inputs)))
    except Exception:  # noqa: BLE001 - a model the fusion breaks is restored below
        ok = False
    if not ok:
        for block, inter, down in undo:
            block.intermediate = inter
            block.output.dense = down
        return []
    return [name for name, _, _ in found]


def _bottleneck_nodes(gm: fx.GraphModule) -> list[tuple[fx.Node, fx.Node, fx.Node, fx.Node]]:
    """(conv1, conv2, conv3, input) nodes of each chain conv3(conv2(conv1(x)), residual=x) whose
    intermediate values nothing else reads and whose convs SparseBottleneck can run."""
    mods = dict(gm.named_modules())

    def conv(n: Any) -> SparseConv2d | None:
        m = mods.get(n.target) if isinstance(n, fx.Node) and n.op == "call_module" else None
        return m if isinstance(m, SparseConv2d) else None

    found = []
    for n3 in gm.graph.nodes:
        c3 = conv(n3)
        if c3 is None or len(n3.args) != 1 or set(n3.kwargs) != {"residual"}:
            continue
        n2, x = n3.args[0], n3.kwargs["residual"]
        if conv(n2) is None or len(n2.users) != 1 or len(n2.args) != 1 or n2.kwargs:
            continue
        n1 = n2.args[0]
        if conv(n1) is None or len(n1.users) != 1 or len(n1.args) != 1 or n1.kwargs or n1.args[0] is not x:
            continue
        if not bottleneck_mismatch(conv(n1), conv(n2), c3):
            found.append((n1, n2, n3, x))
    return found


def fuse_bottlenecks(gm: fx.GraphModule, example_inputs: tuple, decide: Any) -> dict[str, str]:
    """Run each bottleneck of ``gm`` (see :func:`_bottleneck_nodes`) as one
    :class:`fastprune.nn.SparseBottleneck`, registered as ``<block>.fused_bottleneck`` (no parameters
    of its own: the state dict is unchanged). Each block's input is recorded on ``example_inputs``;
    the fused block must give the three convs' output on it (to float rounding: on one sample the
    same code runs, bit for bit; on several, the separate 1x1 convs run the vector loops, which sum
    in another order), and ``decide(fused_fn,
    unfused_fn)`` -> (fuse, reason) says whether it pays (``sparsify`` times both). Changes ``gm`` in
    place; returns {block: reason} for every candidate (the fused ones' reasons start "fused")."""
    found = _bottleneck_nodes(gm)
    if not found:
        return {}
    mods = dict(gm.named_modules())
    seen: dict[str, torch.Tensor] = {}
    handles = [
        mods[n1.target].register_forward_pre_hook(lambda m, a, t=n1.target: seen.setdefault(t, a[0]))
        for n1, _, _, _ in found
    ]
    try:
        with torch.no_grad():
            gm(*example_inputs)
    finally:
        for h in handles:
            h.remove()
    out: dict[str, str] = {}
    for i, (n1, n2, n3, _) in enumerate(found):
        c1, c2, c3 = mods[n1.target], mods[n2.target], mods[n3.target]
        prefix = n1.target.rpartition(".")[0]
        name = prefix or f"bottleneck{i}"
        x = seen.get(n1.target)
        if x is None:
            out[name] = "not run on the example inputs"
            continue
        block = SparseBottleneck(c1, c2, c3)
        with torch.no_grad():
            if not _same([block(x)], [c3(c2(c1(x)), x)]):
                out[name] = "the fused block's output differs (not fused)"
                continue
            fuse, reason = decide(lambda b=block, x=x: b(x), lambda x=x, c=(c1, c2, c3): c[2](c[1](c[0](x)), x))
        out[name] = ("fused: " if fuse else "not fused: ") + reason
        if not fuse:
            continue
        target = f"{prefix}.fused_bottleneck" if prefix else f"fused_bottleneck{i}"
        gm.add_submodule(target, block)
        with gm.graph.inserting_before(n3):  # (the input node now: an earlier fusion may have replaced it)
            node = gm.graph.call_module(target, (n1.args[0],))
        n3.replace_all_uses_with(node)
        for n in (n3, n2, n1):
            gm.graph.erase_node(n)
    gm.recompile()
    return out


# ---- attention of HuggingFace models ----

HF_ATTENTION = "fastprune_sdpa"
# keyword arguments whose meaning the op does not have (HuggingFace's SDPA refuses softcap too)
_HF_UNSUPPORTED = ("softcap", "position_bias", "sliding_window", "s_aux", "output_attentions")


def _hf_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """HuggingFace's attention-function protocol: (module, q, k, v (B, H, L, D), mask, ...) ->
    ((B, L, H, D), None), through :func:`fastprune.ops.scaled_dot_product_attention` where it
    computes the same thing as HuggingFace's SDPA function, otherwise through that function."""
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    ours = (
        query.device.type == "cpu"
        and query.dtype in (torch.float32, torch.float64)
        and key.dtype == query.dtype
        and value.dtype == query.dtype
        and query.dim() == 4
        and key.shape[:2] == query.shape[:2]
        and value.shape[:2] == query.shape[:2]
        and dropout == 0.0  # (HuggingFace passes 0.0 outside training)
        and not (query.shape[2] > 1 and attention_mask is None and causal)
        and (attention_mask is None or attention_mask.dtype in (torch.bool, query.dtype))
        and not any(kwargs.get(k) for k in _HF_UNSUPPORTED)
    )
    if not ours:  # (imported here, off the path the op takes; optional: HF models only)
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    out = scaled_dot_product_attention(query, key, value, attention_mask, scaling)
    return out.transpose(1, 2).contiguous(), None


def _hf_sdpa_configs(model: nn.Module) -> list[Any]:
    """The HuggingFace configs of ``model``'s submodules (the model itself, or one wrapped in a
    user's module) that choose torch's SDPA, each once."""
    found: dict[int, Any] = {}
    for mod in model.modules():
        config = getattr(mod, "config", None)
        if getattr(config, "_attn_implementation", None) == "sdpa" and hasattr(config, "sub_configs"):
            found.setdefault(id(config), config)
    return list(found.values())


def _set_attention(configs: list[Any], name: str) -> None:
    for config in configs:
        config._attn_implementation = name


def use_fastprune_attention(model: nn.Module) -> int:
    """Make the HuggingFace models in ``model`` (itself or its submodules) whose attention runs
    torch's SDPA call :func:`fastprune.ops.scaled_dot_product_attention`, in place: their configs,
    sub-configs included, name :data:`HF_ATTENTION`, registered with HuggingFace's
    ``AttentionInterface`` and, with SDPA's mask function, ``AttentionMaskInterface``. Returns how
    many configs it changed: 0 for a model without one or with another attention (eager, which
    returns the attention weights, flash, flex)."""
    configs = _hf_sdpa_configs(model)
    if configs:
        # optional dependency: only a model holding a HuggingFace config gets here
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
        from transformers.modeling_utils import AttentionInterface  # (optional, as above)

        AttentionInterface.register(HF_ATTENTION, _hf_attention)
        AttentionMaskInterface.register(HF_ATTENTION, sdpa_mask)
        _set_attention(configs, HF_ATTENTION)
    return len(configs)


def fuse_attention(model: nn.Module, example_inputs: tuple | None, decide: Any) -> str:
    """Attention through :func:`fastprune.ops.scaled_dot_product_attention`, in place: the HuggingFace
    models in ``model`` that run torch's SDPA (:func:`use_fastprune_attention`) and its
    :class:`fastprune.nn.MultiheadSelfAttention` modules (``fastprune_attention``), kept only when
    the model gives the same outputs on ``example_inputs`` and ``decide(ours, torch's)`` (two
    callables running the model each way) says so; returns what was done and why ("" for a model
    with neither)."""
    configs = _hf_sdpa_configs(model)
    mods = [m for m in model.modules() if isinstance(m, MultiheadSelfAttention)]
    if not configs and not mods:
        return ""
    if example_inputs is None:
        return "kept torch's SDPA: no example_inputs to check the outputs on"
    with torch.no_grad():
        before = _tensors(model(*example_inputs))
    if configs:
        use_fastprune_attention(model)

    def switch(ours: bool) -> None:
        _set_attention(configs, HF_ATTENTION if ours else "sdpa")
        for m in mods:
            m.fastprune_attention = ours

    switch(True)
    try:
        with torch.no_grad():
            ok = _same(before, _tensors(model(*example_inputs)))
    except Exception as e:  # noqa: BLE001 - a model it breaks is restored below
        switch(False)
        return f"kept torch's SDPA: the model failed with fastprune's ({type(e).__name__}: {e})"
    if not ok:
        switch(False)
        return "kept torch's SDPA: the outputs changed with fastprune's"

    def run(ours: bool) -> Any:
        def call() -> None:
            switch(ours)
            with torch.no_grad():
                model(*example_inputs)

        return call

    keep, why = decide(run(True), run(False))
    switch(keep)
    return f"fastprune's attention: {why}" if keep else f"kept torch's SDPA: {why}"
