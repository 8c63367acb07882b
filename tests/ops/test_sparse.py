"""pack_sparse and sparse_linear against their plain-PyTorch references (fastprune.reference)."""

from __future__ import annotations

import pytest
import torch

from fastprune import ops, reference


def _sparse_weight(out: int, inp: int, density: float, dtype=torch.float32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g, dtype=dtype)
    return w * (torch.rand(out, inp, generator=g) < density).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(1, 1), (7, 13), (37, 53), (0, 5), (4, 0), (3, 70000)])
def test_pack_matches_reference(dtype, shape):
    w = _sparse_weight(*shape, 0.3 if shape != (3, 70000) else 0.001, dtype)
    if shape == (7, 13):
        w[2] = 0  # an empty row
        w[4] = 1.5  # a dense row
    got = ops.pack_sparse(w)
    want = reference.pack_sparse(w)
    for a, b in zip(got, want, strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b)
    assert got[1].dtype == (torch.int32 if shape[1] > 65536 else torch.int16)
    torch.testing.assert_close(ops.unpack_sparse(*got, shape[1]), w, rtol=0, atol=0)


def test_pack_reads_non_contiguous_weights_and_wide_16_bit_columns():
    w = _sparse_weight(60000, 5, 0.5).t()  # (5, 60000): columns above 32767 live in int16 as negatives
    rp, col, val = ops.pack_sparse(w)
    assert col.dtype == torch.int16 and bool((col < 0).any())
    torch.testing.assert_close(ops.unpack_sparse(rp, col, val, 60000), w, rtol=0, atol=0)
    x = torch.randn(2, 60000)
    torch.testing.assert_close(
        ops.sparse_linear(x, rp, col, val, 60000),
        reference.sparse_linear(x.double(), rp, col, val.double(), 60000).float(),
        rtol=1e-4,
        atol=1e-3,
    )  # float32 sums of 30000 products


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("batch", [(), (1,), (3,), (2, 3), (17,), (0,)])
@pytest.mark.parametrize("density", [0.0, 0.1, 0.5, 1.0])
def test_sparse_linear_matches_reference(isa, dtype, batch, density):
    out, inp = 29, 67
    w = _sparse_weight(out, inp, density, dtype, seed=len(batch))
    w[3] = 0
    packed = ops.pack_sparse(w)
    x = torch.randn(*batch, inp, dtype=dtype)
    b = torch.randn(out, dtype=dtype)
    for bias, relu in [(None, False), (b, True), (b, False)]:
        got = ops.sparse_linear(x, *packed, inp, bias, relu)
        want = reference.sparse_linear(
            x.double(), packed[0], packed[1], packed[2].double(), inp, None if bias is None else bias.double(), relu
        )
        assert got.shape == (*batch, out) and got.dtype == dtype
        tol = 1e-5 if dtype == torch.float32 else 1e-12
        torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)


@pytest.mark.parametrize("n", [2, 8, 9, 16, 24, 56, 63, 64, 65, 130, 300, 389])
@pytest.mark.parametrize("inp", [5, 67, 1500, 3001])
def test_sparse_linear_many_samples(isa, n, inp):
    # the many-sample path: blocks of the kernel's register block (64 or 128 samples), halved while
    # K * B floats exceed 4/5 of the L2 cache (3001 columns), no wider than n rounded up to 16; where
    # the blocks' X^T passes the threads' L2 caches together, groups of as many blocks as those hold
    # (3001 columns from 130 samples with a 1 MB L2; 389 = 6 x 64 + 5 samples up to a 2 MB L2, at 1
    # and 2 threads: groups of 1, or of 2 with a last group of one partial block); the last block
    # partial, the input and
    # output transposed through 16 x 16 tiles, a strip of 8 x 8 blocks and element-wise edges (45
    # outputs = 2 x 16 + 8 + 5; 300 samples: a last block of 44 = 2 x 16 + 8 + 4); what is left of a
    # block after its full register blocks is one block of exactly that many vectors (24 and 56
    # samples: 3 whole vectors on AVX2, 1.5 / 3.5 on AVX-512; 9, 63, 300: a masked last vector); one
    # vector of samples goes two rows at a time (2, 8, 9, 16 on AVX-512, 2 and 8 on AVX2; masked
    # below a whole vector): 22 pairs and a row left, row 7 empty beside row 6
    w = _sparse_weight(45, inp, 0.15, seed=n)
    w[7] = 0  # an empty row beside a full one in the two-row loop
    rp, col, val = ops.pack_sparse(w)
    x, b = torch.randn(n, inp), torch.randn(45)
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for bias, relu in [(None, False), (b, True)]:
            got = ops.sparse_linear(x, rp, col, val, inp, bias, relu)
            want = reference.sparse_linear(
                x.double(), rp, col, val.double(), inp, None if bias is None else bias.double(), relu
            )
            torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)
    # full blocks of 64 (AVX-512) / 32 (AVX2) samples ran the two-row panel loop (3001 columns:
    # six panels of 512, walked in pairs on AVX2; 1500: three, the last "pair" one panel), the
    # partial last one the one-row loop; the portable copy has no panels
    panels = ops.kernel_counts().get(("sparse_linear_panels", isa.removesuffix("-jit")), 0)
    full = {"avx512": 64, "avx2": 32}.get(isa.removesuffix("-jit"))
    assert (panels > 0) == (full is not None and n >= full), (isa, n, panels)
    # a non-contiguous (transposed) input, and rows sharing patterns mixed with rows that do not
    shared = torch.cat([_shared_pattern_weight(12, inp, 0.3, seed=n), w[:5]])
    packed = ops.pack_sparse(shared)
    xt = torch.randn(inp, n).t()
    want = reference.sparse_linear(xt.double(), packed[0], packed[1], packed[2].double(), inp)
    torch.testing.assert_close(ops.sparse_linear(xt, *packed, inp).double(), want, rtol=1e-5, atol=1e-4)


