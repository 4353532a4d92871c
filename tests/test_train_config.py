"""The configuration of ``dvn train``: config file and flags, the values they may hold, and a bare ``--resume``.

Every refusal is one ``error:`` line on stderr, exit code 1, no traceback, and leaves the run folder as it was.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from dvn_cli.config import PRECISIONS, BackboneConfig, TrainConfig
from dvn_cli.core.backbones import check_input_shape
from dvn_cli.core.network import build_network
from dvn_cli.errors import BadConfig
from dvn_cli.modelfile.checkpoint import load_checkpoint
from dvn_cli.modelfile.container import read_metadata
from dvn_cli.training.schedule import AUTOCAST_DTYPES
from dvn_cli.training.train_config import load_train_config
from dvn_cli.user_config import check_types

from .conftest import make_image_folder, tiny_tasks
from .test_faults import _tiny_train_args, invoke, one_error_line, sha256


@pytest.fixture(scope="module")
def tasks(tmp_path_factory) -> str:
    """Two tiny folder tasks, as a ``--tasks`` value."""
    base = tmp_path_factory.mktemp("tasks")
    colours = make_image_folder(base / "colours", per_class=8)
    bands = make_image_folder(base / "bands", ("top", "middle"), per_class=8)
    return f"colours={colours},bands={bands}"


def _hashes(folder: Path) -> dict[str, str]:
    return {f.name: sha256(f) for f in folder.iterdir()} if folder.exists() else {}


# ---------------------------------------------------------------------------------------------- precisions


def test_the_precision_names_have_one_home():
    assert list(AUTOCAST_DTYPES) == list(PRECISIONS)
    assert AUTOCAST_DTYPES == {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


# --------------------------------------------------------------------------------------- non-finite values


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--lr", "nan"], "error: lr must be a finite number, got nan"),
        (["--lr", "inf"], "error: lr must be a finite number, got inf"),
        (["--momentum", "nan"], "error: momentum must be a finite number, got nan"),
        (["--weight-decay", "-inf"], "error: weight_decay must be a finite number, got -inf"),
        (["--epochs", "nan"], "error: epochs must be a finite number, got nan"),
        (["--epochs", "inf"], "error: epochs must be a finite number, got inf"),
        (["--distill", "nan"], "error: distill must be a finite number, got nan"),
        (["--label-smoothing", "inf"], "error: label_smoothing must be a finite number, got inf"),
        (["--level-weights", "1,nan,1,1"], "error: level_weights must be a finite number, got 1.0,nan,1.0,1.0"),
        (["--val-fraction", "nan"], "error: val_fraction must be a finite number, got nan"),
    ],
)
def test_non_finite_settings_are_refused_naming_the_setting(tasks, tmp_path, flags, message):
    result = invoke(*_tiny_train_args(tasks, tmp_path / "run", tmp_path / "data", *flags))
    one_error_line(result, message)
    assert not (tmp_path / "run").exists()


_SEED_RANGE = "[0, 9223372036854775807]"


@pytest.mark.parametrize(
    "flags,message",
    [  # once: RuntimeError (label smoothing), ValueError (seed), IndexError (widths 0) tracebacks, or silent runs
        (["--label-smoothing", "1.5"], "error: label_smoothing must be in [0, 1), got 1.5"),
        (["--label-smoothing", "-0.1"], "error: label_smoothing must be in [0, 1), got -0.1"),
        (["--seed", "-1"], f"error: seed must be in {_SEED_RANGE}, got -1"),
        (["--seed", str(2**63)], f"error: seed must be in {_SEED_RANGE}, got {2**63}"),
        (["--weight-decay", "-1"], "error: weight_decay must be at least 0, got -1.0"),
        (["--distill", "-1"], "error: distill must be at least 0, got -1.0"),
        (["--warmup-steps", "-5"], "error: warmup_steps must be at least 0, got -5"),
        (["--momentum", "-1"], "error: momentum must be in [0, 1), got -1.0"),
        (["--momentum", "1"], "error: momentum must be in [0, 1), got 1.0"),
        (["--level-weights", "0,0,0,0"], "error: level_weights are all 0, so no level would learn; give at least"),
        (["--level-weights", "1,-1,1,1"], "error: level_weights must each be at least 0, got 1.0,-1.0,1.0,1.0"),
        (["--val-fraction", "0"], "error: val_fraction must be in (0, 1), got 0.0"),
        (["--val-fraction", "1"], "error: val_fraction must be in (0, 1), got 1.0"),
        (["--epochs", "0"], "error: epochs must be more than 0, got 0.0"),
        (["--batch-size", "0"], "error: batch_size must be at least 1, got 0"),
        (["--lr", "0"], "error: lr must be more than 0, got 0.0"),
        (["--workers", "-1"], "error: workers must be at least 0, got -1"),
        (["--limit", "0"], "error: limit must be at least 1, got 0"),
        (["--widths", "0,0,0"], "error: widths must each be in [1, 1048576], got 0,0,0"),
        (["--widths", "-4,8,16"], "error: widths must each be in [1, 1048576], got -4,8,16"),
        (["--widths", f"{2**21},{2**21},{2**21}"], "error: widths must each be in [1, 1048576], got 2097152,"),
        (["--units", "0"], "error: units must be at least 1, got 0"),
        (["--input-size", "0"], "error: input_size must be at least 1, got 0"),
        (["--stem-stride", "0"], "error: stem_stride must be at least 1, got 0"),
        (["--input-channels", "0"], "error: in_channels must be at least 1, got 0"),
        (["--order-rule", "affinity", "--affinity-steps", "0"], "error: affinity_steps must be at least 1, got 0"),
    ],
)
def test_settings_out_of_range_are_refused_before_any_work(tasks, tmp_path, monkeypatch, flags, message):
    monkeypatch.setattr("dvn_cli.training.loop.load_tasks", lambda cfg: pytest.fail("the data was loaded"))
    args = _tiny_train_args(tasks, tmp_path / "run", tmp_path / "data", "--input-channels", 3, *flags)
    one_error_line(invoke(*args), message)
    assert not (tmp_path / "run").exists()


def test_a_width_multiplier_beyond_the_widest_stage_is_refused_naming_it(tmp_path, monkeypatch):
    """``--width 1e9`` once built the network (for the memory estimate): RuntimeError: Storage size calculation
    overflowed."""
    monkeypatch.setattr("dvn_cli.training.loop.load_tasks", lambda cfg: pytest.fail("the data was loaded"))
    folder = make_image_folder(tmp_path / "f", per_class=2)
    args = ["train", "--tasks", f"a={folder}", "--input-size", 12, "--input-channels", 3, "--out", tmp_path / "run"]
    one_error_line(
        invoke(*args, "--width", "1e9"),
        "error: --width 1000000000.0 gives widths 32000000000,64000000000,128000000000, more channels than a stage "
        "may have (1048576); choose a smaller --width",
    )
    assert not (tmp_path / "run").exists()


def test_a_network_no_tensor_can_hold_is_refused_by_the_memory_estimate():
    """Shapes beyond 64-bit sizes (a batch of 2^60 images) are a BadConfig from the meta build, not a RuntimeError."""
    from dvn_cli.training.memory_estimate import estimate_memory

    from .conftest import tiny_config, tiny_tasks

    with pytest.raises(BadConfig, match="a training step of 1152921504606846976 images per task cannot run"):
        estimate_memory(tiny_config(), tiny_tasks(1), 2**60)


def test_more_workers_than_cores_is_warned_not_refused(tasks, tmp_path, monkeypatch, recwarn):
    """``--workers 64`` on 2 cores: dvn warns once, in one line (PyTorch's four multi-line warnings per loader are
    silenced); the run goes on, since a config may come from a larger machine and decoding also waits on storage."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})

    def args(out: str, workers: int) -> list:
        extra = ("--epochs", 1, "--data-mode", "stream", "--workers", workers)
        return _tiny_train_args(tasks, tmp_path / out, tmp_path / "data", *extra)

    result = invoke(*args("run", 3))
    assert result.exit_code == 0, result.output
    assert result.stderr.splitlines()[0] == (
        "warning: --workers 3 is more than the 2 CPU cores here: each streamed task starts 3 decoding processes, "
        "which only take turns"
    )
    assert not [w for w in recwarn if "DataLoader will create" in str(w.message)]
    quiet = invoke(*args("run2", 2))
    assert quiet.exit_code == 0 and "warning" not in quiet.stderr, quiet.output


