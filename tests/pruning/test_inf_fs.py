"""Inf-FS (NISP's ranking of the final responses) against a NumPy float64 transcription of the formula."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fastprune.importance import inf_fs
from fastprune.importance.nisp import spearman


def np_ranks(col: np.ndarray) -> np.ndarray:
    """Average ranks, the textbook way: each distinct value gets the mean of the positions it holds."""
    order = np.argsort(col, kind="stable")
    ranks = np.empty(len(col))
    ranks[order] = np.arange(1, len(col) + 1)
    for v in np.unique(col):
        hit = col == v
        ranks[hit] = ranks[hit].mean()
    return ranks


def np_inf_fs(x: np.ndarray, alpha: float = 0.5, variant: str = "paper") -> np.ndarray:
    m, n = x.shape
    r = np.stack([np_ranks(x[:, j]) for j in range(n)], axis=1)
    rho = np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            a, b = r[:, i] - r[:, i].mean(), r[:, j] - r[:, j].mean()
            den = np.sqrt((a * a).sum() * (b * b).sum())
            rho[i, j] = (a * b).sum() / den if den > 0 else 0.0  # a constant unit: NaN -> 0
    c = 1 - np.abs(rho)
    std = x.std(axis=0, ddof=1)
    sigma = np.maximum(std[:, None], std[None, :])
    if variant == "paper":
        a_mat, factor = alpha * sigma + (1 - alpha) * c, 0.9
    else:
        sigma = (sigma - sigma.min()) / (sigma.max() - sigma.min())
        a_mat, factor = alpha * c + (1 - alpha) * sigma, 0.99
    radius = np.abs(np.linalg.eigvals(a_mat)).max()
    inv = np.linalg.inv(np.eye(n) - factor / radius * a_mat)
    s = inv - np.eye(n) if variant == "paper" else inv
    return s.sum(axis=1)


@pytest.mark.parametrize("variant", ["paper", "code"])
@pytest.mark.parametrize("m, n", [(50, 7), (5, 12), (2, 3), (31, 1)])
def test_matches_the_numpy_transcription(variant, m, n):
    g = torch.Generator().manual_seed(m * 100 + n)
    x = torch.randn(m, n, generator=g) * torch.linspace(0.5, 2.0, n)
    got = inf_fs(x, alpha=0.3, variant=variant)
    assert got.dtype == torch.float64 and got.shape == (n,) and torch.isfinite(got).all()
    if n == 1 and variant == "code":  # min-max normalising one sigma divides 0 by 0 (the code gives NaN)
        return
    np.testing.assert_allclose(
        got.numpy(), np_inf_fs(x.double().numpy(), alpha=0.3, variant=variant), rtol=1e-9, atol=1e-12
    )


def test_ties_and_constant_units():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 3, (40, 6), generator=g).double()  # many ties
    x[:, 2] = 1.5  # a dead unit: constant
    got = inf_fs(x)
    np.testing.assert_allclose(got.numpy(), np_inf_fs(x.numpy()), rtol=1e-9, atol=1e-12)
    assert torch.isfinite(got).all()
    c = spearman(x)
    assert float(c[2].abs().max()) == 0.0 and float(c[:, 2].abs().max()) == 0.0
    # spearman with ties equals Pearson of the average ranks
    r = np.stack([np_ranks(x[:, j].numpy()) for j in range(6)], 1)
    want = np.corrcoef(r[:, [0, 1, 3, 4, 5]], rowvar=False)
    np.testing.assert_allclose(c[[0, 1, 3, 4, 5]][:, [0, 1, 3, 4, 5]].numpy(), want, rtol=1e-12, atol=1e-12)


@settings(max_examples=25, deadline=None)
@given(st.integers(3, 30), st.integers(2, 9), st.integers(0, 2**16), st.randoms(use_true_random=False))
def test_permuting_the_units_permutes_the_scores(m, n, seed, rnd):
    x = torch.randn(m, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    perm = list(range(n))
    rnd.shuffle(perm)
    a = inf_fs(x)
    b = inf_fs(x[:, perm])
    torch.testing.assert_close(b, a[perm], rtol=1e-9, atol=1e-12)


def test_a_more_variable_uncorrelated_unit_scores_higher():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(200, 1, generator=g, dtype=torch.float64)
    x = torch.cat([base, base * 1.01, base * 0.99, 3 * torch.randn(200, 1, generator=g, dtype=torch.float64)], 1)
    s = inf_fs(x)
    assert int(s.argmax()) == 3  # large spread and no correlation with the rest


def test_bad_inputs():
    with pytest.raises(ValueError, match="at least 2 samples"):
        inf_fs(torch.randn(1, 5))
    with pytest.raises(ValueError, match="2-D"):
        inf_fs(torch.randn(5))
    with pytest.raises(ValueError, match="alpha"):
        inf_fs(torch.randn(4, 3), alpha=1.5)
    with pytest.raises(ValueError, match="variant"):
        inf_fs(torch.randn(4, 3), variant="matlab")
    with pytest.raises(ValueError, match="NaN or Inf"):
        inf_fs(torch.tensor([[1.0, float("nan")], [2.0, 3.0]]))
    assert inf_fs(torch.randn(4, 0)).shape == (0,)
