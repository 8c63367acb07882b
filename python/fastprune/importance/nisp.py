"""NISP's scores (Yu et al., "NISP: Pruning Networks using Neuron Importance Score Propagation",
CVPR 2018, arXiv:1711.05908): the final response layer's units ranked by Infinite Feature Selection.

Inf-FS (Roffo, Melzi, Cristani, "Infinite Feature Selection", ICCV 2015) scores N features from M
samples of them: every feature is a node of a fully connected graph whose edge weights mix how much
two features vary and how little they are correlated; a feature's score sums the weights of every
path through it, of every length, in closed form.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal

import torch
from torch import nn

from fastprune._modes import eval_mode
from fastprune.batches import as_batch, forward_batch
from fastprune.distributed import all_gather_rows, all_or_none
from fastprune.ops import nisp_propagate
from fastprune.structure.groups import as_inputs
from fastprune.structure.handlers import is_handled
from fastprune.structure.trace import Graph, Ref, trace

__all__ = ["inf_fs", "nisp_scores", "propagate_scores", "spearman"]


def _average_ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks 1..M of each column of ``x`` (M, N), ties given the mean of the ranks they span."""
    m, n = x.shape
    order = torch.argsort(x, dim=0, stable=True)
    sorted_x = torch.gather(x, 0, order)
    pos = torch.arange(1, m + 1, dtype=torch.float64).unsqueeze(1).expand(m, n)
    # runs of equal values: start a new run where the sorted value changes
    new_run = torch.ones(m, n, dtype=torch.bool)
    new_run[1:] = sorted_x[1:] != sorted_x[:-1]
    run_id = torch.cumsum(new_run.to(torch.int64), dim=0) - 1  # (M, N) run index per sorted position
    offset = torch.arange(n, dtype=torch.int64) * m  # runs of different columns apart
    flat = (run_id + offset).reshape(-1)
    sums = torch.zeros(m * n, dtype=torch.float64).index_add_(0, flat, pos.reshape(-1))
    counts = torch.zeros(m * n, dtype=torch.float64).index_add_(0, flat, torch.ones(m * n, dtype=torch.float64))
    mean_rank = (sums / counts.clamp_min(1))[flat].reshape(m, n)
    ranks = torch.empty_like(mean_rank)
    ranks.scatter_(0, order, mean_rank)
    return ranks


def spearman(x: torch.Tensor) -> torch.Tensor:
    """(N, N) Spearman rank correlation between the columns of ``x`` (M, N), float64: the Pearson
    correlation of average ranks. A constant column has no correlation: its row and column
    (diagonal included) are 0, where the formula gives NaN."""
    r = _average_ranks(x.to(torch.float64))
    r = r - r.mean(dim=0, keepdim=True)
    norm = torch.linalg.vector_norm(r, dim=0)
    ok = norm > 0
    z = torch.where(ok, r / torch.where(ok, norm, torch.ones_like(norm)), torch.zeros_like(r))
    c = z.T @ z
    return c.clamp(-1.0, 1.0)


