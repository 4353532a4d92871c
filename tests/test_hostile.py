"""A hostile new user: names that are not file names, files that are not what they say, folders dvn did not write.

Each case asserts the outcome a user sees: exit code 1 and one line, the files on disk, and hashes of the files
that must not change.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from dvn_cli.cli.app import app
from dvn_cli.config import TaskSpec
from dvn_cli.core.network import build_network
from dvn_cli.errors import CannotWrite, WrongFileFormat
from dvn_cli.export import pairs as export_module
from dvn_cli.export.pairs import MANIFEST_NAME, NonFiniteLogits, export_models
from dvn_cli.export.prune import write_compact_level
from dvn_cli.fsutil import safe_file_stem, write_atomic
from dvn_cli.modelfile.checkpoint import save_checkpoint
from dvn_cli.modelfile.container import METADATA_KEY
from dvn_cli.modelfile.registry import open_model

from .conftest import make_image_folder, tiny_config

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def one_line(result, starts: str = "error: ") -> str:
    assert result.exit_code == 1, result.output
    assert result.stderr.startswith(starts) and result.stderr.count("\n") == 1, result.stderr
    assert "Traceback" not in result.output
    return result.stderr


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def named_checkpoint(tmp_path: Path, names: list[str], file: str = "model.safetensors") -> Path:
    torch.manual_seed(0)
    tasks = [TaskSpec(name=n, classes=("a", "b"), mean=(0.5,) * 3, std=(0.25,) * 3) for n in names]
    return save_checkpoint(build_network(tiny_config(), tasks), tmp_path / file)


def edit_metadata(path: Path, edit) -> None:
    """Rewrite a dvn file's metadata JSON through ``edit(meta) -> meta`` (tensors unchanged)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()[METADATA_KEY])
    raw = edit(meta)
    save_file(
        load_file(str(path)), str(path), metadata={METADATA_KEY: raw if isinstance(raw, str) else json.dumps(raw)}
    )


# ------------------------------------------------------------------------------------------- names and paths


def test_safe_file_stems_are_unique_and_never_paths():
    names = ["mnist", "a/b", "a_b", "猫", "犬", "../evil", "/etc/passwd", "x" * 300, "\x1b[31mred"]
    stems = [safe_file_stem(n) for n in names]
    assert len(set(stems)) == len(names) and stems[0] == "mnist" and stems[2] == "a_b"
    assert all("/" not in s and not s.startswith(".") and len(s) <= 90 for s in stems)


def test_export_of_colliding_task_names_writes_one_file_each_and_a_true_manifest(tmp_path):
    checkpoint = named_checkpoint(tmp_path, ["a/b", "a_b", "猫", "犬"])
    out = tmp_path / "export"
    manifest = export_models(checkpoint, out, pairs=[(t, 1) for t in ("a/b", "a_b", "猫", "犬")], check=False)
    files = [m["file"] for m in manifest["models"]]
    assert len(set(files)) == 4
    for m in manifest["models"]:
        assert (out / m["file"]).parent == out and sha(out / m["file"]) == m["sha256"]
    assert sorted(p.name for p in out.iterdir()) == sorted([MANIFEST_NAME, *files])


def test_prune_level_never_turns_a_task_name_into_a_path(tmp_path):
    run = tmp_path / "run"
    checkpoint = named_checkpoint(run, ["../evil", str(tmp_path / "abs")])
    for task in ("../evil", str(tmp_path / "abs")):
        written = write_compact_level(open_model(checkpoint), task, "1")
        assert written.path.parent == run
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_train_refuses_task_names_that_are_not_names(tmp_path):
    folder = make_image_folder(tmp_path / "pics", per_class=4)
    result = invoke("train", "--tasks", f"../evil={folder}", "--out", tmp_path / "run", "--epochs", "0.1")
    assert "task name '../evil' is not allowed" in one_line(result)
    assert not (tmp_path / "run").exists()


def test_force_replaces_regular_files_only(tmp_path):
    checkpoint = named_checkpoint(tmp_path, ["t"])
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    link = tmp_path / "link"
    link.symlink_to(checkpoint)
    for target in (fifo, link, tmp_path):
        result = invoke("prune-level", "-c", checkpoint, "--task", "t", "--budget", "1", "-o", target, "--force")
        assert "is not a regular file" in one_line(result, f"error: cannot write to {target}")
    assert fifo.is_fifo() and link.is_symlink()
    with pytest.raises(CannotWrite, match="not a regular file"):
        write_atomic(fifo, b"x")


