"""Sparse modules (SparseLinear, SparseConv2d) and sparsify(): equal to the dense masked model."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from tests.structure import zoo
from torch import nn

import fastprune
from fastprune.nn import SparseConv2d, SparseLinear, sparsify, sparsify_report


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def test_sparse_linear_from_masked_dense_and_state_dict_round_trip():
    torch.manual_seed(0)
    lin = nn.Linear(30, 17)
    fastprune.prune(lin, "magnitude", sparsity=0.8)
    x = torch.randn(5, 30)
    sp = SparseLinear.from_dense(lin)
    with torch.no_grad():
        torch.testing.assert_close(sp(x), lin(x), rtol=1e-5, atol=1e-5)
    assert sp.nnz == int((lin.weight != 0).sum()) and not list(sp.parameters())
    # a checkpoint with another number of nonzeros loads into a fresh module
    other = SparseLinear.from_dense(nn.Linear(30, 17))
    buf = io.BytesIO()
    torch.save(sp.state_dict(), buf)
    buf.seek(0)
    other.load_state_dict(torch.load(buf, weights_only=True))
    torch.testing.assert_close(other(x), sp(x))
    with torch.no_grad():
        torch.testing.assert_close(other.to_dense()(x), sp(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "conf", [dict(stride=1, padding=1), dict(stride=2, padding=2, dilation=2), dict(stride=1, padding=1, groups=6)]
)
def test_sparse_conv2d_module(conf):
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 12, 3, **conf)
    fastprune.prune(conv, "magnitude", sparsity=0.7)
    x = torch.randn(2, 6, 11, 9, requires_grad=True)
    sp = SparseConv2d.from_dense(conv)
    y = sp(x)
    torch.testing.assert_close(y, conv(x), rtol=1e-5, atol=1e-5)
    y.sum().backward()  # the input gradient flows
    g_sparse = x.grad.clone()
    x.grad = None
    conv(x).sum().backward()
    torch.testing.assert_close(g_sparse, x.grad, rtol=1e-5, atol=1e-5)
    compiled = torch.compile(sp, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x.detach()), sp(x.detach()))


def test_sparse_modules_bad_input():
    with pytest.raises(ValueError, match="NaN"):
        SparseLinear.from_dense(nn.Linear(3, 2).requires_grad_(False).apply(lambda m: m.weight.fill_(float("nan"))))
    with pytest.raises(ValueError, match="zero padding"):
        SparseConv2d.from_dense(nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect"))
    sp = SparseLinear.from_dense(nn.Linear(8, 4))
    with pytest.raises(ValueError, match="in_features"):
        sp(torch.randn(2, 9))
    spc = SparseConv2d.from_dense(nn.Conv2d(3, 4, 3))
    with pytest.raises(ValueError, match="channels"):
        spc(torch.randn(1, 5, 8, 8))


@pytest.mark.parametrize("name", ["resnet", "mobilenetv2", "densenet", "unet", "mlp", "squeeze_excite"])
def test_sparsify_equals_dense_masked_model(name):
    model, x = zoo.build(name)
    fastprune.prune(model, "magnitude", sparsity=0.85, scope="layer")
    before = copy.deepcopy(model.state_dict())
    with torch.no_grad():
        ref = model(x)
    sparse = sparsify(model, min_sparsity=0.5)
    assert sparsify_report(sparse), "nothing was swapped"
    assert not any(isinstance(m, nn.BatchNorm2d) for m in sparse.modules()) or name in ("densenet",)
    with torch.no_grad():
        got = sparse(x)
    assert _rel(got, ref) <= 1e-4
    after = model.state_dict()  # the original is untouched (inplace=False)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_sparsify_min_sparsity_threshold_and_calibration():
    model, x = zoo.build("resnet")
    fastprune.prune(model, "magnitude", sparsity=0.9, scope="layer", exclude="fc")
    none = sparsify(model, min_sparsity=0.95)
    assert not sparsify_report(none)
    calibrated = sparsify(model, example_inputs=x)  # which layers swap depends on timing; the function must not
    with torch.no_grad():
        assert _rel(calibrated(x), model(x)) <= 1e-4
    with pytest.raises(ValueError, match="min_sparsity"):
        sparsify(model, min_sparsity=1.5)
