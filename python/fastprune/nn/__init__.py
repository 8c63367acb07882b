"""Modules: attention whose heads can be pruned, sparse (CSR) Linear and Conv2d, and sparsify()."""

from fastprune.nn.attention import MultiheadSelfAttention, swap_attention
from fastprune.nn.microbatch import MicroBatch, RowTiles
from fastprune.nn.sparse import SparseBottleneck, SparseConv2d, SparseFFNOutput, SparseLinear
from fastprune.nn.sparsify import SwapDecision, sparsify, sparsify_decisions, sparsify_report

__all__ = [
    "MicroBatch",
    "MultiheadSelfAttention",
    "RowTiles",
    "SparseBottleneck",
    "SparseConv2d",
    "SparseFFNOutput",
    "SparseLinear",
    "SwapDecision",
    "sparsify",
    "sparsify_decisions",
    "sparsify_report",
    "swap_attention",
]
