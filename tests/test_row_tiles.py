"""sparsify(tile_rows=): residual blocks run on tiles of rows, one sample at a time (RowTiles), with
the same values as the blocks run whole, for any input size, with dense and sparse convs, strides,
dilation, unfolded BatchNorm, in-place ReLUs and autograd."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

import fastprune
from fastprune.models import resnet18, resnet50
from fastprune.nn import RowTiles, sparsify
from fastprune.nn.microbatch import _blocks


def _random_bn(model: nn.Module) -> None:
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.rand(m.num_features, generator=g) * 0.2 - 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.rand(m.num_features, generator=g) * 0.4 - 0.2)


def _pruned(build, sparsity: float = 0.85, dtype=torch.float32) -> nn.Module:
    torch.manual_seed(0)
    model = build(10).to(dtype).eval()
    _random_bn(model)
    fastprune.prune(model, "magnitude", sparsity=sparsity, scope="layer", exclude="conv1")
    fastprune.finalize(model)
    return model


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    tol = (1e-10 if want.dtype == torch.float64 else 1e-5) * max(1.0, float(want.abs().amax())) if want.numel() else 0.0
    torch.testing.assert_close(got, want, rtol=0, atol=tol)


@pytest.mark.parametrize("rows", [1, 3, 8])
@pytest.mark.parametrize("build", [resnet18, resnet50])
def test_tiled_resnets_equal_the_untiled_model(build, rows):
    model = _pruned(build)
    x = torch.randn(2, 3, 75, 61)  # odd sizes: partial last tiles, odd heights under stride 2
    plain = sparsify(model, min_sparsity=0.5, example_inputs=x)
    tiled = sparsify(model, min_sparsity=0.5, example_inputs=x, tile_rows=rows)
    blocks = [m for m in tiled.modules() if isinstance(m, RowTiles)]
    # output heights at 75 rows in: 19, 10, 5, 3 (layers 1-4); blocks no taller than a tile stay whole
    want = {
        (resnet18, 1): 8,
        (resnet18, 3): 6,
        (resnet18, 8): 4,
        (resnet50, 1): 16,
        (resnet50, 3): 13,
        (resnet50, 8): 7,
    }
    assert len(blocks) == want[(build, rows)] == len(tiled.row_tiles)
    assert all(b.rows == rows for b in blocks)
    assert tiled.state_dict().keys() == plain.state_dict().keys()
    with torch.no_grad():
        _close(tiled(x), plain(x))
        y = torch.randn(3, 3, 40, 52)  # another input size: re-derived heights, same values
        _close(tiled(y), plain(y))
        _close(tiled(x[:0]), plain(x[:0]))  # no samples


def test_float64_dense_convs_unfolded_bn_and_inplace_relus():
    model = _pruned(resnet18, dtype=torch.float64)
    x = torch.randn(2, 3, 45, 37, dtype=torch.float64)
    # min_sparsity above the layers' sparsity: every conv stays dense; BN not folded: nn.BatchNorm2d
    # and in-place nn.ReLU modules are in the blocks
    plain = sparsify(model, min_sparsity=0.99, example_inputs=x, fold_bn=False)
    tiled = sparsify(model, min_sparsity=0.99, example_inputs=x, fold_bn=False, tile_rows=4)
    assert len(tiled.row_tiles) == 4  # layers 1 and 2 (12 and 6 rows high); 3 and 2 rows: whole
    with torch.no_grad():
        _close(tiled(x), plain(x))
        _close(tiled(x), model(x))


class _Dilated(nn.Module):
    """A block with a dilated 3x3, a 5x5 with padding 2, a function add and a method ReLU."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.a = nn.Conv2d(8, 8, 3, padding=2, dilation=2)
        self.b = nn.Conv2d(8, 8, 5, padding=2, stride=2)
        self.skip = nn.Conv2d(8, 8, 1, stride=2)
        self.head = nn.Conv2d(8, 4, 3)

    def forward(self, x):
        x = self.stem(x).relu()
        y = torch.add(self.b(torch.sigmoid(self.a(x))), self.skip(x)).relu()
        return self.head(y)


