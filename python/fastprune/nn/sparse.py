"""Sparse layers: a Linear or Conv2d whose weight is stored in CSR form and run by fastprune's kernels.

``SparseLinear.from_dense(linear)`` / ``SparseConv2d.from_dense(conv)`` pack the layer's weight as
the forward sees it (so a layer pruned with ``torch.nn.utils.prune`` masks packs its masked weight).
The packed tensors are buffers: they follow ``.to()``, ``state_dict`` round-trips (a checkpoint with
another number of nonzeros loads too) and ``torch.compile`` traces the ops through their fake
kernels. The layers are differentiable with respect to their input, so they can sit inside a
larger trained graph; their weight is not trainable (train the dense layer, then pack).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from fastprune import ops
from fastprune.masks import effective_weight

__all__ = ["SparseBottleneck", "SparseConv2d", "SparseFFNOutput", "SparseLinear"]


def _dense_weight(module: nn.Module) -> torch.Tensor:
    return effective_weight(module, "weight")


class _Packed(nn.Module):
    """Holds row_ptr / col_idx / values buffers; loads checkpoints whatever their nonzero count."""

    def _set_packed(self, packed: tuple[torch.Tensor, torch.Tensor, torch.Tensor], bias: torch.Tensor | None) -> None:
        row_ptr, col_idx, values = packed
        self.register_buffer("row_ptr", row_ptr)
        self.register_buffer("col_idx", col_idx)
        self.register_buffer("values", values)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any, **kwargs: Any) -> None:
        for name in ("row_ptr", "col_idx", "values", "bias"):
            t = state_dict.get(prefix + name)
            cur = getattr(self, name)
            if t is not None and (cur is None or cur.shape != t.shape or cur.dtype != t.dtype):
                device = cur.device if cur is not None else self.row_ptr.device
                self._buffers[name] = torch.empty(t.shape, dtype=t.dtype, device=device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @property
    def nnz(self) -> int:
        return int(self.values.numel())

    def sparsity(self) -> float:
        total = self.numel_dense()
        return 1.0 - self.nnz / total if total else 0.0

    def numel_dense(self) -> int:
        raise NotImplementedError


class SparseLinear(_Packed):
    """``y = act(x W^T + b)`` with W in CSR form. Shapes: (..., in_features) -> (..., out_features)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        packed: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
        bias: torch.Tensor | None = None,
        relu: bool = False,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features, self.relu = in_features, out_features, relu
        if packed[0].numel() != out_features + 1:
            raise ValueError(f"packed weight has {packed[0].numel() - 1} rows, out_features is {out_features}")
        self._set_packed(packed, bias)

    @classmethod
    def from_dense(cls, linear: nn.Linear, relu: bool = False) -> SparseLinear:
        """Pack ``linear`` (masked or not). Raises ValueError if its weight holds NaN/Inf."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_dense expects an nn.Linear, got {type(linear).__name__}")
        w = _dense_weight(linear)
        return cls(linear.in_features, linear.out_features, ops.pack_sparse(w), linear.bias, relu)

    def numel_dense(self) -> int:
        return self.in_features * self.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self._buffers  # (one dict instead of four nn.Module.__getattr__ calls: ~5 us a call)
        return ops.sparse_linear(x, b["row_ptr"], b["col_idx"], b["values"], self.in_features, b["bias"], self.relu)

    def to_dense(self) -> nn.Linear:
        lin = nn.Linear(
            self.in_features,
            self.out_features,
            bias=self.bias is not None,
            device=self.values.device,
            dtype=self.values.dtype,
        )
        with torch.no_grad():
            lin.weight.copy_(ops.unpack_sparse(self.row_ptr, self.col_idx, self.values, self.in_features))
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        return lin

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, nnz={self.nnz}, "
            f"sparsity={self.sparsity():.3f}, bias={self.bias is not None}, relu={self.relu}"
        )


class SparseFFNOutput(SparseLinear):
    """The second layer of a feed-forward block computed together with the first:
    ``self(x) = down(act(up(x)))`` in one :func:`fastprune.ops.sparse_ffn` call (the hidden
    activations stay in cache, in the layout the second layer reads).

    ``up`` stays where it was (a :class:`SparseLinear` elsewhere in the model, whose own caller is
    made a pass-through: see :func:`fastprune.nn.fuse.fuse_ffn`); this module refers to it without
    owning it, so the state dict keeps every name and holds each tensor once. ``activation``:
    ``"gelu"`` (exact erf), ``"relu"`` or ``"none"``."""

    def __init__(self, up: SparseLinear, down: SparseLinear, activation: str) -> None:
        if down.in_features != up.out_features:
            raise ValueError(f"down takes {down.in_features} inputs, up gives {up.out_features}")
        if up.relu or down.relu:
            raise ValueError("up and down must not fuse a ReLU themselves (give activation='relu')")
        if activation not in ("gelu", "relu", "none"):
            raise ValueError(f"activation must be 'gelu', 'relu' or 'none', got {activation!r}")
        super().__init__(down.in_features, down.out_features, (down.row_ptr, down.col_idx, down.values), down.bias)
        self.activation = activation
        object.__setattr__(self, "_up", up)  # not a submodule: it is registered where it was

    @property
    def up(self) -> SparseLinear:
        return self._up

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        up, ub, b = self._up, self._up._buffers, self._buffers
        return ops.sparse_ffn(
            x,
            (ub["row_ptr"], ub["col_idx"], ub["values"]),
            ub["bias"],
            (b["row_ptr"], b["col_idx"], b["values"]),
            b["bias"],
            up.in_features,
            self.activation,
        )

    def extra_repr(self) -> str:
        return (
            super().extra_repr()
            + f", after the up layer {self._up.in_features} -> {self._up.out_features}, "
            + (f"activation={self.activation}")
        )


class SparseConv2d(_Packed):
    """``y = act(conv2d(x, W) + b [+ residual])`` with W in CSR form (zero padding only)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: tuple[int, int],
        packed: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
        bias: torch.Tensor | None = None,
        stride: tuple[int, int] = (1, 1),
        padding: tuple[int, int] = (0, 0),
        dilation: tuple[int, int] = (1, 1),
        groups: int = 1,
        relu: bool = False,
    ) -> None:
        super().__init__()
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size, self.stride, self.padding, self.dilation = (
            tuple(kernel_size),
            tuple(stride),
            tuple(padding),
            tuple(dilation),
        )
        self.relu = relu
        self._set_packed(packed, bias)

    @property
    def weight_shape(self) -> list[int]:
        return [self.out_channels, self.in_channels // self.groups, *self.kernel_size]

    @classmethod
    def from_dense(cls, conv: nn.Conv2d, relu: bool = False) -> SparseConv2d:
        """Pack ``conv`` (masked or not). Only zero padding with integer padding is supported."""
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"from_dense expects an nn.Conv2d, got {type(conv).__name__}")
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError(
                f"SparseConv2d supports zero padding given as integers, got padding={conv.padding!r}, "
                f"padding_mode={conv.padding_mode!r}"
            )
        w = _dense_weight(conv)
        return cls(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            ops.pack_sparse(w.flatten(1)),
            conv.bias,
            conv.stride,
            conv.padding,
            conv.dilation,
            conv.groups,
            relu,
        )

    def numel_dense(self) -> int:
        k = self.kernel_size[0] * self.kernel_size[1]
        return self.out_channels * (self.in_channels // self.groups) * k

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        b = self._buffers  # (one dict instead of four nn.Module.__getattr__ calls: ~5 us a call)
        return ops.sparse_conv2d(
            x,
            b["row_ptr"],
            b["col_idx"],
            b["values"],
            [self.out_channels, self.in_channels // self.groups, *self.kernel_size],
            b["bias"],
            self.stride,
            self.padding,
            self.dilation,
            self.groups,
            self.relu,
            residual,
        )

    def to_dense(self) -> nn.Conv2d:
        conv = nn.Conv2d(
            self.in_channels,
            self.out_channels,
            self.kernel_size,
            self.stride,
            self.padding,
            self.dilation,
            self.groups,
            bias=self.bias is not None,
            device=self.values.device,
            dtype=self.values.dtype,
        )
        ws = self.weight_shape
        with torch.no_grad():
            conv.weight.copy_(
                ops.unpack_sparse(self.row_ptr, self.col_idx, self.values, ws[1] * ws[2] * ws[3]).reshape(ws)
            )
            if self.bias is not None:
                conv.bias.copy_(self.bias)
        return conv

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}, nnz={self.nnz}, "
            f"sparsity={self.sparsity():.3f}, relu={self.relu}"
        )


