"""The Fisher on real users' data (issue 14): every batch format, a fallback when vmap refuses the
model, a sampled Fisher that needs no labels and does not vanish under self-distillation, statistics
computed once for several sparsities, and chunks gathered across loader batches."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from torch import nn

import fastprune
from fastprune.importance.woodfisher import collect_fisher
from fastprune.masks import effective_weight, select_parameters


def problem(n=24, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double().eval()
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=g)
    return model, x, y


def diag_of(model, data, **kw):
    stats = collect_fisher(
        model, select_parameters(model), data, num_grads=24, block_size=8, damp=1e-3, progress=False, **kw
    )
    return torch.cat(stats.fisher_diag), torch.cat([fi.inverse().reshape(-1) for fi in stats.inverses])


class Kw(nn.Module):
    """A model called with keywords (the HuggingFace convention)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, features, scale=None):
        return self.inner(features)


def test_every_batch_format_gives_the_same_fisher():
    model, x, y = problem()
    want = diag_of(model, [(x[i : i + 8], y[i : i + 8]) for i in range(0, 24, 8)])
    as_list = diag_of(model, [[x[i : i + 8], y[i : i + 8]] for i in range(0, 24, 8)])
    # dict batches (used to raise "unhashable type: 'slice'"): model(**batch) without its labels
    kw = Kw(model)
    as_dict = diag_of(kw, [{"features": x[i : i + 8], "scale": 2.0, "labels": y[i : i + 8]} for i in range(0, 24, 8)])
    # a batch of another shape: the forward hook reads it
    custom = diag_of(
        model,
        [{"x": x[i : i + 8], "y": y[i : i + 8]} for i in range(0, 24, 8)],
        forward=lambda m, b: nn.functional.cross_entropy(m(b["x"]), b["y"]),
    )
    for got in (as_list, as_dict, custom):
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_several_positional_inputs_and_the_last_element_as_targets():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 4), nn.Linear(2, 4)

        def forward(self, u, v):
            return self.a(u) + self.b(v)

    torch.manual_seed(0)
    model = Two().double()
    u, v, y = torch.randn(12, 3).double(), torch.randn(12, 2).double(), torch.randint(0, 4, (12,))
    stats = collect_fisher(
        model, select_parameters(model), [(u, v, y)], num_grads=12, block_size=4, damp=1e-3, progress=False
    )
    loss = nn.functional.cross_entropy(model(u[:1], v[:1]), y[:1])
    g = torch.autograd.grad(loss, [model.a.weight])[0].reshape(-1)
    assert float(stats.fisher_diag[0][0]) == pytest.approx(
        float((g[0] ** 2) / 12)
        + sum(
            float(
                torch.autograd.grad(
                    nn.functional.cross_entropy(model(u[i : i + 1], v[i : i + 1]), y[i : i + 1]), [model.a.weight]
                )[0].reshape(-1)[0]
                ** 2
            )
            / 12
            for i in range(1, 12)
        ),
        rel=1e-9,
    )


def test_batches_without_targets_say_what_to_do():
    model, x, _ = problem()
    with pytest.raises(ValueError, match="carry no targets.*fisher='sampled'"):
        fastprune.prune(model, "woodfisher", sparsity=0.5, data=[x], num_grads=8, progress=False)
    with pytest.raises(TypeError, match="a batch must be a tensor, an \\(inputs..., targets\\)"):
        fastprune.prune(model, "woodfisher", sparsity=0.5, data=[3.0], num_grads=8, progress=False)
    # the sampled Fisher needs no labels
    fastprune.prune(model, "woodfisher", sparsity=0.5, data=[x], num_grads=8, fisher="sampled", progress=False)


class Branchy(nn.Module):
    """Data-dependent control flow (as BERT's attention-mask handling): vmap refuses it."""

    def __init__(self):
        super().__init__()
        self.l1, self.l2 = nn.Linear(6, 8), nn.Linear(8, 3)

    def forward(self, x):
        h = torch.tanh(self.l1(x))
        if bool(h.sum() > -1e9):
            h = h * 1.0
        return self.l2(h)


def test_vmap_refusal_falls_back_to_one_backward_per_gradient(caplog):
    torch.manual_seed(0)
    model = Branchy().double().eval()
    _, x, y = problem()
    refs = select_parameters(model)
    with pytest.raises(RuntimeError):
        collect_fisher(model, refs, [(x, y)], num_grads=24, block_size=8, damp=1e-3, per_sample="vmap", progress=False)
    with caplog.at_level(logging.WARNING, logger="fastprune"):
        stats = collect_fisher(model, refs, [(x, y)], num_grads=24, block_size=8, damp=1e-3, progress=False)
    assert sum("vmap cannot take per-sample gradients" in r.message for r in caplog.records) == 1
    # the loop's gradients are autograd's
    want = torch.zeros(8 * 6, dtype=torch.float64)
    for i in range(24):
        g = torch.autograd.grad(nn.functional.cross_entropy(model(x[i : i + 1]), y[i : i + 1]), [model.l1.weight])[0]
        want += g.reshape(-1) ** 2 / 24
    torch.testing.assert_close(stats.fisher_diag[0], want, rtol=1e-10, atol=1e-14)
    # and vmap and the loop agree where vmap works
    plain, _, _ = problem()
    a = diag_of(plain, [(x, y)], per_sample="vmap")
    b = diag_of(plain, [(x, y)], per_sample="loop")
    for u, v in zip(a, b, strict=True):
        torch.testing.assert_close(u, v, rtol=1e-10, atol=1e-12)


