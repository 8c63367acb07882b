"""The Woodbury references themselves, against closed forms and with hypothesis properties."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fastprune import reference


def test_single_gradient_closed_form():
    """(damp I + g g^T)^-1 = (I - g g^T / (damp + g^T g)) / damp (Sherman-Morrison)."""
    g = torch.randn(1, 12, dtype=torch.float64)
    damp = 0.3
    expect = (torch.eye(12, dtype=torch.float64) - g.T @ g / (damp + float(g @ g.T))) / damp
    out = reference.woodbury_inverse_fisher(g, 12, damp)
    torch.testing.assert_close(out[0], expect, rtol=1e-12, atol=1e-12)


def test_orthogonal_gradients_closed_form():
    """Gradients along coordinate axes: F is diagonal, damp + (count of e_i)/N on the diagonal."""
    g = torch.zeros(3, 4, dtype=torch.float64)
    g[0, 0] = g[1, 0] = 2.0
    g[2, 3] = 1.0
    out = reference.woodbury_inverse_fisher(g, 4, 0.5)[0]
    expect = torch.diag(1 / torch.tensor([0.5 + 8 / 3, 0.5, 0.5, 0.5 + 1 / 3], dtype=torch.float64))
    torch.testing.assert_close(out, expect, rtol=1e-12, atol=1e-12)


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 12),
    d=st.integers(1, 20),
    block=st.integers(1, 8),
    damp=st.floats(1e-3, 10.0),
    split=st.integers(0, 12),
    seed=st.integers(0, 2**16),
)
def test_reference_properties(n, d, block, damp, split, seed):
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(n, d, dtype=torch.float64, generator=gen)
    finv = reference.woodbury_inverse_fisher(g, block, damp)
    nb = finv.shape[0]
    # symmetric, and the inverse of each damped Fisher block
    torch.testing.assert_close(finv, finv.transpose(1, 2), rtol=1e-10, atol=1e-10)
    padded = torch.zeros(n, nb * block, dtype=torch.float64)
    padded[:, :d] = g
    gb = padded.view(n, nb, block).transpose(0, 1)
    fisher = damp * torch.eye(block, dtype=torch.float64) + gb.transpose(1, 2) @ gb / n
    eye = torch.eye(block, dtype=torch.float64).expand(nb, block, block)
    torch.testing.assert_close(fisher @ finv, eye, rtol=1e-8, atol=1e-8)
    # the rank-k update, in two chunks, reaches the same inverse
    start = torch.eye(block, dtype=torch.float64).repeat(nb, 1, 1) / damp
    s = min(split, n)
    reference.woodbury_update_(start, g[:s], n)
    reference.woodbury_update_(start, g[s:], n)
    torch.testing.assert_close(start, finv, rtol=1e-8, atol=1e-8 / damp)
