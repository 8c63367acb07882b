"""sparsify's fusion: max pooling (fastprune.ops.max_pool2d), ReLU and residual adds folded into the sparse kernels."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from tests.structure import zoo
from torch import nn

import fastprune
from fastprune.nn import SparseConv2d, sparsify
from fastprune.nn.fuse import FastMaxPool2d, fuse_activations


@pytest.mark.parametrize("k,s,p", [(3, 2, 1), (2, 2, 0), (3, 1, 1), ((3, 2), (2, 1), (1, 0)), (5, 3, 2), (1, 1, 0)])
@pytest.mark.parametrize("shape", [(2, 3, 11, 9), (4, 7, 8), (1, 1, 5, 5)])
def test_separable_max_pool_equals_torch(k, s, p, shape):
    x = torch.randn(*shape)
    x[..., 0, 0] = float("nan")  # NaN propagates as in torch
    pool = nn.MaxPool2d(k, s, p)
    assert FastMaxPool2d.supports(pool)
    got = FastMaxPool2d.from_pool(pool)(x)
    torch.testing.assert_close(got, pool(x), equal_nan=True, rtol=0, atol=0)
    assert got.is_contiguous()
    if x.dim() == 4:  # channels-last in, channels-last out, as torch's
        xc = x.contiguous(memory_format=torch.channels_last)
        got_cl = FastMaxPool2d.from_pool(pool)(xc)
        torch.testing.assert_close(got_cl, pool(xc), equal_nan=True, rtol=0, atol=0)
        assert got_cl.is_contiguous(memory_format=torch.channels_last) == pool(xc).is_contiguous(
            memory_format=torch.channels_last
        )
    # with autograd it is torch's own (its gradient goes to one index per window)
    xg = x.clone().requires_grad_()
    torch.testing.assert_close(FastMaxPool2d.from_pool(pool)(xg), pool(x), equal_nan=True)


def test_separable_max_pool_refuses_what_it_does_not_compute():
    for pool in [
        nn.MaxPool2d(3, 2, 1, dilation=2),
        nn.MaxPool2d(3, 2, 1, ceil_mode=True),
        nn.MaxPool2d(3, 2, 1, return_indices=True),
    ]:
        assert not FastMaxPool2d.supports(pool)
        with pytest.raises(ValueError, match="keep nn.MaxPool2d"):
            FastMaxPool2d.from_pool(pool)
    with pytest.raises(RuntimeError):  # too small an input: torch's own error
        FastMaxPool2d(3, 1, 0)(torch.randn(1, 1, 2, 2))


def _pruned(name: str, sparsity: float = 0.85):
    model, x = zoo.build(name)
    fastprune.prune(model, "magnitude", sparsity=sparsity, scope="layer")
    fastprune.finalize(model)
    return model.eval(), x


@pytest.mark.parametrize("name", ["resnet", "mobilenetv2", "densenet", "unet", "squeeze_excite"])
def test_fused_sparse_model_equals_dense(name):
    model, x = _pruned(name)
    with torch.no_grad():
        ref = model(x)
    fused = sparsify(model, min_sparsity=0.5, example_inputs=x)
    plain = sparsify(model, min_sparsity=0.5, fuse=False)
    with torch.no_grad():
        got, got_plain = fused(x), plain(x)
        got_batch = fused(torch.cat([x, x]))  # shapes were checked at one batch size, hold at another
    scale = ref.abs().max()
    assert (got - ref).abs().max() <= 1e-4 * scale
    assert (got_plain - ref).abs().max() <= 1e-4 * scale
    assert (got_batch[: len(x)] - ref).abs().max() <= 1e-4 * scale


def test_resnet_relus_and_residual_adds_are_fused_and_input_model_kept():
    model, x = _pruned("resnet", 0.9)
    keep = copy.deepcopy(model)
    sp = sparsify(model, min_sparsity=0.5, example_inputs=x, inplace=True)
    assert isinstance(sp, torch.fx.GraphModule)
    residual = [n for n in sp.graph.nodes if "residual" in n.kwargs]
    relu = [m for m in sp.modules() if isinstance(m, SparseConv2d) and m.relu]
    assert residual and relu
    assert not any(
        n.op == "call_module"
        and isinstance(sp.get_submodule(n.target), nn.ReLU)
        and n.args[0].op == "call_module"
        and isinstance(sp.get_submodule(n.args[0].target), SparseConv2d)
        for n in sp.graph.nodes
    )
    with torch.no_grad():
        # inplace=True: the given model got the sparse layers but no fused flag; it still computes the same
        assert not any(isinstance(m, SparseConv2d) and m.relu for m in model.modules())
        torch.testing.assert_close(model(x), keep(x), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(sp(x), keep(x), rtol=1e-4, atol=1e-4)
    # the same parameter and buffer names as the unfused model
    assert set(sp.state_dict()) == set(sparsify(keep, min_sparsity=0.5, fuse=False).state_dict())
    # without example inputs no shapes: ReLUs fused, residual adds left to torch
    sp2 = sparsify(keep, min_sparsity=0.5)
    assert not [n for n in sp2.graph.nodes if "residual" in n.kwargs]


class _Broadcast(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.shift = nn.Parameter(torch.randn(1, 4, 1, 1))
        self.conv2 = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        y = self.conv(x) + self.shift  # broadcast: not a residual the kernel could take
        z = self.conv2(y)
        return F.relu(z) + torch.relu(z).sum()  # conv2's output read twice: no ReLU fusion


class _Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: FX cannot trace it
            return torch.relu(self.conv(x))
        return self.conv(x)


def test_what_is_not_fused():
    x = torch.randn(2, 3, 6, 6)
    for cls in (_Broadcast, _Untraceable):
        model = cls().eval()
        fastprune.prune(model, "magnitude", sparsity=0.7, scope="layer")
        fastprune.finalize(model)
        sp = sparsify(model, min_sparsity=0.5, fuse=False)
        out, fused = fuse_activations(sp, (x,))
        assert fused == [] and out is sp
        with torch.no_grad():
            torch.testing.assert_close(out(x), model(x), rtol=1e-5, atol=1e-5)


def test_fused_model_compiles_and_traces():
    model, x = _pruned("resnet")
    sp = sparsify(model, min_sparsity=0.5, example_inputs=x)
    with torch.no_grad():
        want = sp(x)
        torch.testing.assert_close(torch.compile(sp, backend="aot_eager", fullgraph=True)(x), want)
        torch.testing.assert_close(torch.jit.trace(sp, x, check_trace=False)(x), want)


class _Stem(nn.Module):
    """A ResNet-like stem: a dense conv whose output only feeds ReLU then max pool, read twice after."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 5, 2, 2, bias=False), nn.BatchNorm2d(8)
        self.relu, self.pool = nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1)
        self.a, self.b = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 1)

    def forward(self, x):
        y = self.pool(self.relu(self.bn1(self.conv1(x))))
        return self.a(y) + self.b(y)


