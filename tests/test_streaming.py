"""Streamed folder tasks: the in-memory path's splits and statistics, worker-independent resumable batches,
bad files and dead workers as one line, evaluation that streams, and the manifest's preprocessing."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dvn_cli.cli.app import app
from dvn_cli.data import streaming
from dvn_cli.data.batches import normalize_batch
from dvn_cli.data.datasets import load_task
from dvn_cli.data.registry import DATASETS, register_dataset
from dvn_cli.data.streaming import StreamedTask, open_task
from dvn_cli.errors import DvnError, MissingData
from dvn_cli.evaluation import evaluate as evaluate_module
from dvn_cli.evaluation.evaluate import EvalOptions, evaluate_rows
from dvn_cli.modelfile.checkpoint import load_checkpoint
from dvn_cli.modelfile.registry import open_model
from dvn_cli.training.loop import fit

from .conftest import REPO, StopAt, make_image_folder, tiny_config, tiny_train_config

SRC = REPO / "src"


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """Three classes of 14 PNGs, a JPEG larger than the input, and two files PIL cannot read."""
    root = make_image_folder(tmp_path / "colours", per_class=14, size=16)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (90, 120, 3), dtype=np.uint8)).save(root / "red" / "photo.jpg", quality=90)
    (root / "green" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    (root / "blue" / "notes.txt").write_text("not an image")
    return root


def _stream(task: str, workers: int = 2, **kw) -> StreamedTask:
    data = open_task(task, channels=3, size=12, mode="stream", workers=workers, **kw)
    assert isinstance(data, StreamedTask)
    return data


def _split(data, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    parts = list(data.batches(name, 7))
    return torch.cat([x for x, _ in parts]), torch.cat([y for _, y in parts])


# ------------------------------------------------------------------------------------- same data as in memory


@pytest.mark.parametrize("limit", [None, 20])
def test_streamed_folder_has_the_in_memory_splits_statistics_and_pixels(folder: Path, limit):
    memory = load_task(f"colours={folder}", channels=3, size=12, seed=4, limit=limit)
    stream = _stream(f"colours={folder}", seed=4, limit=limit)
    assert stream.spec == memory.spec  # classes, exact mean/std of the training images, resize
    assert stream.skipped == memory.skipped and len(stream.skipped) == 2
    summary = stream.summary()
    assert summary["storage"] == "stream" and memory.summary()["storage"] == "memory"
    assert {k: v for k, v in summary.items() if k not in ("storage", "workers")} == {
        k: v for k, v in memory.summary().items() if k != "storage"
    }
    for name in ("train", "val", "test"):
        images, labels = _split(stream, name)
        assert torch.equal(images, memory.split(name)[0]) and torch.equal(labels, memory.split(name)[1]), name


def test_streamed_folder_with_its_own_train_val_test_folders(tmp_path: Path):
    for split, count in (("train", 6), ("val", 3), ("test", 4)):
        make_image_folder(tmp_path / "shapes" / split, classes=("circle", "square"), per_class=count, seed=count)
    memory = load_task(f"shapes={tmp_path / 'shapes'}", channels=1, size=12)
    stream = open_task(f"shapes={tmp_path / 'shapes'}", channels=1, size=12, mode="stream", workers=0)
    assert (stream.split_size("train"), stream.split_size("val"), stream.split_size("test")) == (12, 6, 8)
    assert stream.spec == memory.spec
    for name in ("train", "val", "test"):
        assert torch.equal(_split(stream, name)[0], memory.split(name)[0]), name


def test_auto_streams_only_above_the_threshold(folder: Path, monkeypatch):
    assert open_task(f"colours={folder}", channels=3, size=12).summary()["storage"] == "memory"
    monkeypatch.setattr(streaming, "STREAM_ABOVE_BYTES", 45 * 3 * 12 * 12 - 1)  # one byte less than the 45 files
    assert open_task(f"colours={folder}", channels=3, size=12).summary()["storage"] == "stream"
    assert open_task(f"colours={folder}", channels=3, size=12, mode="memory").summary()["storage"] == "memory"


def test_registered_datasets_stay_in_memory():
    def load(root: Path, train: bool, download: bool):
        return torch.zeros(20, 1, 8, 8, dtype=torch.uint8), torch.arange(20) % 2, ("a", "b")

    register_dataset("fake-registered", load, channels=1, size=8, augment="digits", folder="FAKE")
    try:
        data = open_task("fake-registered", channels=1, size=8, mode="stream")
        assert data.summary()["storage"] == "memory" and data.split_size("test") == 20
    finally:
        DATASETS.pop("fake-registered")


# ------------------------------------------------------------------------------------------ training batches


def test_batches_do_not_depend_on_the_number_of_workers_and_cover_each_epoch(folder: Path):
    streams = [_stream(f"colours={folder}", workers=w).train_batches(8, seed=1, task_index=2) for w in (0, 1, 2)]
    assert streams[0].batches_per_epoch == 3  # 31 training images
    epochs = []
    for _epoch in range(2):
        labels = []
        for _ in range(3):
            (x0, y0), (x1, y1), (x2, y2) = (next(s) for s in streams)
            assert x0.shape == (8, 3, 12, 12) and x0.dtype == torch.float32
            assert torch.equal(x0, x1) and torch.equal(x0, x2) and torch.equal(y0, y1) and torch.equal(y0, y2)
            labels.append(y0)
        epochs.append(torch.cat(labels))
    assert not torch.equal(epochs[0], epochs[1])  # a new order every epoch
    other_task = _stream(f"colours={folder}", workers=0).train_batches(8, seed=1, task_index=3)
    assert not torch.equal(next(other_task)[1], epochs[0][:8])  # each task index has its own order


def test_an_epoch_shows_each_training_image_once_and_augments_it(folder: Path):
    augmented = _stream(f"colours={folder}", workers=0)
    plain = _stream(f"colours={folder}", workers=0)
    plain.augment = "none"
    train, _ = _split(plain, "train")
    want = sorted(map(tuple, normalize_batch(train, plain.spec).flatten(1).tolist()))
    unaugmented = plain.train_batches(31, seed=0, task_index=0)  # one batch: the whole epoch
    x_plain, y_plain = next(unaugmented)
    assert sorted(map(tuple, x_plain.flatten(1).tolist())) == want
    x, y = next(augmented.train_batches(31, seed=0, task_index=0))
    assert torch.equal(y, y_plain) and not torch.equal(x, x_plain)  # the same images, shifted and flipped


def test_stream_state_resumes_the_same_batches(folder: Path):
    stream = _stream(f"colours={folder}").train_batches(8, seed=7, task_index=1)
    for _ in range(4):  # into the second epoch
        next(stream)
    state = stream.state_dict()
    assert (state["epoch"], state["position"], state["num_images"]) == (1, 1, 31)
    expected = [next(stream) for _ in range(5)]
    resumed = _stream(f"colours={folder}", workers=1).train_batches(8, seed=7, task_index=1)
    resumed.load_state_dict({k: torch.tensor(v) for k, v in state.items()})  # as a safetensors file gives them
    for (x, y), (x2, y2) in zip(expected, (next(resumed) for _ in range(5)), strict=True):
        assert torch.equal(x, x2) and torch.equal(y, y2)
    other = _stream(f"colours={folder}", limit=20).train_batches(8, seed=7, task_index=1)
    with pytest.raises(DvnError, match="20 training images, the saved state 31"):
        other.load_state_dict(state)


def test_training_resumed_with_two_workers_equals_an_uninterrupted_run(tmp_path: Path, folder: Path):
    second = make_image_folder(tmp_path / "bands", classes=("top", "middle"), per_class=12, seed=5)
    tasks = (f"colours={folder}", f"bands={second}")
    settings = {"tasks": tasks, "data_mode": "stream", "workers": 2, "epochs": 2, "batch_size": 8}

    def config(where: str, **kw):
        return tiny_train_config(tmp_path / where, **{**settings, **kw})

    straight = fit(config("a"))
    assert [d["storage"] for d in straight.summary["data"]] == ["stream", "stream"]
    with pytest.raises(KeyboardInterrupt):
        fit(config("b"), observer=StopAt(4))  # mid-way through the second epoch (3 steps per epoch)
    resumed = fit(config("b", workers=1), resume=True)  # another number of workers: the same batches
    a = load_checkpoint(straight.checkpoint).network.state_dict()
    b = load_checkpoint(resumed.checkpoint).network.state_dict()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert straight.summary["val_accuracy"] == resumed.summary["val_accuracy"]


# ----------------------------------------------------------------------------------------- failures, one line


def test_a_file_that_becomes_unreadable_ends_in_one_line(folder: Path):
    data = _stream(f"colours={folder}")
    stream = data.train_batches(8, seed=0, task_index=0)
    first = data.train_index[streaming.epoch_order(0, 0, 0, stream.num_images)[0]]  # in the first batch
    victim = data.root / os.fsdecode(data.names[first])
    victim.write_bytes(b"garbage")
    with pytest.raises(MissingData) as caught:
        next(stream)
    assert str(victim) in str(caught.value) and "\n" not in str(caught.value)


def test_a_class_without_readable_images_is_refused_as_in_memory(folder: Path):
    (folder / "empty").mkdir()
    (folder / "empty" / "x.png").write_bytes(b"no")
    with pytest.raises(MissingData, match=r"class folder .*empty has no readable images"):
        _stream(f"colours={folder}")


def test_a_killed_worker_ends_in_one_line_not_a_hang(folder: Path):
    script = textwrap.dedent(
        f"""
        import multiprocessing, os, signal
        from dvn_cli.data.streaming import open_task
        from dvn_cli.errors import DvnError
        stream = open_task({f"colours={folder}"!r}, channels=3, size=12, mode="stream", workers=2).train_batches(
            4, seed=0, task_index=0)
        next(stream)
        for child in multiprocessing.active_children():
            os.kill(child.pid, signal.SIGKILL)
        try:
            for _ in range(100):
                next(stream)
        except DvnError as exc:
            print("ERROR", exc)
        """
    )
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    lines = result.stdout.strip().splitlines()
    assert result.returncode == 0 and len(lines) == 1, result.stdout + result.stderr
    died = "ERROR a data worker reading task 'colours' died: its connection closed mid-batch ("  # the kill's race
    noticed = "ERROR a data worker reading task 'colours' failed: DataLoader worker (pid"  # as the loader saw it
    assert lines[0].startswith(died) or (
        lines[0].startswith(noticed) and ("killed by signal" in lines[0] or "exited unexpectedly" in lines[0])
    ), lines[0]


@pytest.mark.parametrize("error", [ConnectionResetError(104, "Connection reset by peer"), EOFError()])
def test_a_worker_connection_closed_mid_batch_is_one_line_naming_the_death(error):
    """Killed while its batch is in the pipe, a worker shows as a reset connection before the loader sees it die
    (seen once under load): still one line that says the worker died."""

    def batches():
        yield 1
        raise error

    stream = streaming._guarded(batches())
    assert next(stream) == 1
    with pytest.raises(DvnError, match=r"^a data worker reading a folder task died: its connection closed mid-batch"):
        next(stream)


# ----------------------------------------------------------------------------------- evaluation and deploying


def test_eval_of_a_streamed_task_equals_eval_in_memory(tmp_path: Path, folder: Path, monkeypatch):
    cfg = tiny_train_config(tmp_path, tasks=(f"colours={folder}",), data_mode="stream", epochs=1, batch_size=8)
    model = open_model(fit(cfg).checkpoint)
    in_memory = evaluate_rows(model, EvalOptions(limit=8))
    monkeypatch.setattr(streaming, "STREAM_ABOVE_BYTES", 0)
    opened = []  # the storage of every task eval opens: the second evaluation must really stream
    real_open = evaluate_module.open_task
    monkeypatch.setattr(evaluate_module, "open_task", lambda *a, **kw: opened.append(real_open(*a, **kw)) or opened[-1])
    streamed = evaluate_rows(model, EvalOptions(limit=8, workers=2))
    assert [task.summary()["storage"] for task in opened] == ["stream"]
    assert streamed == in_memory and in_memory[0]["samples"] == 8


def test_the_manifest_preprocessing_gives_what_training_and_eval_see(folder: Path):
    """examples/deploy_onnx.py's preprocessing of raw files (from ``preprocess_of``) equals the streamed batches."""
    from dvn_cli.core.network import build_network
    from dvn_cli.export.pairs import preprocess_of
    from dvn_cli.modelfile.spec import compact_spec

    spec = importlib.util.spec_from_file_location("deploy_onnx", REPO / "examples" / "deploy_onnx.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    data = _stream(f"colours={folder}", val_fraction=0.0)
    network = build_network(tiny_config(), [data.spec])
    pre = preprocess_of(compact_spec(network, "colours", 1))
    images, _ = _split(data, "train")
    seen = normalize_batch(images, data.spec)
    for i, position in enumerate(data.train_index.tolist()):
        raw = data.root / os.fsdecode(data.names[position])
        assert np.allclose(example.preprocess(raw, pre), seen[i].numpy(), atol=1e-5), raw
    assert any(os.fsdecode(n).endswith(".jpg") for n in data.names[data.train_index])  # the large JPEG is in


def test_cli_says_which_path_each_task_took(tmp_path: Path, folder: Path):
    from typer.testing import CliRunner

    small = make_image_folder(tmp_path / "bands", classes=("top", "middle"), per_class=8, seed=5)
    args = ["train", "--tasks", f"colours={folder},bands={small}", "--depth", "8", "--widths", "8,16,32"]
    args += ["--input-size", "12", "--epochs", "1", "--batch-size", "8", "--out", str(tmp_path / "run")]
    result = CliRunner().invoke(app, [*args, "--data-mode", "stream", "--workers", "1"])
    assert result.exit_code == 0, result.output
    assert "colours: 31 train / 3 val / 9 test images" in result.stderr
    assert result.stderr.count("streamed from disk by 1 workers") == 2
    assert "2 unreadable files skipped" in result.stderr
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (config["data_mode"], config["workers"]) == ("stream", 1)
    result = CliRunner().invoke(app, [*args[:-1], str(tmp_path / "run2")])
    assert result.exit_code == 0 and result.stderr.count("in memory") == 2


def _live_workers(timeout: float = 10.0) -> list:
    """The multiprocessing children still alive after up to ``timeout`` seconds (workers end asynchronously)."""
    import multiprocessing
    import time

    deadline = time.monotonic() + timeout
    while (alive := multiprocessing.active_children()) and time.monotonic() < deadline:
        time.sleep(0.05)
    return alive


def test_a_failed_or_closed_stream_leaves_no_worker_to_interrupt_the_save(folder: Path):
    """A worker that dies ends the stream in one StreamFailed, and the loader's other workers are shut down with it:
    DataLoader's SIGCHLD handler raises for any registered worker that dies, wherever the main thread is, and the
    run saves its progress next. ``close`` shuts a healthy stream's workers down the same way."""
    import os
    import signal

    from dvn_cli.data.streaming import StreamFailed

    stream = _stream(f"colours={folder}", workers=2).train_batches(4, seed=0, task_index=0)
    next(stream)
    assert len(_live_workers(0)) == 2
    stream.close()
    assert _live_workers() == []
    next(stream)  # the stream starts its workers again where it stood
    os.kill(_live_workers(0)[0].pid, signal.SIGKILL)
    try:
        for _ in range(50):
            next(stream)
    except StreamFailed:  # the run saves here, the failure still alive: no worker may be left
        assert _live_workers() == []
    else:
        pytest.fail("a killed worker did not end the stream")