def test_sparse_linear_non_contiguous_input_and_wide_columns(isa):
    inp = 70000
    w = _sparse_weight(9, inp, 0.002)
    packed = ops.pack_sparse(w)
    assert packed[1].dtype == torch.int32
    x = torch.randn(inp, 6).t()  # (6, inp), not contiguous
    for n in (1, 6):
        got = ops.sparse_linear(x[:n], *packed, inp)
        torch.testing.assert_close(got.double(), x[:n].double() @ w.double().t(), rtol=1e-5, atol=1e-5)


def test_bad_inputs_are_clear_errors():
    w = _sparse_weight(5, 8, 0.5)
    rp, col, val = ops.pack_sparse(w)
    x = torch.randn(2, 8)
    with pytest.raises(ValueError, match="in_features"):
        ops.sparse_linear(torch.randn(2, 9), rp, col, val, 8)
    with pytest.raises(ValueError, match="NaN"):
        ops.pack_sparse(torch.tensor([[1.0, float("nan")]]))
    with pytest.raises(ValueError, match="2-D"):
        ops.pack_sparse(torch.randn(2, 3, 4))
    with pytest.raises(TypeError, match="float32 or float64"):
        ops.pack_sparse(torch.ones(2, 2, dtype=torch.int64))
    # a packed weight from a different (wider) shape: a clear error from the wrapper; the native op
    # never reads out of bounds (16-bit columns: a zero-padded copy of x; else range checks)
    wide = ops.pack_sparse(_sparse_weight(5, 40, 0.9))
    with pytest.raises(ValueError, match="different shape"):
        ops.sparse_linear(torch.randn(3, 8), *wide, 8)
    wide_w = _sparse_weight(5, 40, 0.9)
    for name in ("scalar", "avx2", "avx512"):
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("FASTPRUNE_ISA", name)
            for n in (1, 3):
                x8 = torch.randn(n, 8)
                try:
                    y = torch.ops.fastprune.sparse_linear(x8, *wide, 8, None, False)
                except RuntimeError as e:
                    assert "different shape" in str(e)
                else:  # columns >= 8 read zeros: the result is the product with the first 8 columns
                    torch.testing.assert_close(y, x8 @ wide_w[:, :8].t(), rtol=1e-5, atol=1e-5)
    big = ops.pack_sparse(_sparse_weight(3, 70000, 0.01))
    with pytest.raises(RuntimeError, match="different shape"):
        torch.ops.fastprune.sparse_linear(torch.randn(1, 100), *big, 100, None, False)
    with pytest.raises(RuntimeError, match="row_ptr"):
        torch.ops.fastprune.sparse_linear(x, rp[:-1].contiguous(), col, val, 8, None, False)
    down = rp.clone()
    down[2] = int(rp[-1])  # starts at 0, ends at nnz, decreases after row 2
    assert int(rp[3]) < int(rp[-1])
    for n, dtype in [(2, torch.float32), (70, torch.float32), (2, torch.float64)]:
        xs = torch.randn(n, 8, dtype=dtype)
        with pytest.raises(RuntimeError, match=r"row_ptr must not decrease \(row 2\)"):
            torch.ops.fastprune.sparse_linear(xs, down, col, val.to(dtype), 8, None, False)
    with pytest.raises(RuntimeError, match="values are Float, input is Double"):
        torch.ops.fastprune.sparse_linear(x.double(), rp, col, val, 8, None, False)
    with pytest.raises(RuntimeError, match="bias"):
        torch.ops.fastprune.sparse_linear(x, rp, col, val, 8, torch.randn(4), False)


def test_opcheck():
    for dtype, n in [(torch.float32, 1), (torch.float32, 5), (torch.float64, 2)]:
        w = _sparse_weight(11, 19, 0.4, dtype)
        packed = ops.pack_sparse(w)
        x = torch.randn(n, 19, dtype=dtype, requires_grad=True)
        torch.library.opcheck(torch.ops.fastprune.sparse_linear, (x, *packed, 19, torch.randn(11, dtype=dtype), True))
        torch.library.opcheck(torch.ops.fastprune.pack_sparse, (w,), test_utils=("test_schema", "test_faketensor"))


