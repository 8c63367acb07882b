"""Small, honest training helpers for demos and tests (SGD or Adam, L1/L2, tqdm progress)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from fastprune._modes import eval_mode

__all__ = ["Callback", "FitHistory", "evaluate", "fit", "recalibrate_bn"]


class Callback(Protocol):
    """What :func:`fit` calls on each of its ``callbacks`` (a :class:`fastprune.pruner.BasePruner`)."""

    def on_start(self) -> None: ...

    def on_step(self, step: int) -> None: ...

    def on_epoch_end(self, epoch: int) -> None: ...


@dataclass
class FitHistory:
    losses: list[float] = field(default_factory=list)  # mean training loss per epoch


def _weights(model: nn.Module) -> list[torch.Tensor]:
    """Weight tensors (dim >= 2) for the L1 term: the trainable ones, pruned or not."""
    out = []
    for p in model.parameters():
        if p.requires_grad and p.dim() >= 2:
            out.append(p)
    return out


def fit(
    model: nn.Module,
    loader: Iterable,
    epochs: int,
    lr: float,
    *,
    l1: float = 0.0,
    l2: float = 0.0,
    optimizer: str = "sgd",
    momentum: float = 0.9,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    progress: bool = True,
    desc: str = "fit",
    callbacks: Sequence[Callback] = (),
) -> FitHistory:
    """Train ``model`` in place. ``l2`` is weight decay on every parameter (decoupled for
    ``optimizer="adamw"``); ``l1`` adds ``l1 * sum |w|`` over weight matrices to the loss. Pruned
    weights (torch prune masks) stay exactly zero in the forward throughout. A non-finite loss
    stops training with a ``FloatingPointError``.

    ``callbacks`` (pruners, :mod:`fastprune.pruner`): ``on_start()`` before the optimizer is built
    (a pruner that changes shapes there is seen by it), ``on_step(step)`` after every optimizer
    step, ``on_epoch_end(epoch)`` after every epoch. ``finalize()`` is the caller's, after the
    last ``fit``. A callback that changes parameter shapes after the start (removing channels
    for real) must be finalized between ``fit`` calls: the optimizer holds the old tensors."""
    if epochs < 0 or not math.isfinite(lr) or lr <= 0:
        raise ValueError(f"epochs must be >= 0 and lr > 0, got epochs={epochs}, lr={lr}")
    for cb in callbacks:
        if not all(callable(getattr(cb, h, None)) for h in ("on_start", "on_step", "on_epoch_end")):
            raise TypeError(f"callback {cb!r} lacks on_start / on_step / on_epoch_end (see fastprune.pruner)")
    for cb in callbacks:
        cb.on_start()
    loss_fn = loss_fn or nn.functional.cross_entropy
    params = [p for p in model.parameters() if p.requires_grad]
    if optimizer == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=l2)
    elif optimizer == "adam":
        opt = torch.optim.Adam(params, lr=lr, weight_decay=l2)
    elif optimizer == "adamw":
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=l2)
    else:
        raise ValueError(f"optimizer must be 'sgd', 'adam' or 'adamw', got {optimizer!r}")
    history = FitHistory()
    model.train()
    bar = tqdm(range(epochs), desc=desc, disable=not progress, leave=False)
    step = 0
    for epoch in bar:
        total, count = 0.0, 0
        for x, y in loader:
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(x), y)
            if l1:
                loss = loss + l1 * sum(w.abs().sum() for w in _weights(model))
            if not torch.isfinite(loss):
                raise FloatingPointError(f"training loss became {loss.item()}; lower lr")
            loss.backward()
            opt.step()
            for cb in callbacks:
                cb.on_step(step)
            step += 1
            total += float(loss.detach()) * len(y)
            count += len(y)
        history.losses.append(total / max(count, 1))
        bar.set_postfix(loss=f"{history.losses[-1]:.4f}")
        for cb in callbacks:
            cb.on_epoch_end(epoch)
    model.eval()
    return history


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable) -> float:
    """Top-1 accuracy (a fraction) of ``model`` in eval mode; restores its training flag."""
    correct, count = 0, 0
    with eval_mode(model):
        for x, y in loader:
            correct += int((model(x).argmax(dim=1) == y).sum())
            count += len(y)
    return correct / count if count else float("nan")


@torch.no_grad()
def recalibrate_bn(model: nn.Module, loader: Iterable, *, num_batches: int | None = None) -> int:
    """Re-estimate every BatchNorm's running mean and variance on ``loader`` (inputs first in each
    batch; labels ignored): the statistics are reset and recomputed as the plain average over the
    batches (momentum None), the weights are not touched, modes and momenta are restored. For a
    network whose channels were just zeroed or removed, whose stored statistics describe the network
    before. Returns the number of batches used (0: the model has no BatchNorm with running stats)."""
    if num_batches is not None and (
        isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 1
    ):
        raise ValueError(f"num_batches must be a positive int or None, got {num_batches!r}")
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not bns:
        return 0
    flags = [(m, m.training) for m in model.modules()]
    saved = [(m, m.momentum, m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone()) for m in bns]
    used = 0
    try:
        model.eval()
        for m in bns:
            m.reset_running_stats()
            m.momentum = None  # cumulative average
            m.train()
        for batch in loader:
            if num_batches is not None and used >= num_batches:
                break
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            model(x)
            used += 1
        if not used:
            raise ValueError("recalibrate_bn: the loader gave no batches")
    except BaseException:
        for m, mom, mean, var, n in saved:  # leave the model as it was
            m.running_mean.copy_(mean)
            m.running_var.copy_(var)
            m.num_batches_tracked.copy_(n)
            m.momentum = mom
        raise
    finally:
        for m, mom, *_ in saved:
            m.momentum = mom
        for m, t in flags:
            m.training = t
    return used
