"""SInGE neuron relevance (Yvinec et al., "SInGE: Sparsity via Integrated Gradients Estimation of
Neuron Relevance", NeurIPS 2022, arXiv:2207.04089) and the gradient baselines it is compared with.

**Relevance.** A neuron ``n`` of a layer (an output channel of a conv, an output feature of a
Linear) has weights ``W_n``: its filter and its bias [choice: the bias is part of the neuron; removing
the neuron removes both]. The path scales them to zero, ``W_n <- mu W_n``, and the relevance is the
integral of the attribution along it, estimated by the Riemann rule [choice: left points of ``steps``
equal intervals from 1 down to 0, ``mu_k = 1 - (k - 1) / steps``, k = 1..steps; mu = 0 adds nothing]::

    R(n) = 1/K sum_k || mu_k W_n (.) grad_V L(..., V = mu_k W_n, ...) ||_p

where the gradient is of the mean loss over the calibration data, taken with respect to the neuron's
weights at the scaled point. Since ``grad_W L(mu W) = mu grad_V L``, each term is
``|| W_n (.) grad_W L(mu_k) ||``: the gradient autograd gives for the unscaled weights, on the model
whose neuron n is scaled. ``form="ig"`` is the classic integrated-gradients form
``|| W_n (.) 1/K sum_k grad_V L(mu_k) ||`` (the integral inside the norm).

* ``path="neuron"`` is the definition: only neuron n is scaled, K x C scaled models per layer of C
  neurons. They are not C weight gradients: scaling neuron n's weights and bias scales its output,
  so a forward hook applies the path, only the network after the layer differs between the scaled
  models (``torch.func.vmap`` over the scale vectors runs it batched, the layer's input once), and
  one backward of the layer alone turns every model's output gradient at its own neuron into that
  neuron's gradient row (see :class:`_OutputPath`). ``batching="loop"`` runs the scaled models one
  by one, ``"reference"`` is the definition taken literally (weights scaled, one full backward per
  scaled model): the tests' oracle; ``"auto"`` falls back from vmap to the loop with one log line.
* ``path="layer"`` scales all neurons of one layer together: K scaled models per layer.
* ``steps=1`` is mu = 1 only: the gradient x weight criterion ``|| W_n (.) grad_W L ||``
  (``grad_weight``), one backward per batch for every layer at once.

Scores are computed in eval mode (BatchNorm uses its running statistics, so scaling a filter scales
its contribution; in train mode BN would normalise the scale away).

**Taylor** (Molchanov et al., CVPR 2019, "Importance estimation for neural network pruning"):
``(sum_{w in n} w g)^2`` per batch, averaged over the batches (the first-order Taylor estimate of the
loss change when the neuron is removed).

All functions return ``{module name: (C,) float64 scores}`` for every scored layer.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal

import torch
from torch import nn
from torch.nn.utils.stateless import _reparametrize_module
from tqdm.auto import tqdm

from fastprune._checks import check_loader
from fastprune._modes import eval_mode
from fastprune.batches import Batch, as_batch
from fastprune.distributed import all_or_none, all_reduce_sum_
from fastprune.importance.channels import layer_scores_to_groups
from fastprune.importance.woodfisher import batch_loss
from fastprune.masks import effective_weight, is_pruned
from fastprune.structure.groups import Group, find_groups

__all__ = ["SInGECriterion", "TaylorCriterion", "check_singe_args", "singe_scores", "spearman", "taylor_scores"]

log = logging.getLogger("fastprune")

LossOfBatch = Callable[[nn.Module, Batch], torch.Tensor]


# ------------------------------------------------------------------------------- layers
def _scorable(m: nn.Module | None) -> bool:
    """A layer these criteria score: a Linear or a conv (not a grouped transposed one)."""
    if isinstance(m, nn.Linear):
        return True
    return isinstance(m, nn.modules.conv._ConvNd) and not (m.transposed and m.groups != 1)


class _Layer:
    """One scored layer: its weight and bias as the model stores them (``weight_orig`` under a torch
    prune mask), the dimension holding its neurons, and the effective weights flattened per neuron."""

    def __init__(self, model: nn.Module, name: str, module: nn.Module) -> None:
        if not _scorable(module):
            raise TypeError(
                f"{name} is a {type(module).__name__}: SInGE scores Linear and (not grouped transposed) conv layers"
            )
        self.name = name
        self.module = module
        self.odim = 1 if isinstance(module, nn.modules.conv._ConvNd) and module.transposed else 0
        self.keys: list[str] = []
        self.attrs: list[str] = []
        self.tensors: list[torch.Tensor] = []
        self.dims: list[int] = []
        for attr, dim in (("weight", self.odim), ("bias", 0)):
            t = getattr(module, attr + "_orig", None) if is_pruned(module, attr) else getattr(module, attr, None)
            if isinstance(t, torch.Tensor):
                key = attr + "_orig" if is_pruned(module, attr) else attr
                self.keys.append(f"{name}.{key}" if name else key)
                self.attrs.append(key)
                self.tensors.append(t.detach())
                self.dims.append(dim)
        self.channels = int(self.tensors[0].shape[self.odim])
        # the neuron's weights as the model computes with them: (C, F), float64
        eff = [effective_weight(module, "weight").detach()]
        if module.bias is not None:
            eff.append(effective_weight(module, "bias").detach())
        self.flat = torch.cat(
            [t.movedim(d, 0).reshape(self.channels, -1).to(torch.float64) for t, d in zip(eff, self.dims, strict=True)],
            1,
        )

    def scaled(self, tensors: Sequence[torch.Tensor], s: torch.Tensor) -> dict[str, torch.Tensor]:
        """The layer's tensors with neuron c scaled by ``s[c]``."""
        out = {}
        for key, t, d in zip(self.keys, tensors, self.dims, strict=True):
            shape = [1] * t.dim()
            shape[d] = self.channels
            out[key] = t * s.to(t.dtype).view(shape)
        return out

    def rows(self, grads: Sequence[torch.Tensor]) -> torch.Tensor:
        """Gradients of the layer's tensors as (C, F) float64 rows, in the order of :attr:`flat`."""
        return torch.cat(
            [
                g.movedim(d, 0).reshape(self.channels, -1).to(torch.float64)
                for g, d in zip(grads, self.dims, strict=True)
            ],
            1,
        )


