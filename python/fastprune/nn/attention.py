"""Multi-head attention with separate q/k/v projections, so whole heads can be pruned.

``nn.MultiheadAttention`` keeps one packed ``in_proj_weight`` and ties every projection to
``embed_dim``: its heads cannot be removed without breaking the class. :class:`MultiheadSelfAttention`
computes the same function (``from_mha`` copies the weights; outputs match to float rounding) with
``q_proj``, ``k_proj``, ``v_proj`` and ``out_proj`` Linears and a per-head width ``head_dim``, so
structured pruning can drop heads (rows of q/k/v, columns of out_proj) and the FFN stays separate.
:func:`swap_attention` replaces every ``nn.MultiheadAttention`` of a model in place.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastprune.nn.sparse import SparseConv2d, SparseLinear
from fastprune.ops.attention import scaled_dot_product_attention
from fastprune.structure.handlers import HeadSpec, register_attention

__all__ = ["MultiheadSelfAttention", "swap_attention", "torch_fast_paths_off"]


class MultiheadSelfAttention(nn.Module):
    """Drop-in for ``nn.MultiheadAttention`` (same call, same ``(output, weights)`` result).

    Args:
        embed_dim: model width E (input and output). num_heads: H. head_dim: per-head width D
            (default E // H; after head pruning H * D < E).
        bias, dropout, batch_first: as in ``nn.MultiheadAttention``.

    Shapes: query (N, L, E) with batch_first (else (L, N, E)); key/value (N, S, E) -> (N, L, E).
    ``need_weights=True`` returns the attention weights averaged over heads (N, L, S).

    ``fastprune_attention`` (default False; ``sparsify`` sets it where it times faster): with
    ``need_weights=False``, no dropout and on the CPU, the attention itself runs
    :func:`fastprune.ops.scaled_dot_product_attention` instead of torch's SDPA (the same function).
    """

    fastprune_attention: bool = False

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        *,
        head_dim: int | None = None,
        bias: bool = True,
        dropout: float = 0.0,
        batch_first: bool = False,
    ) -> None:
        super().__init__()
        if num_heads < 1 or embed_dim < 1:
            raise ValueError("embed_dim and num_heads must be positive")
        if head_dim is None:
            if embed_dim % num_heads:
                raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
            head_dim = embed_dim // num_heads
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, head_dim
        self.dropout, self.batch_first = dropout, batch_first
        inner = num_heads * head_dim
        self.q_proj = nn.Linear(embed_dim, inner, bias=bias)
        self.k_proj = nn.Linear(embed_dim, inner, bias=bias)
        self.v_proj = nn.Linear(embed_dim, inner, bias=bias)
        self.out_proj = nn.Linear(inner, embed_dim, bias=bias)

    @property
    def in_proj_bias(self) -> None:
        """None. torch's TransformerEncoderLayer reads ``self_attn.in_proj_bias`` to decide on its
        fused fast path, which only ``nn.MultiheadAttention`` can run: None sends it down the path that
        calls this module (the biases are ``q_proj.bias`` etc.)."""
        return None

    @classmethod
    def from_mha(cls, mha: nn.MultiheadAttention) -> MultiheadSelfAttention:
        """The same function as ``mha`` (weights copied; kdim/vdim must equal embed_dim, no bias_k/v)."""
        if not mha._qkv_same_embed_dim or mha.bias_k is not None or mha.add_zero_attn:
            raise ValueError(
                "from_mha supports nn.MultiheadAttention with kdim == vdim == embed_dim, "
                "no bias_k/bias_v and add_zero_attn=False"
            )
        w = mha.in_proj_weight
        new = cls(
            mha.embed_dim,
            mha.num_heads,
            bias=mha.in_proj_bias is not None,
            dropout=mha.dropout,
            batch_first=mha.batch_first,
        ).to(device=w.device, dtype=w.dtype)
        e = mha.embed_dim
        with torch.no_grad():
            for i, lin in enumerate((new.q_proj, new.k_proj, new.v_proj)):
                lin.weight.copy_(w[i * e : (i + 1) * e])
                if mha.in_proj_bias is not None:
                    lin.bias.copy_(mha.in_proj_bias[i * e : (i + 1) * e])
            new.out_proj.weight.copy_(mha.out_proj.weight)
            if mha.out_proj.bias is not None:
                new.out_proj.bias.copy_(mha.out_proj.bias)
        new.train(mha.training)
        return new

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor | None = None,
        value: torch.Tensor | None = None,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        key = query if key is None else key
        value = key if value is None else value
        if not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        n, lq, _ = query.shape
        s = key.shape[1]
        h, d = self.num_heads, self.head_dim
        q = self.q_proj(query).reshape(n, lq, h, d).transpose(1, 2)
        k = self.k_proj(key).reshape(n, s, h, d).transpose(1, 2)
        v = self.v_proj(value).reshape(n, s, h, d).transpose(1, 2)
        mask = None
        if attn_mask is not None:
            mask = attn_mask if attn_mask.dtype != torch.bool else ~attn_mask
            if mask.dtype == torch.bool:
                mask = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill(~mask, float("-inf"))
            mask = mask.reshape(-1, h, lq, s) if mask.dim() == 3 else mask
        if key_padding_mask is not None:
            kpm = key_padding_mask
            kpm = (
                torch.zeros(kpm.shape, dtype=q.dtype, device=q.device).masked_fill(kpm, float("-inf"))
                if kpm.dtype == torch.bool
                else kpm
            )
            kpm = kpm[:, None, None, :]
            mask = kpm if mask is None else mask + kpm
        p = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            scores = (q @ k.transpose(-2, -1)) / d**0.5
            if mask is not None:
                scores = scores + mask
            if is_causal and attn_mask is None:
                causal = torch.ones(lq, s, dtype=torch.bool, device=q.device).tril()
                scores = scores.masked_fill(~causal, float("-inf"))
            attn = scores.softmax(-1)
            weights = attn.mean(1) if average_attn_weights else attn
            ctx = F.dropout(attn, p, self.training) @ v
        elif (
            self.fastprune_attention
            and p == 0.0
            and not (is_causal and mask is None)
            and q.device.type == "cpu"
            and q.dtype in (torch.float32, torch.float64)
            and (mask is None or mask.dtype == q.dtype)
        ):
            ctx = scaled_dot_product_attention(q, k, v, mask)
        else:
            ctx = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=p, is_causal=is_causal and mask is None
            )
        out = self.out_proj(ctx.transpose(1, 2).reshape(n, lq, h * d))
        if not self.batch_first:
            out = out.transpose(0, 1)
        return out, weights


def swap_attention(model: nn.Module) -> nn.Module:
    """Replace every ``nn.MultiheadAttention`` in ``model`` (in place) by the equivalent
    :class:`MultiheadSelfAttention`; returns ``model``. (A model that is itself an
    ``nn.MultiheadAttention`` is returned converted.) torch's ``TransformerEncoderLayer`` /
    ``TransformerEncoder`` fast paths, which need an ``nn.MultiheadAttention``, are turned off
    where they held one (:func:`torch_fast_paths_off`)."""
    if isinstance(model, nn.MultiheadAttention):
        return MultiheadSelfAttention.from_mha(model)
    _swap(model)
    torch_fast_paths_off(model)
    return model


def _swap(model: nn.Module) -> None:
    for name, child in list(model.named_children()):
        if isinstance(child, nn.MultiheadAttention):
            setattr(model, name, MultiheadSelfAttention.from_mha(child))
        else:
            _swap(child)


def torch_fast_paths_off(model: nn.Module) -> None:
    """torch's ``TransformerEncoderLayer`` (and ``TransformerEncoder``'s nested-tensor path) take a
    fused fast path in eval mode that reads every projection's weight tensor and needs an
    ``nn.MultiheadAttention``: turn it off (in place) in each layer that holds another attention
    module or a fastprune sparse layer, so that the layer calls its submodules (the same
    computation; the layer's ``activation_relu_or_gelu`` flag only selects that path), and in the
    encoders holding such layers."""
    changed = []
    for mod in model.modules():
        if isinstance(mod, nn.TransformerEncoderLayer) and (
            not isinstance(mod.self_attn, nn.MultiheadAttention)
            or any(isinstance(c, (SparseLinear, SparseConv2d)) for c in mod.modules())
        ):
            mod.activation_relu_or_gelu = 0
            changed.append(mod)
    for mod in model.modules():
        if isinstance(mod, nn.TransformerEncoder) and any(layer in changed for layer in mod.layers):
            mod.use_nested_tensor = False


# its heads are prunable: the structure engine learns the projections' names
register_attention(MultiheadSelfAttention, HeadSpec("q_proj", "k_proj", "v_proj", "out_proj", "num_heads", "head_dim"))
