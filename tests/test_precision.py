"""Exports at lower precision (issue 23): float16 blocks, int8 blocks with a scale per output channel."""

import json
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from typer.testing import CliRunner

from dvn_cli.cli.app import app
from dvn_cli.core.cost import level_cost
from dvn_cli.core.network import build_network
from dvn_cli.errors import BadConfig
from dvn_cli.export.pairs import export_models
from dvn_cli.export.precision import quantize_int8
from dvn_cli.export.shared import export_shared
from dvn_cli.modelfile.bundle import save_bundle
from dvn_cli.modelfile.checkpoint import load_checkpoint, save_checkpoint
from dvn_cli.modelfile.shared_weights import WEIGHTS_NAME, read_weights_index
from dvn_cli.planning.budgets import format_bytes
from dvn_cli.planning.memory import memory_model
from dvn_cli.runtime.ort import SharedOrtRuntime

from .conftest import settle_batch_norm, tiny_config, tiny_tasks
from .test_imagenet_backbones import settled

runner = CliRunner()
PAIRS = [("task1", 3), ("task2", 2)]
STORED = {"fp16": np.float16, "int8": np.int8}


@pytest.fixture
def checkpoint(scrambled_network, tmp_path):
    return load_checkpoint(save_checkpoint(settle_batch_norm(scrambled_network), tmp_path / "model.safetensors"))


def _batch(n: int = 6) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((n, 3, 12, 12)).astype(np.float32) * 1.5


def test_int8_is_symmetric_per_output_channel():
    w = np.random.default_rng(0).standard_normal((4, 3, 3, 3)).astype(np.float32)
    w[2] = 0  # a channel of zeros keeps a usable scale
    q, scale = quantize_int8(w)
    assert q.dtype == np.int8 and scale.shape == (4,) and scale.dtype == np.float32
    assert np.abs(q).max() == 127 and np.all(q[2] == 0) and scale[2] == 1
    assert np.abs(q * scale[:, None, None, None] - w).max() <= scale.max() / 2 + 1e-7


@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_a_lower_precision_shared_graph_runs_in_plain_onnxruntime(checkpoint, tmp_path, precision):
    """Standard ONNX: plain onnxruntime reads the stored blocks itself and computes what the runtime computes;
    only the blocks are stored at the precision, batch norms and heads stay float32."""
    manifest = export_shared(checkpoint, tmp_path / precision, PAIRS, precision=precision)
    reference = export_shared(checkpoint, tmp_path / "fp32", PAIRS, check=False)
    index = read_weights_index(tmp_path / precision / WEIGHTS_NAME, pages=False)
    blocks = [n for n in index if ".weight." in n and n.startswith("features.") and not n.endswith(".scale")]
    assert blocks and all(index[n][0] == STORED[precision] for n in blocks)
    assert all(index[n][0] == np.float32 for n in index if n.startswith("head.") or ".level" in n)
    scales = {n for n in index if n.endswith(".weight." + n.split(".weight.")[-1]) and n.endswith(".scale")}
    assert len(scales) == (len(blocks) if precision == "int8" else 0)
    assert manifest["weights"]["precision"] == precision and manifest["shared_format_version"] == 3
    assert manifest["weights"]["stored_params"] == reference["weights"]["stored_params"]
    runtime, fp32 = SharedOrtRuntime(tmp_path / precision), SharedOrtRuntime(tmp_path / "fp32")
    for entry in manifest["models"]:
        task, level = entry["task"], entry["level"]
        session = ort.InferenceSession(str(tmp_path / precision / entry["file"]), providers=["CPUExecutionProvider"])
        (alone,) = session.run(["logits"], {"input": _batch()})
        np.testing.assert_allclose(alone, runtime.run(task, level, _batch()), atol=1e-5)
        np.testing.assert_allclose(alone, fp32.run(task, level, _batch()), atol=0.05)
        assert entry["precision"] == precision and 0 < entry["check_max_abs_diff"] < 0.05
        assert entry["check_top1_agreement"] == 1.0
        ops = {node.op_type for node in onnx.load(str(tmp_path / precision / entry["file"])).graph.node}
        assert ("Cast" if precision == "fp16" else "DequantizeLinear") in ops


