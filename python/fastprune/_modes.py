"""``eval_mode(model)``: run in eval mode, then give every submodule its own training flag back.

``model.train(was_training)`` would set every submodule to the root's flag, silently switching a
frozen (eval) BatchNorm or an eval sub-model inside a training wrapper back to training.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

__all__ = ["eval_mode", "restore_modes", "training_flags"]


def training_flags(model: nn.Module) -> list[tuple[nn.Module, bool]]:
    return [(m, m.training) for m in model.modules()]


def restore_modes(flags: list[tuple[nn.Module, bool]]) -> None:
    for m, flag in flags:
        m.training = flag


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    flags = training_flags(model)
    model.eval()
    try:
        yield model
    finally:
        restore_modes(flags)
