"""Faults and bad input: dvn keeps working and loses nothing.

Kills (SIGKILL) during a checkpoint write and during training, a non-finite loss, broken model files given to every
command that reads one, awkward image folders, out-of-range budgets and tasks, an existing output folder, and a
source scan that no code path unpickles.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from typer.testing import CliRunner

from dvn_cli.modelfile.checkpoint import load_checkpoint
from dvn_cli.modelfile.container import read_metadata

from .conftest import REPO, make_image_folder

SRC = REPO / "src" / "dvn_cli"
runner = CliRunner()


def invoke(*args):
    from dvn_cli.cli.app import app

    return runner.invoke(app, [str(a) for a in args])


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def one_error_line(result, starts: str = "error: ", after_progress: bool = False) -> None:
    """Exit code 1 and one ``error:`` line on stderr (the last one, after progress output if it trained)."""
    assert result.exit_code == 1, result.output
    lines = result.stderr.splitlines()
    assert result.stderr.endswith("\n") and lines, result.stderr
    assert lines[-1].startswith(starts), result.stderr
    assert [line for line in lines if "error" in line] == [lines[-1]], result.stderr
    if not after_progress:
        assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.output


def _subprocess_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}


def _tiny_train_args(tasks: str, out: Path, data_root: Path, *extra) -> list[str]:
    return [
        "train", "--tasks", tasks, "--depth", "8", "--widths", "8,16,32", "--input-size", "16",
        "--batch-size", "8", "--lr", "0.05", "--warmup-steps", "2", "--data-root", str(data_root),
        "--out", str(out), *map(str, extra),
    ]  # fmt: skip


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny trained run: (base folder, run folder, the train args that made it)."""
    base = tmp_path_factory.mktemp("faults")
    make_image_folder(base / "colours")
    make_image_folder(base / "bands", ("top", "middle"), per_class=10)
    tasks = f"colours={base / 'colours'},bands={base / 'bands'}"
    args = _tiny_train_args(tasks, base / "run", base / "data", "--epochs", 1)
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    return base, base / "run", args


# ------------------------------------------------------------------------------------------------- SIGKILL

_SLOW_WRITER = """
import os, sys, time
import torch
from dvn_cli.modelfile.checkpoint import save_checkpoint
from dvn_cli.config import BackboneConfig, TaskSpec
from dvn_cli.core.network import build_network

path = sys.argv[1]
cfg = BackboneConfig(depth=8, widths=(8, 16, 32), units=4, in_channels=3, input_size=12)
torch.manual_seed(0)
save_checkpoint(build_network(cfg, [TaskSpec("a", ("x", "y"))]), path)
print("saved", flush=True)

real_fdopen = os.fdopen

class Slow:
    def __init__(self, f):
        self.f = f
    def __enter__(self):
        return self
    def __exit__(self, *exc):
        return self.f.__exit__(*exc)
    def write(self, data):
        self.f.write(data[: len(data) // 2])
        self.f.flush()
        print("writing", flush=True)
        time.sleep(60)
    def __getattr__(self, name):
        return getattr(self.f, name)

os.fdopen = lambda *a, **k: Slow(real_fdopen(*a, **k))
torch.manual_seed(1)
save_checkpoint(build_network(cfg, [TaskSpec("a", ("x", "y"))]), path)
print("finished", flush=True)
"""


def test_sigkill_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path):
    path = tmp_path / "model.safetensors"
    child = subprocess.Popen(
        [sys.executable, "-c", _SLOW_WRITER, str(path)], stdout=subprocess.PIPE, text=True, env=_subprocess_env()
    )
    try:
        assert child.stdout.readline().strip() == "saved"
        before = sha256(path)
        assert child.stdout.readline().strip() == "writing"  # half of the new file is on disk, under a temp name
        temporaries = list(tmp_path.glob(".model.safetensors.*.tmp"))
        assert len(temporaries) == 1 and temporaries[0].stat().st_size > 0
        child.send_signal(signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
    assert child.returncode == -signal.SIGKILL
    assert sha256(path) == before
    ckpt = load_checkpoint(path)
    assert ckpt.network.task_names == ["a"]
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".tmp")) == ["model.safetensors"]


