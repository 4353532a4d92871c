"""A shared export folder (``dvn export --shared``) as files: the manifest, the weights file and the graphs, checked.

The folder is untrusted input (docs/design.md §5): anyone can edit a copy and put new sizes and sha256s into its
manifest. ``SharedFolder`` reads ``manifest.json``, checks the sha256 of the weights file and of every graph
against it, keeps every path inside the folder and has the weights file's index validated completely, all before
anything runs. The weights file is read by ``modelfile.shared_weights.WeightsFile`` (held open, each tensor copied
out of it on first use, never memory-mapped); each graph's initializers are checked against the file's tensors when
its session is made (``check_initializers``).

Who runs the graphs is deployment's (``runtime.ort.SharedOrtRuntime``); this module reads files only and
imports numpy and dvn's torch-free helpers, so a deployment needs no PyTorch.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .. import __version__
from ..core.sizes import SCALE_SUFFIX
from ..errors import MissingData, UnknownTask, WrongFileFormat
from ..fsutil import first_line
from .shared_weights import WeightsFile, check_listed_file

__all__ = [
    "MANIFEST_NAME",
    "PACKED_FORMAT_VERSION",
    "SHARED_EXPORT_FORMAT",
    "SHARED_FORMAT_VERSION",
    "SHARED_LAYOUT",
    "SharedFolder",
    "block_scale",
    "check_initializers",
    "graph_initializers",
    "rows_held",
    "is_export_folder",
]

SHARED_LAYOUT = "shared"

SHARED_FORMAT_VERSION = 4
"""The newest format read. 4: canonical graphs (``export.canonical``) whose initializers may be ranges of rows
of the weights file's tensors (an entry's ``views``), tensors placed as in 2;
3: a file at fp16 or int8, every tensor packed on ``shared_weights.SMALL_ALIGNMENT`` boundaries;
2: tensors under a page are packed (``SMALL_ALIGNMENT``), the others start on a page; 1 put every tensor on a page
of its own. A float32 export of ``Concat`` graphs is still written as 2."""

PACKED_FORMAT_VERSION = 3
"""In this format no tensor is page-aligned: a lower-precision block is converted to float32 when it runs, so
none is ever used in place, and page boundaries would only add padding (a quarter of an int8 file's bytes)."""

MANIFEST_NAME = "manifest.json"

SHARED_EXPORT_FORMAT = "dvn-shared-export"
"""The format name of a shared export folder as a model file (``modelfile.shared.SharedExport``)."""

_ONNX_TYPES = {np.dtype(np.float32): 1, np.dtype(np.uint8): 2, np.dtype(np.int8): 3, np.dtype(np.float16): 10}
"""numpy dtype -> ``TensorProto.DataType`` of the same element type."""


def is_export_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder holding an export's manifest: what ``open_model`` and ``dvn serve`` read as a
    shared export (the manifest itself is checked when it is read)."""
    return Path(path).is_dir() and (Path(path) / MANIFEST_NAME).is_file()


def _read_manifest(folder: Path) -> dict[str, Any]:
    path = folder / MANIFEST_NAME
    if not path.is_file():
        raise MissingData(f"{path} not found: is {folder} a folder written by dvn export --shared?")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as exc:
        raise WrongFileFormat(f"{path} is not a dvn manifest ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("layout") != SHARED_LAYOUT:
        raise WrongFileFormat(f"{path} is not the manifest of a shared export (dvn export --shared)")
    version = manifest.get("shared_format_version")
    if not isinstance(version, int) or version > SHARED_FORMAT_VERSION:
        raise WrongFileFormat(
            f"{path} is a shared export of format {version} (dvn {manifest.get('dvn_version')}); this dvn "
            f"({__version__}) reads format {SHARED_FORMAT_VERSION}: upgrade dvn"
        )
    if not isinstance(manifest.get("weights"), dict) or not isinstance(manifest.get("models"), list):
        raise WrongFileFormat(f"{path} is a damaged shared-export manifest (no weights or models)")
    for i, entry in enumerate(manifest["models"]):
        _check_model_entry(path, i, entry)
    pairs = [(entry["task"], entry["level"]) for entry in manifest["models"]]
    twice = next((pair for i, pair in enumerate(pairs) if pair in pairs[:i]), None)
    if twice is not None:
        raise WrongFileFormat(f"{path} lists {twice[0]} level {twice[1]} twice; export again")
    return manifest


_ENTRY_TYPES = {
    "task": str,
    "level": int,
    "file": str,
    "input": str,
    "output": str,
    "tensors": list,
    "preprocess": dict,
}


def _check_model_entry(path: Path, i: int, entry: Any) -> None:
    """Refuse a manifest entry the runtime could not use as it is: wrong types, a tensor named twice."""
    wrong = [
        key for key, kind in _ENTRY_TYPES.items() if not isinstance(entry, dict) or type(entry.get(key)) is not kind
    ]
    if not wrong:
        pre = entry["preprocess"]
        wrong = [f"preprocess.{key}" for key in ("channels", "height", "width") if type(pre.get(key)) is not int]
        wrong += ["tensors"] if not all(isinstance(name, str) for name in entry["tensors"]) else []
    if wrong:
        raise WrongFileFormat(f"{path} is a damaged shared-export manifest (models[{i}] has no valid {wrong[0]})")
    views = entry.get("views", {})
    if not isinstance(views, dict) or not all(_valid_view(v, entry["tensors"]) for v in views.values()):
        raise WrongFileFormat(f"{path} is a damaged shared-export manifest (models[{i}] has no valid views)")
    names = entry["tensors"]
    twice = next((name for j, name in enumerate(names) if name in names[:j]), None)
    if twice is not None:
        raise WrongFileFormat(
            f"{path} lists tensor {twice} twice for {entry['task']} level {entry['level']} (models[{i}]); export again"
        )


def _valid_view(view: Any, tensors: list[str]) -> bool:
    """Whether a manifest entry's view is ``[tensor it lists, first row, end row]`` (the rows checked later)."""
    return type(view) is list and len(view) == 3 and view[0] in tensors and all(type(n) is int for n in view[1:])


def _inside(folder: Path, entry: Mapping[str, Any], what: str) -> Path:
    """The path of ``entry["file"]``, which must name a file inside ``folder``: relative, no ``..``, no link out."""
    name = entry.get("file")
    if not isinstance(name, str) or not name or Path(name).is_absolute() or ".." in Path(name).parts:
        raise WrongFileFormat(
            f"{folder / MANIFEST_NAME} names {what} {name!r}: every file must be inside the folder (a relative "
            "name, no '..')"
        )
    path = folder / name
    if not path.resolve().is_relative_to(folder.resolve()):
        raise WrongFileFormat(f"{what} {path} is a link to {path.resolve()}, outside {folder}; copy the file instead")
    return path


def graph_initializers(entry: Mapping[str, Any]) -> dict[str, tuple[str, int, int] | None]:
    """Initializer name -> None for a whole tensor of the weights file, or ``(tensor, first row, end row)`` for a
    view (format 4: a range of rows of a tensor); the entry's ``tensors`` read only through views are not
    initializers themselves."""
    views = {name: tuple(view) for name, view in entry.get("views", {}).items()}
    viewed = {view[0] for view in views.values()}
    return {**{name: None for name in entry["tensors"] if name not in viewed}, **views}


def block_scale(name: str, index: Mapping[str, tuple]) -> bool:
    """Whether tensor ``name`` of a weights file is the float32 scale of an int8 block (not a model parameter)."""
    base = name.removesuffix(SCALE_SUFFIX)
    return base != name and base in index and index[base][0] == np.int8


def rows_held(entries: Iterable[Mapping[str, Any]]) -> dict[str, tuple[int, int] | None]:
    """Tensor -> the rows ``(begin, end)`` that the graphs of ``entries`` read, or None for all of it: a canonical
    graph reads a range of rows (a view), and the views of one tensor that running graphs read overlap, so their
    union is one range; what a runtime running them holds."""
    held: dict[str, tuple[int, int] | None] = {}
    for entry in entries:
        for name, view in graph_initializers(entry).items():
            tensor = name if view is None else view[0]
            rows = held.get(tensor, view[1:] if view is not None else None)
            if tensor in held and rows is not None and view is not None:
                rows = (min(rows[0], view[1]), max(rows[1], view[2]))
            held[tensor] = None if view is None else rows
    return held


def _declared_as(index: Mapping[str, tuple], name: str, view: tuple[str, int, int] | None) -> tuple:
    """(dims, ONNX data type) an initializer must declare: its tensor's, or its view's rows of it."""
    dtype, shape, _ = index[name if view is None else view[0]]
    dims = shape if view is None else (view[2] - view[1], *shape[1:])
    return tuple(dims), _ONNX_TYPES[dtype]


def check_initializers(path: Path, entry: Mapping[str, Any], index: Mapping[str, tuple]) -> None:
    """Refuse a graph whose initializers are not the weights file's tensors its entry names, of the same shapes
    and element types.

    onnxruntime takes a buffer given with ``add_initializer`` whatever its shape or type (a wrong one fails at run
    time, or broadcasts to a wrong result), and it reads an external initializer that is not given from the file
    itself.
    """
    try:
        declared = _graph_initializers(path.read_bytes())
    except (OSError, ValueError, IndexError, TypeError, AttributeError) as exc:
        raise WrongFileFormat(f"graph {path} is not an ONNX model dvn can read ({first_line(exc)})") from None
    names = graph_initializers(entry)
    wrong = [n for n, view in names.items() if declared.get(n, (None,))[:2] != _declared_as(index, n, view)]
    wrong += [n for n, (_, _, external) in declared.items() if external and n not in names]
    if wrong:
        raise WrongFileFormat(
            f"graph {path} and the weights file disagree on tensor {wrong[0]} (its shape or type, or it is not listed "
            "in the manifest); export again"
        )


def _graph_initializers(model: bytes) -> dict[str, tuple[tuple[int, ...], int | bytes | None, bool]]:
    """Name -> (dims, data type, stored externally) of every initializer of an ONNX model's main graph, read from its
    protobuf encoding (``ModelProto.graph`` = 7, ``GraphProto.initializer`` = 5, ``TensorProto`` dims = 1,
    data_type = 2, name = 8, data_location = 14) so that the runtime needs no ``onnx`` package."""
    graph = b"".join(_message(value) for field, value in _fields(model) if field == 7)  # a repeated message merges
    found: dict[str, tuple[tuple[int, ...], int | bytes | None, bool]] = {}
    for field, tensor in _fields(graph):
        if field != 5:
            continue
        dims: list[int] = []
        name, external = "", False
        kind: int | bytes | None = 0  # as read: a data_type of another wire type matches no tensor's and is refused
        for key, value in _fields(_message(tensor)):
            if key == 1:
                dims += [value] if isinstance(value, int) else _varints(_message(value))
            elif key == 2:
                kind = value
            elif key == 8:
                name = _message(value).decode()
            elif key == 14:
                external = value == 1
        found[name] = (tuple(dims), kind, external)
    return found


def _fields(data: bytes) -> Iterator[tuple[int, int | bytes | None]]:
    """(field number, value) of each field of one protobuf message: an int for a varint, bytes for a
    length-delimited field, None for a fixed-width one."""
    i = 0
    value: int | bytes | None
    while i < len(data):
        key, i = _varint(data, i)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(data, i)
        elif wire == 2:
            length, i = _varint(data, i)
            value, i = data[i : i + length], i + length
            if i > len(data):
                raise ValueError("a field runs past the end of the message")
        elif wire in (1, 5):
            value, i = None, i + (8 if wire == 1 else 4)
        else:
            raise ValueError(f"protobuf wire type {wire}")
        yield field, value


def _message(value: int | bytes | None) -> bytes:
    """A length-delimited field's bytes (a message, a string, packed numbers); a field of another wire type where
    one belongs is a damaged graph (TypeError, as ``check_initializers`` expects of one)."""
    if not isinstance(value, bytes):
        raise TypeError("a number where a message or a string belongs")
    return value


def _varints(data: bytes) -> list[int]:
    """The values of a packed repeated varint field."""
    values, i = [], 0
    while i < len(data):
        value, i = _varint(data, i)
        values.append(value)
    return values


def _varint(data: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[i]
        value, shift, i = value | (byte & 0x7F) << shift, shift + 7, i + 1
        if byte < 0x80:
            return value, i
        if shift >= 70:
            raise ValueError("a varint longer than 10 bytes")


class SharedFolder:
    """A shared export folder read and checked as files, before anything runs: its manifest, the weights file (held
    open, its index validated) and one entry per (task, level), each graph's file checked against the manifest.

    Args:
        folder: the folder ``dvn export --shared`` wrote (``manifest.json``, ``weights.safetensors``, graphs).
        verify: check the sha256 of every file against the manifest (on by default).

    Raises:
        MissingData: no manifest, weights file or graph where the manifest says.
        WrongFileFormat: a manifest that is not a shared export or comes from a newer dvn, names a file outside the
            folder or is damaged; a truncated or changed file; an invalid weights index; a graph naming a tensor
            the weights file lacks.
    """

    def __init__(self, folder: str | os.PathLike, verify: bool = True) -> None:
        self.folder = Path(folder)
        self.manifest = _read_manifest(self.folder)
        self.weights = WeightsFile(
            _inside(self.folder, self.manifest["weights"], "weights file"),
            self.manifest["weights"],
            verify,
            pages=self.manifest["shared_format_version"] != PACKED_FORMAT_VERSION,
        )
        self.models: dict[tuple[str, int], dict[str, Any]] = {}
        for entry in self.manifest["models"]:
            path = _inside(self.folder, entry, "graph")
            check_listed_file(path, entry, verify, "graph")
            lacking = [name for name in entry["tensors"] if name not in self.weights.index]
            outside = [
                name
                for name, (tensor, begin, end) in entry.get("views", {}).items()
                if tensor in self.weights.index and not 0 <= begin < end <= (self.weights.index[tensor][1] or (0,))[0]
            ]
            if outside:
                raise WrongFileFormat(
                    f"{path} reads rows {outside[0]} outside its tensor of {self.weights.path.name}; export again"
                )
            if lacking:
                raise WrongFileFormat(
                    f"{path} names {len(lacking)} tensor(s) that {self.weights.path.name} lacks, "
                    f"e.g. {lacking[0]}; export again"
                )
            self.models[entry["task"], entry["level"]] = entry

    def model(self, task: str, level: int) -> Mapping[str, Any]:
        """The manifest entry of (task, level): classes, preprocess, units, cost, file."""
        if (task, level) not in self.models:
            held = ", ".join(f"{t} level {lv}" for t, lv in self.models)
            raise UnknownTask(f"{self.folder} holds no {task} level {level}; it holds {held}")
        return self.models[task, level]

    def held_rows(self, pairs: Iterable[tuple[str, int]]) -> dict[str, tuple[int, int]]:
        """Tensor -> the rows ``(begin, end)`` that ``pairs`` read, a tensor two of them share once (``rows_held``);
        a tensor read whole: all of its rows (a 0-d tensor: one). What a runtime running them holds."""
        index = self.weights.index
        held = rows_held(self.model(task, level) for task, level in pairs)
        return {n: rows if rows is not None else (0, index[n][1][0] if index[n][1] else 1) for n, rows in held.items()}

    def held_bytes(self, pairs: Iterable[tuple[str, int]]) -> int:
        """Bytes of the rows ``pairs`` read, each once, at the precision the file stores."""
        index = self.weights.index
        rows = self.held_rows(pairs).items()
        return sum(index[n][0].itemsize * math.prod(index[n][1][1:]) * (end - begin) for n, (begin, end) in rows)

    def held_params(self, pairs: Iterable[tuple[str, int]]) -> int:
        """Parameters in the rows ``pairs`` read, each once: every number held but an int8 block's scales (they say
        how its numbers read), so a parameter budget counts what a byte budget counts."""
        index = self.weights.index
        rows = self.held_rows(pairs).items()
        return sum(math.prod(index[n][1][1:]) * (end - begin) for n, (begin, end) in rows if not block_scale(n, index))

    def graph(self, task: str, level: int) -> Path:
        """The graph file of (task, level), checked to declare exactly its entry's tensors, of the file's shapes."""
        entry = self.model(task, level)
        path = self.folder / entry["file"]
        check_initializers(path, entry, self.weights.index)
        return path
