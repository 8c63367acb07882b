"""fastprune::woodbury_inverse_fisher and fastprune::woodbury_update_ against float64 oracles."""

from __future__ import annotations

import pytest
import torch

import fastprune
from fastprune import ops, reference

F32_TOL = 1e-4  # relative Frobenius error, float32 inputs, well-conditioned (Gaussian) gradients
F64_TOL = 1e-10


def dense_truth(grads: torch.Tensor, block: int, damp: float) -> torch.Tensor:
    """float64 torch.linalg.inv of each dense damped Fisher block, padded coordinates included."""
    g = grads.double()
    n, d = g.shape
    nb = (d + block - 1) // block
    padded = torch.zeros(n, nb * block, dtype=torch.float64)
    padded[:, :d] = g
    gb = padded.view(n, nb, block).transpose(0, 1)
    fisher = damp * torch.eye(block, dtype=torch.float64) + gb.transpose(1, 2) @ gb / n
    # One block at a time: torch 2.13's batched float64 LU inverse fails at random ("Pivots given to
    # lu_solve must all be greater or equal to 1") with 2 threads on this CPU; single matrices do not.
    return torch.stack([torch.linalg.inv(f) for f in fisher]) if len(fisher) else fisher


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def low_rank_grads(n: int, d: int, rank: int = 32, noise: float = 0.01, dtype=torch.float32) -> torch.Tensor:
    """What real gradients look like: effective rank 32 plus 1 % noise."""
    u = torch.randn(n, rank, dtype=torch.float64)
    v = torch.randn(rank, d, dtype=torch.float64)
    g = u @ v / rank**0.5
    g = g + noise * g.std() * torch.randn(n, d, dtype=torch.float64)
    return g.to(dtype)


def make_grads(n: int, d: int, dtype: torch.dtype, layout: str) -> torch.Tensor:
    if layout == "contiguous":
        return torch.randn(n, d, dtype=dtype)
    if layout == "transposed":
        return torch.randn(d, n, dtype=dtype).t()
    # every other column of a wider matrix
    return torch.randn(n, 2 * d, dtype=dtype)[:, ::2]


