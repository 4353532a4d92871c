"""Run a shared export (``dvn export --shared``) with onnxruntime, every block in memory once; no torch.

``SharedOrtRuntime(folder)`` reads ``manifest.json``, checks the sha256 of the weights file and of every graph
against it and validates the weights file's index completely; the folder is untrusted input (docs/design.md §5).
Sessions are made lazily, one per (task, level); each tensor a session needs is read once from the weights file
(held open since its sha256 was checked) into memory of its own, wrapped in one ``onnxruntime.OrtValue``, and
every session receives the SAME OrtValues through ``SessionOptions.add_initializer``: onnxruntime then uses the
caller's buffer instead of reading the graph's external data, so two sessions that use a block share it. Not a
memory map: a mapped file truncated or overwritten under the process kills it with SIGBUS.

Session settings, each measured in docs/results_memory_onnx.md (resident memory of two sessions in fresh
processes): onnxruntime's constant folding would evaluate each graph's ``Concat`` of blocks once and keep the
result, a private copy of every weight per session, so it is the one optimizer switched off
(``disabled_optimizers=["ConstantFolding"]``); weight pre-packing then finds no constant weight to pack and
switching it off changes nothing, so it stays on. Two settings only bound the transient buffers that hold an
assembled weight while its convolution runs: ``ExecutionOrder.PRIORITY_BASED`` runs each ``Concat`` just before
its convolution (the default order runs them all first, so every assembled weight of a graph is alive at once),
and the CPU memory arena is off (an arena keeps its peak for good). For ``blockwise`` graphs, whose blocks feed
convolutions directly, the optimization level is ``EXTENDED``: ``ALL`` adds the NCHWc layout transform, which
copies every block into its own layout per session.

This module imports only numpy, onnxruntime and dvn's torch-free helpers (``errors``, ``fsutil``), so that a
deployment needs no PyTorch (a test imports it in a fresh process and checks that torch was not loaded).
"""

from __future__ import annotations

import json
import math
import os
import weakref
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .. import __version__
from ..errors import BadConfig, DvnError, MissingData, UnknownTask, WrongFileFormat
from ..fsutil import first_line, read_safetensors_header, sha256_file

__all__ = [
    "ALIGNMENT",
    "SHARED_FORMAT_VERSION",
    "WEIGHTS_NAME",
    "SharedOrtRuntime",
    "read_weights_index",
]

WEIGHTS_NAME = "weights.safetensors"
WEIGHTS_FORMAT = "dvn-shared-weights"
SHARED_LAYOUT = "shared"
SHARED_FORMAT_VERSION = 1
ALIGNMENT = 4096
"""Every tensor of the weights file starts at a multiple of this many bytes (a memory page)."""
PAD_PREFIX = "__pad__."
MANIFEST_NAME = "manifest.json"
_NUMPY_DTYPES = {"F32": np.float32, "F16": np.float16, "U8": np.uint8}


def _load_ort():
    try:
        import onnxruntime
    except ImportError:
        raise DvnError("the shared runtime needs onnxruntime: pip install 'dvn-cli[export]'") from None
    return onnxruntime


def read_weights_index(path: str | os.PathLike) -> dict[str, tuple[np.dtype, tuple[int, ...], int]]:
    """Name -> (dtype, shape, absolute byte offset) of every tensor (padding left out) of a shared weights file.

    Raises:
        WrongFileFormat: not a dvn shared weights file, a damaged header, or an invalid index (see ``_index_of``).
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        return _index_of(fd, os.fstat(fd).st_size, Path(path))
    finally:
        os.close(fd)


def _index_of(fd: int, size: int, path: Path) -> dict[str, tuple[np.dtype, tuple[int, ...], int]]:
    """The index of the open weights file ``fd``, validated completely before any tensor is read.

    The header is untrusted input (anyone can edit it and put the new sha256 into the manifest): every tensor,
    padding included, must be a known dtype whose ``shape`` gives exactly its byte length, and in the order the
    header lists them (the order the writer wrote them) the tensors must tile the data section from its first byte
    to the end of the file, so that none is negative, out of order, overlapping or outside the file; every tensor
    but padding starts at a multiple of ``ALIGNMENT`` from the start of the file.
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
            if (start + begin) % ALIGNMENT:
                raise WrongFileFormat(
                    f"{path} has an invalid tensor index ({name} does not start on a {ALIGNMENT}-byte boundary); "
                    "export again"
                )
            index[name] = (dtype, shape, start + begin)
        position = end
    if start + position != size:
        raise WrongFileFormat(
            f"{path} has an invalid tensor index (its tensors end at byte {start + position} of {size}); export again"
        )
    return index


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


