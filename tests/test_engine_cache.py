"""The engine cache of a canonical shared folder (``runtime/engine_cache.py``): optimised once, weights held once,
never trusted when stale, edited or foreign, the standard graphs as the fallback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dvn_cli.export.shared import export_shared
from dvn_cli.modelfile.checkpoint import load_checkpoint, save_checkpoint
from dvn_cli.modelfile.shared_folder import SharedFolder
from dvn_cli.runtime import engine_cache, engine_key
from dvn_cli.runtime.engine_build import INDEX_NAME, WEIGHTS_NAME, build_cache
from dvn_cli.runtime.engine_cache import CACHE_DIR, open_engine_cache
from dvn_cli.runtime.engine_key import cache_key
from dvn_cli.runtime.ort import SharedOrtRuntime

from .conftest import require_module, settle_batch_norm, tiny_config, tiny_tasks

ort = require_module("onnxruntime")
onnx = require_module("onnx")

PAIRS = [("task0", 1), ("task0", 4), ("task1", 2), ("task1", 4)]

RUN = """
import json, sys
import numpy as np
from dvn_cli.runtime.ort import SharedOrtRuntime

rt = SharedOrtRuntime(sys.argv[1])
x = np.random.default_rng(0).standard_normal((3, 3, 16, 16)).astype(np.float32)
print(json.dumps({"note": rt.cache_note, "cache": None if rt.engine is None else str(rt.engine.path),
                  "logits": {f"{t}/{lv}": rt.run(t, lv, x).tolist() for t, lv in rt.pairs()}}))
"""


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    """A canonical folder of a network whose unit widths fill onnxruntime's channel blocks (16 on AVX-512)."""
    import torch

    from dvn_cli.core.network import build_network

    root = tmp_path_factory.mktemp("engine")
    torch.manual_seed(0)
    network = settle_batch_norm(build_network(tiny_config(widths=(64, 64, 128), input_size=16), tiny_tasks(2)))
    checkpoint = load_checkpoint(save_checkpoint(network, root / "model.safetensors"))
    export_shared(checkpoint, root / "pristine", PAIRS, check=False)
    return root / "pristine"


@pytest.fixture
def folder(exported, tmp_path) -> Path:
    import shutil

    return shutil.copytree(exported, tmp_path / "folder", ignore=shutil.ignore_patterns(CACHE_DIR))


def _batch() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((3, 3, 16, 16)).astype(np.float32)


def _run(folder: Path, env: dict | None = None) -> dict:
    """Open and run the folder in a fresh process; a native crash fails here."""
    result = subprocess.run(
        [sys.executable, "-c", RUN, str(folder)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **(env or {})},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout)


def test_the_cache_runs_the_optimised_graphs_on_one_copy(folder):
    standard = SharedOrtRuntime(folder, cache=False)
    assert standard.engine is None
    runtime = SharedOrtRuntime(folder)
    assert runtime.engine is not None and runtime.engine.path.parent == folder / CACHE_DIR, runtime.cache_note
    x = _batch()
    for pair in runtime.pairs():
        np.testing.assert_allclose(runtime.run(*pair, x), standard.run(*pair, x), atol=1e-4, rtol=0)
        graph = onnx.load_from_string(runtime.engine.graph(*pair))
        assert "com.microsoft.nchwc" in {node.domain for node in graph.graph.node}  # optimised once, saved
    # one copy: every tensor a session is given is a range of the arrays read from the cache, read once each
    pieces = {name: a.__array_interface__["data"][0] for name, a in runtime.arrays.items()}
    shapes = runtime._shapes
    for name, value in runtime._values.items():
        piece = name.split("[", 1)[0]
        start, size = pieces[piece], runtime.arrays[piece].nbytes
        assert start <= value.data_ptr() and value.data_ptr() + 4 * int(np.prod(shapes[name])) <= start + size
    assert sum(a.nbytes for a in runtime.arrays.values()) == runtime.engine.held_bytes(runtime.pairs())
    # onnxruntime's kernels get 64-byte aligned buffers (at 16 mod 64 the same graphs ran at 0.8x)
    assert all(value.data_ptr() % 64 == 0 for value in runtime._values.values())
    # both tasks at the top level read the same convolution weights (identical bytes stored once)
    top = [set(runtime.engine.entries[task, 4]["views"]) for task in ("task0", "task1")]
    assert len(top[0] & top[1]) >= 5
    # and the cache holds about the folder's weights, not one copy per graph
    cache_bytes = (runtime.engine.path / WEIGHTS_NAME).stat().st_size
    assert cache_bytes <= 1.2 * runtime.files.weights.stamp[2]
    graphs = {Path(entry["file"]).name for entry in runtime.files.models.values()}
    assert {p.name for p in runtime.engine.path.iterdir()} == {INDEX_NAME, WEIGHTS_NAME, *graphs}  # nothing else
    assert all((runtime.engine.path / g).stat().st_size < 64 * 1024 for g in graphs)  # weights are not in them


