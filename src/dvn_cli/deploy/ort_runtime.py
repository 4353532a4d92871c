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
``modelfile.shared_folder``), so that a
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
from ..modelfile.shared_folder import SharedFolder

__all__ = ["SharedOrtRuntime"]


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
        disabled_optimizers: onnxruntime optimizers left out; the default leaves out constant folding, which
            would copy every assembled weight into each session.
        config: extra session config entries (e.g. ``{"session.disable_prepacking": "1"}``).
        arena: use onnxruntime's CPU memory arena (faster allocation, keeps its peak resident).
        execution_order: an ``onnxruntime.ExecutionOrder`` name; ``PRIORITY_BASED`` assembles each weight just
            before its convolution.

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
        disabled_optimizers: tuple[str, ...] = ("ConstantFolding",),
        config: Mapping[str, str] | None = None,
        arena: bool = False,
        execution_order: str = "PRIORITY_BASED",
    ) -> None:
        self.files = folder if isinstance(folder, SharedFolder) else SharedFolder(folder, verify)
        self.folder, self.manifest, self.models = self.files.folder, self.files.manifest, self.files.models
        self._ort = _load_ort()
        self.threads, self.providers = threads, list(providers)
        self.disabled_optimizers, self.config = list(disabled_optimizers), dict(config or {})
        self.arena, self.execution_order = arena, execution_order
        self.arrays: dict[str, np.ndarray] = {}  # filled as sessions are made: only what runs is held
        self._values: dict[str, Any] = {}
        self._sessions: dict[tuple[str, int], Any] = {}

    def pairs(self) -> list[tuple[str, int]]:
        """Every (task, level) of the export, in manifest order."""
        return list(self.models)

    def model(self, task: str, level: int) -> Mapping[str, Any]:
        """The manifest entry of (task, level): classes, preprocess, units, cost, file."""
        return self.files.model(task, level)

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
            self.arrays[name] = self.files.weights.read(name)
            self._values[name] = self._ort.OrtValue.ortvalue_from_numpy(self.arrays[name])
        return self._values[name]

    def session(self, task: str, level: int):
        """The onnxruntime session of (task, level), made on first use."""
        key = (task, level)
        if key not in self._sessions:
            entry, path = self.model(task, level), self.files.graph(task, level)
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
            # a session uses its tensors' buffers in place: they live as long as it does, even past this runtime
            # or a ``keep`` that releases them here
            session._dvn_buffers = [(self._values[n], self.arrays[n]) for n in entry["tensors"]]
            self._sessions[key] = session
        return self._sessions[key]

    def keep(self, pairs: Collection[tuple[str, int]]) -> None:
        """Release the sessions of every (task, level) but ``pairs``, and each tensor no kept session uses, so that
        the memory held follows the levels running (a switch down gives the larger levels' blocks back)."""
        kept = set(pairs)
        self._sessions = {key: session for key, session in self._sessions.items() if key in kept}
        used = {name for task, level in self._sessions for name in self.model(task, level)["tensors"]}
        for name in set(self._values) - used:
            del self._values[name], self.arrays[name]

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
