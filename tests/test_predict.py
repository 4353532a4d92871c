"""``dvn predict``: top classes of image files with any model file, as a table or JSON."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from dvn_cli.cli.app import app
from dvn_cli.config import TaskSpec
from dvn_cli.core.network import build_network
from dvn_cli.core.plain import extract_plain
from dvn_cli.data.batches import normalize_batch
from dvn_cli.data.pixels import load_image
from dvn_cli.modelfile.bundle import save_bundle
from dvn_cli.modelfile.checkpoint import save_checkpoint
from dvn_cli.modelfile.compact import save_compact
from dvn_cli.modelfile.spec import compact_spec

from .conftest import make_image_folder, settle_batch_norm, tiny_config

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A checkpoint of a colour task (folder-style, bilinear) and a digit task (pad), its bundle and a compact."""
    base = tmp_path_factory.mktemp("predict")
    make_image_folder(base / "images", per_class=2, size=16)
    Image.new("L", (8, 8), 200).save(base / "images" / "grey-small.png")  # grey and small: converted and padded
    tasks = [
        TaskSpec("colours", ("red", "green", "blue"), (0.3,) * 3, (0.2,) * 3, source="folder", resize="bilinear"),
        TaskSpec("digits", tuple(str(i) for i in range(10)), (0.1,) * 3, (0.3,) * 3, source="mnist", resize="pad"),
    ]
    torch.manual_seed(0)
    network = build_network(tiny_config(), tasks)
    settle_batch_norm(network)
    checkpoint = save_checkpoint(network, base / "model.safetensors")
    bundle = save_bundle(network, {"colours": 2, "digits": 3}, base / "bundle.safetensors")
    compact = save_compact(extract_plain(network, 0, 3), compact_spec(network, 0, 3), base / "compact.safetensors")
    return base, network, checkpoint, bundle, compact


def expected_top(network, path: Path, task: str, level: int, k: int) -> list[tuple[str, float]]:
    spec = network.tasks[network.task_index(task)]
    x = normalize_batch(load_image(path, 3, 12, spec.resize).unsqueeze(0), spec)
    with torch.no_grad():
        probs = torch.softmax(network.eval()(x, task, level), dim=1)[0]
    values, indices = probs.topk(k)
    return [(spec.classes[i], v) for v, i in zip(values.tolist(), indices.tolist(), strict=True)]


def check_rows(rows, network, files, choices, k):
    assert [(r["image"], r["task"], r["level"]) for r in rows] == [
        (str(f), task, level) for f in files for task, level in choices.items()
    ]
    for row in rows:
        expected = expected_top(network, Path(row["image"]), row["task"], row["level"], k[row["task"]])
        assert [c["class"] for c in row["top"]] == [c for c, _ in expected]
        for got, (_, probability) in zip(row["top"], expected, strict=True):
            assert got["probability"] == pytest.approx(probability, abs=1e-5)


