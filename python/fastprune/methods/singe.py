"""SInGE structured pruning (Yvinec et al., NeurIPS 2022, arXiv:2207.04089) and its gradient
baselines, as channel methods: ``singe`` (integrated-gradient relevance), ``grad_weight`` (the
same at mu = 1 only: ||W (.) grad||) and ``taylor`` (Molchanov et al. 2019: (sum w g)^2).

Each scores the producing layers of every coupled-channel group on the calibration data
(:mod:`fastprune.importance.singe`) and sums them per group channel; selection, masking and
compaction are the channel methods' (:func:`fastprune.methods.channels.run_channels`).
``prune(model, "singe", sparsity=..., data=..., example_inputs=...)`` is the one-shot form (score
once, remove); the paper's entwined flow (score, remove a few, fine-tune, repeat) is
:func:`fastprune.recipes.entwined` / :class:`fastprune.EntwinedPruner`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

from fastprune._checks import check_loader
from fastprune.importance.channels import Criterion
from fastprune.importance.singe import SInGECriterion, TaylorCriterion, check_singe_args
from fastprune.methods.channels import ChannelConfig, run_channels
from fastprune.methods.registry import register_method

__all__ = ["GradWeightConfig", "SInGEConfig", "TaylorConfig"]


@dataclass(frozen=True)
class _GradientConfig(ChannelConfig):
    """Fields of the gradient-reading channel methods (with :class:`ChannelConfig`'s):

    Attributes:
        data: calibration batches (any format of :mod:`fastprune.batches`).
        num_batches: cap on the batches read (None: all).
        loss_fn: ``loss_fn(outputs, targets)`` (default cross entropy); forward: ``forward(model,
            batch) -> loss`` instead (distillation, unlabelled data).
    """

    data: Any = None
    num_batches: int | None = None
    loss_fn: Callable[..., Any] | None = None
    forward: Callable[..., Any] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_loader(self.data, type(self).__name__.removesuffix("Config"))
        for name in ("loss_fn", "forward"):
            v = getattr(self, name)
            if v is not None and not callable(v):
                raise TypeError(f"{name} must be callable, got {type(v).__name__}")
        check_singe_args(num_batches=self.num_batches)

    def calibration_data(self) -> Iterable[Any] | None:
        return self.data

    def _data_kwargs(self) -> dict[str, Any]:
        return {"num_batches": self.num_batches, "loss_fn": self.loss_fn, "forward": self.forward}


@dataclass(frozen=True)
class SInGEConfig(_GradientConfig):
    """``singe``: integrated-gradient neuron relevance (see :func:`fastprune.importance.singe_scores`).

    Attributes:
        steps: K, Riemann points on the path mu = 1 .. 1/K (default 8).
        path: ``"neuron"`` (the definition) or ``"layer"`` (a layer's neurons scaled together).
        norm: 2 or 1; form: ``"singe"`` (norm inside the integral) or ``"ig"`` (outside).
        batching / chunk_size: how the scaled models run (see :func:`~fastprune.importance.singe_scores`).
    """

    steps: int = 8
    path: Literal["neuron", "layer"] = "neuron"
    norm: int = 2
    form: Literal["singe", "ig"] = "singe"
    batching: Literal["auto", "vmap", "loop", "reference"] = "auto"
    chunk_size: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_singe_args(
            steps=self.steps,
            path=self.path,
            norm=self.norm,
            form=self.form,
            batching=self.batching,
            chunk_size=self.chunk_size,
        )

    def criterion(self) -> Criterion:
        return SInGECriterion(
            steps=self.steps,
            path=self.path,
            norm=self.norm,
            form=self.form,
            batching=self.batching,
            chunk_size=self.chunk_size,
            **self._data_kwargs(),
        )


@dataclass(frozen=True)
class GradWeightConfig(_GradientConfig):
    """``grad_weight``: ||W_n (.) grad_W L|| per neuron (SInGE at mu = 1 only; ``norm`` 2 or 1)."""

    norm: int = 2

    def __post_init__(self) -> None:
        super().__post_init__()
        check_singe_args(norm=self.norm)

    def criterion(self) -> Criterion:
        return SInGECriterion(steps=1, norm=self.norm, **self._data_kwargs())


@dataclass(frozen=True)
class TaylorConfig(_GradientConfig):
    """``taylor``: Molchanov et al. 2019, (sum_{w in n} w g)^2 per batch, averaged."""

    def criterion(self) -> Criterion:
        return TaylorCriterion(**self._data_kwargs())


for _cls, _name, _desc in (
    (SInGEConfig, "singe", "SInGE: integrated-gradient neuron relevance (Yvinec et al. 2022), structured"),
    (GradWeightConfig, "grad_weight", "|| weight x gradient || per neuron (SInGE at mu = 1), structured"),
    (TaylorConfig, "taylor", "first-order Taylor (sum w g)^2 (Molchanov et al. 2019), structured"),
):
    register_method(_cls, name=_name, description=_desc)(run_channels)