class _WeightsFile:
    """The checked weights file, held open; each tensor is copied out of it into private memory on first use.

    Not a memory map: a file truncated or overwritten under a mapping kills the process with SIGBUS when a page is
    touched (docs/design.md §5). Reading through the descriptor opened before the sha256 was checked never does: a
    file replaced by rename leaves this descriptor on the checked copy, and a file changed in place changes its
    stamp (or reads short), which is refused in one line. Only the tensors of sessions made are ever read.
    """

    def __init__(self, path: Path, entry: Mapping[str, Any], verify: bool) -> None:
        self.path = path
        if not path.is_file():
            raise MissingData(f"weights file {path} not found; the manifest lists it")
        self.fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO swapped in since is_file would block a read
        weakref.finalize(self, os.close, self.fd)
        self.stamp = _stamp(self.fd)
        _check_file(path, entry, verify, "weights file", fd=self.fd)
        self.index = _index_of(self.fd, self.stamp[2], path)

    def read(self, name: str) -> np.ndarray:
        """Tensor ``name`` as a read-only array of its own (not a view of the file)."""
        dtype, shape, offset = self.index[name]
        count = dtype.itemsize * math.prod(shape)
        data = os.pread(self.fd, count, offset)
        if len(data) != count or _stamp(self.fd) != self.stamp:
            raise WrongFileFormat(
                f"weights file {self.path} changed while in use (it was written after it was checked); "
                "start again to use the new file"
            )
        return np.frombuffer(data, dtype=dtype).reshape(shape)