def scored_layers(
    model: nn.Module, example_inputs: Any = None, layers: Sequence[str] | None = None
) -> list[tuple[str, nn.Module]]:
    """The layers a data-driven neuron criterion scores: ``layers`` when given; else, with
    ``example_inputs``, the Linear / Conv layers producing a prunable group's channels
    (:func:`fastprune.find_groups`); else every Linear / Conv layer."""
    modules = dict(model.named_modules())
    if layers is not None:
        missing = [n for n in layers if n not in modules]
        if missing:
            raise ValueError(f"the model has no module(s) {missing}")
        names = list(dict.fromkeys(layers))
    elif example_inputs is not None:
        groups = find_groups(model, example_inputs)
        names = list(dict.fromkeys(m.module for g in groups for m in g.producers))
    else:
        names = [n for n, m in modules.items() if _scorable(m)]
    out = [(n, modules[n]) for n in names if _scorable(modules[n])]
    if not out:
        raise ValueError("no Linear or Conv layer to score")
    return out


# ------------------------------------------------------------------------------- checks
_UNSET: Any = object()


def check_singe_args(
    *,
    steps: Any = _UNSET,
    path: Any = _UNSET,
    norm: Any = _UNSET,
    form: Any = _UNSET,
    num_batches: Any = _UNSET,
    batching: Any = _UNSET,
    chunk_size: Any = _UNSET,
) -> None:
    """Validate the arguments given (a ValueError naming the bad one)."""
    if steps is not _UNSET and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    if path is not _UNSET and path not in ("neuron", "layer"):
        raise ValueError(f"path must be 'neuron' or 'layer', got {path!r}")
    if norm is not _UNSET and (isinstance(norm, bool) or norm not in (1, 2)):
        raise ValueError(f"norm must be 1 or 2, got {norm!r}")
    if form is not _UNSET and form not in ("singe", "ig"):
        raise ValueError(f"form must be 'singe' or 'ig', got {form!r}")
    for name, v in (("num_batches", num_batches), ("chunk_size", chunk_size)):
        if v is not _UNSET and v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ValueError(f"{name} must be a positive int or None, got {v!r}")
    if batching is not _UNSET and batching not in ("auto", "vmap", "loop", "reference"):
        raise ValueError(f"batching must be 'auto', 'vmap', 'loop' or 'reference', got {batching!r}")


def _batches(data: Iterable[Any], num_batches: int | None) -> Iterable[Batch]:
    seen = 0
    for batch in data:
        if num_batches is not None and seen >= num_batches:
            break
        seen += 1
        yield as_batch(batch)
    if seen == 0:
        raise ValueError("data yielded no batches")


