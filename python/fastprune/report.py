"""Sparsity reports: per layer and global, dead neurons included.

Reads fastprune models and models pruned by ``torch.nn.utils.prune`` directly (the same state).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fastprune.masks import effective_weight, is_pruned

__all__ = ["LayerSparsity", "SparsityReport", "dead_neurons", "sparsity_report"]

_LAYER_TYPES = (nn.Linear, nn.modules.conv._ConvNd)
_DEAD_NOTE = (
    "dead out: output neurons / filters whose incoming weights are all zero (they emit only their bias); "
    "dead in: inputs the layer no longer reads"
)


@dataclass(frozen=True)
class LayerSparsity:
    """One layer's weight: its entries, zeros, and the neurons pruning has disconnected.

    ``dead_outputs``: output neurons / filters whose incoming weights are all zero (they emit only
    their bias: structured pruning could remove them). ``dead_inputs``: input units / channels this
    layer no longer reads (every weight from them is zero)."""

    name: str
    kind: str
    numel: int
    zeros: int
    dead_outputs: int
    dead_inputs: int

    @property
    def sparsity(self) -> float:
        return self.zeros / self.numel if self.numel else 0.0


@dataclass(frozen=True)
class SparsityReport:
    layers: tuple[LayerSparsity, ...]

    @property
    def numel(self) -> int:
        return sum(layer.numel for layer in self.layers)

    @property
    def zeros(self) -> int:
        return sum(layer.zeros for layer in self.layers)

    @property
    def sparsity(self) -> float:
        return self.zeros / self.numel if self.numel else 0.0

    @property
    def compression(self) -> float:
        """numel / nonzeros (Han et al.'s "x fewer parameters")."""
        nz = self.numel - self.zeros
        return self.numel / nz if nz else float("inf")

    def __getitem__(self, name: str) -> LayerSparsity:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(name)

    def to_dict(self) -> dict[str, object]:
        """Plain data (JSON-ready): the totals and one entry per layer."""
        return {
            "numel": self.numel,
            "zeros": self.zeros,
            "sparsity": self.sparsity,
            "compression": self.compression if self.zeros < self.numel else None,
            "layers": [
                {
                    "name": x.name,
                    "kind": x.kind,
                    "numel": x.numel,
                    "zeros": x.zeros,
                    "sparsity": x.sparsity,
                    "dead_outputs": x.dead_outputs,
                    "dead_inputs": x.dead_inputs,
                }
                for x in self.layers
            ],
        }

    def to_markdown(self) -> str:
        """A markdown table (one row per layer and a total), with what the dead columns mean."""
        head = "| layer | type | weights | zeros | sparsity | dead out | dead in |\n|---|---|---|---|---|---|---|\n"
        rows = "".join(
            f"| {x.name or '(model)'} | {x.kind} | {x.numel} | {x.zeros} | {x.sparsity:.2%} | {x.dead_outputs} | "
            f"{x.dead_inputs} |\n"
            for x in self.layers
        )
        total = (
            f"| total | | {self.numel} | {self.zeros} | {self.sparsity:.2%} | "
            f"{sum(x.dead_outputs for x in self.layers)} | {sum(x.dead_inputs for x in self.layers)} |\n"
        )
        return head + rows + total + "\n" + _DEAD_NOTE + "\n"

    def __str__(self) -> str:
        rows = [("layer", "type", "weights", "zeros", "sparsity", "dead out", "dead in")]
        for layer in self.layers:
            rows.append(
                (
                    layer.name,
                    layer.kind,
                    f"{layer.numel}",
                    f"{layer.zeros}",
                    f"{layer.sparsity:.2%}",
                    f"{layer.dead_outputs}",
                    f"{layer.dead_inputs}",
                )
            )
        rows.append(
            (
                "total",
                "",
                f"{self.numel}",
                f"{self.zeros}",
                f"{self.sparsity:.2%}",
                f"{sum(x.dead_outputs for x in self.layers)}",
                f"{sum(x.dead_inputs for x in self.layers)}",
            )
        )
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = [
            "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
            for r in rows
        ]
        lines.insert(1, "  ".join("-" * w for w in widths))
        lines.insert(len(lines) - 1, "  ".join("-" * w for w in widths))
        return "\n".join(lines) + f"\ncompression: {self.compression:.2f}x fewer nonzero weights\n{_DEAD_NOTE}"


def dead_neurons(weight: torch.Tensor) -> tuple[int, int]:
    """(dead outputs, dead inputs) of a Linear (out, in) or conv (out, in/groups, ...) weight."""
    nz = weight != 0
    if weight.dim() < 2:
        return 0, 0
    out_alive = nz.reshape(nz.shape[0], -1).any(dim=1)
    in_alive = nz.transpose(0, 1).reshape(nz.shape[1], -1).any(dim=1)
    return int((~out_alive).sum()), int((~in_alive).sum())


def sparsity_report(model: nn.Module) -> SparsityReport:
    """Per-layer and global sparsity of every Linear / Conv weight, and of every other pruned weight
    (masked or plainly zero)."""
    layers = []
    seen: set[int] = set()
    for name, module in model.named_modules():
        # Linear / Conv layers, and any other module whose weight is pruned (GPT-2's Conv1D, ...)
        if not isinstance(module, _LAYER_TYPES) and not is_pruned(module, "weight"):
            continue
        raw = getattr(module, "weight_orig", None) if is_pruned(module, "weight") else getattr(module, "weight", None)
        if raw is None or id(raw) in seen:
            continue
        seen.add(id(raw))
        w = effective_weight(module, "weight")
        dead_out, dead_in = dead_neurons(w)
        layers.append(LayerSparsity(name, type(module).__name__, w.numel(), int((w == 0).sum()), dead_out, dead_in))
    return SparsityReport(tuple(layers))