# The tests of the shared uninterrupted run go to one worker, which trains it once (make test runs two workers).
SHARES_STRAIGHT = pytest.mark.xdist_group("faults_straight")


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """Two small folder tasks trained uninterrupted, once for the module: ``(its run folder, command(out, *extra))``,
    the same run's command line for another folder (the runs a stop and resume are compared with)."""
    base = tmp_path_factory.mktemp("straight")
    make_image_folder(base / "colours")
    make_image_folder(base / "bands", ("top", "middle"), per_class=10)
    tasks = f"colours={base / 'colours'},bands={base / 'bands'}"

    def command(out: Path, *extra) -> list[str]:
        args = _tiny_train_args(tasks, out, base / "data", "--epochs", 15, "--seed", 4, *extra)
        return [sys.executable, "-m", "dvn_cli", *args]

    run = subprocess.run(command(base / "straight"), capture_output=True, text=True, env=_subprocess_env())
    assert run.returncode == 0, run.stderr[-2000:]
    return base / "straight", command


@SHARES_STRAIGHT
def test_sigkill_during_training_then_resume_matches_an_uninterrupted_run(straight, tmp_path):
    uninterrupted, command = straight

    killed = tmp_path / "killed"
    child = subprocess.Popen(
        command(killed), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_subprocess_env()
    )
    try:
        deadline = time.monotonic() + 60
        while not (killed / "train_state.safetensors").exists() and time.monotonic() < deadline:
            time.sleep(0.005)
        child.send_signal(signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
    assert child.returncode == -signal.SIGKILL
    state = read_metadata(killed / "train_state.safetensors")
    total = read_metadata(uninterrupted / "model.safetensors")["training"]["total_steps"]
    assert 0 < state["step"] < total, "the run finished before it was killed; make it longer"

    one_error_line(invoke(*command(killed)[3:]), f"error: {killed} already holds a run; pass --resume")
    resumed = subprocess.run(command(killed, "--resume"), capture_output=True, text=True, env=_subprocess_env())
    assert resumed.returncode == 0, resumed.stderr[-2000:]

    a = load_checkpoint(uninterrupted / "model.safetensors")
    b = load_checkpoint(killed / "model.safetensors")
    assert b.training["finished"] and b.training["steps"] == total
    for name, tensor in a.network.state_dict().items():
        assert torch.equal(tensor, b.network.state_dict()[name]), name

    def history(run: Path) -> list[dict]:
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in row.items() if k != "seconds"} for row in rows]

    assert history(killed) == history(uninterrupted)
    assert not list(killed.glob(".*.tmp"))


def _start_and_wait_for_a_save(command: list[str], out: Path) -> subprocess.Popen:
    """Start ``dvn train``; return once its first save (an epoch end) is on disk, mid-run."""
    child = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=_subprocess_env()
    )
    deadline = time.monotonic() + 120
    while not (out / "train_state.safetensors").exists() and time.monotonic() < deadline and child.poll() is None:
        time.sleep(0.005)
    return child


def _children(pid: int) -> list[int]:
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return [int(p) for p in text.split()]


@pytest.mark.slow
@SHARES_STRAIGHT
def test_sigterm_saves_like_ctrl_c_and_the_resume_matches_an_uninterrupted_run(straight, tmp_path):
    """Schedulers stop jobs with SIGTERM: once exit 143 with no message, no checkpoint and a stale .lock."""
    uninterrupted, command = straight
    stopped = tmp_path / "stopped"
    child = _start_and_wait_for_a_save(command(stopped), stopped)
    try:
        child.send_signal(signal.SIGTERM)
        _, stderr = child.communicate(timeout=120)
    finally:
        child.kill()
    assert child.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    step = read_metadata(stopped / "train_state.safetensors")["step"]
    assert stderr.splitlines()[-1] == (
        f"error: stopped by SIGTERM; checkpoint of step {step} saved in {stopped}; continue with --resume"
    ), stderr[-2000:]
    assert "Traceback" not in stderr and not (stopped / ".lock").exists()
    resumed = subprocess.run(command(stopped, "--resume"), capture_output=True, text=True, env=_subprocess_env())
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a = load_checkpoint(uninterrupted / "model.safetensors").network.state_dict()
    b = load_checkpoint(stopped / "model.safetensors").network.state_dict()
    assert all(torch.equal(a[name], b[name]) for name in a)


