"""The README's runnable code blocks (those marked ``<!-- tests/test_readme.py runs this block -->``)
run as written, each in a fresh namespace and a scratch folder."""

from __future__ import annotations

import pathlib
import re

import pytest

from fastprune.methods import registry

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
MARK = "<!-- tests/test_readme.py runs this block -->"
BLOCKS = re.findall(re.escape(MARK) + r"\n```python\n(.*?)```", README.read_text(), flags=re.S)


def test_the_readme_marks_its_runnable_blocks():
    assert len(BLOCKS) >= 3 and README.read_text().count(MARK) == len(BLOCKS)


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_block_runs(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    before = set(registry.method_names())
    try:
        exec(compile(BLOCKS[index], f"README.md block {index}", "exec"), {"__name__": "readme"})
    finally:
        for name in set(registry.method_names()) - before:  # a block that adds a method
            registry.unregister_method(name)
