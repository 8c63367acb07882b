"""Errors a user can act on (issue 14): short, naming the cause, raised before anything changes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fastprune
from fastprune import ops


@pytest.mark.parametrize("dtype", [torch.int64, torch.float16])
def test_example_inputs_that_do_not_fit_name_the_cause_first(dtype, capfd):
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3))
    x = torch.ones(1, 3, 8, 8, dtype=dtype)
    with pytest.raises(ValueError) as e:
        fastprune.prune(model, "l1_filter", sparsity=0.5, example_inputs=x)
    msg = str(e.value)
    # used to be 600 characters of FX internals before the cause
    assert len(msg) < 400 and f"{str(dtype).removeprefix('torch.')} tensor of shape (1, 3, 8, 8)" in msg
    assert "Input type" in msg and "ShapeProp" not in msg
    assert "Traceback" not in capfd.readouterr().err  # torch's ShapeProp printed one


def test_unpack_sparse_with_too_few_columns():
    rp, ci, v = ops.pack_sparse(torch.randn(4, 10))
    with pytest.raises(ValueError, match="holds column 9, but in_features = 5"):  # was an IndexError
        ops.unpack_sparse(rp, ci, v, 5)
    assert ops.unpack_sparse(rp, ci, v, 10).shape == (4, 10)


def test_sparsify_refuses_a_non_number():
    with pytest.raises(ValueError, match="min_sparsity must be in"):  # was float()'s message
        fastprune.sparsify(nn.Linear(4, 4), min_sparsity="x")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a CPU-only torch")
def test_fisher_inverse_on_an_unavailable_device():
    with pytest.raises(ValueError, match="device cuda is not available"):  # was accepted until update()
        fastprune.FisherInverse(10, 4, 1e-3, 10, device="cuda")
