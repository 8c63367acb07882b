"""The method registry (config type -> runner), typed results, the one apply path, data-reading
channel criteria, and pruners with a life cycle."""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import nn

import fastprune
from fastprune import methods, schedules
from fastprune.importance import ActivationCriterion, scatter_to_group
from fastprune.methods import registry
from fastprune.train import fit


def bn_net() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 6, 3),
        nn.Flatten(),
        nn.Linear(6 * 4 * 4, 7),
    )


X = torch.randn(2, 3, 6, 6)


def tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(a[k].shape == b[k].shape and torch.equal(a[k], b[k]) for k in a)


# -- the registry: config -> method is one-to-one ---------------------------------------------------------
def test_every_registered_method_has_its_own_config_type():
    specs = methods.methods()
    assert set(specs) >= {"magnitude", "woodfisher", "fisher_diag", "l1_filter", "l2_filter", "bn_scale", "random"}
    classes = [s.config_cls for s in specs.values()]
    assert len(set(classes)) == len(classes)
    for name, spec in specs.items():
        assert methods.spec_for(name) is spec
        assert spec.run.__module__.startswith("fastprune.methods."), (name, spec.run.__module__)
        assert dataclasses.is_dataclass(spec.config_cls) and spec.config_cls.__dataclass_params__.frozen
    assert "woodfisher" in methods.table() and "WoodFisherConfig" in methods.table()


def test_channel_base_config_is_not_a_method():
    # bug: ChannelConfig(...) used to run l1_filter silently under prune(m, config=...)
    with pytest.raises(TypeError, match="L1FilterConfig"):
        fastprune.ChannelConfig(sparsity=0.5, example_inputs=X)


@pytest.mark.parametrize(
    "name, cls",
    [
        ("l1_filter", fastprune.L1FilterConfig),
        ("l2_filter", fastprune.L2FilterConfig),
        ("bn_scale", fastprune.BNScaleConfig),
        ("random", fastprune.RandomChannelConfig),
    ],
)
def test_a_channel_config_runs_its_own_criterion(name, cls):
    by_kw, by_cfg, by_both = bn_net().eval(), None, None
    by_cfg = copy.deepcopy(by_kw)
    by_both = copy.deepcopy(by_kw)
    p1 = fastprune.prune(by_kw, name, sparsity=0.5, example_inputs=X, mode="mask")
    p2 = fastprune.prune(by_cfg, config=cls(sparsity=0.5, example_inputs=X, mode="mask"))
    # bug: prune(m, "bn_scale", config=ChannelConfig(...)) used to raise
    p3 = fastprune.prune(by_both, name, config=cls(sparsity=0.5, example_inputs=X, mode="mask"))
    assert p1.method == p2.method == p3.method == name
    assert [g["removed"] for g in p1.groups] == [g["removed"] for g in p2.groups] == [g["removed"] for g in p3.groups]
    assert same(tensors(by_kw), tensors(by_cfg))


def test_the_criteria_differ_on_the_same_model():
    # l1, bn_scale and random pick different channels here: each config really runs its criterion
    torch.manual_seed(3)
    model = bn_net().eval()
    with torch.no_grad():
        model[1].weight.copy_(torch.linspace(2.0, 0.1, 8))  # gamma ranks channels opposite to ...
        model[0].weight.mul_(torch.linspace(0.1, 2.0, 8).reshape(8, 1, 1, 1) / model[0].weight.abs().mean())
    picks = {}
    for name in ("l1_filter", "bn_scale", "random"):
        plan = fastprune.prune(copy.deepcopy(model), name, sparsity=0.5, example_inputs=X, dry_run=True)
        picks[name] = plan.groups[0]["removed"]
    assert picks["l1_filter"] == [0, 1, 2, 3] and picks["bn_scale"] == [4, 5, 6, 7]
    assert picks["random"] not in (picks["l1_filter"], picks["bn_scale"])


@pytest.mark.parametrize(
    "method, config",
    [
        ("magnitude", lambda: fastprune.WoodFisherConfig(sparsity=0.5, data=[(X, torch.zeros(2, dtype=torch.long))])),
        ("l1_filter", lambda: fastprune.L2FilterConfig(sparsity=0.5, example_inputs=X)),
        ("woodfisher", lambda: fastprune.MagnitudeConfig(sparsity=0.5)),
    ],
)
def test_a_method_name_that_disagrees_with_the_config_is_refused(method, config):
    # bug: prune(m, "magnitude", config=WoodFisherConfig(...)) used to be accepted (and run WoodFisher)
    model = bn_net()
    before = tensors(model)
    with pytest.raises(ValueError, match="but config is a"):
        fastprune.prune(model, method, config=config())
    assert same(before, tensors(model))


