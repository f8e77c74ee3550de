"""The first-party packages form no import cycle (imports inside functions count too)."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.helpers import PROJECT

PACKAGES = ("flows", "sierra_prefect")


def _imports(source: Path, modules: set[str]) -> set[str]:
    """The first-party modules ``source`` imports: ``from P.m import x``, ``from P import m``
    (``m`` a module), ``import P.m``."""
    found = set()
    for node in ast.walk(ast.parse(source.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module in modules:
                found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names} & modules
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names} & modules
    return found


def import_graph() -> dict[str, set[str]]:
    files = {f"{p.parent.name}.{p.stem}": p for pkg in PACKAGES for p in (PROJECT / pkg).glob("*.py")}
    modules = set(files) | set(PACKAGES)
    return {name: _imports(path, modules) - {name} for name, path in files.items()}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    cycles = []

    def walk(module: str, path: list[str]) -> None:
        for target in sorted(graph.get(module, ())):
            if target in path:
                cycles.append(path[path.index(target):] + [target])
            elif len(path) < len(graph):
                walk(target, path + [target])

    for module in graph:
        walk(module, [module])
    return cycles


def test_the_graph_is_read():
    graph = import_graph()
    # Known edges: if the parse stopped finding them, the cycle check would pass vacuously.
    assert "flows.plan" in graph["flows.sierra_batch"]
    assert "sierra_prefect.server" in graph["sierra_prefect.stack"]


def test_find_cycles_finds_one():
    assert ["a", "b", "c", "a"] in find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}})
    assert ["a", "b", "a"] in find_cycles({"a": {"b"}, "b": {"a"}})
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    cycles = find_cycles(import_graph())
    assert not cycles, f"import cycles: {cycles[:5]}"
