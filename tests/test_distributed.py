"""The data-driven criteria on torch.distributed (issue 20, item 3): 2 processes on this machine,
gloo on 127.0.0.1, each rank scoring its half of the batches, give what one process gives on all of
them; a rank that fails makes every rank fail, with no hang."""

from __future__ import annotations

import datetime
import json
import os
import pathlib
import socket
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import fastprune
from fastprune.importance import nisp_scores, singe_scores, taylor_scores

WORLD = 2
TIMEOUT_S = 600  # a slow shared machine: the ranks wait on each other in collectives


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 7), nn.ReLU(), nn.Linear(7, 3)).eval()


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    # 15 samples per rank when split [rank::2]: each rank's share of the N = 30 Fisher gradients
    sizes = [4, 4, 5, 5, 6, 6]
    return [(torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)) for n in sizes]


def _scores(data) -> dict[str, dict[str, list[float]]]:
    model = _model()
    out = {
        "singe": singe_scores(model, data, steps=3),
        "taylor": taylor_scores(model, data),
        "nisp": nisp_scores(model, data, example_inputs=torch.randn(1, 6)),
    }
    return {k: {n: v.tolist() for n, v in s.items()} for k, s in out.items()}


WOODFISHER = [
    {"blocks": "layer", "joint": False, "recompute_steps": 1},
    {"blocks": "global", "joint": True, "recompute_steps": 1},
    {"blocks": "layer", "joint": False, "recompute_steps": 2},
]


def _woodfisher(data, num_grads: int) -> list[dict]:
    """Masks and weights after WoodFisher at 50 % (float64 model), for each variant."""
    out = []
    for kw in WOODFISHER:
        model = _model().double()
        fastprune.prune(
            model, "woodfisher", sparsity=0.5, data=[(x.double(), y) for x, y in data], num_grads=num_grads,
            block_size=8, damp=1e-3, progress=False, **kw,
        )  # fmt: skip
        fastprune.finalize(model)
        out.append({k: v.tolist() for k, v in model.state_dict().items()})
    return out


def _selection_inputs() -> tuple[list[str], list[torch.Tensor], list[int]]:
    """Scores with many ties (small integers, some negative, zeros of both signs) and where each
    layer is cut between the two ranks (uneven, one layer wholly on rank 0)."""
    g = torch.Generator().manual_seed(3)
    scores = [torch.randint(-3, 4, (n,), generator=g).double() for n in (37, 64, 5)]
    scores[0][::7] = -0.0
    return ["a", "b", "c"], scores, [11, 40, 5]


SELECTION = [(0.5, "global", 1), (0.3, "global", 4), (0.6, "layer", 1), (0.0, "global", 1), (0.6, "layer", 2)]


def _selection(rank: int) -> list[list[list[bool]]]:
    from fastprune.select import sharded_topk_keep

    names, scores, cuts = _selection_inputs()
    pieces = [(0, s[:c]) if rank == 0 else (c, s[c:]) for s, c in zip(scores, cuts, strict=True)]
    out = []
    for sp, scope, m in SELECTION:
        keep = sharded_topk_keep(names, [s.numel() for s in scores], pieces, sp, scope, m)
        out.append([k.tolist() for k in keep])
    return out


def _uneven(rank: int) -> dict:
    """WoodFisher with rank 0 holding 5 of the 6 batches (one process: all 6), and the Fisher's size."""
    data = _batches()
    shard = data[:5] if rank == 0 else data[5:]
    n = sum(len(y) for _, y in data)
    model = _model().double()
    stats = fastprune.fisher_statistics(
        model, [(x.double(), y) for x, y in shard], num_grads=n, block_size=8, damp=1e-3, progress=False
    )
    fastprune.prune(model, "woodfisher", sparsity=0.5, fisher_inverse=stats, block_size=8, damp=1e-3, progress=False)
    fastprune.finalize(model)
    held = sum(fi.held_bytes for fi in stats.inverses)
    return {"num_grads": stats.num_grads, "held": held, "state": {k: v.tolist() for k, v in model.state_dict().items()}}


def _failing_woodfisher(rank: int) -> dict:
    """Rank 1's second batch is NaN (in the second round of 3 gradients): every rank raises, and
    no rank's model changed."""
    data = [(x.double(), y) for x, y in _batches()[rank::WORLD]]
    if rank == 1:
        data[1] = (torch.full_like(data[1][0], float("nan")), data[1][1])
    model = _model().double()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        fastprune.prune(
            model,
            "woodfisher",
            sparsity=0.5,
            data=data,
            num_grads=30,
            block_size=8,
            damp=1e-3,
            progress=False,
            max_memory=3 * 2 * 151 * 8,
        )  # fmt: skip  (3 rows a round)
        error = None
    except Exception as e:  # noqa: BLE001 - what the test checks
        error = f"{type(e).__name__}: {e}"
    after = model.state_dict()
    unchanged = set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)
    return {"error": error, "unchanged": unchanged}


