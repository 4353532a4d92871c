"""An export folder is replaced by a staged swap: a new export never loses the previous one, never rewrites a file in
place, and removes only the files of the previous export that its manifest listed and no longer lists."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dvn_cli.cli.app import app
from dvn_cli.errors import CannotWrite
from dvn_cli.export import folder as export_folder
from dvn_cli.export.pairs import export_models
from dvn_cli.export.shared import export_shared
from dvn_cli.fsutil import FolderLock, sha256_file
from dvn_cli.modelfile.checkpoint import load_checkpoint, save_checkpoint
from dvn_cli.modelfile.shared_weights import WEIGHTS_NAME
from dvn_cli.runtime.ort import SharedOrtRuntime

from .conftest import settle_batch_norm

runner = CliRunner()


@pytest.fixture
def checkpoint(tiny_network, tmp_path):
    return load_checkpoint(save_checkpoint(settle_batch_norm(tiny_network), tmp_path / "model.safetensors"))


@pytest.fixture
def other_checkpoint(scrambled_network, tmp_path):
    """Another source file with the same task names (task0..task2), so its files take the same names."""
    return load_checkpoint(save_checkpoint(settle_batch_norm(scrambled_network), tmp_path / "other.safetensors"))


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every entry of ``folder`` (hidden ones included: a staging folder left behind shows) and its bytes."""
    return {p.name: p.read_bytes() if p.is_file() else b"<dir>" for p in folder.iterdir()}


# ------------------------------------------------------------------------------------------------ stale files


def test_a_smaller_export_removes_what_the_larger_one_wrote_and_says_so(checkpoint, other_checkpoint, tmp_path):
    out = tmp_path / "served"
    larger = export_shared(checkpoint, out, check=False)
    assert len(larger["models"]) == 8
    (out / "notes.txt").write_text("mine")  # a user's files, which no manifest lists
    (out / "mine-level1.onnx").write_bytes(b"not dvn's")
    args = ["export", "--shared", "--force", "--no-check", "-c", other_checkpoint.path, "-o", out]
    result = runner.invoke(app, [str(a) for a in [*args, "--task", "task2", "--budget", "1"]])
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert [m["file"] for m in manifest["models"]] == ["task2-level1.onnx"]
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["manifest.json", WEIGHTS_NAME, "task2-level1.onnx", "notes.txt", "mine-level1.onnx"]
    )
    stale = [m["file"] for m in larger["models"]]
    assert f"removed 8 files of the previous export: {', '.join(stale)}" in result.stderr
    assert SharedOrtRuntime(out).pairs() == [("task2", 1)]


def test_per_pair_export_removes_files_of_its_other_format_and_of_a_shared_export(checkpoint, tmp_path):
    out = tmp_path / "out"
    shared = export_shared(checkpoint, out, [("task0", 2)], check=False)
    onnx = export_models(checkpoint, out, [("task0", 2), ("task1", 1)], check=False)
    assert onnx.removed == (WEIGHTS_NAME,)  # the shared graph task0-level2.onnx was replaced by the per-pair one
    assert [m["file"] for m in shared["models"]] == ["task0-level2.onnx"]
    program = export_models(checkpoint, out, [("task0", 2)], check=False, format="torch-export")
    assert program.removed == ("task0-level2.onnx",) and program.left == ()
    files = sorted(m["file"] for m in program["models"])
    assert files == ["task0-level2.pt2", "task1-level1.onnx"]  # the other pair of the same source is kept
    assert sorted(p.name for p in out.iterdir()) == sorted(["manifest.json", *files])


