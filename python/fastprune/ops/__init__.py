"""Typed wrappers over the native ops ``torch.ops.fastprune.*``.

Each wrapper validates its arguments in Python (clear ``ValueError``/``TypeError`` naming the
argument), then calls the dispatcher op. The fake (meta) kernels live in :mod:`fastprune.ops._fakes`.
"""

from fastprune._loader import load_library

load_library()

from fastprune.ops import _fakes  # noqa: E402,F401  (registers fake kernels)
from fastprune.ops.attention import scaled_dot_product_attention  # noqa: E402
from fastprune.ops.cpu import best_isa, cpu_isas, jit_available, kernel_counts, reset_kernel_counts  # noqa: E402
from fastprune.ops.nisp import nisp_propagate  # noqa: E402
from fastprune.ops.pool import max_pool2d  # noqa: E402
from fastprune.ops.sparse import (  # noqa: E402
    pack_sparse,
    sparse_bottleneck,
    sparse_conv2d,
    sparse_ffn,
    sparse_linear,
    unpack_sparse,
)
from fastprune.ops.woodbury import woodbury_inverse_fisher, woodbury_update_  # noqa: E402

__all__ = [
    "best_isa",
    "cpu_isas",
    "jit_available",
    "kernel_counts",
    "max_pool2d",
    "nisp_propagate",
    "pack_sparse",
    "reset_kernel_counts",
    "scaled_dot_product_attention",
    "sparse_bottleneck",
    "sparse_conv2d",
    "sparse_ffn",
    "sparse_linear",
    "unpack_sparse",
    "woodbury_inverse_fisher",
    "woodbury_update_",
]
