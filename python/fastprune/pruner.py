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

from typing import Any

from torch import nn

from fastprune.api import prune
from fastprune.masks import finalize as finalize_masks
from fastprune.methods.registry import config_from_kwargs, spec_for
from fastprune.plan import Plan
from fastprune.schedules import Schedule

__all__ = ["BasePruner", "Pruner"]


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
