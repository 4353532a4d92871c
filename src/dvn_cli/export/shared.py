"""A shared deploy format: every unit block stored once in one weights file, one small ONNX graph per (task, level).

The per-pair export (``export.pairs.export_models``) writes one self-contained ONNX file per (task, level) with batch
norm folded: two pairs of the same task or of overlapping units hold the same physical weights twice. This export
keeps what a DVN shares shared at inference (docs/design.md §5, "Shared export"):

- ``weights.safetensors``: every unit-pair block ``W[out(u_o), in(u_i)]`` of the chosen pairs once (the stem's row
  blocks ``W[out(u_o), :]``), each (task, level)'s private batch norm as a per-channel ``scale`` and ``shift``
  (eval-mode batch norm cannot be folded into a block that other pairs share), and each task's head as per-unit
  column blocks plus its bias. Every tensor of a page (4096 bytes) or more starts on a page boundary, so that a
  block can be mapped or read in place; the smaller ones (batch norms, heads, blocks of narrow layers) are packed
  on 64-byte boundaries into the gaps those boundaries leave (``_placements``), so that they cost no page each
  (``--precision fp16`` or ``int8``: every block is such a small one, format 3, ``export.precision``). The
  file is valid safetensors (its header is the JSON index name -> dtype, shape, offsets, in file order); the gaps
  are filled by ``__pad__.<n>`` uint8 tensors, because safetensors allows no holes.
- ``<task>-level<l>.onnx``: the graph of one (task, level). Its weights are initializers whose data is EXTERNAL:
  they name a range of ``weights.safetensors``. Each convolution's weight is assembled from its blocks with
  ``Concat`` at run time (``export.block_graphs``), or, when every pair's units are a contiguous run, read as
  rows of the layer's weight with no ``Concat`` (``export.canonical``).
- ``manifest.json``: ``"layout": "shared"``, the format version, the weights file's sha256, and per graph the
  usual entry of the per-pair manifest plus ``tensors``, the names it takes from the weights file, and ``spec``, the
  compact spec of the pair (backbone, task, units, cost), so that the folder opens as a model file
  (``modelfile.shared.SharedExport``: ``dvn predict``, ``eval`` and ``info`` take it).

``export_shared`` writes the folder: the graphs traced from those modules with their initializers pointed at the
weights file, the weights file at ``--precision``, the manifest, all staged and swapped in by ``export.folder``,
each graph checked against PyTorch by ``runtime.ort.SharedOrtRuntime`` (numpy + onnxruntime, no torch), which
reads each block once and hands the same ``OrtValue`` of it to every session, so no block is copied per session.
Plain onnxruntime can also open a graph on its own (it reads the external data itself), without the sharing.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..core.sizes import check_precision
from ..errors import BadConfig
from ..fsutil import sha256_file, write_atomic
from ..modelfile.base import ModelFile
from ..modelfile.registry import open_model
from ..modelfile.shared_folder import PACKED_FORMAT_VERSION, SHARED_LAYOUT
from ..modelfile.shared_weights import ALIGNMENT, SMALL_ALIGNMENT, WEIGHTS_FORMAT, WEIGHTS_NAME, write_weights_file
from ..modelfile.spec import CompactSpec
from ..runtime.ort import SharedOrtRuntime
from .block_graphs import BlockLayout, split_inputs
from .canonical import CANONICAL_MODE, CanonicalLayout, unit_runs
from .folder import (
    LogitCheck,
    WrittenManifest,
    build_manifest,
    model_entry,
    pair_file_name,
    requested_pairs,
    source_entry,
    staged_export,
)
from .pairs import (
    Inputs,
    compare_logits,
    import_optional,
    non_finite_stops_export,
    stamp_onnx,
    task_inputs,
    trace_onnx,
)
from .precision import lower_graph, lower_tensors

__all__ = ["GRAPH_MODES", "SHARED_MODEL_FORMAT", "export_shared"]

SHARED_MODEL_FORMAT = "onnx-shared"
GRAPH_MODES = (CANONICAL_MODE, "concat", "blockwise")
"""How a graph reads a layer: in canonical unit order with no weight assembled (``export.canonical``: the
default at fp32 when every pair's units are a contiguous run), from its blocks with one Concat then one op (the
default otherwise), or one op per block, summed."""

CANONICAL_FORMAT_VERSION = 4
"""The shared format of a canonical export (``export.canonical``): graph initializers that are ranges of
the weights file's tensors (``views`` in the manifest entries), which a dvn reading format 3 would not give."""


