"""Recipes shared by the demo, the CLI and the benchmarks.

* Han et al.'s train -> prune -> retrain (Han, Pool, Tran, Dally 2015, arXiv:1506.02626): train dense
  with L2, prune by magnitude, retrain the survivors with the masks fixed; iterating prune ->
  retrain reaches higher sparsity than one shot at the same accuracy (:func:`one_shot`,
  :func:`iterative`).
* SInGE's entwined pruning and fine-tuning (Yvinec et al. 2022): score, remove a few channels,
  fine-tune briefly, repeat until a size target (:func:`entwined`).
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from fastprune import schedules
from fastprune.api import prune
from fastprune.data.digits import Digits
from fastprune.methods.registry import spec_for
from fastprune.plan import Plan
from fastprune.pruner import EntwinedPruner, Pruner
from fastprune.report import sparsity_report
from fastprune.train import evaluate, fit

__all__ = ["Outcome", "entwined", "iterative", "one_shot", "train_dense"]


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


def entwined(
    model: nn.Module,
    method: str = "singe",
    *,
    example_inputs: Any,
    data: Iterable[Any] | None = None,
    target_params: float | None = None,
    target_macs: float | None = None,
    step: float | int = 0.05,
    finetune: Callable[[nn.Module], Any] | None = None,
    evaluate: Callable[[nn.Module], float] | None = None,
    progress: bool = False,
    **kwargs: Any,
) -> Plan:
    """Entwined pruning and fine-tuning (SInGE's flow): repeat score -> remove ``step`` of the
    channels -> ``finetune(model)`` until the compact model has at most ``target_params`` (or
    ``target_macs``) of the starting model's parameters (MACs), compacting at every removal so the
    model shrinks as it goes. ``method`` is any channel method (``"singe"``, ``"taylor"``,
    ``"grad_weight"``, ``"l1_filter"``, ``"random"``...): the baselines run through the same loop.
    ``data`` is the calibration data of methods that read it (ignored by the others); other
    keywords go to the method's config. ``evaluate(model)`` (optional) is recorded after every
    fine-tune. Returns the run's Plan; ``plan.config["history"]`` holds, per step, the channels
    removed, MACs, parameters (and accuracy). See :class:`fastprune.EntwinedPruner`."""
    if finetune is not None and not callable(finetune):
        raise TypeError(f"finetune must be a callable model -> None, got {type(finetune).__name__}")
    if evaluate is not None and not callable(evaluate):
        raise TypeError(f"evaluate must be a callable model -> float, got {type(evaluate).__name__}")
    if data is not None and "data" in {f.name for f in dataclasses.fields(spec_for(method).config_cls)}:
        kwargs["data"] = data
    pruner = EntwinedPruner(
        model,
        method,
        example_inputs=example_inputs,
        target_params=target_params,
        target_macs=target_macs,
        step=step,
        mode="compact",
        **kwargs,
    )
    if evaluate is not None:
        pruner.history[0]["accuracy"] = float(evaluate(model))
    kind = pruner.kind
    bar = tqdm(desc=f"entwined {method}", unit="step", disable=not progress, leave=False)
    while not pruner.done:
        pruner.step()
        if finetune is not None:
            finetune(model)
        if evaluate is not None:
            pruner.history[-1]["accuracy"] = float(evaluate(model))
        bar.update(1)
        bar.set_postfix({kind: f"{pruner.history[-1][kind] / pruner.start_size[kind]:.3f}"})
    bar.close()
    return pruner.finalize()