def test_checkpoint_json_at_a_budget_equals_the_virtual_network(setup):
    base, network, checkpoint, _, _ = setup
    result = invoke("predict", base / "images", "-c", checkpoint, "--task", "colours,digits", "--budget", 2, "--json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)["rows"]
    files = sorted(p for p in (base / "images").rglob("*") if p.is_file())
    assert len(files) == 7
    check_rows(rows, network, files, {"colours": 2, "digits": 2}, {"colours": 3, "digits": 5})


def test_without_a_budget_each_task_runs_its_largest_level(setup):
    base, network, checkpoint, _, _ = setup
    one = base / "images" / "red" / "0.png"
    result = invoke("predict", one, "-c", checkpoint, "--top", 2, "--json")
    assert result.exit_code == 0, result.output
    check_rows(
        json.loads(result.stdout)["rows"], network, [one], {"colours": 4, "digits": 4}, {"colours": 2, "digits": 2}
    )


def test_a_bundle_runs_its_levels_and_a_compact_model_its_one(setup):
    base, network, _, bundle, compact = setup
    files = [base / "images" / "green" / "1.png", base / "images" / "grey-small.png"]
    result = invoke("predict", *files, "-c", bundle, "--json", "--top", 10)
    assert result.exit_code == 0, result.output
    check_rows(
        json.loads(result.stdout)["rows"], network, files, {"colours": 2, "digits": 3}, {"colours": 3, "digits": 10}
    )
    result = invoke("predict", *files, "-c", compact, "--json")
    assert result.exit_code == 0, result.output
    check_rows(json.loads(result.stdout)["rows"], network, files, {"colours": 3}, {"colours": 3})


def test_table(setup):
    base, _, checkpoint, _, _ = setup
    result = invoke("predict", base / "images" / "blue", "-c", checkpoint, "--task", "colours", "--budget", "50%")
    assert result.exit_code == 0, result.output
    assert "predictions" in result.stdout and "top classes (probability)" in result.stdout
    assert "blue/0.png" in result.stdout and "blue/1.png" in result.stdout and "colours" in result.stdout
    assert "%" in result.stdout and result.stderr == ""


def test_unreadable_images_are_named_and_the_rest_run(setup, tmp_path):
    base, _, checkpoint, _, _ = setup
    folder = tmp_path / "mixed"
    folder.mkdir()
    (folder / "notes.txt").write_text("not an image")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    Image.new("RGB", (20, 20), (10, 200, 30)).save(folder / "good.jpg")
    result = invoke("predict", folder, "-c", checkpoint, "--task", "colours", "--json")
    assert result.exit_code == 0, result.output
    assert [r["image"] for r in json.loads(result.stdout)["rows"]] == [str(folder / "good.jpg")]
    lines = result.stderr.splitlines()
    assert lines == [
        f"warning: cannot read {folder / 'broken.png'} as an image; skipped",
        f"warning: cannot read {folder / 'notes.txt'} as an image; skipped",
    ]


def test_no_readable_image_is_an_error(setup, tmp_path):
    _, _, checkpoint, _, _ = setup
    (tmp_path / "a.txt").write_text("text")
    result = invoke("predict", tmp_path / "a.txt", "-c", checkpoint)
    assert result.exit_code == 1
    assert result.stderr.splitlines()[-1] == "error: none of the 1 file(s) could be read as an image"


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda d: d / "nope.png", "error: no such file or folder: {}"),
        (lambda d: (d / "empty").mkdir() or d / "empty", "error: {} is a folder without image files"),
        (lambda d: os.mkfifo(d / "fifo") or d / "fifo", "error: {} is not a regular file or folder; name image"),
        (lambda d: (d / "link").symlink_to(d / "gone") or d / "link", "error: {} is a broken link"),
    ],
    ids=["missing", "empty-folder", "fifo", "broken-link"],
)
def test_bad_paths_are_one_line(setup, tmp_path, make, message):
    _, _, checkpoint, _, _ = setup
    path = make(tmp_path)
    result = invoke("predict", path, "-c", checkpoint)
    assert result.exit_code == 1, result.output
    assert result.stderr.splitlines() == [result.stderr.splitlines()[0]]
    assert result.stderr.startswith(message.format(path)), result.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (("--top", 0), "error: --top must be at least 1"),
        (("--task", "nope"), "error: unknown task 'nope'"),
        (("--task", "colours", "--budget", "1k"), "error: "),
    ],
)
def test_bad_options_are_one_line(setup, args, message):
    base, _, checkpoint, _, _ = setup
    result = invoke("predict", base / "images" / "red", "-c", checkpoint, *args)
    assert result.exit_code == 1, result.output
    assert len(result.stderr.splitlines()) == 1 and result.stderr.startswith(message), result.stderr


def test_a_bundle_refuses_another_level_in_one_line(setup):
    base, _, _, bundle, _ = setup
    result = invoke("predict", base / "images" / "red", "-c", bundle, "--task", "colours", "--budget", 4)
    assert result.exit_code == 1, result.output
    assert len(result.stderr.splitlines()) == 1 and "holds only colours level 2" in result.stderr


def test_a_broken_model_file_is_one_line(setup, tmp_path):
    base, *_ = setup
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not a safetensors file")
    result = invoke("predict", base / "images" / "red", "-c", broken)
    assert result.exit_code == 1, result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {broken} is not a safetensors file"), result.stderr


# ------------------------------------------------------------------ --budgets: one runtime switched between plans

ACCURACY = {"colours": [0.5, 0.6, 0.7, 0.8], "digits": [0.3, 0.5, 0.6, 0.65]}


@pytest.fixture(scope="module")
def planned(setup):
    """The setup's network as a trained checkpoint: validation accuracy to plan with."""
    base, network, *_ = setup
    return save_checkpoint(network, base / "trained.safetensors", training={"val_accuracy": ACCURACY})


