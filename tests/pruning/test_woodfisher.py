"""WoodFisher (Singh & Alistarh 2020): OBS closed forms, reductions, exact sparsity, bad input,
and the paper's claim in direction on the digits."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

import fastprune
from fastprune import recipes
from fastprune.masks import effective_weight
from fastprune.train import evaluate


def tiny_problem(n=24, seed=0):
    gen = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 3, bias=False)).double()
    with torch.no_grad():
        model[0].weight.copy_(torch.randn(3, 4, generator=gen, dtype=torch.float64))
    x = torch.randn(n, 4, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=gen)
    return model, [(x[:10], y[:10]), (x[10:], y[10:])], x, y


def dense_obs(model, x, y, damp, k, joint):
    """OBS by hand in float64: per-sample gradients by autograd, dense F, explicit inverse."""
    w0 = model[0].weight.detach().clone().reshape(-1)
    grads = []
    for i in range(len(y)):
        m = copy.deepcopy(model)
        loss = nn.functional.cross_entropy(m(x[i : i + 1]), y[i : i + 1])
        (g,) = torch.autograd.grad(loss, [m[0].weight])
        grads.append(g.reshape(-1))
    g = torch.stack(grads)
    fisher = damp * torch.eye(12, dtype=torch.float64) + g.T @ g / len(y)
    finv = torch.linalg.inv(fisher)
    sal = w0**2 / (2 * torch.diagonal(finv))
    q = torch.sort(sal, stable=True).indices[:k]
    if joint:
        dw = -finv[:, q] @ torch.linalg.solve(finv[q][:, q], w0[q])
    else:
        v = torch.zeros(12, dtype=torch.float64)
        v[q] = w0[q] / torch.diagonal(finv)[q]
        dw = -finv @ v
    keep = torch.ones(12, dtype=torch.bool)
    keep[q] = False
    return ((w0 + dw) * keep).reshape(3, 4), keep.reshape(3, 4)


@pytest.mark.parametrize("joint", [False, True])
def test_obs_update_equals_dense_closed_form(joint):
    model, loader, x, y = tiny_problem()
    expect_w, expect_keep = dense_obs(model, x, y, 0.05, 5, joint)
    plan = fastprune.prune(
        model,
        "woodfisher",
        sparsity=5 / 12,
        data=loader,
        num_grads=24,
        block_size=12,
        damp=0.05,
        joint=joint,
        progress=False,
    )
    assert torch.equal(plan.masks["0.weight"], expect_keep)
    torch.testing.assert_close(effective_weight(model[0], "weight"), expect_w, rtol=1e-9, atol=1e-9)


def test_blocks_global_equals_layer_for_one_layer():
    a, loader, _, _ = tiny_problem()
    b = copy.deepcopy(a)
    fastprune.prune(a, "woodfisher", sparsity=0.5, data=loader, num_grads=24, block_size=6, damp=0.1, progress=False)
    fastprune.prune(
        b,
        "woodfisher",
        sparsity=0.5,
        data=loader,
        num_grads=24,
        block_size=6,
        damp=0.1,
        blocks="global",
        progress=False,
    )
    torch.testing.assert_close(effective_weight(a[0], "weight"), effective_weight(b[0], "weight"))


def test_identity_fisher_reduces_to_magnitude():
    """Zero gradients: F = damp I, saliency ~ w^2, and the OBS update moves only the pruned weights."""
    model, loader, _, _ = tiny_problem()
    ref = copy.deepcopy(model)
    zero_loss = lambda out, y: (out * 0).sum()  # noqa: E731
    with pytest.warns(UserWarning, match="carries no information"):  # and says so
        fastprune.prune(
            model, "woodfisher", sparsity=0.5, data=loader, loss_fn=zero_loss, num_grads=24, damp=0.1, progress=False
        )
    fastprune.prune(ref, "magnitude", sparsity=0.5)
    assert torch.equal(model[0].weight_mask, ref[0].weight_mask)
    torch.testing.assert_close(effective_weight(model[0], "weight"), effective_weight(ref[0], "weight"))


def test_exact_sparsity_block_larger_than_layer_and_fisher_batches():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    data = [(torch.randn(16, 6), torch.randint(0, 3, (16,))) for _ in range(4)]
    plan = fastprune.prune(
        model, "woodfisher", sparsity=0.6, data=data, num_grads=20, fisher_batch_size=3, block_size=1000, progress=False
    )  # block larger than any layer: one block each
    rep = fastprune.sparsity_report(model)
    assert rep.zeros == round(0.6 * rep.numel)
    assert plan.achieved_sparsity == pytest.approx(rep.zeros / rep.numel)
    assert plan.method == "woodfisher" and "data" not in plan.config
    plan.to_json()  # JSON-serialisable without the loader


def test_recompute_steps_reach_the_target_exactly():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    data = [(torch.randn(32, 6), torch.randint(0, 3, (32,)))]
    fastprune.prune(model, "woodfisher", sparsity=0.7, data=data, num_grads=32, recompute_steps=3, progress=False)
    rep = fastprune.sparsity_report(model)
    assert rep.zeros == round(0.7 * rep.numel)


def test_bad_input_leaves_model_untouched():
    model, loader, _, _ = tiny_problem()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="no gradients"):
        fastprune.prune(model, "woodfisher", sparsity=0.5, data=[], progress=False)
    with pytest.raises(ValueError, match="data"):
        fastprune.prune(model, "woodfisher", sparsity=0.5, progress=False)
    with pytest.raises(ValueError, match="num_grads"):
        fastprune.prune(model, "woodfisher", sparsity=0.5, data=loader, num_grads=0)
    with pytest.raises(ValueError, match="damp"):
        fastprune.prune(model, "woodfisher", sparsity=0.5, data=loader, damp=-1.0)
    nan_loss = lambda out, y: out.sum() * float("nan")  # noqa: E731
    with pytest.raises(ValueError, match="NaN or Inf"):
        fastprune.prune(model, "woodfisher", sparsity=0.5, data=loader, loss_fn=nan_loss, progress=False)
    bad = [(torch.full((4, 4), float("inf"), dtype=torch.float64), torch.zeros(4, dtype=torch.int64))]
    with pytest.raises(ValueError, match="NaN or Inf"):
        fastprune.prune(model, "woodfisher", sparsity=0.5, data=bad, progress=False)
    model[0].weight.requires_grad_(False)
    with pytest.raises(ValueError, match="require grad"):
        fastprune.prune(model, "woodfisher", sparsity=0.5, data=loader, progress=False)
    assert not torch_prune.is_pruned(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_paper_direction_on_digits():
    """One-shot, no fine-tuning, global, MLP: WoodFisher with the OBS update keeps more accuracy
    than global magnitude and than diagonal Fisher at high sparsity (margins >= 4 images)."""
    torch.set_num_threads(2)
    data = fastprune.data.digits(seed=0)
    dense = recipes.train_dense(fastprune.models.lenet_300_100, data, epochs=20, seed=0)
    acc = {}
    for name, kw in (
        ("magnitude", {}),
        ("fisher_diag", {"data": data.train_loader(), "num_grads": 512}),
        ("woodfisher", {"data": data.train_loader(), "num_grads": 512}),
    ):
        m = copy.deepcopy(dense)
        if name != "magnitude":
            kw["progress"] = False
        fastprune.prune(m, name, sparsity=0.9, **kw)
        acc[name] = evaluate(m, data.test_loader())
    assert acc["woodfisher"] >= acc["magnitude"] + 0.012, acc
    assert acc["woodfisher"] >= acc["fisher_diag"] + 0.012, acc


def test_half_precision_model_accumulates_in_float32():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).to(torch.bfloat16)
    data = [(torch.randn(32, 6).to(torch.bfloat16), torch.randint(0, 3, (32,)))]
    from fastprune.importance.woodfisher import collect_fisher
    from fastprune.masks import select_parameters

    refs = select_parameters(model)
    stats = collect_fisher(
        model, refs, data, nn.functional.cross_entropy, num_grads=32, block_size=16, damp=1e-3, progress=False
    )
    assert all(fi.inverse().dtype == torch.float32 for fi in stats.inverses)
    assert all(torch.isfinite(fi.inverse()).all() for fi in stats.inverses)
    plan = fastprune.prune(model, "woodfisher", sparsity=0.5, data=data, num_grads=32, damp=1e-3, progress=False)
    w = effective_weight(model[0], "weight")
    assert w.dtype == torch.bfloat16 and torch.isfinite(w.float()).all()
    assert plan.num_pruned() == round(0.5 * (48 + 24))


def test_per_sample_gradients_match_autograd_and_carry_no_graph():
    from fastprune.importance.woodfisher import per_sample_gradients
    from fastprune.masks import select_parameters

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    x, y = torch.randn(6, 5, dtype=torch.float64), torch.randint(0, 3, (6,))
    refs = select_parameters(model)
    gs = per_sample_gradients(model, refs, x, y, nn.functional.cross_entropy, fisher_batch_size=2)
    assert all(not g.requires_grad for g in gs)
    for row in range(3):
        loss = nn.functional.cross_entropy(model(x[2 * row : 2 * row + 2]), y[2 * row : 2 * row + 2])
        expect = torch.autograd.grad(loss, [model[0].weight, model[2].weight])
        for g, e in zip(gs, expect, strict=True):
            torch.testing.assert_close(g[row], e.reshape(-1), rtol=1e-10, atol=1e-12)
