"""The shared export (one weights file, every block once; one graph per pair) and its torch-free runtime."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from typer.testing import CliRunner

from dvn_cli.cli.app import app
from dvn_cli.core.network import build_network
from dvn_cli.errors import BadConfig, DvnError, MissingData, UnknownTask, WrongFileFormat
from dvn_cli.export.block_graphs import shared_tensors
from dvn_cli.export.pairs import export_models
from dvn_cli.export.shared import export_shared
from dvn_cli.modelfile.bundle import load_bundle, save_bundle
from dvn_cli.modelfile.checkpoint import load_checkpoint, save_checkpoint
from dvn_cli.modelfile.compact import load_compact, save_compact
from dvn_cli.modelfile.shared_folder import SharedFolder
from dvn_cli.modelfile.shared_weights import ALIGNMENT, WEIGHTS_NAME, read_weights_index, tensor_alignment
from dvn_cli.planning.plan import shared_memory_params
from dvn_cli.runtime.ort import SharedOrtRuntime

from .conftest import require_module, settle_batch_norm, tiny_config, tiny_tasks

SRC = Path(__file__).resolve().parents[1] / "src"
runner = CliRunner()


@pytest.fixture
def checkpoint(tiny_network, tmp_path):
    return load_checkpoint(save_checkpoint(settle_batch_norm(tiny_network), tmp_path / "model.safetensors"))


@pytest.fixture
def scrambled_checkpoint(scrambled_network, tmp_path):
    return load_checkpoint(save_checkpoint(settle_batch_norm(scrambled_network), tmp_path / "scrambled.safetensors"))


@pytest.fixture
def shared_dir(checkpoint, tmp_path):
    out = tmp_path / "shared"
    export_shared(checkpoint, out, [("task0", 2), ("task1", 3)], check=False)
    return out


def _batch(seed: int = 0, n: int = 5) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, 12, 12)).astype(np.float32) * 1.5


def _same_as_per_pair(model, tmp_path, pairs=None):
    shared = export_shared(model, tmp_path / "shared", pairs)
    per_pair = export_models(model, tmp_path / "per-pair", pairs, check=False)
    runtime = SharedOrtRuntime(tmp_path / "shared")
    x = _batch()
    assert [(m["task"], m["level"]) for m in shared["models"]] == [(m["task"], m["level"]) for m in per_pair["models"]]
    for entry in per_pair["models"]:
        session = ort.InferenceSession(str(tmp_path / "per-pair" / entry["file"]), providers=["CPUExecutionProvider"])
        (expected,) = session.run(["logits"], {"input": x})
        got = runtime.run(entry["task"], entry["level"], x)
        np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
    assert all(m["check_max_abs_diff"] < 1e-4 for m in shared["models"])
    return shared


def test_two_shared_graphs_compute_what_the_per_pair_export_computes(scrambled_checkpoint, tmp_path):
    _same_as_per_pair(scrambled_checkpoint, tmp_path, [("task1", 3), ("task2", 1)])


@pytest.mark.slow
def test_shared_graphs_compute_what_the_per_pair_export_computes(checkpoint, tmp_path):
    manifest = _same_as_per_pair(checkpoint, tmp_path)
    assert len(manifest["models"]) == 8 and manifest["layout"] == "shared"


@pytest.mark.slow
def test_shared_graphs_match_per_pair_on_scrambled_units(scrambled_checkpoint, tmp_path):
    _same_as_per_pair(scrambled_checkpoint, tmp_path)


def test_blockwise_graphs_compute_the_same(scrambled_checkpoint, tmp_path):
    pairs = [("task0", 3), ("task2", 2)]
    export_shared(scrambled_checkpoint, tmp_path / "concat", pairs)
    manifest = export_shared(scrambled_checkpoint, tmp_path / "blockwise", pairs, mode="blockwise")
    assert manifest["graph_mode"] == "blockwise"
    concat, blockwise = SharedOrtRuntime(tmp_path / "concat"), SharedOrtRuntime(tmp_path / "blockwise")
    for task, level in pairs:
        np.testing.assert_allclose(blockwise.run(task, level, _batch()), concat.run(task, level, _batch()), atol=1e-5)
    with pytest.raises(BadConfig, match="graph mode"):
        export_shared(scrambled_checkpoint, tmp_path / "x", pairs, mode="nope")


def test_weights_file_holds_each_block_once_aligned(scrambled_network, scrambled_checkpoint, tmp_path):
    choices = {"task0": 3, "task1": 2, "task2": 4}
    manifest = export_shared(scrambled_checkpoint, tmp_path / "out", list(choices.items()), check=False)
    weights = manifest["weights"]
    path = tmp_path / "out" / WEIGHTS_NAME
    index = read_weights_index(path)
    union = shared_memory_params(scrambled_network, choices)
    assert weights["stored_params"] == union and weights["data_bytes"] == 4 * union
    assert sum(dtype.itemsize * int(np.prod(shape)) for dtype, shape, _ in index.values()) == 4 * union
    assert all(offset % tensor_alignment(d.itemsize * int(np.prod(s))) == 0 for d, s, offset in index.values())
    assert path.stat().st_size < weights["data_bytes"] + ALIGNMENT * (len(index) + 1)
    safetensors_numpy = require_module("safetensors.numpy")
    stored = safetensors_numpy.load_file(str(path))  # a valid safetensors file (padding tensors included)
    tensors = shared_tensors(scrambled_checkpoint, list(choices.items()))
    assert set(tensors) == set(index) == {k for k in stored if not k.startswith("__pad__.")}
    for name, array in tensors.items():
        np.testing.assert_array_equal(stored[name], array)
    # every graph names only what it uses, and shares the blocks of another pair
    used = {(m["task"], m["level"]): set(m["tensors"]) for m in manifest["models"]}
    assert set().union(*used.values()) == set(index)
    assert used["task0", 3] & used["task1", 2]


def test_small_tensors_are_packed_and_large_blocks_page_aligned(tmp_path):
    """Issue 20 part 3: the weights file of every (task, level) costs about its checkpoint's bytes, not a page per
    batch norm; blocks of a page or more still start on a page boundary (bytes on disk, no timing)."""
    torch.manual_seed(0)
    network = build_network(tiny_config(widths=(16, 32, 64)), tiny_tasks(2))  # 64-wide blocks are 9 KiB
    checkpoint = save_checkpoint(network, tmp_path / "model.safetensors")
    manifest = export_shared(checkpoint, tmp_path / "out", check=False)
    path = tmp_path / "out" / WEIGHTS_NAME
    sizes = {name: (d.itemsize * int(np.prod(s)), offset) for name, (d, s, offset) in read_weights_index(path).items()}
    large = {name for name, (nbytes, _) in sizes.items() if nbytes >= ALIGNMENT}
    assert large and all(sizes[name][1] % ALIGNMENT == 0 for name in large)
    assert any(offset % ALIGNMENT for nbytes, offset in sizes.values())  # small ones share pages
    assert path.stat().st_size <= 1.15 * checkpoint.stat().st_size
    assert manifest["weights"]["bytes"] == path.stat().st_size
    # plain onnxruntime reads the packed tensors itself and computes what the runtime computes
    session = ort.InferenceSession(str(tmp_path / "out" / "task1-level3.onnx"), providers=["CPUExecutionProvider"])
    (alone,) = session.run(["logits"], {"input": _batch()})
    np.testing.assert_allclose(alone, SharedOrtRuntime(tmp_path / "out").run("task1", 3, _batch()), atol=1e-5)


def test_a_bundle_exports_the_same_graphs(scrambled_network, scrambled_checkpoint, tmp_path):
    choices = {"task0": 2, "task2": 3}
    bundle = load_bundle(save_bundle(scrambled_network, choices, tmp_path / "b.safetensors"))
    export_shared(bundle, tmp_path / "from-bundle")
    export_shared(scrambled_checkpoint, tmp_path / "from-checkpoint", list(choices.items()), check=False)
    a, b = SharedOrtRuntime(tmp_path / "from-bundle"), SharedOrtRuntime(tmp_path / "from-checkpoint")
    for task, level in choices.items():
        np.testing.assert_allclose(a.run(task, level, _batch()), b.run(task, level, _batch()), atol=1e-6)


@pytest.mark.parametrize("mode", ["concat", "canonical"])
def test_runtime_reads_each_tensor_once_and_shares_it(checkpoint, tmp_path, mode):
    shared_dir = tmp_path / mode
    manifest = export_shared(checkpoint, shared_dir, [("task0", 2), ("task1", 3)], check=False, mode=mode)
    assert manifest["graph_mode"] == mode
    runtime = SharedOrtRuntime(shared_dir, cache=False)  # the folder's tensors (the engine cache's: test_engine_cache)
    assert runtime.pairs() == [("task0", 2), ("task1", 3)]
    assert runtime.arrays == {}  # nothing is read before a session needs it
    runtime.session("task0", 2)
    first = dict(runtime._values)
    logits = runtime.run("task1", 3, _batch(n=2))
    index = read_weights_index(shared_dir / WEIGHTS_NAME)
    assert set(runtime.arrays) == set(index)  # every tensor once, for both sessions
    if mode == "concat":  # a shared block is not read again (a canonical tensor grows to the rows both read)
        assert all(runtime._values[name] is value for name, value in first.items())
    for name, array in runtime.arrays.items():
        assert array.shape == index[name][1] and not array.flags.writeable
    views = {name: view[0] for entry in manifest["models"] for name, view in entry.get("views", {}).items()}
    assert bool(views) == (mode == "canonical")
    for name, value in runtime._values.items():  # one copy: every OrtValue is a range of its tensor's array
        array = runtime.arrays[views.get(name, name)]
        start = array.__array_interface__["data"][0]
        assert start <= value.data_ptr() and value.data_ptr() + 4 * np.prod(value.shape()) <= start + array.nbytes
    assert logits.shape == (2, 3) and np.isfinite(logits).all()
    assert runtime.session("task1", 3) is runtime.session("task1", 3)
    with pytest.raises(UnknownTask, match="holds no task0 level 4"):
        runtime.run("task0", 4, _batch())


KEEP = """
import gc, sys
import numpy as np
from dvn_cli.runtime.ort import SharedOrtRuntime

