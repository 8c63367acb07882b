"""scaled_dot_product_attention against its plain-PyTorch reference (float64) and torch's SDPA."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastprune import ops, reference

# (leading dims, L, S, E, Ev): BERT-base's head, odd sizes off every vector width and block, one row,
# more than one query block (128 rows), empty ones
SHAPES = [
    ((1, 12), 128, 128, 64, 64),
    ((2, 3), 7, 13, 5, 9),
    ((1, 1), 1, 1, 1, 1),
    ((2, 2), 33, 65, 17, 70),
    ((1, 2), 200, 150, 64, 64),
    ((3,), 9, 31, 8, 33),
    ((), 5, 6, 7, 8),
    ((2, 1, 2), 4, 5, 6, 3),
    ((2, 3), 0, 5, 4, 4),
    ((2, 3), 5, 0, 4, 4),
    ((2, 3), 5, 5, 4, 0),
    ((0, 3), 5, 5, 4, 4),
]


def _masks(lead, L, S, dtype):
    yield None
    yield torch.randn(*lead, L, S, dtype=dtype)  # full, additive
    yield torch.randn(L, S, dtype=dtype)  # broadcast over the leading dims
    keep = torch.rand(*lead[:1], *([1] * max(0, len(lead) - 1)), L, S) > 0.4
    if L:
        keep[..., 0, :] = False  # a fully masked row: 0, as torch gives
    yield keep
    yield torch.rand(1, S) > 0.5  # broadcast over the rows too


def _strided(t):
    """The same values as a view whose rows are not contiguous (HuggingFace's (B, H, L, D) views of
    (B, L, H, D) projections), or a slice of a wider tensor when there are too few dims."""
    if t.dim() >= 3:
        return t.transpose(-3, -2).contiguous().transpose(-3, -2)
    wide = torch.zeros(*t.shape[:-1], t.shape[-1] * 2 + 1, dtype=t.dtype)
    wide[..., : t.shape[-1]] = t
    return wide[..., : t.shape[-1]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, [*s[0], *s[1:]])))
def test_attention_matches_reference(isa, dtype, shape):
    lead, L, S, E, Ev = shape
    q, k, v = (torch.randn(*lead, n, e, dtype=dtype) for n, e in ((L, E), (S, E), (S, Ev)))
    calls = 0
    for mask in _masks(lead, L, S, dtype):
        for scale in (None, 0.3):
            for strided in (False, True):
                args = tuple(_strided(t) if strided else t for t in (q, k, v))
                got = ops.scaled_dot_product_attention(*args, mask, scale)
                m64 = None if mask is None or mask.dtype == torch.bool else mask.double()
                want = reference.scaled_dot_product_attention(
                    q.double(), k.double(), v.double(), mask if m64 is None else m64, scale
                )
                tol = 1e-5 if dtype == torch.float32 else 1e-12
                torch.testing.assert_close(got, want.to(dtype), rtol=tol, atol=tol)
                assert got.shape == (*lead, L, Ev) and got.is_contiguous()
                if dtype == torch.float32 and L and S and E:  # what torch's own SDPA gives
                    torch.testing.assert_close(
                        got, F.scaled_dot_product_attention(*args, attn_mask=mask, scale=scale), rtol=1e-5, atol=1e-5
                    )
                calls += 1
    path = "float64" if dtype == torch.float64 else isa.removesuffix("-jit")
    assert ops.kernel_counts().get(("scaled_dot_product_attention", path), 0) == calls


def test_attention_special_values(isa):
    q, k, v = (torch.randn(2, 3, 20, 16) for _ in range(3))
    q[0, 1, 4, 2] = float("nan")  # a NaN score: that row's output is NaN, the others are not
    v[1, 2, 7, 0] = float("inf")
    mask = torch.zeros(20, 20)
    mask[:, 3] = float("-inf")  # a masked key weighs exactly 0
    got = ops.scaled_dot_product_attention(q, k, v, mask)
    assert got[0, 1, 4].isnan().all() and not got[0, 1, torch.arange(20) != 4].isnan().any()
    assert got[1, 2, :, 0].isinf().all() and got[1, 2, :, 1:].isfinite().all()
    want = reference.scaled_dot_product_attention(q.double(), k.double(), v.double(), mask.double())
    torch.testing.assert_close(got, want.float(), rtol=1e-5, atol=1e-5, equal_nan=True)
    # a key masked by -inf contributes nothing even where its value is huge
    v2 = v.clone()
    v2[:, :, 3] = 1e30
    torch.testing.assert_close(ops.scaled_dot_product_attention(q, k, v2, mask), got, equal_nan=True)


@pytest.mark.parametrize("threads", [1, 2])
def test_attention_threads(threads):
    torch.set_num_threads(threads)
    q, k, v = (torch.randn(3, 5, 150, 32) for _ in range(3))
    want = reference.scaled_dot_product_attention(q.double(), k.double(), v.double())
    torch.testing.assert_close(ops.scaled_dot_product_attention(q, k, v), want.float(), rtol=1e-5, atol=1e-5)


def test_attention_errors():
    q, k, v = (torch.randn(2, 3, 4, 5) for _ in range(3))
    with pytest.raises(TypeError, match="float32 or float64"):
        ops.scaled_dot_product_attention(q.half(), k.half(), v.half())
    with pytest.raises(TypeError, match="same dtype"):
        ops.scaled_dot_product_attention(q, k.double(), v)
    with pytest.raises(ValueError, match="same leading dims"):
        ops.scaled_dot_product_attention(q, k[:1], v[:1])
    with pytest.raises(ValueError, match="same number of dims"):
        ops.scaled_dot_product_attention(q, k[0], v[0])
    with pytest.raises(ValueError, match="features per row"):
        ops.scaled_dot_product_attention(q, k[..., :4], v)
    with pytest.raises(ValueError, match="rows, key"):
        ops.scaled_dot_product_attention(q, k, v[..., :3, :])
    with pytest.raises(ValueError, match="does not broadcast"):
        ops.scaled_dot_product_attention(q, k, v, torch.zeros(4, 3))
    with pytest.raises(TypeError, match="bool or the query's dtype"):
        ops.scaled_dot_product_attention(q, k, v, torch.zeros(4, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="finite"):
        ops.scaled_dot_product_attention(q, k, v, None, float("inf"))
    with pytest.raises(TypeError, match="scale"):
        ops.scaled_dot_product_attention(q, k, v, None, "0.5")
    with pytest.raises(TypeError, match="attn_mask"):
        ops.scaled_dot_product_attention(q, k, v, [[0.0]])
    with pytest.raises(ValueError, match="finite"):  # the op checks what the wrapper checks
        torch.ops.fastprune.scaled_dot_product_attention(q, k, v, None, float("nan"))


def test_attention_opcheck_gradients_and_compile():
    q, k, v = (torch.randn(2, 3, 6, 5, dtype=torch.float64) for _ in range(3))
    mask = torch.randn(6, 6, dtype=torch.float64)
    op = torch.ops.fastprune.scaled_dot_product_attention
    for args in ((q, k, v, None, None), (q, k, v, mask, 0.5), (_strided(q), k, _strided(v), mask > 0, None)):
        torch.library.opcheck(op, args)
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    torch.autograd.gradcheck(lambda a, b, c: ops.scaled_dot_product_attention(a, b, c, mask), (qg, kg, vg))
    compiled = torch.compile(
        lambda a, b, c: ops.scaled_dot_product_attention(a, b, c) * 2, fullgraph=True, backend="aot_eager"
    )
    qf, kf, vf = q.float(), k.float(), v.float()
    torch.testing.assert_close(compiled(qf, kf, vf), ops.scaled_dot_product_attention(qf, kf, vf) * 2)
