"""Exported models compute what the plain PyTorch model computes, and the manifest says how to feed them."""

import hashlib
import json
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from PIL import Image
from torch import nn

from dvn_cli.core.cost import level_cost
from dvn_cli.core.network import build_network
from dvn_cli.core.plain import extract_plain
from dvn_cli.data.batches import normalize_batch
from dvn_cli.data.pixels import convert_images
from dvn_cli.errors import BadConfig, DvnError, UnknownTask
from dvn_cli.export.pairs import (
    CHECK_TOLERANCE,
    check_onnx,
    check_torch_program,
    export_models,
    export_onnx,
    export_torch_program,
    fold_batchnorm,
)
from dvn_cli.fsutil import sha256_file
from dvn_cli.modelfile.checkpoint import load_checkpoint, save_checkpoint
from dvn_cli.modelfile.compact import CompactModel, load_compact, save_compact
from dvn_cli.modelfile.spec import compact_spec

from .conftest import settle_batch_norm, tiny_config, tiny_tasks

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
MODEL_FIELDS = {
    "task", "level", "units", "file", "format", "sha256", "bytes", "params", "params_total", "macs", "classes",
    "preprocess", "input", "output", "check_max_abs_diff",
}  # fmt: skip


@pytest.fixture
def settled(tiny_network):
    return settle_batch_norm(tiny_network)


@pytest.fixture
def checkpoint(settled, tmp_path):
    return load_checkpoint(save_checkpoint(settled, tmp_path / "model.safetensors"))


def test_fold_batchnorm_keeps_outputs_and_removes_every_batch_norm(settled):
    x = torch.randn(4, 3, 12, 12)
    for level in range(1, settled.units + 1):
        plain = extract_plain(settled, "task1", level)
        before = {n: t.clone() for n, t in plain.state_dict().items()}
        folded = fold_batchnorm(plain)
        assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
        convs = [m for m in folded.modules() if isinstance(m, nn.Conv2d)]
        assert convs and all(c.bias is not None for c in convs)
        with torch.no_grad():
            torch.testing.assert_close(folded(x), plain(x), atol=1e-5, rtol=0)
        for name, tensor in plain.state_dict().items():  # the source is untouched
            assert torch.equal(tensor, before[name]), name


