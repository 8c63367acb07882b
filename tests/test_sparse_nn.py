"""Sparse modules (SparseLinear, SparseConv2d) and sparsify(): equal to the dense masked model."""

from __future__ import annotations

import copy
import importlib
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


def test_sparsify_says_why_each_layer_was_or_was_not_swapped():
    from fastprune.nn import sparsify_decisions

    model, x = zoo.build("resnet")
    fastprune.prune(model, "magnitude", sparsity=0.9, scope="layer", exclude="fc")
    sp = sparsify(model, min_sparsity=0.5)
    dec = {d.name: d for d in sparsify_decisions(sp)}
    convs = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert set(dec) == set(convs)
    assert {d.name for d in dec.values() if d.swapped} == {n for n, *_ in sparsify_report(sp)}
    assert not dec["fc"].swapped and "< min_sparsity 0.500" in dec["fc"].reason
    swapped = next(d for d in dec.values() if d.swapped)
    assert ">= min_sparsity" in swapped.reason and swapped.dense_ms is None
    calibrated = sparsify_decisions(sparsify(model, example_inputs=x))
    timed = [d for d in calibrated if d.dense_ms is not None]
    assert timed and all(d.sparse_ms is not None and "ms dense" in d.reason for d in timed)
    with pytest.raises(ValueError, match="did not come out of fastprune.sparsify"):
        sparsify_decisions(model)


def test_calibration_margin_rounds_and_table_fallback():
    # a fake clock: each call of a timed function advances it by that function's cost
    mod = importlib.import_module("fastprune.nn.sparsify")  # (the package re-exports the function under that name)
    now = [0.0]
    costs = {"s": 1.0, "d": 1.0}
    calls = {"s": 0, "d": 0}

    def clock():
        return now[0]

    def run(which):
        def f():
            calls[which] += 1
            now[0] += costs[which]

        return f

    def decide(s, d, table):
        costs.update(s=s, d=d)
        calls.update(s=0, d=0)
        return mod._calibrate(run("s"), run("d"), table, clock)

    swap, reason, *_ = decide(0.5, 1.0, False)
    assert swap and reason.startswith("timed faster") and calls["s"] == 1 + mod.CALIBRATION_ROUNDS[0]
    swap, reason, *_ = decide(1.2, 1.0, True)
    assert not swap and reason.startswith("timed slower")
    # within the margin: all the rounds, then the table decides (either way)
    for table in (True, False):
        swap, reason, *_ = decide(0.95, 1.0, table)
        assert swap is table and "by the sparsity table" in reason
        assert calls["s"] == 1 + mod.CALIBRATION_ROUNDS[1]


@pytest.mark.parametrize("swap_first", [False, True])
@pytest.mark.parametrize("norm_first", [False, True])
def test_sparsify_torch_transformer_encoder(swap_first, norm_first):
    # torch's TransformerEncoder in eval mode takes a fused fast path that reads every projection's
    # weight (and needs nn.MultiheadAttention): sparsify turns it off where it swapped a layer, keeps
    # nn.MultiheadAttention's out_proj dense (it reads out_proj.weight itself) unless swap_attention
    # made the projections Linears, and the model computes what it computed
    from fastprune.nn import MultiheadSelfAttention, swap_attention

    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, 64, batch_first=True, dropout=0.0, norm_first=norm_first)
    enc = nn.TransformerEncoder(layer, 2).eval()
    x = torch.randn(3, 7, 32)
    if swap_first:
        with torch.no_grad():
            fast = enc(x)  # torch's fused fast path
            swap_attention(enc)
            torch.testing.assert_close(enc(x), fast, rtol=1e-5, atol=1e-5)  # the same function, unfused
        assert isinstance(enc.layers[0].self_attn, MultiheadSelfAttention)
    fastprune.prune(enc, "magnitude", sparsity=0.9, scope="layer")
    fastprune.finalize(enc)
    pad = torch.zeros(3, 7, dtype=torch.bool)
    pad[0, 5:] = True
    with torch.no_grad():
        want, want_pad = enc(x), enc(x, src_key_padding_mask=pad)
        sp = sparsify(enc, min_sparsity=0.5, example_inputs=(x,))
        torch.testing.assert_close(sp(x), want, rtol=1e-4, atol=1e-5)
        got_pad = sp(x, src_key_padding_mask=pad)
        torch.testing.assert_close(got_pad[1:], want_pad[1:], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(got_pad[0, :5], want_pad[0, :5], rtol=1e-4, atol=1e-5)
    dec = {d.name: d for d in fastprune.sparsify_decisions(sp)}
    assert dec["layers.0.linear1"].swapped and dec["layers.1.linear2"].swapped
    if swap_first:
        assert dec["layers.0.self_attn.q_proj"].swapped and dec["layers.0.self_attn.out_proj"].swapped
        # the attention itself: fastprune's op (untimed with min_sparsity), the same outputs above
        assert sp.fused_attention.startswith("fastprune's attention")
        assert all(m.fastprune_attention for m in sp.modules() if isinstance(m, MultiheadSelfAttention))
        assert not enc.layers[0].self_attn.fastprune_attention
    else:
        assert sp.fused_attention == ""
        assert not dec["layers.0.self_attn.out_proj"].swapped
        assert "reads out_proj.weight" in dec["layers.0.self_attn.out_proj"].reason
    assert isinstance(enc.layers[0].linear1, nn.Linear)  # the user's model is untouched