def inf_fs(x: torch.Tensor, alpha: float = 0.5, variant: Literal["paper", "code"] = "paper") -> torch.Tensor:
    """Infinite Feature Selection scores of the N units of a response matrix ``x`` (M samples, N units).

    ``variant="paper"`` (default; Roffo et al., ICCV 2015, and NISP's use of it):
    ``sigma_ij = max(std_i, std_j)``, ``c_ij = 1 - |rho_ij|`` (Spearman, average ranks for ties, a
    constant unit's correlations 0), ``A = alpha * sigma + (1 - alpha) * c``, ``r = 0.9 /
    spectral_radius(A)``, ``score = (I - r A)^-1 1 - 1`` (the row sums of ``S = (I - r A)^-1 - I``,
    the sum over paths of every length >= 1).

    ``variant="code"``: the authors' later MATLAB ``infFS.m``: ``A = alpha * c + (1 - alpha) *
    sigma`` with ``sigma`` min-max normalised to [0, 1], ``r = 0.99 / spectral_radius(A)`` and
    ``score = (I - r A)^-1 1`` (the row sums of the inverse itself: the same ranking as subtracting 1).

    Standard deviations are the sample ones (M - 1 in the denominator, MATLAB's ``std``). A is
    symmetric and non-negative: its spectral radius is its largest eigenvalue, from the symmetric
    eigensolver (``torch.linalg.eigvalsh``); the scores come from one linear solve, never an inverse.
    Everything runs in float64; the result is float64, shape (N,) (higher = more important).
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise ValueError(f"x must be a 2-D (samples, units) tensor, got {getattr(x, 'shape', type(x).__name__)}")
    m, n = x.shape
    if m < 2:
        raise ValueError(f"Inf-FS needs at least 2 samples (standard deviations and correlations), got {m}")
    if n == 0:
        return torch.zeros(0, dtype=torch.float64)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
    if variant not in ("paper", "code"):
        raise ValueError(f"variant must be 'paper' or 'code', got {variant!r}")
    xd = x.detach().to(device="cpu", dtype=torch.float64)
    if not bool(torch.isfinite(xd).all()):
        raise ValueError("the responses hold NaN or Inf")
    std = xd.std(dim=0, unbiased=True)
    sigma = torch.maximum(std.unsqueeze(0), std.unsqueeze(1))
    c = 1.0 - spearman(xd).abs()
    if variant == "paper":
        a = alpha * sigma + (1.0 - alpha) * c
        factor = 0.9
    else:
        lo, hi = sigma.min(), sigma.max()
        sigma = (sigma - lo) / (hi - lo) if float(hi - lo) > 0 else torch.zeros_like(sigma)
        a = alpha * c + (1.0 - alpha) * sigma
        factor = 0.99
    rho = float(torch.linalg.eigvalsh(a).abs().max())
    ones = torch.ones(n, 1, dtype=torch.float64)
    if rho == 0.0:  # A = 0: no paths, every unit alike
        return torch.zeros(n, dtype=torch.float64) if variant == "paper" else torch.ones(n, dtype=torch.float64)
    s = torch.linalg.solve(torch.eye(n, dtype=torch.float64) - (factor / rho) * a, ones).reshape(n)
    return s - 1.0 if variant == "paper" else s


# ------------------------------------------------------------------ whole-network propagation
# Ops through which a channel's total score passes unchanged (the "absolute, linearised" network:
# activations -> identity; average pooling keeps a channel's total; max pooling -> average [choice]).
_PASS_CALLS = frozenset(
    """relu relu6 gelu silu tanh sigmoid hardswish hardsigmoid hardtanh leaky_relu elu selu celu mish softplus
    dropout dropout1d dropout2d dropout3d alpha_dropout feature_alpha_dropout identity contiguous clone detach to
    float double type_as max_pool1d max_pool2d max_pool3d avg_pool1d avg_pool2d avg_pool3d adaptive_avg_pool1d
    adaptive_avg_pool2d adaptive_avg_pool3d adaptive_max_pool1d adaptive_max_pool2d adaptive_max_pool3d""".split()
)
_PASS_MODULES = (
    nn.ReLU,
    nn.ReLU6,
    nn.GELU,
    nn.SiLU,
    nn.Tanh,
    nn.Sigmoid,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Hardtanh,
    nn.LeakyReLU,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.Mish,
    nn.Softplus,
    nn.Identity,
    nn.modules.dropout._DropoutNd,
    nn.modules.pooling._MaxPoolNd,
    nn.modules.pooling._AvgPoolNd,
    nn.modules.pooling._AdaptiveAvgPoolNd,
    nn.modules.pooling._AdaptiveMaxPoolNd,
)


def _last_linear(graph: Graph, modules: dict[str, nn.Module]) -> int:
    for i in range(len(graph.nodes) - 1, -1, -1):
        node = graph.nodes[i]
        if node.op == "module" and isinstance(modules.get(node.target), nn.Linear):
            return i
    raise ValueError(
        "the model has no nn.Linear classifier to take the final responses from: pass frl= (a module name)"
    )


def _frl_node(graph: Graph, modules: dict[str, nn.Module], frl: str | None) -> int:
    if frl is None:
        return _last_linear(graph, modules)
    if frl not in modules:
        raise ValueError(f"frl={frl!r} is not a module of the model")
    hits = [i for i, n in enumerate(graph.nodes) if n.op == "module" and n.target == frl]
    if not hits:
        raise ValueError(f"frl={frl!r} is never called in the model's traced forward")
    if len(hits) > 1:
        raise ValueError(f"frl={frl!r} is called {len(hits)} times; NISP needs one final response layer")
    return hits[0]


def _responses(model: nn.Module, frl_module: nn.Module, data: Iterable[Any], num_batches: int | None) -> torch.Tensor:
    """(M, N) inputs of the final response layer over ``data`` (channel means over positions for a
    conv's (B, C, ...) input), eval mode, no gradients."""
    rows: list[torch.Tensor] = []

    def grab(mod: nn.Module, args: tuple[Any, ...]) -> None:
        x = args[0].detach()
        rows.append((x.flatten(2).mean(2) if x.dim() > 2 else x.reshape(-1, x.shape[-1])).to(torch.float64).cpu())

    handle = frl_module.register_forward_pre_hook(grab)
    seen = 0
    with all_or_none("NISP's final responses"):  # each rank its shard of the data (torch.distributed)
        try:
            with eval_mode(model), torch.no_grad():
                for raw in data:
                    if num_batches is not None and seen >= num_batches:
                        break
                    try:
                        forward_batch(model, raw)
                    except (RuntimeError, ValueError) as e:
                        raise ValueError(f"a data batch does not fit the model: {type(e).__name__}: {e}") from e
                    seen += 1
        finally:
            handle.remove()
        if not rows:
            raise ValueError("data yielded no batches: NISP needs the final responses of some samples")
    # Inf-FS ranks every response: the ranks' rows are gathered, not summed
    x = all_gather_rows(torch.cat(rows))
    if not bool(torch.isfinite(x).all()):
        raise ValueError("the final responses hold NaN or Inf")
    return x


def _refs(a: Any) -> list[Ref]:
    if isinstance(a, Ref):
        return [a]
    if isinstance(a, (list, tuple)):
        return [r for v in a for r in _refs(v)]
    return []


def propagate_scores(model: nn.Module, graph: Graph, start: Ref, scores: torch.Tensor) -> dict[str, torch.Tensor]:
    """Propagate ``scores`` (m, channels of the value ``start``) backwards through ``graph``: the
    scores of every Linear / ConvNd layer's output channels reached, keyed by module name, (m, out)
    float64. An op the propagation does not know is a ValueError naming it."""
    modules = dict(model.named_modules())
    acc: dict[Ref, torch.Tensor] = {start: scores.to(torch.float64)}
    out: dict[str, torch.Tensor] = {}

    def give(ref: Any, s: torch.Tensor) -> None:
        if isinstance(ref, Ref):
            acc[ref] = acc[ref] + s if ref in acc else s

    def unknown(node: Any, why: str = "") -> ValueError:
        what = f"module {node.target} ({type(modules[node.target]).__name__})" if node.op == "module" else node.target
        return ValueError(f"NISP cannot propagate scores through {what}{': ' + why if why else ''}")

    for i in range(len(graph.nodes) - 1, -1, -1):
        node = graph.nodes[i]
        s = acc.pop(Ref(i), None)
        if s is None or node.op in ("input", "output"):
            continue
        x = node.args[0] if node.args else next(iter(node.kwargs.values()), None)
        if node.op == "module":
            mod = modules[node.target]
            if isinstance(mod, (nn.Linear, nn.modules.conv._ConvNd)) and not isinstance(
                mod, nn.modules.conv._ConvTransposeNd
            ):
                out[node.target] = out[node.target] + s if node.target in out else s
                give(x, nisp_propagate(mod.weight.detach().to(torch.float64), s, getattr(mod, "groups", 1)))
            elif isinstance(mod, nn.modules.batchnorm._BatchNorm):
                if mod.running_var is None:
                    raise unknown(node, "a BatchNorm without running statistics")
                scale = torch.rsqrt(mod.running_var.detach().to(torch.float64) + mod.eps)
                if mod.weight is not None:
                    scale = scale * mod.weight.detach().to(torch.float64).abs()
                give(x, s * scale)
            elif isinstance(mod, _PASS_MODULES):
                give(x, s)
            elif isinstance(mod, nn.Flatten):
                give(x, _unflatten(s, graph, x, node))
            else:
                raise unknown(node)
            continue
        name = node.target
        if name in _PASS_CALLS or (name == "mean" and _keeps_channels(graph, x, Ref(i))):
            give(x, s)
        elif name in ("flatten", "view", "reshape"):
            give(x, _unflatten(s, graph, x, node))
        elif name in ("add", "sub"):
            tensors = [a for a in node.args[:2] if isinstance(a, Ref)]
            for a in tensors:
                shp = graph.shape_of(a)
                if shp is None or len(shp) < 2 or shp[1] != s.shape[1]:
                    raise unknown(node, "an operand broadcast over the channels")
                give(a, s)
        elif name == "mul" and sum(isinstance(a, Ref) for a in node.args[:2]) == 1:
            k = next(a for a in node.args[:2] if not isinstance(a, Ref))
            if not isinstance(k, (int, float)):
                raise unknown(node, "a product with a non-number")
            give(next(a for a in node.args[:2] if isinstance(a, Ref)), s * abs(float(k)))
        elif name == "cat":
            parts = node.args[0] if node.args else node.kwargs.get("tensors")
            dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
            if dim != 1:
                raise unknown(node, f"a concatenation along dim {dim}, not the channels")
            start_c = 0
            for a in _refs(parts):
                shp = graph.shape_of(a)
                if shp is None:
                    raise unknown(node, "an operand of unknown shape")
                give(a, s[:, start_c : start_c + shp[1]])
                start_c += shp[1]
        else:
            raise unknown(node)
    return out


def _keeps_channels(graph: Graph, x: Any, y: Ref) -> bool:
    a, b = graph.shape_of(x) if isinstance(x, Ref) else None, graph.shape_of(y)
    return a is not None and b is not None and len(a) >= 2 and len(b) >= 2 and a[0] == b[0] and a[1] == b[1]


def _unflatten(s: torch.Tensor, graph: Graph, x: Any, node: Any) -> torch.Tensor:
    """Scores of a (B, C, *spatial) value flattened to (B, C * prod(spatial)): each channel's block
    of positions summed (a Linear after a flatten reads every position of every channel)."""
    shp = graph.shape_of(x) if isinstance(x, Ref) else None
    if shp is None or len(shp) < 2:
        raise ValueError(f"NISP cannot propagate scores through {node.target}: its input's shape is unknown")
    c = shp[1]
    if s.shape[1] == c:
        return s
    if s.shape[1] % c != 0:
        raise ValueError(f"NISP cannot propagate scores through {node.target}: {s.shape[1]} values from {c} channels")
    return s.reshape(s.shape[0], c, -1).sum(2)


def nisp_scores(
    model: nn.Module,
    data: Iterable[Any] | None,
    *,
    example_inputs: Any = None,
    frl: str | None = None,
    num_batches: int | None = None,
    alpha: float = 0.5,
    variant: Literal["paper", "code"] = "paper",
    frl_scores: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """NISP importance of every output neuron / channel of every Linear and ConvNd layer before the
    final response layer (FRL), keyed by module name (Yu et al., CVPR 2018, arXiv:1711.05908).

    The FRL is the input of the last Linear (the classifier), or of the module ``frl`` names. Its
    responses over ``data`` (batches in any format of :mod:`fastprune.batches`; ``num_batches``
    caps them; eval mode, no gradients; a conv input's positions averaged) are ranked by
    :func:`inf_fs` (``alpha``, ``variant``), unless ``frl_scores`` gives the scores ((N,) or
    (m, N): m vectors propagated at once). The scores then flow backwards through the traced graph
    of the structure engine, ``s_in = |W|^T s_out`` per layer (:func:`fastprune.ops.nisp_propagate`,
    kernel taps summed: per-channel totals), eval BatchNorm as ``|gamma| / sqrt(var + eps)``,
    activations and pooling as identity (max pooling taken as average [choice]), a flatten into a
    Linear summing each channel's block, residual adds feeding both branches, a value read by several
    layers summing their contributions, concatenations split by channel. An op it does not know is a
    ValueError naming it. Returns (out,) per layer, or (m, out) with m score vectors; float64.

    ``example_inputs`` (a tensor or tuple) are the shapes the graph is traced with; default: the
    first batch's positional inputs.
    """
    modules = dict(model.named_modules())
    if frl_scores is None and data is None:
        raise ValueError("NISP needs data= (batches of the model's inputs) or frl_scores=")
    if example_inputs is None:
        if data is None:
            raise ValueError("pass example_inputs= (the shapes to trace the model with)")
        first = next(iter(data), None)
        if first is None:
            raise ValueError("data yielded no batches: NISP needs the final responses of some samples")
        b = as_batch(first)
        if b.kwargs:
            raise ValueError("dict batches: pass example_inputs= (positional inputs to trace the model with)")
        example_inputs = b.args
    inputs = as_inputs(example_inputs)
    with eval_mode(model):
        graph = trace(model, inputs, is_handled)
    at = _frl_node(graph, modules, frl)
    node = graph.nodes[at]
    start = node.args[0] if node.args else next(iter(node.kwargs.values()), None)
    if not isinstance(start, Ref):
        raise ValueError(f"the final response layer {node.target} reads no traced value")
    if frl_scores is None:
        assert data is not None
        x = _responses(model, modules[node.target], data, num_batches)
        s = inf_fs(x, alpha=alpha, variant=variant).unsqueeze(0)
        single = True
    else:
        s = torch.as_tensor(frl_scores, dtype=torch.float64)
        single = s.dim() == 1
        s = s.reshape(1, -1) if single else s
    shp = graph.shape_of(start)
    if shp is None or len(shp) < 2 or shp[1] != s.shape[1]:
        raise ValueError(f"frl scores have {s.shape[1]} entries; {node.target}'s input has shape {shp}")
    if not bool(torch.isfinite(s).all()):
        raise ValueError("frl_scores hold NaN or Inf")
    result = propagate_scores(model, graph, start, s)
    return {k: v[0] if single else v for k, v in result.items()}
