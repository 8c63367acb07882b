"""Per-layer sensitivity scan: accuracy (or any metric) against sparsity, one layer at a time.

Han et al. (arXiv:1506.02626) use it to choose each layer's quality parameter: convolutional layers
are more sensitive than fully connected ones.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torch import nn

from fastprune.api import prune
from fastprune.masks import select_parameters

__all__ = ["SensitivityResult", "sensitivity"]


@dataclass(frozen=True)
class SensitivityResult:
    sparsities: tuple[float, ...]
    baseline: float
    scores: dict[str, tuple[float, ...]]  # layer (parameter) name -> metric at each sparsity

    def __str__(self) -> str:
        head = ["layer"] + [f"{s:.0%}" for s in self.sparsities]
        rows = [head, ["(dense)"] + [f"{self.baseline:.4f}"] * len(self.sparsities)]
        rows += [[name] + [f"{v:.4f}" for v in vals] for name, vals in self.scores.items()]
        widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
        return "\n".join(
            "  ".join(c.rjust(w) if j else c.ljust(w) for j, (c, w) in enumerate(zip(r, widths, strict=True)))
            for r in rows
        )

    def plot(self, path: str, ylabel: str = "accuracy") -> str:
        """Write a PNG of metric vs sparsity, one line per layer; returns ``path``."""
        import matplotlib  # optional (the demo extra), and slow to import: only for the plot

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # after choosing the Agg backend

        fig, ax = plt.subplots(figsize=(6, 4))
        for name, vals in self.scores.items():
            ax.plot([100 * s for s in self.sparsities], vals, marker="o", label=name)
        ax.axhline(self.baseline, color="gray", linestyle="--", label="dense")
        ax.set_xlabel("sparsity of the layer (%)")
        ax.set_ylabel(ylabel)
        ax.set_title("per-layer sensitivity")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path


def sensitivity(
    model: nn.Module,
    eval_fn: Callable[[nn.Module], float],
    sparsities: Sequence[float] = (0.5, 0.7, 0.8, 0.9, 0.95),
    layers: Sequence[str] | None = None,
    plot: str | None = None,
) -> SensitivityResult:
    """Prune each layer alone (magnitude, per-layer target) on a copy of ``model`` at each
    sparsity and record ``eval_fn(copy)``. ``model`` itself is never modified. ``layers``: module
    names or patterns (default: every prunable layer). ``plot``: a PNG path to write."""
    if not sparsities:
        raise ValueError("sparsities must not be empty")
    refs = select_parameters(model, include=layers)
    baseline = float(eval_fn(copy.deepcopy(model)))
    scores: dict[str, tuple[float, ...]] = {}
    for ref in refs:
        vals = []
        for s in sparsities:
            trial = copy.deepcopy(model)
            prune(trial, "magnitude", sparsity=s, scope="layer", include=[ref.name])
            vals.append(float(eval_fn(trial)))
        scores[ref.name] = tuple(vals)
    result = SensitivityResult(tuple(float(s) for s in sparsities), baseline, scores)
    if plot:
        result.plot(plot)
    return result