def test_a_task_left_without_validation_images_is_refused(tmp_path):
    """``--val-fraction 0`` once trained with NaN accuracies, which made ``dvn plan`` pick level 1 under 100%; a
    folder whose own val/ holds no image leaves no validation image either."""
    folder = tmp_path / "pets"
    make_image_folder(folder / "train", ("cat", "dog"), per_class=4)
    (folder / "val" / "cat").mkdir(parents=True)
    args = ["train", "--tasks", f"pets={folder}", "--input-size", 12, "--input-channels", 3, "--out", tmp_path / "run"]
    one_error_line(
        invoke(*args),
        "error: task 'pets' has no validation images (6 training images); give it more images or a larger "
        "--val-fraction (or images in its folder's val/)",
    )
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "toml,message",
    [
        ("seed = -1", f"error: seed must be in {_SEED_RANGE}, got -1"),
        ("label_smoothing = 1.0", "error: label_smoothing must be in [0, 1), got 1.0"),
        ("[backbone]\nunits = 0", "error: units must be at least 1, got 0"),
    ],
)
def test_values_out_of_range_in_a_config_file_are_refused(tasks, tmp_path, toml, message):
    _config_file_is_refused(tasks, tmp_path, toml, message)


def test_non_finite_values_in_a_config_file_are_refused(tasks, tmp_path):
    _config_file_is_refused(tasks, tmp_path, "momentum = -inf", "error: momentum must be a finite number, got -inf")


