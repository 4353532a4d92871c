"""A shared export folder (``dvn export --shared``) as files: the manifest, the weights file and the graphs, checked.

The folder is untrusted input (docs/design.md §5): anyone can edit a copy and put new sizes and sha256s into its
manifest. ``SharedFolder`` reads ``manifest.json``, checks the sha256 of the weights file and of every graph
against it, keeps every path inside the folder and validates the weights file's index completely, all before
anything runs. The weights file is held open and each tensor copied out of it on first use (``WeightsFile``), never
memory-mapped: a mapped file truncated or overwritten under the process kills it with SIGBUS.

Who runs the graphs is deployment's (``runtime.ort.SharedOrtRuntime``); this module reads files only and
imports numpy and dvn's torch-free helpers, so a deployment needs no PyTorch.
"""

from __future__ import annotations

import json
import math
import os
import weakref
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .. import __version__
from ..core.sizes import SCALE_SUFFIX
from ..errors import MissingData, UnknownTask, WrongFileFormat
from ..fileformats import read_safetensors_header
from ..fsutil import first_line, sha256_file, unusable_tensor

__all__ = [
    "ALIGNMENT",
    "MANIFEST_NAME",
    "SMALL_ALIGNMENT",
    "PAD_PREFIX",
    "PACKED_FORMAT_VERSION",
    "SHARED_EXPORT_FORMAT",
    "SHARED_FORMAT_VERSION",
    "SHARED_LAYOUT",
    "WEIGHTS_FORMAT",
    "WEIGHTS_NAME",
    "SharedFolder",
    "WeightsFile",
    "check_initializers",
    "graph_initializers",
    "rows_held",
    "is_export_folder",
    "read_weights_index",
    "tensor_alignment",
]

WEIGHTS_NAME = "weights.safetensors"

WEIGHTS_FORMAT = "dvn-shared-weights"

SHARED_LAYOUT = "shared"

SHARED_FORMAT_VERSION = 4
"""The newest format read. 4: canonical graphs (``export.canonical``) whose initializers may be ranges of rows
of the weights file's tensors (an entry's ``views``), tensors placed as in 2;
3: a file at fp16 or int8, every tensor packed on ``SMALL_ALIGNMENT`` boundaries;
2: tensors under a page are packed (``SMALL_ALIGNMENT``), the others start on a page; 1 put every tensor on a page
of its own. A float32 export of ``Concat`` graphs is still written as 2."""

PACKED_FORMAT_VERSION = 3
"""In this format no tensor is page-aligned: a lower-precision block is converted to float32 when it runs, so
none is ever used in place, and page boundaries would only add padding (a quarter of an int8 file's bytes)."""

ALIGNMENT = 4096
"""A tensor of the weights file of at least this many bytes starts at a multiple of it (a memory page)."""

SMALL_ALIGNMENT = 64
"""A tensor smaller than a page starts at a multiple of this many bytes (a cache line), packed with others."""

ARRAY_ALIGNMENT = 64
"""Where a tensor read into memory starts (``WeightsFile.read``): onnxruntime's kernels want 64-byte aligned buffers."""

PAD_PREFIX = "__pad__."

MANIFEST_NAME = "manifest.json"

SHARED_EXPORT_FORMAT = "dvn-shared-export"
"""The format name of a shared export folder as a model file (``modelfile.shared.SharedExport``)."""

_NUMPY_DTYPES = {"F32": np.float32, "F16": np.float16, "I8": np.int8, "U8": np.uint8}
_ONNX_TYPES = {np.dtype(np.float32): 1, np.dtype(np.uint8): 2, np.dtype(np.int8): 3, np.dtype(np.float16): 10}
"""numpy dtype -> ``TensorProto.DataType`` of the same element type."""


def is_export_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder holding an export's manifest: what ``open_model`` and ``dvn serve`` read as a
    shared export (the manifest itself is checked when it is read)."""
    return Path(path).is_dir() and (Path(path) / MANIFEST_NAME).is_file()


def read_weights_index(path: str | os.PathLike, pages: bool = True) -> dict[str, tuple[np.dtype, tuple[int, ...], int]]:
    """Name -> (dtype, shape, absolute byte offset) of every tensor (padding left out) of a shared weights file;
    ``pages``: tensors of a page or more start on one (formats before ``PACKED_FORMAT_VERSION``).

    Raises:
        WrongFileFormat: not a dvn shared weights file, a damaged header, or an invalid index (see ``_index_of``).
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        return _index_of(fd, os.fstat(fd).st_size, Path(path), pages)
    finally:
        os.close(fd)


