"""The engine cache of a shared export folder: each graph optimised once by the installed onnxruntime, weights once.

onnxruntime gives a convolution its fast blocked-layout (NCHWc) kernel only when its weight is a constant, and
that rewrite copies the weight into each session (docs/results.md §4). So the first time a canonical folder
(``export.canonical``) is opened, each graph is optimised by onnxruntime at ``ORT_ENABLE_ALL`` with its
weights embedded, the optimised model is saved with every initializer as external data, and the weights of all
graphs are packed into ONE weights file: a tensor whose bytes occur in one already stored (an identical weight of
another graph) is a range of it, and two tensors where the end of one is the start of the other (two levels' row
ranges of one input unit's weight: the blocked layout keeps output channel blocks outermost) are merged into one
(``_pack``). Later opens read that file and run the saved graphs at ``ORT_DISABLE_ALL``, every session getting
``OrtValue``s over the same memory: the layout transform is never run again, nothing is copied per session. A cache
that would hold more than ``MAX_GROWTH`` times the folder's weights (narrow layers padded to onnxruntime's channel
blocks) is recorded as refused and the standard graphs run.

Layout (``<folder>/.dvn-engine/<id>/``, or ``<user cache>/engine/<id>/`` when the folder cannot be written;
``DVN_CACHE_DIR`` moves the user cache): ``cache.json`` (the key, every graph's file, sha256 and initializers as
ranges of the weights file, an HMAC), ``weights.safetensors`` (``modelfile.shared_weights``' weights file: pieces
as 1-D float32 tensors, large ones page-aligned) and one ``.onnx`` per (task, level). The id is the key's
sha256: dvn's cache version, onnxruntime's version, the CPU's instruction set (``isa``: the optimised layout is
tied to it) and the folder's manifest sha256 (which holds every file's sha256), with this user's cache key (so two
users of one folder keep a cache each). A cache is untrusted input like the
folder: ``cache.json`` must carry the HMAC of this user's cache key (``<user cache>/engine.key``, made once, mode
0600), so a cache edited, copied from another user or machine, or left by another onnxruntime or CPU is never
used; its weights file must match its size and sha256 and pass ``WeightsFile``'s checks. Anything wrong is rebuilt
(or, where it cannot be, the standard graphs run). A cache is built in a temporary folder beside its place and
renamed into it in one step; a concurrent first open that loses the race uses the winner's.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import platform
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DvnError
from ..fsutil import first_line, write_atomic
from ..modelfile.shared_folder import MANIFEST_NAME, SharedFolder, graph_initializers, rows_held
from ..modelfile.shared_weights import WeightsFile, write_weights_file

__all__ = ["CACHE_DIR", "CACHE_VERSION", "EngineCache", "isa", "open_engine_cache", "user_cache_dir"]

CACHE_VERSION = 1
CACHE_DIR = ".dvn-engine"
INDEX_NAME = "cache.json"
WEIGHTS_NAME = "weights.safetensors"
MAX_INDEX_BYTES = 16 * 2**20
KEEP_FUSED = ("ConvBNFusion", "ConvAddFusion", "ConvMulFusion")
"""Fusions left out of the optimisation: each folds a (task, level)'s private batch norm into a weight that other
pairs share, which would make a private copy of every weight per pair."""
_ISA_FLAGS = {
    "sse4_1", "sse4_2", "avx", "avx2", "fma", "f16c", "avx_vnni", "avx512f", "avx512bw", "avx512vl", "avx512dq",
    "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8", "asimd", "asimddp", "sve",
    "i8mm", "bf16",
}  # fmt: skip
_ALIGN = 64  # bytes: where a tensor handed to onnxruntime may start


MAX_GROWTH = 1.2
"""A cache whose weights would be more than this times the folder's is not used (onnxruntime pads each convolution's
channels to its blocks: 16 on AVX-512, so a level of 4-channel units would hold 16x its weights); the standard
graphs run instead, and the decision is kept in the cache (signed) so that it is not made again."""


class CacheUnusable(DvnError):
    """Why no engine cache is used (the standard graphs run instead); never shown as an error. ``final``: a
    decision the cache records (rebuilding would decide the same)."""

    def __init__(self, message: str, final: bool = False) -> None:
        super().__init__(message)
        self.final = final


def isa() -> str:
    """The CPU's architecture and the instruction-set extensions onnxruntime's kernels choose by (Linux: from
    ``/proc/cpuinfo``); a cache optimised under one is not used under another."""
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    flags |= set(line.split(":", 1)[1].split())
                    break
    except OSError:
        flags = {platform.processor() or "unknown"}
    return f"{platform.machine()}:{','.join(sorted(flags & _ISA_FLAGS or flags))}"


def user_cache_dir() -> Path:
    """``$DVN_CACHE_DIR``, else ``$XDG_CACHE_HOME/dvn``, else ``~/.cache/dvn``."""
    if os.environ.get("DVN_CACHE_DIR"):
        return Path(os.environ["DVN_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dvn"


def _secret() -> bytes:
    """This user's cache key (32 random bytes, mode 0600), made once: a cache signed with it was built by this
    user's dvn; an edited or foreign one is not."""
    path = user_cache_dir() / "engine.key"
    try:
        key = path.read_bytes()
        if len(key) == 32:
            return key
    except OSError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".engine.key.", dir=path.parent)  # mode 0600
    try:
        os.write(fd, os.urandom(32))
        os.fsync(fd)
        os.close(fd)
        try:
            os.link(tmp, path)  # never replaces a key another process made first
        except FileExistsError:
            pass
    finally:
        os.unlink(tmp)
    key = path.read_bytes()
    if len(key) != 32:
        raise CacheUnusable(f"{path} is not a dvn cache key; remove it")
    return key


