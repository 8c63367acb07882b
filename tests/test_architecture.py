"""The package's shape, enforced: the import graph has no cycles, ``plan.py`` depends on nothing
else in the package, imports inside functions only defer heavy optional dependencies (and say so),
and there is one FX tracer class. Read from the sources (AST), so nothing here depends on import
order at run time."""

from __future__ import annotations

import ast
import pathlib
import sys

import pytest

PKG = pathlib.Path(__file__).resolve().parents[1] / "python" / "fastprune"

# Deferred imports are allowed for these only: optional extras (not installed by `pip install
# fastprune`) or heavy packages that most users of the module never touch.
OPTIONAL = {"matplotlib", "sklearn", "transformers", "onnx", "onnxruntime"}


def _module_name(path: pathlib.Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def _resolve(importer: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = importer.split(".")
    if not _is_package(importer):
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _targets(importer: str, node: ast.Import | ast.ImportFrom) -> list[str]:
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    mod = _resolve(importer, node)
    out = [mod]
    out += [f"{mod}.{a.name}" for a in node.names if f"{mod}.{a.name}" in MODULES]
    return out


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING"
    )


def _imports(name: str) -> tuple[list[tuple[str, ast.stmt]], list[tuple[str, ast.stmt]]]:
    """(imports run when the module is imported, imports inside functions) as (target, node)."""
    tree = ast.parse(MODULES[name].read_text())
    top: list[tuple[str, ast.stmt]] = []
    nested: list[tuple[str, ast.stmt]] = []

    def walk(body: list[ast.stmt], in_function: bool) -> None:
        for node in body:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for t in _targets(name, node):
                    (nested if in_function else top).append((t, node))
            elif isinstance(node, ast.If) and _is_type_checking(node):
                walk(node.orelse, in_function)  # annotations only: never imported at run time
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                walk(node.body, True)
            else:
                for field in ("body", "orelse", "finalbody", "handlers"):
                    sub = getattr(node, field, None)
                    if isinstance(sub, list):
                        walk(
                            [s for s in sub if isinstance(s, ast.stmt)]
                            if field != "handlers"
                            else [s for h in sub for s in h.body],
                            in_function,
                        )

    walk(tree.body, False)
    return top, nested


def _edges(name: str) -> set[str]:
    """Package modules that importing ``name`` imports first: each target and its parent packages
    (but not ``name``'s own parents, which are already being imported when it runs)."""
    own = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)}
    out: set[str] = set()
    for target, _ in _imports(name)[0]:
        parts = target.split(".")
        for i in range(1, len(parts) + 1):
            prefix = ".".join(parts[:i])
            if prefix in MODULES and prefix not in own and prefix != name:
                out.add(prefix)
    return out


def _cycles() -> list[list[str]]:
    graph = {m: _edges(m) for m in MODULES}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    sccs: list[list[str]] = []
    sys.setrecursionlimit(max(10000, sys.getrecursionlimit()))

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                sccs.append(sorted(comp))

    for m in sorted(graph):
        if m not in index:
            strong(m)
    return sccs


def test_the_import_graph_has_no_cycles():
    assert _cycles() == []


def test_the_checker_finds_a_cycle(tmp_path, monkeypatch):
    # the detector itself can fail: two modules that import each other form one cycle
    (tmp_path / "fastprune").mkdir()
    (tmp_path / "fastprune" / "__init__.py").write_text("")
    (tmp_path / "fastprune" / "a.py").write_text("from fastprune.b import x\n")
    (tmp_path / "fastprune" / "b.py").write_text("def f():\n    pass\nfrom fastprune import a\n")
    monkeypatch.setattr(sys.modules[__name__], "PKG", tmp_path / "fastprune")
    fake = {_module_name(p): p for p in sorted((tmp_path / "fastprune").rglob("*.py"))}
    monkeypatch.setattr(sys.modules[__name__], "MODULES", fake)
    assert _cycles() == [["fastprune.a", "fastprune.b"]]


def test_plan_imports_nothing_else_from_the_package():
    top, nested = _imports("fastprune.plan")
    assert [t for t, _ in top + nested if t.startswith("fastprune")] == []


@pytest.mark.parametrize("name", sorted(MODULES))
def test_deferred_imports_only_for_optional_dependencies(name):
    lines = MODULES[name].read_text().splitlines()
    bad = []
    for target, node in _imports(name)[1]:
        root = target.split(".")[0]
        commented = "#" in lines[node.lineno - 1] or "#" in lines[node.lineno - 2]
        if root not in OPTIONAL or not commented:
            bad.append(f"line {node.lineno}: {target}")
    assert not bad, f"{name} imports inside functions (allowed only for {sorted(OPTIONAL)}, with a comment): {bad}"


def test_one_fx_tracer_class():
    tracers = []
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and any(ast.unparse(b).endswith("Tracer") for b in node.bases):
                tracers.append(f"{name}.{node.name}")
    assert len(tracers) == 1, tracers
