"""sparse_bottleneck (a ResNet bottleneck in one call, depth-first in bands of rows on the CPU) against
its reference and against the three sparse_conv2d calls it stands for."""

from __future__ import annotations

import pytest
import torch

from fastprune import ops, reference


def _case(n, c, mid1, mid2, h, w, k=3, density=0.3, dtype=torch.float32, seed=0, empty_row=True):
    g = torch.Generator().manual_seed(seed)

    def sparse(o, i):
        wt = torch.randn(o, i, generator=g, dtype=dtype)
        return wt * (torch.rand(o, i, generator=g) < density).to(dtype)

    w1, w2, w3 = sparse(mid1, c), sparse(mid2, mid1 * k * k), sparse(c, mid2)
    if empty_row:
        w2[1] = 0  # an empty row: its output is relu(bias) alone
    b1, b2, b3 = (torch.randn(m, generator=g, dtype=dtype) for m in (mid1, mid2, c))
    x = torch.randn(n, c, h, w, generator=g, dtype=dtype)
    return (
        x,
        ops.pack_sparse(w1),
        b1,
        ops.pack_sparse(w2),
        b2,
        [mid2, mid1, k, k],
        (k - 1) // 2,
        ops.pack_sparse(w3),
        b3,
    )


def _three_calls(x, p1, b1, p2, b2, ws2, pad, p3, b3):
    h = ops.sparse_conv2d(x, *p1, [p1[0].numel() - 1, x.shape[1], 1, 1], b1, 1, 0, 1, 1, True)
    h = ops.sparse_conv2d(h, *p2, ws2, b2, 1, pad, 1, 1, True)
    return ops.sparse_conv2d(h, *p3, [x.shape[1], ws2[0], 1, 1], b3, 1, 0, 1, 1, True, x)


def _double(args):
    x, p1, b1, p2, b2, ws2, pad, p3, b3 = args
    d = [(p[0], p[1], p[2].double()) for p in (p1, p2, p3)]
    return (x.double(), d[0], b1.double(), d[1], b2.double(), ws2, pad, d[2], b3.double())


# (n, c, mid1, mid2, h, w, k): bands of 256 positions (or 64-position steps) that start inside rows
# (56- and 28-wide planes; one sample over two threads splits at position 384 of 784, inside row 13),
# odd sizes (no band path: H * W not a multiple of 16), 1x1 middle, 5x5 middle (two rows of halo),
# more rows per block than the code's 28 / 31
CASES = [
    (1, 16, 8, 8, 16, 16, 3),
    (1, 16, 8, 8, 28, 28, 3),
    (1, 12, 8, 6, 12, 28, 5),
    (2, 24, 12, 10, 8, 56, 3),
    (3, 20, 33, 9, 12, 28, 3),
    (1, 12, 7, 5, 7, 9, 3),
    (2, 16, 8, 8, 8, 4, 1),
    (1, 16, 10, 6, 12, 16, 5),
    (2, 40, 70, 65, 4, 8, 3),
]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("jit", ["always", "1", "0"])
def test_sparse_bottleneck_matches_reference_and_the_three_calls(monkeypatch, case, threads, jit):
    monkeypatch.setenv("FASTPRUNE_JIT", jit)
    torch.set_num_threads(threads)
    args = _case(*case, seed=sum(case))
    ops.reset_kernel_counts()
    got = ops.sparse_bottleneck(*args)
    assert got.shape == args[0].shape and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), reference.sparse_bottleneck(*_double(args)), rtol=1e-5, atol=1e-4)
    # the same code or loops per output as the per-layer calls: the same values, bit for bit; but
    # with several samples and the code not forced, the separate 1x1 convs run the vector loops
    # (sparse_conv2d_cpu), which sum in another order
    if jit != "1" or case[0] == 1 or not ops.jit_available():
        assert torch.equal(got, _three_calls(*args))
    else:
        torch.testing.assert_close(got, _three_calls(*args), rtol=1e-5, atol=1e-5)
    bands = ops.kernel_counts().get(("sparse_bottleneck_bands", "jit"), 0)
    n, c, mid1, mid2, h, w, k = case
    if jit == "always" and ops.jit_available():
        assert (bands > 0) == ((h * w) % 16 == 0), (case, bands)
    if jit == "0" or not ops.jit_available():
        assert bands == 0


def test_sparse_bottleneck_float64_non_contiguous_empty_and_errors():
    args = _case(2, 12, 6, 7, 9, 11, dtype=torch.float64)
    x = args[0].permute(0, 1, 3, 2).contiguous().permute(0, 1, 3, 2)  # the same values, not contiguous
    assert not x.is_contiguous()
    want = reference.sparse_bottleneck(*args)
    torch.testing.assert_close(ops.sparse_bottleneck(x, *args[1:]), want, rtol=1e-12, atol=1e-12)
    empty = ops.sparse_bottleneck(args[0][:0], *args[1:])
    assert empty.shape == (0, 12, 9, 11)
    x, p1, b1, p2, b2, ws2, pad, p3, b3 = args
    with pytest.raises(ValueError, match="keep the size"):
        ops.sparse_bottleneck(x, p1, b1, p2, b2, ws2, 0, p3, b3)
    with pytest.raises(ValueError, match="conv1 gives"):
        ops.sparse_bottleneck(x, p1, b1, p2, b2, [7, 5, 3, 3], pad, p3, b3)
    with pytest.raises(ValueError, match="residual"):
        ops.sparse_bottleneck(x[:, :11], p1, b1, p2, b2, ws2, pad, p3, b3)
    with pytest.raises(ValueError, match="\\(N, C, H, W\\)"):
        ops.sparse_bottleneck(x[0], p1, b1, p2, b2, ws2, pad, p3, b3)
    with pytest.raises(TypeError, match="conv2"):
        ops.sparse_bottleneck(x, p1, b1, p2[:2], b2, ws2, pad, p3, b3)
    with pytest.raises(RuntimeError, match="bias"):
        torch.ops.fastprune.sparse_bottleneck(x, *p1, b1[:2], *p2, b2, ws2, [1, 1], *p3, b3)


def test_sparse_bottleneck_opcheck_gradients_and_compile():
    for dtype, case in [
        (torch.float32, (1, 16, 8, 8, 8, 8)),
        (torch.float32, (2, 12, 7, 5, 5, 6)),
        (torch.float64, (1, 8, 4, 4, 4, 4)),
    ]:
        args = _case(*case, dtype=dtype)
        args[0].requires_grad_()
        x, p1, b1, p2, b2, ws2, pad, p3, b3 = args
        torch.library.opcheck(torch.ops.fastprune.sparse_bottleneck, (x, *p1, b1, *p2, b2, ws2, [pad, pad], *p3, b3))
    x, p1, b1, p2, b2, ws2, pad, p3, b3 = _case(1, 6, 4, 5, 4, 4, dtype=torch.float64, density=0.6)
    for t in (x, b1, b2, b3):
        t.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda x, b1, b2, b3: ops.sparse_bottleneck(x, p1, b1, p2, b2, ws2, pad, p3, b3), (x, b1, b2, b3)
    )
    with pytest.raises(RuntimeError, match="not supported"):
        vals = p2[2].clone().requires_grad_()
        ops.sparse_bottleneck(x, p1, b1, (p2[0], p2[1], vals), b2, ws2, pad, p3, b3).sum().backward()
    args = _case(1, 16, 8, 8, 8, 8)
    compiled = torch.compile(lambda x: ops.sparse_bottleneck(x, *args[1:]) * 2, fullgraph=True)
    torch.testing.assert_close(compiled(args[0]), ops.sparse_bottleneck(*args) * 2)
