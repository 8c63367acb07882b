"""Sparsity schedules: callables from a step (or epoch) index to a target sparsity in [0, 1).

* :func:`constant`: SFP's fixed rate, or one-shot pruning.
* :func:`linear`: a straight ramp.
* :func:`cubic`: Zhu & Gupta's gradual schedule (arXiv:1710.01878),
  ``s_t = s_f + (s_i - s_f) (1 - (t - t_0) / n)^3``; WoodFisher's gradual pruning uses it.
* :func:`asymptotic`: ASFP's exponential ramp (He et al., arXiv:1808.07471),
  ``P(t) = P (1 - e^{-k t}) / (1 - e^{-k E})`` with ``k`` chosen so that ``P(E / D) = 3/4 P``.

Each returns a frozen dataclass: printable, comparable, and JSON-friendly through
``dataclasses.asdict``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

__all__ = ["Schedule", "asymptotic", "constant", "cubic", "linear"]


def _check_sparsity(x: float, name: str) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x) or not 0.0 <= x < 1.0:
        raise ValueError(f"{name} must be a sparsity in [0, 1), got {x!r}")
    return float(x)


def _check_step(t: int | float) -> float:
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
        raise ValueError(f"step must be a finite number >= 0, got {t!r}")
    return float(t)


class Schedule:
    """Base class: ``schedule(step) -> sparsity``."""

    def __call__(self, step: int | float) -> float:  # pragma: no cover - abstract
        raise NotImplementedError


@dataclass(frozen=True)
class Constant(Schedule):
    sparsity: float

    def __post_init__(self) -> None:
        _check_sparsity(self.sparsity, "sparsity")

    def __call__(self, step: int | float) -> float:
        _check_step(step)
        return self.sparsity


@dataclass(frozen=True)
class _Ramp(Schedule):
    """From ``start`` at ``begin_step`` to ``end`` at ``end_step``, shaped by ``_shape``; flat outside."""

    start: float
    end: float
    begin_step: int
    end_step: int

    def __post_init__(self) -> None:
        _check_sparsity(self.start, "start sparsity")
        _check_sparsity(self.end, "end sparsity")
        if self.end < self.start:
            raise ValueError(f"end sparsity {self.end} < start sparsity {self.start}: schedules only grow")
        if self.end_step <= self.begin_step:
            raise ValueError(f"end_step ({self.end_step}) must be > begin_step ({self.begin_step})")

    @staticmethod
    def _shape(frac: float) -> float:  # pragma: no cover - overridden
        raise NotImplementedError

    def __call__(self, step: int | float) -> float:
        t = _check_step(step)
        frac = min(1.0, max(0.0, (t - self.begin_step) / (self.end_step - self.begin_step)))
        return self.start + (self.end - self.start) * self._shape(frac)


@dataclass(frozen=True)
class Linear(_Ramp):
    @staticmethod
    def _shape(frac: float) -> float:
        return frac


@dataclass(frozen=True)
class Cubic(_Ramp):
    """Zhu & Gupta: ``s_t = s_f + (s_i - s_f) (1 - frac)^3``."""

    @staticmethod
    def _shape(frac: float) -> float:
        return 1.0 - (1.0 - frac) ** 3


def _asfp_rate(d: float) -> float:
    """k * E such that (1 - e^{-kE/D}) / (1 - e^{-kE}) = 3/4 (bisection; exists only for D > 4/3)."""

    def ratio(ke: float) -> float:
        return -math.expm1(-ke / d) / -math.expm1(-ke)

    lo, hi = 1e-9, 1.0
    while ratio(hi) < 0.75:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if ratio(mid) < 0.75:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


@dataclass(frozen=True)
class Asymptotic(Schedule):
    final: float
    total_steps: int
    d: float = 8.0
    ke: float = field(init=False, repr=False)

    def __post_init__(self) -> None:
        _check_sparsity(self.final, "final")
        if isinstance(self.total_steps, bool) or not isinstance(self.total_steps, int) or self.total_steps < 1:
            raise ValueError(f"total_steps must be a positive int, got {self.total_steps!r}")
        if not isinstance(self.d, (int, float)) or not self.d > 4.0 / 3.0:
            raise ValueError(f"d must be > 4/3 (P(E/D) = 3/4 P has a positive rate only then), got {self.d!r}")
        object.__setattr__(self, "ke", _asfp_rate(float(self.d)))

    def __call__(self, step: int | float) -> float:
        t = min(_check_step(step), float(self.total_steps))
        k = self.ke / self.total_steps
        return self.final * -math.expm1(-k * t) / -math.expm1(-self.ke)


def constant(sparsity: float) -> Constant:
    """The same sparsity at every step."""
    return Constant(sparsity)


def linear(start: float, end: float, begin_step: int, end_step: int) -> Linear:
    """From ``start`` at ``begin_step`` to ``end`` at ``end_step``, straight; flat outside."""
    return Linear(start, end, begin_step, end_step)


def cubic(initial: float, final: float, begin_step: int, end_step: int) -> Cubic:
    """Zhu & Gupta (arXiv:1710.01878): fast early, slow near ``final``."""
    return Cubic(initial, final, begin_step, end_step)


def asymptotic(final: float, total_steps: int, d: float = 8.0) -> Asymptotic:
    """ASFP (arXiv:1808.07471): ``P(t) = P (1 - e^{-kt}) / (1 - e^{-kE})``, ``P(E/D) = 3/4 P``.

    Example: ``asymptotic(0.4, 100)(1) ~= 0.042``, ``(12.5) == 0.30``, ``(25) ~= 0.375``.
    """
    return Asymptotic(final, total_steps, d)
