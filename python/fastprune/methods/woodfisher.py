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
from fastprune.importance.woodfisher import collect_fisher, obs_updates
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
from fastprune.select import topk_masks

__all__ = ["FisherDiagConfig", "WoodFisherConfig", "run_fisher_diag", "run_woodfisher"]


@dataclass(frozen=True)
class _FisherDataConfig:
    """Fields every empirical-Fisher method shares (see WoodFisherConfig for their meaning)."""

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

    def __post_init__(self) -> None:
        if self.sparsity is None:
            raise ValueError(f"{type(self).__name__} needs sparsity=")
        check_sparsity(self.sparsity)
        check_loader(self.data, type(self).__name__)
        check_positive_int(self.num_grads, "num_grads")
        check_positive_int(self.fisher_batch_size, "fisher_batch_size")
        check_damp(self.damp)
        check_scope(self.scope)
        check_min_remaining(self.min_remaining)
        if self.loss_fn is not None and not callable(self.loss_fn):
            raise TypeError("loss_fn must be callable (outputs, targets) -> scalar loss")
        normalise_patterns(self)


@dataclass(frozen=True)
class WoodFisherConfig(_FisherDataConfig):
    """WoodFisher one-shot OBS pruning (Singh & Alistarh 2020; arXiv:2004.14340).

    Attributes:
        sparsity: fraction of the selected weights to zero (exact count), in [0, 1).
        data: iterable of ``(inputs, targets)`` batches for the empirical Fisher.
        loss_fn: ``(outputs, targets) -> loss`` (default: cross entropy, mean over the batch).
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


@dataclass(frozen=True)
class FisherDiagConfig(_FisherDataConfig):
    """Diagonal empirical Fisher pruning: saliency ``w^2 F_qq / 2`` with
    ``F_qq = damp + (1/N) sum g_q^2``, no weight update (WoodFisher's baseline)."""


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


def _woodfisher_step(
    model: nn.Module, cfg: WoodFisherConfig, sparsity: float
) -> tuple[list[ParamRef], dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
    """One OBS step: (masks, updates) for ``sparsity``, without changing the model."""
    refs = _data_refs(model, cfg)
    loss_fn = cfg.loss_fn or torch.nn.functional.cross_entropy
    stats = collect_fisher(
        model,
        refs,
        cfg.data,
        loss_fn,
        num_grads=cfg.num_grads,
        block_size=cfg.block_size,
        damp=cfg.damp,
        blocks=cfg.blocks,
        fisher_batch_size=cfg.fisher_batch_size,
        progress=cfg.progress,
    )
    weights = [effective_weight(r.module, r.param_name) for r in refs]
    inv_diag = stats.inverse_diag()
    sal = [(w.double() ** 2).reshape(-1) / (2 * dg.double()) for w, dg in zip(weights, inv_diag, strict=True)]
    names = [r.name for r in refs]
    masks = topk_masks(
        names, [s.reshape(w.shape) for s, w in zip(sal, weights, strict=True)], sparsity, cfg.scope, cfg.min_remaining
    )
    updates = None
    if cfg.update_weights:
        dws = obs_updates(stats, weights, [masks[n] for n in names], joint=cfg.joint)
        for n, dw in zip(names, dws, strict=True):
            if not bool(torch.isfinite(dw).all()):
                raise ValueError(f"the OBS update of {n} is not finite; increase damp")
        updates = {n: dw.reshape(w.shape).to(w.dtype) for n, dw, w in zip(names, dws, weights, strict=True)}
    return refs, masks, updates


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
    config = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("data", "loss_fn")}
    return MethodResult(Plan("woodfisher", config, cfg.sparsity, sparsity_of(masks), masks), weight_updates=updates)


@register_method(
    FisherDiagConfig, name="fisher_diag", description="diagonal empirical Fisher saliency (WoodFisher's baseline)"
)
def run_fisher_diag(model: nn.Module, cfg: FisherDiagConfig) -> MethodResult:
    assert cfg.sparsity is not None  # the config requires it
    refs = _data_refs(model, cfg)
    loss_fn = cfg.loss_fn or torch.nn.functional.cross_entropy
    stats = collect_fisher(
        model,
        refs,
        cfg.data,
        loss_fn,
        num_grads=cfg.num_grads,
        block_size=1,
        damp=cfg.damp,
        fisher_batch_size=cfg.fisher_batch_size,
        need_inverse=False,
        progress=cfg.progress,
    )
    weights = [effective_weight(r.module, r.param_name) for r in refs]
    sal = [
        (w.double() ** 2) * (cfg.damp + fd.reshape(w.shape)) / 2
        for w, fd in zip(weights, stats.fisher_diag, strict=True)
    ]
    names = [r.name for r in refs]
    masks = topk_masks(names, sal, cfg.sparsity, cfg.scope, cfg.min_remaining)
    config = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("data", "loss_fn")}
    return MethodResult(Plan("fisher_diag", config, cfg.sparsity, sparsity_of(masks), masks))
