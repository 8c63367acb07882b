"""Plain-PyTorch twins of every native op, with the same signatures: the test oracle.

They favour clarity over speed and run in the dtype of their inputs (pass float64 for an
accurate oracle).
"""

from fastprune.reference.attention import scaled_dot_product_attention
from fastprune.reference.nisp import nisp_propagate
from fastprune.reference.pool import max_pool2d
from fastprune.reference.sparse import pack_sparse, sparse_bottleneck, sparse_conv2d, sparse_ffn, sparse_linear
from fastprune.reference.woodbury import woodbury_inverse_fisher, woodbury_update_

__all__ = [
    "max_pool2d",
    "nisp_propagate",
    "pack_sparse",
    "scaled_dot_product_attention",
    "sparse_bottleneck",
    "sparse_conv2d",
    "sparse_ffn",
    "sparse_linear",
    "woodbury_inverse_fisher",
    "woodbury_update_",
]
