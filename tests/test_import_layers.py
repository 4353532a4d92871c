"""Imports run one way: layers from the bottom up, no module importing one that imports it back, no private name
crossing modules.

Layers, lowest first: the top-level modules (``config``, ``errors``, ``fsutil``, ``settings``); ``core`` and
``data``; ``modelfile``; ``planning``; ``export`` and ``runtime``; ``evaluation`` and ``serve``; ``training``;
``cli``. Registries (backbone families, model-file kinds) import what they register, never the other way round.
Imports are read with ``ast``, lazy ones (inside functions) included, so an import hidden in a function is caught.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "dvn_cli"
RANK = {
    "core": 1,
    "data": 1,
    "modelfile": 2,
    "planning": 3,
    "export": 4,
    "runtime": 4,
    "evaluation": 5,
    "serve": 5,
    "training": 6,
    "cli": 7,
}
"""Sub-package -> its layer; modules at the top of the package are layer 0."""


def _module_name(path: Path, src: Path = SRC) -> str:
    parts = path.relative_to(src).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported(path: Path, known: set[str], src: Path = SRC) -> set[str]:
    """Every ``dvn_cli`` module ``path`` imports anywhere in its body (``from . import x`` names module ``x``)."""
    name = _module_name(path, src)
    package = name.rsplit(".", 1)[0] if path.name != "__init__.py" else name
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


def import_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    """module -> the dvn modules it imports (packages' ``__init__`` left out: they import nothing here)."""
    src = root.parent
    paths = {
        _module_name(p, src): p for p in sorted(root.rglob("*.py")) if p.name not in ("__init__.py", "__main__.py")
    }
    return {name: _imported(path, set(paths), src) - {name} for name, path in paths.items()}


def rank(module: str) -> int:
    parts = module.split(".")
    return RANK.get(parts[1], 0) if len(parts) > 2 else 0


def private_imports(root: Path = PACKAGE) -> list[str]:
    """``module imports _name from other`` for every private name imported from another module."""
    found = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").rsplit(".", 1)[-1] != path.stem:
                found += [f"{path.name} imports {a.name}" for a in node.names if a.name.startswith("_")]
    return [f for f in found if not f.endswith("__")]


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


def test_no_import_runs_upward():
    graph = import_graph()
    assert "dvn_cli.core.mobilenet" in graph["dvn_cli.core.backbones"]  # the walk sees ``from . import mobilenet``
    assert "dvn_cli.training.train_config" in graph["dvn_cli.cli.train"]  # and imports inside functions
    assert "dvn_cli.runtime.shared" in graph["dvn_cli.serve.model_engine"]  # serve (5) runs on runtime (4)
    upward = [f"{m} imports {t}" for m, targets in graph.items() for t in targets if rank(t) > rank(m)]
    assert upward == []


def test_every_package_has_a_layer():
    """A new sub-package is given its layer here, not left at layer 0 (where anything may import it)."""
    packages = {path.parent.name for path in PACKAGE.glob("*/__init__.py")}
    assert packages == set(RANK)


def test_no_module_imports_one_that_imports_it_back():
    assert import_cycles(import_graph()) == []


def test_no_private_name_crosses_a_module():
    assert private_imports() == []


def test_the_walk_finds_a_cycle():
    assert import_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]
    assert import_cycles({"a": {"b"}, "b": set()}) == []


def test_the_rules_see_a_violation(tmp_path):
    """The walk itself: an upward import, a cycle and a private import in a made-up package are all found."""
    root = tmp_path / "dvn_cli"
    for folder in ("core", "cli"):
        (root / folder).mkdir(parents=True)
        (root / folder / "__init__.py").write_text("")
    (root / "core" / "low.py").write_text("def f():\n    from ..cli.high import _helper\n")
    (root / "cli" / "high.py").write_text("from ..core import low\n\ndef _helper():\n    pass\n")
    graph = import_graph(root)
    assert [f"{m} -> {t}" for m, ts in graph.items() for t in ts if rank(t) > rank(m)] != []
    assert import_cycles(graph) != []
    assert private_imports(root) == ["low.py imports _helper"]