def _config_file_is_refused(tasks, tmp_path, toml, message):
    """``dvn train --config`` of a file holding ``toml`` ends on the one line ``message`` and writes no run."""
    config = tmp_path / "train.toml"
    config.write_text(toml + "\n")
    result = invoke(*_tiny_train_args(tasks, tmp_path / "run", tmp_path / "data"), "--config", config)
    one_error_line(result, message)
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------------- config files


def test_a_config_file_that_is_missing_a_folder_or_a_fifo_is_one_line(tasks, tmp_path):
    args = _tiny_train_args(tasks, tmp_path / "run", tmp_path / "data")
    one_error_line(
        invoke(*args, "--config", tmp_path / "nope.toml"), f"error: config file {tmp_path / 'nope.toml'} not found"
    )
    one_error_line(invoke(*args, "--config", tmp_path), f"error: config file {tmp_path} is not a regular file")
    fifo = tmp_path / "fifo.toml"
    os.mkfifo(fifo)  # reading it would block forever: it must be refused before it is opened
    one_error_line(invoke(*args, "--config", fifo), f"error: config file {fifo} is not a regular file")
    (tmp_path / "bad.toml").write_text("epochs = = 3\n")
    one_error_line(invoke(*args, "--config", tmp_path / "bad.toml"), "error: config file ")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "toml,message",
    [
        ('epochs = "lots"', "error: epochs must be a number, got 'lots'"),
        ("batch_size = 1.5", "error: batch_size must be an integer, got 1.5"),
        ("seed = true", "error: seed must be an integer, got true"),
        ('augment = "yes"', "error: augment must be true or false, got 'yes'"),
        ("out = 3", "error: out must be a string, got 3"),
        ("tasks = [1, 2]", "error: tasks must be a list of strings, got [1, 2]"),
        ('level_weights = [1, "a", 1, 1]', "error: level_weights must be a list of numbers, got [1, 'a', 1, 1]"),
        ("order_table = [[0, 1], 2]", "error: order_table must be a list of lists of integers, got [[0, 1], 2]"),
        ("limit = [3]", "error: limit must be an integer, got [3]"),
        ("backbone = 3", "error: backbone must be a table, got 3"),
        ('[backbone]\nwidths = "abc"', "error: backbone.widths must be a list of integers, got 'abc'"),
        ("[backbone]\nunits = 2.5", "error: backbone.units must be an integer, got 2.5"),
        ('[backbone]\narch = ["resnet"]', "error: backbone.arch must be a string, got ['resnet']"),
        ("[training]\nepochs = 1", "error: unknown TrainConfig field(s): training"),
        ("[backbone]\nlayers = 3", "error: unknown BackboneConfig field(s): layers"),
    ],
)
def test_a_config_value_of_the_wrong_type_names_its_key(tasks, tmp_path, toml, message):
    _config_file_is_refused(tasks, tmp_path, toml, message)


def test_every_stored_config_passes_the_type_check():
    """What a run stores (JSON: lists for tuples, ints for whole floats) reads back as the right types."""
    cfg = TrainConfig(level_weights=(1, 1, 2, 2), order_rule="table", order_table=((0, 1, 2, 3),) * 2, limit=5)
    stored = json.loads(json.dumps(cfg.to_dict()))
    check_types(TrainConfig, stored)
    check_types(BackboneConfig, stored["backbone"], "backbone.")
    with pytest.raises(BadConfig, match="depth must be an integer, got '14'"):
        check_types(BackboneConfig, {"depth": "14"})