def _different_models(rank: int) -> str | None:
    """Rank 1's model has one other weight: both ranks refuse before taking a gradient."""
    model = _model().double()
    if rank == 1:
        with torch.no_grad():
            model[0].weight[0, 0] += 1e-9
    try:
        fastprune.prune(model, "woodfisher", sparsity=0.5, data=[(x.double(), y) for x, y in _batches()[rank::WORLD]],
                        num_grads=30, block_size=8, damp=1e-3, progress=False)  # fmt: skip
    except ValueError as e:
        return str(e)
    return None


def _worker(rank: int, port: int, out_dir: str, fail_rank: int) -> None:
    # rendezvous through a file in the test's directory (no port to race for); gloo on loopback only
    os.environ.update(GLOO_SOCKET_IFNAME="lo", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=pathlib.Path(out_dir, "rendezvous").as_uri(),
        rank=rank,
        world_size=WORLD,
        timeout=datetime.timedelta(seconds=TIMEOUT_S),
    )
    result: dict = {}
    try:
        shard = _batches()[rank::WORLD]
        if rank == fail_rank:
            shard = []  # this rank's loader is empty: a user error, on one rank only
        result = {"scores": _scores(shard)}
        if fail_rank < 0:
            n = sum(len(y) for _, y in _batches())
            result["woodfisher"] = _woodfisher(shard, n)
            result["selection"] = _selection(rank)
            result["uneven"] = _uneven(rank)
            result["failing"] = _failing_woodfisher(rank)
            result["different"] = _different_models(rank)
    except Exception as e:  # noqa: BLE001 - reported to the test through the file
        result = {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-2000:]}
    finally:
        pathlib.Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
        dist.barrier()  # neither rank tears the group down while the other still talks
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(tmp_path, fail_rank: int = -1) -> list[dict]:
    ctx = mp.start_processes(
        _worker, args=(_free_port(), str(tmp_path), fail_rank), nprocs=WORLD, join=False, start_method="spawn"
    )
    deadline = TIMEOUT_S
    while not ctx.join(timeout=5):
        deadline -= 5
        if deadline <= 0:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"the {WORLD} ranks did not finish within {TIMEOUT_S} s (a hang)")
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    """One 2-rank run of everything below (spawning the ranks costs seconds)."""
    return _run(tmp_path_factory.mktemp("ranks"))


def test_two_ranks_score_like_one_process_on_all_the_data(ranks):
    results = ranks
    assert all("scores" in r for r in results), results
    want = _scores(_batches())
    for r in results:
        for crit, per_layer in want.items():
            for layer, v in per_layer.items():
                got = torch.tensor(r["scores"][crit][layer], dtype=torch.float64)
                ref = torch.tensor(v, dtype=torch.float64)
                # float64 accumulation: only the order of the sums differs
                torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-12, msg=f"{crit} {layer}")
    # and every rank holds the same scores
    assert results[0]["scores"] == results[1]["scores"]


def test_a_rank_that_fails_makes_every_rank_fail(tmp_path):
    results = _run(tmp_path, fail_rank=1)
    assert "no batches" in results[1]["error"], results[1]
    assert "failed on rank(s) 1" in results[0]["error"] and "no batches" in results[0]["error"], results[0]


def test_one_process_without_a_group_is_unchanged():
    assert not fastprune.distributed.is_distributed() and fastprune.distributed.world_size() == 1
    x = torch.arange(6.0).view(2, 3)
    assert fastprune.distributed.all_gather_rows(x) is x
    t = [torch.ones(2)]
    fastprune.distributed.all_reduce_sum_(t)
    assert torch.equal(t[0], torch.ones(2))
    with pytest.raises(ValueError, match="boom"), fastprune.distributed.all_or_none():
        raise ValueError("boom")


def test_woodfisher_on_two_ranks_prunes_like_one_process(ranks):
    # every rank: its half of the gradients, the block Grams summed onto their owners, the owned
    # blocks inverted; the masks equal one process's, the weights to float64 rounding, and every rank
    # ends with bitwise the same weights
    results = ranks
    assert all("woodfisher" in r for r in results), results
    n = sum(len(y) for _, y in _batches())
    want = _woodfisher(_batches(), n)
    for variant, ref in zip(WOODFISHER, want, strict=True):
        i = WOODFISHER.index(variant)
        a, b = results[0]["woodfisher"][i], results[1]["woodfisher"][i]
        assert a == b, f"ranks disagree: {variant}"  # bitwise (JSON of the float64 values)
        for k, v in ref.items():
            got, exp = torch.tensor(a[k], dtype=torch.float64), torch.tensor(v, dtype=torch.float64)
            assert torch.equal(got == 0, exp == 0), f"masks differ: {variant} {k}"
            torch.testing.assert_close(got, exp, rtol=1e-6, atol=1e-9, msg=f"{variant} {k}")


