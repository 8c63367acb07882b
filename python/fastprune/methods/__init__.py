"""Every pruning method, one module each; importing this package registers them all.

Each module holds its frozen config class(es) and its runner, registered by config type with
:func:`register_method` where they are defined:

* :mod:`~fastprune.methods.magnitude`: ``magnitude`` (Han et al. 2015);
* :mod:`~fastprune.methods.woodfisher`: ``woodfisher`` (Singh & Alistarh 2020) and ``fisher_diag``;
* :mod:`~fastprune.methods.channels`: ``l1_filter``, ``l2_filter``, ``bn_scale``, ``random`` (structured);
* :mod:`~fastprune.methods.nisp`: ``nisp`` (Yu et al. 2018, structured, data-driven);
* :mod:`~fastprune.methods.singe`: ``singe`` (Yvinec et al. 2022), ``grad_weight``, ``taylor``
  (Molchanov et al. 2019) (structured, gradients on data).

``python -m fastprune.methods`` (or ``fastprune methods``) prints the registry.
"""

from fastprune.methods import channels, magnitude, nisp, singe, woodfisher
from fastprune.methods.channels import (
    BNScaleConfig,
    ChannelConfig,
    L1FilterConfig,
    L2FilterConfig,
    RandomChannelConfig,
    run_channels,
)
from fastprune.methods.magnitude import MagnitudeConfig
from fastprune.methods.nisp import NISPConfig
from fastprune.methods.registry import (
    MethodResult,
    MethodSpec,
    config_from_kwargs,
    method_for_config,
    method_names,
    methods,
    register_method,
    spec_for,
    table,
    unregister_method,
)
from fastprune.methods.singe import GradWeightConfig, SInGEConfig, TaylorConfig
from fastprune.methods.woodfisher import FisherDiagConfig, WoodFisherConfig

__all__ = [
    "BNScaleConfig",
    "ChannelConfig",
    "FisherDiagConfig",
    "GradWeightConfig",
    "L1FilterConfig",
    "L2FilterConfig",
    "MagnitudeConfig",
    "MethodResult",
    "MethodSpec",
    "NISPConfig",
    "RandomChannelConfig",
    "SInGEConfig",
    "TaylorConfig",
    "WoodFisherConfig",
    "channels",
    "config_from_kwargs",
    "magnitude",
    "method_for_config",
    "method_names",
    "methods",
    "nisp",
    "register_method",
    "run_channels",
    "singe",
    "spec_for",
    "table",
    "unregister_method",
    "woodfisher",
]