@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_a_lower_precision_per_pair_export(checkpoint, tmp_path, precision):
    manifest = export_models(checkpoint, tmp_path / precision, PAIRS, precision=precision)
    full = export_models(checkpoint, tmp_path / "fp32", PAIRS)
    for entry, fp32 in zip(manifest["models"], full["models"], strict=True):
        model = onnx.load(str(tmp_path / precision / entry["file"]))
        convs = {n.input[1] for n in model.graph.node if n.op_type == "Conv"}
        inits = {i.name: i for i in model.graph.initializer}
        stored = {inits[n].data_type for n in convs if n in inits}
        assert stored == set() and all(n.endswith(".float") for n in convs)  # every weight converted in the graph
        lowered = {i.data_type for i in inits.values() if i.name + ".float" in convs}
        assert lowered == {onnx.TensorProto.FLOAT16 if precision == "fp16" else onnx.TensorProto.INT8}
        assert entry["bytes"] < (0.7 if precision == "fp16" else 0.55) * fp32["bytes"]  # tiny: the graph itself weighs
        assert entry["precision"] == precision and 0 < entry["check_max_abs_diff"] < 0.05
    with pytest.raises(BadConfig, match="torch-export stores float32 weights only"):
        export_models(checkpoint, tmp_path / "pt2", PAIRS, format="torch-export", precision="int8")


def test_fp32_stays_format_2_and_checks_top1(checkpoint, tmp_path):
    manifest = export_shared(checkpoint, tmp_path / "out", PAIRS)
    assert manifest["shared_format_version"] == 2 and manifest["weights"]["precision"] == "fp32"
    assert all(m["check_top1_agreement"] == 1.0 and m["check_max_abs_diff"] < 1e-4 for m in manifest["models"])


@pytest.mark.parametrize("shared", [True, False])
def test_cli_refuses_an_unknown_precision_in_one_line(checkpoint, tmp_path, shared):
    args = ["export", "-c", str(checkpoint.path), "-o", str(tmp_path / "x"), "--precision", "int4"]
    result = runner.invoke(app, args + (["--shared"] if shared else []))
    assert result.exit_code == 1 and len(result.stderr.strip().splitlines()) == 1, result.output
    assert "unknown precision 'int4'; known: fp32, fp16, int8" in result.stderr
    assert not (tmp_path / "x").exists()


