"""Run a shared export (``dvn export --shared``) with onnxruntime, every block in memory once; no torch.

``SharedOrtRuntime(folder)`` reads the folder through ``modelfile.shared_folder.SharedFolder``, which checks
every file against the manifest and validates the weights file's index completely before anything runs (the
folder is untrusted input, docs/design.md §5). Sessions are made lazily, one per (task, level); each tensor a
session needs is read once from the weights file (held open since its sha256 was checked) into memory of its own,
wrapped in one ``onnxruntime.OrtValue``, and
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

This module imports only numpy, onnxruntime and dvn's torch-free helpers (``errors``, ``fsutil``,
``modelfile.shared_folder`` and ``shared_weights``), so that a
deployment needs no PyTorch (a test imports it in a fresh process and checks that torch was not loaded).
"""

from __future__ import annotations

import json
import os
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import BadConfig, DvnError, WrongFileFormat
from ..fsutil import first_line
from ..modelfile.shared_folder import SharedFolder, graph_initializers, rows_held
from .engine_cache import EngineCache, open_engine_cache
from .engine_key import CacheUnusable

__all__ = ["CANONICAL_DISABLED_OPTIMIZERS", "SharedOrtRuntime"]

CANONICAL_DISABLED_OPTIMIZERS = (
    "ConstantFolding",
    "ConvBNFusion",
    "ConvAddFusion",
    "ConvMulFusion",
    "NchwcTransformer",
)
"""What a canonical graph (weights read directly, no ``Concat``) runs without: each of these rewrites a constant
weight into a private copy per session, and onnxruntime runs them on the initializers of the GRAPH FILE, before the
buffers given with ``add_initializer`` replace them (measured: with the weights file swapped for zeros after it was
checked, any of them computes from the zeros; ``tests/test_shared_buffers.py``)."""


def _load_ort():
    try:
        import onnxruntime
    except ImportError:
        raise DvnError("the shared runtime needs onnxruntime: pip install 'dvn-cli[export]'") from None
    return onnxruntime