def _key(files: SharedFolder, ort) -> dict[str, Any]:
    manifest = hashlib.sha256((files.folder / MANIFEST_NAME).read_bytes()).hexdigest()
    return {"cache_version": CACHE_VERSION, "onnxruntime": ort.__version__, "isa": isa(), "folder": manifest}


def _sign(secret: bytes, body: Mapping[str, Any]) -> str:
    return hmac.new(secret, json.dumps(body, sort_keys=True).encode(), hashlib.sha256).hexdigest()


class EngineCache:
    """A checked engine cache: per (task, level) the optimised graph's bytes and its initializers as ranges of the
    cache's weights file (``tensors``, ``views``, ``shapes``: the entry ``SharedOrtRuntime`` reads from).

    Raises:
        CacheUnusable: no cache there, or one that is not this key's, not signed by this user, or damaged.
    """

    def __init__(self, path: Path, key: Mapping[str, Any], pairs: list[tuple[str, int]]) -> None:
        self.path = path
        index_path = path / INDEX_NAME
        try:
            if index_path.stat().st_size > MAX_INDEX_BYTES:
                raise CacheUnusable(f"{index_path} is too large")
            index = json.loads(index_path.read_bytes())
            body, signature = index["body"], index["hmac"]
            if not isinstance(signature, str) or not hmac.compare_digest(signature, _sign(_secret(), body)):
                raise CacheUnusable(f"{index_path} is not signed by this user's dvn (edited, or made elsewhere)")
            if body["key"] != dict(key):
                raise CacheUnusable(f"{path} was made for another onnxruntime, CPU or folder")
            if body.get("refused"):
                raise CacheUnusable(str(body["refused"]), final=True)
            self.weights = WeightsFile(path / WEIGHTS_NAME, body["weights"], verify=True)
            self.entries: dict[tuple[str, int], dict[str, Any]] = {}
            self._graphs: dict[tuple[str, int], bytes] = {}
            for entry in body["graphs"]:
                pair = (entry["task"], entry["level"])
                data = (path / Path(entry["file"]).name).read_bytes()
                if len(data) != entry["bytes"] or hashlib.sha256(data).hexdigest() != entry["sha256"]:
                    raise CacheUnusable(f"graph {entry['file']} of {path} has changed")
                self._graphs[pair] = data
                self.entries[pair] = {k: entry[k] for k in ("tensors", "views", "shapes")}
        except CacheUnusable:
            raise
        except DvnError as exc:  # the weights file refused by WeightsFile
            raise CacheUnusable(first_line(exc)) from None
        except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
            raise CacheUnusable(f"{path} is not a usable engine cache ({first_line(exc)})") from None
        if sorted(self.entries) != sorted(pairs):
            raise CacheUnusable(f"{path} holds other (task, level)s than its folder")
        index_of = self.weights.index
        for entry in self.entries.values():
            for name, (tensor, begin, end) in entry["views"].items():
                dtype, shape, _ = index_of.get(tensor, (None, (0,), 0))
                dims = entry["shapes"].get(name)
                ok = dtype == np.float32 and 0 <= begin < end <= shape[0] and begin * 4 % _ALIGN == 0
                if not ok or not isinstance(dims, list) or int(np.prod(dims)) != end - begin:
                    raise CacheUnusable(f"{path}: initializer {name} is not a range of its weights file")

    def graph(self, task: str, level: int) -> bytes:
        """The optimised graph of (task, level), as checked when the cache was opened."""
        return self._graphs[task, level]

    def held_bytes(self, pairs) -> int:
        """Bytes of the cache's weights the graphs of ``pairs`` read, each range once."""
        held = rows_held(self.entries[pair] for pair in pairs)
        return sum(4 * (self.weights.index[n][1][0] if rows is None else rows[1] - rows[0]) for n, rows in held.items())