def test_unknown_configs_keywords_and_double_registration():
    @dataclass(frozen=True)
    class NotRegistered:
        sparsity: float = 0.5

    with pytest.raises(TypeError, match="belongs to no registered method"):
        fastprune.prune(bn_net(), config=NotRegistered())
    with pytest.raises(TypeError, match="unexpected keyword.*seed"):  # seed is random's alone
        fastprune.prune(bn_net(), "l1_filter", sparsity=0.5, example_inputs=X, seed=3)
    with pytest.raises(ValueError, match="already belongs"):
        registry.register_method(fastprune.MagnitudeConfig, name="magnitude2")(lambda m, c: None)
    with pytest.raises(ValueError, match="already registered"):
        registry.register_method(NotRegistered, name="magnitude")(lambda m, c: None)
    with pytest.raises(ValueError, match="unknown method"):
        fastprune.prune(bn_net(), "nisp_soon", sparsity=0.5)


def test_runners_return_typed_results_and_leave_the_model_alone():
    data = [(X, torch.randint(0, 7, (2,))) for _ in range(4)]
    cases = [
        fastprune.MagnitudeConfig(sparsity=0.5),
        fastprune.WoodFisherConfig(sparsity=0.5, data=data, num_grads=8, progress=False),
        fastprune.FisherDiagConfig(sparsity=0.5, data=data, num_grads=8, progress=False),
        fastprune.L1FilterConfig(sparsity=0.5, example_inputs=X),
        fastprune.RandomChannelConfig(sparsity=0.5, example_inputs=X, seed=2),
    ]
    for cfg in cases:
        model = bn_net().eval()
        before = tensors(model)
        result = registry.method_for_config(cfg).run(model, cfg)
        assert isinstance(result, fastprune.MethodResult) and isinstance(result.plan, fastprune.Plan)
        assert same(before, tensors(model)), type(cfg).__name__
        if isinstance(cfg, fastprune.WoodFisherConfig):
            assert result.weight_updates is not None and set(result.weight_updates) == set(result.plan.masks)
        elif isinstance(cfg, fastprune.ChannelConfig):
            assert result.trace is not None and result.plan.groups and result.weight_updates is None
        else:
            assert result.weight_updates is None and result.trace is None


# -- one apply path ---------------------------------------------------------------------------------------
def test_plan_apply_is_fastprune_apply():
    a, b, c = bn_net(), None, None
    b, c = copy.deepcopy(a), copy.deepcopy(a)
    plan = fastprune.prune(a, "magnitude", sparsity=0.6)
    plan.apply(b)
    fastprune.apply(c, fastprune.Plan.from_json(plan.to_json()))
    assert same(tensors(a), tensors(b)) and same(tensors(a), tensors(c))
    d, e = bn_net().eval(), None
    e = copy.deepcopy(d)
    cplan = fastprune.prune(d, "l1_filter", sparsity=0.5, example_inputs=X)
    fastprune.Plan.from_json(cplan.to_json()).apply(e)
    assert same(tensors(d), tensors(e)) and d[0].out_channels == e[0].out_channels == 4


def test_apply_validates_everything_before_changing_anything():
    model = bn_net()
    plan = fastprune.prune(copy.deepcopy(model), "magnitude", sparsity=0.6, dry_run=True)
    masks = dict(plan.masks)
    masks["5.weight"] = torch.ones(3, 3, dtype=torch.bool)  # the last layer's mask has the wrong shape
    bad = dataclasses.replace(plan, masks=masks)
    before = tensors(model)
    with pytest.raises(ValueError, match="shape"):
        fastprune.apply(model, bad)
    assert same(before, tensors(model)) and not hasattr(model[0], "weight_mask")  # the first layer untouched too
    with pytest.raises(ValueError, match="does not prune"):
        fastprune.apply(model, plan, weight_updates={"nope.weight": torch.zeros(1)})
    assert same(before, tensors(model))
    # a channel plan for another architecture
    cplan = fastprune.prune(bn_net().eval(), "l1_filter", sparsity=0.5, example_inputs=X, dry_run=True)
    other = nn.Sequential(
        nn.Conv2d(3, 5, 3, padding=1),
        nn.BatchNorm2d(5),
        nn.ReLU(),
        nn.Conv2d(5, 6, 3),
        nn.Flatten(),
        nn.Linear(6 * 4 * 4, 7),
    )
    before = tensors(other)
    with pytest.raises(ValueError, match="does not match the model"):
        fastprune.apply(other, cplan)
    assert same(before, tensors(other))
    with pytest.raises(TypeError, match="fastprune.Plan"):
        fastprune.apply(model, {"masks": {}})


