"""NISP structured pruning (Yu et al., "NISP: Pruning Networks using Neuron Importance Score
Propagation", CVPR 2018, arXiv:1711.05908).

The final response layer's units are ranked by Inf-FS on their responses to the data, the scores
propagated backwards to every layer (:func:`fastprune.importance.nisp.nisp_scores`), and each
coupled-channel group's channel scored by the sum of its producing layers' scores [choice: members
sum, as a residual stream's channel is written by every block]. Selection, masking and compaction
are the channel methods' (:func:`fastprune.methods.channels.run_channels`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from fastprune._checks import check_loader
from fastprune.importance.channels import Criterion, layer_scores_to_groups
from fastprune.importance.nisp import nisp_scores
from fastprune.methods.channels import ChannelConfig, run_channels
from fastprune.methods.registry import register_method
from fastprune.structure.groups import Group

__all__ = ["NISPConfig", "NISPCriterion"]


class NISPCriterion:
    """The channel criterion: NISP scores of the producing layers, summed over a group's members."""

    def __init__(
        self,
        example_inputs: Any,
        frl: str | None,
        num_batches: int | None,
        alpha: float,
        variant: Literal["paper", "code"],
    ) -> None:
        self.example_inputs = example_inputs
        self.frl = frl
        self.num_batches = num_batches
        self.alpha = alpha
        self.variant: Literal["paper", "code"] = variant

    def __call__(
        self, model: nn.Module, groups: Sequence[Group], data: Iterable[Any] | None = None
    ) -> dict[int, torch.Tensor]:
        per_layer = nisp_scores(
            model,
            data,
            example_inputs=self.example_inputs,
            frl=self.frl,
            num_batches=self.num_batches,
            alpha=self.alpha,
            variant=self.variant,
        )
        return layer_scores_to_groups(groups, per_layer)


@dataclass(frozen=True)
class NISPConfig(ChannelConfig):
    """``nisp``: Neuron Importance Score Propagation (Yu et al. 2018). Fields of
    :class:`~fastprune.methods.channels.ChannelConfig`, and:

    Attributes:
        data: batches of the model's inputs (any format of :mod:`fastprune.batches`; labels unused).
        frl: the module whose input is the final response layer (default: the last Linear).
        num_batches: cap on the batches read for the responses (None: all).
        alpha: Inf-FS's mix of variance and decorrelation; variant: ``"paper"`` or ``"code"``
            (see :func:`fastprune.importance.inf_fs`).

    Groups with no layer before the final response layer (the classifier's own outputs) are not
    scored, so not pruned.
    """

    data: Any = None
    frl: str | None = None
    num_batches: int | None = None
    alpha: float = 0.5
    variant: Literal["paper", "code"] = "paper"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_loader(self.data, "NISP")
        if self.num_batches is not None and (
            isinstance(self.num_batches, bool) or not isinstance(self.num_batches, int) or self.num_batches < 1
        ):
            raise ValueError(f"num_batches must be a positive int or None, got {self.num_batches!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha!r}")
        if self.variant not in ("paper", "code"):
            raise ValueError(f"variant must be 'paper' or 'code', got {self.variant!r}")
        if self.frl is not None and not isinstance(self.frl, str):
            raise TypeError(f"frl must be a module name, got {type(self.frl).__name__}")

    def criterion(self) -> Criterion:
        return NISPCriterion(self.example_inputs, self.frl, self.num_batches, self.alpha, self.variant)

    def calibration_data(self) -> Iterable[Any] | None:
        return self.data


register_method(
    NISPConfig, name="nisp", description="NISP: Inf-FS on the final responses, propagated (Yu et al. 2018)"
)(run_channels)
