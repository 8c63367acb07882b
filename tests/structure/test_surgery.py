"""Channel masks, compaction (constant folding), criteria, selection, counting, bad input."""

from __future__ import annotations

import copy

import pytest
import torch
from tests.structure import zoo
from torch import nn

import fastprune
from fastprune.importance.channels import group_scores
from fastprune.select import select_channels
from fastprune.structure import compact, find_groups


def _zero_filter(conv: nn.Module, idx: list[int]) -> None:
    with torch.no_grad():
        conv.weight[idx] = 0


def test_hard_mask_survives_training_soft_mask_regrows() -> None:
    for hard in (True, False):
        model, x = zoo.build("resnet")
        model.train()
        plan = fastprune.prune(model, "l1_filter", sparsity=0.5, example_inputs=x, mode="mask", hard=hard)
        g = plan.groups[0]
        mem = next(m for m in g["members"] if m["role"] == "out" and m["attr"] == "weight")
        mod = dict(model.named_modules())[mem["module"]]
        pos = [p for p, c in enumerate(mem["index"]) if c in set(g["removed"])]
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for _ in range(2):
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
        w = mod.weight.detach()
        assert bool((w[pos] == 0).all()) is hard


def test_hard_masked_channel_is_zero_after_bn() -> None:
    model, x = zoo.build("resnet")
    plan = fastprune.prune(model, "l1_filter", sparsity=0.5, example_inputs=x, mode="mask", hard=True)
    g = next(d for d in plan.groups if any(m["module"] == "stem.0" for m in d["members"]))
    seen = {}
    h = model.stem.register_forward_hook(lambda m, a, o: seen.setdefault("y", o))
    model(x)
    h.remove()
    assert bool((seen["y"][:, g["removed"]] == 0).all())


def test_compact_removes_soft_zeroed_filters_and_folds_constants_exactly() -> None:
    # a zeroed conv filter still outputs act(bias) -> the Linear after the pooling absorbs it
    model, x = zoo.build("squeeze_excite")
    _zero_filter(model.fc1, [1, 4, 6])  # fc1's channels go through relu into fc2 (a 1x1 conv, unpadded)
    # conv's channels are multiplied by fc2's sigmoid gate (one group): zero both to make them constant
    _zero_filter(model.conv, [0, 3])
    _zero_filter(model.fc2, [0, 3])
    with torch.no_grad():
        model.fc1.bias[[1, 4, 6]] = torch.tensor([0.5, -0.5, 0.25])
        model.conv.bias[[0, 3]] = torch.tensor([0.3, 0.7])
    ref = model(x)
    report = compact(model, x)
    assert report.num_removed == 5 and not report.approximate and not report.kept
    assert {"fc2.bias", "fc1.bias", "out.bias"} <= set(report.folded)
    assert model.fc1.out_channels == 5 and model.conv.out_channels == 14
    xb = torch.randn(3, 3, 8, 8)
    torch.testing.assert_close(model(x), ref, rtol=0, atol=1e-6)
    assert model(xb).shape == (3, 4)


def test_padded_conv_consumer_keeps_a_nonzero_constant_channel_unless_approximate() -> None:
    def build() -> nn.Module:
        torch.manual_seed(0)
        m = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.Sigmoid(), nn.Conv2d(6, 4, 3, padding=1)).eval()
        _zero_filter(m[0], [2])
        return m

    x = torch.randn(2, 3, 6, 6)
    exact = build()
    rep = compact(exact, x)
    assert rep.num_removed == 0 and rep.kept and "cannot be folded exactly" in rep.kept[0][2]
    assert exact[0].out_channels == 6
    approx = build()
    ref = approx(x)
    rep = compact(approx, x, allow_approximate=True)
    assert rep.num_removed == 1 and rep.approximate and rep.max_abs_diff > 0
    with torch.no_grad():
        got = approx(x)
    assert float((got - ref).abs().max()) == pytest.approx(rep.max_abs_diff, rel=1e-5)


def test_compact_of_masked_model_equals_prune_compact() -> None:
    model, x = zoo.build("mobilenetv2")
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    fastprune.prune(a, "l1_filter", sparsity=0.5, example_inputs=x, mode="mask")  # hard masks
    rep = compact(a, x, verify=True)
    assert rep.max_abs_diff <= 1e-6 * float(model(x).abs().max()) + 1e-7
    fastprune.prune(b, "l1_filter", sparsity=0.5, example_inputs=x)
    assert [p.shape for p in a.parameters()] == [p.shape for p in b.parameters()]
    torch.testing.assert_close(a(x), b(x), rtol=0, atol=1e-6)


