"""The built extension: its parallel loops really run in parallel, under torch's OpenMP runtime."""

from __future__ import annotations

import pathlib
import shutil
import subprocess

import pytest
import torch

import fastprune  # noqa: F401  (loads the extension)
from fastprune import ops


def test_extension_links_openmp_and_shares_torchs_runtime():
    # at::parallel_for is an inline OpenMP loop in torch's headers: an extension built without
    # -fopenmp runs it serially. Built with it, its libgomp.so.1 must be the copy torch loaded (one
    # runtime: torch.set_num_threads then governs fastprune's loops too).
    import fastprune._C as ext

    if shutil.which("ldd") is None:
        pytest.skip("no ldd")
    needed = subprocess.run(["ldd", ext.__file__], capture_output=True, text=True).stdout
    assert "libgomp" in needed, needed
    w = torch.randn(8, 4, 3, 3)
    ops.sparse_conv2d(torch.randn(1, 4, 9, 9), *ops.pack_sparse(w.flatten(1)), list(w.shape), None, 1, 1)
    # (by soname: packages that vendor a renamed copy, like scikit-learn's libgomp-<hash>, are apart)
    with open("/proc/self/maps") as f:
        runtimes = {line.split()[-1] for line in f if "/libgomp.so" in line}
    assert len(runtimes) == 1, runtimes


def test_cuda_check_fails_under_ci_when_nvcc_is_missing(tmp_path):
    # make test runs tools/cuda_check.sh; a check that exits 0 without its compiler proves nothing in CI
    root = pathlib.Path(__file__).resolve().parents[1]
    bash = shutil.which("bash")
    env = {"PATH": str(tmp_path), "HOME": str(tmp_path)}  # an empty PATH: no nvcc
    ci = subprocess.run(
        [bash, str(root / "tools" / "cuda_check.sh")], env={**env, "CI": "true"}, capture_output=True, text=True
    )
    assert ci.returncode == 1 and "FAILED" in ci.stdout, ci.stdout + ci.stderr
    local = subprocess.run([bash, str(root / "tools" / "cuda_check.sh")], env=env, capture_output=True, text=True)
    assert local.returncode == 0 and "skipped" in local.stdout, local.stdout + local.stderr


def test_torch_version_matches_the_build():
    import fastprune._C as ext
    from fastprune import _loader

    built = tuple(ext.torch_version())
    assert built[:2] == tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2])
    _loader.check_torch_version(built, f"{built[0]}.{built[1]}.7+cpu")  # another patch release loads
    with pytest.raises(ImportError, match="built against torch"):
        _loader.check_torch_version(built, f"{built[0]}.{built[1] + 1}.0")
