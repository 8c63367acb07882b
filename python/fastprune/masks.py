"""Unstructured masks in PyTorch's own format (``torch.nn.utils.prune``).

A pruned parameter ``weight`` of a module becomes ``weight_orig`` (the trainable Parameter) and
``weight_mask`` (a buffer), with a forward pre-hook computing ``weight = weight_orig * weight_mask``.
Any tool that reads torch's prune state works on a fastprune model, and
``torch.nn.utils.prune.remove`` (or :func:`finalize`) makes the masks permanent. Masked entries of
the effective weight are exactly zero in every forward, whatever an optimizer does to
``weight_orig`` (momentum, weight decay, Adam's moments).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

__all__ = [
    "ParamRef",
    "add_to_weights",
    "apply_masks",
    "check_finite_weights",
    "check_not_below_current",
    "current_mask",
    "detach_masked_weights",
    "effective_weight",
    "finalize",
    "is_pruned",
    "select_parameters",
    "sparsity_of",
]

_NORM_TYPES = (
    nn.modules.batchnorm._BatchNorm,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.LocalResponseNorm,
)


@dataclass(frozen=True)
class ParamRef:
    """One prunable parameter: ``name`` is ``"<module>.<param>"``; ``owners`` lists every
    (module name, module) that holds the same Parameter (tied weights), the first being canonical."""

    name: str
    param_name: str
    owners: tuple[tuple[str, nn.Module], ...]

    @property
    def module(self) -> nn.Module:
        return self.owners[0][1]

    @property
    def module_name(self) -> str:
        return self.owners[0][0]


def is_pruned(module: nn.Module, param_name: str) -> bool:
    """Whether ``module.<param_name>`` carries a torch prune reparametrisation."""
    return hasattr(module, param_name + "_orig") and hasattr(module, param_name + "_mask")


def detach_masked_weights(model: nn.Module) -> None:
    """A forward with autograd leaves ``weight = weight_orig * mask`` as a non-leaf tensor on every
    torch-pruned module, which ``copy.deepcopy`` refuses; recompute it without a graph (same values)."""
    with torch.no_grad():
        for mod in model.modules():
            for hook in list(mod._forward_pre_hooks.values()):
                if isinstance(hook, torch_prune.BasePruningMethod):
                    setattr(mod, hook._tensor_name, hook.apply_mask(mod))


def effective_weight(module: nn.Module, param_name: str) -> torch.Tensor:
    """The weight as the forward sees it (``orig * mask`` when pruned), detached."""
    if is_pruned(module, param_name):
        return (getattr(module, param_name + "_orig") * getattr(module, param_name + "_mask")).detach()
    return getattr(module, param_name).detach()


def current_mask(module: nn.Module, param_name: str) -> torch.Tensor | None:
    """The bool mask of a pruned parameter (True = kept), or None when it is not pruned."""
    if is_pruned(module, param_name):
        return getattr(module, param_name + "_mask").detach() != 0
    return None


def _raw_param(module: nn.Module, param_name: str) -> torch.Tensor:
    return getattr(module, param_name + "_orig") if is_pruned(module, param_name) else getattr(module, param_name)


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(name == p or fnmatch.fnmatchcase(name, p) for p in patterns)


def _in_module(module_name: str, pattern: str) -> bool:
    """Whether the module, or a module it sits in, matches the pattern (``"encoder"`` covers
    ``"encoder.layer.0.attention"``)."""
    parts = module_name.split(".") if module_name else []
    return any(_matches(".".join(parts[:i]), (pattern,)) for i in range(len(parts), 0, -1)) or (
        not parts and _matches("", (pattern,))
    )


def _as_patterns(x: str | Iterable[str] | None, arg: str) -> tuple[str, ...] | None:
    if x is None:
        return None
    if isinstance(x, str):
        return (x,)
    out = tuple(x)
    if not all(isinstance(p, str) for p in out):
        raise TypeError(f"{arg} must be a module name, a glob pattern, or a list of them")
    return out


def select_parameters(
    model: nn.Module,
    include: str | Iterable[str] | None = None,
    exclude: str | Iterable[str] | None = None,
) -> list[ParamRef]:
    """The parameters an unstructured method prunes, in module order.

    Default: every ``weight`` with at least two dimensions (Linear, ConvNd, ConvTransposeNd,
    Embedding, ...) outside normalisation layers; biases and norm parameters are never selected by
    default. ``include`` / ``exclude`` take module names or glob patterns (``"features.*"``) that
    select modules and everything inside them (``"encoder"`` covers ``"encoder.layer.0.output"``):
    an included module contributes its default parameters, so ``"encoder.*"`` prunes
    the encoder's weight matrices and not its biases or LayerNorm weights. Pruning another
    floating-point parameter is an explicit opt-in: a pattern whose last part is that parameter's
    name (``"fc.bias"``, ``"*.bias"``). ``exclude`` also matches full parameter names. A pattern
    that matches nothing is a ``ValueError`` naming it. A Parameter shared by several modules
    appears once, with all its owners.
    """
    inc = _as_patterns(include, "include")
    exc = _as_patterns(exclude, "exclude")
    owners: dict[int, list[tuple[str, nn.Module]]] = {}
    first_name: dict[int, tuple[str, str]] = {}
    chosen_ids: set[int] = set()
    order: list[int] = []
    used_inc: set[str] = set()
    used_exc: set[str] = set()
    for mname, module in model.named_modules(remove_duplicate=False):
        pnames = [n for n, _ in module.named_parameters(recurse=False)]
        pnames = [
            n[: -len("_orig")] if n.endswith("_orig") and is_pruned(module, n[: -len("_orig")]) else n for n in pnames
        ]
        for pname in pnames:
            param = _raw_param(module, pname)
            if not param.is_floating_point():
                continue
            key = id(param)
            full = f"{mname}.{pname}" if mname else pname
            if key not in owners:
                owners[key] = []
                first_name[key] = (full, pname)
                order.append(key)
            if all(m is not module for _, m in owners[key]):
                owners[key].append((mname, module))
            default = pname == "weight" and param.dim() >= 2 and not isinstance(module, _NORM_TYPES)
            if inc is not None:
                # a pattern matching the module selects its default parameters; one that ends in this
                # parameter's name ("fc.bias", "*.bias") selects the parameter itself
                by_module = [p for p in inc if _in_module(mname, p)]
                by_name = [p for p in inc if p.rsplit(".", 1)[-1] == pname and _matches(full, (p,))]
                used_inc.update(by_module + by_name)
                chosen = bool(by_name) or (bool(by_module) and default)
            else:
                chosen = default
            if exc is not None:
                hit = [p for p in exc if _matches(full, (p,)) or _in_module(mname, p)]
                used_exc.update(hit)
                chosen = chosen and not hit
            if chosen:
                # a Parameter shared by several modules is pruned once, on all of its owners
                chosen_ids.add(key)
    if inc is not None:
        missing = [p for p in inc if p not in used_inc]
        if missing:
            raise ValueError(f"include pattern(s) {missing} match no module or parameter of the model")
    if exc is not None:
        missing = [p for p in exc if p not in used_exc]
        if missing:
            raise ValueError(f"exclude pattern(s) {missing} match no module or parameter of the model")
    return [ParamRef(first_name[k][0], first_name[k][1], tuple(owners[k])) for k in order if k in chosen_ids]


def apply_masks(refs: Sequence[ParamRef], masks: Mapping[str, torch.Tensor]) -> None:
    """Install bool masks (True = kept) with torch's prune container, on every owner of each
    parameter. Combines with an existing mask (a weight once pruned stays pruned) and zeroes the
    pruned entries of ``*_orig`` too, so that the stored state matches what the forward computes."""
    for ref in refs:
        if ref.name not in masks:
            continue
        mask = masks[ref.name]
        raw = _raw_param(ref.module, ref.param_name)
        if tuple(mask.shape) != tuple(raw.shape):
            raise ValueError(f"mask for {ref.name} has shape {tuple(mask.shape)}, parameter has {tuple(raw.shape)}")
        mask = mask.to(device=raw.device, dtype=torch.bool)
        for _, module in ref.owners:
            old = current_mask(module, ref.param_name)
            new = mask if old is None else (mask & old.to(mask.device))
            if is_pruned(module, ref.param_name):
                getattr(module, ref.param_name + "_mask").copy_(new.to(raw.dtype))
            else:
                torch_prune.custom_from_mask(module, ref.param_name, new.to(raw.dtype))
            with torch.no_grad():
                getattr(module, ref.param_name + "_orig").mul_(new.to(raw.dtype))
            # the hook recomputes on the next forward; refresh the attribute now for readers
            setattr(
                module,
                ref.param_name,
                getattr(module, ref.param_name + "_orig") * getattr(module, ref.param_name + "_mask"),
            )


def sparsity_of(masks: Mapping[str, torch.Tensor]) -> float:
    """Pruned fraction over all entries of bool keep-masks (0.0 when there are none)."""
    total = sum(m.numel() for m in masks.values())
    zeros = sum(int((~m).sum()) for m in masks.values())
    return zeros / total if total else 0.0


def check_not_below_current(refs: Sequence[ParamRef], sparsity: float, scope: str) -> None:
    """ValueError when ``sparsity`` asks for fewer zeros than the selected weights already hold
    (over all of them for ``scope="global"``, per layer for ``"layer"``): masks only grow, so such
    a call could not reach its target, and used to report the target while the model stayed sparser."""
    groups = [[r] for r in refs] if scope == "layer" else [list(refs)]
    for group in groups:
        zeros = sum(int((effective_weight(r.module, r.param_name) == 0).sum()) for r in group)
        total = sum(effective_weight(r.module, r.param_name).numel() for r in group)
        if total and round(sparsity * total) < zeros:
            where = group[0].name if scope == "layer" else "the selected weights"
            raise ValueError(
                f"{where} {'is' if scope == 'layer' else 'are'} already {zeros / total:.2%} sparse; "
                f"sparsity={sparsity} asks for fewer zeros, and masks only grow: ask for at least "
                f"{zeros / total:.4f}, or prune a dense copy"
            )


def check_finite_weights(refs: Sequence[ParamRef]) -> None:
    """ValueError naming the first selected weight that holds NaN or Inf (scores of such weights
    are meaningless, and the NaNs would survive pruning)."""
    for r in refs:
        if not bool(torch.isfinite(effective_weight(r.module, r.param_name)).all()):
            raise ValueError(f"{r.name} holds NaN or Inf: fix the weights before pruning")


def add_to_weights(refs: Sequence[ParamRef], deltas: Mapping[str, torch.Tensor]) -> None:
    """``w += delta`` on the trainable tensor of each named parameter (``*_orig`` when pruned)."""
    for ref in refs:
        if ref.name in deltas:
            raw = _raw_param(ref.module, ref.param_name)
            with torch.no_grad():
                raw.add_(deltas[ref.name].to(device=raw.device, dtype=raw.dtype).reshape(raw.shape))


def finalize(model: nn.Module) -> nn.Module:
    """Make every torch-prune mask permanent (``weight = weight_orig * weight_mask``) and remove
    the reparametrisation; returns ``model``."""
    for module in model.modules():
        names = [
            h._tensor_name
            for h in list(module._forward_pre_hooks.values())
            if isinstance(h, torch_prune.BasePruningMethod)
        ]
        for name in names:
            torch_prune.remove(module, name)
    return model