class SparseBottleneck(nn.Module):
    """``conv3(conv2(conv1(x)), residual=x)`` of three :class:`SparseConv2d` with their ReLUs (a ResNet
    bottleneck without downsampling) in one :func:`fastprune.ops.sparse_bottleneck` call: the same
    values, computed depth-first in bands of rows on the CPU (see there).

    conv1 and conv3 must be 1x1 with stride 1 and no padding, conv2 stride 1 with the padding that
    keeps the size, all with ``groups=1``, ``dilation=1`` and ``relu=True``. The convs stay where they
    were (registered elsewhere in the model, so the state dict keeps every name); this module refers
    to them without owning them (:func:`fastprune.nn.fuse.fuse_bottlenecks` puts it in the graph)."""

    _fastprune_leaf = True

    def __init__(self, conv1: SparseConv2d, conv2: SparseConv2d, conv3: SparseConv2d) -> None:
        super().__init__()
        why = bottleneck_mismatch(conv1, conv2, conv3)
        if why:
            raise ValueError(f"not a bottleneck SparseBottleneck can run: {why}")
        object.__setattr__(self, "_convs", (conv1, conv2, conv3))

    @property
    def convs(self) -> tuple[SparseConv2d, SparseConv2d, SparseConv2d]:
        return self._convs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c1, c2, c3 = self._convs
        b1, b2, b3 = c1._buffers, c2._buffers, c3._buffers
        return ops.sparse_bottleneck(
            x,
            (b1["row_ptr"], b1["col_idx"], b1["values"]),
            b1["bias"],
            (b2["row_ptr"], b2["col_idx"], b2["values"]),
            b2["bias"],
            [c2.out_channels, c2.in_channels, *c2.kernel_size],
            c2.padding,
            (b3["row_ptr"], b3["col_idx"], b3["values"]),
            b3["bias"],
        )

    def extra_repr(self) -> str:
        c1, c2, c3 = self._convs
        return (
            f"{c1.in_channels} -> {c1.out_channels} -> {c2.out_channels} -> {c3.out_channels}, kernel={c2.kernel_size}"
        )