rt = SharedOrtRuntime(sys.argv[1])
x = np.random.default_rng(0).standard_normal((2, 3, 12, 12)).astype(np.float32)
large = rt.session("task0", 4)
expected = rt.run("task0", 4, x)
small = rt.run("task0", 1, x)
rt.keep([("task0", 1)])
assert set(rt.arrays) == set(rt._entry("task0", 1)["tensors"]), sorted(rt.arrays)
assert list(rt._sessions) == [("task0", 1)]
gc.collect()
junk = [np.full(n, 7.0, np.float32) for n in (64, 1024, 8192, 65536) for _ in range(50)]  # reuse freed memory
np.testing.assert_allclose(large.run(["logits"], {"input": x})[0], expected, atol=1e-6)  # its own buffers, alive
np.testing.assert_allclose(rt.run("task0", 1, x), small, atol=1e-6)
np.testing.assert_allclose(rt.run("task0", 4, x), expected, atol=1e-6)  # made again, read again
"""


def test_keep_releases_what_the_running_levels_do_not_use(checkpoint, tmp_path):
    """A switch down gives memory back (``keep``): the runtime then holds only the kept levels' tensors, while a
    released session that is still referenced keeps its own buffers and computes the same logits. In a
    subprocess: a buffer freed under a live session would be a native crash."""
    export_shared(checkpoint, tmp_path / "shared", [("task0", 1), ("task0", 4)], check=False)
    result = subprocess.run(
        [sys.executable, "-c", KEEP, str(tmp_path / "shared")],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(SRC)},
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]


def test_plain_onnxruntime_opens_a_graph_on_its_own(shared_dir):
    """Without dvn's runtime, onnxruntime reads the blocks from the weights file itself (no sharing)."""
    runtime = SharedOrtRuntime(shared_dir)
    session = ort.InferenceSession(str(shared_dir / "task0-level2.onnx"), providers=["CPUExecutionProvider"])
    (got,) = session.run(["logits"], {"input": _batch()})
    np.testing.assert_allclose(got, runtime.run("task0", 2, _batch()), atol=1e-5)