def test_export_refuses_a_manifest_dvn_did_not_write(tmp_path):
    checkpoint = named_checkpoint(tmp_path, ["t"])
    for text in ('{"hello": 1}\n', "{not json", "[" * 100_000):
        out = tmp_path / f"out{len(text)}"
        out.mkdir()
        (out / MANIFEST_NAME).write_text(text)
        result = invoke("export", "-c", checkpoint, "-o", out, "--no-check", "--budget", "1")
        assert "is not a dvn export manifest" in one_line(result)
        assert (out / MANIFEST_NAME).read_text() == text and sorted(p.name for p in out.iterdir()) == [MANIFEST_NAME]
        forced = invoke("export", "-c", checkpoint, "-o", out, "--no-check", "--budget", "1", "--force")
        assert forced.exit_code == 0, forced.output
        assert json.loads((out / MANIFEST_NAME).read_text())["models"][0]["task"] == "t"


def test_an_export_that_fails_half_way_leaves_nothing_behind(tmp_path, monkeypatch):
    checkpoint = named_checkpoint(tmp_path, ["t", "u"])
    fmt = export_module.EXPORT_FORMATS["onnx"]
    calls = []

    def fail_second(plain, spec, opset, precision):
        calls.append(spec.task.name)
        if len(calls) == 2:
            raise OSError(36, "File name too long")
        return fmt.to_bytes(plain, spec, opset, precision)

    monkeypatch.setitem(
        export_module.EXPORT_FORMATS, "onnx", export_module.ExportFormat(".onnx", fail_second, fmt.check)
    )
    with pytest.raises(OSError):
        export_models(checkpoint, tmp_path / "fresh", check=False)
    assert not (tmp_path / "fresh").exists()
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "mine.txt").write_text("mine")
    calls.clear()
    with pytest.raises(OSError):
        export_models(checkpoint, kept, check=False)
    assert sorted(p.name for p in kept.iterdir()) == ["mine.txt"]


# ------------------------------------------------------------------------------------------- silent nonsense


def test_non_finite_weights_are_refused_naming_the_file(tmp_path):
    checkpoint = named_checkpoint(tmp_path, ["t"])
    tensors = load_file(str(checkpoint))
    tensors["features.stem_conv.weight"][0, 0, 0, 0] = float("nan")
    from safetensors import safe_open

    with safe_open(str(checkpoint), framework="pt") as f:
        metadata = f.metadata()
    save_file(tensors, str(checkpoint), metadata=metadata)
    with pytest.raises(WrongFileFormat, match="non-finite values .* in features.stem_conv.weight"):
        open_model(checkpoint)
    for command in (
        ["eval"],
        ["info"],
        ["export", "-o", tmp_path / "x"],
        ["prune-level", "--task", "t", "--budget", "1"],
    ):
        assert f"error: {checkpoint} holds non-finite values" in one_line(invoke(*command, "-c", checkpoint))


def test_non_finite_logits_stop_an_export(tmp_path):
    torch.manual_seed(0)
    network = build_network(tiny_config(), [TaskSpec("t", ("a", "b"), (0.5,) * 3, (0.25,) * 3)])
    with torch.no_grad():
        for name, p in network.named_parameters():
            if name.endswith("weight") and p.dim() == 4:
                p.fill_(3e37)  # finite weights whose products overflow float32
    checkpoint = save_checkpoint(network, tmp_path / "model.safetensors")
    with pytest.raises(NonFiniteLogits, match="t level 1 gives non-finite logits"):
        export_models(checkpoint, tmp_path / "out", pairs=[("t", 1)])
    assert not (tmp_path / "out").exists()


def test_eval_refuses_limits_that_leave_nothing_and_splits_without_images(tmp_path):
    checkpoint = named_checkpoint(tmp_path, ["t"])
    for limit in ("-5", "0"):
        assert "leaves nothing to evaluate" in one_line(invoke("eval", "-c", checkpoint, "--limit", limit))
    folder = make_image_folder(tmp_path / "pics", classes=("red", "green"), per_class=1)
    torch.manual_seed(0)
    spec = TaskSpec("pets", ("green", "red"), (0.5,) * 3, (0.25,) * 3, source=str(folder))
    lonely = save_checkpoint(build_network(tiny_config(), [spec]), tmp_path / "lonely.safetensors")
    assert "pets has no test images: nothing to evaluate" in one_line(invoke("eval", "-c", lonely))


