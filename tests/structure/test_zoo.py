"""Structured pruning on the test zoo: compact == masked, reload, replay, jit.trace, counting."""

from __future__ import annotations

import copy
import importlib.util
import io

import pytest
import torch
from tests.structure import zoo

import fastprune

SPARSITIES = (0.3, 0.7)
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / a.abs().max().clamp_min(1e-30))


@pytest.mark.parametrize("name", list(zoo.ZOO))
@pytest.mark.parametrize("sparsity", SPARSITIES)
def test_compact_equals_masked(name: str, sparsity: float) -> None:
    model, x = zoo.build(name)
    masked, comp = copy.deepcopy(model), copy.deepcopy(model)
    fastprune.prune(masked, "l1_filter", sparsity=sparsity, example_inputs=x, mode="mask")
    plan = fastprune.prune(comp, "l1_filter", sparsity=sparsity, example_inputs=x)
    assert plan.groups and 0 < plan.achieved_sparsity <= sparsity + 1e-9
    # the classes and attribute names stay; only sizes change
    assert [type(m) for m in comp.modules()] == [type(m) for m in model.modules()]
    # a different batch size than the example inputs, and fresh values
    xb = torch.randn((x.shape[0] + 3, *x.shape[1:]), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        ref, dense, out = masked(xb), model(xb), comp(xb)
    assert out.shape == ref.shape
    assert _rel_diff(ref, out) <= 1e-5
    assert _rel_diff(dense, ref) > 1e-3  # pruning changed something (the test can fail)
    macs0, params0 = fastprune.count(model, x)
    macs1, params1 = fastprune.count(comp, x)
    assert macs1 < macs0 and params1 < params0
    assert params1 == sum(p.numel() for p in comp.parameters())


@pytest.mark.parametrize("name", ["resnet", "mobilenetv2", "densenet", "unet", "transformer"])
def test_save_load_replay_and_jit(name: str) -> None:
    model, x = zoo.build(name)
    comp = copy.deepcopy(model)
    plan = fastprune.prune(comp, "l2_filter", sparsity=0.5, example_inputs=x)
    with torch.no_grad():
        want = comp(x)
    # state_dict -> fresh unpruned model
    buf = io.BytesIO()
    torch.save(comp.state_dict(), buf)
    buf.seek(0)
    fresh, _ = zoo.build(name, seed=5)
    fastprune.load_pruned(fresh, torch.load(buf, weights_only=True))
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), want)
    # a saved plan replayed onto the original weights gives the same model
    replay = copy.deepcopy(model)
    fastprune.Plan.from_json(plan.to_json()).apply(replay)
    with torch.no_grad():
        torch.testing.assert_close(replay(x), want, rtol=0, atol=1e-6)
    # TorchScript tracing of the compact model
    traced = torch.jit.trace(comp, x, check_trace=False)
    with torch.no_grad():
        torch.testing.assert_close(traced(x), want, rtol=1e-6, atol=1e-6)


@pytest.mark.skipif(
    importlib.util.find_spec("onnx") is None or importlib.util.find_spec("onnxruntime") is None,
    reason="onnx and onnxruntime not installed",
)
def test_onnx_export(tmp_path) -> None:  # pragma: no cover - optional dependency
    import onnxruntime as ort

    model, x = zoo.build("resnet")
    fastprune.prune(model, "l1_filter", sparsity=0.5, example_inputs=x)
    path = tmp_path / "m.onnx"
    torch.onnx.export(model, (x,), str(path), dynamo=False)
    sess = ort.InferenceSession(str(path))
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(got), model(x), rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="transformers not installed")
@pytest.mark.parametrize("sparsity", SPARSITIES)
def test_bert_heads_and_ffn(sparsity: float) -> None:
    from transformers import BertConfig, BertModel

    cfg = BertConfig(
        vocab_size=100,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=32,
    )
    torch.manual_seed(0)

    class LastHidden(torch.nn.Module):  # a training-mode wrapper around an eval BERT: modes must survive
        def __init__(self) -> None:
            super().__init__()
            self.bert = BertModel(cfg).eval()

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.bert(input_ids=ids).last_hidden_state

    model = LastHidden()
    ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(1))
    groups = fastprune.find_groups(model, ids)
    heads = [g for g in groups if any(m.module.endswith("attention.self.query") for m in g.producers)]
    ffn = [g for g in groups if any(m.module.endswith("intermediate.dense") for m in g.producers)]
    assert len(heads) == 2 and all(g.channels == 4 for g in heads) and len(ffn) == 2
    masked, comp = copy.deepcopy(model), copy.deepcopy(model)
    fastprune.prune(masked, "l1_filter", sparsity=sparsity, example_inputs=ids, mode="mask")
    fastprune.prune(comp, "l1_filter", sparsity=sparsity, example_inputs=ids)
    assert comp.training and not comp.bert.training  # per-module training flags kept
    att = comp.bert.encoder.layer[0].attention.self
    kept = 4 - int(sparsity * 4)
    assert att.num_attention_heads == kept and att.all_head_size == kept * 16
    ids2 = torch.randint(0, 100, (3, 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref, out = masked(ids2), comp(ids2)
    assert _rel_diff(ref, out) <= 1e-5
    fresh = LastHidden()
    fastprune.load_pruned(fresh, comp.state_dict())
    assert fresh.bert.encoder.layer[0].attention.self.num_attention_heads == kept
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids2), out)