# ------------------------------------------------------------------------------- gradients
def _loss_at(model: nn.Module, loss: LossOfBatch, b: Batch, params: dict[str, torch.Tensor]) -> torch.Tensor:
    with _reparametrize_module(model, params):
        out = loss(model, b)
    if not isinstance(out, torch.Tensor) or out.dim() != 0:
        raise ValueError(f"the loss must be a scalar tensor, got {type(out).__name__} {getattr(out, 'shape', '')}")
    return out


def _definition_rows(model: nn.Module, lay: _Layer, loss: LossOfBatch, b: Batch, scales: torch.Tensor) -> torch.Tensor:
    """The definition, literally: for each scale vector (a row of ``scales``), the layer's weights
    and bias scaled neuron by neuron, one backward, the gradient rows of the unscaled tensors:
    (S, C, F). Slow; the oracle of the fast path."""
    out = []
    for s in scales:
        ts = [t.detach().requires_grad_(True) for t in lay.tensors]
        with torch.enable_grad():
            val = _loss_at(model, loss, b, lay.scaled(ts, s))
            gs = torch.autograd.grad(val, ts, allow_unused=True)
        out.append(lay.rows([torch.zeros_like(t) if g is None else g for t, g in zip(ts, gs, strict=True)]))
    return torch.stack(out)


class _Unsupported(Exception):
    """The fast path does not apply to this layer (called more than once per forward)."""


