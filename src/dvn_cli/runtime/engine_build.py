"""Building an engine cache: each graph of a canonical folder optimised once by onnxruntime, weights packed once.

onnxruntime gives a convolution its fast blocked-layout (NCHWc) kernel only when its weight is a constant, and
that rewrite copies the weight into each session (docs/results.md §4). So ``build_cache`` optimises each graph of
the folder at ``ORT_ENABLE_ALL`` with its checked weights embedded (``_optimise``; the batch-norm fusions
``KEEP_FUSED`` left out), saves the optimised model with every initializer as external data, and packs the weights
of all graphs into ONE weights file (``modelfile.shared_weights``' format, pieces as 1-D float32 tensors): a tensor
whose bytes occur in one already stored (an identical weight of another graph) is a range of it, and two tensors
where the end of one is the start of the other (two levels' row ranges of one input unit's weight: the blocked
layout keeps output channel blocks outermost) are merged into one (``_pack``). A cache that would hold more than
``MAX_GROWTH`` times the folder's weights is recorded as refused instead. The cache is written signed
(``engine_key.sign``) into a temporary folder beside its place and renamed into it in one step (``_commit``); a
cache another process finished there first is kept. ``runtime.engine_cache`` opens what this writes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from ..fsutil import first_line, sha256_file, write_atomic
from ..modelfile.shared_folder import SharedFolder, graph_initializers
from ..modelfile.shared_weights import write_weights_file
from .engine_key import CacheUnusable, sign, user_key

__all__ = ["INDEX_NAME", "KEEP_FUSED", "MAX_GROWTH", "PIECE_ALIGNMENT", "WEIGHTS_NAME", "build_cache"]

INDEX_NAME = "cache.json"
WEIGHTS_NAME = "weights.safetensors"
KEEP_FUSED = ("ConvBNFusion", "ConvAddFusion", "ConvMulFusion")
"""Fusions left out of the optimisation: each folds a (task, level)'s private batch norm into a weight that other
pairs share, which would make a private copy of every weight per pair."""
PIECE_ALIGNMENT = 64  # bytes: where a tensor handed to onnxruntime may start

MAX_GROWTH = 1.2
"""A cache whose weights would be more than this times the folder's is not used (onnxruntime pads each convolution's
channels to its blocks: 16 on AVX-512, so a level of 4-channel units would hold 16x its weights); the standard
graphs run instead, and the decision is kept in the cache (signed) so that it is not made again."""


def build_cache(files: SharedFolder, ort, key: Mapping[str, Any], place: Path) -> None:
    """Optimise every graph of ``files`` into a new cache at ``place`` (built beside it, renamed in one step; a
    stale cache there is replaced, one another process finished first is kept)."""
    try:
        import onnx
    except ImportError:
        raise CacheUnusable("building an engine cache needs the onnx package: pip install 'dvn-cli[export]'") from None
    place.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=".build-", dir=place.parent))
    try:
        models: dict[tuple[str, int], Any] = {}  # (task, level) -> its optimised onnx.ModelProto
        arrays: dict[str, np.ndarray] = {}
        for i, (pair, entry) in enumerate(files.models.items()):
            models[pair] = _optimise(onnx, ort, files, pair, entry, stage, i, arrays)
        pieces, refs = _pack(arrays)
        stored = sum(dtype.itemsize * int(np.prod(shape)) for dtype, shape, _ in files.weights.index.values())
        grown = sum(piece.nbytes for piece in pieces) / max(stored, 1)
        if grown > MAX_GROWTH:
            refused = (
                f"the optimised graphs would hold {grown:.2f}x the folder's weights (onnxruntime pads narrow "
                "layers to its channel blocks)"
            )
            body: dict[str, Any] = {"key": dict(key), "refused": refused}
            write_atomic(stage / INDEX_NAME, json.dumps({"body": body, "hmac": sign(user_key(), body)}).encode())
            _commit(stage, place)
            return
        offsets = write_weights_file(stage / WEIGHTS_NAME, {f"piece.{i}": p for i, p in enumerate(pieces)})
        graphs = []
        for pair, model in models.items():
            tensors, views, shapes = set(), {}, {}
            renamed, twice = {}, []
            for init in model.graph.initializer:
                if init.name not in refs:
                    continue
                piece, begin, end = refs[init.name]
                name = f"piece.{piece}[{begin}:{end}]:{'x'.join(map(str, init.dims))}"
                renamed[init.name] = name
                if name in views:  # the same bytes and shape as another initializer of this graph: one is enough
                    twice.append(init)
                    continue
                tensors.add(f"piece.{piece}")
                views[name], shapes[name] = [f"piece.{piece}", begin, end], list(init.dims)
                init.name = name
                init.data_location = onnx.TensorProto.EXTERNAL
                del init.external_data[:]
                for field, value in (
                    ("location", WEIGHTS_NAME),
                    ("offset", offsets[f"piece.{piece}"] + 4 * begin),
                    ("length", 4 * (end - begin)),
                ):
                    item = init.external_data.add()
                    item.key, item.value = field, str(value)
            for init in twice:
                model.graph.initializer.remove(init)
            for node in model.graph.node:
                node.input[:] = [renamed.get(n, n) for n in node.input]
            data = model.SerializeToString()
            file = Path(entry_file := files.models[pair]["file"]).name
            (stage / file).write_bytes(data)
            graphs.append(
                {
                    "task": pair[0],
                    "level": pair[1],
                    "file": file,
                    "bytes": len(data),
                    "sha256": hashlib.sha256(data).hexdigest(),
                    "tensors": sorted(tensors),
                    "views": views,
                    "shapes": shapes,
                    "source": entry_file,
                }
            )
        weights = stage / WEIGHTS_NAME
        body = {
            "key": dict(key),
            "weights": {"bytes": weights.stat().st_size, "sha256": sha256_file(weights)},
            "graphs": graphs,
        }
        write_atomic(stage / INDEX_NAME, json.dumps({"body": body, "hmac": sign(user_key(), body)}).encode())
        _commit(stage, place)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _commit(stage: Path, place: Path) -> None:
    """Rename the built ``stage`` to ``place`` in one step; a cache another process finished there in the meantime
    is kept (and ours dropped)."""
    try:
        os.rename(stage, place)
    except OSError:
        if not (place / INDEX_NAME).exists():  # not another process's finished cache
            raise


def _optimise(onnx, ort, files: SharedFolder, pair, entry, stage: Path, i: int, arrays: dict[str, np.ndarray]):
    """The graph of ``pair`` optimised by onnxruntime at level ALL from the folder's checked tensors (embedded:
    onnxruntime reads nothing from the folder itself), its float32 initializers put in ``arrays`` under unique
    names, the others embedded again."""
    model = onnx.load_from_string(files.graph(*pair).read_bytes())  # graph() checks its initializers
    views = graph_initializers(entry)
    for init in model.graph.initializer:
        if init.name in views:
            view = views[init.name]
            array = files.weights.read(init.name) if view is None else files.weights.read(view[0], view[1:])
            del init.external_data[:]
            init.data_location = onnx.TensorProto.DEFAULT
            init.raw_data = np.ascontiguousarray(array).tobytes()
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # the warning that the saved model is tied to this CPU: that is the point
    options.intra_op_num_threads = 1
    options.optimized_model_filepath = str(stage / f"{i}.optimised.onnx")
    options.add_session_config_entry("session.optimized_model_external_initializers_file_name", f"{i}.data")
    options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "0")
    try:
        ort.InferenceSession(
            model.SerializeToString(), options, providers=["CPUExecutionProvider"], disabled_optimizers=KEEP_FUSED
        )
    except Exception as exc:  # onnxruntime's own error types
        raise CacheUnusable(f"onnxruntime could not optimise {entry['file']}: {first_line(exc)}") from None
    optimised = onnx.load(str(stage / f"{i}.optimised.onnx"), load_external_data=False)
    data = (stage / f"{i}.data").read_bytes() if (stage / f"{i}.data").exists() else b""
    for init in optimised.graph.initializer:
        if init.data_location != onnx.TensorProto.EXTERNAL:
            continue
        where = {item.key: item.value for item in init.external_data}
        begin, length = int(where.get("offset", 0)), int(where["length"])
        raw = data[begin : begin + length]
        del init.external_data[:]
        init.data_location = onnx.TensorProto.DEFAULT
        if init.data_type == onnx.TensorProto.FLOAT and length >= PIECE_ALIGNMENT:
            init.name = f"{i}/{init.name}"
            arrays[init.name] = np.frombuffer(raw, np.float32)
        else:
            init.raw_data = raw
    for leftover in (f"{i}.optimised.onnx", f"{i}.data"):  # not part of the cache: the stage becomes it
        (stage / leftover).unlink(missing_ok=True)
    for node in optimised.graph.node:  # the renamed ones
        node.input[:] = [f"{i}/{n}" if f"{i}/{n}" in arrays else n for n in node.input]
    del optimised.metadata_props[:]
    optimised.metadata_props.extend(model.metadata_props)  # the stamp the runtime checks
    return optimised


def _pack(arrays: Mapping[str, np.ndarray]) -> tuple[list[np.ndarray], dict[str, tuple[int, int, int]]]:
    """Store each float32 array once: ``(pieces, name -> (piece, first element, end element))``.

    Largest first, an array is a range of a piece whose bytes contain it (at a 64-byte boundary), or extends a
    piece whose end is its start (or is extended by a piece whose start is its end), else a new piece. Equal bytes
    are equal weights, so sharing them is exact whatever produced them.
    """
    pieces: list[bytes] = []
    refs: dict[str, list[int]] = {}  # name -> [piece, byte offset, byte length]
    for name in sorted(arrays, key=lambda n: -arrays[n].nbytes):
        data = arrays[name].tobytes()
        if found := _first(pieces, partial(_find, needle=data)):
            placed = list(found)
        elif found := _first(pieces, partial(_overlap, second=data)):
            p, at = found
            pieces[p] += data[len(pieces[p]) - at :]
            placed = [p, at]
        elif found := _first(pieces, partial(_overlap, data)):
            p, at = found
            pieces[p] = data[:at] + pieces[p]
            for ref in refs.values():
                if ref[0] == p:
                    ref[1] += at
            placed = [p, 0]
        else:
            pieces.append(data)
            placed = [len(pieces) - 1, 0]
        refs[name] = [*placed, len(data)]
    arrays_out = [np.frombuffer(piece, np.float32) for piece in pieces]
    return arrays_out, {n: (p, at // 4, (at + length) // 4) for n, (p, at, length) in refs.items()}


def _first(pieces: list[bytes], at: Callable[[bytes], int | None]) -> tuple[int, int] | None:
    """``(piece, at(piece))`` of the first piece where ``at`` is not None, else None."""
    for p, piece in enumerate(pieces):
        if (found := at(piece)) is not None:
            return p, found
    return None


def _find(haystack: bytes, needle: bytes) -> int | None:
    """Where ``needle`` occurs in ``haystack`` at a 64-byte boundary, if it does."""
    start = 0
    while True:
        at = haystack.find(needle, start)
        if at < 0:
            return None
        if at % PIECE_ALIGNMENT == 0:
            return at
        start = at + 1


def _overlap(first: bytes, second: bytes) -> int | None:
    """The first 64-byte boundary ``at`` > 0 of ``first`` from which ``first`` ends as ``second`` starts (and
    ``second`` goes on past it), if any."""
    head = second[:PIECE_ALIGNMENT]
    start = PIECE_ALIGNMENT
    while True:
        at = first.find(head, start)
        if at < 0:
            return None
        if at % PIECE_ALIGNMENT == 0 and len(first) - at < len(second) and first[at:] == second[: len(first) - at]:
            return at
        start = at + 1
