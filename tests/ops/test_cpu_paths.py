"""The kernels report the CPU path each call took, so that forcing a path can be checked (the isa
fixture fails a test whose calls ran another path, and skips a path the CPU cannot run)."""

from __future__ import annotations

import pytest
import torch

from fastprune import ops


def _calls() -> None:
    w = torch.randn(16, 4, 3, 3)
    w[w.abs() < 0.8] = 0
    packed = ops.pack_sparse(w.flatten(1))
    ops.sparse_conv2d(torch.randn(1, 4, 12, 12), *packed, list(w.shape), None, 1, 1)
    ops.sparse_linear(torch.randn(3, 36), *packed, 36)
    ops.sparse_linear(torch.randn(3, 36, dtype=torch.float64), *ops.pack_sparse(w.flatten(1).double()), 36)
    finv = ops.woodbury_inverse_fisher(torch.randn(8, 20), 8, 1e-3)
    ops.woodbury_update_(finv, torch.randn(4, 20), 8)


@pytest.mark.parametrize("isa", ops.cpu.ISAS)
def test_forced_isa_is_the_one_that_ran(isa, monkeypatch):
    if isa not in ops.cpu_isas():
        pytest.skip(f"this CPU cannot run {isa}")
    monkeypatch.setenv("FASTPRUNE_ISA", isa)
    monkeypatch.setenv("FASTPRUNE_JIT", "0")
    ops.reset_kernel_counts()
    _calls()
    assert ops.kernel_counts() == {
        ("sparse_conv2d", isa): 1,
        ("sparse_linear", isa): 1,
        ("sparse_linear", "float64"): 1,
        ("woodbury_inverse_fisher", isa): 1,
        ("woodbury_update_", isa): 1,
    }
    assert ops.cpu.unexpected_paths(ops.kernel_counts(), isa) == {}


def test_generated_code_is_reported_apart_from_the_loops(monkeypatch):
    if not ops.jit_available():
        pytest.skip("no generated-code conv here")
    monkeypatch.setenv("FASTPRUNE_ISA", "avx512")
    monkeypatch.setenv("FASTPRUNE_JIT", "always")
    ops.reset_kernel_counts()
    _calls()
    ran = ops.kernel_counts()
    assert ran[("sparse_conv2d", "jit")] == 1 and ("sparse_conv2d", "avx512") not in ran
    assert ops.cpu.unexpected_paths(ran, "avx512", jit=True) == {}
    # the same calls judged against the vector loops: the conv is flagged
    assert ops.cpu.unexpected_paths(ran, "avx512") == {("sparse_conv2d", "jit"): 1}


def test_a_path_other_than_the_one_asked_for_is_caught(monkeypatch):
    # what the isa fixture checks after each test: here the calls run the CPU's best path while the
    # check asks for another one, as a CPU without AVX-512 would have done before the fixture skipped
    if len(ops.cpu_isas()) < 2:
        pytest.skip("one path only")
    monkeypatch.delenv("FASTPRUNE_ISA", raising=False)
    monkeypatch.setenv("FASTPRUNE_JIT", "0")
    ops.reset_kernel_counts()
    _calls()
    assert set(ops.cpu.unexpected_paths(ops.kernel_counts(), "scalar")) == {
        ("sparse_conv2d", ops.best_isa()),
        ("sparse_linear", ops.best_isa()),
        ("woodbury_inverse_fisher", ops.best_isa()),
        ("woodbury_update_", ops.best_isa()),
    }
    with pytest.raises(ValueError, match="isa must be one of"):
        ops.cpu.unexpected_paths({}, "sse2")


def test_cpu_paths_are_consistent():
    isas = ops.cpu_isas()
    assert isas[0] == "scalar" and isas[-1] == ops.best_isa()
    assert ops.jit_available() == (ops.best_isa() == "avx512" and bool(ops.cpu._C.jit_built()))