@pytest.mark.parametrize(
    ("edit", "command"),
    [
        (lambda m: "[" * 100_000 + "]" * 100_000, "info"),
        (lambda m: '{"format": "dvn-checkpoint", "version": 1e999}', "eval"),
        (lambda m: {**m, "version": -1}, "export"),
        (lambda m: {**m, "version": "1"}, "info"),
        (lambda m: {**m, "training": ["a", "list"]}, "info"),
        (lambda m: {**m, "backbone": {**m["backbone"], "widths": "abc"}}, "prune-level"),
        (lambda m: [1, 2, 3], "plan"),
    ],
)
def test_edited_metadata_is_one_line_for_every_command(tmp_path, edit, command):
    checkpoint = named_checkpoint(tmp_path, ["t"])
    edit_metadata(checkpoint, edit)
    before = sha(checkpoint)
    extra = {"prune-level": ["--task", "t", "--budget", "1"], "plan": ["--budget", "1M"]}.get(command, [])
    result = invoke(command, "-c", checkpoint, *extra)
    assert str(checkpoint) in one_line(result)
    assert sha(checkpoint) == before


def test_float_orders_are_refused(tmp_path):
    checkpoint = named_checkpoint(tmp_path, ["t"])
    tensors = load_file(str(checkpoint))
    tensors["orders.t"] = tensors["orders.t"].double()
    from safetensors import safe_open

    with safe_open(str(checkpoint), framework="pt") as f:
        metadata = f.metadata()
    save_file(tensors, str(checkpoint), metadata=metadata)
    assert "orders.t is not a list of unit indices" in one_line(invoke("info", "-c", checkpoint))


def test_a_model_path_that_is_not_a_regular_file(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    zero = tmp_path / "zero"
    zero.symlink_to("/dev/zero")
    for path in (fifo, zero):
        assert one_line(invoke("info", "-c", path)) == f"error: {path} is not a regular file\n"
    without = f"error: {tmp_path} is a folder without manifest.json: pass a model file, or a folder dvn export --shared"
    assert one_line(invoke("info", "-c", tmp_path)) == f"{without} wrote\n"  # the folder's missing manifest, named
    assert "no such file" in one_line(invoke("eval", "-c", tmp_path / "missing.safetensors"))


def test_names_from_files_cannot_steer_the_terminal(tmp_path):
    checkpoint = named_checkpoint(tmp_path, ["\x1b[31mred", "[bold]x[/bold]"])
    result = invoke("info", "-c", checkpoint)
    assert result.exit_code == 0, result.output
    assert "\x1b" not in result.stdout and "\\x1b[31mred" in result.stdout and "[bold]x[/bold]" in result.stdout
    refused = invoke("eval", "-c", checkpoint, "--task", "\x1b[2Jgone")
    assert "\x1b" not in refused.stderr and "\\x1b[2Jgone" in one_line(refused)


@pytest.mark.parametrize(
    "edit_task",
    [lambda t: {**t, "classes": "ab"}, lambda t: {**t, "std": [0.0, 0.25, 0.25]}, lambda t: {**t, "mean": [1e999] * 3}],
)
def test_edited_task_specs_are_refused(tmp_path, edit_task):
    checkpoint = named_checkpoint(tmp_path, ["t"])
    edit_metadata(checkpoint, lambda m: {**m, "tasks": [edit_task(t) for t in m["tasks"]]})
    assert "does not match its own metadata" in one_line(invoke("eval", "-c", checkpoint))


# ---------------------------------------------------------------------------------- one error style (issue 18 row 17)


def test_a_smaller_exports_weights_file_is_changed_not_truncated(tmp_path):
    from dvn_cli.export.shared import export_shared
    from dvn_cli.modelfile.shared_weights import WEIGHTS_NAME
    from dvn_cli.runtime.ort import SharedOrtRuntime

    checkpoint = open_model(named_checkpoint(tmp_path, ["t", "u"]))
    export_shared(checkpoint, tmp_path / "big", [("t", 4), ("u", 4)], check=False)
    export_shared(checkpoint, tmp_path / "small", [("t", 1)], check=False)
    weights = tmp_path / "big" / WEIGHTS_NAME
    weights.write_bytes((tmp_path / "small" / WEIGHTS_NAME).read_bytes())
    with pytest.raises(WrongFileFormat, match=rf"weights file {weights} is changed: \d+ bytes, the manifest says"):
        SharedOrtRuntime(tmp_path / "big")
    weights.write_bytes((tmp_path / "small" / WEIGHTS_NAME).read_bytes()[:-10])  # a cut file still is truncated
    with pytest.raises(WrongFileFormat, match="is truncated"):
        SharedOrtRuntime(tmp_path / "big")
    graph = tmp_path / "small" / "t-level1.onnx"
    message = one_line(invoke("predict", tmp_path, "-c", graph))
    assert message == (
        f"error: {graph} is one file of the export in {graph.parent}, not a dvn model file; pass the folder "
        f"({graph.parent}) if dvn export --shared wrote it, else the checkpoint it was exported from\n"
    )


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ("train", "--affinity-steps", "1e9"),
            "error: Invalid value for '--affinity-steps': Input should be a valid integer, unable to parse string "
            "as an integer; see 'dvn train --help'\n",
        ),
        (("predict",), "error: Missing argument 'IMAGE'; see 'dvn predict --help'\n"),
        (("--bogus",), "error: No such option: --bogus; see 'dvn --help'\n"),
        (("train", "--orders", "0,x"), "error: Invalid value for --orders: must be comma-separated integers, got "),
    ],
    ids=["bad-int", "missing-argument", "unknown-option", "bad-parameter"],
)
def test_parse_errors_are_one_red_line_with_exit_1(args, message):
    """Typer's own parse errors end as dvn's do (one line, exit 1), not in a box with exit 2."""
    result = runner.invoke(app, list(args), prog_name="dvn")
    assert one_line(result).startswith(message) and "─" not in result.output