def test_runtime_imports_without_torch():
    code = "import sys, dvn_cli.runtime.ort; assert 'torch' not in sys.modules, 'torch was imported'"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={"PYTHONPATH": str(SRC)})
    assert result.returncode == 0, result.stderr


# ------------------------------------------------------------------------------------------------ bad input


def _edit_manifest(folder: Path, change) -> None:
    path = folder / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


def test_missing_weights_file(shared_dir):
    (shared_dir / WEIGHTS_NAME).unlink()
    with pytest.raises(MissingData, match="weights file .* not found"):
        SharedOrtRuntime(shared_dir)


def test_truncated_weights_file(shared_dir):
    path = shared_dir / WEIGHTS_NAME
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(WrongFileFormat, match="truncated"):
        SharedOrtRuntime(shared_dir)


def test_changed_weights_file(shared_dir):
    path = shared_dir / WEIGHTS_NAME
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(WrongFileFormat, match="changed since the export"):
        SharedOrtRuntime(shared_dir)


def test_graph_naming_a_block_the_file_lacks(shared_dir):
    _edit_manifest(shared_dir, lambda m: m["models"][1]["tensors"].append("features.stem_conv.weight.9"))
    with pytest.raises(WrongFileFormat, match=r"names 1 tensor\(s\) that weights.safetensors lacks"):
        SharedOrtRuntime(shared_dir)


