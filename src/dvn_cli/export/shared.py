"""A shared deploy format: every unit block stored once in one weights file, one small ONNX graph per (task, level).

The per-pair export (``export.export_models``) writes one self-contained ONNX file per (task, level) with batch
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
  ``Concat`` at run time (measured faster than summing one convolution per block: docs/results_memory_onnx.md).
- ``manifest.json``: ``"layout": "shared"``, the format version, the weights file's sha256, and per graph the
  usual entry of the per-pair manifest plus ``tensors``, the names it takes from the weights file, and ``spec``, the
  compact spec of the pair (backbone, task, units, cost), so that the folder opens as a model file
  (``modelfile.shared.SharedExport``: ``dvn predict``, ``eval`` and ``info`` take it).

``runtime.ort.SharedOrtRuntime`` (numpy + onnxruntime, no torch) maps the weights file once and hands the
same ``OrtValue`` of each block to every session, so no block is copied per session. Plain onnxruntime can also
open a graph on its own (it reads the external data itself), without the sharing.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..core.sizes import check_precision
from ..errors import BadConfig, DvnError
from ..fsutil import sha256_file, write_atomic
from ..modelfile.base import ModelFile
from ..modelfile.registry import open_model
from ..modelfile.shared_folder import PACKED_FORMAT_VERSION, SHARED_LAYOUT
from ..modelfile.shared_weights import ALIGNMENT, SMALL_ALIGNMENT, WEIGHTS_FORMAT, WEIGHTS_NAME, write_weights_file
from ..modelfile.spec import CompactSpec
from ..runtime.ort import SharedOrtRuntime
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

__all__ = [
    "GRAPH_MODES",
    "SHARED_MODEL_FORMAT",
    "export_shared",
    "shared_tensors",
    "write_weights_file",
]

SHARED_MODEL_FORMAT = "onnx-shared"
GRAPH_MODES = (CANONICAL_MODE, "concat", "blockwise")
"""How a graph reads a layer: in canonical unit order with no weight assembled (``export.canonical``: the
default at fp32 when every pair's units are a contiguous run), from its blocks with one Concat then one op (the
default otherwise), or one op per block, summed."""

CANONICAL_FORMAT_VERSION = 4
"""The shared format of a canonical export (``export.canonical``): graph initializers that are ranges of
the weights file's tensors (``views`` in the manifest entries), which a dvn reading format 3 would not give."""


# ------------------------------------------------------------------------------------------------ tensors


def _split_inputs(model: ModelFile) -> dict[str, bool]:
    """Conv layer name (under ``features``) -> whether its input is split into units, from the source file."""
    from ..core.layers import UnitConv2d
    from ..modelfile.bundle import Bundle
    from ..modelfile.checkpoint import Checkpoint

    if isinstance(model, Checkpoint):
        return {n: m.split_input for n, m in model.network.features.named_modules() if isinstance(m, UnitConv2d)}
    if isinstance(model, Bundle):
        return {name: bool(conv["split_input"]) for name, conv in model.convs.items()}
    raise BadConfig(
        f"{model.label} is a {model.kind}: it holds one (task, level), so there is nothing to share; "
        "export it without --shared"
    )


def _chunks(tensor: torch.Tensor, dim: int, units: Sequence[int]) -> dict[int, torch.Tensor]:
    """Split ``dim`` of a level's tensor into its units' channels (ascending units, equal sizes)."""
    size = tensor.shape[dim] // len(units)
    return {u: tensor.narrow(dim, i * size, size) for i, u in enumerate(sorted(units))}


