"""File helpers that need no torch: atomic writes, sha256, one-line error text.

Every file dvn writes goes through ``write_atomic``: a temporary file in the same folder, fsync, rename. Readers
see the old file or the whole new one, never a part, and a failed write leaves the old file as it was. Only
regular files are ever replaced: a device node, a FIFO, a folder or a link under the target name is refused.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO

from .errors import CannotWrite

__all__ = ["first_line", "process_umask", "refuse_non_regular", "safe_file_stem", "sha256_file", "write_atomic"]

_BLOCK = 1 << 20


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (or its type name), for one-line user errors."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def process_umask() -> int:
    """The process umask (``os.umask`` can only read it by setting it, so set it back at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def safe_file_stem(name: str, limit: int = 80) -> str:
    """A file name stem for ``name`` that is never a path and never the stem of another name.

    Names of letters, digits, ``.``, ``_`` and ``-`` (not starting with a dot) up to ``limit`` characters stay
    as they are; any other name keeps its safe characters and gains 8 hex digits of its sha256, so that
    ``a/b``, ``a_b`` and two names in another script all get different files.
    """
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._")[:limit] or "task"
    if cleaned == name:
        return name
    return f"{cleaned}-{hashlib.sha256(name.encode('utf-8', 'surrogatepass')).hexdigest()[:8]}"


def refuse_non_regular(path: Path) -> None:
    """Raise ``CannotWrite`` when ``path`` exists and is not a regular file (a link counts as not regular)."""
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    except OSError as exc:
        raise CannotWrite(path, exc.strerror or str(exc)) from None
    if not stat.S_ISREG(mode):
        raise CannotWrite(path, "it exists and is not a regular file; dvn replaces regular files only")


def write_atomic(
    path: str | os.PathLike,
    data: bytes | IO[bytes],
    verify: Callable[[str], None] | None = None,
) -> Path:
    """Write ``data`` (bytes or a binary stream) to ``path`` atomically, with the usual permissions.

    Args:
        path: the file to create or replace; missing parent folders are created.
        data: the content.
        verify: called with the hex sha256 of what was written, before it is renamed into place; whatever it
            raises aborts the write and leaves ``path`` untouched.

    Raises:
        CannotWrite: the folder or file cannot be written (permissions, full disk, not a regular file, ...).
    """
    path = Path(path)
    refuse_non_regular(path)
    tmp: Path | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name[:200]}.", suffix=".tmp", dir=path.parent)
        tmp = Path(tmp_name)
        digest = hashlib.sha256()
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o666 & ~process_umask())  # mkstemp makes 0600; a saved model is ordinary
            is_bytes = isinstance(data, bytes | bytearray | memoryview)
            chunks = [data] if is_bytes else iter(lambda: data.read(_BLOCK), b"")
            for chunk in chunks:
                digest.update(chunk)
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        if verify is not None:
            verify(digest.hexdigest())
        os.replace(tmp, path)
        tmp = None
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as exc:
        raise CannotWrite(path, exc.strerror or str(exc)) from None
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
    return path
