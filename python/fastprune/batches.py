"""How a batch from a user's loader becomes a call of the model (and, for losses, its targets).

What PyTorch and HuggingFace loaders yield, and what fastprune reads from it:

* a tensor: the model's input, no targets;
* a tuple or list ``(inputs..., targets)``: every element but the last is a positional input, the
  last one the targets (a 1-tuple is the input alone);
* a mapping (HuggingFace style): ``model(**batch)`` without its ``"labels"``, which are the targets.

Anything else is a TypeError naming these formats; data-driven methods take a ``forward=`` hook
for batches the defaults cannot read. Every data-reading part of fastprune goes through
:func:`as_batch`, so they all accept the same batches.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

__all__ = ["Batch", "as_batch", "forward_batch", "model_inputs", "output_tensor"]

FORMATS = (
    "a tensor, an (inputs..., targets) tuple or list, or a dict of model keyword arguments "
    "(its 'labels' are the targets)"
)


@dataclass(frozen=True)
class Batch:
    """One batch, taken apart: ``model(*args, **kwargs)`` and the ``targets`` (None without).

    ``size`` is the number of samples: the leading dimension of the first tensor input. Tensors
    with that leading dimension are per-sample (sliced and split by :meth:`slice`); others (a scalar
    option, a shared mask) are passed whole to every slice. ``kind`` remembers the original format
    (``"tensor"``, ``"tuple"``, ``"list"``, ``"dict"``) for :meth:`rebuild`."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    targets: Any
    size: int
    kind: str

    def _is_sample(self, v: Any) -> bool:
        return isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == self.size

    def slice(self, start: int, stop: int) -> Batch:
        """Samples ``[start, stop)``."""

        def cut(v: Any) -> Any:
            return v[start:stop] if self._is_sample(v) else v

        n = max(0, min(stop, self.size) - max(0, start))
        return Batch(
            tuple(cut(a) for a in self.args),
            {k: cut(v) for k, v in self.kwargs.items()},
            cut(self.targets),
            n,
            self.kind,
        )

    def with_targets(self, targets: Any) -> Batch:
        return replace(self, targets=targets)

    def sample_tensors(self) -> tuple[list[torch.Tensor], Callable[[list[torch.Tensor], int], Batch]]:
        """The per-sample tensors (inputs and targets, in a fixed order) and a function rebuilding a
        batch of ``n`` samples from replacements for them (what ``torch.func.vmap`` maps over)."""
        keys: list[tuple[str, Any]] = [("a", i) for i, a in enumerate(self.args) if self._is_sample(a)]
        keys += [("k", k) for k, v in self.kwargs.items() if self._is_sample(v)]
        if self._is_sample(self.targets):
            keys.append(("t", None))
        tensors = [self.args[i] if w == "a" else self.kwargs[i] if w == "k" else self.targets for w, i in keys]

        def rebuild(ts: list[torch.Tensor], n: int) -> Batch:
            args, kwargs, targets = list(self.args), dict(self.kwargs), self.targets
            for (w, i), t in zip(keys, ts, strict=True):
                if w == "a":
                    args[i] = t
                elif w == "k":
                    kwargs[i] = t
                else:
                    targets = t
            return Batch(tuple(args), kwargs, targets, n, self.kind)

        return tensors, rebuild

    def rebuild(self) -> Any:
        """This batch in the format the loader yielded (for a user's ``forward`` hook)."""
        if self.kind == "tensor":
            return self.args[0]
        if self.kind == "dict":
            return {**self.kwargs, **({"labels": self.targets} if self.targets is not None else {})}
        items = [*self.args, *([self.targets] if self.targets is not None else [])]
        return items if self.kind == "list" else tuple(items)


def as_batch(batch: Any) -> Batch:
    """Take one loader batch apart (see the module docstring); a TypeError names the formats."""
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    if isinstance(batch, torch.Tensor):
        args, kwargs, targets, kind = (batch,), {}, None, "tensor"
    elif isinstance(batch, Mapping):
        kwargs = {str(k): v for k, v in batch.items() if k != "labels"}
        args, targets, kind = (), batch.get("labels"), "dict"
        if not kwargs:
            raise TypeError(f"a dict batch needs model inputs besides 'labels'; a batch must be {FORMATS}")
    elif isinstance(batch, (tuple, list)) and batch:
        args = tuple(batch[:-1]) if len(batch) > 1 else (batch[0],)
        targets = batch[-1] if len(batch) > 1 else None
        kwargs, kind = {}, "list" if isinstance(batch, list) else "tuple"
    else:
        raise TypeError(f"a batch must be {FORMATS}; got {type(batch).__name__}")
    first = next((v for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor) and v.dim() > 0), None)
    if first is None:
        raise TypeError(
            f"a batch must hold at least one tensor input with a batch dimension; a batch must be {FORMATS}"
        )
    return Batch(args, kwargs, targets, int(first.shape[0]), kind)


def model_inputs(batch: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """``(args, kwargs)`` of the model call for one batch."""
    b = as_batch(batch)
    return b.args, b.kwargs


def forward_batch(model: nn.Module, batch: Any) -> Any:
    """``model`` called on one batch's inputs (its targets are not passed)."""
    b = batch if isinstance(batch, Batch) else as_batch(batch)
    return model(*b.args, **b.kwargs)


def output_tensor(out: Any) -> torch.Tensor:
    """The tensor a loss reads from a model's output: the output itself, its ``logits`` (HuggingFace
    heads), else the first tensor of a tuple / mapping output (``last_hidden_state``)."""
    if isinstance(out, torch.Tensor):
        return out
    logits = getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    values = list(out.values()) if isinstance(out, Mapping) else list(out) if isinstance(out, (tuple, list)) else []
    for v in values:
        if isinstance(v, torch.Tensor):
            return v
    raise TypeError(
        f"cannot find a tensor in the model's output ({type(out).__name__}); pass forward= to compute the loss"
    )
