"""WoodFisher one-shot and gradual OBS pruning, and its diagonal-Fisher baseline.

Reference: Singh & Alistarh, "WoodFisher: Efficient Second-Order Approximation for Neural Network
Compression", NeurIPS 2020 (arXiv:2004.14340). The Fisher statistics, saliencies and OBS updates
are in :mod:`fastprune.importance.woodfisher`; selection in :func:`fastprune.select.topk_masks`.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from fastprune._checks import (
    check_damp,
    check_loader,
    check_min_remaining,
    check_positive_int,
    check_scope,
    check_sparsity,
    normalise_patterns,
)
from fastprune.distributed import all_gather_rows, check_same_everywhere
from fastprune.fisher import ShardedFisherInverse
from fastprune.importance.woodfisher import FisherStats, collect_fisher, obs_updates
from fastprune.masks import (
    ParamRef,
    add_to_weights,
    apply_masks,
    check_finite_weights,
    check_not_below_current,
    effective_weight,
    select_parameters,
    sparsity_of,
)
from fastprune.methods.registry import MethodResult, register_method
from fastprune.plan import Plan
from fastprune.select import sharded_topk_keep, topk_masks

__all__ = ["FisherDiagConfig", "WoodFisherConfig", "fisher_statistics", "run_fisher_diag", "run_woodfisher"]


@dataclass(frozen=True)
class _FisherDataConfig:
    """Fields every Fisher method shares (see WoodFisherConfig for their meaning)."""

    sparsity: float | None = None
    data: Any = None
    loss_fn: Callable[..., Any] | None = None
    num_grads: int = 1024
    damp: float = 1e-5
    scope: Literal["global", "layer"] = "global"
    fisher_batch_size: int = 1
    include: tuple[str, ...] | None = None
    exclude: tuple[str, ...] | None = None
    min_remaining: int = 1
    progress: bool = True
    forward: Callable[..., Any] | None = None
    fisher: Literal["empirical", "sampled"] = "empirical"
    likelihood: Literal["categorical", "gaussian"] = "categorical"
    per_sample: Literal["auto", "vmap", "loop"] = "auto"
    max_memory: int = 1 << 30
    seed: int = 0
    fisher_inverse: FisherStats | None = None

    def __post_init__(self) -> None:
        if self.sparsity is None:
            raise ValueError(f"{type(self).__name__} needs sparsity=")
        check_sparsity(self.sparsity)
        if self.fisher_inverse is None:
            check_loader(self.data, type(self).__name__)
        elif not isinstance(self.fisher_inverse, FisherStats):
            raise TypeError(
                "fisher_inverse must be the FisherStats of fastprune.fisher_statistics(model, data, ...), "
                f"got {type(self.fisher_inverse).__name__}"
            )
        elif self.data is not None:
            raise ValueError("give data= or fisher_inverse= (Fisher statistics computed before), not both")
        check_positive_int(self.num_grads, "num_grads")
        check_positive_int(self.fisher_batch_size, "fisher_batch_size")
        check_positive_int(self.max_memory, "max_memory")
        check_damp(self.damp)
        check_scope(self.scope)
        check_min_remaining(self.min_remaining)
        for name in ("loss_fn", "forward"):
            if getattr(self, name) is not None and not callable(getattr(self, name)):
                raise TypeError(f"{name} must be callable")
        if self.fisher not in ("empirical", "sampled"):
            raise ValueError(f"fisher must be 'empirical' or 'sampled', got {self.fisher!r}")
        if self.likelihood not in ("categorical", "gaussian"):
            raise ValueError(f"likelihood must be 'categorical' or 'gaussian', got {self.likelihood!r}")
        if self.per_sample not in ("auto", "vmap", "loop"):
            raise ValueError(f"per_sample must be 'auto', 'vmap' or 'loop', got {self.per_sample!r}")
        if self.fisher == "sampled" and (self.forward is not None or self.loss_fn is not None):
            raise ValueError(
                "fisher='sampled' takes its loss from the likelihood (categorical or gaussian): "
                "it cannot use loss_fn= or forward="
            )
        normalise_patterns(self)


@dataclass(frozen=True)
class WoodFisherConfig(_FisherDataConfig):
    """WoodFisher one-shot OBS pruning (Singh & Alistarh 2020; arXiv:2004.14340).

    Attributes:
        sparsity: fraction of the selected weights to zero (exact count), in [0, 1).
        data: iterable of batches for the Fisher: tensors, ``(inputs..., targets)`` tuples, or dicts
            of model keyword arguments with their ``labels`` (HuggingFace; see :mod:`fastprune.batches`).
        loss_fn: ``(outputs, targets) -> loss`` (default: cross entropy, mean over the batch; token
            logits flattened, targets -100 ignored); ``outputs`` is the model's output tensor (a
            HuggingFace output's ``logits``).
        forward: ``(model, batch) -> loss`` (the batch as the loader yields it): for batches or
            models the defaults cannot read; replaces the batch parsing and ``loss_fn``.
        fisher: ``"empirical"`` (the paper's: gradients at the data's targets) or ``"sampled"``
            (targets drawn from the model's predictive distribution, no labels needed: the true
            Fisher, which does not vanish where the model fits its targets, e.g. self-distillation).
        likelihood: for ``fisher="sampled"``: ``"categorical"`` over the logits, or ``"gaussian"``
            (unit variance around the outputs: regression, embeddings).
        per_sample: ``"auto"`` (vmap, else one backward per gradient, with one logged line),
            ``"vmap"`` or ``"loop"``.
        max_memory: bytes of gradients gathered (across loader batches) before each Woodbury update.
        seed: fixes the sampled targets.
        fisher_inverse: statistics from :func:`fastprune.fisher_statistics` on this model (or one
            it was copied from), instead of ``data``: prune to several sparsities from one Fisher.
            Their block size, blocks and damp are the ones used.
        num_grads: N, gradients in the Fisher (each one sample, or the mean over
            ``fisher_batch_size`` samples: the paper's "fisher_mini_bsz").
        block_size: B, the Fisher block size along each layer's flattened weight (clipped to the
            layer's size: a layer smaller than B is one block).
        damp: absolute dampening lambda (the paper's 1e-5). Gradients of a well-trained small
            network are tiny: damp relative to the mean Fisher diagonal is the quantity that
            matters; 1e-5 absolute works for the digits models here.
        scope: ``"global"`` (one saliency threshold across layers) or ``"layer"``.
        blocks: ``"layer"`` (each parameter its own block-diagonal Fisher) or ``"global"`` (blocks
            cut along the concatenation of all selected weights).
        update_weights: apply the OBS update to the surviving weights (False: saliency only).
        joint: exact joint OBS update within each block instead of the summed single-weight updates.
        recompute_steps: [choice] reach ``sparsity`` in this many sub-steps (a linear ramp), each with
            a freshly computed Fisher and OBS update, without fine-tuning in between (still one shot:
            no training). 1 (default) is the paper's plain one-shot; more steps are fastprune's
            option, which helps most at high sparsity (see benchmarks/quality_woodfisher.py).
        include / exclude / min_remaining: as for magnitude pruning.
        progress: tqdm bar over the N gradients.
    Gradients are taken in eval mode (BN uses running statistics); half-precision models are
    differentiated as they are and their Fisher accumulated in float32.
    """

    block_size: int = 128
    blocks: Literal["layer", "global"] = "layer"
    update_weights: bool = True
    joint: bool = False
    recompute_steps: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_int(self.block_size, "block_size")
        check_positive_int(self.recompute_steps, "recompute_steps")
        if self.blocks not in ("layer", "global"):
            raise ValueError(f"blocks must be 'layer' or 'global', got {self.blocks!r}")
        if self.fisher_inverse is not None and self.recompute_steps > 1:
            raise ValueError("recompute_steps > 1 recomputes the Fisher at every step: it cannot use fisher_inverse=")


@dataclass(frozen=True)
class FisherDiagConfig(_FisherDataConfig):
    """Diagonal Fisher pruning: saliency ``w^2 F_qq / 2`` with ``F_qq = damp + (1/N) sum g_q^2``,
    no weight update (WoodFisher's baseline). Fields as :class:`WoodFisherConfig`."""


def _data_refs(model: nn.Module, cfg: _FisherDataConfig) -> list[ParamRef]:
    refs = select_parameters(model, cfg.include, cfg.exclude)
    if not refs:
        raise ValueError("the model has no prunable parameters (weights of Linear/Conv layers) under include/exclude")
    check_finite_weights(refs)
    assert cfg.sparsity is not None  # the config requires it
    check_not_below_current(refs, cfg.sparsity, cfg.scope)
    frozen = [
        r.name
        for r in refs
        if not getattr(r.module, r.param_name + "_orig", getattr(r.module, r.param_name)).requires_grad
    ]
    if frozen:
        raise ValueError(
            f"parameters {frozen} do not require grad: the Fisher needs their gradients "
            "(set requires_grad, or leave them out with exclude=)"
        )
    return refs


_NOT_IN_PLAN = ("data", "loss_fn", "forward", "fisher_inverse")


def _plan_config(cfg: _FisherDataConfig) -> dict[str, Any]:
    """The config as plain data for the plan (callables, data and statistics left out)."""
    out = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name not in _NOT_IN_PLAN}
    st = cfg.fisher_inverse
    if st is not None:
        out["fisher_inverse"] = {
            "num_grads": st.num_grads,
            "kind": st.kind,
            "blocks": st.blocks,
            "block_size": st.block_size,
            "damp": st.damp,
        }
    return out


def _statistics(
    model: nn.Module, refs: list[ParamRef], cfg: _FisherDataConfig, block_size: int, blocks: str, need_inverse: bool
) -> FisherStats:
    """The Fisher statistics for ``refs``: those given (checked against the weights) or collected."""
    st = cfg.fisher_inverse
    if st is not None:
        names, sizes = [r.name for r in refs], [effective_weight(r.module, r.param_name).numel() for r in refs]
        if st.names != names or st.sizes != sizes:
            raise ValueError(
                f"fisher_inverse holds statistics of {len(st.names)} other weights ({', '.join(st.names[:3])} ...); "
                "compute it with the same include/exclude on this model, or on the model it was copied from"
            )
        if need_inverse and not st.inverses:
            raise ValueError("fisher_inverse has no inverse blocks (collected with need_inverse=False)")
        return st
    return collect_fisher(
        model,
        refs,
        cfg.data,
        cfg.loss_fn,
        num_grads=cfg.num_grads,
        block_size=block_size,
        damp=cfg.damp,
        blocks="layer" if blocks == "layer" else "global",
        fisher_batch_size=cfg.fisher_batch_size,
        need_inverse=need_inverse,
        progress=cfg.progress,
        forward=cfg.forward,
        fisher=cfg.fisher,
        likelihood=cfg.likelihood,
        per_sample=cfg.per_sample,
        max_memory=cfg.max_memory,
        seed=cfg.seed,
    )


def fisher_statistics(model: nn.Module, data: Any, **kwargs: Any) -> FisherStats:
    """The Fisher statistics WoodFisher (and the diagonal Fisher) prune with, computed once:
    ``stats = fastprune.fisher_statistics(model, loader, num_grads=1024)``, then
    ``prune(copy_of_model, "woodfisher", sparsity=s, fisher_inverse=stats)`` for every ``s``.

    Keywords: those of :class:`WoodFisherConfig` that shape the Fisher (``include``, ``exclude``,
    ``loss_fn``, ``forward``, ``fisher``, ``likelihood``, ``num_grads``, ``block_size``,
    ``blocks``, ``damp``, ``fisher_batch_size``, ``per_sample``, ``max_memory``, ``seed``,
    ``progress``). The model is not changed."""
    shaping = {
        "include",
        "exclude",
        "loss_fn",
        "forward",
        "fisher",
        "likelihood",
        "num_grads",
        "block_size",
        "blocks",
        "damp",
        "fisher_batch_size",
        "per_sample",
        "max_memory",
        "seed",
        "progress",
    }
    unknown = sorted(set(kwargs) - shaping)
    if unknown:
        raise TypeError(f"fisher_statistics got unexpected keyword(s) {unknown}; valid: {', '.join(sorted(shaping))}")
    cfg = WoodFisherConfig(sparsity=0.0, data=data, **kwargs)
    refs = _data_refs(model, cfg)
    return _statistics(model, refs, cfg, cfg.block_size, cfg.blocks, need_inverse=True)


def _woodfisher_step(
    model: nn.Module, cfg: WoodFisherConfig, sparsity: float
) -> tuple[list[ParamRef], dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
    """One OBS step: (masks, updates) for ``sparsity``, without changing the model."""
    refs = _data_refs(model, cfg)
    stats = _statistics(model, refs, cfg, cfg.block_size, cfg.blocks, need_inverse=True)
    weights = [effective_weight(r.module, r.param_name) for r in refs]
    if isinstance(stats.inverses[0], ShardedFisherInverse):
        masks, updates = _sharded_step(stats, weights, sparsity, cfg)
        return refs, masks, updates
    inv_diag = stats.inverse_diag()
    sal = [(w.double() ** 2).reshape(-1) / (2 * dg.double()) for w, dg in zip(weights, inv_diag, strict=True)]
    names = [r.name for r in refs]
    masks = topk_masks(
        names, [s.reshape(w.shape) for s, w in zip(sal, weights, strict=True)], sparsity, cfg.scope, cfg.min_remaining
    )
    updates = None
    if cfg.update_weights:
        dws = obs_updates(stats, weights, [masks[n] for n in names], joint=cfg.joint, inv_diag=inv_diag)
        for n, dw in zip(names, dws, strict=True):
            if not bool(torch.isfinite(dw).all()):
                raise ValueError(f"the OBS update of {n} is not finite; increase damp")
        updates = {n: dw.reshape(w.shape).to(w.dtype) for n, dw, w in zip(names, dws, weights, strict=True)}
    return refs, masks, updates


def _sharded_step(
    stats: FisherStats, weights: list[torch.Tensor], sparsity: float, cfg: WoodFisherConfig
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
    """:func:`_woodfisher_step` on a Fisher sharded across ranks: each rank computes the saliencies,
    the selection (:func:`fastprune.select.sharded_topk_keep`: counts and histograms cross the
    ranks, and with ``scope="global"`` each layer's ``min_remaining`` best saliencies) and
    the OBS changes of the entries it owns; only the keep flags (1 byte an entry) and the changes
    (in the weights' dtype) are gathered, so every rank ends with the same masks and updates."""
    names, sizes = stats.names, stats.sizes
    if cfg.fisher_inverse is not None:  # (collect_fisher checked the weights it took gradients of)
        check_same_everywhere(weights, "the weights to prune")
    flat_w = [w.reshape(-1) for w in weights]
    # this rank's entries, per layer: (inverse, slice of its local vector, offset in the layer, length)
    owned: list[tuple[ShardedFisherInverse, slice, int, int]] = []
    if stats.blocks == "layer":
        for fi in stats.inverses:
            c0, c1 = fi.owned_entries
            owned.append((fi, slice(0, c1 - c0), c0, c1 - c0))
    else:
        fi = stats.inverses[0]
        c0, c1 = fi.owned_entries
        start = 0
        for size in sizes:
            a, b = max(c0, start), min(c1, start + size)
            a = min(a, b)
            owned.append((fi, slice(a - c0, b - c0), a - start, b - a))
            start += size
    diags = {id(fi): fi.local_diag().double() for fi in stats.inverses}
    local_w = [fw[off : off + m].double() for fw, (_, _, off, m) in zip(flat_w, owned, strict=True)]
    local_d = [diags[id(fi)][sl] for fi, sl, _, _ in owned]
    pieces = [(off, w**2 / (2 * dg)) for (_, _, off, _), w, dg in zip(owned, local_w, local_d, strict=True)]
    keep = sharded_topk_keep(names, sizes, pieces, sparsity, cfg.scope, cfg.min_remaining)
    masks = {
        n: all_gather_rows(k.to(torch.uint8)).bool().reshape(w.shape)
        for n, k, w in zip(names, keep, weights, strict=True)
    }
    if not cfg.update_weights:
        return masks, None
    if cfg.joint:
        per_inverse = [
            fi.local_joint_update(torch.cat(ws), torch.cat(ks))
            for fi, ws, ks in _by_inverse(stats, owned, local_w, keep)
        ]
    else:
        vs = [
            torch.where(~k, w / dg, torch.zeros((), dtype=torch.float64))
            for w, k, dg in zip(local_w, keep, local_d, strict=True)
        ]
        per_inverse = [
            -fi.local_matvec(torch.cat(v).to(fi.dtype)).double() for fi, v, _ in _by_inverse(stats, owned, vs, keep)
        ]
    local_dw = per_inverse if stats.blocks == "layer" else list(torch.split(per_inverse[0], [m for *_, m in owned]))
    updates = {}
    for n, dw, w in zip(names, local_dw, weights, strict=True):
        full = all_gather_rows(dw.to(w.dtype))
        if not bool(torch.isfinite(full).all()):
            raise ValueError(f"the OBS update of {n} is not finite; increase damp")
        updates[n] = full.reshape(w.shape)
    # every rank must end with bitwise the same model: the pruned weights, hashed on every rank
    check_same_everywhere(
        [(w + updates[n]) * masks[n] for n, w in zip(names, weights, strict=True)], "the pruned weights"
    )
    return masks, updates


def _by_inverse(
    stats: FisherStats, owned: list[Any], xs: list[torch.Tensor], keep: list[torch.Tensor]
) -> list[tuple[ShardedFisherInverse, list[torch.Tensor], list[torch.Tensor]]]:
    """The per-layer local vectors grouped by the inverse they belong to (one per layer, or one)."""
    if stats.blocks == "layer":
        return [(o[0], [x], [k]) for o, x, k in zip(owned, xs, keep, strict=True)]
    return [(stats.inverses[0], xs, keep)]


@register_method(
    WoodFisherConfig, name="woodfisher", description="OBS with a block Woodbury inverse Fisher (Singh & Alistarh 2020)"
)
def run_woodfisher(model: nn.Module, cfg: WoodFisherConfig) -> MethodResult:
    assert cfg.sparsity is not None  # the config requires it
    updates: dict[str, torch.Tensor] | None
    if cfg.recompute_steps == 1:
        _, masks, updates = _woodfisher_step(model, cfg, cfg.sparsity)
    else:
        # sub-steps on a copy (the model changes only once everything succeeded)
        work = copy.deepcopy(model)
        start = {r.name: effective_weight(r.module, r.param_name).clone() for r in _data_refs(model, cfg)}
        current = sparsity_of({r.name: effective_weight(r.module, r.param_name) != 0 for r in _data_refs(work, cfg)})
        for i in range(1, cfg.recompute_steps + 1):
            target = current + (cfg.sparsity - current) * i / cfg.recompute_steps
            wrefs, wmasks, wupdates = _woodfisher_step(work, cfg, target)
            if wupdates:
                add_to_weights(wrefs, wupdates)
            apply_masks(wrefs, wmasks)
        final = {r.name: r for r in _data_refs(work, cfg)}
        masks = {n: getattr(final[n].module, final[n].param_name + "_mask") != 0 for n in start}
        updates = (
            {n: effective_weight(final[n].module, final[n].param_name) - start[n] for n in start}
            if cfg.update_weights
            else None
        )
    plan = Plan("woodfisher", _plan_config(cfg), cfg.sparsity, sparsity_of(masks), masks)
    return MethodResult(plan, weight_updates=updates)


@register_method(
    FisherDiagConfig, name="fisher_diag", description="diagonal empirical Fisher saliency (WoodFisher's baseline)"
)
def run_fisher_diag(model: nn.Module, cfg: FisherDiagConfig) -> MethodResult:
    assert cfg.sparsity is not None  # the config requires it
    refs = _data_refs(model, cfg)
    stats = _statistics(model, refs, cfg, 1, "layer", need_inverse=False)
    weights = [effective_weight(r.module, r.param_name) for r in refs]
    sal = [
        (w.double() ** 2) * (cfg.damp + fd.reshape(w.shape)) / 2
        for w, fd in zip(weights, stats.fisher_diag, strict=True)
    ]
    names = [r.name for r in refs]
    masks = topk_masks(names, sal, cfg.sparsity, cfg.scope, cfg.min_remaining)
    return MethodResult(Plan("fisher_diag", _plan_config(cfg), cfg.sparsity, sparsity_of(masks), masks))
