"""Real HuggingFace architectures built from their configs (random weights, nothing downloaded), fed
dict batches as their loaders yield them: magnitude, WoodFisher with both Fisher kinds (vmap refuses
these models: the per-gradient fallback runs), and structured head / FFN pruning."""

from __future__ import annotations

import copy
import logging

import pytest
import torch

import fastprune

transformers = pytest.importorskip("transformers")


def bert():
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=60,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=32,
        num_labels=3,
    )
    return transformers.BertForSequenceClassification(cfg).eval()


def gpt2():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        vocab_size=60, n_positions=32, n_embd=32, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0
    )
    return transformers.GPT2LMHeadModel(cfg).eval()


def batches(labels: str, n=4):
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 60, (4, 12), generator=g)
        mask = torch.ones(4, 12, dtype=torch.long)
        mask[0, 9:] = 0  # padding: BERT's mask path is what vmap refuses
        lab = torch.randint(0, 3, (4,), generator=g) if labels == "class" else ids
        out.append({"input_ids": ids, "attention_mask": mask, "labels": lab})
    return out


def logits(model, data):
    with torch.no_grad():
        return torch.cat([model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits for b in data])


@pytest.mark.parametrize("factory, labels", [(bert, "class"), (gpt2, "tokens")])
def test_magnitude_and_woodfisher_on_dict_batches(factory, labels, caplog):
    model = factory()
    data = batches(labels)
    include = "bert.encoder" if factory is bert else "transformer.h"
    # GPT-2's loss shifts its labels: the forward hook hands the batch to the model's own loss.
    # damp 1e-9: these random-weight models' mean Fisher diagonal is ~1e-8 (at the default 1e-5 the
    # Fisher carries no information, and fastprune warns so)
    hook = {} if factory is bert else {"forward": lambda m, b: m(**b).loss}
    mag = copy.deepcopy(model)
    plan = fastprune.prune(mag, "magnitude", sparsity=0.5, include=include, scope="layer")
    assert plan.masks and all(k.startswith(include) and k.endswith("weight") for k in plan.masks)
    results = {}
    kinds = ["empirical", "sampled"] if factory is bert else ["empirical"]
    for kind in kinds:
        m = copy.deepcopy(model)
        with caplog.at_level(logging.WARNING, logger="fastprune"):
            p = fastprune.prune(
                m,
                "woodfisher",
                sparsity=0.5,
                data=data,
                include=include,
                scope="layer",
                num_grads=16,
                block_size=32,
                damp=1e-9,
                fisher=kind,
                progress=False,
                **hook,
            )
        assert p.achieved_sparsity == pytest.approx(fastprune.sparsity_report(m).sparsity, abs=0.2)
        assert torch.isfinite(logits(m, data)).all()
        results[kind] = p
    assert any("vmap cannot take per-sample gradients" in r.message for r in caplog.records)

    # the second-order masks are not magnitude's (at random init BERT's query / key gradients are
    # ~1e-13: attention is near uniform, so those layers' masks may match magnitude's)
    def differ(p, q):
        return sum(not torch.equal(p.masks[k], q.masks[k]) for k in q.masks)

    assert differ(results["empirical"], plan) >= len(plan.masks) // 2
    if "sampled" in results:
        assert differ(results["sampled"], results["empirical"]) >= len(plan.masks) // 2


def test_bert_heads_and_ffn_are_removed_for_real():
    model = bert()
    data = batches("class", n=1)
    ids = data[0]["input_ids"]
    masked, comp = copy.deepcopy(model), copy.deepcopy(model)
    fastprune.prune(masked, "l1_filter", sparsity=0.5, example_inputs=(ids,), mode="mask")
    plan = fastprune.prune(comp, "l1_filter", sparsity=0.5, example_inputs=(ids,))
    att = comp.bert.encoder.layer[0].attention.self
    assert att.num_attention_heads == 2 and comp.bert.encoder.layer[0].intermediate.dense.out_features == 32
    assert plan.achieved_sparsity == pytest.approx(0.5)
    with torch.no_grad():
        torch.testing.assert_close(comp(ids).logits, masked(ids).logits, rtol=1e-5, atol=1e-6)


def test_sparsified_bert_compiles_whole_with_inductor():
    # the documented path for HuggingFace models: sparsify swaps the Linear layers (no FX trace
    # needed; FX fusion does not apply), and torch.compile takes the whole model in one graph
    # (the sparse ops are custom ops with fake kernels), inductor fusing the dense remainder
    from torch._dynamo.utils import counters

    from fastprune.nn import sparsify_decisions

    model = bert()
    fastprune.prune(model, "magnitude", sparsity=0.9, include="bert.encoder", scope="layer")
    data = batches("class", n=1)[0]
    sp = fastprune.sparsify(model, min_sparsity=0.5)
    swapped = [d for d in sparsify_decisions(sp) if d.swapped]
    assert len(swapped) == 12 and all(d.name.startswith("bert.encoder") for d in swapped)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(sp, fullgraph=True)  # inductor; fullgraph: a graph break is an error
    kw = {"input_ids": data["input_ids"], "attention_mask": data["attention_mask"]}
    with torch.no_grad():
        got, want, dense = compiled(**kw).logits, sp(**kw).logits, model(**kw).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got, dense, rtol=1e-4, atol=1e-5)
    assert counters["inductor"]["fxgraph_cache_miss"] + counters["inductor"]["fxgraph_cache_hit"] >= 1


