"""Magnitude pruning with retraining (Han, Pool, Tran, Dally 2015; arXiv:1506.02626).

Score ``|w|`` (:func:`fastprune.importance.magnitude_scores`, optionally averaged over blocks of
output rows), select the lowest globally or per layer (:func:`fastprune.select.topk_masks`) or by
Han's per-layer threshold ``q * std(W_l)`` (:func:`fastprune.select.threshold_masks`). Retraining
is the user's loop, or :func:`fastprune.train.fit` (iteratively: :class:`fastprune.Pruner`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from torch import nn

from fastprune._checks import check_min_remaining, check_scope, check_sparsity, normalise_patterns
from fastprune.importance.magnitude import block_scores, magnitude_scores
from fastprune.masks import check_finite_weights, check_not_below_current, select_parameters, sparsity_of
from fastprune.methods.registry import MethodResult, register_method
from fastprune.plan import Plan
from fastprune.select import threshold_masks, topk_masks

__all__ = ["MagnitudeConfig", "run_magnitude"]


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
        check_scope(self.scope)
        check_min_remaining(self.min_remaining)
        if self.threshold_std is not None:
            qs = self.threshold_std.values() if isinstance(self.threshold_std, Mapping) else [self.threshold_std]
            for q in qs:
                if isinstance(q, bool) or not isinstance(q, (int, float)) or not math.isfinite(q) or q < 0:
                    raise ValueError(f"threshold_std (Han's q) must be a finite number >= 0, got {q!r}")
        normalise_patterns(self)


@register_method(MagnitudeConfig, name="magnitude", description="|w|, global or per layer (Han et al. 2015)")
def run_magnitude(model: nn.Module, cfg: MagnitudeConfig) -> MethodResult:
    refs = select_parameters(model, cfg.include, cfg.exclude)
    if not refs:
        raise ValueError("the model has no prunable parameters (weights of Linear/Conv layers) under include/exclude")
    check_finite_weights(refs)
    names = [r.name for r in refs]
    if cfg.threshold_std is not None:
        masks = threshold_masks(refs, cfg.threshold_std, cfg.min_remaining, cfg.block)
    else:
        assert cfg.sparsity is not None  # the config checks that one of the two is given
        check_not_below_current(refs, cfg.sparsity, cfg.scope)
        scores = [block_scores(s, cfg.block) for s in magnitude_scores(refs)]
        masks = topk_masks(names, scores, cfg.sparsity, cfg.scope, cfg.min_remaining)
    return MethodResult(Plan("magnitude", dataclasses.asdict(cfg), cfg.sparsity, sparsity_of(masks), masks))
