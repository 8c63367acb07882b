"""Structured pruning engine: coupled-channel groups, channel masks, physical surgery, counting.

* :func:`find_groups` traces a model (``torch.fx``, or a recorded run when FX fails) and returns the
  groups of channels that must be removed together, with the boundaries where pruning stops.
* :func:`mask_channels` zeroes whole channels in place (soft, or hard through torch's prune
  reparametrisation); :func:`compact` removes channels that are exactly zero (or constant, folded
  into the consumer's bias where that is exact) and shrinks the modules in place.
* :func:`count` gives (MACs, parameters) from ``torch.utils.flop_counter``.
"""

from fastprune.structure.count import count
from fastprune.structure.groups import Group, GroupList, Member, find_groups
from fastprune.structure.handlers import Layout, register_handler
from fastprune.structure.surgery import CompactionReport, compact, mask_channels, remove_channels
from fastprune.structure.trace import TraceError

__all__ = [
    "CompactionReport",
    "Group",
    "GroupList",
    "Layout",
    "Member",
    "TraceError",
    "compact",
    "count",
    "find_groups",
    "mask_channels",
    "register_handler",
    "remove_channels",
]
