"""Fake (meta) kernels for every native op: shapes and dtypes only, for torch.compile/export."""

from __future__ import annotations

import torch


@torch.library.register_fake("fastprune::woodbury_inverse_fisher")
def _woodbury_inverse_fisher_fake(grads: torch.Tensor, block_size: int, damp: float) -> torch.Tensor:
    torch._check(grads.dim() == 2, lambda: "grads must be 2-D")
    torch._check(block_size >= 1, lambda: "block_size must be >= 1")
    d = grads.shape[1]
    nb = (d + block_size - 1) // block_size
    return grads.new_empty((nb, block_size, block_size))


@torch.library.register_fake("fastprune::woodbury_update_")
def _woodbury_update_fake(finv: torch.Tensor, grads: torch.Tensor, num_samples: float) -> None:
    torch._check(finv.dim() == 3 and grads.dim() == 2, lambda: "finv must be 3-D and grads 2-D")


@torch.library.register_fake("fastprune::pack_sparse")
def _pack_sparse_fake(weight: torch.Tensor):
    torch._check(weight.dim() == 2, lambda: "weight must be 2-D")
    nnz = torch.library.get_ctx().new_dynamic_size()
    col_dtype = torch.int16 if weight.shape[1] <= 65536 else torch.int32
    return (
        weight.new_empty((weight.shape[0] + 1,), dtype=torch.int32),
        weight.new_empty((nnz,), dtype=col_dtype),
        weight.new_empty((nnz,)),
    )


@torch.library.register_fake("fastprune::sparse_linear")
def _sparse_linear_fake(
    input: torch.Tensor,
    row_ptr: torch.Tensor,
    col_idx: torch.Tensor,
    values: torch.Tensor,
    in_features: int,
    bias: torch.Tensor | None = None,
    relu: bool = False,
) -> torch.Tensor:
    torch._check(input.shape[-1] == in_features, lambda: "input's last dimension must be in_features")
    torch._check(values.dtype == input.dtype, lambda: "values and input must share a dtype")
    return input.new_empty((*input.shape[:-1], row_ptr.shape[0] - 1))


@torch.library.register_fake("fastprune::sparse_ffn")
def _sparse_ffn_fake(
    input: torch.Tensor,
    row_ptr1: torch.Tensor,
    col_idx1: torch.Tensor,
    values1: torch.Tensor,
    bias1: torch.Tensor | None,
    row_ptr2: torch.Tensor,
    col_idx2: torch.Tensor,
    values2: torch.Tensor,
    bias2: torch.Tensor | None,
    in_features: int,
    activation: str,
) -> torch.Tensor:
    torch._check(input.shape[-1] == in_features, lambda: "input's last dimension must be in_features")
    torch._check(values1.dtype == input.dtype and values2.dtype == input.dtype, lambda: "dtypes must match")
    torch._check(activation in ("none", "relu", "gelu"), lambda: "activation must be none, relu or gelu")
    return input.new_empty((*input.shape[:-1], row_ptr2.shape[0] - 1))


@torch.library.register_fake("fastprune::sparse_conv2d")
def _sparse_conv2d_fake(
    input,
    row_ptr,
    col_idx,
    values,
    weight_shape,
    bias=None,
    stride=(1, 1),
    padding=(0, 0),  # noqa: ANN001
    dilation=(1, 1),
    groups=1,
    relu=False,
    residual=None,
):
    torch._check(input.dim() == 4, lambda: "input must be 4-D")
    o, _, kh, kw = weight_shape
    hout = (input.shape[2] + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    wout = (input.shape[3] + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    return input.new_empty((input.shape[0], o, hout, wout))


@torch.library.register_fake("fastprune::sparse_bottleneck")
def _sparse_bottleneck_fake(
    input,
    row_ptr1,
    col_idx1,
    values1,
    bias1,
    row_ptr2,
    col_idx2,
    values2,
    bias2,
    weight_shape2,
    padding2,  # noqa: ANN001
    row_ptr3,
    col_idx3,
    values3,
    bias3,
):
    torch._check(input.dim() == 4, lambda: "input must be 4-D")
    torch._check(row_ptr3.shape[0] - 1 == input.shape[1], lambda: "the last conv must give the input's channels")
    return torch.empty_like(input, memory_format=torch.contiguous_format)


@torch.library.register_fake("fastprune::max_pool2d")
def _max_pool2d_fake(input, kernel_size, stride, padding, relu=False):  # noqa: ANN001
    torch._check(input.dim() == 4, lambda: "input must be (N, C, H, W)")
    (kh, kw), (sh, sw), (ph, pw) = kernel_size, stride, padding
    hout = (input.shape[2] + 2 * ph - kh) // sh + 1
    wout = (input.shape[3] + 2 * pw - kw) // sw + 1
    return input.new_empty((input.shape[0], input.shape[1], hout, wout))


@torch.library.register_fake("fastprune::scaled_dot_product_attention")
def _attention_fake(query, key, value, attn_mask=None, scale=None):  # noqa: ANN001
    torch._check(query.dim() >= 2 and key.dim() == query.dim() and value.dim() == query.dim(), lambda: "same dims")
    return query.new_empty((*query.shape[:-1], value.shape[-1]))


@torch.library.register_fake("fastprune::nisp_propagate")
def _nisp_propagate_fake(weight: torch.Tensor, scores: torch.Tensor, groups: int = 1) -> torch.Tensor:
    torch._check(weight.dim() >= 2, lambda: "weight must be (out, in/groups, *kernel)")
    torch._check(scores.dim() in (1, 2), lambda: "scores must be (out,) or (m, out)")
    torch._check(groups >= 1 and weight.shape[0] % groups == 0, lambda: "groups must divide the outputs")
    torch._check(scores.shape[-1] == weight.shape[0], lambda: "scores must have one entry per output")
    inputs = weight.shape[1] * groups
    return scores.new_empty((inputs,) if scores.dim() == 1 else (scores.shape[0], inputs))