def test_input_gradient_and_no_weight_gradient():
    w = _sparse_weight(6, 9, 0.5, torch.float64)
    rp, col, val = ops.pack_sparse(w)
    x = torch.randn(4, 9, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, b: ops.sparse_linear(x, rp, col, val, 9, b, True), (x, b))
    with pytest.raises(RuntimeError, match="not supported"):
        ops.sparse_linear(x, rp, col, val.clone().requires_grad_(), 9).sum().backward()


def test_torch_compile_smoke():
    w = _sparse_weight(8, 16, 0.3)
    packed = ops.pack_sparse(w)

    def f(x):
        return torch.ops.fastprune.sparse_linear(x, *packed, 16, None, True) * 2

    x = torch.randn(3, 16)
    torch.testing.assert_close(torch.compile(f, fullgraph=True, backend="aot_eager")(x), f(x))


# ------------------------------------------------------------------------------ sparse_conv2d
CONV_CASES = [
    # (N, C, H, W, O, k, stride, padding, dilation, groups)
    (1, 5, 9, 11, 7, 3, 1, 1, 1, 1),
    (3, 6, 10, 7, 4, 3, 2, 1, 1, 2),  # stride 2, grouped, odd sizes
    (2, 8, 8, 8, 8, 3, 1, 2, 2, 8),  # depthwise, dilation 2
    (1, 4, 6, 6, 6, 1, 1, 0, 1, 1),  # 1x1: results written straight into the output (36: a masked tail)
    (1, 6, 9, 9, 7, 1, 2, 0, 1, 1),  # 1x1 stride 2, odd sizes: also straight into the output
    (1, 5, 18, 18, 9, 1, 1, 0, 1, 1),  # 1x1, 324 positions: full tiles then a tail, straight out
    (2, 5, 8, 6, 9, 1, 1, 0, 1, 1),  # 1x1, H * W = 48: reads the input in place, per sample
    (1, 6, 4, 4, 4, 1, 1, 0, 1, 2),  # grouped 1x1 read in place
    (3, 4, 5, 7, 6, 1, 1, 0, 1, 1),  # 1x1 on several samples: one product over all positions
    (2, 6, 4, 4, 4, 1, 1, 0, 1, 2),  # grouped 1x1 on several samples
    (2, 3, 13, 9, 5, 5, (2, 1), (2, 0), 1, 1),  # rectangular stride and padding
    (0, 3, 5, 5, 4, 3, 1, 1, 1, 1),  # empty batch
]


