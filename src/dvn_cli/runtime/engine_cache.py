"""The engine cache of a shared export folder: each graph optimised once by the installed onnxruntime, weights once.

onnxruntime gives a convolution its fast blocked-layout (NCHWc) kernel only when its weight is a constant, and that
rewrite copies the weight into each session (docs/results.md §4). So the first time a canonical folder
(``export.canonical``) is opened, each graph is optimised by onnxruntime at ``ORT_ENABLE_ALL`` with its weights
embedded, the optimised model is saved with every initializer as external data, and the weights of all graphs are
packed into ONE weights file: a tensor whose bytes occur in one already stored (an identical weight of another
graph) is a range of it, and two tensors where the end of one is the start of the other (two levels' row ranges of
one input unit's weight: the blocked layout keeps output channel blocks outermost) are merged into one
(``runtime.engine_build``). Later opens read that file and run the saved graphs at ``ORT_DISABLE_ALL``, every
session getting ``OrtValue``s over the same memory: the layout transform is never run again, nothing is copied per
session. A cache that would hold more than ``engine_build.MAX_GROWTH`` times the folder's weights (narrow layers
padded to onnxruntime's channel blocks) is recorded as refused and the standard graphs run.

Layout (``<folder>/.dvn-engine/<id>/``, or ``<user cache>/engine/<id>/`` when the folder cannot be written;
``DVN_CACHE_DIR`` moves the user cache): ``cache.json`` (the key, every graph's file, sha256 and initializers as
ranges of the weights file, an HMAC), ``weights.safetensors`` (``modelfile.shared_weights``' weights file: pieces as
1-D float32 tensors, large ones page-aligned) and one ``.onnx`` per (task, level). The id is the key's sha256: dvn's
cache version, onnxruntime's version, the CPU's instruction set (``engine_key.isa``: the optimised layout is tied to
it) and the folder's manifest sha256 (which holds every file's sha256), with this user's cache key (so two users of
one folder keep a cache each). A cache is untrusted input like the folder: ``cache.json`` must carry the HMAC of
this user's cache key (``<user cache>/engine.key``, made once, mode 0600), so a cache edited, copied from another
user or machine, or left by another onnxruntime or CPU is never used; its weights file must match its size and
sha256 and pass ``WeightsFile``'s checks. Anything wrong is rebuilt (or, where it cannot be, the standard graphs
run). A cache is built in a temporary folder beside its place and renamed into it in one step; a concurrent first
open that loses the race uses the winner's.

This module finds a cache and opens it, checked (``open_engine_cache``, ``EngineCache``); ``runtime.engine_build``
builds one, ``runtime.engine_key`` holds its key and signature.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DvnError
from ..fsutil import first_line
from ..modelfile.shared_folder import SharedFolder, rows_held
from ..modelfile.shared_weights import WeightsFile
from .engine_build import INDEX_NAME, PIECE_ALIGNMENT, WEIGHTS_NAME, build_cache
from .engine_key import CacheUnusable, cache_key, sign, user_cache_dir, user_key

__all__ = ["CACHE_DIR", "EngineCache", "open_engine_cache"]

CACHE_DIR = ".dvn-engine"
MAX_INDEX_BYTES = 16 * 2**20


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
            if not isinstance(signature, str) or not hmac.compare_digest(signature, sign(user_key(), body)):
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
                ok = dtype == np.float32 and 0 <= begin < end <= shape[0] and begin * 4 % PIECE_ALIGNMENT == 0
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
    key = cache_key(files, ort)
    try:  # each user's caches apart: two users of one writable folder never replace each other's
        owner = hashlib.sha256(user_key()).hexdigest()
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
            build_cache(files, ort, key, place)
        except OSError as exc:  # this place cannot be written: try the next
            reasons.append(f"cannot write {place}: {first_line(exc)}")
            continue
        return EngineCache(place, key, pairs)  # or the refusal it recorded (final)
    raise CacheUnusable("; ".join(reasons))


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
