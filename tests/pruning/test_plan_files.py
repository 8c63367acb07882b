"""Plan files a user can get wrong: every defect is a ValueError naming the file and the field, and
an edited mask is refused instead of decoded into another one."""

from __future__ import annotations

import json

import pytest
from torch import nn

import fastprune


@pytest.fixture
def plan():
    model = nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 5))
    return fastprune.prune(model, "magnitude", sparsity=0.6)


def test_round_trip_through_a_path_object(plan, tmp_path):
    path = tmp_path / "p.json"
    plan.to_json(path)
    back = fastprune.Plan.from_json(path)
    assert back.to_json() == plan.to_json()


def test_an_edited_mask_is_refused(plan):
    # used to decode silently into a different mask
    obj = json.loads(plan.to_json())
    bits = obj["masks"]["0.weight"]["bits"]
    obj["masks"]["0.weight"]["bits"] = bits[:8] + ("B" if bits[8] != "B" else "C") + bits[9:]
    with pytest.raises(ValueError, match="checksum"):
        fastprune.Plan.from_json(json.dumps(obj))
    obj["masks"]["0.weight"]["bits"] = "AAAA" + bits  # inserted bytes: the length no longer fits the shape
    with pytest.raises(ValueError, match=r"bytes of bits for shape \[30, 20\]"):
        fastprune.Plan.from_json(json.dumps(obj))


@pytest.mark.parametrize(
    "content, match",
    [
        ("", "invalid JSON"),
        ('{"format": 1, "method": "magnitude"', "invalid JSON"),
        ("[1, 2]", "a JSON list"),
        ('{"format": 1}', "missing method, config, target_sparsity, achieved_sparsity, masks"),
        ('{"format": 7}', "unsupported plan format 7"),
    ],
)
def test_bad_files_name_the_file_and_the_problem(tmp_path, content, match):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=match) as e:
        fastprune.Plan.from_json(str(path))
    assert "bad.json" in str(e.value)


def test_missing_file_and_bad_masks(plan, tmp_path):
    with pytest.raises(ValueError, match="cannot read plan file .*nope.json"):
        fastprune.Plan.from_json(str(tmp_path / "nope.json"))
    obj = json.loads(plan.to_json())
    obj["masks"]["0.weight"]["shape"] = [30, 21]
    with pytest.raises(ValueError, match="mask '0.weight'"):
        fastprune.Plan.from_json(json.dumps(obj))
    obj["masks"]["0.weight"] = {"shape": "x"}
    with pytest.raises(ValueError, match="'shape' and 'bits'"):
        fastprune.Plan.from_json(json.dumps(obj))
    obj["masks"]["0.weight"] = {"shape": [2], "bits": "!!!"}
    with pytest.raises(ValueError, match="not valid base64"):
        fastprune.Plan.from_json(json.dumps(obj))
