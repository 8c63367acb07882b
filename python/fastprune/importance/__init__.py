"""Importance criteria: scores, one per weight (unstructured) or per channel of a group (structured).

Weight criteria return one score tensor per parameter (:func:`magnitude_scores`; the Fisher
statistics of :mod:`fastprune.importance.woodfisher`). Channel criteria are callables
``(model, groups, data=None) -> {group id: scores}`` (:mod:`fastprune.importance.channels`);
those that read data observe batches first (:class:`ActivationCriterion`).
"""

from fastprune.importance.channels import (
    ActivationCriterion,
    BNScale,
    Criterion,
    FilterNorm,
    RandomScores,
    group_scores,
    make_criterion,
    scatter_to_group,
)
from fastprune.importance.magnitude import block_scores, magnitude_scores
from fastprune.importance.nisp import inf_fs, nisp_scores
from fastprune.importance.singe import singe_scores, taylor_scores

__all__ = [
    "ActivationCriterion",
    "BNScale",
    "Criterion",
    "FilterNorm",
    "RandomScores",
    "block_scores",
    "group_scores",
    "inf_fs",
    "magnitude_scores",
    "make_criterion",
    "nisp_scores",
    "scatter_to_group",
    "singe_scores",
    "taylor_scores",
]