@pytest.mark.slow
def test_a_killed_data_worker_ends_in_one_line_with_a_checkpoint(tmp_path):
    """Once a full traceback: ``RuntimeError: DataLoader worker (pid ...) is killed by signal: Killed.``"""
    make_image_folder(tmp_path / "colours")
    tasks = f"colours={tmp_path / 'colours'}"
    out = tmp_path / "run"
    args = _tiny_train_args(tasks, out, tmp_path / "data", "--epochs", 200, "--data-mode", "stream", "--workers", 2)
    child = _start_and_wait_for_a_save([sys.executable, "-m", "dvn_cli", *args], out)
    try:
        os.kill(_children(child.pid)[0], signal.SIGKILL)
        _, stderr = child.communicate(timeout=120)
    finally:
        child.kill()
    lines = stderr.splitlines()
    assert child.returncode == 1 and "Traceback" not in stderr, stderr[-3000:]
    assert lines[-1].startswith("error: a data worker "), lines[-1]
    step = read_metadata(out / "train_state.safetensors")["step"]
    assert lines[-1].endswith(f"; checkpoint of step {step} saved in {out}; --resume continues"), lines[-1]
    assert not (out / ".lock").exists()


def test_non_finite_loss_is_one_line_and_keeps_the_last_good_checkpoint(trained, tmp_path):
    base, run, args = trained
    copy = tmp_path / "run"
    copy.mkdir()
    for f in run.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    before = {f.name: sha256(f) for f in copy.iterdir() if f.name != "config.json"}
    out = args.index("--out") + 1
    result = invoke(*args[:out], copy, *args[out + 1 :], "--force", "--lr", "1e30", "--warmup-steps", 0)
    one_error_line(result, "error: the loss became nan at step", after_progress=True)
    assert f"the last good checkpoint is kept in {copy}; try a lower --lr" in result.stderr
    assert {f.name: sha256(f) for f in copy.iterdir() if f.name != "config.json"} == before
    assert load_checkpoint(copy / "model.safetensors").training["finished"]


