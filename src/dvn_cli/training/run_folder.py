"""The run folder of ``dvn train``: its files, the lock that keeps a second run out, and its stored configuration.

A run folder holds ``model.safetensors`` (the checkpoint), ``train_state.safetensors`` (everything ``--resume``
needs, with the settings it compares), ``metrics.jsonl`` and ``config.json`` (the whole configuration). While a
run trains, ``.lock`` holds its process id under an exclusive ``flock``; it is removed when the run ends.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import NOT_COMPARED
from ..errors import BadConfig, DvnError, MissingData, WrongFileFormat
from ..modelfile.checkpoint import STATE_FORMAT
from ..modelfile.container import read_metadata

__all__ = ["RunLock", "RunPaths", "prepare_run_folder", "stored_config"]


@dataclass
class RunPaths:
    """The files of one run folder."""

    out: Path

    @property
    def checkpoint(self) -> Path:
        return self.out / "model.safetensors"

    @property
    def state(self) -> Path:
        return self.out / "train_state.safetensors"

    @property
    def metrics(self) -> Path:
        return self.out / "metrics.jsonl"

    @property
    def config(self) -> Path:
        return self.out / "config.json"

    @property
    def lock(self) -> Path:
        return self.out / ".lock"


class RunLock:
    """An exclusive, non-blocking ``flock`` on ``<out>/.lock`` for the whole run, so two runs never share a folder.

    The file holds the holder's process id for the refusal message. ``release`` removes the file while still
    holding the lock, and ``acquire`` checks that the file it locked is still the one at the path, so a run that
    opened the file just before it was removed never believes it holds the lock. A run killed outright leaves the
    file behind, unlocked: the kernel drops the lock with the process, and the next run takes it.
    """

    def __init__(self, path: Path | None = None, fd: int | None = None) -> None:
        self.path, self.fd = path, fd

    @classmethod
    def acquire(cls, paths: RunPaths) -> RunLock:
        """Lock ``paths.out`` (which must exist), or refuse in one line naming the process that holds it."""
        while True:
            try:
                fd = os.open(paths.lock, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                raise DvnError(f"cannot create {paths.lock} ({exc.strerror or exc}); choose another --out") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_pid(fd)
                os.close(fd)
                raise BadConfig(
                    f"{paths.out} is in use by another dvn train (pid {holder}); wait for it to end, "
                    "or choose another --out"
                ) from None
            except OSError as exc:
                os.close(fd)
                if exc.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):  # a filesystem without flock
                    return cls()
                raise
            if _same_file(fd, paths.lock):
                break
            os.close(fd)  # the run that held it removed it meanwhile: lock the new one
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        return cls(paths.lock, fd)

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


def _check_out(paths: RunPaths) -> None:
    if paths.out.exists() and not paths.out.is_dir():
        raise BadConfig(f"--out {paths.out} is a file, not a folder; choose another --out")


def _check_resumable(paths: RunPaths) -> None:
    if not paths.state.is_file():
        raise MissingData(f"nothing to resume in {paths.out}: no {paths.state.name}; train without --resume")


def prepare_run_folder(paths: RunPaths, resume: bool, force: bool, main: bool) -> RunLock:
    """Check ``paths.out`` can take this run, and (``main``) create and lock it and drop stale temporaries.

    Returns the run's lock (an empty one on other ranks than 0); the caller releases it when the run ends.
    """
    _check_out(paths)
    if resume:
        _check_resumable(paths)
    lock = RunLock()
    if main:
        paths.out.mkdir(parents=True, exist_ok=True)
        lock = RunLock.acquire(paths)
    try:
        if resume:
            _check_resumable(paths)  # again, now that no other run can change the folder
        holds_run = paths.checkpoint.exists() or paths.state.exists()
        if not resume and not force and holds_run:
            raise BadConfig(
                f"{paths.out} already holds a run; pass --resume to continue it, --force to replace it, "
                "or --out for a new folder"
            )
        if main:
            _remove_stale_temporaries(paths)
    except BaseException:
        lock.release()
        raise
    return lock


def _remove_stale_temporaries(paths: RunPaths) -> None:
    """Delete the temporary files of writes that a killed run left behind (never a finished file)."""
    for target in (paths.checkpoint, paths.state, paths.metrics, paths.config):
        for tmp in paths.out.glob(f".{target.name}.*.tmp"):
            tmp.unlink(missing_ok=True)


def stored_config(paths: RunPaths) -> dict[str, Any]:
    """The configuration of the run in ``paths.out``, as ``TrainConfig.to_dict`` gives it, for a bare ``--resume``.

    The settings ``--resume`` compares come from the training state (the file resume continues from); where and
    how the run computed (``NOT_COMPARED`` but ``out``) from ``config.json`` when it can be read.
    """
    _check_out(paths)
    _check_resumable(paths)
    config = read_metadata(paths.state, (STATE_FORMAT,)).get("config")
    if not isinstance(config, dict):
        raise WrongFileFormat(f"{paths.state} holds no run configuration; cannot resume")
    stored = dict(config)
    try:
        written = json.loads(paths.config.read_text())
    except (OSError, ValueError):
        written = {}
    if isinstance(written, dict):
        stored.update({k: written[k] for k in NOT_COMPARED if k != "out" and k in written})
    return stored