def test_only_unchanged_plain_names_the_old_manifest_listed_are_removed(checkpoint, tmp_path):
    out = tmp_path / "out"
    export_models(checkpoint, out, [("task0", 1), ("task0", 2), ("task0", 3)], check=False)
    outside = tmp_path / "outside.txt"
    outside.write_text("not in the folder")
    (out / "task0-level2.onnx").write_bytes(b"changed by the user")
    (out / "task0-level3.onnx").unlink()
    (out / "task0-level3.onnx").symlink_to(outside)
    manifest = json.loads((out / "manifest.json").read_text())
    for file in ("../outside.txt", str(outside), ".", "manifest.json", None, 3):
        manifest["models"].append({"task": "x", "level": 1, "file": file, "sha256": sha256_file(outside)})
    (out / "manifest.json").write_text(json.dumps(manifest))
    result = export_models(checkpoint, out, [("task1", 1)], check=False, force=True)  # force: nothing is kept
    assert result.removed == ("task0-level1.onnx",)
    assert result.left == ("task0-level2.onnx", "task0-level3.onnx")  # changed since, and not a regular file
    assert outside.read_text() == "not in the folder" and (out / "task0-level3.onnx").is_symlink()
    assert sorted(p.name for p in out.iterdir()) == [
        "manifest.json", "task0-level2.onnx", "task0-level3.onnx", "task1-level1.onnx"
    ]  # fmt: skip


def test_a_merge_skips_entries_that_are_not_what_dvn_writes(checkpoint, tmp_path):
    out = tmp_path / "out"
    export_models(checkpoint, out, [("task0", 1), ("task0", 2)], check=False)
    (out / "task0-level2.onnx").unlink()
    (out / "task0-level2.onnx").symlink_to(out / "task0-level1.onnx")
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["models"][1]["sha256"] = manifest["models"][0]["sha256"]  # the link's target holds what it says
    manifest["models"].append({"task": ["x"], "level": {}, "file": "task0-level1.onnx"})  # values that do not hash
    (out / "manifest.json").write_text(json.dumps(manifest))
    merged = export_models(checkpoint, out, [("task1", 1)], check=False)
    assert [m["file"] for m in merged["models"]] == ["task0-level1.onnx", "task1-level1.onnx"]  # the link is dropped