def test_a_full_disk_while_saving_is_one_line_and_keeps_the_last_save(trained, tmp_path, monkeypatch):
    import errno

    base, run, args = trained
    copy = tmp_path / "run"
    copy.mkdir()
    for f in run.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    before = {f.name: sha256(f) for f in copy.iterdir() if f.name != "config.json"}

    def full_disk(*_args, **_kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("dvn_cli.training.epoch.save_checkpoint", full_disk)
    out = args.index("--out") + 1
    result = invoke(*args[:out], copy, *args[out + 1 :], "--force", "--seed", 5)
    one_error_line(result, f"error: cannot write the run into {copy} (No space left on device) at step 3", True)
    assert {f.name: sha256(f) for f in copy.iterdir() if f.name != "config.json"} == before


# --------------------------------------------------------------------------------------- broken model files


def _bad_files(tmp_path: Path, good: Path) -> dict[str, Path]:
    data = good.read_bytes()
    files = {
        "truncated": data[: len(data) // 2],
        "empty": b"",
        "random": random.Random(0).randbytes(4096),
    }
    paths = {}
    for kind, content in files.items():
        paths[kind] = tmp_path / f"{kind}.safetensors"
        paths[kind].write_bytes(content)
    paths["pickle"] = tmp_path / "pickle.safetensors"
    torch.save({"weight": torch.zeros(3)}, paths["pickle"])  # a torch.save file, renamed
    paths["foreign"] = tmp_path / "foreign.safetensors"
    save_file({"weight": torch.zeros(3)}, paths["foreign"])  # safetensors, not dvn
    paths["other-format"] = tmp_path / "other.safetensors"
    save_file({"weight": torch.zeros(3)}, paths["other-format"], metadata={"dvn": json.dumps({"format": "x"})})
    return paths


BAD_KINDS = ["truncated", "empty", "random", "pickle", "foreign", "other-format"]
MODEL_COMMANDS = {
    "eval": ["eval", "-c", "{file}"],
    "info": ["info", "-c", "{file}"],
    "plan": ["plan", "-c", "{file}", "--budget", "50%"],
    "prune-level": ["prune-level", "-c", "{file}", "--task", "colours", "--budget", "1", "-o", "{out}/c.safetensors"],
    "export": ["export", "-c", "{file}", "-o", "{out}/export"],
}


@pytest.mark.parametrize("command", list(MODEL_COMMANDS))
def test_every_command_refuses_broken_model_files_in_one_line(trained, tmp_path, command):
    base, run, _ = trained
    files = _bad_files(tmp_path, run / "model.safetensors")
    for kind in BAD_KINDS:
        path = files[kind]
        before = sha256(path)
        out = tmp_path / f"out-{kind}"
        args = [a.format(file=path, out=out) for a in MODEL_COMMANDS[command]]
        result = invoke(*args, *(["--data-root", base / "data"] if command == "eval" else []))
        one_error_line(result, f"error: {path} ")
        assert sha256(path) == before, kind
        assert not out.exists(), kind  # nothing written


@pytest.mark.parametrize("kind", [*BAD_KINDS, "checkpoint-as-state"])
def test_resume_refuses_a_broken_training_state_in_one_line(trained, tmp_path, kind):
    base, run, args = trained
    copy = tmp_path / "run"
    copy.mkdir()
    for f in run.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    files = _bad_files(tmp_path, run / "train_state.safetensors")
    files["checkpoint-as-state"] = run / "model.safetensors"
    (copy / "train_state.safetensors").write_bytes(files[kind].read_bytes())
    before = {f.name: sha256(f) for f in copy.iterdir()}
    out = args.index("--out") + 1
    result = invoke(*args[:out], copy, *args[out + 1 :], "--resume")
    one_error_line(result, f"error: {copy / 'train_state.safetensors'} ")
    assert {f.name: sha256(f) for f in copy.iterdir()} == before


# ------------------------------------------------------------------------------------------ image folders


def _train_folder(tmp_path: Path, folder: Path, *extra):
    tasks = f"pets={folder},colours={make_image_folder(tmp_path / 'colours', per_class=6)}"
    return invoke(*_tiny_train_args(tasks, tmp_path / "run", tmp_path / "data", "--epochs", 1, *extra))


def test_folder_with_an_empty_class_is_refused(tmp_path):
    folder = make_image_folder(tmp_path / "pets", ("cat", "dog"), per_class=6)
    (folder / "fox").mkdir()
    one_error_line(_train_folder(tmp_path, folder), f"error: class folder {folder / 'fox'} has no readable images")
    (folder / "fox" / "notes.txt").write_text("not an image")
    one_error_line(_train_folder(tmp_path, folder), f"error: class folder {folder / 'fox'} has no readable images")
    assert not (tmp_path / "run" / "model.safetensors").exists()


def test_folder_with_one_class_is_refused(tmp_path):
    folder = make_image_folder(tmp_path / "pets", ("cat",), per_class=6)
    one_error_line(_train_folder(tmp_path, folder), f"error: {folder} has only one class sub-folder ('cat')")


def test_missing_folder_and_folder_without_classes_are_refused(tmp_path):
    one_error_line(_train_folder(tmp_path, tmp_path / "nowhere"), "error: folder ")
    (tmp_path / "flat").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "flat" / "a.png")
    one_error_line(_train_folder(tmp_path, tmp_path / "flat"), f"error: {tmp_path / 'flat'} has no class sub-folders")


@pytest.mark.parametrize("mode", ["memory", "stream"])
def test_unreadable_files_are_skipped_counted_and_named(tmp_path, mode):
    """Training once only counted them ("3 unreadable files skipped"); each is named as dvn predict names it."""
    folder = make_image_folder(tmp_path / "pets", ("cat", "dog"), per_class=6)
    (folder / "cat" / "notes.txt").write_text("not an image")
    (folder / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    (folder / "dog" / "empty.jpg").write_bytes(b"")
    result = _train_folder(tmp_path, folder, "--data-mode", mode, "--workers", 0)
    assert result.exit_code == 0, result.output
    assert "pets: 9 train / 1 val / 2 test images, 2 classes" in result.stderr
    assert "3 unreadable files skipped" in result.stderr
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert warnings == [
        f"warning: cannot read {folder / name} as an image; skipped"
        for name in ("cat/notes.txt", "dog/broken.png", "dog/empty.jpg")
    ]


def test_many_unreadable_files_are_named_up_to_ten(tmp_path):
    folder = make_image_folder(tmp_path / "pets", ("cat", "dog"), per_class=6)
    for i in range(12):
        (folder / "cat" / f"notes{i:02d}.txt").write_text("not an image")
    result = _train_folder(tmp_path, folder)
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert warnings[:10] == [
        f"warning: cannot read {folder / 'cat'}/notes{i:02d}.txt as an image; skipped" for i in range(10)
    ]
    assert warnings[10:] == ["warning: and 2 more unreadable files of pets; skipped"]


def test_mixed_sizes_and_modes_train(tmp_path):
    folder = tmp_path / "pets"
    rng = random.Random(0)
    shapes = [(16, 16), (10, 30), (40, 24), (7, 7), (64, 20)]
    modes = ["RGB", "L", "RGBA", "P", "1", "I;16", "CMYK", "LA"]
    for c, name in enumerate(("cat", "dog")):
        (folder / name).mkdir(parents=True)
        for i in range(8):
            img = Image.new("RGB", shapes[i % len(shapes)], (200 * c, rng.randrange(256), 50))
            mode = modes[(i + c) % len(modes)]
            img = img.convert("L").convert(mode) if mode == "I;16" else img.convert(mode)
            img.save(folder / name / f"{i}.{'jpg' if mode == 'CMYK' else 'png'}")
    result = _train_folder(tmp_path, folder)
    assert result.exit_code == 0, result.output
    assert "pets: 11 train / 1 val / 4 test images, 2 classes, input 3x16x16" in result.stderr
    assert "unreadable" not in result.stderr
    assert load_checkpoint(tmp_path / "run" / "model.safetensors").network.task_names == ["pets", "colours"]


# ------------------------------------------------------------------------------- out-of-range and existing


@pytest.mark.parametrize(
    "args,message",
    [
        (["eval", "--budget", "0"], "error: bad budget '0': use a level (3)"),
        (["eval", "--budget", "-1"], "error: bad budget '-1'"),
        (["eval", "--budget", "5"], "error: level 5 does not exist: colours has levels 1..4"),
        (["eval", "--budget", "0%"], "error: bad budget '0%'"),
        (["eval", "--budget", "150%"], "error: bad budget '150%': a share must be above 0% and at most 100%"),
        (["eval", "--budget", "1e99"], "error: bad budget '1e99'"),
        (["eval", "--task", "nope"], "error: unknown task 'nope'; this network has: colours, bands"),
        (["prune-level", "--task", "colours", "--budget", "9"], "error: level 9 does not exist"),
        (["prune-level", "--task", "nope", "--budget", "1"], "error: unknown task 'nope'"),
        (["export", "--task", "bands", "--budget", "0"], "error: bad budget '0'"),
        (["export", "--task", "nope"], "error: unknown task 'nope'"),
        (["plan", "--budget", "0"], "error: "),
        (["plan", "--budget", "50%", "--tasks", "nope"], "error: unknown task 'nope'"),
    ],
)
def test_out_of_range_budgets_and_unknown_tasks_are_one_line(trained, tmp_path, args, message):
    base, run, _ = trained
    checkpoint = run / "model.safetensors"
    before = sha256(checkpoint)
    extra = ["--data-root", base / "data"] if args[0] == "eval" else []
    extra += ["-o", tmp_path / "out"] if args[0] in ("export", "prune-level") else []
    result = invoke(args[0], "-c", checkpoint, *args[1:], *extra)
    one_error_line(result, message)
    assert sha256(checkpoint) == before and not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "tasks,message",
    [
        ("mnist,mnist", "error: task listed twice: mnist"),
        ("mnist, fashion-mnist ,mnist", "error: task listed twice: mnist"),
        ("a={folder},a={folder}", "error: task listed twice: a"),
        ("a={folder},a={other}", "error: task listed twice: a"),
        ("imagenet", "error: unknown task 'imagenet'"),
        ("a=", "error: task 'a=' has no folder; write a=path/to/folder"),
    ],
)
def test_bad_task_lists_are_one_line(tmp_path, tasks, message):
    folder = make_image_folder(tmp_path / "f", per_class=2)
    other = make_image_folder(tmp_path / "g", per_class=2)
    result = invoke("train", "--tasks", tasks.format(folder=folder, other=other), "--data-root", tmp_path,
                    "--input-size", 16, "--input-channels", 3, "--out", tmp_path / "run")  # fmt: skip
    one_error_line(result, message)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--units", 3], "error: channels 8 not divisible by k=3"),
        (["--units", 0], "error: units must be at least 1, got 0"),
        (["--batch-size", 0], "error: batch_size must be at least 1, got 0"),
        (["--epochs", -1], "error: epochs must be more than 0, got -1.0"),
        (["--limit", 0], "error: limit must be at least 1, got 0"),
        (["--precision", "fp8"], "error: unknown precision 'fp8'; use fp32, bf16, fp16"),
        (["--device", "tpu"], "error: unknown device 'tpu'; use cpu, cuda or auto"),
    ],
)
def test_bad_train_settings_are_one_line(trained, tmp_path, flags, message):
    base, _, args = trained
    out = args.index("--out") + 1
    result = invoke(*args[:out], tmp_path / "run", *args[out + 1 :], *flags)
    one_error_line(result, message)
    assert not (tmp_path / "run" / "model.safetensors").exists()


