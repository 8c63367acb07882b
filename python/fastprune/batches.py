"""How a batch from a user's loader becomes a call of the model.

A batch is a tensor (``model(batch)``), a tuple or list whose first element is the input
(``(inputs, targets)``: ``model(inputs)``), or a mapping of keyword arguments (HuggingFace style:
``model(**batch)``). Every data-reading part of fastprune calls the model through
:func:`forward_batch`, so that they all accept the same batches.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

__all__ = ["forward_batch", "model_inputs"]


def model_inputs(batch: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """``(args, kwargs)`` of the model call for one batch; a TypeError names the formats accepted."""
    if isinstance(batch, torch.Tensor):
        return (batch,), {}
    if isinstance(batch, Mapping):
        return (), dict(batch)
    if isinstance(batch, (tuple, list)) and batch:
        return (batch[0],), {}
    raise TypeError(
        f"a batch must be a tensor, an (inputs, targets) tuple or list, or a dict of model keyword arguments; "
        f"got {type(batch).__name__}"
    )


def forward_batch(model: nn.Module, batch: Any) -> Any:
    """``model`` called on one batch (see :func:`model_inputs`)."""
    args, kwargs = model_inputs(batch)
    return model(*args, **kwargs)
