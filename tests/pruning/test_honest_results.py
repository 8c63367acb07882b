"""Regressions for results that used to be silently wrong (issue 14): the sparsity a plan reports is
the one the model has, targets below the current sparsity and non-finite weights are refused, and
module patterns select modules' weights, not their biases or norms."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import fastprune
from fastprune.masks import select_parameters


def mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 15), nn.ReLU(), nn.Linear(15, 5))


def data():
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(8, 20, generator=g), torch.randint(0, 5, (8,), generator=g)) for _ in range(4)]


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_a_target_below_the_current_sparsity_is_refused(scope):
    model = mlp()
    fastprune.prune(model, "magnitude", sparsity=0.8, scope=scope)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # used to return a plan saying 0.5 while the model stayed 80 % sparse
    with pytest.raises(ValueError, match="already 80.*masks only grow"):
        fastprune.prune(model, "magnitude", sparsity=0.5, scope=scope)
    with pytest.raises(ValueError, match="already 80"):
        fastprune.prune(model, "woodfisher", sparsity=0.5, scope=scope, data=data(), num_grads=8, progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    plan = fastprune.prune(model, "magnitude", sparsity=0.9, scope=scope)
    assert plan.achieved_sparsity == pytest.approx(fastprune.sparsity_report(model).sparsity)
    assert plan.achieved_sparsity == pytest.approx(0.9, abs=1e-3)


def test_a_decreasing_schedule_is_refused_at_the_step_that_decreases():
    model = mlp()
    pruner = fastprune.Pruner(model, "magnitude", schedule=lambda t: [0.5, 0.7, 0.6][t])
    pruner.step()
    pruner.step()
    with pytest.raises(ValueError, match="masks only grow"):
        pruner.step()
    assert fastprune.sparsity_report(model).sparsity == pytest.approx(0.7, abs=1e-3)


def test_applied_plans_report_the_masks_in_force_and_the_real_sparsity():
    a, b = mlp(), mlp()
    b.load_state_dict(a.state_dict())
    plan = fastprune.prune(a, "magnitude", sparsity=0.5, dry_run=True)
    fastprune.prune(b, "magnitude", sparsity=0.9, include="4", scope="layer")  # b is partly pruned already
    applied = fastprune.apply(b, plan)
    real = fastprune.sparsity_report(b).sparsity
    assert applied.achieved_sparsity == pytest.approx(real) and real > plan.achieved_sparsity + 0.01
    for name, mask in applied.masks.items():
        mod = b.get_submodule(name.rsplit(".", 1)[0])
        assert torch.equal(mask, mod.weight_mask.bool())
    fresh = mlp()
    fastprune.Plan.from_json(applied.to_json()).apply(fresh)  # the applied plan replays the whole state
    assert fastprune.sparsity_report(fresh).sparsity == pytest.approx(real)


@pytest.mark.parametrize("method", ["magnitude", "woodfisher", "fisher_diag"])
def test_non_finite_weights_are_refused(method):
    model = mlp()
    with torch.no_grad():
        model[2].weight[3, 4] = float("nan")
    before = copy.deepcopy(model.state_dict())
    kw = {} if method == "magnitude" else {"data": data(), "num_grads": 8, "progress": False}
    with pytest.raises(ValueError, match=r"2.weight holds NaN or Inf"):
        fastprune.prune(model, method, sparsity=0.5, **kw)
    assert all(torch.equal(before[k].nan_to_num(), v.nan_to_num()) for k, v in model.state_dict().items())
    assert not any(hasattr(m, "weight_mask") for m in model.modules())


def encoder_model() -> nn.Module:
    model = nn.Module()
    model.encoder = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8), nn.Linear(8, 8))
    model.head = nn.Linear(8, 2)
    return model


def test_module_patterns_select_weights_not_biases_or_norms():
    # "encoder.*" used to select biases and LayerNorm weights too (glob over parameter names)
    m = encoder_model()
    assert [r.name for r in select_parameters(m, include="encoder.*")] == ["encoder.0.weight", "encoder.2.weight"]
    assert [r.name for r in select_parameters(m, include="encoder")] == ["encoder.0.weight", "encoder.2.weight"]
    assert [r.name for r in select_parameters(m, exclude="encoder")] == ["head.weight"]
    # biases and norm weights only when named
    assert "encoder.1.weight" in [r.name for r in select_parameters(m, include="encoder.1.weight")]
    biases = [r.name for r in select_parameters(m, include="*.bias")]
    assert biases == ["encoder.0.bias", "encoder.1.bias", "encoder.2.bias", "head.bias"]
    plan = fastprune.prune(encoder_model(), "magnitude", sparsity=0.5, include="encoder.*", scope="layer")
    assert sorted(plan.masks) == ["encoder.0.weight", "encoder.2.weight"]


def test_a_plan_for_another_architecture_says_so():
    plan = fastprune.prune(mlp(), "magnitude", sparsity=0.5)
    other = nn.Sequential(nn.Linear(20, 5))
    with pytest.raises(ValueError, match="2.weight, 4.weight, which the model does not have: is the plan for another"):
        plan.apply(other)
    assert not hasattr(other[0], "weight_mask")


@pytest.mark.parametrize("defect", ["mask_without_orig", "extra_key", "not_a_tensor", "missing_key"])
def test_load_pruned_changes_nothing_when_it_fails(defect):
    src = mlp()
    fastprune.prune(src, "magnitude", sparsity=0.5)
    sd = dict(src.state_dict())
    if defect == "mask_without_orig":
        sd["0.bias_mask"] = torch.ones(30)
        match = "without 0.bias_orig"
    elif defect == "extra_key":
        sd["extra.weight"] = torch.zeros(3)
        match = "unexpected extra.weight"
    elif defect == "not_a_tensor":
        sd["0.bias"] = [1.0] * 30
        match = "must be tensors"
    else:
        del sd["2.bias"]
        match = "missing 2.bias"
    fresh = mlp()
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        fastprune.load_pruned(fresh, sd)
    # used to install masks before failing
    assert not any(hasattr(m, "weight_mask") for m in fresh.modules())
    assert all(torch.equal(before[k], v) for k, v in fresh.state_dict().items())
    if defect == "extra_key":
        fastprune.load_pruned(fresh, sd, strict=False)  # strict=False ignores it, as torch does
        assert hasattr(fresh[0], "weight_mask")


def test_sparsity_report_as_json_and_markdown():
    import json

    model = mlp()
    with torch.no_grad():
        model[2].weight[3] = 0  # one dead output neuron of layer 2
    fastprune.prune(model, "magnitude", sparsity=0.5, exclude="2")
    rep = fastprune.sparsity_report(model)
    d = json.loads(json.dumps(rep.to_dict()))
    assert d["zeros"] == rep.zeros and [x["name"] for x in d["layers"]] == ["0", "2", "4"]
    assert d["layers"][1]["dead_outputs"] == 1
    md = rep.to_markdown()
    assert md.count("\n| ") == 4 and "| 2 | Linear | 450 | 30 |" in md and "dead out: output neurons" in md
    assert "dead in: inputs the layer no longer reads" in str(rep)
