"""``count(model, example_inputs) -> (macs, params)`` on ``torch.utils.flop_counter``."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from fastprune._modes import eval_mode
from fastprune.structure.groups import as_inputs

__all__ = ["count"]


def count(model: nn.Module, example_inputs: Any) -> tuple[int, int]:
    """Multiply-accumulates of one forward on ``example_inputs`` (torch's flop counter: matmuls,
    convolutions and attention; flops / 2) and the number of parameters (tied ones once).
    Runs in eval mode; the training flag is restored."""
    inputs = as_inputs(example_inputs)
    with eval_mode(model), torch.no_grad(), FlopCounterMode(display=False) as fc:
        model(*inputs)
    return int(fc.get_total_flops()) // 2, sum(p.numel() for p in model.parameters())