class SharedOrtRuntime:
    """Every (task, level) of a shared export, run by onnxruntime on one private copy of each tensor it uses.

    Args:
        folder: the folder ``dvn export --shared`` wrote (``manifest.json``, ``weights.safetensors``, graphs).
        threads: onnxruntime intra-op threads per session (None: onnxruntime's default).
        providers: onnxruntime execution providers (the OrtValues live in CPU memory).
        verify: check the sha256 of every file against the manifest (on by default).
        disabled_optimizers: onnxruntime optimizers left out; the default leaves out constant folding, which
            would copy every assembled weight into each session.
        config: extra session config entries (e.g. ``{"session.disable_prepacking": "1"}``).
        arena: use onnxruntime's CPU memory arena (faster allocation, keeps its peak resident).
        execution_order: an ``onnxruntime.ExecutionOrder`` name; ``PRIORITY_BASED`` assembles each weight just
            before its convolution.

    Raises:
        MissingData: no manifest, weights file or graph where the manifest says.
        WrongFileFormat: a manifest that is not a shared export or comes from a newer dvn, names a file outside the
            folder or is damaged; a truncated or changed file; an invalid weights index; a graph naming a tensor
            the weights file lacks. Later, when a session is made: a graph that is not the one its entry describes,
            or a weights file changed in place since it was checked.
    """

    def __init__(
        self,
        folder: str | os.PathLike,
        threads: int | None = None,
        providers: tuple[str, ...] = ("CPUExecutionProvider",),
        verify: bool = True,
        disabled_optimizers: tuple[str, ...] = ("ConstantFolding",),
        config: Mapping[str, str] | None = None,
        arena: bool = False,
        execution_order: str = "PRIORITY_BASED",
    ) -> None:
        self.folder = Path(folder)
        self._ort = _load_ort()
        self.manifest = _read_manifest(self.folder)
        self.threads, self.providers = threads, list(providers)
        self.disabled_optimizers, self.config = list(disabled_optimizers), dict(config or {})
        self.arena, self.execution_order = arena, execution_order
        self._weights = _WeightsFile(
            _inside(self.folder, self.manifest["weights"], "weights file"), self.manifest["weights"], verify
        )
        self.models: dict[tuple[str, int], dict[str, Any]] = {}
        for entry in self.manifest["models"]:
            path = _inside(self.folder, entry, "graph")
            _check_file(path, entry, verify, "graph")
            lacking = [name for name in entry["tensors"] if name not in self._weights.index]
            if lacking:
                raise WrongFileFormat(
                    f"{path} names {len(lacking)} tensor(s) that {self._weights.path.name} lacks, "
                    f"e.g. {lacking[0]}; export again"
                )
            self.models[entry["task"], entry["level"]] = entry
        self.arrays: dict[str, np.ndarray] = {}  # filled as sessions are made: only what runs is held
        self._values: dict[str, Any] = {}
        self._sessions: dict[tuple[str, int], Any] = {}

    def pairs(self) -> list[tuple[str, int]]:
        """Every (task, level) of the export, in manifest order."""
        return list(self.models)

    def model(self, task: str, level: int) -> Mapping[str, Any]:
        """The manifest entry of (task, level): classes, preprocess, units, cost, file."""
        if (task, level) not in self.models:
            held = ", ".join(f"{t} level {lv}" for t, lv in self.models)
            raise UnknownTask(f"{self.folder} holds no {task} level {level}; it holds {held}")
        return self.models[task, level]

    def session_options(self, names: list[str]):
        """Session options that take the shared OrtValues of ``names`` instead of reading them from the file."""
        options = self._ort.SessionOptions()
        if self.threads is not None:
            options.intra_op_num_threads = self.threads
        for key, value in self.config.items():
            options.add_session_config_entry(key, value)
        options.enable_cpu_mem_arena = self.arena
        options.execution_order = getattr(self._ort.ExecutionOrder, self.execution_order)
        if self.manifest.get("graph_mode") == "blockwise":  # NCHWc (level ALL) would copy every block
            options.graph_optimization_level = self._ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        for name in names:
            options.add_initializer(name, self._value(name))
        return options

    def _value(self, name: str):
        """The one OrtValue of tensor ``name``, read from the weights file on first use and shared by every session."""
        if name not in self._values:
            self.arrays[name] = self._weights.read(name)
            self._values[name] = self._ort.OrtValue.ortvalue_from_numpy(self.arrays[name])
        return self._values[name]

    def session(self, task: str, level: int):
        """The onnxruntime session of (task, level), made on first use."""
        key = (task, level)
        if key not in self._sessions:
            entry = self.model(task, level)
            path = self.folder / entry["file"]
            _check_initializers(path, entry, self._weights.index)
            try:
                session = self._ort.InferenceSession(
                    str(path),
                    self.session_options(entry["tensors"]),
                    providers=self.providers,
                    disabled_optimizers=self.disabled_optimizers,
                )
            except DvnError:
                raise
            except Exception as exc:  # onnxruntime raises its own types for graphs it cannot load
                raise WrongFileFormat(f"graph {path} cannot be loaded: {first_line(exc)}") from None
            _check_graph(path, session, entry)
            # a session uses these buffers in place: they live as long as it does, even past this runtime
            session._dvn_buffers = (self._values, self.arrays)
            self._sessions[key] = session
        return self._sessions[key]

    def run(self, task: str, level: int, batch: np.ndarray) -> np.ndarray:
        """Logits ``(B, classes)`` of (task, level) for a preprocessed float32 batch ``(B, C, H, W)``."""
        entry = self.model(task, level)
        x = np.ascontiguousarray(batch, dtype=np.float32)
        pre = entry["preprocess"]
        expected = (pre["channels"], pre["height"], pre["width"])
        if x.ndim != 4 or tuple(x.shape[1:]) != expected:
            raise BadConfig(
                f"input of shape {tuple(x.shape)} does not match the (B, C, H, W) of {task} level {level}: "
                f"(B, {', '.join(map(str, expected))})"
            )
        (logits,) = self.session(task, level).run([entry["output"]], {entry["input"]: x})
        return logits


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
    names = entry["tensors"]
    twice = next((name for j, name in enumerate(names) if name in names[:j]), None)
    if twice is not None:
        raise WrongFileFormat(
            f"{path} lists tensor {twice} twice for {entry['task']} level {entry['level']} (models[{i}]); export again"
        )


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


