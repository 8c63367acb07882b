"""fastprune: fast neural-network pruning for PyTorch.

Native kernels (C++, CUDA) registered as ``torch.ops.fastprune.*``, typed wrappers in
:mod:`fastprune.ops`, their plain-PyTorch twins in :mod:`fastprune.reference`. Pruning flows one
way: model + data -> scores (:mod:`fastprune.importance`) -> selection (:mod:`fastprune.select`)
-> plan (:class:`fastprune.Plan`) -> :func:`fastprune.apply` (masks or compaction) -> sparse or
compact model (:func:`fastprune.sparsify`) -> benchmark. Each method is one module of
:mod:`fastprune.methods`, reached through :func:`fastprune.prune`; :mod:`fastprune.pruner` drives
pruning during training.
"""

from fastprune import (
    data,
    distributed,
    importance,
    methods,
    models,
    nn,
    ops,
    reference,
    schedules,
    select,
    structure,
    train,
)
from fastprune.api import prune
from fastprune.apply import apply
from fastprune.checkpoint import load_pruned
from fastprune.dropout import rescale_dropout
from fastprune.fisher import FisherInverse
from fastprune.masks import finalize
from fastprune.methods import (
    BNScaleConfig,
    ChannelConfig,
    FisherDiagConfig,
    L1FilterConfig,
    L2FilterConfig,
    MagnitudeConfig,
    MethodResult,
    NISPConfig,
    RandomChannelConfig,
    WoodFisherConfig,
    method_names,
    register_method,
)
from fastprune.methods.woodfisher import fisher_statistics
from fastprune.nn.sparsify import sparsify, sparsify_decisions, sparsify_report
from fastprune.plan import Plan
from fastprune.pruner import BasePruner, EntwinedPruner, Pruner, SoftFilterPruner
from fastprune.report import SparsityReport, sparsity_report
from fastprune.sensitivity import sensitivity
from fastprune.structure import compact, count, find_groups

__version__ = "0.1.0"

__all__ = [
    "BNScaleConfig",
    "BasePruner",
    "ChannelConfig",
    "FisherDiagConfig",
    "FisherInverse",
    "L1FilterConfig",
    "L2FilterConfig",
    "MagnitudeConfig",
    "MethodResult",
    "NISPConfig",
    "Plan",
    "Pruner",
    "RandomChannelConfig",
    "EntwinedPruner",
    "SoftFilterPruner",
    "SparsityReport",
    "WoodFisherConfig",
    "__version__",
    "apply",
    "compact",
    "count",
    "data",
    "distributed",
    "finalize",
    "find_groups",
    "fisher_statistics",
    "importance",
    "load_pruned",
    "method_names",
    "methods",
    "models",
    "nn",
    "ops",
    "prune",
    "reference",
    "register_method",
    "rescale_dropout",
    "schedules",
    "select",
    "sensitivity",
    "sparsify",
    "sparsify_decisions",
    "sparsify_report",
    "sparsity_report",
    "structure",
    "train",
]