def _conv_case(case, dtype, density=0.4, seed=0):
    n, c, h, w, o, k, s, p, d, g = case
    weight = _sparse_weight(o, c // g * k * k, density, dtype, seed).reshape(o, c // g, k, k)
    weight[1] = 0  # an all-zero filter
    x = torch.randn(n, c, h, w, dtype=dtype, generator=torch.Generator().manual_seed(seed + 1))
    return weight, x, s, p, d, g


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", CONV_CASES)
def test_sparse_conv2d_matches_reference(isa, dtype, case):
    import torch.nn.functional as F

    weight, x, s, p, d, g = _conv_case(case, dtype)
    packed = ops.pack_sparse(weight.flatten(1))
    b = torch.randn(weight.shape[0], dtype=dtype)
    want = F.conv2d(x.double(), weight.double(), b.double(), s, p, d, g)
    res = torch.randn(want.shape, dtype=dtype)
    for bias, relu, residual in [(None, False, None), (b, True, None), (b, True, res)]:
        got = ops.sparse_conv2d(x, *packed, weight.shape, bias, s, p, d, g, relu, residual)
        ref = reference.sparse_conv2d(
            x.double(),
            packed[0],
            packed[1],
            packed[2].double(),
            weight.shape,
            None if bias is None else bias.double(),
            s,
            p,
            d,
            g,
            relu,
            None if residual is None else residual.double(),
        )
        tol = 1e-5 if dtype == torch.float32 else 1e-12
        assert got.shape == ref.shape
        torch.testing.assert_close(got.double(), ref, rtol=tol, atol=tol)


def test_sparse_conv2d_non_contiguous_input_and_dense_filter(isa):
    import torch.nn.functional as F

    weight = torch.randn(6, 4, 3, 3)  # fully dense rows
    x = torch.randn(2, 9, 9, 4).permute(0, 3, 1, 2)  # channels-last view
    packed = ops.pack_sparse(weight.flatten(1))
    torch.testing.assert_close(
        ops.sparse_conv2d(x, *packed, weight.shape, None, 1, 1), F.conv2d(x, weight, None, 1, 1), rtol=1e-5, atol=1e-5
    )


def test_sparse_conv2d_bad_inputs():
    weight = _sparse_weight(4, 3 * 9, 0.5).reshape(4, 3, 3, 3)
    packed = ops.pack_sparse(weight.flatten(1))
    with pytest.raises(ValueError, match="channels"):
        ops.sparse_conv2d(torch.randn(1, 5, 8, 8), *packed, weight.shape)
    with pytest.raises(ValueError, match="different shape"):
        ops.sparse_conv2d(torch.randn(1, 1, 8, 8), *packed, (4, 1, 3, 3))
    with pytest.raises(RuntimeError, match="different shape"):
        torch.ops.fastprune.sparse_conv2d(
            torch.randn(1, 1, 8, 8), *packed, [4, 1, 3, 3], None, [1, 1], [0, 0], [1, 1], 1, False, None
        )
    with pytest.raises(RuntimeError, match="smaller than the dilated kernel"):
        ops.sparse_conv2d(torch.randn(1, 3, 2, 2), *packed, weight.shape)
    with pytest.raises(RuntimeError, match="residual"):
        ops.sparse_conv2d(torch.randn(1, 3, 8, 8), *packed, weight.shape, residual=torch.randn(1, 4, 5, 5))


def test_sparse_conv2d_opcheck_gradients_and_compile():
    weight, x, s, p, d, g = _conv_case(CONV_CASES[1], torch.float64)
    packed = ops.pack_sparse(weight.flatten(1))
    x = x.requires_grad_()
    b = torch.randn(weight.shape[0], dtype=torch.float64, requires_grad=True)
    args = (x, *packed, list(weight.shape), b, [2, 2], [1, 1], [1, 1], g, True, None)
    torch.library.opcheck(torch.ops.fastprune.sparse_conv2d, args)
    assert torch.autograd.gradcheck(
        lambda x, b: ops.sparse_conv2d(x, *packed, weight.shape, b, 2, 1, 1, g, True), (x, b)
    )
    w32, x32 = weight.float(), x.detach().float()
    p32 = ops.pack_sparse(w32.flatten(1))

    def f(t):
        return torch.ops.fastprune.sparse_conv2d(t, *p32, list(w32.shape), None, [2, 2], [1, 1], [1, 1], g, True, None)

    torch.testing.assert_close(torch.compile(f, fullgraph=True, backend="aot_eager")(x32), f(x32))


def test_conv_offset_cache_follows_in_place_changes_and_geometry(isa):
    import torch.nn.functional as F

    weight = _sparse_weight(4, 3 * 9, 0.5).reshape(4, 3, 3, 3)
    rp, col, val = ops.pack_sparse(weight.flatten(1))
    x = torch.randn(1, 3, 8, 8)
    y1 = ops.sparse_conv2d(x, rp, col, val, weight.shape, None, 1, 1)
    # another geometry with the same packed weight: its own offsets
    x2 = torch.randn(2, 3, 11, 5)
    torch.testing.assert_close(
        ops.sparse_conv2d(x2, rp, col, val, weight.shape, None, 2, 2),
        F.conv2d(x2, weight, None, 2, 2),
        rtol=1e-5,
        atol=1e-5,
    )
    # an in-place change of the columns (a different filter pattern) must not reuse stale offsets
    w2 = weight.roll(1, dims=3)
    rp2, col2, val2 = ops.pack_sparse(w2.flatten(1))
    if col2.numel() == col.numel() and torch.equal(rp2, rp):
        col.copy_(col2)
        val.copy_(val2)
        torch.testing.assert_close(
            ops.sparse_conv2d(x, rp, col, val, weight.shape, None, 1, 1),
            F.conv2d(x, w2, None, 1, 1),
            rtol=1e-5,
            atol=1e-5,
        )
    assert y1.shape == (1, 4, 8, 8)


# Rows that share a pattern: the vector loops run up to four of them together (one load or gather
# feeds several rows). Runs of 1..6 equal-pattern rows, so that groups of 4, 2 and single rows, runs
# cut by a chunk edge, and empty shared rows all occur.
def _shared_pattern_weight(out: int, inp: int, density: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    rows, r = [], 0
    while r < out:
        length = min(int(torch.randint(1, 7, (1,), generator=g)), out - r)
        pattern = torch.rand(inp, generator=g) < density
        if torch.rand(1, generator=g).item() < 0.1:
            pattern[:] = False  # empty rows share a pattern too
        rows += [pattern] * length
        r += length
    return torch.randn(out, inp, generator=g) * torch.stack(rows)


@pytest.mark.parametrize("batch", [1, 3, 17])
@pytest.mark.parametrize("inp", [67, 300, 70000])
def test_sparse_linear_rows_sharing_a_pattern(isa, batch, inp):
    w = _shared_pattern_weight(45, inp, 0.3 if inp < 70000 else 0.002, seed=batch)
    rp, col, val = ops.pack_sparse(w)
    x, b = torch.randn(batch, inp), torch.randn(45)
    want = reference.sparse_linear(x.double(), rp, col, val.double(), inp, b.double(), True)
    torch.testing.assert_close(ops.sparse_linear(x, rp, col, val, inp, b, True).double(), want, rtol=1e-5, atol=1e-4)
    # the same weight packed as inference tensors (no version counter: nothing cached)
    with torch.inference_mode():
        packed = ops.pack_sparse(w)
        got = ops.sparse_linear(x, *packed, inp, b, True)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)
    # an in-place change that breaks the shared patterns must not reuse the cached groups
    w2 = w.clone()
    w2[torch.arange(0, 45, 2)] = w2[torch.arange(0, 45, 2)].roll(1, dims=1)
    rp2, col2, val2 = ops.pack_sparse(w2)
    if torch.equal(rp2, rp):
        col.copy_(col2)
        val.copy_(val2)
        torch.testing.assert_close(
            ops.sparse_linear(x, rp, col, val, inp, b, True),
            torch.relu(torch.nn.functional.linear(x, w2, b)),
            rtol=1e-5,
            atol=1e-4,
        )


@pytest.mark.parametrize(
    "case",
    [
        (1, 5, 9, 11, 23, 3, 1, 1, 1, 1),  # odd sizes: a partial last tile
        (2, 6, 14, 14, 18, 3, 2, 1, 1, 2),  # stride 2, two conv groups (equal columns, different planes)
        (3, 40, 7, 7, 37, 1, 1, 0, 1, 1),  # 1x1 on several samples (one product over N * H * W)
        (1, 8, 12, 12, 8, 3, 1, 2, 2, 8),  # depthwise, dilated
        (1, 16, 56, 30, 9, 3, 1, 1, 1, 1),  # long rows: several full tiles and a tail
    ],
)
def test_sparse_conv2d_rows_sharing_a_pattern(isa, case):
    n, c, h, wd, o, k, s, p, d, g = case
    weight = _shared_pattern_weight(o, c // g * k * k, 0.4, seed=o).reshape(o, c // g, k, k)
    x = torch.randn(n, c, h, wd)
    rp, col, val = ops.pack_sparse(weight.flatten(1))
    b = torch.randn(o)
    want = reference.sparse_conv2d(x.double(), rp, col, val.double(), weight.shape, b.double(), s, p, d, g, True)
    got = ops.sparse_conv2d(x, rp, col, val, weight.shape, b, s, p, d, g, True)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)


TILE_MAJOR = [(2, 300, 30, 30, 33), (1, 16, 24, 24, 20), (11, 40, 7, 7, 16)]  # (N, C, H, W, O)


# Generated code (csrc/sparse/sparse_jit.cpp): blocks of up to 28 rows (31 for 1x1 convs) whose
# accumulators stay in registers. FASTPRUNE_JIT=always runs it for every float32 conv (on a CPU
# without AVX-512 these cases run the vector loops instead, and still must match).
@pytest.mark.parametrize(
    "case",
    [
        (1, 6, 12, 13, 61, 3, 1, 1, 1, 1),  # three blocks of rows (28, 28, 5), a partial last tile
        (2, 300, 30, 30, 33, 1, 1, 0, 1, 1),  # offsets past 2^16 floats (32-bit displacements)
        (1, 40, 20, 20, 70, 3, 2, 1, 1, 1),  # stride 2, over 2^14 nonzeros (value displacements)
        (1, 4, 16, 16, 30, 1, 1, 0, 1, 1),  # 1x1 in place, 256 positions: straight into the output
        (2, 8, 9, 9, 29, 3, 1, 1, 1, 1),  # 29 rows: a block of one row
        (1, 5, 8, 8, 63, 1, 1, 0, 1, 1),  # 1x1, every offset aligned: blocks of 31 rows (31, 31, 1)
        (2, 7, 5, 6, 33, 1, 1, 0, 1, 1),  # 1x1 on 30-position planes (padded to 32), a partial tile
        # columns >= rows and >= 32 tiles: the tile-major order (with 300 -> 33 above: direct output,
        # a partial last tile), packed (compress) tiles of a padded 3x3, and merged samples
        (1, 16, 24, 24, 20, 3, 1, 1, 1, 1),
        (11, 40, 7, 7, 16, 1, 1, 0, 1, 1),
    ],
)
@pytest.mark.parametrize("density", [0.1, 0.6])
def test_generated_code_matches_reference(monkeypatch, case, density):
    monkeypatch.setenv("FASTPRUNE_ISA", "avx512")
    torch.set_num_threads(2)  # (3x3 convs run tile-major with several threads only)
    weight, x, s, p, d, g = _conv_case(case, torch.float32, density=density)
    rp, col, val = ops.pack_sparse(weight.flatten(1))
    b = torch.randn(weight.shape[0])
    for bias, relu, with_res in [
        (None, False, False),
        (b, False, False),
        (None, True, False),
        (b, True, True),
        (None, False, True),
    ]:
        want = reference.sparse_conv2d(
            x.double(), rp, col, val.double(), weight.shape, None if bias is None else bias.double(), s, p, d, g, relu
        )
        res = torch.randn(want.shape) if with_res else None
        if res is not None:
            want = reference.sparse_conv2d(
                x.double(),
                rp,
                col,
                val.double(),
                weight.shape,
                None if bias is None else bias.double(),
                s,
                p,
                d,
                g,
                relu,
                res.double(),
            )
        for mode in ("always", "0", "1"):
            monkeypatch.setenv("FASTPRUNE_JIT", mode)
            ops.reset_kernel_counts()
            got = ops.sparse_conv2d(x, rp, col, val, weight.shape, bias, s, p, d, g, relu, res)
            torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)
            if mode == "always" and ops.jit_available() and "avx512" in ops.cpu_isas():
                tile_major = ops.kernel_counts().get(("sparse_conv2d_tile_major", "jit"), 0) > 0
                assert tile_major == (case[:5] in TILE_MAJOR), (case, tile_major)