def test_distributed_selection_equals_topk_masks_with_ties(ranks):
    # each rank holds a cut of every layer's scores; the radix k-th value search, the tie exchange
    # and the gathered min_remaining candidates give exactly one process's topk_masks
    from fastprune.select import topk_masks

    results = ranks
    names, scores, _ = _selection_inputs()
    for i, (sp, scope, m) in enumerate(SELECTION):
        want = topk_masks(names, scores, sp, scope, m)
        for layer, name in enumerate(names):
            got = results[0]["selection"][i][layer] + results[1]["selection"][i][layer]
            assert got == want[name].tolist(), (sp, scope, m, name)


def test_selection_without_a_group_equals_topk_masks():
    from fastprune.distributed import kth_smallest, order_keys
    from fastprune.select import sharded_topk_keep, topk_masks

    g = torch.Generator().manual_seed(5)
    for trial in range(20):
        sizes = [int(n) for n in torch.randint(1, 40, (3,), generator=g)]
        scores = [torch.randint(-4, 5, (n,), generator=g).double() * 0.5 for n in sizes]
        if trial % 3 == 0:
            scores = [torch.randn(n, generator=g, dtype=torch.float64) for n in sizes]
        names = ["x", "y", "z"]
        for sp, scope, m in [(0.4, "global", 1), (0.5, "layer", 1), (0.2, "global", 3), (0.9, "layer", 0)]:
            want = topk_masks(names, scores, sp, scope, m)
            got = sharded_topk_keep(names, sizes, [(0, s) for s in scores], sp, scope, m)
            assert [k.tolist() for k in got] == [want[n].reshape(-1).tolist() for n in names], (trial, sp, scope)
    x = torch.tensor([3.0, -0.0, 0.0, -2.5, float("inf"), -float("inf"), 1e-300, -1e-300, 7.0], dtype=torch.float64)
    srt = torch.sort(x).values
    for k in range(1, x.numel() + 1):
        ((key, below),) = kth_smallest([order_keys(x)], [k])
        assert key == int(order_keys(srt[k - 1 : k])[0])
        assert below == int((x < srt[k - 1]).sum())
    with pytest.raises(ValueError, match="exceeds"):
        kth_smallest([order_keys(x)], [x.numel() + 1])


def test_uneven_shards_take_all_n_gradients_and_hold_half_the_inverse(ranks):
    # rank 0 has 5 batches, rank 1 one: the rounds let rank 0 make up rank 1's share, so the Fisher
    # has all N gradients and the result is one process's on all the data; each rank holds only its
    # blocks of the inverse
    results = ranks
    n = sum(len(y) for _, y in _batches())
    model = _model().double()
    data = [(x.double(), y) for x, y in _batches()]
    stats = fastprune.fisher_statistics(model, data, num_grads=n, block_size=8, damp=1e-3, progress=False)
    fastprune.prune(model, "woodfisher", sparsity=0.5, fisher_inverse=stats, block_size=8, damp=1e-3, progress=False)
    fastprune.finalize(model)
    one_held = sum(fi.inverse().numel() * 8 for fi in stats.inverses)
    a, b = results[0]["uneven"], results[1]["uneven"]
    assert a["num_grads"] == b["num_grads"] == n
    assert a["state"] == b["state"]  # bitwise equal on both ranks
    for k, v in model.state_dict().items():
        got, exp = torch.tensor(a["state"][k], dtype=torch.float64), v.double()
        assert torch.equal(got == 0, exp == 0), k
        torch.testing.assert_close(got, exp, rtol=1e-6, atol=1e-9, msg=k)
    # (a rank's last block may be a partial one, held unpadded: the two together hold at most one's)
    assert a["held"] + b["held"] <= one_held and max(a["held"], b["held"]) <= 0.6 * one_held


def test_a_rank_whose_gradients_fail_makes_every_rank_fail_and_leaves_the_models(ranks):
    results = ranks
    f0, f1 = results[0]["failing"], results[1]["failing"]
    assert f1["error"] and "NaN or Inf" in f1["error"], f1
    assert f0["error"] and "failed on rank(s) 1" in f0["error"] and "NaN or Inf" in f0["error"], f0
    assert f0["unchanged"] and f1["unchanged"]


def test_ranks_with_different_models_refuse_on_every_rank(ranks):
    for r in ranks:
        assert r["different"] and "the weights differ between ranks: rank(s) 1" in r["different"], r["different"]
        assert "same model" in r["different"]