def test_cli_names_the_files_it_left(checkpoint, tmp_path):
    out = tmp_path / "out"
    export_models(checkpoint, out, [("task0", 1)], check=False)
    (out / "task0-level1.onnx").write_bytes(b"changed by the user")
    args = ["export", "-c", str(checkpoint.path), "-o", str(out), "--no-check", "--task", "task1", "--budget", "1"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "left 1 files the previous manifest listed, changed since: task0-level1.onnx" in result.stderr


# ------------------------------------------------------------------------------------------------ the swap


def test_a_reexport_replaces_files_and_never_rewrites_one_in_place(checkpoint, other_checkpoint, tmp_path):
    """A process that holds the old weights file (mapped, or open) keeps reading the old bytes: the new file is
    another inode renamed over the name. An fd is read here rather than a mapping, so that a regression fails
    this test instead of crashing it with a bus error."""
    shared, per_pair = tmp_path / "shared", tmp_path / "per-pair"
    export_shared(checkpoint, shared, [("task0", 2), ("task1", 3)], check=False)
    export_models(checkpoint, per_pair, [("task0", 1)], check=False)
    held = [shared / WEIGHTS_NAME, shared / "task0-level2.onnx", per_pair / "task0-level1.onnx"]
    before = [path.read_bytes() for path in held]
    fds = [os.open(path, os.O_RDONLY) for path in held]
    try:
        export_shared(other_checkpoint, shared, [("task0", 2), ("task2", 1)], check=False, force=True)
        export_models(other_checkpoint, per_pair, [("task0", 1)], check=False, force=True)
        for path, fd, old in zip(held, fds, before, strict=True):
            assert path.read_bytes() != old  # the name holds the new export
            assert os.fstat(fd).st_ino != path.stat().st_ino
            assert os.fstat(fd).st_size == len(old) and os.pread(fd, len(old) + 1, 0) == old, path.name
    finally:
        for fd in fds:
            os.close(fd)


@pytest.mark.parametrize("fail_at", ["task0-level2.onnx", "manifest.json"])
def test_a_swap_that_fails_puts_the_previous_export_back(checkpoint, other_checkpoint, tmp_path, monkeypatch, fail_at):
    out = tmp_path / "out"
    export_shared(checkpoint, out, [("task0", 2), ("task1", 3)], check=False)
    (out / "notes.txt").write_text("mine")
    before = snapshot(out)
    replace = os.replace

    def failing_replace(src, dst):
        if Path(src).parent.name.startswith(".dvn-export-") and Path(dst) == out / fail_at:
            raise OSError(28, "No space left on device")
        return replace(src, dst)

    monkeypatch.setattr(export_folder.os, "replace", failing_replace)
    message = f"^cannot write to {re.escape(str(out / fail_at))}: No space left on device$"
    with pytest.raises(CannotWrite, match=message):
        export_shared(other_checkpoint, out, [("task0", 2), ("task2", 1)], check=False, force=True)
    monkeypatch.undo()
    assert snapshot(out) == before  # the weights file and graphs swapped before the failure are back
    assert SharedOrtRuntime(out).pairs() == [("task0", 2), ("task1", 3)]


def test_a_link_or_folder_under_a_file_name_is_refused_and_nothing_changes(checkpoint, tmp_path):
    out = tmp_path / "out"
    export_models(checkpoint, out, [("task0", 1)], check=False)
    target = tmp_path / "elsewhere.onnx"
    target.write_bytes(b"a file outside")
    (out / "task0-level2.onnx").symlink_to(target)
    (out / "task1-level1.onnx").mkdir()
    before = snapshot(out)
    for pair in [("task0", 2), ("task1", 1)]:
        with pytest.raises(CannotWrite, match="not a regular file"):
            export_models(checkpoint, out, [("task0", 1), pair], check=False)
        assert snapshot(out) == before
    assert target.read_bytes() == b"a file outside"


# ------------------------------------------------------------------------------------------------ one export at a time


def _in_use(out: Path, pid: int) -> str:
    return f"error: {out} is in use by another dvn export (pid {pid}); wait for it to end, or choose another --out\n"


def test_an_export_into_a_folder_another_export_holds_is_refused_and_changes_nothing(
    checkpoint, other_checkpoint, tmp_path
):
    """Two exports into one folder at once both reported success while one export was gone (issue 29): the folder
    is locked for the whole export, as dvn train locks its run folder, so the second is one line and exit 1."""
    out = tmp_path / "served"
    export_shared(checkpoint, out, check=False)
    lock = FolderLock.acquire(out, "dvn export", "--out")  # as another export holds it
    try:
        before = snapshot(out)
        args = ["export", "--no-check", "--force", "-c", str(other_checkpoint.path), "-o", str(out)]
        shared = subprocess.run(
            [sys.executable, "-m", "dvn_cli", *args, "--shared", "--precision", "int8"],
            capture_output=True,
            text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
            timeout=300,
        )
        assert (shared.returncode, shared.stdout, shared.stderr) == (1, "", _in_use(out, os.getpid()))
        per_pair = runner.invoke(app, args)
        assert (per_pair.exit_code, per_pair.stderr) == (1, _in_use(out, os.getpid())), per_pair.output
        assert snapshot(out) == before
    finally:
        lock.release()
    result = runner.invoke(app, [*args, "--shared", "--precision", "int8", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == json.loads((out / "manifest.json").read_text())
    assert not (out / ".lock").exists()  # released when the export ends


def test_a_failed_export_releases_the_folder(checkpoint, tmp_path, monkeypatch):
    out = tmp_path / "served"
    monkeypatch.setattr(export_folder.ExportStage, "commit", lambda self, manifest: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        export_shared(checkpoint, out, check=False)
    assert not out.exists()  # the folder it created is removed again
    out.mkdir()
    with pytest.raises(ZeroDivisionError):
        export_models(checkpoint, out, check=False)
    assert list(out.iterdir()) == []  # nor does a lock stay behind in a folder that was there
    monkeypatch.undo()
    assert export_models(checkpoint, out, check=False)["models"]
