"""Method configs (one frozen dataclass per method) and the method registry.

``fastprune.prune(model, method=..., **kwargs)`` builds the method's config from the keywords
(an unknown keyword is a ``TypeError`` listing the valid ones); ``prune(model, config=...)`` is the
explicit form. New methods register with :func:`register_method` without touching ``prune``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from torch import nn

__all__ = ["ChannelConfig", "FisherDiagConfig", "MagnitudeConfig", "MethodSpec", "WoodFisherConfig", "config_from_kwargs", "get_method", "method_names", "register_method"]


def check_sparsity(x: Any, name: str = "sparsity") -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x) or not 0.0 <= x < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {x!r}")
    return float(x)


def _check_scope(scope: Any) -> None:
    if scope not in ("global", "layer"):
        raise ValueError(f"scope must be 'global' or 'layer', got {scope!r}")


def _normalise_patterns(cfg: Any) -> None:
    """Store include / exclude as tuples (a single name or pattern becomes a 1-tuple)."""
    for arg in ("include", "exclude"):
        v = getattr(cfg, arg)
        if isinstance(v, str):
            object.__setattr__(cfg, arg, (v,))
        elif v is not None:
            object.__setattr__(cfg, arg, tuple(v))


def _check_min_remaining(x: Any) -> None:
    if isinstance(x, bool) or not isinstance(x, int) or x < 0:
        raise ValueError(f"min_remaining must be an int >= 0, got {x!r}")


@dataclass(frozen=True)
class MagnitudeConfig:
    """Magnitude pruning (Han, Pool, Tran, Dally 2015; arXiv:1506.02626).

    Either a target ``sparsity`` (exactly ``round(sparsity * n)`` zeros over the pruned
    parameters, globally or per layer; ties broken by position), or Han's threshold mode
    ``threshold_std = q``: prune ``|w| < q * std(W_l)`` per layer (``q`` a float, or a mapping from
    module / parameter names or glob patterns to ``q``).

    Attributes:
        sparsity: fraction of weights to zero, in [0, 1).
        scope: ``"global"`` (one threshold across layers) or ``"layer"`` (each layer to the target).
        include / exclude: module names or glob patterns (see :func:`fastprune.masks.select_parameters`).
        threshold_std: Han's quality parameter q (exclusive with ``sparsity``).
        min_remaining: weights each layer keeps at least (default 1: never prune a layer to nothing).
        block: output channels pruned together (default 1: each weight on its own). With ``block=4``
            the rows of each weight (output channels) go in consecutive groups of 4 that keep or
            lose a position together, scored by the group's mean ``|w|``: rows that share a pattern,
            which fastprune's sparse kernels run 1.7-2.7x faster than unstructured ones at 90 %
            (one input load feeds four rows). A fastprune extension of Han's rule, not in the
            paper; the group at the threshold may be split so that the count stays exact.
    """

    sparsity: float | None = None
    scope: Literal["global", "layer"] = "global"
    include: tuple[str, ...] | None = None
    exclude: tuple[str, ...] | None = None
    threshold_std: float | Mapping[str, float] | None = None
    min_remaining: int = 1
    block: int = 1

    def __post_init__(self) -> None:
        if isinstance(self.block, bool) or not isinstance(self.block, int) or self.block < 1:
            raise ValueError(f"block must be an int >= 1 (output channels pruned together), got {self.block!r}")
        if self.sparsity is None and self.threshold_std is None:
            raise ValueError("magnitude pruning needs sparsity=... or threshold_std=...")
        if self.sparsity is not None and self.threshold_std is not None:
            raise ValueError("give either sparsity or threshold_std, not both")
        if self.sparsity is not None:
            check_sparsity(self.sparsity)
        _check_scope(self.scope)
        _check_min_remaining(self.min_remaining)
        if self.threshold_std is not None:
            qs = self.threshold_std.values() if isinstance(self.threshold_std, Mapping) else [self.threshold_std]
            for q in qs:
                if isinstance(q, bool) or not isinstance(q, (int, float)) or not math.isfinite(q) or q < 0:
                    raise ValueError(f"threshold_std (Han's q) must be a finite number >= 0, got {q!r}")
        _normalise_patterns(self)


@dataclass(frozen=True)
class MethodSpec:
    name: str
    config_cls: type
    # run(model, config) -> Plan, without changing the model (prune() applies it)
    run: Callable[[nn.Module, Any], Any]
    description: str = ""


_REGISTRY: dict[str, MethodSpec] = {}


def register_method(name: str, config_cls: type, run: Callable[[nn.Module, Any], Any], description: str = "") -> None:
    """Add a method to ``fastprune.prune``'s registry (``run(model, config) -> Plan``)."""
    if name in _REGISTRY:
        raise ValueError(f"method {name!r} is already registered")
    _REGISTRY[name] = MethodSpec(name, config_cls, run, description)


def method_names() -> list[str]:
    return sorted(_REGISTRY)


