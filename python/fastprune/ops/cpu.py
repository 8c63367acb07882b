"""Which CPU code paths this machine has, and which ones the kernels ran.

Every CPU kernel is compiled per vector ISA (scalar, AVX2, AVX-512) and picks the best one the
CPU supports at run time, capped by ``FASTPRUNE_ISA``; float32 sparse convs may run generated
AVX-512 code instead (``FASTPRUNE_JIT``). :func:`kernel_counts` counts, per (op, path), the calls
since :func:`reset_kernel_counts`, so a test (or a benchmark) can check that the path it asked for
is the one that ran rather than trusting the environment variable.
"""

from __future__ import annotations

import fastprune._C as _C

__all__ = [
    "ISAS",
    "best_isa",
    "cpu_isas",
    "derived_computed",
    "jit_available",
    "kernel_counts",
    "reset_kernel_counts",
    "unexpected_paths",
]

ISAS = ("scalar", "avx2", "avx512")  # worst to best


def best_isa() -> str:
    """The best vector ISA this CPU runs (``FASTPRUNE_ISA`` ignored)."""
    return str(_C.best_isa())


def cpu_isas() -> tuple[str, ...]:
    """Every ISA path this CPU can run, worst to best."""
    return ISAS[: ISAS.index(best_isa()) + 1]


def jit_available() -> bool:
    """Whether the sparse conv's generated AVX-512 code can run here (built for this platform and
    the CPU has AVX-512)."""
    return bool(_C.jit_built()) and best_isa() == "avx512"


def kernel_counts() -> dict[tuple[str, str], int]:
    """``{(op, path): calls}`` since the last :func:`reset_kernel_counts`; ``path`` is ``"scalar"``,
    ``"avx2"``, ``"avx512"`` (the loops of that ISA), ``"jit"`` (generated conv code) or
    ``"float64"`` (the portable float64 loops, the same on every CPU)."""
    return dict(_C.kernel_counts())


def derived_computed() -> int:
    """How many times the CPU sparse kernels derived their per-nonzero data (tap offsets, row runs)
    from a packed weight rather than finding it cached (per weight and input geometry; the cache
    keeps an entry as long as its weight lives, up to 16 geometries per weight)."""
    return int(_C.derived_computed())


def reset_kernel_counts() -> None:
    _C.reset_kernel_counts()


def unexpected_paths(counts: dict[tuple[str, str], int], isa: str, jit: bool = False) -> dict[tuple[str, str], int]:
    """The entries of ``counts`` that did not run ``isa`` (or, with ``jit``, generated code for the
    sparse conv); float64 calls, which have no ISA choice, are never unexpected."""
    if isa not in ISAS:
        raise ValueError(f"isa must be one of {ISAS}, got {isa!r}")

    def expected(op: str) -> str:
        return "jit" if jit and op.startswith(("sparse_conv2d", "sparse_bottleneck")) else isa

    return {k: n for k, n in counts.items() if k[1] != "float64" and k[1] != expected(k[0])}
