"""The ImageNet-style ``resnet18`` and the ``mobilenetv2`` backbones: levels, plain twins, counting, deployment."""

import json

import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from dvn_cli.cli.app import app
from dvn_cli.config import BackboneConfig
from dvn_cli.core.backbones import backbone_defaults, check_input_shape
from dvn_cli.core.cost import level_cost
from dvn_cli.core.layers import UnitDepthwiseConv2d
from dvn_cli.core.mobilenet import widths_at
from dvn_cli.core.network import build_network
from dvn_cli.core.plain import extract_plain
from dvn_cli.errors import BadConfig
from dvn_cli.export.prune import write_compact_level
from dvn_cli.modelfile.bundle import save_bundle
from dvn_cli.modelfile.checkpoint import Checkpoint, save_checkpoint
from dvn_cli.modelfile.registry import open_model
from dvn_cli.planning.plan import shared_memory_params
from dvn_cli.runtime.block_store import CONV_MODES
from dvn_cli.runtime.shared import SharedRuntime
from dvn_cli.training.train_config import load_train_config

from .conftest import all_task_levels, require_module, tiny_tasks

SIZE = 32
ORDERS = [[0, 2, 1, 3], [3, 1, 0, 2], [1, 3, 2, 0]]  # non-contiguous unit sets: the index_select path runs too
TINY = {
    "resnet18": {"widths": (8, 8, 16, 16)},
    "mobilenetv2": {"widths": (8, 4, 8, 8, 8, 8, 16, 16, 32)},
}


def tiny(arch: str, **overrides) -> BackboneConfig:
    values = {**backbone_defaults(arch), **TINY[arch], "units": 4, "in_channels": 3, "input_size": SIZE}
    return BackboneConfig(arch=arch, **{**values, **overrides})


def settled(arch: str, seed: int = 0):
    """A 3-task network with scrambled orders whose batch norms have non-trivial statistics; eval mode."""
    torch.manual_seed(seed)
    network = build_network(tiny(arch), tiny_tasks(3), "table", ORDERS)
    generator = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for module in network.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5, generator=generator)
                module.bias.uniform_(-0.2, 0.2, generator=generator)
        network.train()
        for task, level in all_task_levels(network):
            network(torch.randn(4, 3, SIZE, SIZE, generator=generator), task, level)
    return network.eval()


def batch(n: int = 3) -> torch.Tensor:
    return torch.randn(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(7))


ARCHS = pytest.mark.parametrize("arch", ["resnet18", "mobilenetv2"])