# -- a data-reading criterion plugs in without special cases ------------------------------------------------
class MeanAbsActivation(ActivationCriterion):
    """Mean |output| of each channel over the data (a stand-in for NISP / SInGE's data-driven scores)."""

    def reset(self, model, groups):
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}

    def observe(self, name, module, output, channel_dim):
        per = output.abs().movedim(channel_dim, -1).reshape(-1, output.shape[channel_dim])
        self.sums[name] = self.sums.get(name, 0) + per.sum(0).double()
        self.counts[name] = self.counts.get(name, 0) + per.shape[0]

    def score(self, model, groups):
        out = {}
        for g in groups:
            s = scatter_to_group(g, [(m, self.sums[m.module] / self.counts[m.module]) for m in g.producers])
            if s is not None:
                out[g.id] = s
        return out


@dataclass(frozen=True)
class MeanActivationConfig(fastprune.ChannelConfig):
    data: Any = None

    def criterion(self):
        return MeanAbsActivation()

    def calibration_data(self):
        return self.data


@pytest.fixture
def mean_activation_method():
    registry.register_method(MeanActivationConfig, name="mean_activation", description="test")(methods.run_channels)
    yield
    registry.unregister_method("mean_activation")


def test_a_data_reading_criterion_is_one_config_and_one_criterion(mean_activation_method):
    torch.manual_seed(0)
    model = bn_net().eval()
    batches = [torch.randn(4, 3, 6, 6) for _ in range(3)]
    plan = fastprune.prune(
        copy.deepcopy(model), "mean_activation", sparsity=0.5, example_inputs=X, data=batches, dry_run=True
    )
    # the expected scores, by hand: the first conv's mean |output| per channel over every position
    with torch.no_grad():
        acts = torch.cat([model[0](b).abs().movedim(1, -1).reshape(-1, 8) for b in batches]).double().mean(0)
    want = sorted(torch.argsort(acts, stable=True)[:4].tolist())
    first = next(g for g in plan.groups if any(m["module"] == "0" and m["role"] == "out" for m in g["members"]))
    assert first["removed"] == want
    # batches as (inputs, targets) tuples and as dicts of keyword arguments give the same plan
    for wrap in (lambda b: (b, torch.zeros(len(b))), lambda b: {"input": b}):
        again = fastprune.prune(
            copy.deepcopy(model),
            "mean_activation",
            sparsity=0.5,
            example_inputs=X,
            data=[wrap(b) for b in batches],
            dry_run=True,
        )
        assert [g["removed"] for g in again.groups] == [g["removed"] for g in plan.groups]
    with pytest.raises(ValueError, match="reads activations: pass data="):
        fastprune.prune(copy.deepcopy(model), "mean_activation", sparsity=0.5, example_inputs=X)
    assert not any(m._forward_hooks for m in model.modules())  # hooks removed


# -- pruners with a life cycle --------------------------------------------------------------------------------
class Recorder(fastprune.BasePruner):
    def __init__(self, model):
        super().__init__(model)
        self.calls: list[tuple[str, int]] = []

    def start(self):
        self.calls.append(("start", -1))

    def on_step(self, step):
        super().on_step(step)
        self.calls.append(("step", step))

    def on_epoch_end(self, epoch):
        super().on_epoch_end(epoch)
        self.calls.append(("epoch", epoch))


def _loader(n=24, batch=8):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, 6, 6, generator=g)
    y = torch.randint(0, 7, (n,), generator=g)
    return [(x[i : i + batch], y[i : i + batch]) for i in range(0, n, batch)]


def test_fit_calls_the_hooks_in_order():
    model = bn_net()
    rec = Recorder(model)
    fit(model, _loader(), epochs=2, lr=0.01, progress=False, callbacks=[rec])
    assert rec.calls == [
        ("start", -1),
        ("step", 0),
        ("step", 1),
        ("step", 2),
        ("epoch", 0),
        ("step", 3),
        ("step", 4),
        ("step", 5),
        ("epoch", 1),
    ]
    fit(model, _loader(), epochs=1, lr=0.01, progress=False, callbacks=[rec])
    assert rec.calls.count(("start", -1)) == 1  # a pruner starts once
    rec.finalize()
    with pytest.raises(RuntimeError, match="after finalize"):
        rec.on_epoch_end(3)
    with pytest.raises(TypeError, match="on_start"):
        fit(model, _loader(), epochs=1, lr=0.01, progress=False, callbacks=[object()])