def test_sparsified_bert_runs_each_feed_forward_block_as_one_call():
    # with example inputs, each layer's intermediate.dense -> GELU -> output.dense (both sparse)
    # becomes one sparse_ffn call; same outputs, same state-dict names, and torch.compile still
    # takes the whole model
    from fastprune import ops
    from fastprune.nn import SparseFFNOutput
    from fastprune.nn.fuse import PassThrough

    model = bert()
    fastprune.prune(model, "magnitude", sparsity=0.9, include="bert.encoder", scope="layer")
    g = torch.Generator().manual_seed(2)
    ids, mask = torch.randint(0, 60, (3, 30), generator=g), torch.ones(3, 30, dtype=torch.long)
    mask[0, 20:] = 0
    args = (ids, mask)
    sp = fastprune.sparsify(model, min_sparsity=0.5, example_inputs=args)
    plain = fastprune.sparsify(model, min_sparsity=0.5, example_inputs=args, fuse=False)
    assert sp.fused_ffn == ["bert.encoder.layer.0", "bert.encoder.layer.1"] and plain.fused_ffn == []
    layer = sp.bert.encoder.layer[0]
    assert isinstance(layer.intermediate, PassThrough) and isinstance(layer.output.dense, SparseFFNOutput)
    assert layer.output.dense.up is layer.intermediate.dense
    assert list(sp.state_dict()) == list(plain.state_dict())
    ops.reset_kernel_counts()
    with torch.no_grad():
        got, want, dense = sp(*args).logits, plain(*args).logits, model(*args).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got, dense, rtol=1e-4, atol=1e-5)
    if ops.best_isa() in ("avx2", "avx512"):  # 90 rows: at least one full block of samples
        assert any(k[0] == "sparse_ffn_blocked" for k in ops.kernel_counts())
    again = fastprune.sparsify(model, min_sparsity=0.5, example_inputs=args)
    again.load_state_dict(sp.state_dict())
    torch._dynamo.reset()
    compiled = torch.compile(sp, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(*args).logits, got, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(again(*args).logits, got)


@pytest.mark.parametrize("factory", [bert, gpt2])
def test_sparsified_hf_models_run_attention_through_fastprune(factory):
    # with example inputs, a HuggingFace model on torch's SDPA calls fastprune's attention op
    # (registered with HuggingFace's AttentionInterface); same outputs, padding and causal masks
    # included; the user's model keeps its SDPA; fuse=False leaves it
    from fastprune import ops
    from fastprune.nn.fuse import HF_ATTENTION, use_fastprune_attention

    class Positional(torch.nn.Module):  # a user's wrapper: (ids, mask) -> logits
        def __init__(self, hf):
            super().__init__()
            self.hf = hf

        def forward(self, ids, mask=None):
            return self.hf(input_ids=ids, attention_mask=mask).logits

    model = Positional(factory())
    include = "hf.bert.encoder" if factory is bert else "hf.transformer.h"
    fastprune.prune(model, "magnitude", sparsity=0.9, include=include, scope="layer")
    g = torch.Generator().manual_seed(3)
    ids, mask = torch.randint(0, 60, (3, 20), generator=g), torch.ones(3, 20, dtype=torch.long)
    mask[0, 13:] = 0
    args = (ids, mask)
    sp = fastprune.sparsify(model, min_sparsity=0.5, example_inputs=args)
    timed = fastprune.sparsify(model, example_inputs=args)
    plain = fastprune.sparsify(model, min_sparsity=0.5, example_inputs=args, fuse=False)
    assert sp.fused_attention == "fastprune's attention: untimed (min_sparsity given)"
    assert "timed" in timed.fused_attention and plain.fused_attention == ""
    assert sp.hf.config._attn_implementation == HF_ATTENTION
    assert model.hf.config._attn_implementation == "sdpa" and plain.hf.config._attn_implementation == "sdpa"
    ops.reset_kernel_counts()
    with torch.no_grad():
        got, want = sp(*args), model(*args)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
        calls = sum(n for (op, _), n in ops.kernel_counts().items() if op == "scaled_dot_product_attention")
        assert calls == 2  # one per layer
        # GPT-2 without a padding mask is causal with no mask: HuggingFace's SDPA runs it (the op has
        # no is_causal), with the same result
        ops.reset_kernel_counts()
        torch.testing.assert_close(sp(ids), model(ids), rtol=1e-4, atol=1e-5)
        calls = sum(n for (op, _), n in ops.kernel_counts().items() if op == "scaled_dot_product_attention")
        assert calls == (0 if factory is gpt2 else 2)
    # with gradients (the op's backward is its reference's)
    grad_model = fastprune.sparsify(model, min_sparsity=0.5, example_inputs=args)
    grad_model.train()
    for mod in grad_model.modules():
        if isinstance(mod, torch.nn.Dropout):
            mod.p = 0.0
    loss = grad_model(*args).square().mean()
    loss.backward()
    assert all(p.grad is None or p.grad.isfinite().all() for p in grad_model.parameters())
    # eager attention returns the attention weights: left alone
    eager = factory()
    eager.config._attn_implementation = "eager"
    assert use_fastprune_attention(eager) == 0 and eager.config._attn_implementation == "eager"