def test_budgets_switch_one_runtime_and_every_row_equals_its_level(setup, planned, monkeypatch):
    from dvn_cli.planning.plan import accuracy_from_training, plan_budget_params, plan_levels, shared_memory_params
    from dvn_cli.runtime.shared import SharedRuntime

    made, switches = [], []  # every runtime made; (runtime, choices, blocks it newly holds) per set_levels
    init, set_levels = SharedRuntime.__init__, SharedRuntime.set_levels

    def counted_init(self, *args, **kwargs):
        made.append(self)
        init(self, *args, **kwargs)

    def counted_set_levels(self, choices):
        before = self.held_blocks()
        result = set_levels(self, choices)
        switches.append((self, result, self.held_blocks() - before))
        return result

    monkeypatch.setattr(SharedRuntime, "__init__", counted_init)
    monkeypatch.setattr(SharedRuntime, "set_levels", counted_set_levels)
    base, network, *_ = setup
    folder = base / "images" / "red"
    result = invoke("predict", folder, "-c", planned, "--budgets", "100%,1B,35%", "--top", 2, "--json")
    assert result.exit_code == 0, result.output
    assert len(made) == 1 and [runtime for runtime, *_ in switches] == made * 2  # opened once, switched once
    assert switches[1][2] == set()  # going down from level 4 reads no block: they were all held already
    out = json.loads(result.stdout)
    full, small = out["switches"][0], out["switches"][2]
    assert full["choices"] == {"colours": 4, "digits": 4} and full["load_ms"] > 0
    assert full["memory_bytes"] == 4 * shared_memory_params(network, {"colours": 4, "digits": 4})
    assert out["switches"][1]["budget"] == "1B" and "fits no plan" in out["switches"][1]["error"]
    tasks = ["colours", "digits"]
    budget = plan_budget_params(network, "35%", tasks)
    expected = plan_levels(network, budget, tasks, accuracy_from_training({"val_accuracy": ACCURACY})).choices
    assert small["choices"] == expected != full["choices"] and small["switch_ms"] > 0
    files = sorted(folder.iterdir())
    by_budget = {b: [r for r in out["rows"] if r["budget"] == b] for b in ("100%", "1B", "35%")}
    k = {"colours": 2, "digits": 2}
    check_rows(by_budget["100%"], network, files, full["choices"], k)
    check_rows(by_budget["1B"], network, files, full["choices"], k)  # a failed switch keeps the previous levels
    check_rows(by_budget["35%"], network, files, expected, k)
    warning = [line for line in result.stderr.splitlines() if "1B" in line]
    assert len(warning) == 1 and warning[0].endswith("the previous levels keep running")


def test_budgets_table_names_each_switch(setup, planned):
    base, *_ = setup
    result = invoke("predict", base / "images" / "red", "-c", planned, "--budgets", "100%,35%")
    assert result.exit_code == 0, result.output
    notes = result.stderr.splitlines()
    assert notes[0].startswith("budget 100%: colours level 4, digits level 4,") and "ms to load" in notes[0]
    assert notes[1].startswith("budget 35%: colours level") and "ms to switch" in notes[1]
    assert "budget" in result.stdout and "35%" in result.stdout


@pytest.mark.parametrize(
    "model, args, message",
    [
        ("planned", ("--budgets", "1B"), "fits no plan"),  # the first budget: nothing runs to keep serving
        ("planned", ("--budgets", "100%,3"), "is a level"),  # refused before anything runs
        ("planned", ("--budgets", "100%,lots"), "bad budget 'lots'"),
        ("planned", ("--budgets", "100%", "--budget", "2"), "not both"),
        ("checkpoint", ("--budgets", "100%"), "no validation accuracy to plan with"),
        ("bundle", ("--budgets", "100%"), "holds fixed levels"),
        ("compact", ("--budgets", "100%"), "holds plain networks"),
    ],
)
def test_budgets_bad_input_is_one_line(setup, planned, model, args, message):
    base, _, checkpoint, bundle, compact = setup
    path = {"planned": planned, "checkpoint": checkpoint, "bundle": bundle, "compact": compact}[model]
    result = invoke("predict", base / "images" / "red", "-c", path, *args)
    assert result.exit_code == 1, result.output
    assert len(result.stderr.splitlines()) == 1 and message in result.stderr, result.stderr