def test_criteria_rank_as_defined() -> None:
    model = nn.Sequential(nn.Conv2d(2, 6, 1, bias=False), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 1, 1)).eval()
    x = torch.randn(1, 2, 3, 3)
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([3.0, 1.0, 5.0, 2.0, 4.0, 6.0]).view(6, 1, 1, 1).expand(6, 2, 1, 1))
        model[1].weight.copy_(torch.tensor([0.6, 0.5, 0.1, 0.4, 0.3, 0.2]))
    groups = find_groups(model, x)
    assert len(groups) == 1
    l1 = group_scores(model, groups, "l1_filter")[0]
    assert l1.tolist() == [6.0, 2.0, 10.0, 4.0, 8.0, 12.0]
    assert select_channels(groups, {0: l1}, 0.5) == {0: [1, 3, 0]} or select_channels(groups, {0: l1}, 0.5) == {
        0: [0, 1, 3]
    }
    bn = group_scores(model, groups, "bn_scale")[0]
    assert select_channels(groups, {0: bn}, 0.5) == {0: [2, 4, 5]}
    r1 = group_scores(model, groups, "random", seed=3)[0]
    assert torch.equal(r1, group_scores(model, groups, "random", seed=3)[0])
    assert not torch.equal(r1, group_scores(model, groups, "random", seed=4)[0])


def test_round_to_and_global_scope() -> None:
    model, x = zoo.build("mlp")
    plan = fastprune.prune(copy.deepcopy(model), "l1_filter", sparsity=0.3, example_inputs=x, round_to=8)
    for g in plan.groups:
        assert (g["channels"] - len(g["removed"])) % 8 == 0
    plan = fastprune.prune(model, "l2_filter", sparsity=0.5, example_inputs=x, scope="global")
    assert plan.achieved_sparsity == pytest.approx(0.5, abs=0.01)


def test_global_selection_that_would_empty_a_group_is_refused() -> None:
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 40), nn.ReLU(), nn.Linear(40, 2)).eval()
    with torch.no_grad():
        model[0].weight.mul_(1e-4)  # the 3-wide layer scores far below its mean? no: normalised per group
        model[2].weight[:, :] = 1.0
        model[2].weight[:20] = 1e-6
    x = torch.randn(2, 4)
    groups = find_groups(model, x)
    scores = {g.id: torch.zeros(g.channels, dtype=torch.float64) for g in groups}
    small = next(g for g in groups if g.channels == 3)
    big = next(g for g in groups if g.channels == 40)
    scores[small.id][:] = torch.tensor([0.01, 0.01, 0.01])
    scores[big.id][:] = torch.linspace(1, 2, 40, dtype=torch.float64)
    scores[small.id][0] = -30.0  # normalised score far below everything
    with pytest.raises(ValueError, match="every channel"):
        select_channels(groups, scores, 0.95, scope="global")


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, float("nan"), "0.5"])
def test_bad_sparsity(bad) -> None:
    model, x = zoo.build("mlp")
    with pytest.raises(ValueError, match="sparsity"):
        fastprune.prune(model, "l1_filter", sparsity=bad, example_inputs=x)


def test_bad_arguments_leave_the_model_untouched() -> None:
    model, x = zoo.build("resnet")
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="example_inputs"):
        fastprune.prune(model, "l1_filter", sparsity=0.5)
    with pytest.raises(ValueError, match="example_inputs"):
        fastprune.prune(model, "l1_filter", sparsity=0.5, example_inputs=torch.randn(2, 4, 16, 16))
    with pytest.raises(ValueError, match="round_to"):
        fastprune.prune(model, "l1_filter", sparsity=0.5, example_inputs=x, round_to=0)
    with pytest.raises(ValueError, match="mode"):
        fastprune.prune(model, "l1_filter", sparsity=0.5, example_inputs=x, mode="soft")
    with pytest.raises(TypeError, match="valid"):
        fastprune.prune(model, "l1_filter", sparsity=0.5, example_inputs=x, ratio=0.5)
    with pytest.raises(ValueError, match="bn_scale"):
        fastprune.prune(zoo.build("mlp")[0].net[3:], "bn_scale", sparsity=0.5, example_inputs=torch.randn(2, 64))
    with torch.no_grad():
        model.stem[0].weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="not finite"):
        fastprune.prune(model, "l1_filter", sparsity=0.5, example_inputs=x)
    with torch.no_grad():
        model.stem[0].weight[0, 0, 0, 0] = before["stem.0.weight"][0, 0, 0, 0]
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_plan_for_another_architecture_is_refused() -> None:
    model, x = zoo.build("resnet")
    plan = fastprune.prune(copy.deepcopy(model), "l1_filter", sparsity=0.5, example_inputs=x)
    other, _ = zoo.build("mobilenetv2")
    with pytest.raises(ValueError, match="plan member"):
        plan.apply(other)
    fastprune.prune(model, "l1_filter", sparsity=0.5, example_inputs=x)
    with pytest.raises(ValueError, match="applied already"):
        plan.apply(model)


def test_count_matches_hand_computation() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 5 * 5, 7))
    macs, params = fastprune.count(model, torch.randn(2, 3, 5, 5))
    assert macs == 2 * (8 * 3 * 9 * 25 + 200 * 7)
    assert params == 8 * 27 + 8 + 200 * 7 + 7


