"""Architecture families the structure engine must handle (issue 18), each built here with random
weights: versioned modules through load_pruned, reported optional-import failures, stochastic
depth, channel shuffle, grouped convolutions."""

from __future__ import annotations

import copy
import io
import sys

import pytest
import torch
import torch.nn.functional as F
from tests.structure import zoo
from torch import nn

import fastprune
from fastprune.structure import handlers as H
from fastprune.structure.groups import _groups_from, analyse
from fastprune.structure.trace import trace


class Versioned(nn.Module):
    """Like torchvision's MNASNet: its loader reads the version saved in the state dict's metadata."""

    _version = 2

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        version = local_metadata.get("version", None)
        if version not in (1, 2):
            raise ValueError(f"version should be set to 1 or 2 instead of {version}")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, unexpected, errors)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.relu(self.bn(self.conv(x))).mean((2, 3)))


def _round_trip(state):
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def test_load_pruned_keeps_the_state_dicts_metadata():
    torch.manual_seed(0)
    model = Versioned().eval()
    x = torch.randn(2, 3, 6, 6)
    # unpruned, as the issue found it on MNASNet
    fresh = fastprune.load_pruned(Versioned(), _round_trip(model.state_dict()))
    torch.testing.assert_close(fresh.eval()(x), model(x))
    fastprune.prune(model, "l1_filter", sparsity=0.5, example_inputs=x)
    fresh = fastprune.load_pruned(Versioned(), _round_trip(model.state_dict()))
    assert fresh.conv.out_channels == 4
    torch.testing.assert_close(fresh.eval()(x), model(x))


def test_a_failed_optional_import_is_named_in_the_report(monkeypatch):
    transformers = pytest.importorskip("transformers")
    from transformers.models.bert.modeling_bert import BertSelfAttention

    cfg = transformers.BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=24,
        max_position_embeddings=16,
    )  # fmt: skip
    model = transformers.BertModel(cfg).eval()
    ids = torch.randint(0, 50, (1, 8))
    # as if `import transformers.models.bert.modeling_bert` failed (an incompatible transformers)
    monkeypatch.setattr(H, "_transformers_seen", False)
    monkeypatch.setattr(H, "IMPORT_FAILURES", {})
    for table in (H.HEAD_SPECS, H._HANDLERS, H._FIXUPS):
        monkeypatch.delitem(table, BertSelfAttention, raising=False)
    monkeypatch.setitem(sys.modules, "transformers.models.bert.modeling_bert", None)
    groups = fastprune.find_groups(model, ids)
    text = groups.summary()
    assert "transformers.models.bert.modeling_bert" in text and "heads" in text, text
    plan = fastprune.prune(copy.deepcopy(model), "l1_filter", sparsity=0.5, example_inputs=ids, dry_run=True)
    assert any("transformers.models.bert" in n for n in plan.config["notes"])