def get_method(name: str) -> MethodSpec:
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ValueError(f"unknown method {name!r}; known methods: {', '.join(method_names())}")
    return _REGISTRY[name]


def config_from_kwargs(config_cls: type, kwargs: Mapping[str, Any]) -> Any:
    """Build a config dataclass from keywords; an unknown keyword is a TypeError listing valid ones."""
    valid = [f.name for f in dataclasses.fields(config_cls) if f.init]
    unknown = [k for k in kwargs if k not in valid]
    if unknown:
        raise TypeError(f"{config_cls.__name__} got unexpected keyword(s) {unknown}; valid: {', '.join(valid)}")
    return config_cls(**kwargs)


def _check_common_data(cfg: Any) -> None:
    from fastprune.importance.woodfisher import check_damp, check_loader, check_positive_int

    if cfg.sparsity is None:
        raise ValueError(f"{type(cfg).__name__} needs sparsity=")
    check_sparsity(cfg.sparsity)
    check_loader(cfg.data)
    check_positive_int(cfg.num_grads, "num_grads")
    check_positive_int(cfg.fisher_batch_size, "fisher_batch_size")
    check_damp(cfg.damp)
    _check_scope(cfg.scope)
    _check_min_remaining(cfg.min_remaining)
    if cfg.loss_fn is not None and not callable(cfg.loss_fn):
        raise TypeError("loss_fn must be callable (outputs, targets) -> scalar loss")
    _normalise_patterns(cfg)


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
        _check_common_data(self)


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
        from fastprune.importance.woodfisher import check_positive_int

        check_positive_int(self.block_size, "block_size")
        check_positive_int(self.recompute_steps, "recompute_steps")
        if self.blocks not in ("layer", "global"):
            raise ValueError(f"blocks must be 'layer' or 'global', got {self.blocks!r}")


@dataclass(frozen=True)
class FisherDiagConfig(_FisherDataConfig):
    """Diagonal empirical Fisher pruning: saliency ``w^2 F_qq / 2`` with
    ``F_qq = damp + (1/N) sum g_q^2``, no weight update (WoodFisher's baseline)."""


@dataclass(frozen=True)
class ChannelConfig:
    """Structured (channel) pruning with a filter criterion: ``l1_filter``, ``l2_filter``,
    ``bn_scale`` or ``random`` (see :mod:`fastprune.importance.channels`).

    Attributes:
        sparsity: fraction of channels removed, in [0, 1): in each group (``scope="layer"``) or
            over all removable channels (``scope="global"``, scores normalised per group).
        example_inputs: a tensor or tuple of inputs; the shapes the graph is traced with.
        scope: ``"layer"`` (default) or ``"global"``.
        round_to: keep each group's channel count a multiple of this (SIMD-friendly widths).
        include / exclude: module-name globs (see :func:`fastprune.structure.find_groups`).
        mode: ``"compact"`` (default) removes the channels physically; ``"mask"`` keeps shapes and
            zeroes whole channels (see ``hard``).
        hard: in mask mode, zero filters, biases and the BN's gamma and beta and keep them zero
            through training (torch prune reparametrisation); False zeroes filters and biases once
            and leaves BN alone, so they can regrow (soft filter pruning, as SFP does).
        allow_approximate: let compaction fold a constant channel where that is not exact (reported).
        reduction: how member scores combine into a group channel's score: sum, mean or max.
        seed: for ``random``.
    """

    sparsity: float | None = None
    example_inputs: Any = None
    scope: Literal["layer", "global"] = "layer"
    round_to: int | None = None
    include: tuple[str, ...] | None = None
    exclude: tuple[str, ...] | None = None
    mode: Literal["compact", "mask"] = "compact"
    hard: bool = True
    allow_approximate: bool = False
    reduction: Literal["sum", "mean", "max"] = "sum"
    seed: int = 0

    def __post_init__(self) -> None:
        import torch

        if self.sparsity is None:
            raise ValueError("channel pruning needs sparsity=")
        check_sparsity(self.sparsity)
        x = self.example_inputs
        if isinstance(x, torch.Tensor):
            pass
        elif isinstance(x, (tuple, list)) and x and all(isinstance(v, torch.Tensor) for v in x):
            object.__setattr__(self, "example_inputs", tuple(x))
        else:
            raise ValueError("channel pruning needs example_inputs= (a tensor or a tuple of tensors) to trace the model")
        _check_scope(self.scope)
        if self.round_to is not None and (isinstance(self.round_to, bool) or not isinstance(self.round_to, int)
                                          or self.round_to < 1):
            raise ValueError(f"round_to must be a positive int or None, got {self.round_to!r}")
        if self.mode not in ("compact", "mask"):
            raise ValueError(f"mode must be 'compact' or 'mask', got {self.mode!r}")
        if self.reduction not in ("sum", "mean", "max"):
            raise ValueError(f"reduction must be 'sum', 'mean' or 'max', got {self.reduction!r}")
        _normalise_patterns(self)
