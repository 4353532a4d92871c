"""The model core imports one way: no module of ``core/`` imports a module that imports it back.

Backbone families used to register through a cycle (``core/backbones.py`` imported ``mobilenet`` and ``resnet18``
at its end, which imported it); the registry now imports the family modules and they import only lower pieces.
Imports are read with ``ast``, lazy ones (inside functions) included, so a cycle hidden in a function is caught.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
CORE = SRC / "dvn_cli" / "core"


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported(path: Path, known: set[str]) -> set[str]:
    """Every ``dvn_cli`` module ``path`` imports anywhere in its body (``from . import x`` names module ``x``)."""
    package = _module_name(path).rsplit(".", 1)[0] if path.name != "__init__.py" else _module_name(path)
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            found |= {f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names}
    return found & known


def core_import_graph() -> dict[str, set[str]]:
    """core module -> the core modules it imports."""
    paths = {_module_name(p): p for p in sorted(CORE.glob("*.py"))}
    return {name: _imported(path, set(paths)) - {name} for name, path in paths.items()}


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per back edge found by a depth-first walk, as the list of modules around it."""
    cycles, state, stack = [], {}, []

    def visit(node: str) -> None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return cycles


def test_core_has_no_import_cycle():
    graph = core_import_graph()
    assert "dvn_cli.core.mobilenet" in graph["dvn_cli.core.backbones"]  # the walk sees ``from . import mobilenet``
    assert import_cycles(graph) == []


def test_the_walk_finds_a_cycle():
    assert import_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]
    assert import_cycles({"a": {"b"}, "b": set()}) == []