def test_stem_runs_channels_last_with_the_same_values():
    model = _Stem()
    zoo.randomise(model)
    model.eval()
    fastprune.prune(model, "magnitude", sparsity=0.8, scope="layer", exclude="conv1")
    fastprune.finalize(model)
    x = torch.randn(2, 3, 19, 23)
    sp = sparsify(model, min_sparsity=0.5, example_inputs=x)
    assert sp.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert not model.conv1.weight.is_contiguous(memory_format=torch.channels_last)  # a copy was changed
    # the ReLU and the pool are one fastprune.ops.max_pool2d call on the conv's (channels-last) output
    assert not [n for n in sp.graph.nodes if n.target in ("pool", "relu")]
    (pool,) = [n for n in sp.graph.nodes if n.target is fastprune.ops.max_pool2d]
    assert pool.args[0].target == "conv1" and pool.args[1:] == ((3, 3), (2, 2), (1, 1), True)
    ops_seen = fastprune.ops.kernel_counts().get(("max_pool2d_channels_last", fastprune.ops.best_isa()), 0)
    with torch.no_grad():
        want = model(x)
        got = sp(x)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
        # the layers after the pool get NCHW input
        seen = []
        h = sp.a.register_forward_pre_hook(lambda m, a: seen.append(a[0].is_contiguous()))
        sp(x)
        h.remove()
        assert seen == [True]
    assert fastprune.ops.kernel_counts().get(("max_pool2d_channels_last", fastprune.ops.best_isa()), 0) > ops_seen


class _ConvPool(nn.Module):
    def __init__(self, read_twice: bool) -> None:
        super().__init__()
        self.conv, self.pool, self.read_twice = nn.Conv2d(3, 4, 3), nn.MaxPool2d(2), read_twice

    def forward(self, x):
        y = self.conv(x)
        out = self.pool(torch.relu(y))
        return out + y.mean() if self.read_twice else out


def test_channels_last_only_where_the_pool_alone_reads_the_conv():
    from fastprune.nn.fuse import channels_last_pools

    x = torch.randn(2, 3, 9, 9)
    for read_twice, want in [(False, ["conv"]), (True, [])]:
        model = _ConvPool(read_twice).eval()
        gm = torch.fx.symbolic_trace(copy.deepcopy(model))
        assert channels_last_pools(gm) == want
        assert gm.conv.weight.is_contiguous(memory_format=torch.channels_last) == bool(want)
        with torch.no_grad():
            got = gm(x)
            torch.testing.assert_close(got, model(x), rtol=1e-5, atol=1e-5)
            assert got.is_contiguous()
        assert channels_last_pools(gm) == []  # done once


class _Intermediate(nn.Module):
    def __init__(self, d: int, h: int) -> None:
        super().__init__()
        self.dense, self.intermediate_act_fn = nn.Linear(d, h), nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.intermediate_act_fn(self.dense(x))