def test_sessions_run_on_the_runtime_buffers_not_on_the_cache_file(folder):
    """Swapped for zeros (a new inode) after it was checked, the cache file is never read again: the sessions run on
    the runtime's own copy."""
    expected = SharedOrtRuntime(folder, cache=False).run("task1", 2, _batch())
    runtime = SharedOrtRuntime(folder)
    path = runtime.engine.path / WEIGHTS_NAME
    data = bytearray(path.read_bytes())
    start = 8 + int.from_bytes(data[:8], "little")
    data[start:] = bytes(len(data) - start)
    path.with_suffix(".tmp").write_bytes(data)
    os.replace(path.with_suffix(".tmp"), path)
    np.testing.assert_allclose(runtime.run("task1", 2, _batch()), expected, atol=1e-4, rtol=0)


def test_a_later_open_uses_the_cache_without_building(folder, monkeypatch):
    first = SharedOrtRuntime(folder).engine
    monkeypatch.setattr(engine_cache, "build_cache", lambda *a: pytest.fail("built again"))
    again = SharedOrtRuntime(folder)
    assert again.engine is not None and again.engine.path == first.path


def _resign(folder: Path, edit) -> None:
    """Edit the cache's index and reseal it as an editor would (new sha256s), without this user's key."""
    (cache,) = (folder / CACHE_DIR).iterdir()
    index = json.loads((cache / INDEX_NAME).read_text())
    edit(cache, index["body"])
    (cache / INDEX_NAME).write_text(json.dumps(index))


def _flip_weights(cache: Path, body: dict) -> None:
    path = cache / WEIGHTS_NAME
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(data)
    import hashlib

    body["weights"]["sha256"] = hashlib.sha256(data).hexdigest()


def _truncate(cache: Path, body: dict) -> None:
    path = cache / WEIGHTS_NAME
    path.write_bytes(path.read_bytes()[:-4096])


def _other_onnxruntime(cache: Path, body: dict) -> None:
    body["key"]["onnxruntime"] = "0.0.1"


@pytest.mark.parametrize("edit", [_flip_weights, _truncate, _other_onnxruntime])
def test_an_edited_truncated_or_stale_cache_is_rebuilt(folder, edit):
    expected = _run(folder)["logits"]  # builds the cache (no note: it was used)
    _resign(folder, edit)
    result = _run(folder)
    assert result["note"] is None and result["cache"] is not None
    assert result["logits"] == expected  # rebuilt: the same optimised graphs
    runtime = SharedOrtRuntime(folder)
    assert runtime.engine is not None and runtime.engine.path == Path(result["cache"])