def test_manifest_from_a_newer_dvn(shared_dir):
    _edit_manifest(shared_dir, lambda m: m.update(shared_format_version=99))
    with pytest.raises(WrongFileFormat, match="upgrade dvn"):
        SharedOrtRuntime(shared_dir)


def test_not_a_shared_export(checkpoint, tmp_path):
    with pytest.raises(MissingData, match="manifest.json not found"):
        SharedOrtRuntime(tmp_path)
    export_models(checkpoint, tmp_path / "per-pair", [("task0", 1)], check=False)
    with pytest.raises(WrongFileFormat, match="not the manifest of a shared export"):
        SharedOrtRuntime(tmp_path / "per-pair")


def test_changed_graph(shared_dir):
    path = shared_dir / "task0-level2.onnx"
    path.write_bytes(path.read_bytes() + b"\0")
    with pytest.raises(WrongFileFormat, match="graph .* is changed"):
        SharedOrtRuntime(shared_dir)


# ------------------------------------------------------------------------------------------------ folder safety


def test_another_source_is_not_replaced_without_force(shared_dir, scrambled_checkpoint):
    before = {p.name: p.read_bytes() for p in shared_dir.iterdir()}
    with pytest.raises(DvnError, match="export of another file"):
        export_shared(scrambled_checkpoint, shared_dir, [("task2", 1)], check=False)
    assert {p.name: p.read_bytes() for p in shared_dir.iterdir()} == before  # staging removed, nothing changed
    export_shared(scrambled_checkpoint, shared_dir, [("task2", 1)], check=False, force=True)
    assert SharedOrtRuntime(shared_dir).pairs() == [("task2", 1)]