def bottleneck_mismatch(conv1: nn.Module, conv2: nn.Module, conv3: nn.Module) -> str:
    """Why these three layers cannot run as a :class:`SparseBottleneck` ("" when they can)."""
    convs = (conv1, conv2, conv3)
    if not all(isinstance(c, SparseConv2d) for c in convs):
        return "every layer must be a SparseConv2d"
    if not all(c.relu for c in convs):
        return "every conv must fuse its ReLU"
    if any(c.groups != 1 or c.dilation != (1, 1) or c.stride != (1, 1) for c in convs):
        return "groups, dilation and stride must be 1"
    for c in (conv1, conv3):
        if c.kernel_size != (1, 1) or c.padding != (0, 0):
            return "the first and last convs must be 1x1 without padding"
    if any(2 * p != k - 1 for p, k in zip(conv2.padding, conv2.kernel_size, strict=True)):
        return "the middle conv must keep the size (padding (k - 1) / 2)"
    if conv2.in_channels != conv1.out_channels or conv3.in_channels != conv2.out_channels:
        return "the convs' channels do not chain"
    if conv3.out_channels != conv1.in_channels:
        return "the last conv must give the block's input channels (the residual)"
    if len({c.values.dtype for c in convs}) != 1:
        return "the convs' dtypes differ"
    return ""
