"""Every module path and dvn name that docs/design.md, CONTRIBUTING.md and README.md cite in backticks exists.

Pragmatic rules over backticked text:

- a ``*.py`` path exists: one with a folder relative to the repository or to ``src/dvn_cli``, a bare file name
  anywhere in the repository's code folders;
- a dotted name whose first part is a dvn module (``dvn_cli.x.y``, ``plan.shared_memory_params``,
  ``fsutil.write_atomic``) or a public dvn class (``SharedRuntime.for_budget``) resolves by import and getattr;
- a call such as ``level_cost(network, task, level)`` names a function, method or field some dvn module defines;
- a bare snake_case name (``plain_config``, ``check_max_abs_diff``; not a formula's ``p_top``) appears somewhere
  in ``src/dvn_cli``;
- names placed in a module, "``a``, ``b`` and ``c`` (``modelfile/container.py``)", are defined in that module.

Names of other libraries (``torch.fx``, ``numpy.memmap``), files (``manifest.json``) and tensor names are left alone.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import re
from functools import cache
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "src" / "dvn_cli"
DOCS = [REPO / "docs" / "design.md", REPO / "CONTRIBUTING.md", REPO / "README.md"]
CODE_FOLDERS = ("src", "tests", "benchmarks", "examples")
TICKED = re.compile(r"`([^`\n]+)`")
IDENT = r"[A-Za-z_]\w*"
DOTTED = re.compile(rf"{IDENT}(?:\.{IDENT})+")
CALL = re.compile(rf"({IDENT})\(.*\)")
FILE_SUFFIXES = {"py", "json", "jsonl", "safetensors", "onnx", "pth", "toml", "md", "gz", "sh", "csv", "txt", "png"}
FILE_SUFFIXES |= {"key"}  # ``engine.key``: a file, not the module ``serve.engine``
PLACED = re.compile(rf"((?:`{IDENT}(?:\(\))?`(?:,\s|\sand\s|\sor\s)?)+)\s\(`([\w/]+\.py)`\)")


@cache
def modules() -> dict[str, str]:
    """Every dvn module and package by its full name -> its full name, and each short name -> full names."""
    names = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = ("dvn_cli", *path.relative_to(PACKAGE).with_suffix("").parts)
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def short_names() -> dict[str, list[str]]:
    index: dict[str, list[str]] = {}
    for full in modules():
        index.setdefault(full.rsplit(".", 1)[-1], []).append(full)
    return index


@cache
def public_classes() -> dict[str, type]:
    """Classes defined in dvn modules, by name."""
    found = {}
    for full in modules():
        for name, value in vars(importlib.import_module(full)).items():
            if inspect.isclass(value) and value.__module__ == full and not name.startswith("_"):
                found[name] = value
    return found


@cache
def defined_names(full: str) -> set[str]:
    """Top-level functions, classes and assignments of a dvn module (read from its source: lazily imported too)."""
    tree = ast.parse(modules()[full].read_text())
    names = set()
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {t.id for t in targets if isinstance(t, ast.Name)}
    return names


def resolves(obj: object, attrs: list[str]) -> bool:
    for attr in attrs:
        if inspect.ismodule(obj) and f"{obj.__name__}.{attr}" in modules():
            obj = importlib.import_module(f"{obj.__name__}.{attr}")
        elif hasattr(obj, attr) or attr in getattr(obj, "__dataclass_fields__", {}):
            obj = getattr(obj, attr, None)
        else:
            return False
    return True


def dotted_ok(text: str) -> bool | None:
    """Whether a dotted name resolves; None when it is not a dvn name."""
    parts = text.split(".")
    if parts[-1] in FILE_SUFFIXES:
        return None
    if parts[0] == "dvn_cli":
        for cut in range(len(parts), 0, -1):
            if ".".join(parts[:cut]) in modules():
                return resolves(importlib.import_module(".".join(parts[:cut])), parts[cut:])
        return False
    if parts[0] in short_names():
        return any(resolves(importlib.import_module(full), parts[1:]) for full in short_names()[parts[0]])
    if parts[0] in public_classes():
        return resolves(public_classes()[parts[0]], parts[1:])
    return None


def path_ok(text: str) -> bool:
    if "/" in text:
        return (REPO / text).is_file() or (PACKAGE / text).is_file()
    return any(next((REPO / folder).rglob(text), None) for folder in CODE_FOLDERS)


def references() -> list[tuple[str, str]]:
    return [(doc.name, text) for doc in DOCS for text in dict.fromkeys(TICKED.findall(doc.read_text()))]


def stale(doc: str, text: str) -> str | None:
    """Why a backticked reference is stale, or None."""
    if re.fullmatch(r"[\w./-]+\.py", text):
        return None if path_ok(text) else "no such file"
    name = text.split("(", 1)[0]
    if DOTTED.fullmatch(name):
        return "does not resolve" if dotted_ok(name) is False else None
    call = CALL.fullmatch(text)
    if call and "_" in call.group(1) and call.group(1).islower() and call.group(1) not in every_defined_name():
        return "no dvn module defines it"
    if re.fullmatch(r"[a-z][a-z0-9]+_\w+", text) and not re.search(rf"\b{text}\b", source_text()):
        return "appears nowhere in src/dvn_cli"
    return None


@cache
def source_text() -> str:
    return "\n".join(path.read_text() for path in modules().values())


@cache
def every_defined_name() -> set[str]:
    """What a snake_case call in the docs may name: a dvn function, method or config field."""
    names = set()
    for full in modules():
        names |= defined_names(full)
        for cls in (v for v in vars(importlib.import_module(full)).values() if inspect.isclass(v)):
            names |= set(vars(cls)) | set(getattr(cls, "__dataclass_fields__", {}))
    return names


@pytest.mark.parametrize("doc", [d.name for d in DOCS])
def test_every_cited_module_and_name_exists(doc):
    problems = [f"`{text}`: {why}" for name, text in references() if name == doc and (why := stale(name, text))]
    assert problems == []


def placements() -> list[tuple[str, str, str]]:
    """(doc, name, module path) for each "``name`` (``path.py``)" the docs write."""
    found = []
    for doc in DOCS:
        for names, path in PLACED.findall(doc.read_text()):
            found += [(doc.name, name.rstrip("()"), path) for name in re.findall(r"`([^`]+)`", names)]
    return found


def module_of(path: str) -> str | None:
    candidates = [f for f, p in modules().items() if p.as_posix().endswith("/" + path) or p.name == path]
    return candidates[0] if len(candidates) == 1 else None


def test_names_placed_in_a_module_are_defined_there():
    assert placements(), "the pattern finds no placement: the docs changed their style"
    wrong = [
        f"{doc}: `{name}` is not defined in {path}"
        for doc, name, path in placements()
        if (full := module_of(path)) is not None and name not in defined_names(full)
    ]
    assert wrong == []


def test_the_checks_find_stale_references():
    assert stale("x", "core/nowhere.py") == "no such file"
    assert stale("x", "plan.no_such_function") == "does not resolve"
    assert stale("x", "dvn_cli.core.units.no_such_name") == "does not resolve"
    assert stale("x", "SharedRuntime.no_such_method") == "does not resolve"
    assert stale("x", "no_such_counter(network)") == "no dvn module defines it"
    assert stale("x", "no_such_counter") == "appears nowhere in src/dvn_cli"
    assert stale("x", "plan.shared_memory_params") is None and stale("x", "torch.fx") is None
    assert stale("x", "manifest.json") is None and stale("x", "BackboneConfig.units") is None


def test_design_names_every_setting_resume_may_change():
    from dvn_cli.user_config import NOT_COMPARED

    text = DOCS[0].read_text()
    state = re.search(r"`config` \(the `TrainConfig` less (.*?), which may change on resume\)", text, re.S)
    row = re.search(r"^\| resume \|(.*)$", text, re.M)
    assert state and row, "design.md no longer says which settings --resume may change"
    for said in (state.group(1), row.group(1)):
        assert set(re.findall(r"`(\w+)`", said)) == set(NOT_COMPARED)