def test_a_foreign_manifest_is_not_replaced_without_force(checkpoint, tmp_path):
    out = tmp_path / "foreign"
    out.mkdir()
    (out / "manifest.json").write_text('{"something": "else"}')
    with pytest.raises(DvnError, match="not a dvn export manifest"):
        export_shared(checkpoint, out, [("task0", 1)], check=False)
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json"]
    export_shared(checkpoint, out, [("task0", 1)], check=False, force=True)
    assert SharedOrtRuntime(out).pairs() == [("task0", 1)]


def test_per_pair_export_does_not_keep_shared_entries(checkpoint, shared_dir):
    manifest = export_models(checkpoint, shared_dir, [("task0", 4)], check=False)
    assert [(m["task"], m["level"]) for m in manifest["models"]] == [("task0", 4)]
    assert "layout" not in manifest


def test_a_compact_model_is_refused(checkpoint, tmp_path):
    path = save_compact(checkpoint.plain_of("task0", 2), checkpoint.spec_of("task0", 2), tmp_path / "c.safetensors")
    with pytest.raises(BadConfig, match="nothing to share"):
        export_shared(load_compact(path), tmp_path / "out")


def test_failed_export_leaves_no_folder(checkpoint, tmp_path):
    with pytest.raises(UnknownTask):
        export_shared(checkpoint, tmp_path / "new", [("nope", 1)])
    assert not (tmp_path / "new").exists()


# ------------------------------------------------------------------------------------------------ cli