def test_options_that_would_be_ignored_are_refused(tmp_path):
    folder = make_image_folder(tmp_path / "pics", per_class=2)
    common = ["train", "--tasks", f"a={folder}", "--out", tmp_path / "run", "--input-size", 12, "--input-channels", 3]
    assert one_line(invoke(*common, "--affinity-steps", 5)) == (
        "error: --affinity-steps sets the warm-up of --order-rule affinity; this run's order rule is nearest: drop "
        "--affinity-steps or pass --order-rule affinity\n"
    )
    assert one_line(invoke(*common, "--width", "0.01")) == (
        "error: --width 0.01 gives widths 1,1,1, which do not split into k=4 units; choose another --width or -k, "
        "or give --widths\n"
    )
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------- output paths (issue 29)


def _writers(checkpoint: Path, pth: Path, out: Path) -> list[list]:
    """Every command that writes a file, writing ``out`` (``--force`` where it has one)."""
    return [
        ["prune-level", "-c", checkpoint, "--task", "t", "--budget", "1", "-o", out, "--force"],
        ["plan", "-c", checkpoint, "--budget", "50%", "--bundle", out],
        ["eval", "-c", checkpoint, "--csv", out],
        ["eval", "-c", checkpoint, "--plot", out],
        ["convert", pth, "-o", out, "--force"],
    ]


def test_no_command_writes_over_a_file_it_reads(tmp_path):
    """prune-level -c F -o F --force replaced the checkpoint with a compact model (plan --bundle F, eval --csv F
    too): the output is refused when it is the input, by its path or another name (a hard link)."""
    checkpoint = named_checkpoint(tmp_path, ["t"])
    pth = tmp_path / "weights.pth"
    torch.save({"w": torch.zeros(2)}, pth)
    os.link(checkpoint, tmp_path / "hard.safetensors")
    before = sha(checkpoint), sha(pth)
    for out in (checkpoint, tmp_path / "hard.safetensors"):
        for args in _writers(checkpoint, pth, out)[:4]:
            assert "it is the file this command reads" in one_line(invoke(*args), f"error: cannot write to {out}: ")
    result = invoke("convert", pth, "-o", pth, "--force")
    assert one_line(result) == f"error: cannot write to {pth}: it is the file this command reads; choose another file\n"
    assert (sha(checkpoint), sha(pth)) == before


