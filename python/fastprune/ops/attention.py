"""Attention for sparse transformers: :func:`scaled_dot_product_attention`.

Once a BERT-base encoder's Linears are 90 % sparse, torch's own SDPA is a fifth of its time on the
CPU (its blocks go to MKL, which on AMD CPUs runs AVX2 code): this op computes the same function
with the package's AVX-512 / AVX2 loops (``benchmarks/bench_sparse_tokens.py`` measures both).
:func:`fastprune.nn.use_fastprune_attention` makes a HuggingFace model call it.
"""

from __future__ import annotations

import math

import torch

from fastprune.ops.sparse import _float_tensor, _run
from fastprune.reference import attention as _reference

__all__ = ["scaled_dot_product_attention"]


def scaled_dot_product_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """``softmax(scale * query @ key^T + attn_mask) @ value``: ``F.scaled_dot_product_attention``
    without dropout or ``is_causal`` (pass a causal mask instead).

    Shapes: query (..., L, E), key (..., S, E), value (..., S, Ev), the same leading dims ->
    (..., L, Ev), contiguous. attn_mask: bool (True takes part) or additive in the query's dtype,
    broadcastable to (..., L, S). scale defaults to 1 / sqrt(E). A row whose keys are all masked
    out gives 0 (as torch's). Any strides (HuggingFace's (B, H, L, D) views need no copy). float32
    runs the vectorised CPU loops (the ISA chosen at run time), float64 the portable ones.
    Differentiable with respect to query, key and value.

    Reference: Vaswani et al., "Attention Is All You Need", 2017.
    """
    for name, t in (("query", query), ("key", key), ("value", value)):
        _float_tensor(t, name)
    if attn_mask is not None and not isinstance(attn_mask, torch.Tensor):
        raise TypeError(f"attn_mask must be a tensor or None, got {type(attn_mask).__name__}")
    if scale is not None:
        if isinstance(scale, bool) or not isinstance(scale, (int, float)):
            raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
        if not math.isfinite(scale):
            raise ValueError(f"scale must be finite, got {scale!r}")
        scale = float(scale)
    return _run(torch.ops.fastprune.scaled_dot_product_attention.default, query, key, value, attn_mask, scale)


def _setup(ctx, inputs, output) -> None:  # noqa: ANN001
    q, k, v, mask, scale = inputs
    ctx.scale = scale
    ctx.save_for_backward(q, k, v, mask)


def _backward(ctx, grad):  # noqa: ANN001
    q, k, v, mask = ctx.saved_tensors
    with torch.enable_grad():
        qr, kr, vr = (t.detach().requires_grad_() for t in (q, k, v))
        out = _reference.scaled_dot_product_attention(qr, kr, vr, mask, ctx.scale)
        gq, gk, gv = torch.autograd.grad(out, (qr, kr, vr), grad)
    return gq, gk, gv, None, None


torch.library.register_autograd("fastprune::scaled_dot_product_attention", _backward, setup_context=_setup)