# (N, d, B): typical, d not a multiple of B, B = 1, N = 1, N < B (woodbury regime), B > d.
SHAPES = [(64, 300, 32), (50, 7, 1), (1, 50, 16), (20, 333, 64), (40, 30, 64), (200, 130, 48)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "strided"])
def test_inverse_fisher_matches_dense_inverse(isa, shape, dtype, layout):
    n, d, block = shape
    grads = make_grads(n, d, dtype, layout)
    damp = 0.1
    out = ops.woodbury_inverse_fisher(grads, block, damp)
    assert out.shape == ((d + block - 1) // block, block, block) and out.dtype == dtype
    truth = dense_truth(grads, block, damp)
    assert rel_err(out, truth) <= (F32_TOL if dtype == torch.float32 else F64_TOL)
    # and against the published algorithm (rank-one loop) run in float64
    ref = reference.woodbury_inverse_fisher(grads.double(), block, damp)
    assert rel_err(out, ref) <= (F32_TOL if dtype == torch.float32 else F64_TOL)


@pytest.mark.parametrize("n", [45, 70, 100])
def test_blocked_factorisations_across_pivot_blocks(isa, n):
    """Sizes that span several 32-wide pivot blocks with a ragged last one: the Woodbury regime
    (Cholesky of the N x N kernel), the Gram regime (sweep of B x B), and the rank-n update."""
    grads = torch.randn(n, 230, dtype=torch.float64)
    for block in (100, 40):  # N < B for n = 45, 70; N >= B for the rest
        out = ops.woodbury_inverse_fisher(grads, block, 0.05)
        assert rel_err(out, dense_truth(grads, block, 0.05)) <= F64_TOL
    finv = torch.eye(100, dtype=torch.float64).repeat(3, 1, 1) / 0.05
    ops.woodbury_update_(finv, grads, n)
    assert rel_err(finv, dense_truth(grads, 100, 0.05)) <= F64_TOL


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_padding_holds_exactly_inverse_damp(dtype):
    damp = 0.3
    grads = torch.randn(10, 70, dtype=dtype)  # B = 32: last block has 6 real coordinates
    out = ops.woodbury_inverse_fisher(grads, 32, damp)
    last = out[-1]
    expect = torch.full((26,), 1 / damp, dtype=torch.float64).to(dtype)
    assert torch.equal(torch.diagonal(last)[6:], expect)
    off = last.clone()
    off[range(6, 32), range(6, 32)] = 0
    assert torch.count_nonzero(off[6:, :]) == 0 and torch.count_nonzero(off[:, 6:]) == 0


def test_empty_parameter_vector():
    out = ops.woodbury_inverse_fisher(torch.randn(5, 0), 8, 0.1)
    assert out.shape == (0, 8, 8)
    finv = torch.empty(0, 8, 8)
    assert ops.woodbury_update_(finv, torch.randn(5, 0), 5.0) is finv
    assert ops.woodbury_update_(torch.eye(8).repeat(2, 1, 1), torch.randn(0, 10), 5.0).shape == (2, 8, 8)


@pytest.mark.parametrize("k", [1, 3, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
def test_update_matches_reference(isa, k, dtype, layout):
    d, block, total = 101, 24, 200
    base = torch.randn(300, d, dtype=torch.float64)
    start = dense_truth(base, block, 0.2)  # a real SPD inverse to start from
    grads = make_grads(k, d, dtype, layout)
    finv = start.to(dtype).clone()
    out = ops.woodbury_update_(finv, grads, total)
    assert out is finv
    expect = reference.woodbury_update_(start.clone(), grads.double(), total)
    assert rel_err(finv, expect) <= (F32_TOL if dtype == torch.float32 else F64_TOL)


@pytest.mark.parametrize("chunks", [[7], [1, 2, 4], [3, 3, 3, 1]])
def test_update_chain_equals_inverse_fisher(chunks):
    """Any chunking of the N gradients gives (damp I + (1/N) sum g g^T)^-1."""
    d, block, damp = 90, 32, 0.05
    n = sum(chunks)
    grads = torch.randn(n, d, dtype=torch.float64)
    finv = torch.eye(block, dtype=torch.float64).repeat(3, 1, 1) / damp
    i = 0
    for c in chunks:
        ops.woodbury_update_(finv, grads[i : i + c], n)
        i += c
    assert rel_err(finv, dense_truth(grads, block, damp)) <= F64_TOL


@pytest.mark.parametrize(
    "n,d,block",
    [(1024, 256, 128), (1024, 256, 64), (256, 1024, 1024)],  # N >= B twice, N < B
)
@pytest.mark.parametrize("rel_damp", [1e-3, 1e-5])
def test_low_rank_float32_no_worse_than_published_loop(n, d, block, rel_damp):
    grads = low_rank_grads(n, d)
    damp = rel_damp * float((grads.double() ** 2).mean())
    truth = dense_truth(grads, block, damp)
    ours = rel_err(ops.woodbury_inverse_fisher(grads, block, damp), truth)
    loop = rel_err(reference.woodbury_inverse_fisher(grads, block, damp), truth)
    assert ours <= loop, f"fastprune {ours:.2e} vs float32 rank-one loop {loop:.2e}"
    assert ours <= 2e-4
    f64 = rel_err(ops.woodbury_inverse_fisher(grads, block, damp, dtype=torch.float64), truth)
    assert f64 <= 1e-8


def test_float64_option_runs_in_float64():
    grads = torch.randn(30, 40)
    out = ops.woodbury_inverse_fisher(grads, 16, 0.1, dtype=torch.float64)
    assert out.dtype == torch.float64
    assert rel_err(out, dense_truth(grads, 16, 0.1)) <= F64_TOL


def test_float32_drift_after_10000_rank_one_updates():
    d, block, n = 40, 20, 10_000
    grads = torch.randn(n, d, dtype=torch.float64)
    damp = 1e-2
    f32 = torch.eye(block).repeat(2, 1, 1) / damp
    f64 = f32.double().clone()
    for i in range(n):
        ops.woodbury_update_(f32, grads[i : i + 1].float(), n)
        ops.woodbury_update_(f64, grads[i : i + 1], n)
    assert rel_err(f32, f64) <= 1e-3
    assert rel_err(f64, dense_truth(grads, block, damp)) <= 1e-8


# ---------------------------------------------------------------- bad input


def test_bad_inverse_fisher_inputs():
    g = torch.randn(8, 20)
    with pytest.raises(ValueError, match="block_size"):
        ops.woodbury_inverse_fisher(g, 0, 0.1)
    for damp in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="damp"):
            ops.woodbury_inverse_fisher(g, 4, damp)
    with pytest.raises(ValueError, match="grads"):
        ops.woodbury_inverse_fisher(torch.randn(8), 4, 0.1)
    with pytest.raises(ValueError, match="grads"):
        ops.woodbury_inverse_fisher(torch.randn(0, 5), 4, 0.1)
    with pytest.raises(TypeError, match="grads"):
        ops.woodbury_inverse_fisher(torch.ones(8, 20, dtype=torch.int64), 4, 0.1)
    for bad in (float("nan"), float("inf")):
        g2 = g.clone()
        g2[3, 17] = bad
        with pytest.raises(ValueError, match="NaN or Inf"):
            ops.woodbury_inverse_fisher(g2, 4, 0.1)
        with pytest.raises(ValueError, match="NaN or Inf"):  # woodbury regime too
            ops.woodbury_inverse_fisher(g2, 16, 0.1)


def test_native_op_checks_name_the_argument():
    """The C++ checks (reached without the Python wrapper) raise the same error types."""
    g = torch.randn(8, 20)
    with pytest.raises(ValueError, match="block_size"):
        torch.ops.fastprune.woodbury_inverse_fisher(g, -3, 0.1)
    with pytest.raises(ValueError, match="damp"):
        torch.ops.fastprune.woodbury_inverse_fisher(g, 4, float("nan"))
    with pytest.raises(TypeError, match="grads"):
        torch.ops.fastprune.woodbury_inverse_fisher(g.int(), 4, 0.1)
    with pytest.raises(ValueError, match="blocks"):
        torch.ops.fastprune.woodbury_update_(torch.eye(4).repeat(3, 1, 1), g, 8.0)
    with pytest.raises(TypeError, match="same dtype"):
        torch.ops.fastprune.woodbury_update_(torch.eye(4, dtype=torch.float64).repeat(5, 1, 1), g, 8.0)


def test_bad_update_inputs_leave_finv_unchanged():
    finv = torch.eye(4).repeat(5, 1, 1) * 10
    keep = finv.clone()
    g = torch.randn(3, 20)
    with pytest.raises(TypeError, match="same dtype"):
        ops.woodbury_update_(finv, g.double(), 3)
    with pytest.raises(ValueError, match="blocks"):
        ops.woodbury_update_(finv, torch.randn(3, 25), 3)
    with pytest.raises(ValueError, match="finv"):
        ops.woodbury_update_(torch.randn(5, 4, 3), g, 3)
    with pytest.raises(ValueError, match="num_samples"):
        ops.woodbury_update_(finv, g, 0)
    with pytest.raises(ValueError, match="device"):
        ops.woodbury_update_(finv.to("meta"), g, 3)
    with pytest.raises(TypeError, match="finv"):
        ops.woodbury_update_(finv.int(), g.int(), 3)
    g[1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        ops.woodbury_update_(finv, g, 3)
    assert torch.equal(finv, keep)


@pytest.mark.parametrize("bad", ["zeros", "negative", "nan"])
def test_update_refuses_a_state_that_is_not_positive_definite(bad):
    # an all-zero state used to "update" to zeros silently
    finv = torch.eye(4).repeat(5, 1, 1) * 10
    if bad == "zeros":
        finv.zero_()
    elif bad == "negative":
        finv[2, 1, 1] = -1.0
    else:
        finv[4, 3, 3] = float("nan")
    keep = finv.clone()
    for fn in (ops.woodbury_update_, torch.ops.fastprune.woodbury_update_):
        with pytest.raises(ValueError, match="not positive definite"):
            fn(finv, torch.randn(3, 20), 3.0)
        assert torch.equal(finv.nan_to_num(), keep.nan_to_num())


# ---------------------------------------------------------------- dispatcher integration


def test_opcheck_inverse_fisher():
    for grads, block in [(torch.randn(12, 30), 8), (torch.randn(4, 30, dtype=torch.float64), 16)]:
        torch.library.opcheck(torch.ops.fastprune.woodbury_inverse_fisher, (grads, block, 0.1))


def test_opcheck_update():
    for dtype, k in [(torch.float32, 3), (torch.float64, 1)]:
        finv = (torch.eye(8, dtype=dtype).repeat(4, 1, 1) * 10).contiguous()
        torch.library.opcheck(torch.ops.fastprune.woodbury_update_, (finv, torch.randn(k, 30, dtype=dtype), 10.0))


def test_torch_compile_smoke():
    def f(g):
        return torch.ops.fastprune.woodbury_inverse_fisher(g, 8, 0.1).sum(0)

    def u(finv, g):
        torch.ops.fastprune.woodbury_update_(finv, g, 5.0)
        return finv * 2

    g = torch.randn(6, 20)
    assert torch.allclose(torch.compile(f, fullgraph=True, backend="aot_eager")(g), f(g))
    a, b = torch.eye(8).repeat(3, 1, 1) * 10, torch.eye(8).repeat(3, 1, 1) * 10
    assert torch.allclose(torch.compile(u, fullgraph=True, backend="aot_eager")(a, g), u(b, g))
    assert torch.allclose(a, b)


# ---------------------------------------------------------------- FisherInverse


def test_fisher_inverse_streaming_equals_op():
    d, block, damp, n = 77, 16, 0.05, 60
    grads = torch.randn(n, d)
    fi = fastprune.FisherInverse(d, block, damp, n)
    for chunk in grads.split(13):
        fi.update(chunk)
    one_shot = ops.woodbury_inverse_fisher(grads, block, damp)
    assert rel_err(fi.inverse(), one_shot) <= 1e-5
    truth = dense_truth(grads, block, damp)
    assert rel_err(fi.inverse(), truth) <= F32_TOL
    # one chunk of all N: exactly the op
    fi1 = fastprune.FisherInverse(d, block, damp, n)
    fi1.update(grads)
    assert torch.equal(fi1.inverse(), one_shot)
    # diag and matvec against the dense block-diagonal matrix
    dense = torch.block_diag(*truth)[:d, :d]
    assert torch.allclose(fi.diag().double(), torch.diagonal(dense), rtol=1e-4)
    v = torch.randn(3, d)
    assert torch.allclose(fi.matvec(v).double(), v.double() @ dense.T, rtol=1e-4, atol=1e-4)
    assert fi.matvec(v[0]).shape == (d,)


def test_fisher_inverse_other_count_uses_given_num_samples():
    d, block, damp = 30, 10, 0.1
    grads = torch.randn(12, d, dtype=torch.float64)
    fi = fastprune.FisherInverse(d, block, damp, num_samples=20, dtype=torch.float64)
    fi.update(grads[:5])
    fi.update(grads[5:])
    fisher = damp * torch.eye(d, dtype=torch.float64) + grads.T @ grads / 20
    expect = torch.stack([torch.linalg.inv(fisher[i : i + 10, i : i + 10]) for i in range(0, 30, 10)])
    assert rel_err(fi.inverse(), expect) <= F64_TOL


def test_fisher_inverse_bad_input():
    with pytest.raises(ValueError, match="block_size"):
        fastprune.FisherInverse(10, 0, 0.1, 5)
    with pytest.raises(ValueError, match="damp"):
        fastprune.FisherInverse(10, 4, -1.0, 5)
    fi = fastprune.FisherInverse(10, 4, 0.1, 5)
    assert torch.allclose(fi.inverse(), torch.eye(4).repeat(3, 1, 1) * 10)
    with pytest.raises(ValueError, match="shape"):
        fi.update(torch.randn(3, 11))
    with pytest.raises(ValueError, match="NaN"):
        fi.update(torch.full((2, 10), float("inf")))
    with pytest.raises(ValueError, match="shape"):
        fi.matvec(torch.randn(4))


def test_singular_fisher_raises_instead_of_nan():
    """damp far below float64 resolution on rank-one gradients: the Gram-regime factorisation and
    the Woodbury fallback both fail; a clear error, never NaN."""
    g = torch.ones(64, 32, dtype=torch.float64)
    with pytest.raises(ValueError, match="positive definite"):
        ops.woodbury_inverse_fisher(g, 32, 1e-300)


def test_woodbury_regime_is_exact_where_the_gram_is_singular():
    """N < B: (damp I + 1 1^T)^-1 = (I - 1 1^T / (damp + B)) / damp, even at damp = 1e-300; in
    float32 that overflows, which is an error, not Inf."""
    g = torch.ones(8, 32, dtype=torch.float64)
    out = ops.woodbury_inverse_fisher(g, 32, 1e-300)
    expect = (torch.eye(32, dtype=torch.float64) - torch.ones(32, 32, dtype=torch.float64) / 32) / 1e-300
    assert rel_err(out * 1e-300, expect * 1e-300) <= 1e-12  # scaled: the norm itself would overflow
    with pytest.raises(ValueError, match="overflows"):
        ops.woodbury_inverse_fisher(g.float(), 32, 1e-40)  # 1/damp exceeds float32


def test_tiny_damp_falls_back_and_stays_finite():
    """Gram-regime factorisation failures fall back to the Woodbury step; never NaN."""
    g = low_rank_grads(256, 64, rank=4, noise=0.0, dtype=torch.float64)
    damp = 1e-14 * float((g**2).mean())
    out = ops.woodbury_inverse_fisher(g, 64, damp)
    assert torch.isfinite(out).all()