def open_engine_cache(files: SharedFolder, ort, build: bool = True) -> EngineCache:
    """The engine cache of ``files`` (checked), built first when there is none usable (``build``).

    Raises:
        CacheUnusable: why none is used (not a canonical folder, no ``onnx`` package to build with, nowhere to
            write, onnxruntime failed); the caller runs the standard graphs.
    """
    if files.manifest.get("graph_mode") != "canonical":
        raise CacheUnusable("only canonical graphs are cached (Concat graphs would copy every weight per pair)")
    key = _key(files, ort)
    try:  # each user's caches apart: two users of one writable folder never replace each other's
        owner = hashlib.sha256(_secret()).hexdigest()
    except OSError as exc:
        raise CacheUnusable(f"cannot write the cache key in {user_cache_dir()}: {first_line(exc)}") from None
    name = hashlib.sha256((json.dumps(key, sort_keys=True) + owner).encode()).hexdigest()[:24]
    places = [files.folder / CACHE_DIR / name, user_cache_dir() / "engine" / name]
    pairs = list(files.models)
    reasons = []
    for place in places:
        if (place / INDEX_NAME).exists():
            try:
                return EngineCache(place, key, pairs)
            except CacheUnusable as exc:
                if exc.final:
                    raise
                reasons.append(str(exc))
                _discard(place)
    if not build:
        raise CacheUnusable("; ".join(reasons) or "no engine cache")
    for place in places:
        try:
            _build(files, ort, key, place)
        except OSError as exc:  # this place cannot be written: try the next
            reasons.append(f"cannot write {place}: {first_line(exc)}")
            continue
        return EngineCache(place, key, pairs)  # or the refusal it recorded (final)
    raise CacheUnusable("; ".join(reasons))


# ------------------------------------------------------------------------------------------------ building


def _build(files: SharedFolder, ort, key: Mapping[str, Any], place: Path) -> None:
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
            write_atomic(stage / INDEX_NAME, json.dumps({"body": body, "hmac": _sign(_secret(), body)}).encode())
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
            "weights": {"bytes": weights.stat().st_size, "sha256": _sha256(weights)},
            "graphs": graphs,
        }
        write_atomic(stage / INDEX_NAME, json.dumps({"body": body, "hmac": _sign(_secret(), body)}).encode())
        _commit(stage, place)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _discard(place: Path) -> None:
    """Move a stale or damaged cache out of its place in one step, then remove it (another process may be doing the
    same: whichever rename fails has nothing left to do). A cache in its place is always complete (it arrives by one
    rename), so a usable one another process just finished is never taken for a stale one."""
    trash = place.parent / f".stale-{place.name}-{os.urandom(4).hex()}"
    try:
        os.rename(place, trash)
    except OSError:
        return
    shutil.rmtree(trash, ignore_errors=True)


def _commit(stage: Path, place: Path) -> None:
    """Rename the built ``stage`` to ``place`` in one step; a cache another process finished there in the meantime
    is kept (and ours dropped)."""
    try:
        os.rename(stage, place)
    except OSError:
        if not (place / INDEX_NAME).exists():  # not another process's finished cache
            raise


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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
        if init.data_type == onnx.TensorProto.FLOAT and length >= _ALIGN:
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
        placed = None
        for p, piece in enumerate(pieces):
            at = _find(piece, data)
            if at is not None:
                placed = [p, at]
                break
        if placed is None:
            for p, piece in enumerate(pieces):
                at = _overlap(piece, data)
                if at is not None:
                    pieces[p] = piece + data[len(piece) - at :]
                    placed = [p, at]
                    break
        if placed is None:
            for p, piece in enumerate(pieces):
                at = _overlap(data, piece)
                if at is not None:
                    pieces[p] = data[:at] + piece
                    for ref in refs.values():
                        if ref[0] == p:
                            ref[1] += at
                    placed = [p, 0]
                    break
        if placed is None:
            pieces.append(data)
            placed = [len(pieces) - 1, 0]
        refs[name] = [*placed, len(data)]
    arrays_out = [np.frombuffer(piece, np.float32) for piece in pieces]
    return arrays_out, {n: (p, at // 4, (at + length) // 4) for n, (p, at, length) in refs.items()}


def _find(haystack: bytes, needle: bytes) -> int | None:
    """Where ``needle`` occurs in ``haystack`` at a 64-byte boundary, if it does."""
    start = 0
    while True:
        at = haystack.find(needle, start)
        if at < 0:
            return None
        if at % _ALIGN == 0:
            return at
        start = at + 1


def _overlap(first: bytes, second: bytes) -> int | None:
    """The first 64-byte boundary ``at`` > 0 of ``first`` from which ``first`` ends as ``second`` starts (and
    ``second`` goes on past it), if any."""
    head = second[:_ALIGN]
    start = _ALIGN
    while True:
        at = first.find(head, start)
        if at < 0:
            return None
        if at % _ALIGN == 0 and len(first) - at < len(second) and first[at:] == second[: len(first) - at]:
            return at
        start = at + 1