def test_generated_code_follows_changed_values_and_bad_settings_are_errors(monkeypatch):
    import torch.nn.functional as F

    monkeypatch.setenv("FASTPRUNE_ISA", "avx512")
    monkeypatch.setenv("FASTPRUNE_JIT", "always")
    weight = _sparse_weight(40, 5 * 9, 0.3).reshape(40, 5, 3, 3)
    rp, col, val = ops.pack_sparse(weight.flatten(1))
    x = torch.randn(1, 5, 10, 10)
    y = ops.sparse_conv2d(x, rp, col, val, weight.shape, None, 1, 1)
    # the code holds a copy of the values: an in-place change (version counter) or new storage under
    # the same tensor (.data =) makes it again
    val.mul_(-2.0)
    torch.testing.assert_close(ops.sparse_conv2d(x, rp, col, val, weight.shape, None, 1, 1), -2.0 * y)
    val.data = val * 0.5
    torch.testing.assert_close(ops.sparse_conv2d(x, rp, col, val, weight.shape, None, 1, 1), -y)
    torch.testing.assert_close(y, F.conv2d(x, weight, None, 1, 1), rtol=1e-5, atol=1e-5)
    with torch.inference_mode():  # inference tensors: no cache, so the vector loops (still right)
        packed_inf = ops.pack_sparse(weight.flatten(1))
        torch.testing.assert_close(
            ops.sparse_conv2d(x, *packed_inf, weight.shape, None, 1, 1),
            F.conv2d(x, weight, None, 1, 1),
            rtol=1e-5,
            atol=1e-5,
        )
    monkeypatch.setenv("FASTPRUNE_JIT", "yes")
    with pytest.raises(RuntimeError, match="FASTPRUNE_JIT must be 0, 1 or always"):
        ops.sparse_conv2d(x, rp, col, val, weight.shape, None, 1, 1)