def test_a_file_in_a_folder_that_does_not_exist_is_refused_before_any_work(tmp_path):
    """eval --csv /nonexistent/dir/x.csv made the folders (as root, at the filesystem root): every file output needs
    its folder to exist, and the check comes before the work."""
    checkpoint = named_checkpoint(tmp_path, ["t"])
    pth = tmp_path / "weights.pth"
    torch.save({"w": torch.zeros(2)}, pth)
    out = tmp_path / "missing" / "deeper" / "x.out"
    missing = f"{out.parent} does not exist; create the folder first or choose another file"
    for args in _writers(checkpoint, pth, out):
        assert one_line(invoke(*args)) == f"error: cannot write to {out}: {missing}\n", args
    assert not (tmp_path / "missing").exists()


def test_a_file_that_lists_no_tasks_is_refused_when_opened(tmp_path):
    """A checkpoint whose metadata says "tasks": [] was shown by info, and predict raised StopIteration, export an
    IndexError; so did a bundle of no tasks (and no tensors). Both are refused when opened, in one line."""
    from safetensors import safe_open

    from dvn_cli.modelfile.bundle import save_bundle

    checkpoint = named_checkpoint(tmp_path, ["t"])
    bundle = save_bundle(open_model(checkpoint).network, {"t": 1}, tmp_path / "bundle.safetensors")
    with safe_open(str(bundle), framework="pt") as f:
        meta = json.loads(f.metadata()[METADATA_KEY])
    meta.update(tasks=[], choices={}, orders={}, costs={})
    save_file({}, str(bundle), metadata={METADATA_KEY: json.dumps(meta)})
    edit_metadata(checkpoint, lambda m: {**m, "tasks": []})
    image = tmp_path / "x.png"
    Image.new("RGB", (12, 12)).save(image)
    for path, what in ((checkpoint, "a network has"), (bundle, "a bundle holds")):
        commands = [
            ["info"],
            ["predict", image],
            ["export", "-o", tmp_path / "export", "--no-check"],
            ["eval"],
            ["prune-level", "--task", "t", "--budget", "1", "-o", tmp_path / "t.safetensors"],
        ]
        for args in commands:
            message = f"error: {path} does not match its own metadata (no tasks: {what} at least one)\n"
            assert one_line(invoke(*args, "-c", path)) == message, args
    message = f"error: {checkpoint} does not match its own metadata (no tasks: a network has at least one)\n"
    assert one_line(invoke("plan", "--budget", "1M", "-c", checkpoint)) == message


def _strict_json(text: str):
    """JSON as a strict parser reads it: ``NaN`` and ``Infinity`` are not JSON."""

    def refuse(constant: str):
        raise AssertionError(f"{constant} in JSON output")

    return json.loads(text, parse_constant=refuse)


def test_an_older_file_with_nan_accuracies_plans_none_of_them_and_prints_null(tmp_path):
    """A run with --val-fraction 0 once stored NaN accuracies; ``dvn plan --budget 100%`` then chose level 1
    (every comparison with NaN is false) and printed ``"accuracy": {"mnist": NaN}``, which is not JSON."""
    from .conftest import tiny_tasks

    torch.manual_seed(0)
    nan = float("nan")
    training = {"steps": 1, "val_accuracy": {"task0": [nan] * 4, "task1": [0.2, 0.4, 0.6, 0.8]}}
    path = save_checkpoint(build_network(tiny_config(), tiny_tasks(2)), tmp_path / "old.safetensors", training)
    assert one_line(invoke("plan", "-c", path, "--budget", "100%", "--json")).startswith(
        "error: no accuracy for task0 at level 1: a plan needs the validation accuracy of every level"
    )
    only_known = invoke("plan", "-c", path, "--budget", "100%", "--tasks", "task1", "--json")
    assert only_known.exit_code == 0, only_known.output
    assert _strict_json(only_known.stdout)["choices"] == {"task1": 4}
    described = invoke("info", "-c", path, "--json")
    assert described.exit_code == 0, described.output
    text = json.dumps(_strict_json(described.stdout))
    assert '"val_accuracy": null' in text and '"val_accuracy": 0.8' in text
    table = invoke("info", "-c", path)
    assert table.exit_code == 0 and "nan%" not in table.stdout


