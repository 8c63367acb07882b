"""CSR sparse execution: ``pack_sparse`` and ``sparse_linear``.

The packed form of a weight (out, in) is three tensors (the schema is fixed):

* ``row_ptr`` int32 (out + 1): row o's nonzeros are ``[row_ptr[o], row_ptr[o + 1])``;
* ``col_idx`` int16 when in <= 65536 (the kernels read it as uint16), else int32: their columns;
* ``values`` the nonzeros, in the weight's dtype.

Batch-1 sparse products are memory-bound: 16-bit columns make a nonzero cost 6 bytes instead of 8,
which is what lets a 90 %-sparse layer run more than 5x faster than its dense twin.
"""

from __future__ import annotations

import torch

__all__ = ["pack_sparse", "sparse_linear", "unpack_sparse"]


def _float_tensor(t: object, name: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{name} must be float32 or float64, got {t.dtype}")
    return t


def pack_sparse(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CSR form of ``weight`` (out, in) without its zeros: ``(row_ptr, col_idx, values)``.

    Raises ValueError for a weight that is not 2-D or holds NaN/Inf (a conv filter is flattened
    to (out, in/groups * kh * kw) first).
    """
    w = _float_tensor(weight, "weight")
    if w.dim() != 2:
        raise ValueError(f"weight must be 2-D (out, in), got shape {tuple(w.shape)}")
    if w.numel() and not bool(torch.isfinite(w).all()):
        raise ValueError("weight holds NaN or Inf: it cannot be packed")
    return torch.ops.fastprune.pack_sparse(w.detach())


def unpack_sparse(row_ptr: torch.Tensor, col_idx: torch.Tensor, values: torch.Tensor, in_features: int) -> torch.Tensor:
    """The dense (out, in_features) weight back from its packed form."""
    out = row_ptr.numel() - 1
    rows = torch.repeat_interleave(torch.arange(out, device=values.device), (row_ptr[1:] - row_ptr[:-1]).long())
    cols = col_idx.long() & 0xFFFF if col_idx.dtype == torch.int16 else col_idx.long()
    dense = values.new_zeros(out, in_features)
    dense[rows, cols] = values
    return dense


def sparse_linear(input: torch.Tensor, row_ptr: torch.Tensor, col_idx: torch.Tensor, values: torch.Tensor,
                  in_features: int, bias: torch.Tensor | None = None, relu: bool = False) -> torch.Tensor:
    """``act(input @ W^T + bias)`` with W in :func:`pack_sparse`'s form.

    Shapes: input (..., in_features) -> (..., out) with out = ``row_ptr.numel() - 1``; float32 runs
    the vectorised CPU kernels (AVX-512 / AVX2 / portable, chosen at run time), float64 the
    portable loop. Differentiable with respect to ``input`` (and ``bias``); gradients with
    respect to the packed weight are not supported (train the dense layer, then pack).
    """
    _float_tensor(input, "input")
    if isinstance(in_features, bool) or not isinstance(in_features, int) or in_features < 1:
        raise ValueError(f"in_features must be a positive int, got {in_features!r}")
    if input.dim() < 1 or input.shape[-1] != in_features:
        raise ValueError(f"input's last dimension must be {in_features} (the packed weight's in_features), "
                         f"got shape {tuple(input.shape)}")
    _check_columns(col_idx, in_features)
    return torch.ops.fastprune.sparse_linear(input, row_ptr, col_idx, values, in_features, bias, relu)


def _check_columns(col_idx: torch.Tensor, in_features: int) -> None:
    """A packed weight made for a wider input is a clear error. (The native op is memory-safe either
    way: 16-bit columns read a zero-padded copy of the input, 32-bit ones are range-checked.)"""
    if col_idx.dtype != torch.int16 or col_idx.numel() == 0 or col_idx.device.type == "meta":
        return
    # (version counter, largest column), kept on the tensor: checked once per packed weight, not per call
    hit = getattr(col_idx, "_fastprune_max_col", None)
    if hit is None or hit[0] != col_idx._version:
        hit = (col_idx._version, int((col_idx.to(torch.int32) & 0xFFFF).max()))
        col_idx._fastprune_max_col = hit
    if hit[1] >= in_features:
        raise ValueError(f"col_idx holds column {hit[1]} but in_features is {in_features}: the packed weight was made "
                         "for a different shape")


def _sparse_linear_setup(ctx, inputs, output) -> None:  # noqa: ANN001
    input, row_ptr, col_idx, values, in_features, bias, relu = inputs
    ctx.in_features, ctx.relu, ctx.has_bias = in_features, relu, bias is not None
    ctx.save_for_backward(row_ptr, col_idx, values, output if relu else None)


def _sparse_linear_backward(ctx, grad):  # noqa: ANN001
    row_ptr, col_idx, values, output = ctx.saved_tensors
    if ctx.needs_input_grad[3]:
        raise RuntimeError("sparse_linear: gradients with respect to the packed weight (values) are not supported; "
                           "train the dense layer (masked) and pack it again")
    if ctx.relu:
        grad = grad * (output > 0).to(grad.dtype)
    w = unpack_sparse(row_ptr, col_idx, values, ctx.in_features)
    grad_input = grad @ w if ctx.needs_input_grad[0] else None
    grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.has_bias and ctx.needs_input_grad[5] else None
    return grad_input, None, None, None, None, grad_bias, None


torch.library.register_autograd("fastprune::sparse_linear", _sparse_linear_backward, setup_context=_sparse_linear_setup)
