"""``dvn serve -c FOLDER`` of a shared export runs without PyTorch: a real server in a process where ``import torch``
fails, answering as ``dvn predict --json -c FOLDER`` and ``--budget`` do on the same folder."""

from __future__ import annotations

import dataclasses
import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dvn_cli.core.network import build_network
from dvn_cli.data.batches import normalize_batch
from dvn_cli.data.decode import input_image, normalize_images, read_image
from dvn_cli.data.pixels import convert_images
from dvn_cli.errors import BadBudget
from dvn_cli.export.shared import export_shared
from dvn_cli.modelfile.checkpoint import load_checkpoint, save_checkpoint
from dvn_cli.modelfile.registry import open_model
from dvn_cli.modelfile.shared_folder import SharedFolder
from dvn_cli.planning.budget_rules import fit_held_levels
from dvn_cli.runtime.predict import predict_images

from .conftest import require_module, settle_batch_norm, tiny_config, tiny_tasks
from .test_serve import BOUND_S, HUGE, WITHOUT_TORCH, InProcess, Served, multipart, wait_for, write_atomically

PAIRS = [("task0", 2), ("task0", 4), ("task1", 3)]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """A shared export of a tiny network: task0 resized bilinearly (PIL), task1 padded or resized as datasets of
    small images are (the resize torch runs in ``dvn predict``)."""
    require_module("onnxruntime")
    torch.manual_seed(0)
    first, second = tiny_tasks(2)
    network = settle_batch_norm(build_network(tiny_config(), [first, dataclasses.replace(second, resize="pad")]))
    root = tmp_path_factory.mktemp("serve_folder")
    save_checkpoint(network, root / "model.safetensors")
    export_shared(load_checkpoint(root / "model.safetensors"), root / "shared", PAIRS, check=False)
    return root / "shared"


def images() -> dict[str, bytes]:
    """Images of every path through preprocessing: the input size, larger, smaller, grey, a JPEG."""
    rng = np.random.default_rng(0)
    found = {}
    for name, size, mode, kind in [
        ("same.png", (12, 12), "RGB", "PNG"),
        ("wide.png", (30, 17), "RGB", "PNG"),
        ("small.png", (8, 5), "L", "PNG"),
        ("photo.jpg", (40, 40), "RGB", "JPEG"),
    ]:
        shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
        out = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(out, kind)
        found[name] = out.getvalue()
    return found


def held_bytes(folder: Path, choices: dict[str, int]) -> int:
    """Bytes of the tensors the running levels use, each once."""
    return SharedFolder(folder).held_bytes(choices.items())


@pytest.mark.slow
def test_a_shared_folder_is_served_without_torch(folder, tmp_path):
    files = images()
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    expected = predict_images(open_model(folder), [tmp_path / name for name in files]).rows  # dvn predict --json
    server = Served(folder, without_torch=True)
    try:
        body, headers = multipart(files)
        status, out = server.predict(body, "", headers)
        assert status == 200, out
        assert [(r["image"], r["task"], r["level"]) for r in out["rows"]] == [
            (Path(r["image"]).name, r["task"], r["level"]) for r in expected
        ]
        for got, want in zip(out["rows"], expected, strict=True):
            assert [c["class"] for c in got["top"]] == [c["class"] for c in want["top"]]
            assert [c["probability"] for c in got["top"]] == pytest.approx(
                [c["probability"] for c in want["top"]], abs=1e-5
            )
        status, out = server.predict(files["same.png"], "?task=task1&top=2")
        assert status == 200 and [(r["task"], r["level"], len(r["top"])) for r in out["rows"]] == [("task1", 3, 2)]

        status, state = server.get("/v1/status")
        running = {"task0": 4, "task1": 3}
        assert status == 200 and state["tasks"] == running and state["requests"] == 2 and state["switches"] == 0
        assert state["held_bytes"] == held_bytes(folder, running)

        budget = f"{held_bytes(folder, {'task0': 2, 'task1': 3})}B"  # what both tasks hold together, not each
        status, out = server.budget(budget)
        assert status == 200 and out["tasks"] == {"task0": 2, "task1": 3} and out["met"] is True
        assert out["held_bytes"] == held_bytes(folder, out["tasks"]) < state["held_bytes"]
        assert [r["level"] for r in server.predict(files["same.png"])[1]["rows"]] == [2, 3]
        status, out = server.budget("1B")
        assert status == 422 and out["error"].startswith("budget 1B (1 B) fits no plan of task0, task1: "), out
        status, out = server.budget("lots")
        assert status == 422 and list(out) == ["error"] and out["error"].startswith("bad budget 'lots'"), out

        for body, query, code, words in [
            (files["same.png"], "?task=nope", 404, "unknown task 'nope'"),
            (b"not an image", "", 415, "not an image"),
        ]:
            status, out = server.predict(body, query)
            assert status == code and words in out["error"], out
        status, text = server.get("/metrics")
        assert 'dvn_requests_total{endpoint="predict",code="200"} 3' in text
        assert 'dvn_level{task="task0"} 2' in text and f"dvn_held_bytes {out_held(server)}" in text
        assert "dvn_switches_total 1" in text
    finally:
        assert server.stop() == 0, "".join(server.lines)
    assert not any("Traceback" in line for line in server.lines), "".join(server.lines)