def _graph_bytes(
    module: nn.Module,
    plain: nn.Module,
    spec: CompactSpec,
    keys: Mapping[str, str],
    stored: Mapping[str, np.ndarray],
    offsets: Mapping[str, int],
    opset: int,
    lowered: tuple[set[str], str] = (set(), "fp32"),
    inline: Mapping[str, np.ndarray] | None = None,
) -> tuple[bytes, list[str]]:
    """ONNX bytes of one (task, level) whose weights are external ranges of the weights file; and their names.

    ``stored`` holds the weights file's tensors as written; ``lowered`` = (the blocks stored at lower precision,
    that precision): each is converted back to float32 in the graph (``precision.lower_graph``); ``inline``:
    constants that are not parameters, stored in the graph itself.
    """
    onnx = import_optional("onnx")
    # The exporter merges initializers of equal value (e.g. the batch norms of an untrained network), which would
    # lose block names. The values written here are dropped below (the data is the weights file's), so every
    # parameter gets distinct noise for the export; the weights file's arrays are not touched.
    generator = torch.Generator().manual_seed(0)
    for param in module.parameters():
        param.data = torch.rand(param.shape, generator=generator)
    # no constant folding: it would bake the Concat of shared blocks into a private copy
    model = onnx.load_from_string(trace_onnx(module, plain.config, opset, constant_folding=False))
    for init in model.graph.initializer:
        init.name = keys.get(init.name, init.name)
    missing = set(keys.values()) - {init.name for init in model.graph.initializer}
    if missing:  # the exporter renamed or merged a parameter: a dvn bug, not a user error
        raise RuntimeError(f"the ONNX exporter lost the names of {len(missing)} blocks, e.g. {sorted(missing)[0]}")
    for node in model.graph.node:  # inputs renamed above
        node.input[:] = [keys.get(name, name) for name in node.input]
    blocks, precision = lowered
    lower_graph(model.graph, stored, blocks & set(keys.values()), precision)
    used = []
    for init in model.graph.initializer:
        if inline and init.name in inline:
            init.CopyFrom(onnx.numpy_helper.from_array(inline[init.name], init.name))
        if init.name not in stored:
            continue
        init.ClearField("raw_data")
        init.data_location = onnx.TensorProto.EXTERNAL
        size = stored[init.name].nbytes
        for field, value in (("location", WEIGHTS_NAME), ("offset", offsets[init.name]), ("length", size)):
            entry = init.external_data.add()
            entry.key, entry.value = field, str(value)
        used.append(init.name)
    stamp_onnx(model, spec, "dvn shared", dvn_weights=WEIGHTS_NAME)
    return model.SerializeToString(), sorted(used)


