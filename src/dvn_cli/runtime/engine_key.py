"""What an engine cache is bound to, and who made it: its key and this user's signature (docs/design.md §5).

An engine cache (``runtime.engine_cache``) holds graphs optimised by one onnxruntime for one CPU from one folder,
so its key (``cache_key``) is dvn's cache version, onnxruntime's version, the CPU's instruction set (``isa``: the
optimised layout is tied to it) and the sha256 of the folder's manifest (which holds every file's sha256). A cache
is untrusted input like the folder: its index carries the HMAC (``sign``) of this user's cache key
(``<user cache>/engine.key``, ``user_key``: 32 random bytes, made once, mode 0600), so a cache edited, or copied
from another user or machine, is never used. ``CacheUnusable`` says why no cache is used.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import platform
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import DvnError
from ..modelfile.shared_folder import MANIFEST_NAME, SharedFolder

__all__ = ["CACHE_VERSION", "CacheUnusable", "cache_key", "isa", "sign", "user_cache_dir", "user_key"]

CACHE_VERSION = 1

_ISA_FLAGS = {
    "sse4_1", "sse4_2", "avx", "avx2", "fma", "f16c", "avx_vnni", "avx512f", "avx512bw", "avx512vl", "avx512dq",
    "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8", "asimd", "asimddp", "sve",
    "i8mm", "bf16",
}  # fmt: skip


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


def user_key() -> bytes:
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


def cache_key(files: SharedFolder, ort) -> dict[str, Any]:
    """What a cache of ``files`` is made for: dvn's cache version, onnxruntime's, the CPU's ``isa``, the manifest."""
    manifest = hashlib.sha256((files.folder / MANIFEST_NAME).read_bytes()).hexdigest()
    return {"cache_version": CACHE_VERSION, "onnxruntime": ort.__version__, "isa": isa(), "folder": manifest}


def sign(secret: bytes, body: Mapping[str, Any]) -> str:
    """The HMAC-SHA256 of ``body`` (JSON, keys sorted) with ``secret`` (``user_key``), as a cache's index carries."""
    return hmac.new(secret, json.dumps(body, sort_keys=True).encode(), hashlib.sha256).hexdigest()
