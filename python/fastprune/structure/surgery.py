"""Channel masks and physical surgery.

* :func:`mask_channels` zeroes whole channels. ``hard=True``: each group's output members (filters,
  biases) and the following BatchNorm's gamma, beta (and running mean), under torch's prune
  reparametrisation so they stay zero through training; a masked channel is then exactly zero after
  BN and, for activations with act(0) = 0, after the activation. ``hard=False`` (soft filter
  pruning) zeroes the filters and biases once and leaves BN alone, as SFP does: the channel then
  outputs the constant act(BN(0)) until training regrows it. (Zeroing gamma and beta too would stop
  the regrowth: a train-mode BN maps the all-zero channel to beta, ReLU'(0) = 0 blocks beta's
  gradient path, and gamma = 0 blocks the filter's.)
* :func:`compact` removes channels that reach every consumer input-independent: every producing
  filter is exactly zero, or the analysis of :mod:`fastprune.structure.zeros` proves it through
  channel-wise ops (a zero expansion filter -> BN -> act -> depthwise -> BN -> act -> projection,
  with or without a squeeze-excite gate). Such a channel is a constant map c (its bias, BN shift and
  activation applied to zero); removing it is exact when c == 0, and when c is uniform over space
  and a consumer can absorb it (a Linear, or a conv without padding: bias += W[:, p] * c; a
  bias-free conv read only by a BatchNorm takes it into the BN's running mean instead). Otherwise
  the channel is kept, or with ``allow_approximate=True`` folded anyway (a non-uniform map by its
  mean) and the output deviation it caused is measured and reported. The maps are read from one
  forward pass on the example inputs; they do not depend on the inputs (that is what was proved).

Every change is computed first and assigned at the end: a failure leaves the model as it was.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

from fastprune._modes import restore_modes, training_flags
from fastprune.masks import finalize, is_pruned
from fastprune.structure import handlers as H
from fastprune.structure.groups import Group, Member, as_inputs, find_groups
from fastprune.structure.zeros import ChannelStates, channel_states, following_norm, zero_rows

__all__ = ["CompactionReport", "compact", "mask_channels", "remove_channels"]


@dataclass
class CompactionReport:
    """What :func:`compact` did.

    Attributes:
        removed: group id -> channels removed.
        kept: (group id, channel, reason) for zero-filter channels that were kept.
        folded: consumer tensors whose bias absorbed a removed channel's constant.
        approximate: True when a constant was folded where that is not exact, or channels left a
            LayerNorm / RMSNorm / GroupNorm (``prune_norms``; listed in ``approximate_norms``), whose
            statistics over the remaining channels change.
        max_abs_diff: max |output after - output before| on the example inputs (None if nothing
            was removed); params_before / params_after: parameter counts.
    """

    removed: dict[int, list[int]] = field(default_factory=dict)
    kept: list[tuple[int, int, str]] = field(default_factory=list)
    folded: list[str] = field(default_factory=list)
    approximate: bool = False
    approximate_norms: list[str] = field(default_factory=list)
    max_abs_diff: float | None = None
    params_before: int = 0
    params_after: int = 0

    @property
    def num_removed(self) -> int:
        return sum(len(v) for v in self.removed.values())

    def __repr__(self) -> str:
        diff = "-" if self.max_abs_diff is None else f"{self.max_abs_diff:.3g}"
        return (
            f"CompactionReport(removed={self.num_removed} channels in {len(self.removed)} groups, "
            f"kept={len(self.kept)}, folded={len(self.folded)}, approximate={self.approximate}, "
            f"params {self.params_before} -> {self.params_after}, max_abs_diff={diff})"
        )


def _num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _owners(model: nn.Module) -> dict[int, list[tuple[nn.Module, str, bool]]]:
    """id(tensor) -> every (module, attribute, is_parameter) that holds it (tied weights)."""
    out: dict[int, list[tuple[nn.Module, str, bool]]] = {}
    for m in model.modules():
        for k, p in m._parameters.items():
            if p is not None:
                out.setdefault(id(p), []).append((m, k, True))
        for k, b in m._buffers.items():
            if b is not None:
                out.setdefault(id(b), []).append((m, k, False))
    return out


def _member_tensor(modules: Mapping[str, nn.Module], mem: Member) -> torch.Tensor | None:
    mod = modules.get(mem.module)
    if mod is None:
        raise ValueError(f"the model has no module {mem.module!r} (is this plan for another architecture?)")
    if is_pruned(mod, mem.attr):
        return getattr(mod, mem.attr + "_orig")
    t = getattr(mod, mem.attr, None)
    return t if isinstance(t, torch.Tensor) else None


def _check_removed(groups: Sequence[Group], removed: Mapping[int, Sequence[int]]) -> dict[int, Group]:
    by_id = {g.id: g for g in groups}
    for gid, chans in removed.items():
        g = by_id.get(gid)
        if g is None:
            raise ValueError(f"no group {gid}")
        bad = [c for c in chans if not 0 <= c < g.channels or c in g.pinned]
        if bad:
            raise ValueError(f"group {gid} cannot remove channels {bad[:5]} (out of range or pinned)")
        if len(set(chans)) >= g.channels:
            raise ValueError(f"removing all {g.channels} channels of group {gid} (layers {g.layers}) would empty it")
    return by_id


def mask_channels(
    model: nn.Module,
    groups: Sequence[Group],
    removed: Mapping[int, Sequence[int]],
    *,
    hard: bool = True,
    zero_norm: bool | None = None,
) -> None:
    """Zero whole channels in place (see the module docstring). ``removed``: group id -> channels;
    ``zero_norm`` (default: ``hard``) also zeroes the BatchNorm gamma, beta and running mean."""
    zero_norm = hard if zero_norm is None else zero_norm
    by_id = _check_removed(groups, removed)
    modules = dict(model.named_modules())
    zeros: dict[tuple[str, str], tuple[nn.Module, list[tuple[int, list[int]]]]] = {}
    for gid, chans in removed.items():
        if not chans:
            continue
        for mem in by_id[gid].members:
            if mem.role == "in":
                continue
            t = _member_tensor(modules, mem)
            if t is None or (
                mem.role == "norm" and (not zero_norm or mem.attr not in ("weight", "bias", "running_mean"))
            ):
                continue
            pos = mem.positions(chans)
            if pos:
                zeros.setdefault((mem.module, mem.attr), (modules[mem.module], []))[1].append((mem.dim, pos))
    seen: set[int] = set()
    with torch.no_grad():
        for (_, attr), (mod, cuts) in zeros.items():
            t = getattr(mod, attr + "_orig") if is_pruned(mod, attr) else getattr(mod, attr)
            idx = [(d, torch.tensor(p, dtype=torch.long, device=t.device)) for d, p in cuts]
            if id(t) not in seen:  # a tied tensor is zeroed once
                seen.add(id(t))
                for d, i in idx:
                    t.index_fill_(d, i, 0)
            if hard and (attr in mod._parameters or is_pruned(mod, attr)):
                keep = torch.ones_like(t)
                for d, i in idx:
                    keep.index_fill_(d, i, 0)
                torch_prune.custom_from_mask(mod, attr, keep)


def remove_channels(
    model: nn.Module,
    groups: Sequence[Group],
    removed: Mapping[int, Sequence[int]],
    *,
    replace: Mapping[str, torch.Tensor] | None = None,
) -> None:
    """Physically remove channels: every member tensor loses the positions of the removed channels;
    module attributes (``out_channels``, ``in_features``, ``groups`` of depthwise convs, ...) follow
    the new shapes. ``replace``: tensor name -> new value, applied before slicing (folded biases).
    The model must carry no prune reparametrisation (see :func:`fastprune.finalize`)."""
    by_id = _check_removed(groups, removed)
    modules = dict(model.named_modules())
    cut: dict[str, dict[int, set[int]]] = {}
    where: dict[str, Member] = {}
    for gid, chans in removed.items():
        if not chans:
            continue
        for mem in by_id[gid].members:
            pos = mem.positions(chans)
            if pos:
                cut.setdefault(mem.tensor, {}).setdefault(mem.dim, set()).update(pos)
                where.setdefault(mem.tensor, mem)
    owners = _owners(model)
    new_values: list[tuple[torch.Tensor, torch.Tensor]] = []
    touched: set[nn.Module] = set()
    replace = dict(replace or {})
    for name, dims in cut.items():
        mem = where[name]
        mod = modules[mem.module]
        if is_pruned(mod, mem.attr):
            raise ValueError(f"{name} carries a prune reparametrisation; call fastprune.finalize(model) first")
        old = getattr(mod, mem.attr)
        value = replace.pop(name, old.detach())
        for dim, pos in dims.items():
            keep = np.ones(value.shape[dim], dtype=bool)
            keep[np.fromiter(pos, dtype=np.int64)] = False
            value = value.index_select(dim, torch.from_numpy(np.flatnonzero(keep)).to(value.device))
        new_values.append((old, value))
    for name, value in replace.items():  # folded biases of layers that lose nothing themselves
        mname, _, attr = name.rpartition(".")
        mod = modules[mname]
        old = getattr(mod, attr)
        new_values.append((old, value) if old is not None else (None, (mod, attr, value)))
    # all values computed: assign
    snapshots = {}
    for old, value in new_values:
        if old is None:  # a bias created to absorb a constant
            mod, attr, v = value
            snapshots.setdefault(mod, H.snapshot(mod))
            setattr(mod, attr, nn.Parameter(v))
            touched.add(mod)
            continue
        value = value if value.data_ptr() != old.data_ptr() else value.clone()
        shared = (
            nn.Parameter(value, requires_grad=old.requires_grad) if isinstance(old, nn.Parameter) else value
        )  # one new tensor for every owner: tied weights stay tied
        for mod, attr, is_param in owners.get(id(old), []):
            snapshots.setdefault(mod, H.snapshot(mod))
            if is_param:
                setattr(mod, attr, shared)
            else:
                mod._buffers[attr] = shared
            touched.add(mod)
    for mod in touched:
        H.fixup(mod, snapshots[mod])
    # containers that own pruned sub-layers (attention) re-read their sizes too
    for mod in model.modules():
        if mod not in touched and any(c in touched for c in mod.children()):
            H.fixup(mod, H.snapshot(mod))


def _capture_inputs(
    model: nn.Module, need: Mapping[str, torch.Tensor], inputs: tuple
) -> tuple[dict[str, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]], Any]:
    """Per consumer module and call, the max, min and mean of the input channels ``need[module]``
    over every other dimension (batch and space for a conv, every leading dimension for a Linear)."""
    modules = dict(model.named_modules())
    seen: dict[str, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = {n: [] for n in need}
    handles = []
    for n, pos in need.items():
        cdim = -1 if H.linear_in_dim(modules[n]) is not None else 1

        def hook(
            mod: nn.Module, args: tuple, kwargs: dict, n: str = n, pos: torch.Tensor = pos, cdim: int = cdim
        ) -> None:
            x = args[0] if args else next(iter(kwargs.values()), None)
            if isinstance(x, torch.Tensor) and x.numel():
                v = x.detach().index_select(cdim, pos.to(x.device))
                dims = tuple(d for d in range(v.dim()) if d != cdim % v.dim())
                seen[n].append((v.amax(dims), v.amin(dims), v.to(torch.float64).mean(dims)))

        handles.append(modules[n].register_forward_pre_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            out = model(*inputs)
    finally:
        for h in handles:
            h.remove()
    return seen, out


def _flat_tensors(x: Any) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (tuple, list)):
        return [t for v in x for t in _flat_tensors(v)]
    if isinstance(x, Mapping):  # also HuggingFace ModelOutput (an OrderedDict)
        return [t for v in x.values() for t in _flat_tensors(v)]
    return []


def _max_diff(a: Any, b: Any) -> float:
    ta, tb = _flat_tensors(a), _flat_tensors(b)
    if len(ta) != len(tb):
        return float("inf")
    d = 0.0
    for x, y in zip(ta, tb, strict=True):
        if x.shape != y.shape:
            return float("inf")
        if x.numel():
            d = max(d, float((x.double() - y.double()).abs().max()))
    return d


def _constants(
    stats: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], pos: list[int]
) -> tuple[torch.Tensor | None, bool]:
    """Per position, the value the consumer sees on that input channel, and whether it is the same
    at every point of the map. The channel is input-independent (the caller proved it), so the
    example inputs show its map exactly: uniform -> (the constant, True); varying over space ->
    (its mean, False); calls that disagree (a module called twice) -> (None, False)."""
    if not stats:
        return None, False
    uniform = all(torch.equal(hi[pos], lo[pos]) for hi, lo, _ in stats)
    vals = [hi[pos] if uniform else mean[pos] for hi, lo, mean in stats]
    if any(not torch.equal(vals[0], v) for v in vals[1:]):
        return None, False
    return vals[0], uniform


def _nonzero_filters(modules: Mapping[str, nn.Module], g: Group, cache: dict | None = None) -> set[int]:
    """Channels of ``g`` written by some nonzero filter (all of them when a producer is missing)."""
    nonzero: set[int] = set()
    for mem in g.producers:
        t = _member_tensor(modules, mem)
        if t is None:
            return set(range(g.channels))
        nz = (~zero_rows(t, mem.dim, t.shape[mem.dim], cache)).tolist()
        nonzero.update(c for c, z in zip(mem.index, nz, strict=True) if z and c >= 0)
    return nonzero


def _fixed_at_consumers(states: ChannelStates, g: Group, chans: Iterable[int], roots: Sequence[int]) -> set[int]:
    """Channels of ``chans`` that reach every consumer of ``g`` reading them input-independent."""
    reads = [(m.module, {c for c in m.index if c >= 0}) for m in g.members if m.role == "in"]
    out = set()
    for c in chans:
        consumers = [mod for mod, cs in reads if c in cs]
        if consumers and all(states.fixed_everywhere(mod, roots[c]) is True for mod in consumers):
            out.add(c)
    return out


def _all_zero(
    states: ChannelStates,
    by_id: Mapping[int, Group],
    candidates: Mapping[int, Sequence[int]],
    group_root: Mapping[int, Any],
    need: Mapping[str, Any],
) -> bool:
    """Every consumer in ``need`` reads exact zeros on every candidate channel, in every call."""
    roots = {group_root[g][c] for g, cs in candidates.items() for c in cs}
    for n in need:
        if n in states.reads:
            if not all((present & roots) <= zero for present, zero, _ in states.reads[n]):
                return False
        elif not (n in states.heads and all(states.heads[n])):
            return False
    return True


def _tensor_at(modules: Mapping[str, nn.Module], name: str) -> torch.Tensor | None:
    mname, _, attr = name.rpartition(".")
    t = getattr(modules[mname], attr, None)
    return t if isinstance(t, torch.Tensor) else None


def _fold_dtype(modules: Mapping[str, nn.Module], name: str) -> torch.dtype:
    t = _tensor_at(modules, name)
    return t.dtype if t is not None else modules[name.rpartition(".")[0]].weight.dtype


def _fold_target(model: nn.Module, modules: Mapping[str, nn.Module], trace: Any, consumer: str) -> tuple[str, float]:
    """Where a constant added to ``consumer``'s output goes: its bias, or, for a bias-free layer
    read only by a BatchNorm, that BN's running mean (BN(y + d) with mean mu is BN(y) with mean
    mu - d; in training the batch mean absorbs d either way); else a new bias."""
    if modules[consumer].bias is None and (bn := following_norm(model, trace, consumer)) is not None:
        return f"{bn}.running_mean", -1.0
    return f"{consumer}.bias", 1.0


def _by_channel(mem: Member) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for p, c in enumerate(mem.index):
        if c >= 0:
            out.setdefault(c, []).append(p)
    return out


def _fold(mod: nn.Module, mem: Member, pos: list[int], c: torch.Tensor) -> tuple[torch.Tensor | None, bool]:
    """Bias change that absorbs constant inputs ``c`` at positions ``pos``; (delta, exact)."""
    w = mod.weight.detach()
    ind = H.linear_in_dim(mod)
    if ind is not None and mem.dim == ind:  # Linear (out, in), GPT-2's Conv1D (in, out)
        cols = w.index_select(ind, torch.tensor(pos, device=w.device)).to(torch.float64)
        return (cols if ind == 1 else cols.T) @ c.to(torch.float64), True
    if isinstance(mod, nn.modules.conv._ConvNd) and not mod.transposed and mem.dim == 1 and mod.groups == 1:
        pad = mod.padding
        exact = pad == "valid" if isinstance(pad, str) else all(p == 0 for p in pad)
        taps = w[:, pos].to(torch.float64).flatten(2).sum(2)
        return taps @ c.to(torch.float64), exact
    return None, False


def compact(
    model: nn.Module,
    example_inputs: Any,
    *,
    allow_approximate: bool = False,
    groups: Sequence[Group] | None = None,
    channels: Mapping[int, Sequence[int]] | None = None,
    verify: bool = False,
) -> CompactionReport:
    """Remove channels that provably reach every consumer input-independent (all producing filters
    zero, or zero upstream of a channel-wise chain: see the module docstring), in place (module
    classes and attribute names are kept; tensors shrink).

    Args:
        model: the model; torch prune reparametrisations are made permanent first (the forward is
            unchanged by that). Runs in eval mode for the measurement; the training flag is kept.
        example_inputs: a tensor or a tuple of inputs (any values: the removed channels' constants
            do not depend on them).
        allow_approximate: also fold constants where that is not exact (a padded conv sees zeros at
            the border); the measured deviation is in the report.
        groups / channels: restrict to these groups and, per group id, these channels (what
            :func:`fastprune.prune` passes); default: every group of :func:`find_groups`.
        verify: also re-run the model when every removed channel was an exact zero (removal is
            then exact by construction; with folded constants the check always runs).

    Returns:
        A :class:`CompactionReport`; ``max_abs_diff`` between the outputs before and after on the
        example inputs when that was measured (None otherwise).
    """
    inputs = as_inputs(example_inputs)
    report = CompactionReport(params_before=_num_params(model))
    finalize(model)
    flags = training_flags(model)
    model.eval()
    try:
        if groups is None:
            groups = find_groups(model, inputs)
        modules = dict(model.named_modules())
        trace = getattr(groups, "_trace", None)
        allowed_of = {
            g.id: sorted((set(channels.get(g.id, ())) if channels is not None else set(g.prunable)) - set(g.pinned))
            for g in groups
        }
        group_root = {g.id: trace[3][g.id] for g in groups} if trace is not None else {}
        candidates: dict[int, list[int]] = {}
        rows: dict = {}  # zero filters per weight, shared by the two passes
        zero_of = {g.id: set(allowed_of[g.id]) - _nonzero_filters(modules, g, rows) for g in groups if allowed_of[g.id]}
        states = (
            channel_states(
                model,
                trace,
                (group_root[g][c] for g, cs in allowed_of.items() for c in cs),
                zero_filters={group_root[g][c] for g, cs in zero_of.items() for c in cs},
                cache=rows,
            )
            if trace is not None
            else None
        )
        for g in groups:
            if not allowed_of[g.id]:
                continue
            zero = zero_of[g.id]
            if states is not None:
                # also channels that reach every consumer input-independent (see structure.zeros)
                zero |= _fixed_at_consumers(states, g, set(allowed_of[g.id]) - zero, group_root[g.id])
            if zero:
                candidates[g.id] = sorted(zero)
        if not candidates:
            report.params_after = report.params_before
            return report
        by_id = {g.id: g for g in groups}
        # input positions each consumer must be checked on (every consumer has one "in" member)
        need_np: dict[str, set[int]] = {}
        for gid, chans in candidates.items():
            for mem in by_id[gid].members:
                if mem.role == "in":
                    pos = mem.positions(chans)
                    if pos:
                        need_np.setdefault(mem.module, set()).update(pos)
        need = {n: torch.tensor(sorted(p), dtype=torch.long) for n, p in need_np.items()}
        col = {n: {p: k for k, p in enumerate(v.tolist())} for n, v in need.items()}
        norms = sorted(
            {
                m.module
                for gid in candidates
                for m in by_id[gid].members
                if m.role == "norm" and H.normalises_channels(modules[m.module])
            }
        )
        if states is not None and not verify and not norms and _all_zero(states, by_id, candidates, group_root, need):
            # every consumer provably reads exact zeros (see fastprune.structure.zeros): no forward
            seen = {n: [(torch.zeros(len(v)), torch.zeros(len(v)), torch.zeros(len(v)))] for n, v in need.items()}
            before = None
        else:
            seen, before = _capture_inputs(model, need, inputs)
        deltas: dict[str, torch.Tensor] = {}
        removed: dict[int, list[int]] = {}
        for gid, chans in candidates.items():
            g = by_id[gid]
            ins = []
            for mem in g.members:
                if mem.role != "in":
                    continue
                if mem.module not in need:
                    continue
                # fast path: every checked position of this consumer read an exact 0 in every call
                stats = seen.get(mem.module, [])
                if stats and all(not bool(hi.any()) and not bool(lo.any()) for hi, lo, _ in stats):
                    continue
                ins.append((mem, _by_channel(mem)))
            for c in chans:
                plan: list[tuple[Member, torch.Tensor]] = []
                ok, approx = True, False
                for mem, pos_of in ins:
                    pos = pos_of.get(c)
                    if not pos:
                        continue
                    mod = modules[mem.module]
                    const, uniform = _constants(seen.get(mem.module, []), [col[mem.module][p] for p in pos])
                    if const is None:
                        ok = False
                        report.kept.append((gid, c, f"{mem.module} does not see a constant on this channel"))
                        break
                    if uniform and not bool(const.any()):
                        continue
                    delta, exact = _fold(mod, mem, pos, const)
                    if not uniform:
                        exact = False  # the mean of a map that varies over space (a padded depthwise upstream)
                    if delta is None or (not exact and not allow_approximate):
                        ok = False
                        what = "constant" if uniform else "input-independent but not uniform over space, mean"
                        report.kept.append(
                            (
                                gid,
                                c,
                                f"{what} {float(const.abs().max()):.3g} cannot be folded "
                                f"exactly into {mem.module} ({type(mod).__name__})",
                            )
                        )
                        break
                    approx |= not exact
                    plan.append((mem, delta))
                if not ok:
                    continue
                report.approximate |= approx
                removed.setdefault(gid, []).append(c)
                for mem, delta in plan:
                    name, sign = _fold_target(model, modules, trace, mem.module)
                    base = deltas.get(name)
                    if base is None:
                        mod = modules[mem.module]
                        old = _tensor_at(modules, name)
                        base = (
                            old.detach().to(torch.float64)
                            if old is not None
                            else torch.zeros(delta.shape[0], dtype=torch.float64, device=mod.weight.device)
                        )
                    deltas[name] = base + sign * delta
        # a removed channel may leave a group with none (only when every channel was zero)
        for gid, chans in list(removed.items()):
            if len(chans) >= by_id[gid].channels:
                keep = max(chans)
                chans.remove(keep)
                report.kept.append((gid, keep, "every channel of the group is zero; one is kept so no layer is empty"))
                if not chans:
                    del removed[gid]
        # keyed by the folded tensor's name ("<module>.bias", "<bn>.running_mean"), also its name in
        # the groups (not for a tensor tied across modules: such a consumer is refused below)
        replace = {name: v.to(_fold_dtype(modules, name)) for name, v in deltas.items()}
        owners = _owners(model)
        tied = [n for n in replace if (t := _tensor_at(modules, n)) is not None and len(owners.get(id(t), [])) > 1]
        if tied:
            raise ValueError(f"cannot fold constants into tensors shared by several modules: {tied}")
        remove_channels(model, groups, removed, replace=replace)
        report.removed = removed
        report.folded = sorted(replace)
        touched = sorted({m.module for gid in removed for m in by_id[gid].members if m.module in norms})
        if touched:
            report.approximate = True  # the norms' statistics over the remaining channels change
            report.approximate_norms = touched
        if before is not None and (replace or verify or report.approximate_norms):
            # folding changes arithmetic: measure what it did (removing exact zeros cannot change
            # the function, so that case is not re-run unless verify=True)
            with torch.no_grad():
                after = model(*inputs)
            report.max_abs_diff = _max_diff(before, after)
    finally:
        restore_modes(flags)
    report.params_after = _num_params(model)
    return report