def test_an_existing_run_is_never_overwritten_without_force(trained, tmp_path):
    base, run, args = trained
    out = args.index("--out") + 1
    target = tmp_path / "run"
    first = invoke(*args[:out], target, *args[out + 1 :])
    assert first.exit_code == 0, first.output
    before = {f.name: sha256(f) for f in target.iterdir()}
    again = invoke(*args[:out], target, *args[out + 1 :], "--seed", 9)
    one_error_line(again, f"error: {target} already holds a run; pass --resume to continue it, --force to replace it")
    assert {f.name: sha256(f) for f in target.iterdir()} == before
    forced = invoke(*args[:out], target, *args[out + 1 :], "--seed", 9, "--force")
    assert forced.exit_code == 0, forced.output
    assert sha256(target / "model.safetensors") != before["model.safetensors"]
    assert load_checkpoint(target / "model.safetensors").training["config"]["seed"] == 9
    blocker = tmp_path / "file"
    blocker.write_text("keep me")
    one_error_line(invoke(*args[:out], blocker, *args[out + 1 :]), f"error: --out {blocker} is a file, not a folder")
    assert blocker.read_text() == "keep me"


# --------------------------------------------------------------------------------------------- no pickles


def _source_trees() -> list[tuple[Path, ast.Module]]:
    return [(path, ast.parse(path.read_text(), str(path))) for path in sorted(SRC.rglob("*.py"))]


