import os

import pytest
import torch

import fastprune  # noqa: F401  (loads the extension)

ISAS = ["scalar", "avx2", "avx512", "avx512-jit"]


@pytest.fixture(params=ISAS)
def isa(request, monkeypatch):
    """Force each CPU vector path in turn (capped at what the CPU supports): avx512 runs the vector
    loops, avx512-jit the generated code of the sparse conv for every float32 conv (FASTPRUNE_JIT)."""
    monkeypatch.setenv("FASTPRUNE_ISA", request.param.removesuffix("-jit"))
    monkeypatch.setenv("FASTPRUNE_JIT", "always" if request.param.endswith("-jit") else "0")
    return request.param


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def pytest_report_header(config):
    return f"torch {torch.__version__}, threads {torch.get_num_threads()}, FASTPRUNE_ISA={os.environ.get('FASTPRUNE_ISA', '')}"
