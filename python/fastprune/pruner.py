"""Pruners with a life cycle: hooks a training loop calls, for pruning that happens during training.

A pruner owns its model and answers four calls (the shape of sparseml's modifiers):

* :meth:`~BasePruner.on_start`: once, before the first step (the first pruning, when there is one);
* :meth:`~BasePruner.on_step`: after every optimizer step (``step`` counts the steps of one ``fit`` call from 0);
* :meth:`~BasePruner.on_epoch_end`: after every epoch (``epoch`` counts from 0);
* :meth:`~BasePruner.finalize`: once, when training is over (make the result permanent, remove
  channels for real...); returns what the pruner decided last.

:func:`fastprune.train.fit` calls the first three for every pruner in ``callbacks=``; a user's own
loop calls them directly, and :meth:`~BasePruner.finalize` at the end either way. Subclasses
override the hooks they need: :class:`Pruner` prunes on a schedule with masks that only grow;
soft pruning (masks recomputed each epoch, zeroed weights allowed back) and entwined prune /
fine-tune loops subclass :class:`BasePruner` the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from torch import nn

from fastprune import schedules
from fastprune.api import prune
from fastprune.importance.channels import FilterNorm, group_scores
from fastprune.masks import finalize as finalize_masks
from fastprune.methods.channels import input_specs
from fastprune.methods.registry import config_from_kwargs, spec_for
from fastprune.plan import Plan
from fastprune.schedules import Schedule
from fastprune.select import select_channels
from fastprune.structure.groups import as_inputs, find_groups
from fastprune.structure.surgery import CompactionReport, compact, mask_channels

__all__ = ["BasePruner", "Pruner", "SoftFilterPruner"]


class BasePruner:
    """The life cycle: every hook does nothing by default; :meth:`on_start` runs its body once.

    Subclasses implement :meth:`start` (the work of :meth:`on_start`), :meth:`on_step`,
    :meth:`on_epoch_end` and :meth:`finalize` as they need. ``started`` and ``finalized`` say where
    the pruner is; a hook called after :meth:`finalize` is an error (the model has changed shape).
    """

    def __init__(self, model: nn.Module) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        self.started = False
        self.finalized = False

    def _check_open(self, hook: str) -> None:
        if self.finalized:
            raise RuntimeError(f"{type(self).__name__}.{hook} called after finalize()")

    def on_start(self) -> None:
        """Before training (idempotent: a pruner passed to several ``fit`` calls starts once)."""
        self._check_open("on_start")
        if not self.started:
            self.started = True
            self.start()

    def start(self) -> None:
        """What :meth:`on_start` does, once."""

    def on_step(self, step: int) -> None:
        """After optimizer step ``step`` (0-based)."""
        self._check_open("on_step")

    def on_epoch_end(self, epoch: int) -> None:
        """After epoch ``epoch`` (0-based)."""
        self._check_open("on_epoch_end")

    def finalize(self) -> Any:
        """When training is over; the pruner takes no hooks after it."""
        self._check_open("finalize")
        self.finalized = True
        return None


class Pruner(BasePruner):
    """Iterative / gradual pruning on a schedule: each pruning step prunes to ``schedule(k)``, the
    k-th step being the k-th call of :meth:`step` (0-based).

    As a callback (``fit(model, loader, epochs, lr, callbacks=[pruner])``), it prunes once in
    :meth:`on_start` and once after each epoch, so epoch ``e`` trains at ``schedule(e)``.
    By hand (Han et al.'s iterative prune-retrain loop)::

        pruner = fastprune.Pruner(model, "magnitude", schedule=fastprune.schedules.linear(0.5, 0.95, 0, 4))
        for _ in range(5):
            pruner.step()
            fastprune.train.fit(model, loader, epochs=3, lr=0.01)
        pruner.finalize()  # the masks become the weights

    Masks only grow: a weight pruned at one step stays pruned. Extra keywords go to the method's
    config (``scope``, ``include``, ...). ``plans`` holds each step's plan.
    """

    def __init__(self, model: nn.Module, method: str = "magnitude", *, schedule: Schedule, **kwargs: Any) -> None:
        super().__init__(model)
        if not callable(schedule):
            raise TypeError("schedule must be a callable step -> sparsity (see fastprune.schedules)")
        if "sparsity" in kwargs:
            raise TypeError("Pruner takes its sparsity from the schedule; do not pass sparsity=")
        spec = spec_for(method)
        config_from_kwargs(spec.config_cls, {"sparsity": schedule(0), **kwargs})  # validate early
        self.method = method
        self.schedule = schedule
        self.kwargs = kwargs
        self.step_index = 0
        self.plans: list[Plan] = []

    def step(self) -> Plan:
        """Prune to the schedule's next sparsity and return that step's plan."""
        self._check_open("step")
        plan = prune(self.model, self.method, sparsity=self.schedule(self.step_index), **self.kwargs)
        self.step_index += 1
        self.plans.append(plan)
        return plan

    def start(self) -> None:
        self.step()

    def on_epoch_end(self, epoch: int) -> None:
        super().on_epoch_end(epoch)
        self.step()

    def finalize(self) -> Plan | None:
        """Make the masks permanent (:func:`fastprune.finalize`); returns the last plan."""
        super().finalize()
        finalize_masks(self.model)
        return self.plans[-1] if self.plans else None


class SoftFilterPruner(BasePruner):
    """Soft filter pruning (He et al., IJCAI 2018, arXiv:1808.06866) and its asymptotic schedule
    (ASFP, He et al., arXiv:1808.07471).

    After every epoch (``on_epoch_end``) each prunable group's filters are scored by their norm and
    the lowest ``schedule(epoch + 1)`` fraction of every group is zeroed (the same rate everywhere,
    as the paper); ``on_start`` zeroes at ``schedule(0)`` (0 for the asymptotic schedule). Nothing
    else holds them at zero: no masks, no optimizer hooks, momentum untouched, so training can grow
    a zeroed filter back and the next epoch's norms decide again. ``finalize()`` removes the channels
    zeroed last for real (``fastprune.compact``: exact where the removed channels' constants fold
    exactly, else kept, or folded approximately with ``allow_approximate``) and returns the Plan.

    Args:
        model: the model, pruned in place.
        sparsity: the final fraction P of each group's filters.
        example_inputs: the shapes the groups are traced with.
        epochs: E, the epochs the schedule spans (the asymptotic rate reaches P at E).
        schedule: ``"asymptotic"`` (ASFP: ``P(t) = P (1 - e^{-kt}) / (1 - e^{-kE})`` with
            ``P(E / d) = 3/4 P``), ``"constant"`` (SFP: P from the first epoch), or any Schedule.
        d: ASFP's D (> 4/3).
        criterion: ``"l2"`` (the paper) or ``"l1"`` filter norms.
        zero: ``"filter"`` (the paper: the filter and its bias; after a BN the channel still emits the
            constant act(beta - gamma mu / sigma)) or ``"channel"`` (also the BN's gamma, beta and
            running mean). Default ``"filter"``: with ``"channel"`` a zeroed channel's BN output is 0
            and, behind a ReLU, so are the gradients to its filter and its BN (ReLU'(0) = 0), so it
            cannot come back; measured on the digits CNN (tests/pruning/test_sfp.py): with "filter"
            zeroed filters regrow, with "channel" none does, so "channel" is hard pruning in effect.
            (Why "filter" regrows so fast behind a train-mode BN: a zeroed channel has zero batch
            variance, so BN scales its input gradient by gamma / sqrt(eps), ~316 gamma.) With "filter"
            the zeroed channels' BN running means are reset to 0 (their input's true mean), so eval
            mode emits the constant beta that training sees.
        include / exclude: module-name globs of the groups (see :func:`fastprune.find_groups`).
        allow_approximate: for ``finalize``: fold constants where that is not exact (reported).
    """

    def __init__(
        self,
        model: nn.Module,
        sparsity: float,
        *,
        example_inputs: Any,
        epochs: int,
        schedule: Literal["asymptotic", "constant"] | Schedule = "asymptotic",
        d: float = 8.0,
        criterion: Literal["l2", "l1"] = "l2",
        zero: Literal["filter", "channel"] = "filter",
        include: Sequence[str] | str | None = None,
        exclude: Sequence[str] | str | None = None,
        allow_approximate: bool = False,
    ) -> None:
        super().__init__(model)
        if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0.0 <= sparsity < 1.0:
            raise ValueError(f"sparsity must be in [0, 1), got {sparsity!r}")
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
            raise ValueError(f"epochs must be a positive int, got {epochs!r}")
        if criterion not in ("l1", "l2"):
            raise ValueError(f"criterion must be 'l2' or 'l1', got {criterion!r}")
        if zero not in ("filter", "channel"):
            raise ValueError(f"zero must be 'filter' or 'channel', got {zero!r}")
        if schedule == "asymptotic":
            self.schedule: Schedule = schedules.asymptotic(float(sparsity), epochs, d)
        elif schedule == "constant":
            self.schedule = schedules.constant(float(sparsity))
        elif callable(schedule):
            self.schedule = schedule
        else:
            raise ValueError(f"schedule must be 'asymptotic', 'constant' or a Schedule, got {schedule!r}")
        self.inputs = as_inputs(example_inputs)
        self.groups = find_groups(model, self.inputs, include=include, exclude=exclude)
        if not self.groups:
            raise ValueError(
                "the model has no prunable channel groups under include/exclude; boundaries: "
                + "; ".join(f"{n}: {r}" for n, r in self.groups.boundaries)
            )
        self.sparsity = float(sparsity)
        self.epochs = epochs
        self.criterion = FilterNorm(1 if criterion == "l1" else 2)
        self.zero = zero
        self.allow_approximate = allow_approximate
        self.zeroed: dict[int, list[int]] = {}
        self.rates: list[float] = []
        self.report: CompactionReport | None = None
        self.accuracy: dict[str, float | None] = {}

    def zero_step(self, rate: float) -> dict[int, list[int]]:
        """Score every group's filters and zero the lowest ``rate`` of each (one pass per layer)."""
        with torch.no_grad():
            scores = group_scores(self.model, self.groups, self.criterion)
            removed = select_channels(self.groups, scores, rate, scope="layer")
            mask_channels(self.model, self.groups, removed, hard=False, zero_norm=self.zero == "channel")
            if self.zero == "filter":
                self._reset_running_means(removed)
        self.zeroed = removed
        self.rates.append(rate)
        return removed

    def _reset_running_means(self, removed: dict[int, list[int]]) -> None:
        """A zeroed filter feeds its BN exactly 0, whose batch mean is 0: the running mean says so
        (else eval mode shifts the channel by a stale -gamma mu / sigma that training never sees)."""
        modules = dict(self.model.named_modules())
        by_id = {g.id: g for g in self.groups}
        for gid, chans in removed.items():
            for mem in by_id[gid].members:
                if mem.role == "norm" and mem.attr == "running_mean":
                    buf = getattr(modules[mem.module], "running_mean", None)
                    pos = mem.positions(chans)
                    if isinstance(buf, torch.Tensor) and pos:
                        buf[pos] = 0

    def start(self) -> None:
        self.zero_step(self.schedule(0))

    def on_epoch_end(self, epoch: int) -> None:
        super().on_epoch_end(epoch)
        self.zero_step(self.schedule(min(epoch + 1, self.epochs)))

    def finalize(self, evaluate: Callable[[nn.Module], float] | None = None) -> Plan:
        """Remove the channels zeroed last, for real; returns the Plan (its ``groups`` say what was
        removed and what was kept, and why). ``self.report`` holds the compaction report (measured
        output deviation where constants were folded).

        ``evaluate``: a function model -> accuracy (e.g. ``lambda m: fastprune.train.evaluate(m,
        loader)``), called on the zeroed model (what the papers report) and on the compact one;
        ``self.accuracy`` and the plan's config then hold both (``accuracy_zeroed``,
        ``accuracy_compact``). They agree when compaction was exact; ``allow_approximate`` folds
        whose deviation shows there."""
        if not self.rates:
            raise RuntimeError("SoftFilterPruner.finalize before any zeroing step (call on_start / fit first)")
        if evaluate is not None and not callable(evaluate):
            raise TypeError(f"evaluate must be a callable model -> float, got {type(evaluate).__name__}")
        acc_zeroed = float(evaluate(self.model)) if evaluate is not None else None
        super().finalize()
        report = compact(
            self.model, self.inputs, allow_approximate=self.allow_approximate, groups=self.groups, channels=self.zeroed
        )
        self.report = report
        if evaluate is not None:
            self.accuracy = {"zeroed": acc_zeroed, "compact": float(evaluate(self.model))}
        entries = tuple(
            {
                **g.to_dict(),
                "removed": report.removed.get(g.id, []),
                "kept": [[c, why] for gid, c, why in report.kept if gid == g.id],
            }
            for g in self.groups
            if g.id in self.zeroed
        )
        total = sum(len(g.prunable) for g in self.groups)
        done = sum(len(v) for v in report.removed.values())
        config = {
            "method": "sfp" if isinstance(self.schedule, schedules.Constant) else "asfp",
            "sparsity": self.sparsity,
            "epochs": self.epochs,
            "zero": self.zero,
            "schedule": repr(self.schedule),
            "input_specs": input_specs(self.inputs),
            "mode": "compact",
            "allow_approximate": self.allow_approximate,
            "compaction_exact": not report.approximate,
            "max_abs_diff": report.max_abs_diff,
            "kept_zeroed_channels": len(report.kept),
            **({f"accuracy_{k}": v for k, v in self.accuracy.items()} if self.accuracy else {}),
        }
        return Plan(str(config["method"]), config, self.sparsity, done / total if total else 0.0, groups=entries)