def test_onnx_matches_pytorch_and_is_one_clean_file(settled, tmp_path):
    plain = extract_plain(settled, "task0", 2)
    spec = compact_spec(settled, "task0", 2)
    path = export_onnx(plain, spec, tmp_path / "m.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]  # no external data, no temporary
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    assert [i.name for i in model.graph.input] == ["input"] and [o.name for o in model.graph.output] == ["logits"]
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [3, 12, 12]
    assert not {n.op_type for n in model.graph.node} & {"BatchNormalization"}
    props = {p.key: p.value for p in model.metadata_props}
    assert props["dvn_task"] == "task0" and props["dvn_level"] == "2" and json.loads(props["dvn_units"]) == [0, 1]
    diff = check_onnx(path, plain)
    assert diff.max_abs_diff < CHECK_TOLERANCE and diff.top1_agreement == 1.0
    assert check_onnx(path, plain, torch.randn(7, 3, 12, 12)).max_abs_diff < CHECK_TOLERANCE


def test_export_every_task_and_level_with_manifest(checkpoint, tmp_path):
    out = tmp_path / "exported"
    manifest = export_models(checkpoint, out)
    network = checkpoint.network
    assert json.loads((out / "manifest.json").read_text()) == manifest
    assert manifest["source"]["sha256"] == sha256_file(checkpoint.path)
    assert manifest["source"]["format"] == "dvn-checkpoint" and manifest["source"]["k"] == 4
    models = manifest["models"]
    assert [(m["task"], m["level"]) for m in models] == [(t, lv) for t in ("task0", "task1") for lv in (1, 2, 3, 4)]
    for m in models:
        assert MODEL_FIELDS <= m.keys()
        data = (out / m["file"]).read_bytes()
        assert m["file"] == f"{m['task']}-level{m['level']}.onnx"
        assert m["sha256"] == hashlib.sha256(data).hexdigest() and m["bytes"] == len(data)
        cost = level_cost(network, m["task"], m["level"])
        assert (m["params"], m["params_total"], m["macs"]) == (cost.params, cost.params_total, cost.macs)
        assert m["units"] == list(network.layout.level_units(network.task_index(m["task"]), m["level"]))
        task = network.tasks[network.task_index(m["task"])]
        assert m["classes"] == list(task.classes)
        assert m["preprocess"] == {
            "channels": 3, "height": 12, "width": 12, "resize": "bilinear", "mean": [0.5] * 3, "std": [0.25] * 3,
        }  # fmt: skip
        assert m["input"] == "input" and m["output"] == "logits"
        assert 0 <= m["check_max_abs_diff"] < CHECK_TOLERANCE
    assert sorted(p.name for p in out.iterdir()) == sorted(["manifest.json", *(m["file"] for m in models)])


def test_export_one_pair_without_check_and_merge_with_earlier_export(checkpoint, tmp_path):
    first = export_models(checkpoint, tmp_path, pairs=[("task0", 1)], check=False)
    assert [(m["task"], m["level"], m["check_max_abs_diff"]) for m in first["models"]] == [("task0", 1, None)]
    kept = (tmp_path / "task0-level1.onnx").read_bytes()
    merged = export_models(checkpoint, tmp_path, pairs=[(1, 3)], check=False)  # ANOTHER pair: the first stays
    assert [(m["task"], m["level"]) for m in merged["models"]] == [("task0", 1), ("task1", 3)]
    assert merged["models"][0] == first["models"][0] and (tmp_path / "task0-level1.onnx").read_bytes() == kept
    assert json.loads((tmp_path / "manifest.json").read_text()) == merged
    second = export_models(checkpoint, tmp_path, pairs=[(1, 3), ("task0", 1)], check=False)  # the same: replaced
    assert [(m["task"], m["level"]) for m in second["models"]] == [("task1", 3), ("task0", 1)]


def test_export_from_compact_model(checkpoint, tmp_path):
    network = checkpoint.network
    plain = extract_plain(network, "task1", 2)
    spec = compact_spec(network, "task1", 2, sha256_file(checkpoint.path))
    compact = save_compact(plain, spec, tmp_path / "task1-2.safetensors")
    for source in (load_compact(compact), compact):  # a loaded compact model, or its path
        manifest = export_models(source, tmp_path / "out", sample_inputs={"task1": torch.randn(3, 3, 12, 12)})
        (model,) = manifest["models"]
        assert (model["task"], model["level"], model["units"]) == ("task1", 2, [3, 2])
        assert model["check_max_abs_diff"] < CHECK_TOLERANCE
        assert manifest["source"]["format"] == "dvn-compact"
        assert manifest["source"]["checkpoint_sha256"] == sha256_file(checkpoint.path)
    assert export_models(load_compact(compact), tmp_path / "again", pairs=[("task1", 2)], check=False)["models"]
    with pytest.raises(DvnError, match=re.escape(f"{compact} holds only task1 level 2; export the full checkpoint")):
        export_models(load_compact(compact), tmp_path / "other", pairs=[("task1", 3)])
    with pytest.raises(DvnError, match="this compact model holds only task1 level 2"):
        export_models(CompactModel(plain, spec), tmp_path / "other", pairs=[("task0", 2)])
    assert not (tmp_path / "other").exists()


def test_export_errors_are_one_line_and_write_nothing(checkpoint, tmp_path):
    with pytest.raises(BadConfig, match=r"^level 5 does not exist: task0 has levels 1\.\.4$"):
        export_models(checkpoint, tmp_path / "a", pairs=[("task0", 5)])
    with pytest.raises(UnknownTask, match="unknown task 'nope'; this network has: task0, task1"):
        export_models(checkpoint, tmp_path / "a", pairs=[("nope", 1)])
    assert not (tmp_path / "a").exists()
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    with pytest.raises(DvnError, match=f"^cannot write to {re.escape(str(blocker))}: it is a file, not a folder$"):
        export_models(checkpoint, blocker)
    with pytest.raises(DvnError, match=f"^cannot write to {re.escape(str(blocker / 'sub'))}: Not a directory$"):
        export_models(checkpoint, blocker / "sub")
    with pytest.raises(DvnError, match="unknown export format 'tflite'; known: onnx, torch-export"):
        export_models(checkpoint, tmp_path / "a", format="tflite")


def test_missing_onnx_runtime_says_how_to_install(checkpoint, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import now raises ImportError
    with pytest.raises(DvnError, match=re.escape("onnxruntime is missing): pip install 'dvn-cli[export]'")):
        export_models(checkpoint, tmp_path / "a")
    assert not (tmp_path / "a").exists()
    blocked = "import sys; sys.modules['onnx'] = sys.modules['onnxruntime'] = None; import dvn_cli.export.pairs"
    result = subprocess.run([sys.executable, "-c", blocked], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr  # dvn imports without the export extra


def test_torch_export_program_matches_pytorch(settled, tmp_path):
    plain = extract_plain(settled, "task1", 3)
    path = export_torch_program(plain, compact_spec(settled, "task1", 3), tmp_path / "m.pt2")
    assert check_torch_program(path, plain).max_abs_diff < CHECK_TOLERANCE
    program = torch.export.load(str(path)).module()
    x = torch.randn(1, 3, 12, 12)
    with torch.no_grad():
        torch.testing.assert_close(program(x), plain(x), atol=1e-5, rtol=0)


def _write_images(folder: Path) -> list[Path]:
    rng = np.random.default_rng(0)
    paths = []
    for i, (size, mode) in enumerate([((8, 6), "RGB"), ((12, 12), "RGB"), ((20, 17), "RGB"), ((9, 9), "L")]):
        shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
        path = folder / f"img{i}.png"
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(path)
        paths.append(path)
    return paths


def _reference_answer(path: Path, plain, spec) -> tuple[str, float]:
    """PyTorch's class and probability, preprocessing as dvn's data module does (PIL bilinear, as for folders)."""
    with Image.open(path) as image:
        image = image.convert("RGB")
        if spec.task.resize == "bilinear" or image.size[0] > 12 or image.size[1] > 12:
            image = image.resize((12, 12), Image.Resampling.BILINEAR)
        pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None]  # (1, 3, h, w) uint8
    x = normalize_batch(convert_images(pixels, 3, 12)[0], spec.task)
    with torch.no_grad():
        probs = plain(x).softmax(1)[0]
    return spec.task.classes[int(probs.argmax())], float(probs.max())


def test_deploy_example_agrees_with_pytorch(tmp_path):
    torch.manual_seed(3)
    tasks = tiny_tasks(2)
    network = settle_batch_norm(build_network(tiny_config(), [replace(tasks[0], resize="pad"), tasks[1]]))
    checkpoint = load_checkpoint(save_checkpoint(network, tmp_path / "model.safetensors"))
    export_models(checkpoint, tmp_path / "out", pairs=[("task0", 2), ("task1", 4), ("task1", 1)], check=False)
    images = _write_images(tmp_path)
    answers = set()
    for task, level, args in [("task0", 2, ["--task", "task0"]), ("task1", 4, ["--task", "task1"])]:
        result = subprocess.run(
            [sys.executable, str(EXAMPLES / "deploy_onnx.py"), str(tmp_path / "out" / "manifest.json"), *args]
            + [str(p) for p in images],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, result.stderr
        plain, spec = extract_plain(network, task, level), compact_spec(network, task, level)
        lines = result.stdout.strip().splitlines()
        assert len(lines) == len(images)
        for path, line in zip(images, lines, strict=True):
            match = re.fullmatch(rf"{re.escape(str(path))}: (\S+) \((0\.\d{{3}}|1\.000)\)", line)
            assert match, line
            name, prob = _reference_answer(path, plain, spec)
            assert match.group(1) == name and abs(float(match.group(2)) - prob) < 6e-4, (task, line, name, prob)
            answers.add(line.split(": ")[1])
    assert len(answers) > 4  # the images and tasks are told apart: preprocessing matters to the answers