class _OutputPath:
    """The fast path. Scaling neuron n's weights and bias by mu scales its pre-activation output
    z_n by mu, so a forward hook does it (``z' = s * z + e``); the gradient of the loss with respect to
    ``e`` is dL/dz' of the scaled model, and the gradient of the unscaled weights is
    ``s_n * (dL/dz'_n  correlated with the layer's input)``. The input is the same for every scaled
    model (the layer's own scale does not reach it), so only the part of the network after the layer
    runs once per scaled model (``torch.func.vmap`` over the scale vectors leaves the rest unbatched),
    and one backward of the layer alone turns the stacked dL/dz'_n into every neuron's gradient row.
    """

    def __init__(self, model: nn.Module, lay: _Layer, loss: LossOfBatch, b: Batch) -> None:
        self.model, self.lay, self.loss, self.b = model, lay, loss, b
        self.cdim = -1 if isinstance(lay.module, nn.Linear) else 1
        seen: list[tuple[torch.Tensor, torch.Size]] = []

        def grab(mod: nn.Module, args: tuple, output: torch.Tensor) -> None:
            seen.append((args[0].detach(), output.shape))

        h = lay.module.register_forward_hook(grab)
        try:
            with torch.no_grad():
                loss(model, b)
        finally:
            h.remove()
        if len(seen) != 1:
            raise _Unsupported(f"{lay.name} runs {len(seen)} times per forward")
        self.x, self.out_shape = seen[0]
        self.state: dict[str, torch.Tensor] = {}

    def _hook(self, mod: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        s, e = self.state["s"], self.state["e"]
        shape = [1] * output.dim()
        shape[self.cdim] = output.shape[self.cdim]
        return output * s.to(output.dtype).view(shape) + e

    def _f(self, e: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        self.state["s"], self.state["e"] = s, e
        val = self.loss(self.model, self.b)
        if not isinstance(val, torch.Tensor) or val.dim() != 0:
            raise ValueError(f"the loss must be a scalar tensor, got {type(val).__name__} {getattr(val, 'shape', '')}")
        return val

    def output_grads(self, scales: torch.Tensor, vmap: bool) -> torch.Tensor:
        """(S, *output shape): dL/dz' of the model scaled by each row of ``scales``."""
        e0 = torch.zeros(self.out_shape, dtype=self.x.dtype, device=self.x.device)
        h = self.lay.module.register_forward_hook(self._hook)
        try:
            if vmap:
                with torch.no_grad():  # (func.grad ignores it; it keeps the outer graph off)
                    return torch.func.vmap(torch.func.grad(self._f), in_dims=(None, 0))(e0, scales)
            out = []
            for s in scales:
                e = e0.clone().requires_grad_(True)
                with torch.enable_grad():
                    (g,) = torch.autograd.grad(self._f(e, s), [e], allow_unused=True)
                out.append(torch.zeros_like(e0) if g is None else g)
            return torch.stack(out)
        finally:
            h.remove()
            self.state.clear()

    def weight_rows(self, grad_out: torch.Tensor) -> torch.Tensor:
        """(C, F) gradient rows of the layer's unscaled tensors for the output gradient ``grad_out``."""
        lay = self.lay
        ts = [t.detach().requires_grad_(True) for t in lay.tensors]
        with torch.enable_grad():
            z = torch.func.functional_call(lay.module, dict(zip(lay.attrs, ts, strict=True)), (self.x,))
            gs = torch.autograd.grad(z, ts, grad_outputs=grad_out.to(z.dtype), allow_unused=True)
        return lay.rows([torch.zeros_like(t) if g is None else g for t, g in zip(ts, gs, strict=True)])


class _Batcher:
    """The fast path batched with vmap (``"vmap"``), one backward per scaled model (``"loop"``),
    vmap falling back to the loop once (``"auto"``), or the definition (``"reference"``)."""

    def __init__(self, mode: str, chunk_size: int | None) -> None:
        self.mode = mode
        self.chunk_size = chunk_size

    def rows(
        self, model: nn.Module, lay: _Layer, loss: LossOfBatch, b: Batch, mus: torch.Tensor, path: str
    ) -> torch.Tensor:
        """(K, C, F): for each mu_k, neuron n's gradient row on the model with the path applied."""
        K, C = mus.shape[0], lay.channels
        dtype = lay.tensors[0].dtype
        if path == "layer":
            scales = mus.view(K, 1).expand(K, C).to(dtype)
            idx = None
        else:
            scales = torch.ones(K * C, C, dtype=dtype)
            idx = torch.arange(C).repeat(K)
            scales[torch.arange(K * C), idx] = mus.repeat_interleave(C).to(dtype)
        if self.mode != "reference":
            try:
                return self._fast(model, lay, loss, b, mus, scales, idx)
            except _Unsupported as e:
                log.info("fastprune: SInGE: %s; scaling its weights instead (one backward per scaled model)", e)
        g = _definition_rows(model, lay, loss, b, scales)  # (S, C, F)
        return g if idx is None else g[torch.arange(K * C), idx].view(K, C, -1)

    def _fast(
        self,
        model: nn.Module,
        lay: _Layer,
        loss: LossOfBatch,
        b: Batch,
        mus: torch.Tensor,
        scales: torch.Tensor,
        idx: torch.Tensor | None,
    ) -> torch.Tensor:
        K, C = mus.shape[0], lay.channels
        op = _OutputPath(model, lay, loss, b)
        cdim = op.cdim % len(op.out_shape)
        per = max(1, op.out_shape.numel())
        step = self.chunk_size or max(1, min(scales.shape[0], (1 << 25) // per))
        parts = []
        i = 0
        while i < scales.shape[0]:
            part = scales[i : i + step]
            try:
                d = op.output_grads(part, vmap=self.mode in ("vmap", "auto"))
            except Exception as e:  # noqa: BLE001 - functorch refuses some models (in-place ops, data-dependent code)
                if self.mode != "auto":
                    raise
                log.info("fastprune: SInGE: vmap failed on %s (%s: %s); one backward per scaled model instead",
                         lay.name, type(e).__name__, str(e).splitlines()[0][:160] if str(e) else "")  # fmt: skip
                self.mode = "loop"
                continue
            if idx is not None:  # keep channel n of the model scaled at neuron n
                pick = idx[i : i + step]
                d = d.movedim(cdim + 1, -1)
                d = d.gather(-1, pick.view(-1, *([1] * (d.dim() - 1))).expand(*d.shape[:-1], 1)).squeeze(-1)
            parts.append(d)
            i += step
        d = torch.cat(parts)
        if idx is not None:  # (K*C, *out without the channel dim) -> (K, *out) with channel n from instance (k, n)
            d = d.view(K, C, *d.shape[1:]).movedim(1, cdim + 1)
        rows = torch.stack([op.weight_rows(d[k]) for k in range(K)])
        return rows * mus.view(K, 1, 1)  # dL/dW_n = s_n (dL/dz'_n * x)


def _all_layer_grads(model: nn.Module, layers: Sequence[_Layer], loss: LossOfBatch, b: Batch) -> list[torch.Tensor]:
    """Gradient rows (C, F) of every layer at mu = 1, from one backward."""
    ts = [[t.detach().requires_grad_(True) for t in lay.tensors] for lay in layers]
    params = {k: t for lay, tl in zip(layers, ts, strict=True) for k, t in zip(lay.keys, tl, strict=True)}
    with torch.enable_grad():
        val = _loss_at(model, loss, b, params)
        flat = [t for tl in ts for t in tl]
        gs = torch.autograd.grad(val, flat, allow_unused=True)
    out, i = [], 0
    for lay, tl in zip(layers, ts, strict=True):
        g = [torch.zeros_like(t) if gs[i + j] is None else gs[i + j] for j, t in enumerate(tl)]
        i += len(tl)
        out.append(lay.rows(g))
    return out


# ------------------------------------------------------------------------------- scores
def singe_scores(
    model: nn.Module,
    data: Iterable[Any],
    *,
    example_inputs: Any = None,
    steps: int = 8,
    loss_fn: Callable[[torch.Tensor, Any], torch.Tensor] | None = None,
    forward: Callable[[nn.Module, Any], torch.Tensor] | None = None,
    path: Literal["neuron", "layer"] = "neuron",
    norm: int = 2,
    form: Literal["singe", "ig"] = "singe",
    num_batches: int | None = None,
    layers: Sequence[str] | None = None,
    batching: Literal["auto", "vmap", "loop", "reference"] = "auto",
    chunk_size: int | None = None,
    progress: bool = False,
) -> dict[str, torch.Tensor]:
    """SInGE relevance of every neuron of every scored layer (see the module docstring).

    Args:
        model: any module; run in eval mode, its weights untouched, its training flag restored.
        data: batches (any format of :mod:`fastprune.batches`); at most ``num_batches`` are read.
        example_inputs: with it, only the layers producing prunable channel groups are scored
            (:func:`fastprune.find_groups`); ``layers`` names them explicitly; else every Linear / Conv.
        steps: K, the Riemann points on the path (``steps=1``: gradient x weight).
        loss_fn: ``loss_fn(outputs, targets)``, default cross entropy; ``forward(model, batch) ->
            loss`` replaces the whole call (e.g. distillation against a teacher, for unlabelled data).
        path: ``"neuron"`` (each neuron scaled alone: the definition) or ``"layer"`` (a layer's
            neurons scaled together: K backward passes per layer).
        norm: the p of the norm over a neuron's weights (2, or 1).
        form: ``"singe"`` (the norm inside the integral, the paper) or ``"ig"`` (outside).
        batching: ``"vmap"``, ``"loop"`` (one backward per scaled model), ``"auto"`` (vmap, else the
            loop) or ``"reference"`` (the definition, literally: weights scaled, one backward each).
        chunk_size: scaled models per vmap call (default: as many as keep ~256 MB of output gradients).
        progress: a tqdm bar over layers x batches.

    Returns:
        ``{layer name: (C,) float64}``.
    """
    check_singe_args(
        steps=steps, path=path, norm=norm, form=form, num_batches=num_batches, batching=batching, chunk_size=chunk_size
    )
    check_loader(data, "SInGE")
    if loss_fn is not None and not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable (outputs, targets) -> loss, got {type(loss_fn).__name__}")
    if forward is not None and not callable(forward):
        raise TypeError(f"forward must be callable (model, batch) -> loss, got {type(forward).__name__}")
    loss = batch_loss(loss_fn, forward)
    with eval_mode(model):
        layers = [_Layer(model, n, m) for n, m in scored_layers(model, example_inputs, layers)]
        mus = torch.tensor([1.0 - k / steps for k in range(steps)], dtype=torch.float64)
        acc = [torch.zeros(steps, lay.channels, lay.flat.shape[1], dtype=torch.float64) for lay in layers]
        batcher = _Batcher(batching, chunk_size)
        count = torch.zeros(1, dtype=torch.float64)
        bar = tqdm(desc="SInGE", unit="layer-batch", disable=not progress, leave=False)
        with all_or_none("SInGE scoring"):  # each rank its shard of the data (torch.distributed)
            for b in _batches(data, num_batches):
                count += b.size
                if steps == 1:  # mu = 1: no scaling, one backward for every layer
                    for a, g in zip(acc, _all_layer_grads(model, layers, loss, b), strict=True):
                        a[0] += b.size * g
                    bar.update(len(layers))
                    continue
                for a, lay in zip(acc, layers, strict=True):
                    a += b.size * batcher.rows(model, lay, loss, b, mus, path)
                    bar.update(1)
        bar.close()
        all_reduce_sum_([*acc, count])  # the gradients of the mean loss over every rank's samples
        total = float(count)
    out = {}
    for a, lay in zip(acc, layers, strict=True):
        g = a / total  # gradients of the mean loss over the data, (K, C, F)
        if form == "singe":
            r = torch.linalg.vector_norm(lay.flat.unsqueeze(0) * g, ord=norm, dim=2).mean(0)
        else:
            r = torch.linalg.vector_norm(lay.flat * (g / mus.view(-1, 1, 1)).mean(0), ord=norm, dim=1)
        if not bool(torch.isfinite(r).all()):
            raise ValueError(f"SInGE scores of {lay.name} are not finite: the loss or the weights hold NaN or Inf")
        out[lay.name] = r
    return out


def taylor_scores(
    model: nn.Module,
    data: Iterable[Any],
    *,
    example_inputs: Any = None,
    loss_fn: Callable[[torch.Tensor, Any], torch.Tensor] | None = None,
    forward: Callable[[nn.Module, Any], torch.Tensor] | None = None,
    num_batches: int | None = None,
    layers: Sequence[str] | None = None,
) -> dict[str, torch.Tensor]:
    """Molchanov et al.'s first-order Taylor importance, ``(sum_{w in n} w g)^2`` per batch (weights
    and bias of the neuron; g of the batch's mean loss), averaged over the batches. Arguments as
    :func:`singe_scores`."""
    check_loader(data, "taylor")
    check_singe_args(num_batches=num_batches)
    loss = batch_loss(loss_fn, forward)
    with eval_mode(model):
        lays = [_Layer(model, n, m) for n, m in scored_layers(model, example_inputs, layers)]
        acc = [torch.zeros(lay.channels, dtype=torch.float64) for lay in lays]
        count = torch.zeros(1, dtype=torch.float64)
        with all_or_none("Taylor scoring"):
            for b in _batches(data, num_batches):
                for a, lay, g in zip(acc, lays, _all_layer_grads(model, lays, loss, b), strict=True):
                    a += (lay.flat * g).sum(1).square()
                count += 1
        all_reduce_sum_([*acc, count])  # the mean over every rank's batches
        n = float(count)
    out = {}
    for a, lay in zip(acc, lays, strict=True):
        r = a / n
        if not bool(torch.isfinite(r).all()):
            raise ValueError(f"Taylor scores of {lay.name} are not finite: the loss or the weights hold NaN or Inf")
        out[lay.name] = r
    return out


# ------------------------------------------------------------------------------- criteria
def _producer_layers(model: nn.Module, groups: Sequence[Group]) -> list[str]:
    modules = dict(model.named_modules())
    names = (m.module for g in groups for m in g.producers)
    return [n for n in dict.fromkeys(names) if _scorable(modules.get(n))]


class _GradientCriterion:
    """A channel criterion from a per-layer score function: the groups' producing layers scored on
    the data, summed per group channel (:func:`~fastprune.importance.channels.layer_scores_to_groups`)."""

    label = ""

    def __init__(self, **kwargs: Any) -> None:
        check_singe_args(**{k: v for k, v in kwargs.items() if k not in ("loss_fn", "forward", "progress")})
        self.kwargs = kwargs

    def layer_scores(self, model: nn.Module, data: Iterable[Any], layers: list[str]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def __call__(
        self, model: nn.Module, groups: Sequence[Group], data: Iterable[Any] | None = None
    ) -> dict[int, torch.Tensor]:
        if data is None:
            raise ValueError(f"{self.label} reads data: pass data= (an iterable of batches)")
        return layer_scores_to_groups(groups, self.layer_scores(model, data, _producer_layers(model, groups)))


class SInGECriterion(_GradientCriterion):
    """:func:`singe_scores` as a channel criterion."""

    label = "SInGE"

    def layer_scores(self, model: nn.Module, data: Iterable[Any], layers: list[str]) -> dict[str, torch.Tensor]:
        return singe_scores(model, data, layers=layers, **self.kwargs)


class TaylorCriterion(_GradientCriterion):
    """:func:`taylor_scores` as a channel criterion."""

    label = "taylor"

    def layer_scores(self, model: nn.Module, data: Iterable[Any], layers: list[str]) -> dict[str, torch.Tensor]:
        return taylor_scores(model, data, layers=layers, **self.kwargs)


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation of two score vectors (ties broken by position; nan for < 2)."""
    if a.numel() < 2:
        return math.nan
    ra = a.double().argsort().argsort().double()
    rb = b.double().argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = float(ra.norm() * rb.norm())
    return float((ra * rb).sum()) / den if den else math.nan
