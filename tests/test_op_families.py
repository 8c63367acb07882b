"""Every native op has its whole family: schema, CPU kernel, CUDA source, fake, reference, typed
wrapper, tests and a benchmark (design.md, principle 1)."""

from __future__ import annotations

import inspect
import pathlib

import pytest
import torch

import fastprune  # noqa: F401
from fastprune import ops, reference

ROOT = pathlib.Path(__file__).resolve().parents[1]


def native_ops() -> list[str]:
    names = [n.split("::", 1)[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("fastprune::")]
    return sorted(set(names))


def test_some_ops_are_registered():
    assert "woodbury_inverse_fisher" in native_ops()


@pytest.mark.parametrize("name", native_ops())
def test_op_family_is_complete(name):
    qualname = f"fastprune::{name}"
    assert torch._C._dispatch_has_kernel_for_dispatch_key(qualname, "CPU"), f"{name}: no CPU kernel"
    entry = torch._library.simple_registry.singleton.find(qualname)
    assert entry.fake_impl.kernel is not None, f"{name}: no fake kernel (register_fake)"
    assert hasattr(reference, name), f"{name}: no fastprune.reference.{name}"
    assert hasattr(ops, name), f"{name}: no typed wrapper fastprune.ops.{name}"
    # the reference has the same parameters as the wrapper
    ref_params = list(inspect.signature(getattr(reference, name)).parameters)
    op_params = [p for p, v in inspect.signature(getattr(ops, name)).parameters.items() if v.kind != v.KEYWORD_ONLY]
    assert ref_params == op_params, f"{name}: reference {ref_params} vs wrapper {op_params}"
    cuda = [p for p in (ROOT / "csrc").rglob("*.cu") if f'm.impl("{name}"' in p.read_text()]
    assert cuda, f"{name}: no CUDA kernel registered in csrc/**/*.cu"
    tests = [p for p in (ROOT / "tests" / "ops").glob("test_*.py") if name in p.read_text()]
    assert tests, f"{name}: no test in tests/ops"
    benches = [p for p in (ROOT / "benchmarks").glob("bench_*.py") if name in p.read_text()]
    assert benches, f"{name}: no benchmark in benchmarks/"
