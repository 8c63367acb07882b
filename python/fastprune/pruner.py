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

import copy
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import nn

from fastprune import schedules
from fastprune.api import prune
from fastprune.apply import apply
from fastprune.importance.channels import FilterNorm, group_scores
from fastprune.masks import detach_masked_weights
from fastprune.masks import finalize as finalize_masks
from fastprune.methods.channels import ChannelConfig, channel_plan, channel_scores, input_specs
from fastprune.methods.registry import config_from_kwargs, spec_for
from fastprune.plan import Plan
from fastprune.schedules import Schedule
from fastprune.select import select_channels, select_lowest_channels
from fastprune.structure.count import count
from fastprune.structure.groups import Group, GroupList, as_inputs, find_groups
from fastprune.structure.surgery import CompactionReport, compact, mask_channels

__all__ = ["BasePruner", "EntwinedPruner", "Pruner", "SoftFilterPruner"]


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


class EntwinedPruner(BasePruner):
    """Entwined pruning and fine-tuning (SInGE's flow, Yvinec et al. 2022): every :meth:`step`
    scores the channels with a channel method, removes the lowest few, and the caller fine-tunes
    before the next step, until the model is down to a parameter or MACs target (fractions of the
    model it started from, measured with :func:`fastprune.count` on the compact model).

    Args:
        model: the model, pruned in place.
        method: any registered channel method (``"singe"``, ``"taylor"``, ``"grad_weight"``,
            ``"l1_filter"``, ``"random"``, ...); extra keywords go to its config (``data=``,
            ``steps=``, ``include=``...).
        example_inputs: the shapes the groups are traced and the model counted with.
        target_params / target_macs: exactly one, in (0, 1]: stop once the compact model has at
            most that fraction of the starting parameters / MACs.
        step: a fraction (0, 1) of the channels still prunable, or a number of channels, removed per
            step [choice: chosen over the whole model by group-normalised score, as
            ``scope="global"``; ``scope="layer"`` takes the fraction (at least one channel) of every
            group]. The last step removes only as many as the target needs (found by bisection on
            trial copies), so every method ends at the same size.
        mode: ``"compact"`` (default): every step removes the channels for real, the model shrinks
            as it goes; call :meth:`step` between your fine-tunes (:func:`fastprune.recipes.entwined`
            does). ``"mask"``: channels are masked (zero, held at zero) and removed by
            :meth:`finalize`; the shapes never change, so the pruner can be a ``fit`` callback
            (``on_start`` and every ``on_epoch_end`` take a step while the target is not met).
        max_steps: a guard against a target the method cannot reach.
    """

    def __init__(
        self,
        model: nn.Module,
        method: str = "singe",
        *,
        example_inputs: Any,
        target_params: float | None = None,
        target_macs: float | None = None,
        step: float | int = 0.05,
        mode: Literal["compact", "mask"] = "compact",
        max_steps: int = 1000,
        **kwargs: Any,
    ) -> None:
        super().__init__(model)
        if (target_params is None) == (target_macs is None):
            raise ValueError("give exactly one of target_params= and target_macs= (a fraction of the starting model)")
        target = target_params if target_params is not None else target_macs
        if isinstance(target, bool) or not isinstance(target, (int, float)) or not 0.0 < target <= 1.0:
            raise ValueError(f"the target must be a fraction in (0, 1], got {target!r}")
        if isinstance(step, bool) or not isinstance(step, (int, float)):
            raise ValueError(f"step must be a fraction in (0, 1) or a number of channels, got {step!r}")
        if isinstance(step, float) and not 0.0 < step < 1.0 or isinstance(step, int) and step < 1:
            raise ValueError(f"step must be a fraction in (0, 1) or a positive number of channels, got {step!r}")
        if mode not in ("compact", "mask"):
            raise ValueError(f"mode must be 'compact' or 'mask', got {mode!r}")
        if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1:
            raise ValueError(f"max_steps must be a positive int, got {max_steps!r}")
        for k in ("sparsity", "mode", "hard"):
            if k in kwargs:
                raise TypeError(f"EntwinedPruner sets {k}= itself; do not pass it")
        spec = spec_for(method)
        if not issubclass(spec.config_cls, ChannelConfig):
            raise ValueError(f"entwined pruning removes channels: {method!r} is not a channel method")
        self.inputs = as_inputs(example_inputs)
        self.scope = kwargs.pop("scope", "global")
        self.config = config_from_kwargs(
            spec.config_cls,
            {"sparsity": 0.0, "example_inputs": self.inputs, "mode": "compact", "scope": self.scope, **kwargs},
        )
        self.method = method
        self.kind = "params" if target_params is not None else "macs"
        self.target = float(target)
        self.step_size = step
        self.mode = mode
        self.max_steps = max_steps
        macs, params = count(model, self.inputs)
        self.start_size = {"macs": macs, "params": params}
        self.history: list[dict[str, Any]] = [{"step": 0, "removed": 0, "macs": macs, "params": params}]
        self.removed: dict[int, set[int]] = {}  # mask mode: the channels masked so far
        self._mask_groups: GroupList | None = None

    # -- where we are
    def size(self) -> dict[str, int]:
        """MACs and parameters of the model as it stands (mask mode: of its compact form)."""
        return dict(self.history[-1])

    @property
    def done(self) -> bool:
        """The target is met."""
        return self.history[-1][self.kind] <= self.target * self.start_size[self.kind]

    def _measure(
        self, groups: Sequence[Group] | None = None, removed: Mapping[int, Sequence[int]] | None = None
    ) -> tuple[int, int]:
        """(MACs, params) of the compact model, after also removing ``removed`` (on a copy)."""
        if removed is None and self.mode == "compact":
            return count(self.model, self.inputs)
        every = self._all_removed(removed) if self.mode == "mask" else dict(removed or {})
        if not every:
            return count(self.model, self.inputs)
        assert groups is not None
        detach_masked_weights(self.model)  # (deepcopy refuses the graph a forward leaves on masked weights)
        trial = copy.deepcopy(self.model)
        mask_channels(trial, groups, every, hard=False, zero_norm=True)
        finalize_masks(trial)
        compact(trial, self.inputs, groups=groups, channels=every)
        return count(trial, self.inputs)

    def _all_removed(self, new: Mapping[int, Sequence[int]] | None) -> dict[int, list[int]]:
        out = {g: set(v) for g, v in self.removed.items()}
        for g, v in (new or {}).items():
            out.setdefault(g, set()).update(v)
        return {g: sorted(v) for g, v in out.items() if v}

    # -- one step
    def _select(self, groups: Sequence[Group], scores: Mapping[int, torch.Tensor], k_total: int | None) -> dict:
        """Channels to remove this step: ``k_total`` over the model (global), or the step's fraction
        of every group (layer); never a group's last live channel."""
        live = [Group(g.id, g.channels, g.members, g.pinned | frozenset(self.removed.get(g.id, ()))) for g in groups]
        live = [g for g in live if g.id in scores and g.prunable]
        if not live:
            return {}
        if self.scope == "layer":
            frac = self.step_size if isinstance(self.step_size, float) else None
            per = {}
            for g in live:
                n = len(g.prunable)
                want = max(1, round(frac * n)) if frac is not None else int(self.step_size)
                per[g.id] = min(want, n - 1) / n
            out = select_channels(live, scores, 0.0, scope="layer", per_group=per)
        else:
            out = select_lowest_channels(
                live, scores, sum(len(g.prunable) for g in live) if k_total is None else k_total
            )
        return {g: v for g, v in out.items() if v}

    def step(self) -> Plan | None:
        """Score, remove the next channels (fewer on the last step: just what the target needs);
        None when the target is met already."""
        self._check_open("step")
        if self.done:
            return None
        if len(self.history) > self.max_steps:
            raise RuntimeError(f"EntwinedPruner: the target was not met after max_steps={self.max_steps} steps")
        self.started = True
        if self.mode == "mask" and self._mask_groups is None:
            self._mask_groups = find_groups(
                self.model,
                self.inputs,
                include=self.config.include,
                exclude=self.config.exclude,
                prune_norms=self.config.prune_norms,
            )
        groups, scores = channel_scores(self.model, self.config, self._mask_groups)
        n_live = sum(len(set(g.prunable) - self.removed.get(g.id, set())) for g in groups if g.id in scores)
        if isinstance(self.step_size, float):
            k_step = max(1, round(self.step_size * n_live))
        else:
            k_step = int(self.step_size)
        removed = self._select(groups, scores, k_step)
        if not removed:
            raise RuntimeError(
                f"EntwinedPruner: nothing left to remove at {self.history[-1][self.kind]} {self.kind} "
                f"(target {self.target:.3g} of {self.start_size[self.kind]})"
            )
        goal = self.target * self.start_size[self.kind]
        macs, params = self._measure(groups, removed)
        if (macs if self.kind == "macs" else params) <= goal and self.scope != "layer" and k_step > 1:
            lo, hi = 1, k_step  # the fewest channels that meet the target (size falls as k grows)
            while lo < hi:
                mid = (lo + hi) // 2
                trial = self._select(groups, scores, mid)
                m, p = self._measure(groups, trial)
                if (m if self.kind == "macs" else p) <= goal:
                    hi = mid
                else:
                    lo = mid + 1
            removed = self._select(groups, scores, lo)
        plan = channel_plan(self.config, groups, scores, removed, sparsity=None)
        if self.mode == "compact":
            plan = apply(self.model, plan, example_inputs=self.inputs, trace=groups)
        else:
            mask_channels(self.model, groups, removed, hard=True)
            for g, v in removed.items():
                self.removed.setdefault(g, set()).update(v)
        macs, params = self._measure(groups)
        n = sum(len(v) for v in removed.values())
        self.history.append({"step": len(self.history), "removed": n, "macs": macs, "params": params})
        return plan

    # -- the life cycle
    def _hook_step(self, hook: str) -> None:
        if self.mode != "mask":
            raise RuntimeError(
                f"EntwinedPruner.{hook}: in mode='compact' the parameters are replaced at every step, which an "
                "optimizer built before (fit's) does not see; use mode='mask' as a fit callback, or call step() "
                "between your own fine-tunes (fastprune.recipes.entwined)"
            )
        self.step()

    def start(self) -> None:
        self._hook_step("on_start")

    def on_epoch_end(self, epoch: int) -> None:
        super().on_epoch_end(epoch)
        if not self.done:
            self._hook_step("on_epoch_end")

    def finalize(self) -> Plan:
        """Mask mode: remove the masked channels for real. Returns a Plan of the whole run (its
        ``config["history"]``: MACs and parameters after every step)."""
        super().finalize()
        if self.mode == "mask" and self.removed:
            finalize_masks(self.model)
            compact(self.model, self.inputs, groups=self._mask_groups, channels=self._all_removed(None))
            macs, params = count(self.model, self.inputs)
            self.history[-1] = {**self.history[-1], "macs": macs, "params": params}
        last = self.history[-1]
        config = {
            "method": self.method,
            "target": {self.kind: self.target},
            "step": self.step_size,
            "scope": self.scope,
            "mode": self.mode,
            "history": [dict(h) for h in self.history],
            "input_specs": input_specs(self.inputs),
        }
        achieved = 1.0 - last["params"] / self.start_size["params"] if self.start_size["params"] else 0.0
        return Plan(f"entwined:{self.method}", config, None, achieved)
