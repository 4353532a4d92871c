"""File helpers that need no torch: atomic writes, folder locks, output paths, sha256, one-line error text.

Every file dvn writes goes through ``write_atomic``: a temporary file in the same folder, fsync, rename. Readers
see the old file or the whole new one, never a part, and a failed write leaves the old file as it was. Only
regular files are ever replaced: a device node, a FIFO, a folder or a link under the target name is refused.

What format a file holds is ``fileformats.py``'s question.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import hashlib
import os
import re
import stat
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Protocol, TypeVar

from .errors import BadConfig, CannotWrite, DvnError, WrongFileFormat

__all__ = [
    "LOCK_NAME",
    "FolderLock",
    "check_output_file",
    "first_line",
    "process_umask",
    "refuse_non_regular",
    "safe_file_stem",
    "sha256_file",
    "unusable_tensor",
    "write_atomic",
]

_BLOCK = 1 << 20


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (or its type name), for one-line user errors."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def unusable_tensor(label: object, name: str, problem: str = "non-finite values (NaN or infinity)") -> WrongFileFormat:
    """The one refusal of a tensor read from a file that no meaningful result can follow from (``problem``): a
    checkpoint's, a bundle's or a shared weights file's NaN or infinity, an int8 scale that is not > 0."""
    return WrongFileFormat(f"{label} holds {problem} in {name}; it cannot be used")


def process_umask() -> int:
    """The process umask (``os.umask`` can only read it by setting it, so set it back at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def sha256_file(path: str | os.PathLike | int) -> str:
    """Hex sha256 of a file's bytes, read in chunks; ``path`` may be an open file descriptor, which is closed."""
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


def check_output_file(
    path: str | os.PathLike,
    reads: Iterable[str | os.PathLike | None] = (),
    replace: bool | None = None,
    hint: str = "",
) -> Path:
    """``path`` when dvn may write a file there, checked before any work: it is not an existing non-regular file
    (``refuse_non_regular``), its folder exists (a file dvn is asked to write gets no folders made for it), it is
    none of the files the command reads (``reads``), under any name: the same path, a link, a hard link, and, unless
    ``replace`` (a model file's ``--force``; None: a report the command may rewrite), it does not exist yet.

    Raises:
        CannotWrite: one line saying which (``hint`` adds a way out to the existing file's refusal).
    """
    path = Path(path)
    refuse_non_regular(path)
    if not path.parent.is_dir():
        missing = "does not exist" if not path.parent.exists() else "is not a folder"
        raise CannotWrite(path, f"{path.parent} {missing}; create the folder first or choose another file")
    for source in reads:
        if source is None:
            continue
        same = False
        with contextlib.suppress(OSError):  # a path that does not exist is no file being read
            same = os.path.samefile(path, source)
        if same:
            other = "" if Path(source) == path else f" ({source}, under another name)"
            raise CannotWrite(path, f"it is the file this command reads{other}; choose another file")
    if replace is False and path.exists():
        raise CannotWrite(path, f"it already exists; pass --force to replace it{hint}")
    return path


LOCK_NAME = ".lock"

_Lock = TypeVar("_Lock", bound="FolderLock")


class FolderLock:
    """An exclusive, non-blocking ``flock`` on ``<folder>/.lock`` for as long as a command writes the folder, so two
    commands never write one folder at once (``dvn train``'s run folder, an export folder).

    The file holds the holder's process id for the refusal message. ``release`` removes the file while still
    holding the lock, and ``acquire`` checks that the file it locked is still the one at the path, so a process that
    opened the file just before it was removed never believes it holds the lock. A process killed outright leaves
    the file behind, unlocked: the kernel drops the lock with the process, and the next command takes it.
    """

    def __init__(self, path: Path | None = None, fd: int | None = None) -> None:
        self.path, self.fd = path, fd

    @classmethod
    def acquire(cls: type[_Lock], folder: Path, command: str, option: str) -> _Lock:
        """Lock ``folder`` (which must exist) for ``command`` (``dvn train``), or refuse in one line naming the
        process that holds it and the ``option`` that chooses another folder."""
        path = Path(folder) / LOCK_NAME
        while True:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                raise DvnError(f"cannot create {path} ({exc.strerror or exc}); choose another {option}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_pid(fd)
                os.close(fd)
                raise BadConfig(
                    f"{folder} is in use by another {command} (pid {holder}); wait for it to end, "
                    f"or choose another {option}"
                ) from None
            except OSError as exc:
                os.close(fd)
                if exc.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):  # a filesystem without flock
                    return cls()
                raise
            if _same_file(fd, path):
                break
            os.close(fd)  # the holder removed it meanwhile: lock the new one
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        return cls(path, fd)

    def release(self) -> None:
        """Remove the lock file and drop the lock (no-op when not held)."""
        if self.fd is None:
            return
        try:
            if self.path is not None:
                self.path.unlink(missing_ok=True)
        finally:
            os.close(self.fd)
            self.fd = None


def _read_pid(fd: int) -> str:
    with contextlib.suppress(OSError, ValueError):
        return str(int(os.pread(fd, 32, 0).decode().strip()))
    return "unknown"


def _same_file(fd: int, path: Path) -> bool:
    try:
        on_path = os.stat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (mine.st_dev, mine.st_ino) == (on_path.st_dev, on_path.st_ino)


class BinaryReader(Protocol):
    """A binary stream ``write_atomic`` copies: an open file, a ``gzip`` file, a ``tarfile`` member, ``BytesIO``."""

    def read(self, size: int = ..., /) -> bytes: ...


def write_atomic(
    path: str | os.PathLike,
    data: bytes | BinaryReader,
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
            if isinstance(data, bytes | bytearray | memoryview):
                chunks: Iterable[bytes | bytearray | memoryview] = [data]
            else:
                chunks = iter(functools.partial(data.read, _BLOCK), b"")
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