def test_pruned_weights_get_zero_gradients_on_both_engines():
    model, x, y = problem()
    fastprune.prune(model, "magnitude", sparsity=0.5)
    for engine in ("vmap", "loop"):
        stats = collect_fisher(
            model,
            select_parameters(model),
            [(x, y)],
            num_grads=24,
            block_size=8,
            damp=1e-3,
            per_sample=engine,
            progress=False,
        )
        pruned = ~model[0].weight_mask.bool().reshape(-1)
        assert float(stats.fisher_diag[0][pruned].abs().max()) == 0.0


def test_self_distillation_empties_the_empirical_fisher_and_not_the_sampled_one():
    # a user of an embedding model: no labels, a loss to the dense model's own outputs
    model, x, _ = problem()
    with torch.no_grad():
        teacher = model(x).detach()
    data = [(x, teacher)]
    mse = nn.functional.mse_loss
    with pytest.warns(UserWarning, match="carries no information"):
        empirical = collect_fisher(
            model, select_parameters(model), data, mse, num_grads=24, block_size=8, damp=1e-5, progress=False
        )
    assert float(torch.cat(empirical.fisher_diag).max()) < 1e-20
    sampled = collect_fisher(
        model,
        select_parameters(model),
        [x],
        num_grads=24,
        block_size=8,
        damp=1e-5,
        fisher="sampled",
        likelihood="gaussian",
        progress=False,
    )
    assert float(torch.cat(sampled.fisher_diag).mean()) > 1e-3
    # and the masks differ from magnitude's
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    fastprune.prune(
        a,
        "woodfisher",
        sparsity=0.5,
        data=[x],
        fisher="sampled",
        likelihood="gaussian",
        num_grads=24,
        block_size=8,
        progress=False,
    )
    fastprune.prune(b, "magnitude", sparsity=0.5)
    assert not torch.equal(a[0].weight_mask, b[0].weight_mask)


def test_sampled_targets_are_seeded():
    model, x, _ = problem()
    one = diag_of(model, [x], fisher="sampled", seed=1)
    two = diag_of(model, [x], fisher="sampled", seed=1)
    other = diag_of(model, [x], fisher="sampled", seed=2)
    assert torch.equal(one[0], two[0]) and not torch.equal(one[0], other[0])
    with pytest.raises(ValueError, match="cannot use loss_fn"):
        fastprune.WoodFisherConfig(sparsity=0.5, data=[x], fisher="sampled", loss_fn=nn.functional.mse_loss)


def test_statistics_computed_once_prune_several_copies():
    model, x, y = problem()
    data = [(x[i : i + 6], y[i : i + 6]) for i in range(0, 24, 6)]
    stats = fastprune.fisher_statistics(model, data, num_grads=24, block_size=8, damp=1e-3, progress=False)
    for s in (0.3, 0.6):
        reuse, fresh = copy.deepcopy(model), copy.deepcopy(model)
        p1 = fastprune.prune(reuse, "woodfisher", sparsity=s, fisher_inverse=stats)
        p2 = fastprune.prune(
            fresh, "woodfisher", sparsity=s, data=data, num_grads=24, block_size=8, damp=1e-3, progress=False
        )
        assert all(torch.equal(p1.masks[k], p2.masks[k]) for k in p2.masks)
        for layer in (0, 2):
            torch.testing.assert_close(
                effective_weight(reuse[layer], "weight"), effective_weight(fresh[layer], "weight")
            )
        assert p1.config["fisher_inverse"]["num_grads"] == 24
    fastprune.prune(copy.deepcopy(model), "fisher_diag", sparsity=0.5, fisher_inverse=stats)
    with pytest.raises(ValueError, match="statistics of 2 other weights"):
        fastprune.prune(copy.deepcopy(model), "woodfisher", sparsity=0.5, fisher_inverse=stats, include="0")
    with pytest.raises(ValueError, match="not both"):
        fastprune.WoodFisherConfig(sparsity=0.5, data=data, fisher_inverse=stats)
    with pytest.raises(ValueError, match="recompute_steps"):
        fastprune.WoodFisherConfig(sparsity=0.5, fisher_inverse=stats, recompute_steps=3)
    with pytest.raises(TypeError, match="unexpected keyword"):
        fastprune.fisher_statistics(model, data, sparsity=0.5)


def test_chunks_span_loader_batches_and_give_the_same_fisher():
    model, x, y = problem()
    small = [(x[i : i + 3], y[i : i + 3]) for i in range(0, 24, 3)]
    d = sum(r.module.weight.numel() for r in select_parameters(model))
    one_per_batch = diag_of(model, small, max_memory=2 * 3 * 8 * d)
    gathered = diag_of(model, small, max_memory=1 << 30)
    for a, b in zip(one_per_batch, gathered, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_sampled_fisher_without_labels_beats_magnitude_on_digits():
    # the real task: WoodFisher from images alone (no labels read) against magnitude, 90 %, one shot,
    # no fine-tuning. Measured (seeds 0 / 1): magnitude 90.6 / 88.1 %, sampled 94.7 / 91.4 %,
    # empirical (with labels) 95.0 / 91.4 %
    from fastprune import recipes
    from fastprune.train import evaluate

    data = fastprune.data.digits(seed=0)
    dense = recipes.train_dense(fastprune.models.lenet_300_100, data, epochs=20, seed=0)
    images = [x for x, _ in data.train_loader()]
    acc = {}
    for name, kw in (
        ("magnitude", {}),
        ("woodfisher", {"data": images, "num_grads": 512, "fisher": "sampled", "progress": False}),
    ):
        m = copy.deepcopy(dense)
        fastprune.prune(m, name, sparsity=0.9, **kw)
        acc[name] = evaluate(m, data.test_loader())
    assert acc["woodfisher"] >= acc["magnitude"] + 0.012, acc