def test_a_parameter_a_module_owns_is_sliced_with_its_channels() -> None:
    # (issue 18: such a module was an opaque boundary) a layer scale broadcast along the channels
    class Scale(nn.Module):
        def __init__(self, c: int) -> None:
            super().__init__()
            self.s = nn.Parameter(torch.rand(c) + 0.5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * self.s.view(1, -1, 1, 1)

    model = nn.Sequential(
        nn.Conv2d(3, 8, 3), Scale(8), nn.ReLU(), nn.Conv2d(8, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 1)
    ).eval()
    x = torch.randn(1, 3, 7, 7)
    groups = find_groups(model, x)
    g = next(g for g in groups if any(m.module == "0" for m in g.producers))
    assert any(m.tensor == "1.s" and m.dim == 0 for m in g.members) and "1" not in dict(groups.boundaries)
    masked = copy.deepcopy(model)
    fastprune.prune(masked, "l1_filter", sparsity=0.5, example_inputs=x, mode="mask")
    fastprune.prune(model, "l1_filter", sparsity=0.5, example_inputs=x)
    assert model[0].out_channels == 4 and model[1].s.shape == (4,) and model[3].out_channels == 2
    with torch.no_grad():
        torch.testing.assert_close(model(x), masked(x), rtol=0, atol=1e-6)


def test_a_parameter_used_in_an_unknown_way_is_a_boundary() -> None:
    class Mix(nn.Module):
        def __init__(self, c: int) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.randn(c, c))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.einsum("nchw,dc->ndhw", x, self.w)

    model = nn.Sequential(nn.Conv2d(3, 8, 3), Mix(8), nn.ReLU(), nn.Conv2d(8, 4, 3)).eval()
    x = torch.randn(1, 3, 7, 7)
    groups = find_groups(model, x)
    assert "einsum()" in dict(groups.boundaries)
    # the boundary says what it costs: the channels it keeps and who writes them
    assert "[keeps 8 channels written by 1 layer(s): 0]" in dict(groups.boundaries)["einsum()"]
    assert not any(m.module == "0" for g in groups for m in g.producers)


def test_conv_transpose_output_channels_are_dim_1() -> None:
    model, x = zoo.build("unet")
    groups = find_groups(model, x)
    g = next(g for g in groups if any(m.module == "up2" and m.role == "out" for m in g.members))
    assert any(m.module == "up2" and m.dim == 1 for m in g.producers)
    # up2's output is concatenated first, then e2: dec2's first conv reads it at offsets 0..15
    dec = next(m for m in g.members if m.module == "dec2.0" and m.role == "in")
    assert dec.index[:16] == tuple(range(16)) and set(dec.index[16:]) == {-1}


@pytest.mark.parametrize("name", list(zoo.ZOO))
def test_zero_analysis_agrees_with_a_measured_forward(name: str) -> None:
    """Where the static zero analysis says a consumer reads exact zeros, a real forward agrees."""

    from fastprune.structure.surgery import _capture_inputs, mask_channels
    from fastprune.structure.zeros import zero_consumers

    model, x = zoo.build(name)
    groups = find_groups(model, x)
    removed = select_channels(groups, group_scores(model, groups, "l1_filter"), 0.5)
    mask_channels(model, groups, removed, hard=False, zero_norm=True)
    known = zero_consumers(model, groups._trace, removed)
    assert known, "the analysis saw no consumer"
    by_id = {g.id: g for g in groups}
    need = {}
    for gid, chans in removed.items():
        for m in by_id[gid].members:
            if m.role == "in":
                need.setdefault(m.module, set()).update(m.positions(chans))
    seen, _ = _capture_inputs(model, {n: torch.tensor(sorted(p)) for n, p in need.items()}, (x,))
    for module, is_zero in known.items():
        if is_zero and module in seen:
            assert all(not hi.any() and not lo.any() for hi, lo, _ in seen[module]), module


def test_prune_needs_no_forward_when_zeros_are_provable() -> None:
    calls = []
    for name in ("resnet", "squeeze_excite"):
        model, x = zoo.build(name)
        h = model.register_forward_hook(lambda *a, name=name: calls.append(name))
        fastprune.prune(model, "l1_filter", sparsity=0.5, example_inputs=x)
        h.remove()
    assert calls == []
    # a sigmoid before a padded conv: the constant 0.5 must be measured (and here it is kept)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.Sigmoid(), nn.Conv2d(6, 4, 3, padding=1)).eval()
    x = torch.randn(2, 3, 6, 6)
    h = model.register_forward_hook(lambda *a: calls.append("sigmoid"))
    plan = fastprune.prune(model, "l1_filter", sparsity=0.5, example_inputs=x)
    h.remove()
    assert calls == ["sigmoid"]
    assert plan.groups[0]["kept"] and model[0].out_channels == 6 and plan.achieved_sparsity == 0.0
