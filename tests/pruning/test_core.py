"""Pruning core: masks in torch's prune format, plans, one-call prune, Pruner, reports."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

import fastprune
from fastprune import MagnitudeConfig, schedules
from fastprune.masks import effective_weight


def mlp() -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 15), nn.BatchNorm1d(15), nn.ReLU(), nn.Linear(15, 5)
    )


def convnet() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 6, 3),
        nn.Flatten(),
        nn.Linear(6 * 4 * 4, 7),
    )


def zeros_of(model: nn.Module, names=None) -> tuple[int, int]:
    rep = fastprune.sparsity_report(model)
    layers = [layer for layer in rep.layers if names is None or layer.name in names]
    return sum(layer.zeros for layer in layers), sum(layer.numel for layer in layers)


@pytest.mark.parametrize("factory", [mlp, convnet])
@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.77, 0.95])
def test_exact_global_sparsity(factory, sparsity):
    model = factory()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plan = fastprune.prune(model, "magnitude", sparsity=sparsity)
    zeros, n = zeros_of(model)
    assert zeros == round(sparsity * n)
    assert plan.achieved_sparsity == pytest.approx(zeros / n)
    # biases and norm layers untouched; only weight matrices are masked
    after = model.state_dict()
    for key, value in before.items():
        if key.endswith("weight") and value.dim() >= 2:
            assert key + "_orig" in after
        else:
            assert torch.equal(after[key], value), key


@pytest.mark.parametrize("sparsity", [0.1, 0.5, 0.83])
def test_exact_layer_sparsity(sparsity):
    model = convnet()
    fastprune.prune(model, "magnitude", sparsity=sparsity, scope="layer")
    for layer in fastprune.sparsity_report(model).layers:
        assert layer.zeros == round(sparsity * layer.numel)


def test_global_prunes_smallest_magnitudes():
    model = mlp()
    before = {n: effective_weight(m, "weight").abs() for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    fastprune.prune(model, "magnitude", sparsity=0.6)
    kept_min = min(
        float(before[n][effective_weight(m, "weight") != 0].min())
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear)
    )
    pruned_max = max(
        float(before[n][effective_weight(m, "weight") == 0].max())
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear)
    )
    assert pruned_max <= kept_min


def test_dtype_device_and_surviving_values_preserved():
    model = mlp().double()
    ref = copy.deepcopy(model)
    fastprune.prune(model, "magnitude", sparsity=0.5)
    for (_, m), (_, r) in zip(model.named_modules(), ref.named_modules(), strict=True):
        if isinstance(m, nn.Linear):
            w = effective_weight(m, "weight")
            assert w.dtype == torch.float64
            keep = w != 0
            assert torch.equal(w[keep], r.weight[keep])  # survivors kept, never re-initialised


def test_include_exclude_globs():
    model = convnet()
    fastprune.prune(model, "magnitude", sparsity=0.5, include=["0", "3"], scope="layer")
    rep = fastprune.sparsity_report(model)
    assert rep["0"].zeros > 0 and rep["3"].zeros > 0 and rep["5"].zeros == 0
    model = convnet()
    fastprune.prune(model, "magnitude", sparsity=0.5, exclude="[05]", scope="layer")
    rep = fastprune.sparsity_report(model)
    assert rep["0"].zeros == 0 and rep["5"].zeros == 0 and rep["3"].zeros > 0


def test_min_remaining_keeps_every_layer_alive():
    model = nn.Sequential(nn.Linear(100, 100), nn.Linear(100, 2))
    with torch.no_grad():
        model[1].weight.mul_(1e-6)  # global magnitude would empty it
    fastprune.prune(model, "magnitude", sparsity=0.99)
    rep = fastprune.sparsity_report(model)
    assert rep["1"].numel - rep["1"].zeros >= 1
    zeros, n = zeros_of(model)
    assert zeros == round(0.99 * n)


def test_threshold_std_mode():
    model = mlp()
    ws = {n: effective_weight(m, "weight").clone() for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    plan = fastprune.prune(model, "magnitude", threshold_std=0.7)
    assert plan.target_sparsity is None
    for n, w in ws.items():
        expect = int((w.abs() < 0.7 * w.double().std()).sum())
        assert fastprune.sparsity_report(model)[n].zeros == expect
    # per-layer q
    model = mlp()
    fastprune.prune(model, "magnitude", threshold_std={"0": 1.0})
    rep = fastprune.sparsity_report(model)
    assert rep["0"].zeros > 0 and rep["2"].zeros == 0


@pytest.mark.parametrize("opt", ["sgd", "adam", "adamw"])
def test_masks_survive_optimizers(opt):
    torch.manual_seed(0)
    model = mlp()
    fastprune.prune(model, "magnitude", sparsity=0.8)
    masks = {n: effective_weight(m, "weight") == 0 for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    x, y = torch.randn(64, 20), torch.randint(0, 5, (64,))
    loader = [(x[i : i + 16], y[i : i + 16]) for i in range(0, 64, 16)]
    fastprune.train.fit(model, loader, epochs=3, lr=0.05, l2=0.1, l1=1e-3, optimizer=opt, progress=False)
    for n, m in model.named_modules():
        if isinstance(m, nn.Linear):
            w = effective_weight(m, "weight")
            assert torch.all(w[masks[n]] == 0), f"{n}: a pruned weight came back"
            # and the forward uses exactly those zeros
            model(x)
            assert torch.all(m.weight[masks[n]] == 0)


def test_state_dict_round_trip_through_load_pruned():
    torch.manual_seed(0)
    model = convnet().eval()
    fastprune.prune(model, "magnitude", sparsity=0.7)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    fresh = fastprune.load_pruned(convnet().eval(), sd)
    x = torch.randn(4, 3, 6, 6)
    assert torch.equal(fresh(x), model(x))
    assert fastprune.sparsity_report(fresh).zeros == fastprune.sparsity_report(model).zeros
    # the masks are live in the fresh model too: training keeps them
    assert torch_prune.is_pruned(fresh)


def test_plan_json_round_trip_replays_exactly(tmp_path):
    torch.manual_seed(0)
    model = convnet()
    start = copy.deepcopy(model)
    plan = fastprune.prune(model, "magnitude", sparsity=0.66, scope="layer")
    path = tmp_path / "plan.json"
    plan.to_json(str(path))
    back = fastprune.Plan.from_json(str(path))
    assert back.to_json() == plan.to_json()
    assert back.method == "magnitude" and back.config["scope"] == "layer"
    back.apply(start)
    for (_, a), (_, b) in zip(model.named_modules(), start.named_modules(), strict=True):
        if isinstance(a, (nn.Linear, nn.Conv2d)):
            assert torch.equal(a.weight_mask, b.weight_mask)
    x = torch.randn(2, 3, 6, 6)
    assert torch.equal(model.eval()(x), start.eval()(x))


def test_interop_with_torch_prune():
    # torch -> fastprune report
    model = mlp()
    torch_prune.l1_unstructured(model[0], "weight", amount=0.4)
    rep = fastprune.sparsity_report(model)
    assert rep["0"].zeros == round(0.4 * 600)
    # fastprune on top of torch's mask keeps it, and torch.nn.utils.prune.remove finalises
    fastprune.prune(model, "magnitude", sparsity=0.5, scope="layer")
    assert fastprune.sparsity_report(model)["0"].zeros >= round(0.5 * 600)
    torch_prune.remove(model[0], "weight")
    fastprune.finalize(model)
    assert not torch_prune.is_pruned(model)
    assert fastprune.sparsity_report(model)["0"].zeros >= round(0.5 * 600)


def test_tied_weights_pruned_once():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(10, 10)
            self.b = nn.Linear(10, 10)
            self.b.weight = self.a.weight

        def forward(self, x):
            return self.b(self.a(x))

    model = Tied()
    plan = fastprune.prune(model, "magnitude", sparsity=0.5)
    assert list(plan.masks) == ["a.weight"]
    assert torch.equal(model.a.weight_mask, model.b.weight_mask)
    model(torch.randn(2, 10))
    assert torch.equal(model.a.weight, model.b.weight)
    assert int((model.a.weight == 0).sum()) == 50


def test_dry_run_and_failed_calls_leave_model_unchanged():
    model = mlp()
    before = copy.deepcopy(model.state_dict())
    plan = fastprune.prune(model, "magnitude", sparsity=0.5, dry_run=True)
    assert plan.achieved_sparsity == pytest.approx(0.5, abs=1e-3)
    assert not torch_prune.is_pruned(model)
    bad = [
        (ValueError, dict(sparsity=1.0)),
        (ValueError, dict(sparsity=-0.1)),
        (ValueError, dict(sparsity=float("nan"))),
        (ValueError, dict(sparsity=0.5, include="nope*")),
        (ValueError, dict(sparsity=0.5, exclude=["0", "missing"])),
        (ValueError, dict(threshold_std=-1.0)),
        (ValueError, dict(sparsity=0.5, threshold_std=1.0)),
        (ValueError, dict(sparsity=0.5, scope="block")),
        (TypeError, dict(sparsity=0.5, sparsty=0.4)),
    ]
    for exc, kw in bad:
        with pytest.raises(exc):
            fastprune.prune(model, "magnitude", **kw)
    with pytest.raises(ValueError, match="unknown method"):
        fastprune.prune(model, "magnitud", sparsity=0.5)
    with pytest.raises(TypeError, match="valid"):
        fastprune.prune(model, "magnitude", sparsity=0.5, spars=1)
    with pytest.raises(ValueError, match="no prunable"):
        fastprune.prune(nn.Sequential(nn.ReLU(), nn.BatchNorm1d(3)), "magnitude", sparsity=0.5)
    assert not torch_prune.is_pruned(model)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_explicit_config_form():
    model = mlp()
    plan = fastprune.prune(model, config=MagnitudeConfig(sparsity=0.4, scope="layer"))
    assert plan.config["scope"] == "layer"
    with pytest.raises(TypeError, match="either config"):
        fastprune.prune(model, config=MagnitudeConfig(sparsity=0.4), sparsity=0.5)


def test_pruner_gradual_masks_only_grow():
    model = mlp()
    pruner = fastprune.Pruner(model, "magnitude", schedule=schedules.cubic(0.2, 0.9, 0, 3), scope="global")
    prev = None
    targets = []
    for _ in range(4):
        plan = pruner.step()
        targets.append(plan.target_sparsity)
        masks = {n: m.weight_mask.clone() for n, m in model.named_modules() if isinstance(m, nn.Linear)}
        if prev is not None:
            for n in masks:
                assert torch.all(masks[n] <= prev[n])
        prev = masks
    assert targets == sorted(targets) and targets[-1] == pytest.approx(0.9)
    zeros, n = zeros_of(model)
    assert zeros == round(0.9 * n)
    with pytest.raises(TypeError, match="schedule"):
        fastprune.Pruner(model, "magnitude", schedule=schedules.constant(0.5), sparsity=0.4)


def test_schedules():
    a = schedules.asymptotic(0.4, 100)
    assert a(0) == 0.0 and a(100) == pytest.approx(0.4)
    assert a(1) == pytest.approx(0.042, abs=1e-3)
    assert a(12.5) == pytest.approx(0.30, abs=1e-9)
    assert a(25) == pytest.approx(0.375, abs=1e-3)
    assert a.ke == pytest.approx(11.09, abs=0.01)
    c = schedules.cubic(0.0, 0.9, 10, 20)
    assert c(0) == 0.0 and c(10) == 0.0 and c(20) == pytest.approx(0.9) and c(99) == pytest.approx(0.9)
    assert c(15) == pytest.approx(0.9 * (1 - 0.5**3))
    lin = schedules.linear(0.1, 0.5, 0, 4)
    assert [lin(t) for t in range(5)] == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5])
    assert schedules.constant(0.3)(7) == 0.3
    for bad in (
        lambda: schedules.linear(0.5, 0.1, 0, 4),
        lambda: schedules.cubic(0.9, 0.1, 0, 5),
        lambda: schedules.linear(0.1, 0.5, 4, 4),
        lambda: schedules.constant(1.0),
        lambda: schedules.asymptotic(0.4, 100, d=1.2),
        lambda: schedules.asymptotic(0.4, 0),
    ):
        with pytest.raises(ValueError):
            bad()
    with pytest.raises(ValueError):
        schedules.constant(0.3)(-1)


def test_rescale_dropout_formula():
    model = fastprune.models.lenet_300_100(dropout=0.5)
    plan = fastprune.prune(model, "magnitude", sparsity=0.75, scope="layer")
    changes = fastprune.rescale_dropout(model, plan)
    assert len(changes) == 2
    for old, new in changes.values():
        assert new == pytest.approx(old * math.sqrt(0.25), rel=1e-3)


def test_dead_neurons_reported():
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    mask = torch.ones(3, 4)
    mask[1] = 0  # neuron 1 of layer 0 has no inputs
    torch_prune.custom_from_mask(model[0], "weight", mask)
    rep = fastprune.sparsity_report(model)
    assert rep["0"].dead_outputs == 1 and rep["0"].dead_inputs == 0
    assert "dead" in str(rep)


def test_sensitivity_scan_leaves_model_alone(tmp_path):
    torch.manual_seed(0)
    model = mlp().eval()
    x = torch.randn(32, 20)
    ref = model(x).detach()
    res = fastprune.sensitivity(
        model,
        lambda m: float(-((m(x) - ref) ** 2).mean().detach()),
        sparsities=[0.5, 0.9],
        plot=str(tmp_path / "s.png"),
    )
    assert set(res.scores) == {"0.weight", "2.weight", "5.weight"}
    assert all(v[0] >= v[1] for v in res.scores.values())  # more pruning, more damage
    assert not torch_prune.is_pruned(model)
    assert (tmp_path / "s.png").stat().st_size > 0
    assert "0.weight" in str(res)


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_block_pruning_gives_rows_sharing_patterns(scope):
    model = nn.Sequential(nn.Conv2d(3, 10, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(10 * 6 * 6, 13))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plan = fastprune.prune(model, "magnitude", sparsity=0.8, scope=scope, block=4)
    zeros, n = zeros_of(model)
    assert zeros == round(0.8 * n)  # the count stays exact
    assert plan.config["block"] == 4
    for name in ["0", "3"]:
        w = effective_weight(model.get_submodule(name), "weight").reshape(before[f"{name}.weight"].shape[0], -1)
        split = 0
        for g0 in range(0, w.shape[0], 4):
            pats = w[g0 : g0 + 4] != 0
            split += int((pats != pats[0]).any(dim=0).sum())  # positions where the group disagrees
        assert split <= 1, (name, split)  # at most the group at the threshold is split
        # kept positions are those whose group mean |w| is largest
        score = fastprune.importance.magnitude.block_scores(before[f"{name}.weight"].abs(), 4).reshape(w.shape)
        kept, pruned = score[w != 0], score[w == 0]
        if scope == "layer":
            assert kept.min() >= pruned.max() - 1e-7
    # rows sharing a pattern pack to equal column lists
    rp, col, _ = fastprune.ops.pack_sparse(effective_weight(model[3], "weight").detach())
    rows = [col[rp[r] : rp[r + 1]].tolist() for r in range(13)]
    assert sum(any(rows[r] != rows[g0] for r in range(g0, min(g0 + 4, 13))) for g0 in range(0, 13, 4)) <= 1


def test_block_scores_and_bad_block():
    from fastprune.importance.magnitude import block_scores

    s = torch.arange(10.0).reshape(5, 2)
    got = block_scores(s, 2)
    torch.testing.assert_close(got, torch.tensor([[1.0, 2.0], [1.0, 2.0], [5.0, 6.0], [5.0, 6.0], [8.0, 9.0]]))
    assert block_scores(s, 1) is s
    with pytest.raises(ValueError, match="block"):
        fastprune.prune(mlp(), "magnitude", sparsity=0.5, block=0)
    with pytest.raises(ValueError, match="block"):
        MagnitudeConfig(sparsity=0.5, block=2.0)
    # Han's threshold mode compares the group mean
    model = mlp()
    fastprune.prune(model, "magnitude", threshold_std={"*": 1.0}, block=5)
    w = effective_weight(model[0], "weight")
    assert ((w[0:5] != 0) == (w[0] != 0)).all()