@pytest.mark.parametrize("rows", [1, 2, 5])
def test_dilation_strides_and_functions(rows):
    torch.manual_seed(1)
    model = _Dilated().eval()
    fastprune.prune(model, "magnitude", sparsity=0.6, scope="layer")
    fastprune.finalize(model)
    x = torch.randn(2, 3, 23, 19)
    plain = sparsify(model, min_sparsity=0.5, example_inputs=x)
    tiled = sparsify(model, min_sparsity=0.5, example_inputs=x, tile_rows=rows)
    # the block from the stem's ReLU to the sum's ReLU (a, b, skip), and the head after it is a
    # single conv: left whole
    assert len(tiled.row_tiles) == 1 and "a" in tiled.row_tiles[0] and "skip" in tiled.row_tiles[0]
    with torch.no_grad():
        _close(tiled(x), plain(x))
        _close(tiled(x), model(x))


def test_gradients_flow_through_the_tiles():
    model = _pruned(resnet18)
    x = torch.randn(1, 3, 33, 29)
    plain = sparsify(model, min_sparsity=0.5, example_inputs=x)
    tiled = sparsify(model, min_sparsity=0.5, example_inputs=x, tile_rows=4)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    plain(xa).square().sum().backward()
    tiled(xb).square().sum().backward()
    _close(xb.grad, xa.grad)


def test_copies_and_checkpoints():
    model = _pruned(resnet18)
    x = torch.randn(1, 3, 32, 32)
    tiled = sparsify(model, min_sparsity=0.5, example_inputs=x, tile_rows=4)
    twin = copy.deepcopy(tiled)
    with torch.no_grad():
        want = tiled(x)
        _close(twin(x), want)
        for p in tiled.parameters():  # the copy has its own weights: changing the original's
            p.mul_(0)  # leaves it alone
        for b in tiled.buffers():
            if b.is_floating_point():
                b.mul_(0)
        _close(twin(x), want)
    buf = io.BytesIO()
    torch.save(twin.state_dict(), buf)
    buf.seek(0)
    tiled.load_state_dict(torch.load(buf))
    with torch.no_grad():
        _close(tiled(x), want)


def test_bad_arguments_are_refused_before_anything_changes():
    model = _pruned(resnet18)
    x = torch.randn(1, 3, 32, 32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for bad in (0, -2, 2.5, True, "4"):
        with pytest.raises(ValueError, match="tile_rows must be a positive int"):
            sparsify(model, min_sparsity=0.5, example_inputs=x, tile_rows=bad, inplace=True)
    with pytest.raises(ValueError, match="tile_rows needs example_inputs"):
        sparsify(model, min_sparsity=0.5, tile_rows=4, inplace=True)

    class Untraceable(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)

        def forward(self, x):
            return self.conv(x) if x.sum() > 0 else x  # data-dependent control flow

    with pytest.raises(ValueError, match="torch.fx can trace"):
        sparsify(Untraceable(), min_sparsity=0.0, example_inputs=x, tile_rows=4, inplace=True)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not any(isinstance(m, RowTiles) for m in model.modules())
    tiled = sparsify(model, min_sparsity=0.5, example_inputs=x, tile_rows=4)
    block = next(m for m in tiled.modules() if isinstance(m, RowTiles))
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        block(torch.randn(3, 32, 32))


def test_blocks_are_the_stretches_between_cuts():
    model = _pruned(resnet50)
    x = torch.randn(1, 3, 64, 64)
    sp = sparsify(model, min_sparsity=0.5, example_inputs=x, depth_first=False)
    blocks = _blocks(sp.graph)
    # every stretch starts where the one before ended, and the bottlenecks' 3 convs (+ a
    # downsample) are one stretch each
    assert all(a[-1] is b[0] for a, b in zip(blocks, blocks[1:], strict=False))
    convs = [sum(n.op == "call_module" and "conv" in str(n.target) for n in b[1:]) for b in blocks]
    assert convs.count(3) == 16