@pytest.mark.slow
def test_auto_budget_on_a_folder_fits_the_levels_held_to_the_memory(folder, tmp_path):
    """``--budget auto`` on a shared folder (no accuracy to plan with): the levels step down until the tensors they
    hold, each once, fit the room the memory source leaves, and come back when it grows; without torch."""
    top = held_bytes(folder, {"task0": 4, "task1": 3})
    memory = tmp_path / "free"
    write_atomically(memory, str(10 * top))
    args = ["--budget", "auto", "--reserve", "0B", "--memory-file", str(memory), "--poll", "0.05"]
    server = Served(folder, *args, without_torch=True)
    try:
        assert server.get("/v1/status")[1]["tasks"] == {"task0": 4, "task1": 3}
        room = held_bytes(folder, {"task0": 2, "task1": 3})
        write_atomically(memory, str(room - top))  # the room is what is held + free: exactly task0 at level 2
        small = wait_for(server, lambda s: s["tasks"] != {"task0": 4, "task1": 3})
        assert small["tasks"] == {"task0": 2, "task1": 3} and small["held_bytes"] == room
        assert [r["level"] for r in server.predict(images()["same.png"])[1]["rows"]] == [2, 3]
        write_atomically(memory, str(10 * top))
        grown = wait_for(server, lambda s: s["tasks"] == {"task0": 4, "task1": 3})
        assert grown["held_bytes"] == top and grown["budget"].startswith("auto: ")
    finally:
        assert server.stop() == 0, "".join(server.lines)
    assert sum(line.startswith("budget auto: ") for line in server.lines) == 2, "".join(server.lines)


def test_fit_held_levels_steps_down_the_highest_level_first():
    sizes = {("a", 1): 10, ("a", 2): 20, ("a", 3): 30, ("a", 4): 40, ("b", 2): 20, ("b", 4): 50}

    def held(choices):  # b's level 2 also uses a's level-1 tensors: counted once
        return sum(sizes[n] for n in set(choices.items()) | ({("a", 1)} if choices["b"] == 2 else set()))

    levels = {"a": [1, 2, 3, 4], "b": [2, 4]}
    assert fit_held_levels(levels, held, 90) == ({"a": 4, "b": 4}, 90)
    assert fit_held_levels(levels, held, 89) == ({"a": 4, "b": 2}, 70)  # a tie at level 4: b's step frees more
    assert fit_held_levels(levels, held, 50) == ({"a": 2, "b": 2}, 50)
    assert fit_held_levels(levels, held, 45) == ({"a": 1, "b": 2}, 30)  # a's level 1 is in b's already
    with pytest.raises(BadBudget, match="do not hold even every task's smallest level"):
        fit_held_levels(levels, held, 29)


