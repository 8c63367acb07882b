"""Plain-PyTorch twins of the sparse ops (the test oracle): dense arithmetic on the unpacked weight."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["pack_sparse", "sparse_bottleneck", "sparse_conv2d", "sparse_ffn", "sparse_linear", "unpack_sparse"]


def pack_sparse(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CSR of ``weight``: the nonzeros in row-major order, rows delimited by a prefix sum."""
    w = weight.detach()
    nz = w != 0
    row_ptr = torch.cat([w.new_zeros(1, dtype=torch.long), nz.sum(1).cumsum(0)]).to(torch.int32)
    col_dtype = torch.int16 if w.shape[1] <= 65536 else torch.int32
    return row_ptr, nz.nonzero()[:, 1].to(col_dtype), w[nz]


def unpack_sparse(row_ptr: torch.Tensor, col_idx: torch.Tensor, values: torch.Tensor, in_features: int) -> torch.Tensor:
    """The dense (out, in_features) weight back from its packed form."""
    out = row_ptr.numel() - 1
    cols = col_idx.long() & 0xFFFF if col_idx.dtype == torch.int16 else col_idx.long()
    # checked on real tensors only: fake / meta tensors (torch.compile, opcheck) hold no values
    readable = type(col_idx) is torch.Tensor and col_idx.device.type != "meta" and not torch.compiler.is_compiling()
    if readable and cols.numel() and int(cols.max()) >= in_features:
        raise ValueError(
            f"col_idx holds column {int(cols.max())}, but in_features = {in_features}: "
            "the packed weight has more columns"
        )
    rows = torch.repeat_interleave(torch.arange(out, device=values.device), (row_ptr[1:] - row_ptr[:-1]).long())
    dense = values.new_zeros(out, in_features)
    dense[rows, cols] = values
    return dense


def sparse_linear(
    input: torch.Tensor,
    row_ptr: torch.Tensor,
    col_idx: torch.Tensor,
    values: torch.Tensor,
    in_features: int,
    bias: torch.Tensor | None = None,
    relu: bool = False,
) -> torch.Tensor:
    y = F.linear(input, unpack_sparse(row_ptr, col_idx, values, in_features), bias)
    return torch.relu(y) if relu else y


def sparse_ffn(
    input: torch.Tensor,
    up: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    up_bias: torch.Tensor | None,
    down: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    down_bias: torch.Tensor | None,
    in_features: int,
    activation: str = "gelu",
) -> torch.Tensor:
    h = F.linear(input, unpack_sparse(*up, in_features), up_bias)
    h = F.gelu(h) if activation == "gelu" else torch.relu(h) if activation == "relu" else h
    return F.linear(h, unpack_sparse(*down, up[0].numel() - 1), down_bias)


def sparse_conv2d(
    input: torch.Tensor,
    row_ptr: torch.Tensor,
    col_idx: torch.Tensor,
    values: torch.Tensor,
    weight_shape,
    bias: torch.Tensor | None = None,
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
    relu: bool = False,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    ws = [int(v) for v in weight_shape]
    w = unpack_sparse(row_ptr, col_idx, values, ws[1] * ws[2] * ws[3]).reshape(ws)
    y = F.conv2d(input, w, bias, stride, padding, dilation, groups)
    if residual is not None:
        y = y + residual
    return torch.relu(y) if relu else y


def sparse_bottleneck(
    input: torch.Tensor,
    conv1: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    bias1: torch.Tensor | None,
    conv2: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    bias2: torch.Tensor | None,
    weight_shape2,
    padding2,
    conv3: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    bias3: torch.Tensor | None,
) -> torch.Tensor:
    c = input.shape[1]
    c1 = conv1[0].numel() - 1
    h = sparse_conv2d(input, *conv1, [c1, c, 1, 1], bias1, relu=True)
    h = sparse_conv2d(h, *conv2, weight_shape2, bias2, 1, padding2, relu=True)
    return sparse_conv2d(h, *conv3, [c, int(weight_shape2[0]), 1, 1], bias3, relu=True, residual=input)
