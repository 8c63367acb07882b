"""fastprune: fast neural-network pruning for PyTorch.

Native kernels (C++, CUDA) registered as ``torch.ops.fastprune.*``, typed wrappers in
:mod:`fastprune.ops`, their plain-PyTorch twins in :mod:`fastprune.reference`; pruning methods
behind one call, :func:`fastprune.prune`, returning a :class:`fastprune.Plan`.
"""

from fastprune import data, models, nn, ops, reference, schedules, structure, train
from fastprune.api import Pruner, prune
from fastprune.config import (
    ChannelConfig,
    FisherDiagConfig,
    MagnitudeConfig,
    WoodFisherConfig,
    method_names,
    register_method,
)
from fastprune.dropout import rescale_dropout
from fastprune.fisher import FisherInverse
from fastprune.masks import finalize, load_pruned
from fastprune.plan import Plan
from fastprune.report import SparsityReport, sparsity_report
from fastprune.nn.sparsify import sparsify
from fastprune.sensitivity import sensitivity
from fastprune.structure import compact, count, find_groups

__version__ = "0.1.0"

__all__ = [
    "ChannelConfig",
    "compact",
    "count",
    "find_groups",
    "nn",
    "sparsify",
    "structure",
    "FisherDiagConfig",
    "FisherInverse",
    "MagnitudeConfig",
    "Plan",
    "Pruner",
    "SparsityReport",
    "WoodFisherConfig",
    "__version__",
    "data",
    "finalize",
    "load_pruned",
    "method_names",
    "models",
    "ops",
    "prune",
    "reference",
    "register_method",
    "rescale_dropout",
    "schedules",
    "sensitivity",
    "sparsity_report",
    "train",
]