class _Output(nn.Module):
    def __init__(self, h: int, d: int) -> None:
        super().__init__()
        self.dense = nn.Linear(h, d)


class _Block(nn.Module):
    """A feed-forward block in the HuggingFace form; ``peek`` also reads the intermediate output."""

    def __init__(self, peek: bool) -> None:
        super().__init__()
        self.intermediate, self.output, self.peek = _Intermediate(16, 40), _Output(40, 16), peek

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.intermediate(x)
        y = self.output.dense(h) + x
        return y + h.mean(-1, keepdim=True) if self.peek else y


@pytest.mark.parametrize("peek", [False, True])
def test_feed_forward_blocks_fuse_only_where_the_outputs_stay_the_same(peek):
    from fastprune.nn import SparseFFNOutput

    torch.manual_seed(0)
    model = nn.Sequential(_Block(peek), nn.ReLU(), _Block(peek)).eval()
    fastprune.prune(model, "magnitude", sparsity=0.8, scope="layer")
    x = torch.randn(5, 70, 16)
    sp = fastprune.sparsify(model, min_sparsity=0.5, example_inputs=x)
    with torch.no_grad():
        torch.testing.assert_close(sp(x), model(x), rtol=1e-5, atol=1e-5)
    if peek:  # the fused block would no longer see the intermediate output: nothing is fused
        assert sp.fused_ffn == []
        assert not any(isinstance(m, SparseFFNOutput) for m in sp.modules())
    else:
        assert sp.fused_ffn == ["0", "2"]
    assert fastprune.sparsify(model, min_sparsity=0.5).fused_ffn == []  # no example inputs: no fusion


class _Bottlenecks(nn.Module):
    """Three ResNet-like bottlenecks: one that fuses, one whose middle activation is also read elsewhere,
    one with a strided middle conv and a downsampling shortcut (neither of the last two fuses)."""

    def __init__(self, c: int = 16, m: int = 8) -> None:
        super().__init__()

        def block(stride: int = 1) -> nn.ModuleDict:
            return nn.ModuleDict(
                {
                    "conv1": nn.Conv2d(c, m, 1, bias=False),
                    "bn1": nn.BatchNorm2d(m),
                    "conv2": nn.Conv2d(m, m, 3, stride, 1, bias=False),
                    "bn2": nn.BatchNorm2d(m),
                    "conv3": nn.Conv2d(m, c, 1, bias=False),
                    "bn3": nn.BatchNorm2d(c),
                }
            )

        self.a, self.b, self.c = block(), block(), block(2)
        self.down = nn.Conv2d(c, c, 1, 2)
        for mod in self.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.5, 0.5)
                mod.running_var.uniform_(0.5, 2.0)

    def _run(self, blk: nn.ModuleDict, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = F.relu(blk["bn1"](blk["conv1"](x)))
        return F.relu(blk["bn2"](blk["conv2"](h))), h

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, _ = self._run(self.a, x)
        x = F.relu(self.a["bn3"](self.a["conv3"](h)) + x)
        h, h1 = self._run(self.b, x)
        x = F.relu(self.b["bn3"](self.b["conv3"](h)) + x) + h1.mean()  # h1 read again
        h, _ = self._run(self.c, x)
        return F.relu(self.c["bn3"](self.c["conv3"](h)) + self.down(x))


def test_bottlenecks_run_as_one_call_with_the_same_values():
    torch.manual_seed(0)
    model = _Bottlenecks().eval()
    fastprune.prune(model, "magnitude", sparsity=0.7, scope="layer")
    fastprune.finalize(model)
    x = torch.randn(2, 16, 16, 16)
    plain = sparsify(model, min_sparsity=0.5, example_inputs=x, depth_first=False)
    sp = sparsify(model, min_sparsity=0.5, example_inputs=x)
    assert sp.fused_bottlenecks == {"a": "fused: untimed (min_sparsity given)"}
    assert plain.fused_bottlenecks == {}
    assert [type(m).__name__ for m in sp.modules()].count("SparseBottleneck") == 1
    assert set(sp.state_dict()) == set(plain.state_dict())  # the fused block holds no tensors of its own
    with torch.no_grad():
        for shape in [(2, 16, 16, 16), (1, 16, 9, 7), (3, 16, 8, 4), (1, 16, 16, 16)]:  # bands, three calls
            xi = torch.randn(shape)
            if shape[0] == 1:  # one sample: the same code in both, bit for bit
                assert torch.equal(sp(xi), plain(xi))
            else:  # the unfused 1x1 convs on several samples run the loops (another summation order)
                torch.testing.assert_close(sp(xi), plain(xi), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(sp(xi), model(xi), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="not a bottleneck"):
        fastprune.nn.SparseBottleneck(*(sp.get_submodule(f"c.conv{i}") for i in (1, 2, 3)))  # strided