_GUARD_SCRIPT = r"""
import ctypes, mmap, sys
import numpy as np, torch, torch.nn.functional as F
from fastprune import ops

# a residual whose last float ends where an inaccessible page begins: a read past it faults
page = mmap.PAGESIZE
o, hout, wout = 30, 9, 9  # 9 x 11 grid positions per plane: the last tile is partial
n_floats = o * hout * wout
pages = (n_floats * 4 + page - 1) // page + 1
buf = mmap.mmap(-1, pages * page)
base = ctypes.addressof(ctypes.c_char.from_buffer(buf))
libc = ctypes.CDLL(None, use_errno=True)
libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
assert libc.mprotect(base + (pages - 1) * page, page, 0) == 0
arr = np.frombuffer(buf, dtype=np.float32, count=n_floats, offset=(pages - 1) * page - n_floats * 4)
torch.manual_seed(0)
res = torch.from_numpy(arr).view(1, o, hout, wout)
res.copy_(torch.randn(1, o, hout, wout))
w = torch.randn(o, 4, 3, 3) * (torch.rand(o, 4, 3, 3) < 0.3)
x = torch.randn(1, 4, 9, 9)
b = torch.randn(o)
got = ops.sparse_conv2d(x, *ops.pack_sparse(w.flatten(1)), list(w.shape), b, 1, 1, 1, 1, True, res)
torch.testing.assert_close(got, F.relu(F.conv2d(x, w, b, 1, 1) + res), rtol=1e-5, atol=1e-4)
print("ok")
"""


def test_generated_code_reads_no_residual_past_its_end():
    # A padded conv's generated code packs each tile's output lanes together and reads the residual
    # under a mask: nothing past the tensor. A residual that ends at an inaccessible page proves it
    # (a read past it would kill the process: run in a child).
    import os
    import subprocess
    import sys

    env = dict(os.environ, FASTPRUNE_ISA="avx512", FASTPRUNE_JIT="always")
    proc = subprocess.run([sys.executable, "-c", _GUARD_SCRIPT], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-2000:]