def _index_of(fd: int, size: int, path: Path, pages: bool) -> dict[str, tuple[np.dtype, tuple[int, ...], int]]:
    """The index of the open weights file ``fd``, validated completely before any tensor is read.

    The header is untrusted input (anyone can edit it and put the new sha256 into the manifest): every tensor,
    padding included, must be a known dtype whose ``shape`` gives exactly its byte length, and in the order the
    header lists them (the order the writer wrote them) the tensors must tile the data section from its first byte
    to the end of the file, so that none is negative, out of order, overlapping or outside the file; every tensor
    but padding starts, from the start of the file, at a multiple of ``ALIGNMENT`` (a page) when it is at least a
    page long and ``pages``, else of ``SMALL_ALIGNMENT``.
    """
    header, start = _read_header(fd, size, path)
    index, position = {}, 0
    for name, entry in header.items():
        begin, end, dtype, shape = _entry_of(path, name, entry)
        if begin != position:  # out of order, overlapping, or a gap
            raise WrongFileFormat(
                f"{path} has an invalid tensor index ({name} starts at byte {begin} of the data, not at {position} "
                "where the tensor listed before it ends); export again"
            )
        if not name.startswith(PAD_PREFIX):
            alignment = tensor_alignment(end - begin, pages)
            if (start + begin) % alignment:
                raise WrongFileFormat(
                    f"{path} has an invalid tensor index ({name}, {end - begin} bytes, does not start on a "
                    f"{alignment}-byte boundary); export again"
                )
            index[name] = (dtype, shape, start + begin)
        position = end
    if start + position != size:
        raise WrongFileFormat(
            f"{path} has an invalid tensor index (its tensors end at byte {start + position} of {size}); export again"
        )
    return index


def tensor_alignment(nbytes: int, pages: bool = True) -> int:
    """Where a tensor of ``nbytes`` must start in the weights file: a page for a block worth mapping or reading
    in place (``pages``: a float32 file), a cache line for the small ones (batch norms, heads, small blocks) and for
    every tensor of a lower-precision file, packed so they cost no page each."""
    return ALIGNMENT if pages and nbytes >= ALIGNMENT else SMALL_ALIGNMENT