def test_file_values_yield_to_flags_and_the_data_root_comes_from_flag_env_file(tmp_path, monkeypatch):
    config = tmp_path / "train.toml"
    config.write_text(
        'tasks = "mnist, fashion-mnist"\nepochs = 2.5\nlr = 0.2\ndata_root = "from-file"\n'
        "[backbone]\ndepth = 8\nwidths = [8, 16, 32]\nin_channels = 1\ninput_size = 28\n"
    )
    backbone_flags = {"units": 2, "stem_stride": None}
    monkeypatch.delenv("DVN_DATA_ROOT", raising=False)
    cfg = load_train_config(config, {"lr": 0.05, "epochs": None, "data_root": None}, backbone_flags)
    assert cfg.tasks == ("mnist", "fashion-mnist") and cfg.epochs == 2.5 and cfg.lr == 0.05
    assert cfg.backbone == BackboneConfig(depth=8, widths=(8, 16, 32), units=2, in_channels=1, input_size=28)
    assert cfg.data_root == "from-file"
    monkeypatch.setenv("DVN_DATA_ROOT", "from-env")
    assert load_train_config(config, {"data_root": None}, {}).data_root == "from-env"
    assert load_train_config(config, {"data_root": "from-flag"}, {}).data_root == "from-flag"
    assert load_train_config(None, {"tasks": "mnist", "data_root": None}, {}).backbone.input_size == 28  # the data's


# ------------------------------------------------------------------------------------ input size and stride


@pytest.mark.parametrize(
    "flags,message",
    [
        (
            ["--input-size", 1],
            "error: input_size 1 is too small for 3 stages: the feature map would shrink below 1x1 before the "
            "last stage; the smallest input_size that works is 4 (with stem_stride 1)",
        ),
        (["--stem-stride", 100], "error: stem_stride 100 is larger than input_size 16; the largest stem_stride that"),
        (
            ["--stem-stride", 6],
            "error: input_size 16 is too small for stem_stride 6: the feature map would shrink below 1x1 before the "
            "last stage; the smallest input_size that works is 19 (or use a stem_stride of at most 5)",
        ),
    ],
)
def test_an_input_the_backbone_cannot_use_is_refused(tasks, tmp_path, flags, message):
    result = invoke(*_tiny_train_args(tasks, tmp_path / "run", tmp_path / "data", *flags))
    one_error_line(result, message)
    assert not (tmp_path / "run").exists()


def test_the_smallest_inputs_that_pass_the_check_run():
    for size, stride in [(4, 1), (7, 2), (10, 3), (28, 9)]:
        config = BackboneConfig(
            depth=8, widths=(8, 16, 32), units=4, in_channels=3, input_size=size, stem_stride=stride
        )
        check_input_shape(config)
        network = build_network(config, tiny_tasks(1)).eval()
        assert network(torch.randn(2, 3, size, size), 0, 4).shape == (2, 10)
    for size, stride in [(3, 1), (6, 2), (28, 10), (28, 29)]:
        with pytest.raises(BadConfig):
            check_input_shape(BackboneConfig(depth=8, widths=(8, 16, 32), input_size=size, stem_stride=stride))
    check_input_shape(BackboneConfig(widths=(8,), input_size=1))  # one stage never halves


# --------------------------------------------------------------------------------------------- bare resume


def _stop_at(monkeypatch, step: int) -> None:
    """Ctrl-C after ``step`` of the next ``dvn train``."""
    from dvn_cli.cli.progress import TrainProgress

    on_step = TrainProgress.on_step

    def stop(self, info):
        on_step(self, info)
        if info.step == step:
            raise KeyboardInterrupt

    monkeypatch.setattr(TrainProgress, "on_step", stop)


def test_bare_resume_continues_the_stored_run_and_matches_an_uninterrupted_one(tasks, tmp_path, monkeypatch):
    monkeypatch.delenv("DVN_DATA_ROOT", raising=False)
    args = _tiny_train_args(tasks, tmp_path / "straight", tmp_path / "data", "--epochs", 3, "--seed", 5)
    straight = invoke(*args)
    assert straight.exit_code == 0, straight.output

    monkeypatch.chdir(tmp_path)  # no --out: the default run folder runs/dvn
    out = args.index("--out")
    with monkeypatch.context() as patch:
        _stop_at(patch, 4)  # mid-epoch 2
        stopped = invoke(*args[:out], *args[out + 2 :])
    assert stopped.exit_code == 130, stopped.output
    run = Path("runs/dvn")
    assert read_metadata(run / "train_state.safetensors")["step"] == 4

    resumed = invoke("train", "--resume")
    assert resumed.exit_code == 0, resumed.output
    a = load_checkpoint(tmp_path / "straight" / "model.safetensors")
    b = load_checkpoint(run / "model.safetensors")
    assert b.training["finished"] and b.training["steps"] == a.training["steps"]
    assert b.training["config"] == {**a.training["config"], "out": "runs/dvn"}
    for name, tensor in a.network.state_dict().items():
        assert torch.equal(tensor, b.network.state_dict()[name]), name
    assert not (run / ".lock").exists()