def test_cli_export_shared(checkpoint, tmp_path):
    out = tmp_path / "cli"
    args = ["export", "-c", str(checkpoint.path), "--shared", "--task", "task1", "--budget", "2", "-o", str(out)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "shared weights: weights.safetensors" in result.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert [(m["task"], m["level"]) for m in manifest["models"]] == [("task1", 2)]
    assert SharedOrtRuntime(out).run("task1", 2, _batch()).shape == (5, 3)
    refused = runner.invoke(app, ["export", "-c", str(checkpoint.path), "--shared", "--format", "torch-export"])
    assert refused.exit_code != 0


def test_cli_refuses_another_source_in_one_line(checkpoint, scrambled_checkpoint, tmp_path):
    out = tmp_path / "cli"
    assert runner.invoke(app, ["export", "-c", str(checkpoint.path), "--shared", "-o", str(out)]).exit_code == 0
    result = runner.invoke(app, ["export", "-c", str(scrambled_checkpoint.path), "--shared", "-o", str(out)])
    assert result.exit_code == 1
    assert "export of another file" in result.output and len(result.output.strip().splitlines()) == 1


def test_the_deploy_example_runs_a_shared_graph(shared_dir, tmp_path):
    from PIL import Image

    image = tmp_path / "x.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(image)
    example = Path(__file__).resolve().parents[1] / "examples" / "deploy_onnx.py"
    args = [sys.executable, str(example), str(shared_dir / "manifest.json"), "--task", "task1", str(image)]
    result = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    path, answer = result.stdout.strip().split(": ")
    assert path == str(image) and answer.split()[0] in ("cat", "dog", "fox")


# ------------------------------------------------------------------ the folder as a model file


def test_a_shared_export_folder_opens_as_a_model_file(checkpoint, shared_dir):
    import torch

    from dvn_cli.modelfile.registry import open_model
    from dvn_cli.modelfile.shared import SharedExport
    from dvn_cli.runtime.runner import ModelRunner

    model = open_model(shared_dir)
    runner, reference = ModelRunner(model), ModelRunner(checkpoint)
    assert isinstance(model, SharedExport) and model.pairs() == [("task0", 2), ("task1", 3)]
    assert model.spec_of("task1", 3) == checkpoint.spec_of("task1", 3)
    assert model.task_spec("task0") == checkpoint.task_spec("task0") and model.split == checkpoint.split
    x = torch.from_numpy(_batch(4))
    for task, level in model.pairs():
        got = runner.forward(task, level)(x)
        torch.testing.assert_close(got, reference.forward(task, level)(x), atol=1e-4, rtol=0)
    with pytest.raises(UnknownTask, match="holds only task0 level 2, task1 level 3"):
        runner.forward("task0", 4)
    with pytest.raises(BadConfig, match="holds ONNX graphs"):
        model.plain_of("task0", 2)
    with pytest.raises(BadConfig, match=r"does not match the \(B, C, H, W\)"):
        runner.forward("task0", 2)(torch.zeros(2, 3, 10, 10))


def test_a_budget_picks_the_largest_held_level_that_meets_it(checkpoint, tmp_path):
    from dvn_cli.errors import BadBudget
    from dvn_cli.modelfile.registry import open_model
    from dvn_cli.planning.select import file_level

    export_shared(checkpoint, tmp_path / "levels", [("task0", 1), ("task0", 3), ("task0", 4)], check=False)
    model = open_model(tmp_path / "levels")
    level3 = checkpoint.cost_of("task0", 3).params_total
    assert file_level(model, "task0", "3") == 3  # a held level, as a level budget
    assert file_level(model, "task0", f"{level3 / 1000}k") == 3
    assert file_level(model, "task0", f"{(level3 - 1) / 1000}k") == 1
    with pytest.raises(BadBudget, match="holds only task0 levels 1, 3, 4, which do not meet"):
        file_level(model, "task0", "2")
    with pytest.raises(BadBudget, match="do not meet budget 1B"):
        file_level(model, "task0", "1B")


def test_cli_eval_info_and_predict_take_the_folder(checkpoint, shared_dir, tmp_path):
    from PIL import Image

    Image.new("RGB", (12, 12), (200, 30, 30)).save(tmp_path / "red.png")
    result = runner.invoke(app, ["predict", str(tmp_path / "red.png"), "-c", str(shared_dir), "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)["rows"]
    expected = runner.invoke(
        app, ["predict", str(tmp_path / "red.png"), "-c", str(checkpoint.path), "--json", "--budget", "2"]
    )
    assert [(r["task"], r["level"]) for r in rows] == [("task0", 2), ("task1", 3)]
    first = json.loads(expected.stdout)["rows"][0]
    assert rows[0]["top"][0]["class"] == first["top"][0]["class"]
    assert rows[0]["top"][0]["probability"] == pytest.approx(first["top"][0]["probability"], abs=1e-4)
    info = runner.invoke(app, ["info", "-c", str(shared_dir), "--json"])
    assert info.exit_code == 0, info.output
    described = json.loads(info.stdout)
    assert described["format"] == "dvn-shared-export"
    assert [(lv["task"], lv["level"]) for lv in described["levels"]] == [("task0", 2), ("task1", 3)]
    table = runner.invoke(app, ["info", "-c", str(shared_dir)])
    assert table.exit_code == 0 and "shared export" in table.stdout and "task1-level3.onnx" in table.stdout


def test_cli_refuses_damaged_or_foreign_folders_in_one_line(checkpoint, shared_dir, tmp_path):
    export_models(checkpoint, tmp_path / "per-pair", [("task0", 2)], check=False)
    (tmp_path / "plain").mkdir()
    weights = shared_dir / WEIGHTS_NAME
    cases = {
        tmp_path / "per-pair": "is not the manifest of a shared export",
        tmp_path / "plain": "",  # a folder without a manifest: not a model file
    }
    for folder, message in cases.items():
        result = runner.invoke(app, ["info", "-c", str(folder)])
        assert result.exit_code == 1 and len(result.stderr.splitlines()) == 1, result.output
        assert message in result.stderr
    result = runner.invoke(app, ["prune-level", "-c", str(shared_dir), "--task", "task0", "--budget", "2"])
    assert result.exit_code == 1 and len(result.stderr.splitlines()) == 1, result.output
    assert "prune-level needs a checkpoint or a bundle" in result.stderr
    weights.write_bytes(weights.read_bytes()[:-10])
    result = runner.invoke(app, ["eval", "-c", str(shared_dir)])
    assert result.exit_code == 1 and len(result.stderr.splitlines()) == 1, result.output
    assert "is truncated" in result.stderr


# ------------------------------------------------------------------------------------------------ issue 30


def _ops(path) -> set[str]:
    onnx = require_module("onnx")
    return {node.op_type for node in onnx.load(str(path), load_external_data=False).graph.node}


def test_canonical_graphs_read_every_weight_in_place(tiny_network, checkpoint, tmp_path):
    """Under nearest orders every (task, level)'s units are one contiguous run: the graphs read each weight as a
    tensor or a range of rows of one (no Concat), each alone in plain onnxruntime computes the per-pair export's
    logits, and the weights file holds each parameter once."""
    manifest = export_shared(checkpoint, tmp_path / "shared")
    assert manifest["graph_mode"] == "canonical" and manifest["shared_format_version"] == 4
    per_pair = export_models(checkpoint, tmp_path / "per-pair", check=False)
    runtime, x = SharedOrtRuntime(tmp_path / "shared"), _batch()
    for entry, reference in zip(manifest["models"], per_pair["models"], strict=True):
        path = tmp_path / "shared" / entry["file"]
        assert "Concat" not in _ops(path) and "BatchNormalization" in _ops(path)
        assert entry["check_max_abs_diff"] < 1e-4
        (expected,) = ort.InferenceSession(str(tmp_path / "per-pair" / reference["file"])).run(["logits"], {"input": x})
        (alone,) = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(["logits"], {"input": x})
        np.testing.assert_allclose(alone, expected, atol=1e-4, rtol=0)
        np.testing.assert_allclose(runtime.run(entry["task"], entry["level"], x), expected, atol=1e-4, rtol=0)
    blocks = sum(array.size for array in shared_tensors(checkpoint).values())  # each block once, every batch norm
    assert manifest["weights"]["stored_params"] == blocks and manifest["weights"]["data_bytes"] == 4 * blocks
    assert any(entry["views"] for entry in manifest["models"])  # lower levels read ranges of rows


def test_top_levels_alone_read_each_layer_whole(checkpoint, tmp_path):
    manifest = export_shared(checkpoint, tmp_path / "top", [("task0", 4), ("task1", 4)])
    assert all(not entry["views"] for entry in manifest["models"])
    for entry in manifest["models"]:
        assert {"Concat", "Split"}.isdisjoint(_ops(tmp_path / "top" / entry["file"]))
        assert entry["check_max_abs_diff"] < 1e-4
    first, second = (set(entry["tensors"]) for entry in manifest["models"])
    assert {n for n in first & second if n.endswith(".weight")}  # both read the same full weights


@pytest.mark.parametrize("cache", [False, True])
def test_the_runtime_holds_the_rows_the_running_levels_read(tmp_path, cache):
    """A canonical tensor serves several levels; the runtime reads only the rows of the levels running (what
    ``held_bytes`` and a plan count), grows it when a larger level starts and shrinks it on ``keep``; from an
    engine cache the same, counted in the cache's tensors."""
    torch.manual_seed(0)  # units of 16 channels: onnxruntime's blocks, so the engine cache is used
    tiny_network = settle_batch_norm(build_network(tiny_config(widths=(64, 64, 128)), tiny_tasks(2)))
    checkpoint = save_checkpoint(tiny_network, tmp_path / "wide.safetensors")
    export_shared(checkpoint, tmp_path / "shared", [("task0", 1), ("task0", 4), ("task1", 2)], check=False)
    files = SharedFolder(tmp_path / "shared")
    runtime, x = SharedOrtRuntime(files, cache=cache), _batch()
    assert (runtime.engine is not None) == cache, runtime.cache_note
    held_bytes = runtime.engine.held_bytes if cache else files.held_bytes
    for choices in ({"task0": 1}, {"task0": 4, "task1": 2}):
        assert files.held_bytes(choices.items()) == 4 * shared_memory_params(tiny_network, choices)
    # a stem row between two runs ({0} and {2, 3}) is held with them: the stem's rows are one tensor
    gap = files.held_bytes([("task0", 1), ("task1", 2)]) - 4 * shared_memory_params(
        tiny_network, {"task0": 1, "task1": 2}
    )
    assert gap == 4 * tiny_network.features.stem_conv.weight[: 64 // 4].numel()
    small = runtime.run("task0", 1, x)
    assert sum(a.nbytes for a in runtime.arrays.values()) == held_bytes([("task0", 1)])
    runtime.run("task1", 2, x)
    large = runtime.run("task0", 4, x)
    held = [("task0", 1), ("task0", 4), ("task1", 2)]
    assert sum(a.nbytes for a in runtime.arrays.values()) == held_bytes(held)
    runtime.keep([("task0", 1)])
    assert sum(a.nbytes for a in runtime.arrays.values()) == held_bytes([("task0", 1)])
    assert list(runtime._sessions) == [("task0", 1)]  # made again over the smaller arrays
    np.testing.assert_array_equal(runtime.run("task0", 1, x), small)
    np.testing.assert_array_equal(runtime.run("task0", 4, x), large)
    standard = SharedOrtRuntime(files, cache=False)
    np.testing.assert_allclose(large, standard.run("task0", 4, x), atol=1e-4, rtol=0)


def test_canonical_graphs_need_contiguous_runs_and_float32(checkpoint, scrambled_checkpoint, tmp_path):
    manifest = export_shared(scrambled_checkpoint, tmp_path / "scrambled", [("task0", 2), ("task1", 3)], check=False)
    assert manifest["graph_mode"] == "concat"  # table orders: units {0, 2} are no run
    assert (
        export_shared(checkpoint, tmp_path / "fp16", [("task0", 2)], check=False, precision="fp16")["graph_mode"]
        == "concat"
    )
    with pytest.raises(BadConfig, match="canonical graphs need"):
        export_shared(scrambled_checkpoint, tmp_path / "x", [("task0", 2)], mode="canonical")


def test_a_folder_counts_the_parameters_it_holds_as_it_counts_their_bytes(checkpoint, tmp_path):
    """Levels below the top read row ranges of per-unit tensors: parameters held are counted over the same rows as
    bytes (a parameter budget on a folder means what a byte budget means); an int8 block's scales are no parameters,
    so an int8 folder holds the parameters of the fp32 one."""
    pairs = [(t, level) for t in ("task0", "task1") for level in (1, 2, 3, 4)]
    export_shared(checkpoint, tmp_path / "fp32", pairs, check=False)
    export_shared(checkpoint, tmp_path / "int8", pairs, check=False, precision="int8")
    fp32, int8 = SharedFolder(tmp_path / "fp32"), SharedFolder(tmp_path / "int8")
    for choices in ([("task0", 1)], [("task0", 2), ("task1", 3)], [("task0", 4), ("task1", 1)], pairs):
        assert 4 * fp32.held_params(choices) == fp32.held_bytes(choices)
        assert int8.held_params(choices) == fp32.held_params(choices) and int8.held_bytes(choices) < fp32.held_bytes(
            choices
        )
    one, both = fp32.held_params([("task0", 1)]), fp32.held_params([("task0", 1), ("task1", 1)])
    assert one < both < fp32.held_params([("task0", 4)])  # level 1 of each reads its own unit's rows

    from dvn_cli.serve.folder_engine import FolderEngine

    engine = FolderEngine(tmp_path / "fp32")  # a parameter budget picks what the same bytes pick
    for choices in ({"task0": 2, "task1": 3}, {"task0": 4, "task1": 4}, {"task0": 1, "task1": 1}):
        params = fp32.held_params(choices.items())
        assert engine.plan(f"{params / 1000}k")[0] == engine.plan(f"{4 * params}B")[0] == choices