def _check_pair(
    runtime: SharedOrtRuntime, task: str, level: int, plain: nn.Module, inputs: Inputs, label: str
) -> LogitCheck:
    def run(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(runtime.run(task, level, x.numpy()))

    with non_finite_stops_export(label, task, level):
        return compare_logits(run, plain, inputs, f"{task} level {level}")


def export_shared(
    source: ModelFile | str | os.PathLike,
    out_dir: str | os.PathLike,
    pairs: Sequence[tuple[int | str, int]] | None = None,
    check: bool = True,
    sample_inputs: torch.Tensor | Mapping[str, torch.Tensor] | None = None,
    opset: int = 17,
    force: bool = False,
    mode: str | None = None,
    precision: str = "fp32",
) -> WrittenManifest:
    """Write the shared export of ``pairs`` into ``out_dir``: one weights file, one graph per pair, a manifest.

    Everything is built (and, with ``check``, run with ``SharedOrtRuntime`` against PyTorch) in a staging folder
    inside ``out_dir`` and swapped into place only when all succeeded, ``manifest.json`` last
    (``export_folder.staged_export``): a file in use is replaced, never rewritten. The manifest lists exactly this
    export (entries of an earlier export in the folder are not kept: its graphs may name blocks the new weights
    file lacks), and the earlier export's files it does not list are removed.

    Args:
        source: a checkpoint or a bundle (a compact model holds one pair: nothing to share), loaded or its path.
        out_dir: folder for the files; created when missing.
        pairs: ``(task name or index, level)`` pairs; None for every pair the source holds.
        check: run each graph against the float32 PyTorch model and record the largest logit difference and the
            top-1 agreement.
        sample_inputs: preprocessed batches to check on, one for all tasks or one per task name; default noise.
        opset: ONNX opset.
        force: replace an export of ANOTHER source, or a manifest dvn did not write, in ``out_dir``.
        mode: ``canonical``, ``concat`` or ``blockwise`` (see ``GRAPH_MODES``); None: ``canonical`` at fp32 when
            every pair's units are a contiguous run, else ``concat``.
        precision: what the unit blocks are stored at: ``fp32`` (default), ``fp16`` or ``int8`` (per output channel
            of each block: ``export.precision``); batch norms and heads stay float32.

    Returns:
        The manifest written, with the files of the previous export it no longer lists (``removed``, ``left``).
    """
    if mode is not None and mode not in GRAPH_MODES:
        raise BadConfig(f"unknown graph mode {mode!r}; known: {', '.join(GRAPH_MODES)}")
    check_precision(precision)
    onnx = import_optional("onnx")
    import_optional("onnxruntime")
    model = source if isinstance(source, ModelFile) else open_model(source)
    selected = requested_pairs(model, pairs)
    split = split_inputs(model)
    runs = unit_runs(model, selected)
    if mode is None:
        mode = CANONICAL_MODE if runs is not None and precision == "fp32" else "concat"
    elif mode == CANONICAL_MODE and (runs is None or precision != "fp32"):
        raise BadConfig(
            "canonical graphs need float32 and every (task, level)'s units in one contiguous run (nearest orders); "
            "leave the graph mode out"
        )
    built = []
    views: dict[str, tuple[str, int, int]] = {}
    constants: dict[str, np.ndarray] = {}
    if mode == CANONICAL_MODE:
        assert runs is not None  # canonical mode is chosen, or accepted, only when every pair's units are a run
        canonical = CanonicalLayout(model, selected, runs, split)
        for task, level in selected:
            built.append((task, level, *canonical.module(task, level)))
        tensors, blocks, views, constants = canonical.stored.tensors, set(), canonical.views, canonical.constants
    else:
        by_blocks = BlockLayout(model, split, mode)
        for task, level in selected:
            built.append((task, level, *by_blocks.module(task, level)))
        tensors, blocks = by_blocks.stored.tensors, by_blocks.stored.blocks
    source_info = source_entry(model, selected[0])
    stored = lower_tensors(tensors, blocks, precision)
    if mode == CANONICAL_MODE:
        version = CANONICAL_FORMAT_VERSION
    else:
        version = 2 if precision == "fp32" else PACKED_FORMAT_VERSION  # float32 files stay as they were
    with staged_export(out_dir, source_info, force) as stage:
        weights = stage.file(WEIGHTS_NAME)
        offsets = write_weights_file(weights, stored, pages=version != PACKED_FORMAT_VERSION)
        readable, places = _with_views(stored, offsets, views)
        models = []
        for task, level, module, plain, spec, keys in built:
            lowered = (blocks, precision)
            data, used = _graph_bytes(module, plain, spec, keys, readable, places, opset, lowered, constants)
            graph = write_atomic(stage.file(pair_file_name(task, level, ".onnx")), data)
            onnx.checker.check_model(str(graph))  # beside the weights file its external data names
            extra: dict[str, Any] = {"precision": precision, "tensors": sorted({views.get(n, (n,))[0] for n in used})}
            if mode == CANONICAL_MODE:
                extra["views"] = {n: list(views[n]) for n in used if n in views}
            extra["spec"] = spec.to_dict()
            models.append(model_entry(spec, graph.name, data, SHARED_MODEL_FORMAT, **extra))
        layout = {"layout": SHARED_LAYOUT, "shared_format_version": version, "graph_mode": mode}
        weights_entry = _weights_entry(weights, tensors, stored, precision)
        manifest = build_manifest(source_info, models, **layout, weights=weights_entry)
        if check:
            stage.write_manifest(manifest)  # the runtime opens the staged folder
            runtime = SharedOrtRuntime(stage.staging, cache=False)  # the standard graphs: what other engines run
            for entry, (task, level, _, plain, _, _) in zip(models, built, strict=True):
                result = _check_pair(runtime, task, level, plain, task_inputs(sample_inputs, task), model.label)
                entry["check_max_abs_diff"], entry["check_top1_agreement"] = result.max_abs_diff, result.top1_agreement
            del runtime
        return stage.commit(manifest)


def _with_views(
    stored: Mapping[str, np.ndarray], offsets: Mapping[str, int], views: Mapping[str, tuple[str, int, int]]
) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """The tensors and file offsets a graph may name: the weights file's, and each view (rows of one of them)."""
    arrays, places = dict(stored), dict(offsets)
    for name, (tensor, begin, end) in views.items():
        base = stored[tensor]
        arrays[name] = base[begin:end]
        places[name] = offsets[tensor] + begin * (base.nbytes // base.shape[0])
    return arrays, places


def _weights_entry(
    path: Path, tensors: Mapping[str, np.ndarray], stored: Mapping[str, np.ndarray], precision: str
) -> dict[str, Any]:
    """The manifest's ``weights``: ``stored_params`` counts the model's parameters (``tensors``, float32), the
    other counts what the file holds (``stored``: int8 blocks and their scales)."""
    return {
        "file": WEIGHTS_NAME,
        "format": WEIGHTS_FORMAT,
        "precision": precision,
        "sha256": sha256_file(path),
        "bytes": path.stat().st_size,
        "alignment": ALIGNMENT,
        "small_alignment": SMALL_ALIGNMENT,
        "tensors": len(stored),
        "data_bytes": sum(a.nbytes for a in stored.values()),
        "stored_params": sum(a.size for a in tensors.values()),
    }