class SharedOrtRuntime:
    """Every (task, level) of a shared export, run by onnxruntime on one private copy of each tensor it uses.

    Args:
        folder: the folder ``dvn export --shared`` wrote (``manifest.json``, ``weights.safetensors``, graphs), or
            that folder already read (``modelfile.shared_folder.SharedFolder``).
        threads: onnxruntime intra-op threads per session (None: onnxruntime's default).
        providers: onnxruntime execution providers (the OrtValues live in CPU memory).
        verify: check the sha256 of every file against the manifest (on by default).
        disabled_optimizers: onnxruntime optimizers left out; None: constant folding, which would copy every
            assembled weight into each session, and for canonical graphs every optimizer that rewrites a weight
            (``CANONICAL_DISABLED_OPTIMIZERS``).
        config: extra session config entries (e.g. ``{"session.disable_prepacking": "1"}``).
        arena: use onnxruntime's CPU memory arena (faster allocation, keeps its peak resident).
        execution_order: an ``onnxruntime.ExecutionOrder`` name; ``PRIORITY_BASED`` assembles each weight just
            before its convolution.
        cache: run a canonical folder from its engine cache (``runtime.engine_cache``: each graph optimised once
            by this onnxruntime, weights in its layout, held once), built on the first open; where there is none
            (another graph mode, other providers, nowhere to write it, no ``onnx`` to build it with) the
            standard graphs run, and ``cache_note`` says why.

    Raises:
        MissingData, WrongFileFormat: what ``SharedFolder`` refuses. Later, when a session is made: a graph that
            is not the one its entry describes, or a weights file changed in place since it was checked.
    """

    def __init__(
        self,
        folder: str | os.PathLike | SharedFolder,
        threads: int | None = None,
        providers: tuple[str, ...] = ("CPUExecutionProvider",),
        verify: bool = True,
        disabled_optimizers: tuple[str, ...] | None = None,
        config: Mapping[str, str] | None = None,
        arena: bool = False,
        execution_order: str = "PRIORITY_BASED",
        cache: bool = True,
    ) -> None:
        self.files = folder if isinstance(folder, SharedFolder) else SharedFolder(folder, verify)
        self.folder, self.manifest, self.models = self.files.folder, self.files.manifest, self.files.models
        self._ort = _load_ort()
        self.threads, self.providers = threads, list(providers)
        if disabled_optimizers is None:
            canonical = self.manifest.get("graph_mode") == "canonical"
            disabled_optimizers = CANONICAL_DISABLED_OPTIMIZERS if canonical else ("ConstantFolding",)
        self.disabled_optimizers, self.config = list(disabled_optimizers), dict(config or {})
        self.arena, self.execution_order = arena, execution_order
        self.engine: EngineCache | None = None
        self.cache_note: str | None = None
        if cache and self.providers == ["CPUExecutionProvider"]:
            try:
                self.engine = open_engine_cache(self.files, self._ort)
            except CacheUnusable as exc:
                self.cache_note = str(exc)
        elif cache:
            self.cache_note = "the engine cache is for the CPU provider only"
        self._weights = self.files.weights if self.engine is None else self.engine.weights
        self._shapes = (
            {}
            if self.engine is None
            else {name: shape for entry in self.engine.entries.values() for name, shape in entry["shapes"].items()}
        )
        self.arrays: dict[str, np.ndarray] = {}  # filled as sessions are made: only what runs is held
        self._rows: dict[str, tuple[int, int] | None] = {}  # tensor -> the rows ``arrays`` holds (None: all)
        self._values: dict[str, Any] = {}
        self._sessions: dict[tuple[str, int], Any] = {}

    def pairs(self) -> list[tuple[str, int]]:
        """Every (task, level) of the export, in manifest order."""
        return list(self.models)

    def model(self, task: str, level: int) -> Mapping[str, Any]:
        """The manifest entry of (task, level): classes, preprocess, units, cost, file."""
        return self.files.model(task, level)

    def session_options(self, names: list[str] | Mapping[str, tuple[str, int, int] | None]):
        """Session options that take the shared OrtValues of ``names`` (initializer names, or
        ``shared_folder.graph_initializers`` of an entry: views included) instead of reading them from the file."""
        views = names if isinstance(names, Mapping) else dict.fromkeys(names)
        options = self._ort.SessionOptions()
        if self.threads is not None:
            options.intra_op_num_threads = self.threads
        for key, value in self.config.items():
            options.add_session_config_entry(key, value)
        options.enable_cpu_mem_arena = self.arena
        options.execution_order = getattr(self._ort.ExecutionOrder, self.execution_order)
        if self.manifest.get("graph_mode") == "blockwise":  # NCHWc (level ALL) would copy every block
            options.graph_optimization_level = self._ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        for name, view in views.items():
            options.add_initializer(name, self._value(name, view))
        return options

    def _value(self, name: str, view: tuple[str, int, int] | None = None):
        """The one OrtValue of initializer ``name``, shared by every session: a tensor read from the weights file on
        first use, or (``view``) rows ``view[1]:view[2]`` of tensor ``view[0]``, the same memory."""
        if name not in self._values:
            tensor = name if view is None else view[0]
            if tensor not in self.arrays:
                self._hold({tensor: None if view is None else view[1:]})
            held = self._rows[tensor]
            array = self.arrays[tensor]
            if view is not None:
                first = 0 if held is None else held[0]
                array = array[view[1] - first : view[2] - first]
            if name in self._shapes:  # an engine cache's tensor: a range of a 1-D piece
                array = array.reshape(self._shapes[name])
            self._values[name] = self._ort.OrtValue.ortvalue_from_numpy(array)
        return self._values[name]

    def _hold(self, needed: Mapping[str, tuple[int, int] | None], exact: bool = False) -> None:
        """Hold the rows ``needed`` of each tensor (``shared_folder.rows_held``; None: all of it). A tensor whose
        held rows do not cover them (or, ``exact``, are more than them) is read again as the rows needed (with
        what it held, unless ``exact``), and the OrtValues and sessions over its old array are dropped (sessions are
        made again when next run): so a tensor is held once, as the rows the running levels read."""
        for tensor, rows in needed.items():
            holding = tensor in self._rows
            held = self._rows.get(tensor)  # None: all of it (when holding)
            if holding and (held == rows or held is None and not exact):
                continue
            if rows is not None and held is not None and not exact:
                if held[0] <= rows[0] and rows[1] <= held[1]:
                    continue
                rows = (min(rows[0], held[0]), max(rows[1], held[1]))
            if holding:
                self._forget(tensor)
            self.arrays[tensor], self._rows[tensor] = self._weights.read(tensor, rows), rows

    def _forget(self, tensor: str) -> None:
        """Drop the array of ``tensor``, every OrtValue over it and every session using it."""
        for key in [key for key in self._sessions if tensor in self._entry(*key)["tensors"]]:
            del self._sessions[key]
        for name in list(self._values):
            if name == tensor or self._view_of(name) == tensor:
                del self._values[name]
        del self.arrays[tensor], self._rows[tensor]

    def _view_of(self, name: str) -> str | None:
        """The tensor an initializer name is a view of, from any entry (views are named after their tensor)."""
        for key in self.models:
            view = self._entry(*key).get("views", {}).get(name)
            if view is not None:
                return view[0]
        return None

    def _entry(self, task: str, level: int) -> Mapping[str, Any]:
        """What the session of (task, level) reads: its ``tensors`` and ``views`` of the weights file in use (the
        engine cache's, else the folder's)."""
        return self.model(task, level) if self.engine is None else self.engine.entries[task, level]

    def session(self, task: str, level: int):
        """The onnxruntime session of (task, level), made on first use."""
        key = (task, level)
        if key not in self._sessions:
            entry = self._entry(task, level)
            # the folder's graph is checked (read and parsed) only where it runs: not with an engine cache
            path = self.folder / self.model(task, level)["file"] if self.engine else self.files.graph(task, level)
            before = set(self._sessions)
            self._hold(rows_held([entry]))  # may read a tensor again, larger, and drop the sessions over it
            options = self.session_options(graph_initializers(entry))
            try:
                if self.engine is not None:  # optimised once already: nothing to rewrite, nothing copied
                    options.graph_optimization_level = self._ort.GraphOptimizationLevel.ORT_DISABLE_ALL
                    # where the graph's external data would be: each is given (add_initializer), none is read
                    folder = "session.model_external_initializers_file_folder_path"
                    options.add_session_config_entry(folder, str(self.engine.path))
                    session = self._ort.InferenceSession(
                        self.engine.graph(task, level), options, providers=self.providers
                    )
                else:
                    session = self._ort.InferenceSession(
                        str(path), options, providers=self.providers, disabled_optimizers=self.disabled_optimizers
                    )
            except DvnError:
                raise
            except Exception as exc:  # onnxruntime raises its own types for graphs it cannot load
                raise WrongFileFormat(f"graph {path} cannot be loaded: {first_line(exc)}") from None
            _check_graph(path, session, self.model(task, level))
            # a session uses its tensors' buffers in place: they live as long as it does, even past this runtime
            # or a ``keep`` that releases them here
            session._dvn_buffers = [self._values[n] for n in graph_initializers(entry)]
            session._dvn_buffers += [self.arrays[n] for n in entry["tensors"]]
            self._sessions[key] = session
            for pair in before - set(self._sessions):  # made again over the larger arrays: each tensor held once
                self.session(*pair)
        return self._sessions[key]

    def keep(self, pairs: Collection[tuple[str, int]]) -> None:
        """Release the sessions of every (task, level) but ``pairs``, and each tensor no kept session uses, so that
        the memory held follows the levels running (a switch down gives the larger levels' blocks back); a tensor
        the kept sessions read fewer rows of is read again as those rows, and those sessions made again."""
        kept = set(pairs)
        self._sessions = {key: session for key, session in self._sessions.items() if key in kept}
        kept_before = list(self._sessions)
        entries = [self._entry(task, level) for task, level in self._sessions]
        needed = rows_held(entries)
        for name in set(self.arrays) - set(needed):
            self._forget(name)
        self._hold({name: rows for name, rows in needed.items() if name in self.arrays}, exact=True)
        used = {name for entry in entries for name in graph_initializers(entry)}
        for name in set(self._values) - used:
            del self._values[name]
        for key in [key for key in kept_before if key not in self._sessions]:  # over tensors read again, smaller
            self.session(*key)

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