def test_cli_exports_and_describes_an_int8_folder(checkpoint, tmp_path):
    out = tmp_path / "cli"
    args = ["export", "-c", str(checkpoint.path), "--shared", "--precision", "int8", "--task", "task1", "-o", str(out)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "at int8" in result.stdout and "top-1 agree" in result.stdout
    info = runner.invoke(app, ["info", "-c", str(out)])
    assert info.exit_code == 0 and "parameters stored once at int8" in info.stdout, info.output
    described = json.loads(runner.invoke(app, ["info", "-c", str(out), "--json"]).stdout)
    assert described["weights"]["precision"] == "int8"
    assert described["weights"]["bytes"] == (out / WEIGHTS_NAME).stat().st_size


@pytest.mark.slow
def test_weights_file_bytes_on_a_network_whose_blocks_dominate(tmp_path):
    """The main job's network (ResNet-14 32/64/128, k = 4, two tasks, 1x28x28): both tasks' top levels, which use
    every block (two graphs per precision, not eight: the weights file is what is measured)."""
    torch.manual_seed(0)
    config = tiny_config(depth=14, widths=(32, 64, 128), in_channels=1, input_size=28)
    checkpoint = load_checkpoint(save_checkpoint(build_network(config, tiny_tasks(2)), tmp_path / "m.safetensors"))
    size = {}
    for precision in ("fp32", "fp16", "int8"):
        export_shared(checkpoint, tmp_path / precision, [("task0", 4), ("task1", 4)], precision=precision, check=False)
        size[precision] = (tmp_path / precision / WEIGHTS_NAME).stat().st_size
    assert size["fp16"] <= 0.55 * size["fp32"] and size["int8"] <= 0.3 * size["fp32"], size


@pytest.mark.slow
def test_lower_precision_folders_agree_with_fp32_on_real_mnist(real_data_root, tmp_path):
    """dvn export --precision, eval, predict and info on real MNIST: the top-1 class of the fp16 and int8 folders
    agrees with the fp32 folder's on at least 98 % of 1000 test images at every level."""
    from PIL import Image

    from dvn_cli.evaluation.evaluate import load_split, predictions
    from dvn_cli.modelfile.registry import open_model
    from dvn_cli.runtime.runner import ModelRunner

    run = tmp_path / "run"
    trained = runner.invoke(
        app,
        [
            "train", "--tasks", "mnist", "--data-root", str(real_data_root), "--limit", "3000", "--depth", "8",
            "--widths", "16,32,64", "--stem-stride", "2", "--epochs", "1", "--batch-size", "64",
            "--warmup-steps", "20", "--no-augment", "--out", str(run),
        ],
    )  # fmt: skip
    assert trained.exit_code == 0, trained.output
    checkpoint = open_model(run / "model.safetensors")
    spec = checkpoint.task_spec("mnist")
    images, _ = load_split(spec, checkpoint.spec_of("mnist", 1).backbone, "test", str(real_data_root), 1000)
    top1, accuracy = {}, {}
    for precision in ("fp32", "fp16", "int8"):
        out = tmp_path / precision
        args = ["export", "-c", str(run / "model.safetensors"), "--shared", "--precision", precision, "-o", str(out)]
        assert runner.invoke(app, args).exit_code == 0
        args = ["eval", "-c", str(out), "--limit", "1000", "--data-root", str(real_data_root), "--json"]
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
        accuracy[precision] = {r["level"]: r["accuracy"] for r in json.loads(result.stdout)["rows"]}
        folder = ModelRunner(open_model(out))
        top1[precision] = {lv: predictions(folder.forward("mnist", lv), images, spec) for lv in range(1, 5)}
        info = runner.invoke(app, ["info", "-c", str(out)])
        assert info.exit_code == 0 and f"at {precision}" in info.stdout
    assert accuracy["fp32"][4] > 0.7  # trained (chance is 0.1; measured 0.80), so that agreement means something
    for precision in ("fp16", "int8"):
        for level in range(1, 5):
            agreement = float((top1[precision][level] == top1["fp32"][level]).float().mean())
            assert agreement >= 0.98, (precision, level, agreement)
    image = tmp_path / "digit.png"
    Image.fromarray(images[0, 0].numpy()).save(image)
    for precision in ("fp32", "int8"):
        got = runner.invoke(app, ["predict", str(image), "-c", str(tmp_path / precision), "--json"])
        assert got.exit_code == 0, got.output
        top1[precision] = [row["top"][0]["class"] for row in json.loads(got.stdout)["rows"]]
    assert top1["int8"] == top1["fp32"]


# ---------------------------------------------------------------------------------- budgets in bytes at a precision


def _trained(checkpoint, tmp_path):
    """The fixture's checkpoint with a training summary to plan with (every level more accurate than the last)."""
    network = checkpoint.network
    accuracy = {name: [0.5 + level / 10 for level in range(1, network.units + 1)] for name in network.task_names}
    return save_checkpoint(network, tmp_path / "trained.safetensors", {"val_accuracy": accuracy})


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_plan_bytes_are_the_bytes_the_shared_export_stores(checkpoint, tmp_path, precision):
    """``dvn plan --precision P`` counts exactly the data of the weights file ``export --shared --precision P``
    writes for the chosen pairs; the file adds only its header and at most 64 bytes of alignment per tensor
    (format 3; format 2 pages the large tensors)."""
    path = _trained(checkpoint, tmp_path)
    args = ["plan", "-c", str(path), "--budget", "100%", "--tasks", "task1,task2", "--precision", precision]
    result = runner.invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    assert plan["precision"] == precision
    pairs = list(plan["choices"].items())
    manifest = export_shared(checkpoint, tmp_path / "out", pairs, check=False, precision=precision)
    weights = manifest["weights"]
    assert weights["data_bytes"] == plan["memory_bytes"]
    if precision == "fp32":
        assert plan["memory_bytes"] == 4 * plan["memory_params"]
    else:
        header = 8 + int.from_bytes((tmp_path / "out" / WEIGHTS_NAME).read_bytes()[:8], "little")
        assert 0 <= weights["bytes"] - header - plan["memory_bytes"] < 64 * weights["tensors"]
    for task, level in pairs:  # one pair alone: what a budget for one task compares, and ``separate_bytes``
        alone = export_shared(checkpoint, tmp_path / task, [(task, level)], check=False, precision=precision)
        assert alone["weights"]["data_bytes"] == memory_model(checkpoint.network).at(precision).memory(
            {checkpoint.network.task_index(task): level}
        )


def test_a_byte_budget_meets_a_larger_level_at_int8(checkpoint, tmp_path):
    """The same budget in bytes buys a larger level when the blocks are stored at int8: in ``dvn plan`` (tasks at
    once) and in ``dvn export --budget`` (one level per task)."""
    path = _trained(checkpoint, tmp_path)
    network = checkpoint.network
    fp32_sizes = [4 * level_cost(network, "task1", level).params_total for level in (1, 2, 3, 4)]
    budget = f"{fp32_sizes[1]}B"  # exactly level 2 at fp32
    levels = {}
    for precision in ("fp32", "int8"):
        args = ["plan", "-c", str(path), "--budget", budget, "--tasks", "task1", "--precision", precision, "--json"]
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
        plan = json.loads(result.stdout)
        assert plan["memory_bytes"] <= plan["budget_bytes"] == fp32_sizes[1]
        levels[precision] = plan["choices"]["task1"]
        out = tmp_path / precision
        args = ["export", "-c", str(path), "--shared", "--task", "task1", "--budget", budget, "-o", str(out)]
        assert runner.invoke(app, [*args, "--precision", precision, "--no-check"]).exit_code == 0
        exported = json.loads((out / "manifest.json").read_text())
        assert [m["level"] for m in exported["models"]] == [levels[precision]]
        assert exported["weights"]["data_bytes"] <= fp32_sizes[1]
    assert levels["fp32"] == 2 and levels["int8"] > 2, levels
    plain = runner.invoke(app, ["plan", "-c", str(path), "--budget", budget, "--tasks", "task1", "--precision", "int8"])
    assert "at int8" in plain.stdout and f"of a budget of {format_bytes(fp32_sizes[1])}" in plain.stdout


def test_byte_budgets_at_a_precision_refuse_in_one_line(checkpoint, tmp_path):
    path = _trained(checkpoint, tmp_path)
    bad = runner.invoke(app, ["plan", "-c", str(path), "--budget", "2MB", "--precision", "int4"])
    assert bad.exit_code == 1 and bad.stderr.strip() == "error: unknown precision 'int4'; known: fp32, fp16, int8"
    tiny = runner.invoke(app, ["plan", "-c", str(path), "--budget", "1kB", "--precision", "int8"])
    assert tiny.exit_code == 1 and len(tiny.stderr.strip().splitlines()) == 1, tiny.output
    assert "budget of 1.0 kB at int8 fits no plan of task0, task1, task2: with every task at level 1" in tiny.stderr
    one = runner.invoke(app, ["export", "-c", str(path), "--task", "task1", "--budget", "1kB", "--precision", "int8"])
    assert one.exit_code == 1 and "fits no level of task1: the smallest, level 1, has" in one.stderr
    assert " at int8" in one.stderr and len(one.stderr.strip().splitlines()) == 1
    bundle = save_bundle(checkpoint.network, {"task1": 3}, tmp_path / "b.safetensors")
    args = ["export", "-c", str(bundle), "-o", str(tmp_path / "x"), "--budget", "1MB", "--precision", "int8"]
    refused = runner.invoke(app, args)
    assert refused.exit_code == 1 and len(refused.stderr.strip().splitlines()) == 1, refused.output
    assert "a budget in bytes at int8 is counted on a checkpoint's unit blocks" in refused.stderr
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("arch", ["resnet18", "mobilenetv2"])
def test_bytes_at_int8_match_the_export_on_the_other_backbones(arch, tmp_path):
    """Stem rows, depthwise rows and 1x1 shortcuts: each block's scales counted as the export stores them."""
    network = settled(arch)
    checkpoint = load_checkpoint(save_checkpoint(network, tmp_path / "m.safetensors"))
    manifest = export_shared(checkpoint, tmp_path / "out", [("task0", 3), ("task1", 2)], check=False, precision="int8")
    assert manifest["weights"]["data_bytes"] == memory_model(network).at("int8").memory({0: 3, 1: 2})


def test_a_byte_budget_on_a_lower_precision_folder_counts_the_bytes_it_stores(checkpoint, tmp_path):
    """``dvn predict --budget`` and ``dvn serve``'s ``PUT /v1/budget`` on an int8 folder compare the bytes the
    folder stores per level, not the float32 cost: a budget below level 4's float32 bytes still runs level 4."""
    from dvn_cli.modelfile.registry import open_model
    from dvn_cli.planning.select import select_pairs

    export_shared(checkpoint, tmp_path / "int8", [("task0", 2), ("task0", 4)], precision="int8", check=False)
    folder = open_model(tmp_path / "int8")
    stored, fp32 = folder.stored_bytes("task0", 4), folder.cost_of("task0", 4).bytes
    assert stored == folder.files.held_bytes([("task0", 4)]) < 0.4 * fp32
    assert select_pairs(folder, ["task0"], f"{stored}B") == [("task0", 4)]
    assert select_pairs(folder, ["task0"], f"{stored - 1}B") == [("task0", 2)]


@pytest.mark.parametrize("shared", [True, False])
def test_fp16_beyond_its_range_is_one_line_without_numpy_warning(scrambled_network, tmp_path, shared):
    """A weight of 1e30 printed numpy's overflow warning (two lines) before dvn's own error; now only the error."""
    network = settle_batch_norm(scrambled_network)
    with torch.no_grad():
        network.features.stem_conv.weight[0, 0, 0, 0] = 1e30  # finite: a checkpoint may hold it
    path = save_checkpoint(network, tmp_path / "model.safetensors")
    args = ["export", "-c", path, "-o", tmp_path / "x", "--precision", "fp16", "--no-check", *(["--shared"] * shared)]
    result = subprocess.run(
        [sys.executable, "-m", "dvn_cli", *map(str, args)], capture_output=True, text=True, timeout=300
    )
    name = "features.stem_conv.weight" + (".0" if shared else "")
    assert (result.returncode, result.stdout) == (1, ""), result.stderr
    assert result.stderr == f"error: {name} holds values beyond float16's range (65504); export at fp32 or int8\n"
    assert not (tmp_path / "x").exists()