def _check_graph(path: Path, session: Any, entry: Mapping[str, Any]) -> None:
    """Refuse a graph that is not the one its manifest entry describes: its ports, or the task, level, classes and
    preprocessing the export stamped into it (``export.stamp_onnx``), differ from the entry's."""
    inputs = {port.name: port.shape for port in session.get_inputs()}
    outputs = {port.name for port in session.get_outputs()}
    pre = entry["preprocess"]
    expected = [pre["channels"], pre["height"], pre["width"]]
    if entry["input"] not in inputs or entry["output"] not in outputs or list(inputs[entry["input"]][1:]) != expected:
        raise WrongFileFormat(
            f"graph {path} does not match its manifest entry (input {entry['input']!r} of shape (B, "
            f"{', '.join(map(str, expected))}), output {entry['output']!r}); export again"
        )
    stamp = session.get_modelmeta().custom_metadata_map
    try:
        stamped = (
            stamp["dvn_task"],
            stamp["dvn_level"],
            json.loads(stamp["dvn_classes"]),
            json.loads(stamp["dvn_preprocess"]),
        )
    except (KeyError, ValueError, RecursionError):
        stamped = None
    if stamped != (entry["task"], str(entry["level"]), entry.get("classes"), pre):
        raise WrongFileFormat(
            f"graph {path} is not the graph of {entry['task']} level {entry['level']} its manifest entry describes "
            "(task, level, classes or preprocessing differ); export again"
        )


def _check_initializers(path: Path, entry: Mapping[str, Any], index: Mapping[str, tuple]) -> None:
    """Refuse a graph whose initializers are not the weights file's tensors its entry names, of the same shapes.

    onnxruntime takes a buffer given with ``add_initializer`` whatever its shape (a wrong one fails at run time,
    or broadcasts to a wrong result), and it reads an external initializer that is not given from the file itself.
    """
    try:
        declared = _graph_initializers(path.read_bytes())
    except (OSError, ValueError, IndexError, TypeError, AttributeError) as exc:
        raise WrongFileFormat(f"graph {path} is not an ONNX model dvn can read ({first_line(exc)})") from None
    names = set(entry["tensors"])
    wrong = [n for n in entry["tensors"] if declared.get(n, (None,))[0] != index[n][1]]
    wrong += [n for n, (_, external) in declared.items() if external and n not in names]
    if wrong:
        raise WrongFileFormat(
            f"graph {path} and the weights file disagree on tensor {wrong[0]} (its shape, or it is not listed in "
            "the manifest); export again"
        )


def _graph_initializers(model: bytes) -> dict[str, tuple[tuple[int, ...], bool]]:
    """Name -> (dims, stored externally) of every initializer of an ONNX model's main graph, read from its protobuf
    encoding (``ModelProto.graph`` = 7, ``GraphProto.initializer`` = 5, ``TensorProto`` dims = 1, name = 8,
    data_location = 14) so that the runtime needs no ``onnx`` package."""
    graph = b"".join(value for field, value in _fields(model) if field == 7)  # a repeated message merges
    found = {}
    for field, tensor in _fields(graph):
        if field != 5:
            continue
        dims, name, external = [], "", False
        for key, value in _fields(tensor):
            if key == 1:
                dims += [value] if isinstance(value, int) else _varints(value)
            elif key == 8:
                name = value.decode()
            elif key == 14:
                external = value == 1
        found[name] = (tuple(dims), external)
    return found


def _fields(data: bytes):
    """(field number, value) of each field of one protobuf message: an int for a varint, bytes for a
    length-delimited field, None for a fixed-width one."""
    i = 0
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
