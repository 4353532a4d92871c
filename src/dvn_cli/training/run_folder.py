"""The run folder of ``dvn train``: its files, the lock that keeps a second run out, and its stored configuration.

A run folder holds ``model.safetensors`` (the checkpoint), ``train_state.safetensors`` (everything ``--resume``
needs, with the settings it compares), ``metrics.jsonl`` and ``config.json`` (the whole configuration). While a
run trains, ``.lock`` holds its process id under an exclusive ``flock``; it is removed when the run ends.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import BadConfig, MissingData, WrongFileFormat
from ..fsutil import LOCK_NAME, FolderLock
from ..modelfile.checkpoint import STATE_FORMAT
from ..modelfile.container import read_metadata
from ..user_config import NOT_COMPARED

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
        return self.out / LOCK_NAME


class RunLock(FolderLock):
    """``fsutil.FolderLock`` on the run folder for the whole run, so two runs never share a folder (nor a run and an
    export into it)."""

    @classmethod
    def acquire(cls, folder: RunPaths | Path, command: str = "dvn train", option: str = "--out") -> RunLock:
        """Lock the run folder ``folder.out`` (which must exist), or refuse in one line naming the process that
        holds it; a plain folder, command and option are taken as ``FolderLock.acquire`` takes them."""
        return super().acquire(folder.out if isinstance(folder, RunPaths) else folder, command, option)


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
