"""Soft filter pruning (SFP / ASFP) on the life-cycle base: zeroing each epoch without masks,
regrowth, the asymptotic schedule, finalize's compaction, bad input."""

from __future__ import annotations

import copy

import pytest
import torch

import fastprune
from fastprune import schedules
from fastprune.train import evaluate, fit, recalibrate_bn


def digits_cnn(epochs=3):
    from fastprune import recipes

    data = fastprune.data.digits(seed=0)
    return recipes.train_dense(fastprune.models.small_cnn, data, epochs=epochs, seed=0), data


def test_the_asymptotic_schedule_has_the_closed_form_values():
    s = schedules.asymptotic(0.4, 100, d=8)
    assert s(0) == 0.0 and s(100) == pytest.approx(0.4)
    assert s(12.5) == pytest.approx(0.3, abs=1e-9)  # P(E / D) = 3/4 P
    assert s(1) == pytest.approx(0.042, abs=1e-3) and s(25) == pytest.approx(0.375, abs=1e-3)
    with pytest.raises(ValueError, match="4/3"):
        schedules.asymptotic(0.4, 100, d=1.3)


def zeroed_norms(model, pruner, zeroed):
    mods = dict(model.named_modules())
    norms = []
    for g in pruner.groups:
        for mem in g.producers:
            pos = mem.positions(zeroed.get(g.id, []))
            if pos:
                norms.append(mods[mem.module].weight.detach()[pos].flatten(1).norm(dim=1))
    return torch.cat(norms)


@pytest.mark.parametrize("zero, regrows", [("filter", True), ("channel", False)])
def test_zeroed_filters_regrow_only_when_their_bn_is_left_alone(zero, regrows):
    # measured for the default: with zero="channel" the BN output of a zeroed channel is 0 and, behind
    # the ReLU, so is every gradient to it: it never comes back (hard pruning in effect)
    dense, data = digits_cnn()
    model = copy.deepcopy(dense)
    x = torch.as_tensor(data.test_x[:1])
    sfp = fastprune.SoftFilterPruner(model, 0.4, example_inputs=x, epochs=2, schedule="constant", zero=zero)
    sfp.on_start()
    before = {k: list(v) for k, v in sfp.zeroed.items()}
    assert float(zeroed_norms(model, sfp, before).abs().max()) == 0.0
    assert not any(hasattr(m, "weight_mask") for m in model.modules())  # no masks
    torch.manual_seed(0)
    fit(model, data.train_loader(), epochs=1, lr=0.02, l2=1e-4, progress=False)
    grew = float(zeroed_norms(model, sfp, before).max())
    assert (grew > 0) == regrows, grew


def test_as_a_fit_callback_then_finalize_removes_the_zeroed_channels():
    dense, data = digits_cnn()
    model = copy.deepcopy(dense)
    x = torch.as_tensor(data.test_x[:1])
    sfp = fastprune.SoftFilterPruner(model, 0.4, example_inputs=x, epochs=4, d=2.0)
    torch.manual_seed(0)
    fit(model, data.train_loader(), epochs=4, lr=0.02, l2=1e-4, progress=False, callbacks=[sfp])
    assert sfp.rates[0] == 0.0 and sfp.rates == sorted(sfp.rates) and sfp.rates[-1] == pytest.approx(0.4)
    zeroed_model = copy.deepcopy(model).eval()
    with pytest.raises(TypeError, match="evaluate"):
        sfp.finalize(evaluate="accuracy")
    assert not sfp.finalized
    plan = sfp.finalize(evaluate=lambda m: evaluate(m, data.test_loader()))
    assert plan.method == "asfp" and plan.achieved_sparsity > 0.3
    # (a) the zeroed model, what the paper reports, and (b) the compact one: equal when exact
    assert set(sfp.accuracy) == {"zeroed", "compact"} and plan.config["accuracy_zeroed"] == sfp.accuracy["zeroed"]
    assert plan.config["compaction_exact"] and sfp.accuracy["zeroed"] == sfp.accuracy["compact"]
    assert plan.config["kept_zeroed_channels"] == len(sfp.report.kept)
    assert model.stem[0].out_channels < 16 and model.down[0].out_channels < 32
    with torch.no_grad():  # the compact model computes what the zeroed one did
        xb = torch.as_tensor(data.test_x[:32])
        torch.testing.assert_close(model.eval()(xb), zeroed_model(xb), rtol=1e-4, atol=1e-4)
    with pytest.raises(RuntimeError, match="after finalize"):
        sfp.on_epoch_end(5)


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"epochs": 0}, "epochs"),
        ({"d": 1.2}, "4/3"),
        ({"sparsity": 1.5}, "sparsity"),
        ({"criterion": "l3"}, "criterion"),
        ({"zero": "bn"}, "zero"),
        ({"exclude": "*"}, "no prunable channel groups"),
    ],
)
def test_bad_input_is_refused_and_the_model_untouched(kw, match):
    model = fastprune.models.small_cnn()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    args = {"sparsity": 0.4, "example_inputs": torch.randn(1, 1, 8, 8), "epochs": 3, **kw}
    sparsity = args.pop("sparsity")
    with pytest.raises(ValueError, match=match):
        fastprune.SoftFilterPruner(model, sparsity, **args)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    ok = fastprune.SoftFilterPruner(model, 0.4, example_inputs=torch.randn(1, 1, 8, 8), epochs=3)
    with pytest.raises(RuntimeError, match="before any zeroing step"):
        ok.finalize()


def test_recalibrate_bn_recomputes_the_statistics_as_the_average_over_batches():
    dense, data = digits_cnn(epochs=1)
    model = copy.deepcopy(dense)
    with torch.no_grad():
        model.stem[0].weight[:4] = 0  # the stored statistics now describe another network
    weights = {k: v.clone() for k, v in model.state_dict().items() if "running" not in k and "num_batches" not in k}
    batches = list(data.train_loader())[:3]
    seen = []
    h = model.stem[1].register_forward_pre_hook(lambda m, a: seen.append(a[0].detach()))
    model.eval()
    assert recalibrate_bn(model, batches) == 3
    h.remove()
    means = torch.stack([s.mean((0, 2, 3)) for s in seen])
    torch.testing.assert_close(model.stem[1].running_mean, means.mean(0))
    assert bool((model.stem[1].running_mean[:4] == 0).all())
    assert not model.training and not model.stem[1].training and model.stem[1].momentum == 0.1
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items() if k in weights)
    assert recalibrate_bn(model, batches, num_batches=1) == 1
    assert recalibrate_bn(fastprune.models.lenet_300_100(), batches) == 0  # no BatchNorm
    before = model.stem[1].running_var.clone()
    with pytest.raises(ValueError, match="no batches"):
        recalibrate_bn(model, [])
    assert torch.equal(model.stem[1].running_var, before)  # untouched on failure
    with pytest.raises(ValueError, match="num_batches"):
        recalibrate_bn(model, batches, num_batches=0)
