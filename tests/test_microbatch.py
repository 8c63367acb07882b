"""MicroBatch / sparsify(micro_batch=): batches run a few samples at a time through the whole model,
only for models proven per-sample."""

from __future__ import annotations

import copy

import pytest
import torch
from tests.structure import zoo
from torch import nn

import fastprune
from fastprune.nn import MicroBatch, SparseConv2d, sparsify
from fastprune.nn.microbatch import per_sample_ops


def _pruned(name: str):
    model, x = zoo.build(name)
    fastprune.prune(model, "magnitude", sparsity=0.8, scope="layer")
    fastprune.finalize(model)
    return model.eval(), x


@pytest.mark.parametrize("size", [1, 2, 3])
def test_micro_batched_sparse_resnet_equals_the_model(size):
    model, x = _pruned("resnet")
    x = torch.cat([x, -x, 2 * x])  # 6 samples: chunks of 1, 2, 3
    sp = sparsify(model, min_sparsity=0.5, example_inputs=x[:1], micro_batch=size)
    assert isinstance(sp, MicroBatch) and sp.size == size and not sp.training
    assert any(isinstance(m, SparseConv2d) for m in sp.module.modules())
    calls = []
    h = sp.module.register_forward_pre_hook(lambda m, a: calls.append(a[0].shape[0]))
    with torch.no_grad():
        got = sp(x)
        want = model(x)
    h.remove()
    assert calls == [size] * (len(x) // size)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
    with torch.no_grad():  # a batch no larger than a chunk: one call
        torch.testing.assert_close(sp(x[:1]), want[:1], rtol=1e-4, atol=1e-4 * float(want.abs().max()))


class _BatchMean(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        y = self.conv(x)
        return y - y.mean(0)  # mixes the samples


class _View(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(12, 4)

    def forward(self, x):
        return self.fc(x.view(-1, 12))  # may merge the batch dimension


class _CatBatch(nn.Module):
    def forward(self, x):
        return torch.cat([x, x], 0)


class _Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        if x.sum() > 0:  # FX cannot trace it
            return self.conv(x)
        return -self.conv(x)


@pytest.mark.parametrize(
    "cls,match", [(_BatchMean, "mean"), (_View, "view"), (_CatBatch, "cat"), (_Branchy, "torch.fx can trace")]
)
def test_models_not_proven_per_sample_are_refused_untouched(cls, match):
    model = cls().eval()
    keep = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=match):
        sparsify(model, min_sparsity=0.0, micro_batch=1, inplace=True)
    assert all(torch.equal(v, keep[k]) for k, v in model.state_dict().items())
    assert not any(isinstance(m, SparseConv2d) for m in model.modules())


def test_train_mode_layers_count_as_eval_for_the_proof_and_bad_sizes_are_refused():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Dropout(0.5), nn.Flatten(), nn.Softmax(1))
    gm = torch.fx.symbolic_trace(model)
    assert per_sample_ops(gm.eval()) == []
    assert len(per_sample_ops(gm.train())) == 2  # batch statistics and dropout in training
    sp = sparsify(model.train(), min_sparsity=0.0, micro_batch=2)  # sparsify runs it in eval mode
    x = torch.randn(5, 3, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(sp(x), model.eval()(x), rtol=1e-5, atol=1e-6)
    flat0 = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(0))
    assert per_sample_ops(torch.fx.symbolic_trace(flat0))
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="positive int"):
            sparsify(model, min_sparsity=0.0, micro_batch=bad)
