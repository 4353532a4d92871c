"""--init from torchvision state dicts (channels mapped into units) and dvn convert."""

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from typer.testing import CliRunner

from dvn_cli.cli.app import app
from dvn_cli.config import BackboneConfig, TaskSpec
from dvn_cli.core.backbones import backbone_defaults
from dvn_cli.core.network import build_network
from dvn_cli.core.pretrained import init_from_torchvision, unit_permutation
from dvn_cli.core.units import UnitLayout
from dvn_cli.errors import BadConfig, WrongFileFormat
from dvn_cli.modelfile.checkpoint import load_checkpoint
from dvn_cli.modelfile.torchvision_file import convert_torchvision, init_from_file, read_state_file

from .conftest import make_image_folder, require_module

torchvision = require_module("torchvision")
runner = CliRunner()
SIZE = 32
TASKS = [
    TaskSpec("ten", tuple("0123456789"), (0.5,) * 3, (0.5,) * 3),
    TaskSpec("three", ("a", "b", "c"), (0.5,) * 3, (0.5,) * 3),
]
MODELS = {"resnet18": torchvision.models.resnet18, "mobilenetv2": torchvision.models.mobilenet_v2}


def random_torchvision(arch: str, seed: int = 0, **kwargs) -> nn.Module:
    """A torchvision model with random weights and batch norms whose statistics and scales are not trivial."""
    torch.manual_seed(seed)
    model = MODELS[arch](num_classes=10, **kwargs)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.2, 1.5)
                m.bias.normal_(0, 0.2)
                m.running_mean.normal_(0, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    return model.eval()


def network_for(arch: str, k: int = 4, width: float | None = None, in_channels: int = 3):
    values = {**backbone_defaults(arch, width), "units": k, "in_channels": in_channels, "input_size": SIZE}
    return build_network(BackboneConfig(arch=arch, **values), TASKS).eval()


@pytest.mark.parametrize("arch", ["resnet18", "mobilenetv2"])
@pytest.mark.parametrize("mapping", ["identity", "bn-scale"])
def test_init_reproduces_torchvision_at_the_top_level(arch, mapping, tmp_path):
    model = random_torchvision(arch)
    path = tmp_path / "init.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    network = network_for(arch)
    report = init_from_file(network, path, mapping)
    assert report.heads == ("ten",) and report.mapping == mapping  # "three" keeps its random head
    x = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(x)
        torch.testing.assert_close(network(x, "ten", 4), expected, atol=1e-4, rtol=1e-4)
        features = network.features(x, 1, 4)  # the other task's top level has the same features
        torch.testing.assert_close(network.heads[0](features, 1, 4), expected, atol=1e-4, rtol=1e-4)


def test_a_torchvision_width_multiplier_and_a_grey_input():
    model = random_torchvision("mobilenetv2", width_mult=0.5)
    network = network_for("mobilenetv2", width=0.5, in_channels=1)
    init_from_torchvision(network, model.state_dict())
    grey = torch.rand(2, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(network(grey, "ten", 4), model(grey.expand(-1, 3, -1, -1)), atol=1e-4, rtol=1e-4)


def test_bn_scale_puts_the_strongest_channels_in_the_units_used_first():
    model = random_torchvision("resnet18")
    network = network_for("resnet18")  # two tasks, k = 4: orders 0 1 2 3 and 3 2 1 0
    init_from_torchvision(network, model.state_dict(), "bn-scale")
    gamma = model.layer2[0].bn1.weight.detach().abs()
    ours = network.features.stages[1][0].bn1.norm(0, 4).weight.detach().abs()
    assert sorted(ours.tolist()) == sorted(gamma.tolist())
    quarter = ours.numel() // 4
    first, middle = torch.cat([ours[:quarter], ours[-quarter:]]), ours[quarter:-quarter]
    assert first.min() >= middle.max()  # units 0 and 3 (each task's level 1) hold the strongest half
    level1 = network.features.stages[1][0].bn1.norm(0, 1).weight.detach()
    torch.testing.assert_close(level1, network.features.stages[1][0].bn1.norm(0, 4).weight.detach()[:quarter])


def test_unit_permutation_deals_ranked_channels_by_priority():
    scores = torch.tensor([0.1, 0.9, 0.5, 0.7, 0.3, 0.2, 0.8, 0.4])
    one_task = unit_permutation(scores, UnitLayout([[2, 0, 3, 1]], 4))
    # ranked: 1 6 3 2 7 4 5 0; unit 2 takes the two best, then unit 0, unit 3, unit 1
    assert one_task.tolist() == [3, 2, 5, 0, 1, 6, 7, 4]
    two_tasks = unit_permutation(scores, UnitLayout([[0, 1, 2, 3], [3, 2, 1, 0]], 4))
    assert two_tasks.tolist() == [1, 3, 7, 5, 4, 0, 6, 2]  # units 0 and 3 take turns, then units 1 and 2
    assert sorted(two_tasks.tolist()) == list(range(8))


def test_convert_round_trip_and_cli(tmp_path):
    model = random_torchvision("resnet18")
    pth, out = tmp_path / "resnet18.pth", tmp_path / "resnet18.safetensors"
    torch.save(model.state_dict(), pth)
    result = runner.invoke(app, ["convert", str(pth), "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "122 tensors" in result.output
    loaded = read_state_file(out)
    assert loaded.keys() == model.state_dict().keys()
    for key, value in model.state_dict().items():
        assert torch.equal(loaded[key], value), key
    result = runner.invoke(app, ["convert", str(pth), "-o", str(out)])
    assert result.exit_code == 1 and "already exists; pass --force" in result.output
    torch.save({"state_dict": model.state_dict()}, pth)  # a checkpoint that wraps the state dict
    assert convert_torchvision(pth, out, force=True)["tensors"] == 122


# ------------------------------------------------------------------------------------------------ bad input


def test_a_pickled_model_is_refused_by_convert(tmp_path):
    pth = tmp_path / "model.pth"
    torch.save(random_torchvision("resnet18"), pth)  # a whole pickled module: weights_only refuses it
    with pytest.raises(WrongFileFormat, match="refused without running anything: it is not a plain state dict"):
        convert_torchvision(pth, tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()


def test_init_refuses_a_pth_another_architecture_and_wrong_shapes(tmp_path):
    network = network_for("resnet18")
    pth = tmp_path / "r.pth"
    torch.save(random_torchvision("resnet18").state_dict(), pth)
    with pytest.raises(WrongFileFormat, match=r"r.pth is a pickled PyTorch file; convert it once with 'dvn convert"):
        init_from_file(network, pth)
    mobile = tmp_path / "m.safetensors"
    save_file({k: v.contiguous() for k, v in random_torchvision("mobilenetv2").state_dict().items()}, mobile)
    with pytest.raises(WrongFileFormat, match=r"m.safetensors is not a torchvision resnet18 state dict: it lacks"):
        init_from_file(network, mobile)
    with pytest.raises(WrongFileFormat, match=r"has shape \(16, 3, 3, 3\), this mobilenetv2 \(widths 32,16,"):
        init_from_torchvision(
            network_for("mobilenetv2"), random_torchvision("mobilenetv2", width_mult=0.5).state_dict(), label="h"
        )
    with pytest.raises(BadConfig, match="--init needs a backbone with a torchvision counterpart"):
        init_from_torchvision(build_network(BackboneConfig(in_channels=3), TASKS), {})
    text = tmp_path / "notes.safetensors"
    text.write_text("not a tensor file")
    with pytest.raises(WrongFileFormat, match="is not a safetensors state dict"):
        init_from_file(network, text)
    with pytest.raises(BadConfig, match="--init file .* not found"):
        init_from_file(network, tmp_path / "missing.safetensors")


@pytest.fixture(scope="module")
def small_mobilenet(tmp_path_factory):
    base = tmp_path_factory.mktemp("init")
    model = random_torchvision("mobilenetv2", width_mult=0.25)
    path = base / "mobilenet.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    return base, path, make_image_folder(base / "colours", per_class=8, size=SIZE)


def _train(base, folder, *args):
    out = base / "run"
    argv = [
        "train", "--tasks", f"colours={folder}", "--arch", "mobilenetv2", "--width", "0.25", "--epochs", "0.5",
        "--batch-size", "8", "--input-size", str(SIZE), "--out", str(out), "--force", *args,
    ]  # fmt: skip
    return runner.invoke(app, argv), out


def test_train_refuses_a_pth_given_to_init_in_one_line(small_mobilenet, tmp_path):
    base, _, folder = small_mobilenet
    pth = tmp_path / "m.pth"
    torch.save({"w": torch.zeros(1)}, pth)
    result, out = _train(base, folder, "--init", str(pth))
    assert result.exit_code == 1
    assert result.output.strip().startswith("error: ") and "is a pickled PyTorch file" in result.output
    assert len(result.output.strip().splitlines()) == 1


def _convolutions(network) -> dict[str, torch.Tensor]:
    return {k: v for k, v in network.state_dict().items() if k.startswith("features.") and k.endswith("conv.weight")}


def _distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """Relative L2 distance of two sets of convolution weights."""
    return float(sum((a[k] - b[k]).norm() ** 2 for k in b) ** 0.5 / sum(b[k].norm() ** 2 for k in b) ** 0.5)


def test_train_starts_from_the_init_file(small_mobilenet, tmp_path):
    base, path, folder = small_mobilenet
    result, out = _train(base, folder, "--init", str(path))
    assert result.exit_code == 0, result.output
    assert json.loads((out / "config.json").read_text())["init"] == str(path)
    # the trained weights lie near the init file's (mapped into units as --init maps them), far from a run without
    reference = load_checkpoint(out / "model.safetensors").network
    init_from_file(reference, path)
    scratch_result, scratch = _train(tmp_path, folder)
    assert scratch_result.exit_code == 0, scratch_result.output
    near = _distance(_convolutions(load_checkpoint(out / "model.safetensors").network), _convolutions(reference))
    far = _distance(_convolutions(load_checkpoint(scratch / "model.safetensors").network), _convolutions(reference))
    assert near < 0.2 * far, (near, far)  # measured 0.031 and 1.42


def test_a_fifo_given_to_init_is_refused_not_waited_on(tmp_path):
    """Reading a FIFO would block for ever: it is refused in one line (in a subprocess, with a time limit)."""
    fifo = tmp_path / "weights.safetensors"
    os.mkfifo(fifo)
    script = (
        "from dvn_cli.modelfile.torchvision_file import read_state_file\n"
        "from dvn_cli.errors import DvnError\n"
        f"try:\n    read_state_file({str(fifo)!r})\nexcept DvnError as exc:\n    print(exc)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0 and result.stdout.strip() == f"{fifo} is not a regular file", result.stderr


def _safetensors_with_header_low_byte(tensors: dict, low: int) -> bytes:
    """A safetensors file of ``tensors`` whose header length's first (low) byte is ``low``, padded by metadata."""
    from safetensors.torch import save

    # Each pad character lengthens the header by one byte before its 8-byte alignment: start just short of the
    # pad that gives ``low`` instead of saving the tensors up to 256 times.
    first = int.from_bytes(save(tensors, metadata={"pad": ""})[:8], "little")
    for pad in range(max((low - first) % 256 - 8, 0), 2048):
        data = save(tensors, metadata={"pad": "x" * pad})
        if data[0] == low:
            return data
    raise AssertionError("no padding gives that header length")


def test_formats_are_told_apart_by_parsing_not_by_a_byte(tmp_path):
    """Issue 18 row 8: a safetensors file whose header length starts with 0x80 (a pickle's first byte) is read,
    and the NaN-weights message that misfire hid is shown again; real pickles are still recognised."""
    from dvn_cli.fileformats import file_format

    state = {k: v.contiguous() for k, v in random_torchvision("resnet18").state_dict().items()}
    good = tmp_path / "r18abc.safetensors"
    good.write_bytes(_safetensors_with_header_low_byte(state, 0x80))
    assert file_format(good) == "safetensors" and read_state_file(good).keys() == state.keys()
    state["layer1.0.bn1.weight"][3] = float("nan")
    nan = tmp_path / "nan.safetensors"
    nan.write_bytes(_safetensors_with_header_low_byte(state, 0x80))
    with pytest.raises(WrongFileFormat, match=r"nan.safetensors holds non-finite values .* in layer1.0.bn1.weight"):
        init_from_file(network_for("resnet18"), nan)
    legacy, zipped, noise = tmp_path / "legacy.pth", tmp_path / "zip.pth", tmp_path / "noise.bin"
    torch.save({"w": torch.zeros(2)}, legacy, _use_new_zipfile_serialization=False)
    torch.save({"w": torch.zeros(2)}, zipped)
    noise.write_bytes(b"\x80\x02" + bytes(range(256)) * 4)  # a pickle's first two bytes, then no pickle
    assert [file_format(p) for p in (legacy, zipped, noise)] == ["pickle", "torch-zip", None]
    with pytest.raises(WrongFileFormat, match="legacy.pth is a pickled PyTorch file"):
        read_state_file(legacy)


def _run_dvn(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    return subprocess.run(
        [sys.executable, "-m", "dvn_cli", *args], capture_output=True, text=True, timeout=timeout, env=env
    )


def test_convert_refuses_a_fifo_as_init_does(tmp_path):
    """Issue 18 row 13: torch.load of a FIFO blocks for ever; convert refuses it first (subprocess, time limit)."""
    fifo = tmp_path / "ff.pth"
    os.mkfifo(fifo)
    result = _run_dvn("convert", str(fifo), "-o", str(tmp_path / "x.safetensors"))
    assert result.returncode == 1 and result.stderr == f"error: {fifo} is not a regular file\n", result.stderr
    assert not (tmp_path / "x.safetensors").exists()


class _RunsCode:
    """Unpickling this would call os.mkdir(path): the file names code, not tensors."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def test_a_pickle_that_would_run_code_is_a_plain_refusal(tmp_path):
    """Issue 18 row 15: the refusal never repeats torch's advice to load with weights_only=False, and no torch
    warning (here "Detected pickle protocol 4") reaches the user."""
    marker, evil = tmp_path / "ran", tmp_path / "evil.pth"
    torch.save({"w": torch.zeros(2), "x": _RunsCode(marker)}, evil, pickle_protocol=4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(WrongFileFormat) as refused:
            convert_torchvision(evil, tmp_path / "out.safetensors")
    assert [str(w.message) for w in caught] == []
    message = str(refused.value)
    assert message.startswith(f"{evil} was refused without running anything: it is not a plain state dict of tensors (")
    assert "weights_only" not in message and "\n" not in message
    torch.save({"w": torch.zeros(2), "x": _RunsCode(marker)}, evil)  # torch's own protocol: it names the call
    result = runner.invoke(app, ["convert", str(evil), "-o", str(tmp_path / "out.safetensors")])
    assert result.exit_code == 1 and result.stderr.count("\n") == 1, result.stderr
    assert "refused without running anything: " in result.stderr and "posix.mkdir" in result.stderr
    assert "weights_only" not in result.stderr
    assert not marker.exists() and not (tmp_path / "out.safetensors").exists()


class _Evaluates:
    """Unpickling this would call eval: a builtin torch's loader does not block but asks to allow-list."""

    def __reduce__(self):
        return (eval, ("1",))


def test_a_refusal_never_passes_on_torchs_advice_to_allow_list_what_the_file_names(tmp_path):
    """For a global it does not block outright, torch says to allow-list it with add_safe_globals (which would run
    it): the refusal says only that the file is refused and what it named."""
    evil = tmp_path / "evil.pth"
    torch.save({"w": torch.zeros(2), "x": _Evaluates()}, evil)
    result = runner.invoke(app, ["convert", str(evil), "-o", str(tmp_path / "out.safetensors")])
    assert result.exit_code == 1 and result.stderr == (
        f"error: {evil} was refused without running anything: it is not a plain state dict of tensors (Unsupported "
        "global: GLOBAL eval was not an allowed global by default); save the model's state_dict() and convert that\n"
    ), result.stderr
