"""Compaction through channel-wise chains (issue 16 item 3): expansion -> BN -> act -> depthwise ->
BN -> act (-> squeeze-excite gate) -> projection, on MobileNetV2- and EfficientNet-style blocks.
The compact model must compute what the zeroed model computed, exactly where that is claimed, and
the measured deviation where folding is approximate."""

from __future__ import annotations

import copy

import pytest
import torch
from tests.structure import zoo
from torch import nn

import fastprune
from fastprune.structure import compact, find_groups
from fastprune.structure.surgery import mask_channels
from fastprune.structure.zeros import channel_states

CHANS = [1, 5, 9, 30]


def _group_of(groups, producer: str):
    return next(g for g in groups if any(m.module == producer for m in g.producers))


def _max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def _zero_expansion(model: nn.Module, conv: nn.Conv2d, bn: nn.BatchNorm2d, *, gamma_beta: bool, beta=None) -> None:
    with torch.no_grad():
        conv.weight[CHANS] = 0
        if gamma_beta:
            bn.weight[CHANS] = 0
            bn.bias[CHANS] = 0
        if beta is not None:
            bn.bias[CHANS] = beta


def _check_exact(model: nn.Module, x: torch.Tensor, **kw) -> fastprune.structure.CompactionReport:
    zeroed = copy.deepcopy(model)
    rep = compact(model, x, verify=True, **kw)
    xb = torch.randn(5, *x.shape[1:])  # other inputs than the ones compaction saw
    with torch.no_grad():
        assert _max_rel(model(xb), zeroed(xb)) < 1e-5
    return rep


def test_mobilenet_expansion_filter_and_bn_zeroed_removes_the_whole_chain():
    # the case found in issue 16: only the expansion conv and its BN gamma/beta are zero, the depthwise
    # filter and the second BN are not: 0 -> relu6 -> 0 -> depthwise (no bias) -> 0 -> BN2 -> constant
    # -> relu6 -> constant -> the 1x1 projection (no bias) -> folded into the next BN's running mean
    model, x = zoo.build("mobilenetv2")
    blk = model.features[2].conv
    _zero_expansion(model, blk[0], blk[1], gamma_beta=True)
    mean_before = blk[7].running_mean.clone()
    rep = _check_exact(model, x)
    assert rep.num_removed == len(CHANS) and not rep.kept and not rep.approximate
    assert blk[0].out_channels == blk[3].groups == blk[3].out_channels == blk[6].in_channels == 64 - len(CHANS)
    assert rep.folded == ["features.2.conv.7.running_mean"] and blk[6].bias is None
    assert not torch.equal(blk[7].running_mean, mean_before)


def test_mobilenet_filter_only_with_a_zero_activation_is_exact():
    # BN1 maps the zero filter to beta - gamma mu / sigma; a negative one is cut to 0 by ReLU6
    model, x = zoo.build("mobilenetv2")
    blk = model.features[2].conv
    _zero_expansion(model, blk[0], blk[1], gamma_beta=False, beta=-10.0)
    rep = _check_exact(model, x)
    assert rep.num_removed == len(CHANS) and not rep.approximate


def test_mobilenet_filter_only_positive_constant_through_a_padded_depthwise_is_not_exact():
    # a nonzero constant through the padded 3x3 depthwise differs at the border: kept, or folded
    # approximately (its mean over the map) with the deviation measured. (A channel that ReLU6
    # saturates after BN2 is uniform again, 0 or 6 everywhere, and removed exactly.)
    model, x = zoo.build("mobilenetv2")
    blk = model.features[2].conv
    _zero_expansion(model, blk[0], blk[1], gamma_beta=False, beta=2.0)
    kept = copy.deepcopy(model)
    rep = _check_exact(kept, x)
    assert rep.kept and rep.num_removed + len(rep.kept) == len(CHANS)
    assert all("not uniform over space" in why for _, _, why in rep.kept)
    ref = model(x)
    rep = compact(model, x, allow_approximate=True)
    assert rep.num_removed == len(CHANS) and rep.approximate and rep.max_abs_diff > 0
    with torch.no_grad():
        assert float((model(x) - ref).abs().max()) == pytest.approx(rep.max_abs_diff, rel=1e-5)


def test_an_unpadded_depthwise_passes_a_constant_exactly():
    torch.manual_seed(0)
    model = zoo.randomise(
        nn.Sequential(
            nn.Conv2d(3, 8, 1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 8, 3, groups=8),  # padding 0: every output point sees the same 9 taps
            nn.BatchNorm2d(8),
            nn.Sigmoid(),
            nn.Conv2d(8, 4, 1),
        )
    )
    with torch.no_grad():
        model[0].weight[[2, 6]] = 0
        model[0].bias[[2, 6]] = torch.tensor([0.7, 1.5])
    x = torch.randn(2, 3, 9, 9)
    rep = _check_exact(model, x)
    assert rep.num_removed == 2 and rep.folded == ["6.bias"] and not rep.approximate


