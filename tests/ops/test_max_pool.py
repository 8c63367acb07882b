"""max_pool2d (max pooling, then an optional ReLU, NCHW out) against its plain-PyTorch reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastprune import ops, reference

GEOMETRIES = [(3, 2, 1), (2, 2, 0), (3, 1, 1), ((3, 2), (1, 2), (1, 0)), (5, 3, 2), (1, 1, 0)]


def _inputs(shape, dtype, layout):
    x = torch.randn(*shape, dtype=dtype)
    if x.numel():
        x.view(-1)[:: max(1, x.numel() // 3)] = float("nan")  # NaN propagates as in torch
        x.view(-1)[1::7] = float("-inf")
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if layout == "strided":  # every other channel and column of a wider tensor: neither format
        wide = torch.randn(shape[0], 2 * shape[1], shape[2], 2 * shape[3], dtype=dtype)
        wide[:, ::2, :, ::2] = x
        return wide[:, ::2, :, ::2]
    return x


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "strided"])
@pytest.mark.parametrize(
    "shape", [(2, 67, 11, 9), (1, 3, 7, 8), (3, 128, 6, 6), (1, 1, 5, 5), (0, 4, 5, 5), (2, 0, 5, 5)]
)
def test_max_pool2d_matches_reference(isa, dtype, layout, shape):
    x = _inputs(shape, dtype, layout)
    for k, s, p in GEOMETRIES:
        for relu in (False, True):
            got = ops.max_pool2d(x, k, s, p, relu)
            if shape[1] == 0:  # torch refuses no channels; the op gives the empty result
                want = reference.max_pool2d(torch.zeros(shape[0], 1, *shape[2:], dtype=dtype), k, s, p, relu)[:, :0]
            else:
                want = reference.max_pool2d(x, k, s, p, relu)
            torch.testing.assert_close(got, want, equal_nan=True, rtol=0, atol=0)  # a max is exact
            assert got.is_contiguous()
    counts = ops.kernel_counts()
    path = "float64" if dtype == torch.float64 else isa.removesuffix("-jit")
    assert counts.get(("max_pool2d", path), 0) == 2 * len(GEOMETRIES)
    # channels-last input takes the channels-last loop (unless it is also NCHW-contiguous: one channel)
    cl = layout == "channels_last" and shape[1] > 1 and shape[0] * shape[1] > 0
    assert counts.get(("max_pool2d_channels_last", path), 0) == (2 * len(GEOMETRIES) if cl else 0)


@pytest.mark.parametrize("threads", [1, 2])
def test_max_pool2d_threads_and_a_resnet_stem(threads):
    torch.set_num_threads(threads)
    x = torch.randn(3, 64, 28, 30).contiguous(memory_format=torch.channels_last)
    want = torch.relu(F.max_pool2d(x, 3, 2, 1)).contiguous()
    torch.testing.assert_close(ops.max_pool2d(x, 3, 2, 1, True), want, rtol=0, atol=0)
    torch.testing.assert_close(ops.max_pool2d(x.contiguous(), 3, 2, 1, True), want, rtol=0, atol=0)


def test_max_pool2d_errors():
    x = torch.randn(1, 2, 5, 5)
    with pytest.raises(ValueError, match="between 0 and half"):
        ops.max_pool2d(x, 3, 1, 2)
    with pytest.raises(ValueError, match="positive"):
        ops.max_pool2d(x, 0, 1)
    with pytest.raises(ValueError, match="smaller than"):
        ops.max_pool2d(x, 7, 1)
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        ops.max_pool2d(x[0], 3, 1)
    with pytest.raises(TypeError, match="float32 or float64"):
        ops.max_pool2d(x.half(), 3, 1)
    with pytest.raises(ValueError, match="two ints"):
        ops.max_pool2d(x, (3, 3, 3), 1)
    with pytest.raises(RuntimeError, match="half the kernel"):  # the op checks what the wrapper checks
        torch.ops.fastprune.max_pool2d(x, [3, 3], [1, 1], [2, 2])


def test_max_pool2d_opcheck_gradients_and_compile():
    x = torch.randn(2, 5, 9, 7, dtype=torch.float64)
    for k, s, p in GEOMETRIES:
        kk, ss, pp = ([v, v] if isinstance(v, int) else list(v) for v in (k, s, p))
        for xi in (x, x.contiguous(memory_format=torch.channels_last)):
            torch.library.opcheck(torch.ops.fastprune.max_pool2d, (xi, kk, ss, pp, True))
    xg = x.clone().requires_grad_()
    torch.autograd.gradcheck(lambda t: ops.max_pool2d(t, 3, 2, 1, True), (xg,))
    compiled = torch.compile(lambda t: ops.max_pool2d(t, 3, 2, 1, True) * 2, fullgraph=True)
    torch.testing.assert_close(compiled(x.float()), ops.max_pool2d(x.float(), 3, 2, 1, True) * 2)
