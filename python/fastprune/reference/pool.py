"""Plain-PyTorch reference of :func:`fastprune.ops.max_pool2d`."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["max_pool2d"]


def max_pool2d(input: torch.Tensor, kernel_size, stride, padding, relu: bool = False) -> torch.Tensor:  # noqa: ANN001
    """``F.max_pool2d`` (then ``relu``), NCHW-contiguous whatever the input's memory format."""
    y = F.max_pool2d(input, kernel_size, stride, padding)
    return (torch.relu(y) if relu else y).contiguous()
