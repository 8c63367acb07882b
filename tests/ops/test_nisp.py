"""nisp_propagate against its plain-PyTorch reference (computed in float64), on every CPU path."""

from __future__ import annotations

import pytest
import torch

from fastprune import ops, reference

CASES = [
    # (weight shape, groups, m): Linear, 1x1 / 3x3 / 7x7 convs, odd sizes, grouped, depthwise, conv1d / 3d
    ((37, 53), 1, 1),
    ((64, 48, 1, 1), 1, 3),
    ((33, 17, 3, 3), 1, 1),
    ((16, 3, 7, 7), 1, 8),
    ((24, 5, 3, 3), 4, 2),
    ((32, 1, 3, 3), 32, 1),
    ((12, 7, 5), 1, 9),
    ((6, 4, 3, 3, 3), 2, 1000),
    ((1500, 700), 1, 1),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape, groups, m", CASES)
def test_matches_reference(isa, dtype, shape, groups, m):
    g = torch.Generator().manual_seed(sum(shape) + m)
    w = torch.randn(shape, generator=g, dtype=dtype)
    s = torch.rand(m, shape[0], generator=g, dtype=dtype)
    got = ops.nisp_propagate(w, s, groups)
    want = reference.nisp_propagate(w.double(), s.double(), groups)
    assert got.dtype == dtype and got.shape == (m, shape[1] * groups)
    tol = dict(rtol=1e-5, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(got.double(), want, **tol)
    one = ops.nisp_propagate(w, s[0], groups)  # a single vector: (in,)
    torch.testing.assert_close(one.double(), want[0], **tol)


def test_non_contiguous_and_empty(isa):
    w = torch.randn(20, 9, 3, 3).transpose(2, 3)  # non-contiguous weight
    s = torch.rand(6, 40)[:, ::2]  # non-contiguous scores
    torch.testing.assert_close(ops.nisp_propagate(w, s), reference.nisp_propagate(w, s), rtol=1e-5, atol=1e-5)
    assert ops.nisp_propagate(torch.randn(5, 4), torch.rand(0, 5)).shape == (0, 4)
    assert ops.nisp_propagate(torch.randn(0, 4), torch.rand(3, 0)).abs().sum() == 0
    assert ops.nisp_propagate(torch.randn(5, 0, 3), torch.rand(2, 5)).shape == (2, 0)


def test_scores_are_propagated_exactly_as_the_paper_writes_them():
    # s_in = |W|^T s_out, here by hand: one output of score 2, kernel taps summed
    w = torch.tensor([[[1.0, -2.0], [0.5, 0.0]], [[-1.0, 1.0], [3.0, -3.0]]])  # (out 2, in 2, taps 2)
    s = torch.tensor([2.0, 0.0])
    assert ops.nisp_propagate(w, s).tolist() == [6.0, 1.0]
    s = torch.tensor([1.0, 1.0])
    assert ops.nisp_propagate(w, s).tolist() == [5.0, 6.5]


def test_bad_inputs_name_the_argument():
    w = torch.randn(6, 4)
    with pytest.raises(ValueError, match="scores"):
        ops.nisp_propagate(w, torch.rand(3, 5))
    with pytest.raises(ValueError, match="groups"):
        ops.nisp_propagate(w, torch.rand(6), groups=4)
    with pytest.raises(TypeError, match="float32 or both float64"):
        ops.nisp_propagate(w, torch.rand(6).double())
    with pytest.raises(ValueError, match="scores"):  # the native checks, without the wrapper
        torch.ops.fastprune.nisp_propagate(w, torch.rand(3, 5), 1)
    with pytest.raises(ValueError, match="groups"):
        torch.ops.fastprune.nisp_propagate(w, torch.rand(6), 4)
    with pytest.raises(TypeError, match="same dtype"):
        torch.ops.fastprune.nisp_propagate(w, torch.rand(6).double(), 1)


def test_opcheck():
    for w, s, g in [
        (torch.randn(8, 5, 3, 3), torch.rand(2, 8), 1),
        (torch.randn(12, 3, 3, 3, dtype=torch.float64), torch.rand(12, dtype=torch.float64), 4),
        (torch.randn(9, 7), torch.rand(20, 9), 1),
    ]:
        torch.library.opcheck(torch.ops.fastprune.nisp_propagate, (w, s, g))


def test_compiles():
    fn = torch.compile(lambda w, s: ops.nisp_propagate(w, s) * 2, fullgraph=True, backend="aot_eager")
    w, s = torch.randn(8, 5, 3, 3), torch.rand(3, 8)
    torch.testing.assert_close(fn(w, s), 2 * reference.nisp_propagate(w, s), rtol=1e-5, atol=1e-5)