def test_a_budget_switch_changes_what_the_folder_server_runs(folder, tmp_path):
    """In process, no training: a budget is what both tasks hold together, each tensor once (as dvn plan counts
    it), not a limit per task; the runtime itself switches (its tensors, the rows' levels and probabilities); a
    budget nothing fits, a level, a share of a folder without every top level and 400 digits are a 422 that
    changes nothing."""
    from dvn_cli.serve.folder_engine import FolderEngine

    engine = FolderEngine(folder)
    served = InProcess(engine)
    try:
        small = {"task0": 2, "task1": 3}
        both = held_bytes(folder, small)
        assert max(held_bytes(folder, {"task0": 2}), held_bytes(folder, {"task1": 3})) < both - 1
        status, out = served.budget(f"{both - 1}B")  # each task's level 2 and 3 fit it alone; together they do not
        assert status == 422 and "fits no plan of task0, task1" in out["error"], out
        assert engine.choices == {"task0": 4, "task1": 3} and served.request("GET", "/v1/status")[1]["met"] is None
        status, out = served.budget(f"{both}B")
        assert status == 200 and out["tasks"] == small and out["held_bytes"] == both and out["met"] is True, out
        used = {name for pair in small.items() for name in SharedFolder(folder).model(*pair)["tensors"]}
        assert set(engine.runtime.arrays) == used  # the runtime holds the running levels' tensors only
        image = images()["same.png"]
        status, rows = served.request("POST", "/v1/predict", image)
        assert status == 200 and [(r["task"], r["level"]) for r in rows["rows"]] == list(small.items())
        (tmp_path / "same.png").write_bytes(image)
        want = predict_images(open_model(folder), [tmp_path / "same.png"], ["task0"], "2").rows[0]["top"]
        got = rows["rows"][0]["top"]
        assert [c["probability"] for c in got] == pytest.approx([c["probability"] for c in want], abs=1e-5)
        status, out = served.budget(f"{held_bytes(folder, {'task0': 4, 'task1': 3})}B")
        assert status == 200 and out["tasks"] == {"task0": 4, "task1": 3}
        for bad, words in [
            ("3", "is a level"),
            ("50%", "a share is of every task at its top level (4)"),
            (HUGE, "largest budget is 10^18"),
        ]:
            status, out = served.budget(bad)
            assert status == 422 and words in out["error"] and "\n" not in out["error"], out
        state = served.request("GET", "/v1/status")[1]
        assert state["tasks"] == engine.choices == {"task0": 4, "task1": 3} and state["switches"] == 2
    finally:
        served.close()


def out_held(server: Served) -> int:
    return server.get("/v1/status")[1]["held_bytes"]


@pytest.mark.slow
def test_a_damaged_folder_is_refused_in_one_line_without_torch(folder, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "manifest.json").write_text("{not json")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    command = [sys.executable, *WITHOUT_TORCH, "serve", "-c", str(broken), "--port", "0"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=BOUND_S)
    assert done.returncode == 1 and "is not a dvn manifest" in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_the_folder_path_imports_no_torch():
    """Every module a process serving a folder runs imports with ``import torch`` failing (no server needed)."""
    modules = (
        "dvn_cli.cli.app, dvn_cli.cli.ui, dvn_cli.serve.listen, dvn_cli.serve.app, dvn_cli.serve.folder_engine, "
        "dvn_cli.serve.memory_source, dvn_cli.serve.watcher, dvn_cli.serve.uploads, dvn_cli.serve.jobs, "
        "dvn_cli.planning.budget_rules, dvn_cli.modelfile.shared_folder"
    )
    code = f"import sys; sys.modules['torch'] = None; import {modules}"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=BOUND_S)
    assert done.returncode == 0, done.stderr


# ------------------------------------------------------------------------------------- numpy preprocessing


@pytest.mark.parametrize("resize", ["bilinear", "pad"])
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("size", [(12, 12), (30, 17), (8, 5), (5, 40), (13, 11)])
def test_numpy_preprocessing_is_the_torch_preprocessing(resize, channels, size):
    """``data.decode.input_image`` prepares an image as ``data.pixels.convert_images`` converts a dataset (exactly,
    but for one grey level at rare pixels of torch's antialiased resize), and ``normalize_images`` computes the
    float32 inputs of ``data.batches.normalize_batch`` bit for bit."""
    rng = np.random.default_rng(sum(size) + channels)
    out = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB").save(out, "PNG")
    got = input_image(io.BytesIO(out.getvalue()), channels, 12, resize)
    assert got.dtype == np.uint8 and got.shape == (channels, 12, 12)
    if resize == "pad":  # as a dataset of small images is converted for training
        array = read_image(io.BytesIO(out.getvalue()), "L" if channels == 1 else "RGB", None)
        image = torch.from_numpy((array[None] if array.ndim == 2 else array.transpose(2, 0, 1)).copy())
        want = convert_images(image[None], channels, 12)[0][0].numpy()
        resized = size[0] > 12 or size[1] > 12
        assert np.abs(got.astype(int) - want).max() <= (1 if resized else 0)
    spec = tiny_tasks(1)[0] if channels == 3 else dataclasses.replace(tiny_tasks(1)[0], mean=(0.3,), std=(0.7,))
    normalized = normalize_images(got[None], spec.mean, spec.std)
    want_floats = normalize_batch(torch.from_numpy(got)[None], spec).numpy()
    assert normalized.dtype == np.float32 and np.array_equal(normalized, want_floats)
