import os

import pytest
import torch

import fastprune  # noqa: F401  (loads the extension)
from fastprune import ops

ISAS = ["scalar", "avx2", "avx512", "avx512-jit"]


@pytest.fixture(params=ISAS)
def isa(request, monkeypatch):
    """Force each CPU path in turn: avx512 runs the vector loops, avx512-jit the generated code of the
    sparse conv for every float32 conv (FASTPRUNE_JIT). A path this CPU cannot run is skipped, not
    silently replaced by another; after the test, every call that had a choice of path must have run
    the one asked for (the kernels count the paths they take: fastprune.ops.kernel_counts)."""
    want = request.param.removesuffix("-jit")
    jit = request.param.endswith("-jit")
    if want not in ops.cpu_isas():
        pytest.skip(f"this CPU cannot run the {want} kernels (best: {ops.best_isa()})")
    if jit and not ops.jit_available():
        pytest.skip("no generated-code conv on this platform")
    monkeypatch.setenv("FASTPRUNE_ISA", want)
    monkeypatch.setenv("FASTPRUNE_JIT", "always" if jit else "0")
    ops.reset_kernel_counts()
    yield request.param
    wrong = ops.cpu.unexpected_paths(ops.kernel_counts(), want, jit)
    assert not wrong, f"asked for {request.param}, but these kernel calls ran other paths: {wrong}"


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)  # a test that changes the thread count does not change the next ones'


def pytest_report_header(config):
    return (
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
        f"FASTPRUNE_ISA={os.environ.get('FASTPRUNE_ISA', '')}, CPU paths {', '.join(ops.cpu_isas())}"
        f"{' + jit' if ops.jit_available() else ''}"
    )