def test_every_json_output_of_the_cli_goes_through_one_helper_that_prints_no_nan(capsys):
    from dvn_cli.cli import ui

    commands = [path for path in Path(ui.__file__).parent.glob("*.py") if path.name != "ui.py"]
    source = "\n".join(path.read_text() for path in commands)
    assert len(commands) > 10 and "json.dumps" not in source and source.count("ui.print_json(") >= 6
    ui.print_json({"a": float("nan"), "b": [float("inf"), 1.5], "c": (float("-inf"),)})
    assert _strict_json(capsys.readouterr().out) == {"a": None, "b": [None, 1.5], "c": [None]}


_CHECKED_BY_THE_LIBRARY = {
    ("train", "depth"): "the backbone family: ResNet depths are 6n+2 (core/resnet.py)",
    ("train", "width"): "core.backbones.backbone_defaults (> 0) and train_config._check_width_splits (MAX_WIDTH)",
    ("eval", "limit"): "evaluation.evaluate: a limit that leaves nothing to evaluate",
    ("eval", "workers"): "data.streaming.open_task: 0 or more",
    ("predict", "top"): "runtime.predict: at least 1",
    ("serve", "max_batch"): "serve.options: at least 1",
    ("serve", "max_uploads"): "serve.options: at least 1",
    ("serve", "body_timeout"): "serve.options: above 0 seconds",
}


def test_every_numeric_option_has_a_declared_range():
    """A number a user gives is checked against its range before any work: Typer's min/max on the option, a
    ``config.Range`` on the config field behind a train option, or one named check in the library."""
    import dataclasses

    import typer

    from dvn_cli.config import BackboneConfig, TrainConfig

    limits = {f.name: f.metadata.get("limits") for c in (BackboneConfig, TrainConfig) for f in dataclasses.fields(c)}
    numbers = {int, float}
    unchecked, seen = [], []

    def walk(group, prefix: str) -> None:
        for name, command in group.commands.items():
            if hasattr(command, "commands"):
                walk(command, f"{prefix}{name} ")
                continue
            for p in command.params:
                if getattr(p, "hidden", False) or p.type_descriptor.annotation not in numbers:
                    continue
                seen.append(p.name)
                if p.min is not None or p.max is not None or (f"{prefix}{name}", p.name) in _CHECKED_BY_THE_LIBRARY:
                    continue
                if name == "train" and limits.get(p.name) is not None:
                    continue
                unchecked.append(f"{prefix}{name} --{p.name.replace('_', '-')}")

    walk(typer.main.get_command(app), "")
    assert len(seen) > 20 and {"seed", "port", "top"} <= set(seen)  # the walk does see the numeric options
    assert unchecked == []


@pytest.mark.parametrize(
    "args, message",
    [
        (("--port", "70000"), "error: Invalid value for '--port': Input should be less than or equal to 65535"),
        (("--port", "-1"), "error: Invalid value for '--port': Input should be greater than or equal to 0"),
        (("--max-body", "-1"), "error: Invalid value for '--max-body': Input should be greater than or equal to 1"),
        (("--max-pixels", "0"), "error: Invalid value for '--max-pixels': Input should be greater than or equal to 1"),
    ],
)
def test_serve_refuses_numbers_out_of_range_before_it_starts(tmp_path, args, message):
    """``--port 70000`` once served on port 4464 (wrapped) without a word; --max-body -1 and --max-pixels 0 were
    taken."""
    path = named_checkpoint(tmp_path, ["a"])
    assert one_line(invoke("serve", "-c", path, *args)).startswith(message)


def test_text_in_an_error_is_printed_as_written_not_as_emoji_or_markup(capsys):
    """``--port -1`` once printed ``127.0.0.1👎`` for ``127.0.0.1:-1:``: rich turned ``:-1:`` into an emoji."""
    from dvn_cli.cli import ui

    ui.print_error("cannot listen on 127.0.0.1:-1: [bold]no[/] :smile:")
    ui.print_warning(":+1: [red]x")
    ui.print_note(":thumbs_up:")
    assert capsys.readouterr().err == (
        "error: cannot listen on 127.0.0.1:-1: [bold]no[/] :smile:\nwarning: :+1: [red]x\n:thumbs_up:\n"
    )