@ARCHS
def test_shapes_at_every_level(arch):
    network = build_network(tiny(arch), tiny_tasks(2))
    x = batch(2)
    for task, level in all_task_levels(network):
        features = network.features(x, task, level)
        assert features.shape == (2, network.config.widths[-1] * level // 4)
        assert network(x, task, level).shape == (2, network.tasks[task].num_classes)


@ARCHS
def test_gather_equals_masked_in_outputs_and_gradients(arch):
    network = build_network(tiny(arch), tiny_tasks(3), "table", ORDERS).double().train()  # float64: exact enough
    x = batch(4).double()
    for task, level in [(1, 1), (2, 2), (0, 3)]:
        outputs, grads = [], []
        for masked in (False, True):
            network.zero_grad()
            outputs.append(network(x, task, level, masked=masked))
            outputs[-1].square().sum().backward()
            grads.append({n: p.grad.clone() for n, p in network.named_parameters() if p.grad is not None})
        torch.testing.assert_close(outputs[0], outputs[1], atol=1e-9, rtol=1e-9)
        assert grads[0].keys() == grads[1].keys()
        for name, grad in grads[0].items():
            torch.testing.assert_close(grad, grads[1][name], atol=1e-8, rtol=1e-8, msg=name)


@ARCHS
def test_plain_twin_equals_the_virtual_network_and_costs_what_the_counter_says(arch):
    network = settled(arch)
    x = batch()
    for task, level in all_task_levels(network):
        plain = extract_plain(network, task, level)
        with torch.no_grad():
            torch.testing.assert_close(plain(x), network(x, task, level), atol=1e-5, rtol=0)
        cost = level_cost(network, task, level)
        assert sum(p.numel() for p in plain.parameters()) == cost.params_total
        assert shared_memory_params(network, {task: level}) == cost.params_total  # the block grid counts it right


def test_a_depthwise_unit_block_is_its_own_channels():
    network = build_network(tiny("mobilenetv2"), tiny_tasks(2))
    dw = next(m for m in network.modules() if isinstance(m, UnitDepthwiseConv2d))
    assert dw.weight.shape[1] == 1 and dw.grid.block_params == dw.out_channels // 4 * 9
    assert dw.grid.blocks([3, 1]) == [(1, None), (3, None)]
    quarter = dw.out_channels // 4
    torch.testing.assert_close(dw.grid.block(dw.weight, 1, None), dw.weight[quarter : 2 * quarter])


def test_mobilenet_widths_follow_torchvision():
    torchvision = require_module("torchvision")
    for multiplier in (0.25, 0.5, 1.0, 1.4):
        model = torchvision.models.mobilenet_v2(width_mult=multiplier)
        stage_ends = [1, 3, 6, 10, 13, 16, 17]
        expected = (
            model.features[0][0].out_channels,
            *(model.features[i].out_channels for i in stage_ends),
            model.features[18][0].out_channels,
        )
        assert widths_at(multiplier) == expected


@ARCHS
@pytest.mark.parametrize("conv", CONV_MODES)
def test_the_shared_runtime_runs_them_and_holds_the_union(arch, conv):
    network = settled(arch)
    x = batch()
    rt = SharedRuntime(Checkpoint(network=network).unit_source(), {"task0": 3, "task1": 2, "task2": 1}, conv=conv)
    with torch.no_grad():
        for task, level in rt.choices.items():
            torch.testing.assert_close(rt(x, task), network(x, task, level), atol=1e-5, rtol=1e-5)
    assert rt.held_params() == shared_memory_params(network, rt.choices)


@ARCHS
def test_prune_level_and_bundles_compute_the_virtual_network(arch, tmp_path):
    network = settled(arch)
    checkpoint = open_model(save_checkpoint(network, tmp_path / "model.safetensors"))
    written = write_compact_level(checkpoint, "task1", "2", tmp_path / "small.safetensors")
    compact = open_model(written.path)
    x = batch()
    with torch.no_grad():
        torch.testing.assert_close(compact.plain_of("task1", 2)(x), network(x, "task1", 2), atol=1e-5, rtol=0)
    bundle = open_model(save_bundle(network, {"task0": 2, "task2": 3}, tmp_path / "bundle.safetensors"))
    with torch.no_grad():
        torch.testing.assert_close(bundle.plain_of("task2", 3)(x), network(x, "task2", 3), atol=1e-5, rtol=0)


@ARCHS
def test_onnx_exports_equal_torch_per_pair_and_shared(arch, tmp_path):
    ort = require_module("onnxruntime")
    from dvn_cli.export.pairs import export_models
    from dvn_cli.export.shared import export_shared
    from dvn_cli.runtime.ort import SharedOrtRuntime

    network = settled(arch)
    checkpoint = open_model(save_checkpoint(network, tmp_path / "model.safetensors"))
    pairs = [("task0", 1), ("task1", 3)]
    per_pair = export_models(checkpoint, tmp_path / "per-pair", pairs)
    assert all(m["check_max_abs_diff"] < 1e-4 for m in per_pair["models"])
    shared = export_shared(checkpoint, tmp_path / "shared", pairs)
    assert all(m["check_max_abs_diff"] < 1e-4 for m in shared["models"])
    runtime, x = SharedOrtRuntime(tmp_path / "shared"), batch().numpy()
    for entry in per_pair["models"]:
        session = ort.InferenceSession(str(tmp_path / "per-pair" / entry["file"]), providers=["CPUExecutionProvider"])
        (expected,) = session.run(["logits"], {"input": x})
        np.testing.assert_allclose(runtime.run(entry["task"], entry["level"], x), expected, atol=1e-4, rtol=0)
        with torch.no_grad():
            reference = network(torch.from_numpy(x), entry["task"], entry["level"]).numpy()
        np.testing.assert_allclose(expected, reference, atol=1e-4, rtol=0)


# ------------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    ("arch", "size", "stride", "message"),
    [
        ("resnet18", 31, 2, "input_size 31 is too small for resnet18 with stem_stride 2: its strides divide the "
         "input by 32; use an input_size of at least 32 (or --stem-stride 1, which needs 16)"),
        ("resnet18", 15, 1, "input_size 15 is too small for resnet18 with stem_stride 1: its strides divide the "
         "input by 16; use an input_size of at least 16$"),
        ("mobilenetv2", 16, 2, "input_size 16 is too small for mobilenetv2 with stem_stride 2: its strides divide "
         "the input by 32"),
    ],
)  # fmt: skip
def test_an_input_too_small_for_the_strides_is_refused(arch, size, stride, message):
    with pytest.raises(BadConfig, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_input_shape(tiny(arch, input_size=size, stem_stride=stride))
    check_input_shape(tiny(arch, input_size=size + 1 if size % 2 else size * 2, stem_stride=stride))


def test_widths_come_from_the_family_and_the_multiplier(tmp_path):
    flags = {"tasks": "a,b", "out": str(tmp_path / "run")}
    base = {"arch": "mobilenetv2", "in_channels": 3, "input_size": 64, "units": 4}
    cfg = load_train_config(None, flags, {**base, "width": 0.5})
    assert cfg.backbone.widths == widths_at(0.5) and cfg.backbone.depth == 53 and cfg.backbone.stem_stride == 2
    cfg = load_train_config(None, flags, {**base, "arch": "resnet18", "width": 0.25})
    assert cfg.backbone.widths == (16, 32, 64, 128) and cfg.backbone.depth == 18
    with pytest.raises(BadConfig, match="--width 0.1 gives widths 6,13,26,51, which do not split into k=4 units"):
        load_train_config(None, flags, {**base, "arch": "resnet18", "width": 0.1})
    with pytest.raises(BadConfig, match=r"not both"):
        load_train_config(None, flags, {**base, "width": 0.5, "widths": [8] * 9})
    with pytest.raises(BadConfig, match="width multiplier must be a positive number, got -1.0"):
        load_train_config(None, flags, {**base, "width": -1.0})
    with pytest.raises(BadConfig, match="resnet18 has depth 18, not 14; leave --depth out"):
        build_network(BackboneConfig(arch="resnet18", widths=(8, 8, 16, 16), in_channels=3), tiny_tasks(1))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--arch", "resnet18", "--input-size", "24"], "error: input_size 24 is too small for resnet18"),
        (["--arch", "mobilenetv2", "--width", "0.3", "-k", "3"], "error: --width 0.3 gives widths 16,8,8,16,24,32,"),
    ],
)
def test_the_cli_refuses_them_in_one_line(args, message, tmp_path):
    from .conftest import make_image_folder

    folder = make_image_folder(tmp_path / "f", per_class=4)
    result = CliRunner().invoke(
        app, ["train", "--tasks", f"f={folder}", "--out", str(tmp_path / "run"), "--epochs", "1", *args]
    )
    assert result.exit_code == 1, result.output
    assert result.output.strip().startswith(message) and len(result.output.strip().splitlines()) == 1


@pytest.mark.slow
def test_a_mobilenet_trains_and_exports_from_the_cli(tmp_path):
    from .conftest import make_image_folder

    folder = make_image_folder(tmp_path / "f", per_class=8, size=32)
    out, runner = tmp_path / "run", CliRunner()
    result = runner.invoke(
        app,
        [
            "train", "--tasks", f"f={folder}", "--arch", "mobilenetv2", "--width", "0.25", "--input-size", "32",
            "--epochs", "1", "--batch-size", "8", "--warmup-steps", "1", "--out", str(out),
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    checkpoint = out / "model.safetensors"
    assert json.loads((out / "config.json").read_text())["backbone"]["widths"] == list(widths_at(0.25))
    result = runner.invoke(app, ["export", "-c", str(checkpoint), "--budget", "1", "-o", str(tmp_path / "x")])
    assert result.exit_code == 0, result.output
