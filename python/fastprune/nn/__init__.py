"""Modules: attention whose heads can be pruned (sparse layers join here with sparse execution)."""

from fastprune.nn.attention import MultiheadSelfAttention, swap_attention

__all__ = ["MultiheadSelfAttention", "swap_attention"]