def test_derived_data_stays_cached_for_every_layer_of_a_deep_model():
    # more layers than the old global bound (256): a model's second call derives nothing, and each
    # weight keeps several input geometries (a second input size does not evict the first)
    from fastprune.ops import cpu

    g = torch.Generator().manual_seed(0)
    layers = []
    for _ in range(300):
        w = torch.randn(6, 4, 3, 3, generator=g) * (torch.rand(6, 4, 3, 3, generator=g) > 0.7)
        layers.append((*ops.pack_sparse(w.flatten(1)), [6, 4, 3, 3]))
    lin = ops.pack_sparse(torch.randn(5, 7, generator=g) * (torch.rand(5, 7, generator=g) > 0.5))

    def run(x):
        for rp, ci, v, shape in layers:
            ops.sparse_conv2d(x, rp, ci, v, shape, None, 1, 1)
        ops.sparse_linear(torch.randn(3, 7), *lin, 7)

    small, big = torch.randn(1, 4, 5, 6), torch.randn(2, 4, 9, 7)
    before = cpu.derived_computed()
    run(small)
    run(big)
    assert cpu.derived_computed() - before == 2 * 300 + 1  # (the linear layer: one geometry)
    before = cpu.derived_computed()
    run(small)
    run(big)
    assert cpu.derived_computed() == before
    rp, ci, v, shape = layers[0]
    with torch.no_grad():
        v.mul_(2)  # an in-place change of the values alone: the offsets stay valid
        ci.copy_(ci)  # of the columns: derived again
    run(small)
    assert cpu.derived_computed() == before + 1


def _ffn_case(n: int, inp: int, hidden: int, out: int, dtype=torch.float32, seed: int = 0):
    w1, w2 = _sparse_weight(hidden, inp, 0.2, dtype, seed), _sparse_weight(out, hidden, 0.2, dtype, seed + 1)
    w1[3] = 0  # an empty hidden unit (its activation of the bias alone)
    g = torch.Generator().manual_seed(seed + 2)
    b1, b2 = torch.randn(hidden, generator=g, dtype=dtype), torch.randn(out, generator=g, dtype=dtype)
    return ops.pack_sparse(w1), b1, ops.pack_sparse(w2), b2, torch.randn(n, inp, generator=g, dtype=dtype)


@pytest.mark.parametrize("n", [0, 1, 5, 31, 32, 63, 64, 65, 130, 200])
@pytest.mark.parametrize("activation", ["gelu", "relu", "none"])
def test_sparse_ffn_matches_reference(isa, n, activation):
    # full blocks of the panel loop's samples (64 AVX-512, 32 AVX2) keep the hidden activations
    # blocked; fewer rows, the portable copy and the last partial block compose sparse_linear
    up, b1, down, b2, x = _ffn_case(n, 67, 301, 45, seed=n)
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for bias1, bias2 in [(b1, b2), (None, None)]:
            got = ops.sparse_ffn(x, up, bias1, down, bias2, 67, activation)
            want = reference.sparse_ffn(
                x.double(), (up[0], up[1], up[2].double()), None if bias1 is None else bias1.double(),
                (down[0], down[1], down[2].double()), None if bias2 is None else bias2.double(), 67, activation,
            )  # fmt: skip
            assert got.shape == (n, 45) and got.dtype == torch.float32
            torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)
            # the two layers one after the other: the same sums (a last partial block of one row
            # runs the one-sample loop, summed in another order: float rounding; the blocked GELU
            # is kErfPoly's polynomial, within 5e-7 of ATen's)
            h = ops.sparse_linear(x, *up, 67, bias1, activation == "relu")
            h = torch.nn.functional.gelu(h) if activation == "gelu" else h
            torch.testing.assert_close(got, ops.sparse_linear(h, *down, 301, bias2), rtol=1e-5, atol=1e-5)
    blocked = ops.kernel_counts().get(("sparse_ffn_blocked", isa.removesuffix("-jit")), 0)
    full = {"avx512": 64, "avx2": 32}.get(isa.removesuffix("-jit"))
    assert (blocked > 0) == (full is not None and n >= full), (isa, n, blocked)


def test_sparse_ffn_gelu_on_the_panels_is_accurate(isa):
    # identity layers expose the activation: the blocked path applies the kErfPoly GELU (sparse_core.h, a
    # piecewise polynomial erf) to the up layer's accumulators; float64 GELU is the truth
    k = 64
    eye = ops.pack_sparse(torch.eye(k))
    x = torch.cat([torch.linspace(-12.0, 12.0, 64 * 200).view(-1, 1).expand(-1, k), 3 * torch.randn(640, k)])
    x[0, :3] = torch.tensor([float("nan"), 1e30, -1e30])
    got = ops.sparse_ffn(x, eye, None, eye, None, k, "gelu").double()
    want = torch.nn.functional.gelu(x.double())
    assert bool(got[0, 0].isnan()) and got[0, 1] == x[0, 1] and got[0, 2] == 0  # NaN kept; the tails exact
    err = (got - want).abs()[1:]
    assert float((err / (1 + x[1:].double().abs())).max()) < 3e-7  # ATen's float32 GELU: 1.2e-6
    full = {"avx512": 64, "avx2": 32}.get(isa.removesuffix("-jit"))
    assert (ops.kernel_counts().get(("sparse_ffn_blocked", isa.removesuffix("-jit")), 0) > 0) == (full is not None)