def test_resume_refuses_flags_that_differ_from_the_stored_run(tasks, tmp_path):
    run = tmp_path / "run"
    args = _tiny_train_args(tasks, run, tmp_path / "data", "--epochs", 1)
    assert invoke(*args).exit_code == 0
    before = _hashes(run)

    one_error_line(
        invoke("train", "--resume", "--out", run, "--lr", 0.5),
        f"error: --resume: lr differs from the run in {run} (0.05 stored, 0.5 given); drop the flag or train a new run",
    )
    one_error_line(
        invoke("train", "--resume", "--out", run, "--seed", 9, "--units", 2, "--widths", "8,16,64"),
        f"error: --resume: seed, widths, units differ from the run in {run} (seed 0 stored, 9 given; widths 8,16,32 "
        "stored, 8,16,64 given; units 4 stored, 2 given); drop those flags or train a new run",
    )
    config = tmp_path / "train.toml"
    config.write_text("epochs = 2\n")
    one_error_line(
        invoke("train", "--resume", "--out", run, "--config", config),
        f"error: --resume: epochs differs from the run in {run} (1.0 stored, 2 given)",
    )
    one_error_line(invoke("train", "--resume", "--out", tmp_path / "none"), "error: nothing to resume in ")
    assert _hashes(run) == before

    # the same values, and the settings that may change, are fine (the run has finished: nothing more to train)
    same = invoke(*args, "--resume", "--device", "cpu", "--precision", "bf16", "--data-root", tmp_path / "elsewhere")
    assert same.exit_code == 0, same.output
    assert load_checkpoint(run / "model.safetensors").training["config"]["precision"] == "bf16"


def test_every_config_setting_is_a_train_option_with_the_help_it_declares():
    """One place per setting: each config field is exactly one ``dvn train`` option, named after the field (but for
    the flags ``cli/train.py`` writes otherwise), showing the help the field declares, None when not given."""
    import dataclasses
    import typing

    import typer

    from dvn_cli.cli.app import app

    options = typer.main.get_command(app).commands["train"].params
    params = {p.name: p for p in options}
    fields = [f for cls in (BackboneConfig, TrainConfig) for f in dataclasses.fields(cls) if f.name != "backbone"]
    assert len(options) == len(params)  # no name twice
    assert set(params) == {f.name for f in fields} | {"width", "resume", "force", "config"}
    written_otherwise = {"units": ["--units", "-k"], "in_channels": ["--input-channels"], "order_table": ["--orders"]}
    hints = {**typing.get_type_hints(BackboneConfig), **typing.get_type_hints(TrainConfig)}
    for f in fields:
        p = params[f.name]
        assert p.help == f.metadata["help"], f.name
        assert p.opts == written_otherwise.get(f.name, [f"--{f.name.replace('_', '-')}"]), f.name
        if hints[f.name] is bool and f.name != "download":  # a bool field gets both flags
            assert p.secondary_opts == [f"--no-{f.name.replace('_', '-')}"], f.name
        else:
            assert p.secondary_opts == [], f.name
        assert p.default is None, f.name  # not given: the config file or the resumed run fills it
    assert params["download"].opts == ["--download"]  # a flag alone: no --no-download


def test_list_options_are_parsed_into_their_fields(tmp_path):
    """``--orders`` rows, ``--widths`` and ``--level-weights`` lists reach the stored config as their fields."""
    make_image_folder(tmp_path / "colours")
    make_image_folder(tmp_path / "bands", ("top", "middle"), per_class=10)
    tasks = f"colours={tmp_path / 'colours'},bands={tmp_path / 'bands'}"
    args = _tiny_train_args(tasks, tmp_path / "run", tmp_path / "data", "--epochs", 0.2, "-k", 2)
    extra = ["--order-rule", "table", "--orders", "0,1; 1,0", "--level-weights", "1,0.5", "--no-channels-last"]
    result = invoke(*args, *extra)
    assert result.exit_code == 0, result.output
    stored = json.loads((tmp_path / "run" / "config.json").read_text())
    assert stored["order_table"] == [[0, 1], [1, 0]] and stored["level_weights"] == [1.0, 0.5]
    assert stored["backbone"]["widths"] == [8, 16, 32] and stored["channels_last"] is False
    bad = invoke(*args, "--order-rule", "table", "--orders", "0,x")
    assert bad.exit_code != 0 and "--orders" in bad.output and "comma-separated integers" in bad.output
