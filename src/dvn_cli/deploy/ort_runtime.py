"""Run a shared export (``dvn export --shared``) with onnxruntime, every block in memory once; no torch.

``SharedOrtRuntime(folder)`` reads ``manifest.json``, checks the sha256 of the weights file and of every graph
against it, maps ``weights.safetensors`` once (``numpy.memmap``, read-only) and wraps each stored tensor in one
``onnxruntime.OrtValue`` over the mapped bytes (no copy). Sessions are made lazily, one per (task, level), and each
receives the SAME OrtValues through ``SessionOptions.add_initializer``: onnxruntime then uses the caller's buffer
instead of reading the graph's external data, so two sessions that use a block share it.

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
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .. import __version__
from ..errors import BadConfig, DvnError, MissingData, UnknownTask, WrongFileFormat
from ..fsutil import read_safetensors_header, sha256_file

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
        WrongFileFormat: not a dvn shared weights file, a damaged header, or a tensor outside the file.
    """
    path = Path(path)
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            length = int.from_bytes(f.read(8), "little")
            if not 2 <= length <= size - 8:
                raise ValueError("header length out of range")
            header = json.loads(f.read(length))
        meta = json.loads(header.pop("__metadata__", {}).get("dvn", "{}"))
    except (OSError, ValueError, AttributeError, RecursionError) as exc:
        raise WrongFileFormat(f"{path} is not a dvn shared weights file ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != WEIGHTS_FORMAT:
        raise WrongFileFormat(f"{path} is not a dvn shared weights file (no '{WEIGHTS_FORMAT}' metadata)")
    start = 8 + length
    index = {}
    for name, entry in header.items():
        if name.startswith(PAD_PREFIX):
            continue
        try:
            dtype = np.dtype(_NUMPY_DTYPES[entry["dtype"]])
            shape = tuple(int(d) for d in entry["shape"])
            begin, end = (int(o) for o in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise WrongFileFormat(f"{path}: damaged index entry for {name}") from None
        if end - begin != dtype.itemsize * int(np.prod(shape)) or start + end > size:
            raise WrongFileFormat(f"{path}: tensor {name} lies outside the file (truncated?)")
        index[name] = (dtype, shape, start + begin)
    return index


class SharedOrtRuntime:
    """Every (task, level) of a shared export, run by onnxruntime on one memory-mapped copy of the weights.

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
        WrongFileFormat: a manifest that is not a shared export or comes from a newer dvn; a truncated or changed
            file; a graph naming a tensor the weights file lacks.
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
        weights = self.manifest["weights"]
        path = self.folder / str(weights["file"])
        _check_file(path, weights, verify, "weights file")
        index = read_weights_index(path)
        self.models: dict[tuple[str, int], dict[str, Any]] = {}
        for entry in self.manifest["models"]:
            _check_file(self.folder / str(entry["file"]), entry, verify, "graph")
            lacking = [name for name in entry.get("tensors", []) if name not in index]
            if lacking:
                raise WrongFileFormat(
                    f"{self.folder / entry['file']} names {len(lacking)} tensor(s) that {path.name} lacks, "
                    f"e.g. {lacking[0]}; export again"
                )
            self.models[entry["task"], int(entry["level"])] = entry
        self._map = np.memmap(path, dtype=np.uint8, mode="r")  # one mapping, shared by every session
        self.arrays = {
            name: np.ndarray(shape, dtype=dtype, buffer=self._map, offset=offset)
            for name, (dtype, shape, offset) in index.items()
        }
        self._values = {name: self._ort.OrtValue.ortvalue_from_numpy(a) for name, a in self.arrays.items()}
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
            options.add_initializer(name, self._values[name])
        return options

    def session(self, task: str, level: int):
        """The onnxruntime session of (task, level), made on first use."""
        key = (task, level)
        if key not in self._sessions:
            entry = self.model(task, level)
            self._sessions[key] = self._ort.InferenceSession(
                str(self.folder / entry["file"]),
                self.session_options(list(entry.get("tensors", []))),
                providers=self.providers,
                disabled_optimizers=self.disabled_optimizers,
            )
            # a session uses these buffers in place: they live as long as it does, even past this runtime
            self._sessions[key]._dvn_buffers = (self._values, self.arrays, self._map)
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
    return manifest


def _check_file(path: Path, entry: Mapping[str, Any], verify: bool, what: str) -> None:
    """Refuse a missing file, one of another size than the manifest says, or (``verify``) another sha256."""
    if not path.is_file():
        raise MissingData(f"{what} {path} not found; the manifest lists it")
    size = path.stat().st_size
    if size != entry.get("bytes"):
        header = read_safetensors_header(path)  # truncated only when the file's own index says it is longer
        cut = "truncated" if header is not None and (header.declared_size() or 0) > size else "changed"
        raise WrongFileFormat(f"{what} {path} is {cut}: {size} bytes, the manifest says {entry.get('bytes')}")
    if verify and sha256_file(path) != entry.get("sha256"):
        raise WrongFileFormat(f"{what} {path} has changed since the export (sha256 differs from the manifest)")