@pytest.mark.parametrize("damage", ["garbage", "graph"])
def test_a_damaged_cache_is_rebuilt_without_a_crash(folder, damage):
    expected = _run(folder)["logits"]
    (cache,) = (folder / CACHE_DIR).iterdir()
    if damage == "garbage":
        (cache / INDEX_NAME).write_bytes(os.urandom(300))
    else:  # a graph edited in place: its bytes no longer those signed
        graph = next(cache.glob("*.onnx"))
        data = bytearray(graph.read_bytes())
        data[len(data) // 2 :] = os.urandom(len(data) - len(data) // 2)
        graph.write_bytes(data)
    result = _run(folder)
    assert result["note"] is None and result["logits"] == expected


def test_another_cpu_gets_a_cache_of_its_own(folder, monkeypatch):
    first = SharedOrtRuntime(folder).engine.path
    monkeypatch.setattr(engine_key, "isa", lambda: "x86_64:avx2,fma")
    other = SharedOrtRuntime(folder).engine.path
    assert other != first and other.parent == first.parent


def test_a_folder_that_cannot_be_written_caches_in_the_user_dir(folder, tmp_path, monkeypatch):
    (folder / CACHE_DIR).write_text("not a folder")  # mkdir beside the folder fails, as on a read-only folder
    monkeypatch.setenv("DVN_CACHE_DIR", str(tmp_path / "user"))
    runtime = SharedOrtRuntime(folder)
    assert runtime.engine is not None and runtime.engine.path.is_relative_to(tmp_path / "user")
    monkeypatch.setenv("DVN_CACHE_DIR", str(folder / CACHE_DIR / "below-a-file"))  # nowhere to write at all
    fallback = SharedOrtRuntime(folder)
    assert fallback.engine is None and "cannot write" in fallback.cache_note
    np.testing.assert_allclose(fallback.run("task0", 4, _batch()), runtime.run("task0", 4, _batch()), atol=1e-4)


def test_concurrent_first_opens_share_one_cache(folder):
    procs = [
        subprocess.Popen([sys.executable, "-c", RUN, str(folder)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for _ in range(3)
    ]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err.decode()[-2000:]
        results.append(json.loads(out))
    assert all(r["logits"] == results[0]["logits"] and r["cache"] is not None for r in results)
    assert len(list((folder / CACHE_DIR).iterdir())) == 1  # no build folder left behind
    assert SharedOrtRuntime(folder).engine is not None


def test_concat_folders_and_other_providers_run_the_standard_graphs(exported, tmp_path):
    import torch

    from dvn_cli.core.network import build_network

    torch.manual_seed(1)
    network = build_network(tiny_config(), tiny_tasks(3), "table", [[0, 2, 1, 3], [3, 1, 0, 2], [1, 3, 2, 0]])
    checkpoint = save_checkpoint(network, tmp_path / "m.safetensors")
    export_shared(checkpoint, tmp_path / "concat", [("task0", 2)], check=False)
    runtime = SharedOrtRuntime(tmp_path / "concat")
    assert runtime.engine is None and "only canonical graphs" in runtime.cache_note
    with pytest.raises(engine_key.CacheUnusable):
        open_engine_cache(SharedFolder(tmp_path / "concat"), ort)


def test_a_cache_that_would_grow_the_weights_is_not_used(tiny_network, tmp_path, monkeypatch):
    """Units of 2-8 channels are padded to onnxruntime's channel blocks: such a cache would hold more than 1.2x the
    folder's weights, so the standard graphs run, and the decision is kept (no second build)."""
    checkpoint = save_checkpoint(settle_batch_norm(tiny_network), tmp_path / "m.safetensors")
    export_shared(checkpoint, tmp_path / "narrow", [("task0", 1), ("task1", 4)], check=False)
    runtime = SharedOrtRuntime(tmp_path / "narrow")
    assert runtime.engine is None and "pads narrow layers" in runtime.cache_note
    monkeypatch.setattr(engine_cache, "build_cache", lambda *a: pytest.fail("built again"))
    again = SharedOrtRuntime(tmp_path / "narrow")
    assert again.engine is None and again.cache_note == runtime.cache_note
    assert again.run("task1", 4, _batch()[:, :, :12, :12]).shape == (3, 3)


def test_two_users_of_one_folder_keep_a_cache_each(folder, tmp_path, monkeypatch):
    monkeypatch.setenv("DVN_CACHE_DIR", str(tmp_path / "alice"))
    alice = SharedOrtRuntime(folder).engine.path
    monkeypatch.setenv("DVN_CACHE_DIR", str(tmp_path / "bob"))
    bob = SharedOrtRuntime(folder).engine.path
    assert alice != bob and alice.parent == bob.parent == folder / CACHE_DIR
    monkeypatch.setenv("DVN_CACHE_DIR", str(tmp_path / "alice"))
    monkeypatch.setattr(engine_cache, "build_cache", lambda *a: pytest.fail("built again"))
    assert SharedOrtRuntime(folder).engine.path == alice  # bob's open did not replace it


def test_a_build_that_finishes_second_keeps_the_first(folder):
    """Another process's build finishing after this cache arrived must not remove it under this process."""
    first = SharedOrtRuntime(folder)
    inode = (first.engine.path / INDEX_NAME).stat().st_ino
    files = SharedFolder(folder)
    build_cache(files, ort, cache_key(files, ort), first.engine.path)  # the late builder
    assert (first.engine.path / INDEX_NAME).stat().st_ino == inode
    assert len(list((folder / CACHE_DIR).iterdir())) == 1
    np.testing.assert_allclose(first.run("task1", 4, _batch()), SharedOrtRuntime(folder).run("task1", 4, _batch()))
