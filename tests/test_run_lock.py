"""One run folder, one ``dvn train``: a second run into a folder in use is refused in one line and changes nothing."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dvn_cli.errors import BadConfig
from dvn_cli.modelfile.checkpoint import load_checkpoint
from dvn_cli.training.run_folder import RunLock, RunPaths

from .conftest import make_image_folder
from .test_faults import _subprocess_env, _tiny_train_args, invoke, one_error_line, sha256


def _hashes(folder: Path) -> dict[str, str]:
    return {f.name: sha256(f) for f in folder.iterdir() if f.name != ".lock"}


def test_the_lock_excludes_a_second_holder_and_goes_away_on_release(tmp_path):
    paths = RunPaths(tmp_path)
    first = RunLock.acquire(paths)
    assert paths.lock.read_text() == f"{os.getpid()}\n"
    with pytest.raises(BadConfig, match=rf"is in use by another dvn train \(pid {os.getpid()}\)"):
        RunLock.acquire(paths)  # flock locks belong to the open file: a second open in one process is refused too
    first.release()
    first.release()  # twice is harmless
    assert not paths.lock.exists()
    paths.lock.write_text("999999\n")  # left by a run killed outright: nobody holds it
    second = RunLock.acquire(paths)
    assert paths.lock.read_text() == f"{os.getpid()}\n"
    second.release()


@pytest.fixture
def tasks(tmp_path) -> str:
    make_image_folder(tmp_path / "colours", per_class=8)
    make_image_folder(tmp_path / "bands", ("top", "middle"), per_class=8)
    return f"colours={tmp_path / 'colours'},bands={tmp_path / 'bands'}"


def _in_use(run: Path, pid: int) -> str:
    return f"error: {run} is in use by another dvn train (pid {pid}); wait for it to end, or choose another --out"


def test_a_second_train_while_another_trains_into_the_folder_is_refused(tasks, tmp_path):
    """Two real ``dvn train --force`` into one ``--out``: the second is one line, the first goes on."""
    run = tmp_path / "run"
    args = _tiny_train_args(tasks, run, tmp_path / "data", "--force")
    first = subprocess.Popen(
        [sys.executable, "-m", "dvn_cli", *args, "--epochs", "5000"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=_subprocess_env(),
    )
    try:
        deadline = time.monotonic() + 60
        while not _holder(run) and time.monotonic() < deadline:
            assert first.poll() is None, first.stderr.read()
            time.sleep(0.01)
        assert _holder(run) == str(first.pid)
        one_error_line(invoke(*args, "--epochs", 1), _in_use(run, first.pid))
        assert first.poll() is None
    finally:
        first.kill()
        first.wait()


def _holder(run: Path) -> str:
    try:
        return (run / ".lock").read_text().strip()
    except FileNotFoundError:
        return ""


def test_a_folder_in_use_is_refused_for_every_kind_of_run_and_changes_nothing(tasks, tmp_path):
    run = tmp_path / "run"
    args = _tiny_train_args(tasks, run, tmp_path / "data", "--epochs", 1)
    assert invoke(*args).exit_code == 0
    before = _hashes(run)
    lock = RunLock.acquire(RunPaths(run))  # as another dvn train holds it
    try:
        for extra in (["--force"], ["--resume"], []):
            one_error_line(invoke(*args, *extra), _in_use(run, os.getpid()))
        one_error_line(invoke("train", "--resume", "--out", run), _in_use(run, os.getpid()))
        assert _hashes(run) == before
    finally:
        lock.release()
    (run / ".lock").write_text("12345\n")  # left by a run killed outright: unlocked, so the next run takes it
    forced = invoke(*args, "--force", "--seed", 7)
    assert forced.exit_code == 0, forced.output
    assert load_checkpoint(run / "model.safetensors").training["config"]["seed"] == 7
    assert not (run / ".lock").exists()