def test_pruner_as_a_callback_follows_its_schedule_and_finalizes():
    torch.manual_seed(0)
    model = bn_net()
    sched = schedules.linear(0.3, 0.7, 0, 2)
    pruner = fastprune.Pruner(model, "magnitude", schedule=sched)
    seen = []

    class Watch(fastprune.BasePruner):
        def on_epoch_end(self, epoch):
            seen.append(fastprune.sparsity_report(model).sparsity)

    fit(model, _loader(), epochs=3, lr=0.01, progress=False, callbacks=[pruner, Watch(model)])
    # epoch e trained at schedule(e); the watcher runs after the pruner's epoch-end step (schedule(e + 1))
    assert [round(p.achieved_sparsity, 2) for p in pruner.plans] == [0.3, 0.5, 0.7, 0.7]
    assert seen == pytest.approx([0.5, 0.7, 0.7], abs=0.01)
    last = pruner.finalize()
    assert last is pruner.plans[-1]
    assert not any(hasattr(m, "weight_mask") for m in model.modules())  # masks made permanent
    assert fastprune.sparsity_report(model).sparsity == pytest.approx(0.7, abs=0.01)


class SoftZero(fastprune.BasePruner):
    """Zeroes each epoch the conv filters with the lowest L2 norm, without masks: they may come back
    (the shape SFP needs from the base)."""

    def __init__(self, model, k):
        super().__init__(model)
        self.k = k
        self.zeroed: list[list[int]] = []

    def _zero(self):
        conv = self.model[0]
        with torch.no_grad():
            norms = conv.weight.flatten(1).norm(dim=1)
            idx = torch.argsort(norms, stable=True)[: self.k]
            conv.weight[idx] = 0
            conv.bias[idx] = 0
        self.zeroed.append(sorted(idx.tolist()))

    def start(self):
        self._zero()

    def on_epoch_end(self, epoch):
        super().on_epoch_end(epoch)
        self._zero()


def test_the_base_supports_soft_pruning_where_zeroed_filters_regrow():
    torch.manual_seed(0)
    # tanh'(0) = 1: a zeroed filter gets gradients (after BN + ReLU with beta = 0 it would not: issue 16)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.Tanh(), nn.Conv2d(8, 6, 3), nn.Flatten(), nn.Linear(6 * 4 * 4, 7)
    )
    soft = SoftZero(model, k=3)
    regrown = []

    class Probe(fastprune.BasePruner):
        def on_step(self, step):
            if step in (2, 5):  # each epoch's last step, before the next zeroing
                w = model[0].weight.detach().flatten(1).norm(dim=1)
                regrown.append(all(float(w[i]) > 0 for i in soft.zeroed[-1]))

    fit(model, _loader(), epochs=2, lr=0.05, progress=False, callbacks=[soft, Probe(model)])
    assert regrown == [True, True]  # trained back from zero: no mask held them
    assert not hasattr(model[0], "weight_mask")


def test_per_layer_ratios_as_nisp_prunes():
    x = torch.randn(1, 1, 8, 8)
    m = fastprune.models.small_cnn().eval()
    data = [torch.randn(8, 1, 8, 8) for _ in range(2)]
    plan = fastprune.prune(
        m, "nisp", sparsity=0.5, data=data, example_inputs=x, layer_sparsity={"down.*": 0.25, "stem.0": 0.75}
    )
    # stem.0 writes the residual stream (with block.conv2): that group takes 0.75; block.conv1 the default
    assert (m.stem[0].out_channels, m.down[0].out_channels, m.block.conv1.out_channels) == (4, 24, 8)
    assert plan.config["layer_sparsity"] == {"down.*": 0.25, "stem.0": 0.75}
    with pytest.raises(ValueError, match="match no prunable layer"):
        fastprune.prune(
            fastprune.models.small_cnn().eval(),
            "l1_filter",
            sparsity=0.5,
            example_inputs=x,
            layer_sparsity={"nope": 0.2},
        )
    with pytest.raises(ValueError, match="scope='layer'"):
        fastprune.L1FilterConfig(sparsity=0.5, example_inputs=x, scope="global", layer_sparsity={"down.*": 0.2})
    with pytest.raises(ValueError, match=r"layer_sparsity\['down.\*'\]"):
        fastprune.L1FilterConfig(sparsity=0.5, example_inputs=x, layer_sparsity={"down.*": 1.2})