def test_sparse_ffn_rows_agree_on_infinities_whichever_path(isa):
    # full blocks take the panel loop's GELU, the rest of the rows (and short inputs) used to take
    # at::gelu: +inf came out +inf from the first and NaN from the second (at::gelu's float kernels),
    # so one call's rows disagreed. Now the rest take the same polynomial where the ISA has panels,
    # ffn_gelu (at::gelu keeping +inf) on the portable copy. -inf is NaN on both (-inf * 0).
    k = 8
    eye = ops.pack_sparse(torch.eye(k))
    x = torch.zeros(64 + 3, k)
    x[:, 0], x[:, 1] = float("inf"), float("-inf")
    got = ops.sparse_ffn(x, eye, None, eye, None, k, "gelu")
    short = ops.sparse_ffn(x[:3], eye, None, eye, None, k, "gelu")
    for out in (got, short):
        assert bool((out[:, 0] == float("inf")).all()), out[:, 0]
        assert bool(out[:, 1].isnan().all()), out[:, 1]
        assert bool((out[:, 2:] == 0).all())


def test_sparse_ffn_float64_batched_non_contiguous_and_errors():
    up, b1, down, b2, _ = _ffn_case(0, 19, 23, 7, torch.float64)
    x = torch.randn(19, 2, 70, dtype=torch.float64).permute(1, 2, 0)  # (2, 70, 19), not contiguous
    got = ops.sparse_ffn(x, up, b1, down, b2, 19, "gelu")
    want = reference.sparse_ffn(x, up, b1, down, b2, 19, "gelu")
    assert got.shape == (2, 70, 7)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    xf = x.float().contiguous()
    upf, downf = (up[0], up[1], up[2].float()), (down[0], down[1], down[2].float())
    torch.testing.assert_close(
        ops.sparse_ffn(x.float(), upf, b1.float(), downf, b2.float(), 19, "gelu"),
        ops.sparse_ffn(xf, upf, b1.float(), downf, b2.float(), 19, "gelu"),
    )
    with pytest.raises(ValueError, match="activation"):
        ops.sparse_ffn(x, up, b1, down, b2, 19, "tanh")
    with pytest.raises(ValueError, match="last dimension"):
        ops.sparse_ffn(x[..., :5], up, b1, down, b2, 19, "gelu")
    other = ops.pack_sparse(_sparse_weight(7, 40, 0.5, torch.float64))  # made for 40 hidden units, not 23
    with pytest.raises(ValueError, match="different shape"):
        ops.sparse_ffn(x, up, b1, other, b2, 19, "gelu")
    with pytest.raises(RuntimeError, match="activation"):
        torch.ops.fastprune.sparse_ffn(x, *up, b1, *down, b2, 19, "tanh")
    with pytest.raises(RuntimeError, match="bias"):
        torch.ops.fastprune.sparse_ffn(x, *up, b1[:3], *down, b2, 19, "gelu")


def test_sparse_ffn_opcheck_gradients_and_compile():
    for dtype, n in [(torch.float32, 3), (torch.float32, 70), (torch.float64, 2)]:
        up, b1, down, b2, x = _ffn_case(n, 19, 23, 7, dtype)
        x.requires_grad_()
        for act in ("gelu", "relu", "none"):
            torch.library.opcheck(torch.ops.fastprune.sparse_ffn, (x, *up, b1, *down, b2, 19, act))
    up, b1, down, b2, x = _ffn_case(4, 9, 11, 5, torch.float64)
    x.requires_grad_(), b1.requires_grad_(), b2.requires_grad_()
    for act in ("gelu", "relu", "none"):
        assert torch.autograd.gradcheck(lambda x, b1, b2, a=act: ops.sparse_ffn(x, up, b1, down, b2, 9, a), (x, b1, b2))
    with pytest.raises(RuntimeError, match="not supported"):
        vals = up[2].clone().requires_grad_()
        ops.sparse_ffn(x, (up[0], up[1], vals), b1, down, b2, 9, "gelu").sum().backward()
    up, b1, down, b2, x = _ffn_case(70, 19, 23, 7)
    compiled = torch.compile(lambda x: ops.sparse_ffn(x, up, b1, down, b2, 19, "gelu") * 2, fullgraph=True)
    torch.testing.assert_close(compiled(x), ops.sparse_ffn(x, up, b1, down, b2, 19, "gelu") * 2)