class _Collector:
    """Tensors of the weights file (float32), each stored once; a block seen again must be the same block.

    ``blocks`` names the convolutions' unit blocks: what ``--precision`` stores at lower precision.
    """

    def __init__(self, label: str) -> None:
        self.tensors: dict[str, np.ndarray] = {}
        self.blocks: set[str] = set()
        self.label = label

    def add(self, key: str, tensor: torch.Tensor, block: bool = False) -> nn.Parameter:
        if block:
            self.blocks.add(key)
        array = tensor.detach().float().cpu().contiguous().numpy()
        if key in self.tensors:
            if not np.array_equal(self.tensors[key], array):
                raise DvnError(f"{self.label}: block {key} differs between two (task, level)s of the same file")
        else:
            self.tensors[key] = array.copy()
        return nn.Parameter(torch.from_numpy(self.tensors[key]), requires_grad=False)


class _BlockConv2d(nn.Module):
    """A convolution whose weight is assembled from unit blocks (``concat``) or applied block by block."""

    def __init__(self, conv: nn.Conv2d, rows: list[list[nn.Parameter]], mode: str) -> None:
        super().__init__()
        depthwise = conv.groups == conv.in_channels == conv.out_channels
        if conv.bias is not None or conv.groups != 1 and not depthwise:
            raise DvnError("a shared export needs bias-free convolutions, ungrouped or depthwise")
        self.stride, self.padding, self.dilation = conv.stride, conv.padding, conv.dilation
        self.groups = conv.groups  # a depthwise layer: one group per channel, its blocks are its rows
        self.shape = [len(row) for row in rows]
        self.blocks = nn.ParameterList([b for row in rows for b in row])
        self.mode = mode

    def _rows(self) -> list[list[torch.Tensor]]:
        rows, i = [], 0
        for n in self.shape:
            rows.append(list(self.blocks[i : i + n]))
            i += n
        return rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = self._rows()
        if self.mode == "concat":
            weight = torch.cat([torch.cat(row, 1) if len(row) > 1 else row[0] for row in rows], 0)
            return F.conv2d(x, weight, None, self.stride, self.padding, self.dilation, self.groups)
        if self.groups > 1:  # depthwise: each unit's filters read that unit's own channels
            pieces = torch.split(x, x.shape[1] // len(rows), dim=1) if len(rows) > 1 else (x,)
            outs = [
                F.conv2d(piece, row[0], None, self.stride, self.padding, self.dilation, row[0].shape[0])
                for piece, row in zip(pieces, rows, strict=True)
            ]
            return torch.cat(outs, 1) if len(outs) > 1 else outs[0]
        pieces = torch.split(x, x.shape[1] // len(rows[0]), dim=1) if len(rows[0]) > 1 else (x,)
        outs = []
        for row in rows:  # a block per input piece: at least one
            out = F.conv2d(pieces[0], row[0], None, self.stride, self.padding, self.dilation)
            for piece, block in zip(pieces[1:], row[1:], strict=True):
                out = out + F.conv2d(piece, block, None, self.stride, self.padding, self.dilation)
            outs.append(out)
        return torch.cat(outs, 1) if len(outs) > 1 else outs[0]


class _ScaleShift(nn.Module):
    """Eval-mode batch norm as ``x * scale + shift`` with ``scale`` and ``shift`` of shape (C, 1, 1)."""

    def __init__(self, scale: nn.Parameter, shift: nn.Parameter) -> None:
        super().__init__()
        self.scale, self.shift = scale, shift

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale + self.shift


class _BlockLinear(nn.Module):
    """A head whose weight is per-unit column blocks, plus its bias."""

    def __init__(self, cols: list[nn.Parameter], bias: nn.Parameter, mode: str) -> None:
        super().__init__()
        self.cols, self.bias, self.mode = nn.ParameterList(cols), bias, mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cols = list(self.cols)
        if self.mode == "concat" or len(cols) == 1:
            return F.linear(x, torch.cat(cols, 1) if len(cols) > 1 else cols[0], self.bias)
        out: torch.Tensor = self.bias
        for piece, col in zip(torch.split(x, x.shape[1] // len(cols), dim=1), cols, strict=True):
            out = F.linear(piece, col) + out
        return out


def _shared_module(
    model: ModelFile, task: str, level: int, task_index: int, split: Mapping[str, bool], store: _Collector, mode: str
) -> tuple[nn.Module, nn.Module, CompactSpec]:
    """(module of blocks for export, the plain reference network, spec) of one (task, level); blocks go to store."""
    plain, spec = model.plain_of(task, level), model.spec_of(task, level)
    units = tuple(spec.units)
    shared = model.plain_of(task, level)
    tag = f"task{task_index}.level{level}"
    for name, module in list(shared.features.named_modules()):
        if isinstance(module, nn.Conv2d):
            if name not in split:
                raise DvnError(f"{model.label}: convolution {name} is not in the source's unit layers")
            rows_of = _chunks(module.weight, 0, units)
            rows = []
            for uo, row in rows_of.items():
                if not split[name]:
                    rows.append([store.add(f"features.{name}.weight.{uo}", row, block=True)])
                    continue
                cols = _chunks(row, 1, units)
                rows.append([store.add(f"features.{name}.weight.{uo}.{ui}", b, block=True) for ui, b in cols.items()])
            _set(shared.features, name, _BlockConv2d(module, rows, mode))
        elif isinstance(module, nn.BatchNorm2d):
            # a plain twin's batch norms track running statistics (nn.BatchNorm2d's default)
            assert module.running_var is not None and module.running_mean is not None
            with torch.no_grad():
                var, mean = module.running_var.double(), module.running_mean.double()
                scale = module.weight.double() / torch.sqrt(var + module.eps)
                shift = module.bias.double() - mean * scale
            scale_p = store.add(f"features.{name}.{tag}.scale", scale.float().view(-1, 1, 1))
            shift_p = store.add(f"features.{name}.{tag}.shift", shift.float().view(-1, 1, 1))
            _set(shared.features, name, _ScaleShift(scale_p, shift_p))
    head = shared.head
    columns = [store.add(f"head.task{task_index}.weight.{u}", c) for u, c in _chunks(head.weight, 1, units).items()]
    block_head = _BlockLinear(columns, store.add(f"head.task{task_index}.bias", head.bias), mode)
    _set(shared, "head", block_head)  # by name, as every layer: the result is no PlainNetwork (its head a Linear)
    return shared.eval(), plain.eval(), spec


def _set(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, attr, module)


def shared_tensors(
    source: ModelFile | str | os.PathLike, pairs: Sequence[tuple[int | str, int]] | None = None
) -> dict[str, np.ndarray]:
    """Every tensor the shared weights file of ``pairs`` holds (blocks once, private parts per pair), float32."""
    model = source if isinstance(source, ModelFile) else open_model(source)
    selected = requested_pairs(model, pairs)
    split, names = _split_inputs(model), model.task_names()
    store = _Collector(model.label)
    for task, level in selected:
        _shared_module(model, task, level, names.index(task), split, store, "concat")
    return store.tensors


# ------------------------------------------------------------------------------------------------ weights file


# ------------------------------------------------------------------------------------------------ graphs


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
    split, names = _split_inputs(model), model.task_names()
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
        store = _Collector(model.label)
        for task, level in selected:
            module, plain, spec = _shared_module(model, task, level, names.index(task), split, store, mode)
            params = {id(p): n for n, p in module.named_parameters()}
            keys = {params[id(store_param)]: key for key, store_param in _params_by_key(module, store).items()}
            built.append((task, level, module, plain, spec, keys))
        tensors, blocks = store.tensors, store.blocks
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


def _params_by_key(module: nn.Module, store: _Collector) -> dict[str, nn.Parameter]:
    """Weights-file key -> the parameter of ``module`` that holds it (parameters share the store's arrays)."""
    by_pointer = {array.__array_interface__["data"][0]: key for key, array in store.tensors.items()}
    found = {}
    for param in module.parameters():
        key = by_pointer.get(param.data_ptr())
        if key is None:
            raise RuntimeError("a shared-export parameter is not in the weights file")  # a dvn bug
        found[key] = param
    return found


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