def _read_header(fd: int, size: int, path: Path) -> tuple[dict[str, Any], int]:
    """The JSON header (tensor entries only) of a dvn shared weights file, and where its data section starts."""

    def unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        names = [name for name, _ in pairs]
        if len(set(names)) != len(names):
            raise ValueError("a name given twice")
        return dict(pairs)

    try:
        length = int.from_bytes(os.pread(fd, 8, 0), "little")
        if not 2 <= length <= size - 8:
            raise ValueError("header length out of range")
        header = json.loads(os.pread(fd, length, 8), object_pairs_hook=unique)
        meta = json.loads(header.pop("__metadata__", {}).get("dvn", "{}"))
    except (OSError, ValueError, AttributeError, TypeError, RecursionError) as exc:
        raise WrongFileFormat(f"{path} is not a dvn shared weights file ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != WEIGHTS_FORMAT:
        raise WrongFileFormat(f"{path} is not a dvn shared weights file (no '{WEIGHTS_FORMAT}' metadata)")
    return header, 8 + length


def _entry_of(path: Path, name: str, entry: Any) -> tuple[int, int, np.dtype, tuple[int, ...]]:
    """(begin, end, dtype, shape) of one header entry, refusing wrong types and a length its shape contradicts."""
    try:
        dtype = np.dtype(_NUMPY_DTYPES[entry["dtype"]])
        shape, offsets = entry["shape"], entry["data_offsets"]
        numbers = [*shape, *offsets]
        if len(offsets) != 2 or not all(type(n) is int and n >= 0 for n in numbers):
            raise ValueError
    except (KeyError, TypeError, ValueError):
        raise WrongFileFormat(
            f"{path} has an invalid tensor index ({name}: an unknown dtype, or a shape or offsets that are not "
            "whole numbers >= 0); export again"
        ) from None
    begin, end = offsets
    if end - begin != dtype.itemsize * math.prod(shape):
        raise WrongFileFormat(
            f"{path} has an invalid tensor index ({name}: {end - begin} bytes for a shape of "
            f"{math.prod(shape)} {dtype.name} values); export again"
        )
    return begin, end, dtype, tuple(shape)


def _stamp(fd: int) -> tuple[int, ...]:
    """Identity of an open file's content: inode, size, mtime (not ctime: a rename over the file changes that)."""
    st = os.fstat(fd)
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


class WeightsFile:
    """The checked weights file, held open; each tensor is copied out of it into private memory on first use.

    Not a memory map: a file truncated or overwritten under a mapping kills the process with SIGBUS when a page is
    touched (docs/design.md §5). Reading through the descriptor opened before the sha256 was checked never does: a
    file replaced by rename leaves this descriptor on the checked copy, and a file changed in place changes its
    stamp (or reads short), which is refused in one line. Only the tensors of sessions made are ever read.
    """

    def __init__(self, path: Path, entry: Mapping[str, Any], verify: bool, pages: bool = True) -> None:
        self.path = path
        if not path.is_file():
            raise MissingData(f"weights file {path} not found; the manifest lists it")
        self.fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO swapped in since is_file would block a read
        weakref.finalize(self, os.close, self.fd)
        self.stamp = _stamp(self.fd)
        _check_file(path, entry, verify, "weights file", fd=self.fd)
        self.index = _index_of(self.fd, self.stamp[2], path, pages)
        self._check_values()

    def _check_values(self) -> None:
        """Read every tensor once, one at a time and none kept, refusing non-finite numbers and an int8 block's scale
        that is not > 0, as checkpoints and bundles are refused (``fsutil.unusable_tensor``): such a folder would
        answer NaN or nonsense rather than fail."""
        for name, (dtype, _, _) in self.index.items():
            if dtype.kind != "f":
                continue
            values = self.read(name)
            if not np.isfinite(values).all():
                raise unusable_tensor(self.path, name)
            quantized = name.endswith(SCALE_SUFFIX) and self.index.get(name.removesuffix(SCALE_SUFFIX), (None,))[0]
            if quantized == np.int8 and not (values > 0).all():
                raise unusable_tensor(self.path, name, "an int8 scale that is not > 0")

    def read(self, name: str, rows: tuple[int, int] | None = None) -> np.ndarray:
        """Tensor ``name`` (or its ``rows`` ``begin:end``) as a read-only array of its own (not a view of the file)."""
        dtype, shape, offset = self.index[name]
        if rows is not None:
            row_bytes = dtype.itemsize * math.prod(shape[1:])
            offset, shape = offset + rows[0] * row_bytes, (rows[1] - rows[0], *shape[1:])
        count = dtype.itemsize * math.prod(shape)
        # 64-byte aligned, as onnxruntime's kernels want the buffers they are given (a bytes object's data is not:
        # the same graphs ran at 0.8x on buffers at 16 mod 64, docs/results.md §4)
        buffer = np.empty(count + ARRAY_ALIGNMENT, np.uint8)
        start = -buffer.ctypes.data % ARRAY_ALIGNMENT
        data = buffer[start : start + count]
        got = os.preadv(self.fd, [data.data], offset) if count else 0  # data.data: a memoryview of its bytes
        if got != count or _stamp(self.fd) != self.stamp:
            raise WrongFileFormat(
                f"weights file {self.path} changed while in use (it was written after it was checked); "
                "start again to use the new file"
            )
        array = data.view(dtype).reshape(shape)
        array.flags.writeable = False
        return array


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


def _check_file(path: Path, entry: Mapping[str, Any], verify: bool, what: str, fd: int | None = None) -> None:
    """Refuse a missing file, one of another size than the manifest says, or (``verify``) another sha256.

    With ``fd`` (the file opened by the caller) the size and sha256 are those of the open file, which a rename
    cannot swap afterwards.
    """
    if fd is None and not path.is_file():
        raise MissingData(f"{what} {path} not found; the manifest lists it")
    size = os.fstat(fd).st_size if fd is not None else path.stat().st_size
    if size != entry.get("bytes"):
        header = read_safetensors_header(path)  # truncated only when the file's own index says it is longer
        cut = "truncated" if header is not None and (header.declared_size() or 0) > size else "changed"
        raise WrongFileFormat(f"{what} {path} is {cut}: {size} bytes, the manifest says {entry.get('bytes')}")
    if verify and sha256_file(path if fd is None else os.dup(fd)) != entry.get("sha256"):  # sha256_file closes the dup
        raise WrongFileFormat(f"{what} {path} has changed since the export (sha256 differs from the manifest)")


def graph_initializers(entry: Mapping[str, Any]) -> dict[str, tuple[str, int, int] | None]:
    """Initializer name -> None for a whole tensor of the weights file, or ``(tensor, first row, end row)`` for a
    view (format 4: a range of rows of a tensor); the entry's ``tensors`` read only through views are not
    initializers themselves."""
    views = {name: tuple(view) for name, view in entry.get("views", {}).items()}
    viewed = {view[0] for view in views.values()}
    return {**{name: None for name in entry["tensors"] if name not in viewed}, **views}


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
            _check_file(path, entry, verify, "graph")
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

    def held_bytes(self, pairs: Iterable[tuple[str, int]]) -> int:
        """Bytes of the weights file's tensors that ``pairs`` use, a tensor two of them share counted once: what a
        runtime running them holds, at the precision the file stores."""
        index = self.weights.index
        held = rows_held(self.model(task, level) for task, level in pairs)
        spans = {  # a tensor held whole: all of its rows (a 0-d tensor: one)
            n: rows if rows is not None else (0, index[n][1][0] if index[n][1] else 1) for n, rows in held.items()
        }
        return sum(
            index[n][0].itemsize * math.prod(index[n][1][1:]) * (end - begin) for n, (begin, end) in spans.items()
        )

    def graph(self, task: str, level: int) -> Path:
        """The graph file of (task, level), checked to declare exactly its entry's tensors, of the file's shapes."""
        entry = self.model(task, level)
        path = self.folder / entry["file"]
        check_initializers(path, entry, self.weights.index)
        return path
