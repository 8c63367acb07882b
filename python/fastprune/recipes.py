"""Han et al.'s train -> prune -> retrain recipes, shared by the demo, the CLI and the benchmarks.

Reference: Han, Pool, Tran, Dally 2015 (arXiv:1506.02626): train dense with L2, prune by magnitude,
retrain the survivors with the masks fixed; iterating prune -> retrain reaches higher sparsity
than one shot at the same accuracy.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fastprune import schedules
from fastprune.api import prune
from fastprune.data.digits import Digits
from fastprune.pruner import Pruner
from fastprune.report import sparsity_report
from fastprune.train import evaluate, fit

__all__ = ["Outcome", "iterative", "one_shot", "train_dense"]


@dataclass(frozen=True)
class Outcome:
    """Accuracy right after pruning and after retraining, with the weight counts."""

    sparsity: float
    acc_pruned: float
    acc_retrained: float
    nonzero: int
    total: int


def train_dense(
    model_fn: Callable[[], nn.Module],
    data: Digits,
    *,
    epochs: int = 30,
    lr: float = 0.05,
    l1: float = 0.0,
    l2: float = 1e-4,
    seed: int = 0,
    progress: bool = False,
) -> nn.Module:
    """Build ``model_fn()`` under ``seed`` and train it dense."""
    torch.manual_seed(seed)
    model = model_fn()
    fit(model, data.train_loader(), epochs=epochs, lr=lr, l1=l1, l2=l2, progress=progress, desc="dense")
    return model


def _outcome(model: nn.Module, sparsity: float, acc_pruned: float, data: Digits) -> Outcome:
    rep = sparsity_report(model)
    return Outcome(sparsity, acc_pruned, evaluate(model, data.test_loader()), rep.numel - rep.zeros, rep.numel)


def one_shot(
    dense: nn.Module,
    data: Digits,
    sparsity: float,
    *,
    retrain_epochs: int = 20,
    lr: float = 0.02,
    l2: float = 1e-4,
    seed: int = 0,
    scope: str = "global",
    progress: bool = False,
    method: str = "magnitude",
    method_kwargs: dict[str, Any] | None = None,
) -> tuple[nn.Module, Outcome]:
    """Prune a copy of ``dense`` to ``sparsity`` at once with ``method``, then retrain
    ``retrain_epochs``. ``method_kwargs`` go to the method (``{"data": loader, "num_grads": 512}``)."""
    model = copy.deepcopy(dense)
    method_kwargs = dict(method_kwargs or {})
    if "data" in method_kwargs:  # data-driven methods show their own progress bar
        method_kwargs.setdefault("progress", progress)
    prune(model, method, sparsity=sparsity, scope=scope, **method_kwargs)
    acc_pruned = evaluate(model, data.test_loader())
    torch.manual_seed(seed)
    fit(model, data.train_loader(), epochs=retrain_epochs, lr=lr, l2=l2, progress=progress, desc="retrain")
    return model, _outcome(model, sparsity, acc_pruned, data)


def iterative(
    dense: nn.Module,
    data: Digits,
    sparsity: float,
    *,
    steps: int = 4,
    retrain_epochs: int = 20,
    lr: float = 0.02,
    l2: float = 1e-4,
    seed: int = 0,
    scope: str = "global",
    progress: bool = False,
    method: str = "magnitude",
    method_kwargs: dict[str, Any] | None = None,
) -> tuple[nn.Module, Outcome]:
    """Prune a copy of ``dense`` to ``sparsity`` in ``steps`` prune -> retrain rounds (cubic
    schedule, the same total ``retrain_epochs`` as :func:`one_shot`, split evenly): Han et al.'s
    iterative pruning, or WoodFisher's gradual pruning with ``method="woodfisher"``."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    model = copy.deepcopy(dense)
    method_kwargs = dict(method_kwargs or {})
    if "data" in method_kwargs:
        method_kwargs.setdefault("progress", progress)
    sched = schedules.cubic(0.0, sparsity, 0, steps - 1) if steps > 1 else schedules.constant(sparsity)
    pruner = Pruner(
        model, method, schedule=lambda t: sched(t + 1) if steps > 1 else sched(t), scope=scope, **method_kwargs
    )
    per_step = [retrain_epochs // steps + (1 if i < retrain_epochs % steps else 0) for i in range(steps)]
    torch.manual_seed(seed)
    acc_pruned = float("nan")
    for i in range(steps):
        pruner.step()
        if i == steps - 1:
            acc_pruned = evaluate(model, data.test_loader())
        fit(model, data.train_loader(), epochs=per_step[i], lr=lr, l2=l2, progress=progress, desc=f"step {i + 1}")
    return model, _outcome(model, sparsity, acc_pruned, data)