# ---------------------------------------------------------------------------------- grouped convs
class ResNeXtBlock(nn.Module):
    """ResNeXt's bottleneck: 1x1 -> grouped 3x3 (cardinality 4) -> 1x1, and the identity."""

    def __init__(self, c: int = 16, width: int = 32, groups: int = 4) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, width, 1, bias=False), nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, groups=groups, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3, self.bn3 = nn.Conv2d(width, c, 1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        h = F.relu(self.bn2(self.conv2(h)))
        return F.relu(x + self.bn3(self.conv3(h)))


class ResNeXtish(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.blocks = nn.Sequential(ResNeXtBlock(), ResNeXtBlock())
        # RegNet's: a group width of 8 (groups = width // 8) and an expanding grouped conv
        self.reg = nn.Conv2d(16, 48, 3, padding=1, groups=2)
        self.fc = nn.Linear(48, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.relu(self.reg(self.blocks(self.stem(x)))).mean((2, 3)))


@pytest.mark.parametrize("sparsity", [0.25, 0.5])
def test_grouped_convs_lose_the_same_channels_in_every_group(sparsity):
    torch.manual_seed(0)
    model = zoo.randomise(ResNeXtish())
    x = torch.randn(2, 3, 8, 8)
    groups = fastprune.find_groups(model, x)
    assert not any("grouped conv" in r for _, r in groups.boundaries), groups.boundaries
    masked = copy.deepcopy(model)
    plan = fastprune.prune(masked, "l1_filter", sparsity=sparsity, example_inputs=x, mode="mask")
    fastprune.finalize(masked)
    compact = copy.deepcopy(model)
    fastprune.prune(compact, "l1_filter", sparsity=sparsity, example_inputs=x)
    blk = compact.blocks[0]
    assert blk.conv2.groups == 4 and blk.conv2.in_channels == blk.conv2.out_channels == int(32 * (1 - sparsity))
    assert compact.reg.groups == 2 and compact.reg.out_channels == int(48 * (1 - sparsity))
    assert plan.achieved_sparsity == pytest.approx(sparsity, abs=0.05)
    xb = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        ref = masked(xb)
        assert float((compact(xb) - ref).abs().max()) <= 1e-5 * float(ref.abs().max())
    # channel l of every group goes together
    g = next(
        g for g in plan.groups if any(m["module"] == "blocks.0.conv1" and m["role"] == "out" for m in g["members"])
    )
    out = next(m for m in g["members"] if m["module"] == "blocks.0.conv1" and m["role"] == "out")
    removed = [p for p, c in enumerate(out["index"]) if c in set(g["removed"])]
    per_group = [sum(1 for p in removed if p // 8 == k) for k in range(4)]
    assert len(set(per_group)) == 1 and per_group[0] > 0
    # and the checkpoint reloads into a fresh model
    fresh = fastprune.load_pruned(ResNeXtish(), _round_trip(compact.state_dict()))
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(xb), compact(xb))


# ---------------------------------------------------------------------------------- stochastic depth
@torch.fx.wrap
def stochastic_depth(input: torch.Tensor, p: float, mode: str, training: bool = True) -> torch.Tensor:
    """torchvision.ops.stochastic_depth's contract (FX sees one call, as torchvision wraps it)."""
    if not training or p == 0.0:
        return input
    shape = [input.shape[0]] + [1] * (input.dim() - 1) if mode == "row" else [1] * input.dim()
    noise = torch.empty(shape, dtype=input.dtype, device=input.device).bernoulli_(1 - p)
    return input * noise / (1 - p)


class SDBlock(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + stochastic_depth(self.bn(self.conv(x)), 0.2, "row", self.training)


class SDNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16))
        self.blocks = nn.Sequential(SDBlock(16), SDBlock(16), SDBlock(16))
        self.fc = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.relu(self.blocks(self.stem(x))).mean((2, 3)))


def test_stochastic_depth_passes_the_residual_stream_through():
    torch.manual_seed(2)
    model = zoo.randomise(SDNet())
    x = torch.randn(2, 3, 8, 8)
    groups = fastprune.find_groups(model, x)
    assert not any("stochastic_depth" in n for n, _ in groups.boundaries), groups.boundaries
    stream = next(g for g in groups if any(m.module == "stem.0" for m in g.producers))
    assert {"blocks.0.conv", "blocks.1.conv", "blocks.2.conv", "fc"} <= set(stream.layers)
    ref = copy.deepcopy(model)
    fastprune.prune(ref, "l1_filter", sparsity=0.5, example_inputs=x, mode="mask")
    fastprune.finalize(ref)
    fastprune.prune(model, "l1_filter", sparsity=0.5, example_inputs=x)
    assert model.stem[0].out_channels == 8 and model.fc.in_features == 8
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------- owned parameters
class CNBlock(nn.Module):
    """ConvNeXt's block: depthwise 7x7, channels-last LayerNorm, Linear 4C, GELU, Linear, layer scale
    (a parameter the block owns), stochastic depth, residual."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.dw = nn.Conv2d(c, c, 7, padding=3, groups=c)
        self.norm = nn.LayerNorm(c)
        self.fc1, self.fc2 = nn.Linear(c, 4 * c), nn.Linear(4 * c, c)
        self.layer_scale = nn.Parameter(torch.rand(c, 1, 1) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.dw(x).permute(0, 2, 3, 1))
        h = self.fc2(F.gelu(self.fc1(h))).permute(0, 3, 1, 2)
        return x + stochastic_depth(self.layer_scale * h, 0.1, "row", self.training)


class ConvNeXtish(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 2, stride=2)
        self.blocks = nn.Sequential(CNBlock(8), CNBlock(8))
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


class Encoder(nn.Module):
    """A ViT encoder that owns its position embedding and class token."""

    def __init__(self, d: int = 12, tokens: int = 4) -> None:
        super().__init__()
        self.cls = nn.Parameter(torch.randn(1, 1, d))
        self.pos = nn.Parameter(torch.randn(1, tokens + 1, d) * 0.1)
        self.ln = nn.LayerNorm(d)
        self.fc1, self.fc2 = nn.Linear(d, 3 * d), nn.Linear(3 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        return x + self.fc2(F.gelu(self.fc1(self.ln(x))))


class ViTish(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, 12, 4, stride=4)
        self.encoder = Encoder()
        self.head = nn.Linear(12, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.patch(x).flatten(2).transpose(1, 2)
        return self.head(self.encoder(t)[:, 0])


@pytest.mark.parametrize("family", ["convnext", "vit"])
def test_modules_owning_parameters_no_longer_block_their_mlps(family):
    torch.manual_seed(3)
    model, x, hidden = (
        (ConvNeXtish().eval(), torch.randn(2, 3, 8, 8), "blocks.0.fc1")
        if family == "convnext"
        else (ViTish().eval(), torch.randn(2, 3, 8, 8), "encoder.fc1")
    )
    groups = fastprune.find_groups(model, x)
    assert any(m.module == hidden for g in groups for m in g.producers), groups.summary()
    stream = next((g for g in groups if any(m.module in ("stem", "patch") for m in g.producers)), None)
    if stream is not None:  # the stream is normalised over the channels by LayerNorm: kept
        assert not stream.prunable
    width = model.get_submodule(hidden).out_features
    masked = copy.deepcopy(model)
    fastprune.prune(masked, "l1_filter", sparsity=0.5, example_inputs=x, mode="mask")
    fastprune.finalize(masked)
    fastprune.prune(model, "l1_filter", sparsity=0.5, example_inputs=x)
    assert model.get_submodule(hidden).out_features == width // 2
    xb = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        ref = masked(xb)
        assert float((model(xb) - ref).abs().max()) <= 1e-5 * float(ref.abs().max())


def test_the_layer_scale_and_position_embedding_are_members_of_the_stream():
    torch.manual_seed(4)
    for model, x, names in (
        (ConvNeXtish().eval(), torch.randn(1, 3, 8, 8), {"blocks.0.layer_scale", "blocks.1.layer_scale"}),
        (ViTish().eval(), torch.randn(1, 3, 8, 8), {"encoder.cls", "encoder.pos"}),
    ):
        # the stream is pinned (LayerNorm), so find_groups leaves it out: look at every group
        g_all = _groups_from(analyse(model, trace(model, (x,), H.is_handled)))
        stream = next(g for g in g_all if any(m.module in ("stem", "patch") for m in g.producers))
        assert names <= {m.tensor for m in stream.members}, [m.tensor for m in stream.members]


def test_gpt2_conv1d_mlp_widths_are_prunable():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(vocab_size=40, n_positions=16, n_embd=16, n_layer=2, n_head=2, n_inner=32)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    ids = torch.randint(0, 40, (1, 6))
    groups = fastprune.find_groups(model, ids)
    mlp = [g for g in groups if any(m.module.endswith("mlp.c_fc") for m in g.producers)]
    assert len(mlp) == 2, groups.summary()
    ref = copy.deepcopy(model)
    fastprune.prune(ref, "l1_filter", sparsity=0.5, example_inputs=ids, mode="mask", include="*mlp*")
    fastprune.finalize(ref)
    fastprune.prune(model, "l1_filter", sparsity=0.5, example_inputs=ids, include="*mlp*")
    c_fc = model.transformer.h[0].mlp.c_fc
    assert c_fc.weight.shape == (16, 16) and c_fc.nf == 16 and model.transformer.h[0].mlp.c_proj.nx == 16
    other = torch.randint(0, 40, (2, 5))
    with torch.no_grad():
        torch.testing.assert_close(model(other).logits, ref(other).logits, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------- prune_norms
class GNNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.gn = nn.Conv2d(3, 16, 3, padding=1), nn.GroupNorm(4, 16)
        self.b = nn.Conv2d(16, 8, 3, padding=1)
        self.mlp = nn.Sequential(nn.Linear(8, 12), nn.RMSNorm(12), nn.GELU(), nn.Linear(12, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(F.relu(self.b(F.relu(self.gn(self.a(x))))).mean((2, 3)))


@pytest.mark.parametrize("family", ["vit", "convnext", "groupnorm"])
def test_prune_norms_shrinks_normalised_widths_and_reports_the_deviation(family):
    torch.manual_seed(5)
    model = {"vit": ViTish, "convnext": ConvNeXtish, "groupnorm": GNNet}[family]().eval()
    x = torch.randn(2, 3, 8, 8)
    exact = fastprune.find_groups(model, x)
    loose = fastprune.find_groups(model, x, prune_norms=True)
    assert sum(len(g.prunable) for g in loose) > sum(len(g.prunable) for g in exact)
    assert loose.approximate_norms and not exact.approximate_norms
    masked = copy.deepcopy(model)
    fastprune.prune(masked, "l1_filter", sparsity=0.5, example_inputs=x, mode="mask", prune_norms=True)
    fastprune.finalize(masked)
    plan = fastprune.prune(model, "l1_filter", sparsity=0.5, example_inputs=x, prune_norms=True)
    comp = plan.config["compaction"]
    assert not comp["exact"] and comp["approximate_norms"] and comp["max_abs_diff"] > 0
    with torch.no_grad():  # the deviation reported is the one measured on the example inputs
        measured = float((model(x).double() - masked(x).double()).abs().max())
    assert comp["max_abs_diff"] == pytest.approx(measured, rel=1e-4, abs=1e-7)
    if family == "vit":
        assert model.patch.out_channels == 6 and model.encoder.cls.shape == (1, 1, 6)
        assert model.encoder.pos.shape == (1, 5, 6) and model.encoder.ln.normalized_shape == (6,)
    elif family == "convnext":
        assert model.stem.out_channels == 4 and model.blocks[0].layer_scale.shape == (4, 1, 1)
        assert model.blocks[0].dw.groups == 4 and model.blocks[0].norm.weight.shape == (4,)
    else:
        assert model.gn.num_groups == 4 and model.gn.num_channels == model.a.out_channels == 8
        assert model.mlp[1].normalized_shape == (6,)
    model(torch.randn(1, 3, 8, 8))  # still runs, at another batch size


def test_without_prune_norms_the_plan_says_compaction_was_exact():
    torch.manual_seed(6)
    model = GNNet().eval()
    x = torch.randn(2, 3, 8, 8)
    plan = fastprune.prune(model, "l1_filter", sparsity=0.5, example_inputs=x)
    assert plan.config["compaction"]["exact"] and not plan.config["compaction"]["approximate_norms"]
    assert model.gn.num_channels == 16  # the GroupNorm's channels are a boundary by default


# ---------------------------------------------------------------------------------- attention
def _llama(kv_heads: int):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(
        vocab_size=50, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=kv_heads, max_position_embeddings=32, head_dim=4,
    )  # fmt: skip
    torch.manual_seed(7)
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("kv_heads", [2, 4])
def test_llama_grouped_query_attention_loses_whole_kv_groups(kv_heads):
    model = _llama(kv_heads)
    ids = torch.randint(0, 50, (1, 7))
    groups = fastprune.find_groups(model, ids)
    heads = [g for g in groups if any(m.module.endswith("self_attn.q_proj") for m in g.producers)]
    assert len(heads) == 2 and all(g.channels == kv_heads for g in heads), groups.summary()
    mlp = [g for g in groups if any(m.module.endswith("mlp.gate_proj") for m in g.producers)]
    assert len(mlp) == 2
    masked = copy.deepcopy(model)
    fastprune.prune(masked, "l1_filter", sparsity=0.5, example_inputs=ids, mode="mask")
    fastprune.finalize(masked)
    plan = fastprune.prune(model, "l1_filter", sparsity=0.5, example_inputs=ids)
    attn = model.model.layers[0].self_attn
    assert attn.q_proj.out_features == 8 and attn.k_proj.out_features == 4 * kv_heads // 2
    assert attn.o_proj.in_features == 8 and attn.num_key_value_groups == 4 // kv_heads
    assert plan.config["compaction"]["exact"]
    other = torch.randint(0, 50, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(model(other).logits, masked(other).logits, rtol=1e-4, atol=1e-5)


def test_an_attention_class_without_a_head_description_is_named():
    class WeirdAttention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.qkv, self.proj = nn.Linear(8, 24), nn.Linear(8, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            q, k, v = self.qkv(x).view(x.shape[0], x.shape[1], 3, 2, 4).unbind(2)
            a = torch.softmax(torch.einsum("bthd,bshd->bhts", q, k), -1)
            return self.proj(torch.einsum("bhts,bshd->bthd", a, v).reshape(x.shape))

    model = nn.Sequential(nn.Linear(5, 8), WeirdAttention(), nn.Linear(8, 3))
    groups = fastprune.find_groups(model, torch.randn(2, 6, 5))
    assert any("WeirdAttention" in n and "head" in n for n in groups.notes), groups.notes


def test_llama_hidden_width_shrinks_with_prune_norms():
    model = _llama(2)
    ids = torch.randint(0, 50, (1, 7))
    exact = fastprune.find_groups(model, ids)
    assert not any(m.module == "model.embed_tokens" for g in exact for m in g.producers)  # RMSNorm: kept
    plan = fastprune.prune(model, "l1_filter", sparsity=0.25, example_inputs=ids, prune_norms=True)
    comp = plan.config["compaction"]
    assert not comp["exact"] and "model.norm" in comp["approximate_norms"] and comp["max_abs_diff"] > 0
    assert model.model.embed_tokens.weight.shape == (50, 12) and model.model.norm.weight.shape == (12,)
    assert model.lm_head.in_features == 12 and model(torch.randint(0, 50, (2, 5))).logits.shape == (2, 5, 50)


def _hf(name):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(8)
    if name == "vit":
        cfg = transformers.ViTConfig(
            hidden_size=16,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=24,
            image_size=8,
            patch_size=4,
            num_channels=3,
            num_labels=3,
        )
        return transformers.ViTForImageClassification(cfg).eval(), torch.randn(1, 3, 8, 8)
    if name == "swin":
        cfg = transformers.SwinConfig(
            image_size=8,
            patch_size=2,
            num_channels=3,
            embed_dim=8,
            depths=[2],
            num_heads=[4],
            window_size=2,
            num_labels=3,
        )
        return transformers.SwinForImageClassification(cfg).eval(), torch.randn(1, 3, 8, 8)
    cfg = transformers.GPT2Config(vocab_size=40, n_positions=16, n_embd=16, n_layer=2, n_head=4, n_inner=24)
    return transformers.GPT2LMHeadModel(cfg).eval(), torch.randint(0, 40, (1, 6))


def _logits(model, x):
    out = model(x)
    return out.logits


@pytest.mark.parametrize("name", ["vit", "swin", "gpt2"])
def test_hf_attention_heads_are_prunable(name):
    model, x = _hf(name)
    with torch.no_grad():  # a bias table that is not zero, so slicing it matters
        for mod in model.modules():
            if hasattr(mod, "relative_position_bias_table"):
                mod.relative_position_bias_table.normal_()
    groups = fastprune.find_groups(model, x)
    heads = [g for g in groups if any(m.module.endswith(("q_proj", "c_attn")) for m in g.producers)]
    assert heads and all(g.channels == 4 for g in heads), groups.summary()
    if name == "swin":
        assert any(m.tensor.endswith("relative_position_bias_table") and m.dim == 1 for m in heads[0].members)
    masked = copy.deepcopy(model)
    fastprune.prune(masked, "l1_filter", sparsity=0.5, example_inputs=x, mode="mask")
    fastprune.finalize(masked)
    fastprune.prune(model, "l1_filter", sparsity=0.5, example_inputs=x)
    attn = next(m for m in model.modules() if type(m).__name__ in ("ViTAttention", "SwinAttention", "GPT2Attention"))
    heads_now = getattr(attn, "num_attention_heads", getattr(attn, "num_heads", None))
    assert heads_now == 2
    if name == "swin":
        assert attn.relative_position_bias.relative_position_bias_table.shape[1] == 2
    if name == "gpt2":
        assert attn.c_attn.nf == 3 * 8 and attn.split_size == 8 and attn.c_proj.nx == 8
    other = torch.randn(2, *x.shape[1:]) if name != "gpt2" else torch.randint(0, 40, (2, 5))
    with torch.no_grad():
        torch.testing.assert_close(_logits(model, other), _logits(masked, other), rtol=1e-4, atol=1e-5)


def test_the_plan_says_how_much_of_the_model_was_removable():
    # a boundary (here einsum) fixes channels: the achieved sparsity is over the rest, and says so
    class Mix(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.einsum("nchw->nchw", x)

    model = nn.Sequential(nn.Conv2d(3, 8, 3), Mix(), nn.ReLU(), nn.Conv2d(8, 6, 3), nn.ReLU(), nn.Conv2d(6, 4, 1))
    x = torch.randn(1, 3, 7, 7)
    plan = fastprune.prune(model, "l1_filter", sparsity=0.5, example_inputs=x)
    assert plan.achieved_sparsity == pytest.approx(0.5)
    cov = plan.config["coverage"]
    assert cov == {"removable_channels": 6, "all_channels": 18, "fixed_by_boundaries": 12}


# ---------------------------------------------------------------------------------- channel shuffle
def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """torchvision's ShuffleNetV2 channel shuffle."""
    batchsize, num_channels, height, width = x.size()
    channels_per_group = num_channels // groups
    x = x.view(batchsize, groups, channels_per_group, height, width)
    x = torch.transpose(x, 1, 2).contiguous()
    return x.view(batchsize, num_channels, height, width)


class ShuffleUnit(nn.Module):
    """ShuffleNetV2's stride-1 unit: half the channels pass, half go through a branch, then shuffle."""

    def __init__(self, c: int) -> None:
        super().__init__()
        h = c // 2
        self.branch = nn.Sequential(
            nn.Conv2d(h, h, 1, bias=False), nn.BatchNorm2d(h), nn.ReLU(),
            nn.Conv2d(h, h, 3, padding=1, groups=h, bias=False), nn.BatchNorm2d(h),
            nn.Conv2d(h, h, 1, bias=False), nn.BatchNorm2d(h), nn.ReLU(),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.chunk(2, dim=1)
        return channel_shuffle(torch.cat((x1, self.branch(x2)), dim=1), 2)


class ShuffleNetish(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.units = nn.Sequential(ShuffleUnit(16), ShuffleUnit(16))
        self.head = nn.Conv2d(16, 24, 1)
        self.fc = nn.Linear(24, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.relu(self.head(self.units(self.stem(x)))).mean((2, 3)))


def test_channel_shuffle_is_a_permutation_between_coupled_groups():
    torch.manual_seed(9)
    model = zoo.randomise(ShuffleNetish())
    x = torch.randn(2, 3, 8, 8)
    groups = fastprune.find_groups(model, x)
    assert not any("reshapes the channel" in r or "splits the channel" in r for _, r in groups.boundaries), (
        groups.boundaries
    )
    stem = next(g for g in groups if any(m.module == "stem.0" for m in g.producers))
    assert stem.prunable and "head" in stem.layers
    masked = copy.deepcopy(model)
    fastprune.prune(masked, "l1_filter", sparsity=0.5, example_inputs=x, mode="mask")
    fastprune.finalize(masked)
    fastprune.prune(model, "l1_filter", sparsity=0.5, example_inputs=x)
    assert model.stem[0].out_channels < 16 and model.stem[0].out_channels % 2 == 0
    xb = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        ref = masked(xb)
        assert float((model(xb) - ref).abs().max()) <= 1e-5 * float(ref.abs().max())


def test_a_split_with_both_factors_fixed_keeps_the_channels():
    class Fixed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.a(x)
            y = y.view(y.shape[0], 2, 4, y.shape[2], y.shape[3]).transpose(1, 2).reshape(y.shape)
            return self.b(y)

    groups = fastprune.find_groups(Fixed(), torch.randn(1, 3, 4, 4))
    assert any("both factors fixed" in r for _, r in groups.boundaries), groups.boundaries
    assert not any(m.module == "a" for g in groups for m in g.producers)