def test_budget_rows_no_plan_fits_say_so(setup, planned):
    """Issue 18 row 10: rows of a budget no plan fits ran at the previous levels; the JSON and the table say so."""
    base, *_ = setup
    folder = base / "images" / "red"
    result = invoke("predict", folder, "-c", planned, "--budgets", "100%,1B", "--json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)["rows"]
    assert {(r["budget"], r["met"]) for r in rows} == {("100%", True), ("1B", False)}
    result = invoke("predict", folder, "-c", planned, "--budgets", "100%,1B")
    assert result.exit_code == 0, result.output
    assert result.stdout.count("1B (not met)") == len(rows) // 2


def test_every_skipped_file_is_named(setup, tmp_path):
    """Issue 18 row 14: a link to a device and a FIFO are named as the undecodable file is (none is opened)."""
    base, _, checkpoint, _, _ = setup
    folder = tmp_path / "mixed"
    folder.mkdir()
    Image.new("RGB", (20, 20), (10, 200, 30)).save(folder / "good.png")
    (folder / "x.png").symlink_to("/dev/zero")
    os.mkfifo(folder / "f.png")
    (folder / "t.png").write_text("text")
    result = invoke("predict", folder, "-c", checkpoint, "--task", "colours", "--json")
    assert result.exit_code == 0, result.output
    assert [r["image"] for r in json.loads(result.stdout)["rows"]] == [str(folder / "good.png")]
    assert result.stderr.splitlines() == [
        f"warning: {folder / 'f.png'} is not a regular file; skipped",
        f"warning: {folder / 'x.png'} is not a regular file; skipped",
        f"warning: cannot read {folder / 't.png'} as an image; skipped",
    ]


def test_a_sub_folder_without_files_is_named_not_passed_over(setup, tmp_path):
    """A sub-folder named ``x.png`` was once ignored without a word; one that holds images is read."""
    base, _, checkpoint, _, _ = setup
    folder = tmp_path / "mixed"
    (folder / "x.png").mkdir(parents=True)
    (folder / "more" / "empty").mkdir(parents=True)
    Image.new("RGB", (20, 20), (10, 200, 30)).save(folder / "good.png")
    Image.new("RGB", (20, 20), (200, 10, 30)).save(folder / "more" / "inner.png")
    result = invoke("predict", folder, "-c", checkpoint, "--task", "colours", "--json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)["rows"]
    assert [r["image"] for r in rows] == [str(folder / "good.png"), str(folder / "more" / "inner.png")]
    assert result.stderr.splitlines() == [
        f"warning: {folder / 'more' / 'empty'} is a folder without image files; skipped",
        f"warning: {folder / 'x.png'} is a folder without image files; skipped",
    ]


def png_header(path: Path, width: int, height: int) -> Path:
    """A PNG whose header declares ``width`` x ``height`` grey pixels, with (almost) no pixel data."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    )
    return path


def test_images_declaring_too_many_pixels_are_refused_before_decoding(setup, tmp_path, monkeypatch):
    """Idea 3 of issue 18: the header's size is checked against MAX_IMAGE_PIXELS before anything is decoded;
    a decompression bomb (beyond PIL's own limit) is named the same way, and PIL's warning never leaks."""
    import warnings

    from dvn_cli.modelfile.registry import open_model
    from dvn_cli.runtime import predict as predict_module

    base, _, checkpoint, _, _ = setup
    folder = tmp_path / "big"
    folder.mkdir()
    Image.new("RGB", (20, 20), (10, 200, 30)).save(folder / "good.png")
    png_header(folder / "large.png", 10_000, 10_000)  # above MAX_IMAGE_PIXELS, where PIL only warns
    png_header(folder / "bomb.png", 30_000, 30_000)  # where PIL refuses
    decoded, skipped = [], []
    monkeypatch.setattr(predict_module, "load_image", lambda path, *a: decoded.append(path) or load_image(path, *a))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = predict_module.predict_images(
            open_model(checkpoint), [folder], ["colours"], on_skipped=lambda path, why: skipped.append(why)
        )
    assert [str(w.message) for w in caught] == [] and decoded == [folder / "good.png"]
    limit = f"{predict_module.MAX_IMAGE_PIXELS:,}"
    assert skipped == [
        f"{folder / 'bomb.png'} declares more than {limit} pixels (a decompression bomb?), more than dvn decodes",
        f"{folder / 'large.png'} declares 10000x10000 pixels, more than the {limit} dvn decodes",
    ]
    assert result.skipped == [folder / "bomb.png", folder / "large.png"] and len(result.rows) == 1