@pytest.mark.parametrize("zero_norm", [False, True], ids=["filter", "channel"])
def test_efficientnet_block_with_squeeze_excite_compacts_exactly(zero_norm):
    # zeroing the whole group (expansion, depthwise and the SE gate's rows; with "channel" the two
    # BNs as well): the gate of a removed channel is sigmoid(its bias), a constant, so the product is
    # constant and folds into the projection; the SE reduce conv absorbs the pooled constant
    model, x = zoo.build("efficientnet")
    groups = find_groups(model, x)
    g = _group_of(groups, "blocks.1.expand.0")
    assert {"blocks.1.dw.0", "blocks.1.se_expand"} <= {m.module for m in g.producers}
    mask_channels(model, groups, {g.id: CHANS}, hard=False, zero_norm=zero_norm)
    rep = _check_exact(model, x)
    assert rep.removed.get(g.id) == CHANS and not rep.kept and not rep.approximate
    blk = model.blocks[1]
    assert blk.se_expand.out_channels == blk.se_reduce.in_channels == blk.project[0].in_channels == 64 - len(CHANS)
    if not zero_norm:
        assert "blocks.1.se_reduce.bias" in rep.folded


def test_efficientnet_expansion_alone_zeroed_is_kept_behind_the_data_dependent_gate():
    # only the expansion conv and BN1 are zero: BN2 turns the channel into a nonzero constant, the SE
    # gate multiplies it by a value that depends on the input: not removable, and not claimed
    model, x = zoo.build("efficientnet")
    blk = model.blocks[1]
    _zero_expansion(model, blk.expand[0], blk.expand[1], gamma_beta=True)
    before = [p.shape for p in model.parameters()]
    rep = compact(model, x, channels=None)
    assert rep.num_removed == 0 and [p.shape for p in model.parameters()] == before
    # ... and the analysis says why: the projection reads the channel, not fixed
    groups = find_groups(model, x)
    g = _group_of(groups, "blocks.1.expand.0")
    root = groups._trace[3][g.id][CHANS[0]]
    states = channel_states(model, groups._trace, [root])
    assert states.fixed_everywhere("blocks.1.se_reduce", root) is True  # the pooled constant
    assert states.fixed_everywhere("blocks.1.project.0", root) is False


@pytest.mark.parametrize("name", ["mobilenetv2", "efficientnet"])
def test_soft_filter_pruner_on_inverted_residuals_compacts_to_the_zeroed_model(name):
    model, x = zoo.build(name)
    model.train()
    sfp = fastprune.SoftFilterPruner(model, 0.4, example_inputs=x, epochs=2, schedule="constant")
    sfp.on_start()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(3):  # a few steps: zeroed filters regrow, then the epoch end zeroes again
        opt.zero_grad()
        model(torch.randn(8, *x.shape[1:])).square().mean().backward()
        opt.step()
    sfp.on_epoch_end(0)
    zeroed = copy.deepcopy(model).eval()
    plan = sfp.finalize()
    assert not sfp.report.kept and plan.achieved_sparsity > 0.3
    xb = torch.randn(4, *x.shape[1:])
    with torch.no_grad():
        assert _max_rel(model.eval()(xb), zeroed(xb)) < 1e-5


def test_structural_fixedness_agrees_with_a_forward_on_random_inputs():
    # every channel the analysis calls fixed at a consumer reads the same map for two unrelated inputs
    from fastprune.structure.surgery import _capture_inputs

    for name in ("mobilenetv2", "efficientnet", "resnet", "squeeze_excite"):
        model, x = zoo.build(name)
        groups = find_groups(model, x)
        for g in groups:  # zero a third of each group's first producer only
            mem = g.producers[0]
            w = dict(model.named_modules())[mem.module].weight
            with torch.no_grad():
                w.index_fill_(mem.dim, torch.tensor(mem.positions(range(0, g.channels, 3))), 0)
        roots = {groups._trace[3][g.id][c]: (g, c) for g in groups for c in range(g.channels)}
        states = channel_states(model, groups._trace, roots)
        checked = 0
        for r, (g, c) in roots.items():
            for m in g.members:
                if m.role == "in" and m.positions([c]) and states.fixed_everywhere(m.module, r):
                    pos = torch.tensor(m.positions([c]))
                    a, _ = _capture_inputs(model, {m.module: pos}, (torch.randn(*x.shape),))
                    b, _ = _capture_inputs(model, {m.module: pos}, (torch.randn(*x.shape) * 3,))
                    for (ha, la, _), (hb, lb, _) in zip(a[m.module], b[m.module], strict=True):
                        torch.testing.assert_close(ha, hb, rtol=0, atol=1e-6)
                        torch.testing.assert_close(la, lb, rtol=0, atol=1e-6)
                    checked += 1
        assert checked, name
