"""find_groups: coupling rules, boundaries, the dynamic fallback and bad input."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from tests.structure import zoo
from torch import nn

import fastprune
from fastprune.structure import find_groups


def _group_of(groups, module: str, role: str = "out"):
    hits = [g for g in groups if any(m.module == module and m.role == role for m in g.members)]
    assert len(hits) == 1, f"{module} ({role}) in {len(hits)} groups"
    return hits[0]


def _member(group, tensor: str, dim: int):
    return next(m for m in group.members if m.tensor == tensor and m.dim == dim)


def test_residual_and_downsample_share_a_group() -> None:
    model, x = zoo.build("resnet")
    groups = find_groups(model, x)
    g = _group_of(groups, "layer1.0.conv3")
    producers = {m.module for m in g.producers}
    assert {"layer1.0.conv3", "layer1.0.downsample.0", "layer1.1.conv3"} <= producers
    # the next stage's first convs read these channels
    assert _member(g, "layer2.0.conv1.weight", 1).index == tuple(range(32))
    assert _member(g, "layer1.0.bn3.running_var", 0).role == "norm"
    assert groups.frontend == "fx"


def test_depthwise_conv_couples_its_input_and_output() -> None:
    model, x = zoo.build("mobilenetv2")
    g = _group_of(find_groups(model, x), "features.2.conv.0")
    assert {m.module for m in g.producers} == {"features.2.conv.0", "features.2.conv.3"}
    assert any(m.module == "features.2.conv.4" and m.role == "norm" for m in g.members)


def test_concat_maps_each_source_to_its_offsets() -> None:
    model, x = zoo.build("densenet")
    groups = find_groups(model, x)
    g0 = _group_of(groups, "conv0")
    g1 = _group_of(groups, "block.0.conv2")
    # the transition conv reads [conv0 (16), layer0 (8), layer1 (8), layer2 (8)]
    t0 = _member(g0, "trans.2.weight", 1).index
    t1 = _member(g1, "trans.2.weight", 1).index
    assert t0[:16] == tuple(range(16)) and set(t0[16:]) == {-1}
    assert t1[16:24] == tuple(range(8)) and set(t1[:16] + t1[24:]) == {-1}


def test_flatten_into_linear_repeats_channels_in_blocks() -> None:
    model, x = zoo.build("densenet")
    g = _group_of(find_groups(model, x), "trans.2")
    idx = _member(g, "fc.weight", 1).index
    assert len(idx) == 20 * 16 and idx[:16] == (0,) * 16 and idx[16:32] == (1,) * 16


def test_boundaries_are_reported() -> None:
    model = zoo.TinyTransformer().eval()
    groups = find_groups(model, torch.randn(2, 5, 12))
    names = dict(groups.boundaries)
    assert "blocks.0.ln1" in names and "LayerNorm" in names["blocks.0.ln1"]
    assert "blocks.0.attn" in names and "swap" in names["blocks.0.attn"]
    # FFN width stays prunable even with the stock attention
    assert any(m.module == "blocks.0.ff.0" for g in groups for m in g.producers)


def test_heads_group_after_swapping_attention() -> None:
    model, x = zoo.build("transformer")
    g = _group_of(find_groups(model, x), "blocks.0.attn.q_proj")
    assert g.channels == 4
    assert _member(g, "blocks.0.attn.q_proj.weight", 0).index == tuple(h for h in range(4) for _ in range(8))
    assert _member(g, "blocks.0.attn.out_proj.weight", 1).role == "in"


def test_grouped_conv_ties_channel_l_of_every_group() -> None:
    # (a boundary until issue 18: now `groups` stays fixed and each group loses the same channels)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=2), nn.Flatten(), nn.LazyLinear(2))
    x = torch.randn(1, 3, 8, 8)
    model(x)
    groups = find_groups(model, x)
    g = next(g for g in groups if any(m.module == "0" for m in g.producers))
    assert g.channels == 4  # 8 input channels of the grouped conv, tied in pairs (l, 4 + l)
    out = next(m for m in g.members if m.module == "0" and m.attr == "weight")
    assert out.index == (0, 1, 2, 3, 0, 1, 2, 3)
    assert not any("grouped conv" in r for _, r in groups.boundaries)


class _Shared(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 6, 3, padding=1)
        self.b = nn.Conv2d(6, 6, 3, padding=1)  # called twice
        self.c = nn.Conv2d(6, 6, 1)
        self.head = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.a(x))
        y = F.relu(self.b(y))
        y = F.relu(self.b(y))  # the same module again: its in and out channels are one group
        return self.head(self.c(y).mean((2, 3)))


def test_module_called_twice_is_pruned_consistently() -> None:
    model = _Shared().eval()
    x = torch.randn(2, 3, 6, 6)
    g = _group_of(find_groups(model, x), "b")
    assert {m.module for m in g.producers} >= {"a", "b"}
    masked = copy.deepcopy(model)
    fastprune.prune(masked, "l1_filter", sparsity=0.5, example_inputs=x, mode="mask")
    fastprune.prune(model, "l1_filter", sparsity=0.5, example_inputs=x)
    assert tuple(model.b.weight.shape) == (3, 3, 3, 3)
    torch.testing.assert_close(model(x), masked(x), rtol=0, atol=1e-6)


def test_tied_weights_are_pruned_once() -> None:
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.enc = nn.Linear(10, 16)
            self.mid = nn.Linear(16, 16)
            self.dec = nn.Linear(16, 10)
            self.mid2 = nn.Linear(16, 16)
            self.mid2.weight = self.mid.weight  # tied

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = torch.relu(self.enc(x))
            return self.dec(torch.relu(self.mid(h)) + torch.relu(self.mid2(h)))

    model = Tied().eval()
    x = torch.randn(3, 10)
    plan = fastprune.prune(model, "l1_filter", sparsity=0.5, example_inputs=x)
    assert model.mid.weight is model.mid2.weight
    assert tuple(model.mid.weight.shape) == tuple(model.mid2.weight.shape) == (8, 8)
    assert plan.achieved_sparsity == pytest.approx(0.5)


def test_fx_failure_falls_back_to_the_dynamic_tracer() -> None:
    model, x = zoo.build("data_dependent")
    groups = find_groups(model, x)
    assert groups.frontend == "dynamic"
    assert any("torch.fx could not trace" in n for n in groups.notes)
    assert _group_of(groups, "a").channels == 12


def test_wrong_example_inputs_are_a_clear_error() -> None:
    model, _ = zoo.build("resnet")
    with pytest.raises(ValueError, match="example_inputs"):
        find_groups(model, torch.randn(2, 5, 16, 16))
    with pytest.raises(TypeError, match="example_inputs"):
        find_groups(model, "x")


def test_model_that_fails_on_its_inputs_names_both_failures() -> None:
    class Broken(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise KeyError("custom failure inside forward")

    with pytest.raises(fastprune.structure.TraceError, match="custom failure"):
        find_groups(Broken(), torch.randn(1, 3, 5, 5))


def test_include_exclude() -> None:
    model, x = zoo.build("resnet")
    only = find_groups(model, x, include="layer2.*")
    assert only and all(any(m.module.startswith("layer2") for m in g.producers) for g in only)
    none_stem = find_groups(model, x, exclude="stem.*")
    assert all(not m.module.startswith("stem") for g in none_stem for m in g.members)