def _unsafe_loads(tree: ast.Module) -> list[int]:
    """Lines of calls to ``torch.load`` (or a bare ``load`` imported from torch) without ``weights_only=True``."""
    torch_names = {"torch"}
    bare_loads = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            torch_names |= {a.asname or a.name for a in node.names if a.name == "torch"}
        elif isinstance(node, ast.ImportFrom) and node.module in ("torch", "torch.serialization"):
            bare_loads |= {a.asname or a.name for a in node.names if a.name == "load"}
    lines = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        is_torch_load = (
            isinstance(func, ast.Attribute)
            and func.attr == "load"
            and isinstance(func.value, ast.Name)
            and func.value.id in torch_names
        ) or (isinstance(func, ast.Name) and func.id in bare_loads)
        if not is_torch_load:
            continue
        weights_only = [k for k in node.keywords if k.arg == "weights_only"]
        safe = weights_only and isinstance(weights_only[0].value, ast.Constant) and weights_only[0].value.value is True
        if not safe:
            lines.append(node.lineno)
    return lines


PICKLERS = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}
PICKLING_CALLS = {"broadcast_object_list", "all_gather_object", "gather_object", "scatter_object_list"}


def test_no_code_path_unpickles():
    for path, tree in _source_trees():
        assert not _unsafe_loads(tree), f"{path}:{_unsafe_loads(tree)} calls torch.load without weights_only=True"
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                names = {(node.module or "").split(".")[0]}
            elif isinstance(node, ast.Attribute) and node.attr in PICKLING_CALLS:
                names = {node.attr}
            else:
                continue
            assert not names & (PICKLERS | PICKLING_CALLS), f"{path}:{node.lineno} uses {names & PICKLERS}"


def test_the_unpickle_scan_catches_what_it_should():
    def lines(code: str) -> list[int]:
        return _unsafe_loads(ast.parse(code))

    assert lines("import torch\ntorch.load('f')") == [2]
    assert lines("import torch\ntorch.load('f', weights_only=False)") == [2]
    assert lines("import torch as t\nt.load('f', weights_only=flag)") == [2]
    assert lines("from torch import load\nload('f')") == [2]
    assert lines("import torch\ntorch.load('f', weights_only=True)") == []
    assert lines("from safetensors.torch import load_file\nload_file('f')") == []
