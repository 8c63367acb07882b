"""Shared benchmark plumbing: fair allocator settings, timing, peak memory, machine info, output.

Every benchmark compares ratios measured in one run; absolute times on this VM are noisy.
"""

from __future__ import annotations

import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

RESULTS = pathlib.Path(__file__).resolve().parent / "results"

# glibc's default malloc returns big buffers to the OS after every op, and torch convolutions and
# GEMMs then run 10-30x slower on this VM. Dense baselines are only fair with these set.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "33554432", "MALLOC_TRIM_THRESHOLD_": "4294967296"}


def ensure_malloc_env() -> None:
    """Re-exec the current script with the glibc malloc settings if they are missing.

    glibc reads them at process start, so setting them later has no effect. Call this first.
    """
    if all(os.environ.get(k) == v for k, v in MALLOC_ENV.items()):
        return
    env = dict(os.environ, **MALLOC_ENV)
    os.execve(sys.executable, [sys.executable, *sys.argv], env)


def git_sha() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=pathlib.Path(__file__).parent,
        )
        # (the results files a previous run rewrote do not make the code dirty)
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", ":/", ":(top,exclude)benchmarks/results"],
            capture_output=True,
            text=True,
            cwd=pathlib.Path(__file__).parent,
        ).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def cpu_name() -> str:
    """The model name, with the family / model numbers and the widest vector ISA (VMs often name
    every AMD part "AMD EPYC": family 23 model 1 is Zen 1, family 26 is Zen 5)."""
    fields: dict[str, str] = {}
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    name = fields.get("model name") or platform.processor() or "unknown"
    flags = fields.get("flags", "").split()
    isa = "avx512" if "avx512f" in flags else "avx2" if "avx2" in flags else ""
    extra = [f"family {fields['cpu family']} model {fields['model']}"] if "cpu family" in fields else []
    return f"{name} ({', '.join(extra + ([isa] if isa else []))})" if extra or isa else name


def machine_info(threads: int) -> dict[str, Any]:
    import torch

    import fastprune  # noqa: F401

    return {
        "torch": torch.__version__,
        "cpu": cpu_name(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": threads,
        "git_sha": git_sha(),
        "malloc_env": {k: os.environ.get(k) for k in MALLOC_ENV},
        "fastprune_isa": os.environ.get("FASTPRUNE_ISA", "auto"),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def time_it(fn: Callable[[], Any], min_run_time: float = 1.0) -> float:
    """Median seconds per call, torch.utils.benchmark's blocked_autorange."""
    import torch
    from torch.utils import benchmark

    # (Timer runs with 1 thread unless told: time with the threads the caller set)
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return float(timer.blocked_autorange(min_run_time=min_run_time).median)


def time_interleaved(fns: Sequence[Callable[[], Any]], min_run_time: float = 1.0, rounds: int = 3) -> list[float]:
    """Median seconds per call of each of ``fns``, measured in ``rounds`` alternating rounds of
    ``min_run_time / rounds`` each: on a shared VM whose speed drifts over seconds, the functions
    compared see the same conditions, so their ratio holds better than with back-to-back runs."""
    per = [[] for _ in fns]
    for _ in range(rounds):
        for i, fn in enumerate(fns):
            per[i].append(time_it(fn, min_run_time / rounds))
    return [statistics.median(p) for p in per]


def _rss_kib(field: str) -> int:
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _malloc_trim() -> None:
    """Hand freed heap memory back to the OS, so that RSS counts live data only (glibc)."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if name:
        try:
            ctypes.CDLL(name).malloc_trim(0)
        except (OSError, AttributeError):
            pass


def peak_extra_bytes(fn: Callable[[], Any]) -> int | None:
    """Peak resident memory above the current level while fn() runs (Linux; None elsewhere).

    Trims glibc's heap, resets the kernel's high-water mark (/proc/self/clear_refs, "5"), runs fn
    once, and reads VmHWM. What fn returns is kept alive until after the reading, so outputs count.
    """
    try:
        _malloc_trim()
        pathlib.Path("/proc/self/clear_refs").write_text("5")
        before = _rss_kib("VmRSS")
        out = fn()
        peak = _rss_kib("VmHWM")
        del out
        return max(0, (peak - before) * 1024)
    except (OSError, RuntimeError):
        return None


def gemm_rates(threads: int) -> dict[str, float]:
    """This machine's float32 and float64 GEMM rates (GFLOP/s, 2048^3, torch.mm = MKL/oneDNN)."""
    import torch

    torch.set_num_threads(threads)
    rates = {}
    for name, dtype in (("sgemm", torch.float32), ("dgemm", torch.float64)):
        a = torch.randn(2048, 2048, dtype=dtype)
        t = time_it(lambda a=a: a @ a, min_run_time=1.0)
        rates[name] = 2 * 2048**3 / t / 1e9
    return rates


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def write_results(name: str, payload: dict[str, Any], table_md: str) -> tuple[pathlib.Path, pathlib.Path]:
    RESULTS.mkdir(parents=True, exist_ok=True)
    jpath = RESULTS / f"{name}.json"
    mpath = RESULTS / f"{name}.md"
    jpath.write_text(json.dumps(payload, indent=2) + "\n")
    info = payload.get("machine", {})
    header = (
        f"torch {info.get('torch')}, {info.get('cpu')}, {info.get('threads')} threads, "
        f"git {info.get('git_sha')}, {info.get('date')}\n\n"
    )
    mpath.write_text(f"# {name}\n\n{header}{table_md}\n")
    return jpath, mpath
