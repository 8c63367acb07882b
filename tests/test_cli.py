"""The ``fastprune`` command: prune a user's model given as package.module:factory, and the demo."""

from __future__ import annotations

import json
import sys
import textwrap

import pytest
import torch

import fastprune
from fastprune.cli import main


@pytest.fixture
def user_model(tmp_path, monkeypatch):
    (tmp_path / "usermodels.py").write_text(
        textwrap.dedent("""
        import torch
        from torch import nn

        def make():
            torch.manual_seed(0)
            return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))

        def not_a_model():
            return 3
    """)
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    sys.modules.pop("usermodels", None)


def test_prune_command_writes_state_dict_and_plan(user_model, capsys):
    import usermodels

    weights = user_model / "w.pt"
    torch.save(usermodels.make().state_dict(), weights)
    out = user_model / "pruned.pt"
    assert main(["prune", "usermodels:make", "--sparsity", "0.75", "--weights", str(weights), "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "75.00%" in printed and "compression" in printed
    sd = torch.load(out, weights_only=True)
    model = fastprune.load_pruned(usermodels.make(), sd)
    assert fastprune.sparsity_report(model).sparsity == pytest.approx(0.75, abs=1e-3)
    plan = json.loads((user_model / "pruned.pt.plan.json").read_text())
    assert plan["method"] == "magnitude" and plan["target_sparsity"] == 0.75


def test_prune_command_errors_are_clear(user_model):
    with pytest.raises(SystemExit, match="package.module:factory"):
        main(["prune", "usermodels", "--sparsity", "0.5", "-o", "x.pt"])
    with pytest.raises(SystemExit, match="cannot import"):
        main(["prune", "nosuchmodule:make", "--sparsity", "0.5", "-o", "x.pt"])
    with pytest.raises(SystemExit, match="not a torch.nn.Module"):
        main(["prune", "usermodels:not_a_model", "--sparsity", "0.5", "-o", "x.pt"])
    with pytest.raises(SystemExit, match="sparsity"):
        main(["prune", "usermodels:make", "--sparsity", "1.5", "-o", "x.pt"])
    with pytest.raises(SystemExit, match="unknown method"):
        main(["prune", "usermodels:make", "--method", "nope", "--sparsity", "0.5", "-o", "x.pt"])
    with pytest.raises(SystemExit, match="block"):
        main(["prune", "usermodels:make", "--sparsity", "0.5", "--block", "0", "-o", "x.pt"])
    with pytest.raises(SystemExit, match="--block applies to --method magnitude"):
        main(
            [
                "prune",
                "usermodels:make",
                "--method",
                "l1_filter",
                "--sparsity",
                "0.5",
                "--block",
                "4",
                "--input-shape",
                "2,8",
                "-o",
                "x.pt",
            ]
        )


def test_prune_command_block(user_model):
    out = user_model / "blocked.pt"
    assert (
        main(["prune", "usermodels:make", "--sparsity", "0.75", "--scope", "layer", "--block", "4", "-o", str(out)])
        == 0
    )
    import usermodels

    model = fastprune.load_pruned(usermodels.make(), torch.load(out, weights_only=True))
    w = model[0].weight.detach()
    groups = [(w[g : g + 4] != 0) for g in range(0, w.shape[0], 4)]
    assert sum(bool((m != m[0]).any()) for m in groups) <= 1  # rows share patterns (one group may straddle)


def test_prune_command_structured(user_model, capsys):
    out = user_model / "slim.pt"
    with pytest.raises(SystemExit, match="--input-shape"):
        main(["prune", "usermodels:make", "--method", "l1_filter", "--sparsity", "0.5", "-o", str(out)])
    assert (
        main(
            [
                "prune",
                "usermodels:make",
                "--method",
                "l1_filter",
                "--sparsity",
                "0.5",
                "--input-shape",
                "2,8",
                "-o",
                str(out),
            ]
        )
        == 0
    )
    assert "50.0% of the removable channels removed" in capsys.readouterr().out
    import usermodels

    model = fastprune.load_pruned(usermodels.make(), torch.load(out, weights_only=True))
    assert model[0].out_features == 8 and model[2].in_features == 8


def test_bench_command(user_model, capsys):
    assert (
        main(["bench", "usermodels:make", "--input-shape", "4,8", "--sparsity", "0.8", "--min-run-time", "0.05"]) == 0
    )
    out = capsys.readouterr().out
    assert "fastprune.sparsify" in out and "magnitude-pruned per layer to 80%" in out
    assert (
        main(
            [
                "bench",
                "usermodels:make",
                "--input-shape",
                "4,8",
                "--sparsity",
                "0.8",
                "--block",
                "4",
                "--min-run-time",
                "0.05",
            ]
        )
        == 0
    )
    assert "fastprune.sparsify" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="block"):
        main(["bench", "usermodels:make", "--input-shape", "4,8", "--block", "0", "--min-run-time", "0.05"])
    assert (
        main(["bench", "usermodels:make", "--input-shape", "4,8", "--micro-batch", "2", "--min-run-time", "0.05"]) == 0
    )
    assert "run 2 sample(s) at a time" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="positive int"):
        main(["bench", "usermodels:make", "--input-shape", "4,8", "--micro-batch", "0", "--min-run-time", "0.05"])
    with pytest.raises(SystemExit, match="input shape"):
        main(["bench", "usermodels:make", "--input-shape", "4,9", "--min-run-time", "0.05"])
    (user_model / "scripted.py").write_text(
        "import torch\nfrom torch import nn\ndef make():\n    return torch.jit.script(nn.Linear(3, 2))\n"
    )
    with pytest.raises(SystemExit, match="TorchScript"):
        main(["bench", "scripted:make", "--input-shape", "1,3"])


def test_demo_quick(tmp_path, capsys):
    assert main(["demo", "--quick", "--out", str(tmp_path), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "magnitude one-shot + retrain" in printed and "iterative" in printed
    assert "50 % channels removed" in printed and "faster" in printed
    assert "ResNet-50-like, 90 %, unstructured" in printed and "4 rows share" in printed
    assert "MLP, magnitude one-shot" in printed
    assert (tmp_path / "demo_accuracy.png").stat().st_size > 0


def test_methods_command_lists_the_registry(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    for name in ("magnitude", "woodfisher", "fisher_diag", "l1_filter", "l2_filter", "bn_scale", "random"):
        assert name in out
    assert "WoodFisherConfig" in out and "L1FilterConfig" in out


def test_unknown_method_is_one_line(user_model, tmp_path):
    with pytest.raises(SystemExit) as e:
        main(["prune", "usermodels:make", "--method", "nisp_soon", "--sparsity", "0.5", "-o", str(tmp_path / "x.pt")])
    msg = str(e.value)
    assert msg.startswith("fastprune: unknown method 'nisp_soon'") and "\n" not in msg
