"""The command line on a tiny real run: a folder dataset of RGB images, trained for a few steps."""

import json

import pytest
import torch
from typer.testing import CliRunner

from dvn_cli.cli.app import app

from .conftest import make_image_folder

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    base = tmp_path_factory.mktemp("cli")
    colours = make_image_folder(base / "colours", per_class=16)
    bands = make_image_folder(base / "bands", classes=("top", "middle"), per_class=12)
    out = base / "run"
    result = invoke(
        "train", "--tasks", f"colours={colours},bands={bands}", "--depth", 8, "--widths", "8,16,32",
        "--input-size", 16, "--epochs", 3, "--batch-size", 8, "--lr", 0.05, "--warmup-steps", 2, "--out", out,
        "--data-root", base / "data",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    return base, out / "model.safetensors", result


def test_train_prints_the_accuracy_table_and_writes_the_checkpoint(run_dir):
    _, checkpoint, result = run_dir
    assert checkpoint.is_file()
    assert "validation accuracy, task x level" in result.stdout
    assert "colours" in result.stdout and "level 4" in result.stdout
    assert "colours: 35 train / 4 val / 9 test images, 3 classes, input 3x16x16" in result.stderr


def test_eval_json_has_a_row_per_task_and_level(run_dir):
    base, checkpoint, _ = run_dir
    result = invoke("eval", "-c", checkpoint, "--json", "--data-root", base / "data")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    rows = out["rows"]
    assert [(r["task"], r["level"]) for r in rows] == [(t, lv) for t in ("colours", "bands") for lv in (1, 2, 3, 4)]
    for row in rows:
        assert {"task", "level", "units", "params", "params_total", "macs", "accuracy", "split", "samples"} <= set(row)
        assert 0 <= row["accuracy"] <= 1 and row["split"] == "test"
        assert row["samples"] == {"colours": 9, "bands": 4}[row["task"]]
    for task in ("colours", "bands"):
        params = [r["params"] for r in rows if r["task"] == task]
        assert params == sorted(params) and len(set(params)) == 4
    assert rows[4]["units"] == [3]  # bands takes units from the other end


def test_eval_one_task_at_a_budget_with_latency_csv_and_plot(run_dir, tmp_path):
    base, checkpoint, _ = run_dir
    csv, png = tmp_path / "rows.csv", tmp_path / "plot.png"
    result = invoke(
        "eval", "-c", checkpoint, "--task", "bands", "--budget", "3", "--latency", "--csv", csv,
        "--plot", png, "--data-root", base / "data",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "bands" in result.stdout and "ms/img b64" in result.stdout
    lines = csv.read_text().splitlines()
    assert len(lines) == 2 and lines[0].startswith("task,level,units,params")
    assert ",3," in lines[1]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    one = json.loads(
        invoke(
            "eval", "-c", checkpoint, "--task", "bands", "--budget", "50%", "--json", "--data-root", base / "data"
        ).stdout
    )
    assert len(one["rows"]) == 1 and one["rows"][0]["level"] in (1, 2)


@pytest.mark.parametrize(
    "args,message",
    [
        (["--budget", "3x"], "error: bad budget '3x': use a level (3), parameters (250k, 1.2M), a share (40%) or"),
        (["--budget", "7"], "error: level 7 does not exist: colours has levels 1..4"),
        (["--budget", "10"], "error: level 10 does not exist"),
        (["--budget", "100"], "error: level 100 does not exist"),
        (["--budget", "12"], "error: level 12 does not exist"),
        (["--task", "svhn"], "error: unknown task 'svhn'; this network has: colours, bands"),
        (["--budget", "1k"], "error: budget 1k parameters fits no level of colours: the smallest, level 1, has"),
    ],
)
def test_eval_user_errors_are_one_line(run_dir, args, message):
    base, checkpoint, _ = run_dir
    result = invoke("eval", "-c", checkpoint, "--data-root", base / "data", *args)
    assert result.exit_code == 1
    assert result.stderr.startswith(message), result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.output


def test_info_shows_orders_sizes_and_training(run_dir):
    _, checkpoint, _ = run_dir
    result = invoke("info", "-c", checkpoint)
    assert result.exit_code == 0, result.output
    assert "dvn-checkpoint v1" in result.stdout and "unit orders (rule: nearest)" in result.stdout
    described = json.loads(invoke("info", "-c", checkpoint, "--json").stdout)
    assert [t["order"] for t in described["tasks"]] == [[0, 1, 2, 3], [3, 2, 1, 0]]
    assert len(described["levels"]) == 8 and described["training"]["finished"] is True


def test_plan_counts_shared_units_once(run_dir, tmp_path):
    _, checkpoint, _ = run_dir
    described = json.loads(invoke("info", "-c", checkpoint, "--json").stdout)
    top = {r["task"]: r["params_total"] for r in described["levels"] if r["level"] == 4}
    sizes = {(r["task"], r["level"]): r["params_total"] for r in described["levels"]}
    result = invoke("plan", "-c", checkpoint, "--budget", "100%", "--weights", "colours=1,bands=1", "--json")
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    assert set(plan["choices"]) == {"colours", "bands"}
    assert plan["budget_params"] <= sum(top.values())
    assert plan["separate_params"] == sum(sizes[t, lv] for t, lv in plan["choices"].items())
    assert plan["memory_params"] <= min(plan["separate_params"], plan["budget_params"])
    table = invoke("plan", "-c", checkpoint, "--budget", "100%")
    assert "separate models would need" in table.stdout
    bundle = tmp_path / "both.safetensors"
    assert invoke("plan", "-c", checkpoint, "--budget", "100%", "--bundle", bundle).exit_code == 0
    from dvn_cli.modelfile.bundle import load_bundle, stored_params

    loaded = load_bundle(bundle)
    assert loaded.choices == plan["choices"] and stored_params(loaded) == plan["memory_params"]
    assert loaded.plain("bands")(torch.zeros(2, 3, 16, 16)).shape == (2, 2)
    tiny = invoke("plan", "-c", checkpoint, "--budget", "100")
    assert tiny.exit_code == 1 and tiny.stderr.startswith("error: ")


def test_plan_keeps_an_existing_bundle_unless_forced(run_dir, tmp_path):
    _, checkpoint, _ = run_dir
    bundle = tmp_path / "kept.safetensors"
    bundle.write_bytes(b"a file the user keeps")
    again = invoke("plan", "-c", checkpoint, "--budget", "100%", "--bundle", bundle)
    assert again.exit_code == 1 and again.stderr == (
        f"error: cannot write to {bundle}: it already exists; pass --force to replace it\n"
    )
    assert bundle.read_bytes() == b"a file the user keeps"
    assert invoke("plan", "-c", checkpoint, "--budget", "100%", "--bundle", bundle, "--force").exit_code == 0
    from dvn_cli.modelfile.bundle import load_bundle

    assert set(load_bundle(bundle).choices) == {"colours", "bands"}


def test_missing_data_is_one_clear_line(tmp_path):
    result = invoke("train", "--tasks", "cifar10,svhn", "--data-root", tmp_path, "--out", tmp_path / "run")
    assert result.exit_code == 1
    assert result.stderr.startswith(f"error: cifar10 not found in {tmp_path}"), result.stderr
    assert result.stderr.count("\n") == 1
    mnist = invoke("train", "--tasks", "mnist", "--data-root", tmp_path, "--out", tmp_path / "run")
    assert mnist.exit_code == 1 and "mnist not found in" in mnist.stderr and "dvn data prepare" in mnist.stderr
    assert not (tmp_path / "run").exists()


def test_train_refuses_unknown_and_duplicate_tasks(tmp_path):
    unknown = invoke("train", "--tasks", "imagenet", "--data-root", tmp_path)
    assert unknown.exit_code == 1 and unknown.stderr.startswith("error: unknown task 'imagenet'")
    dupes = invoke(
        "train", "--tasks", "mnist,mnist", "--data-root", tmp_path, "--input-size", 28, "--input-channels", 1
    )
    assert dupes.exit_code == 1 and dupes.stderr == "error: task listed twice: mnist\n"


def test_default_checkpoint_missing_says_how_to_get_one(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = invoke("eval", "--task", "svhn", "--budget", "3")
    assert result.exit_code == 1
    assert result.stderr == (
        "error: no checkpoint at runs/dvn/model.safetensors; train one with 'dvn train' or pass -c FILE\n"
    )


def test_prune_level_then_eval_gives_the_same_predictions(run_dir, tmp_path):
    from dvn_cli.evaluation.evaluate import load_split, predictions
    from dvn_cli.modelfile.checkpoint import load_checkpoint
    from dvn_cli.modelfile.compact import load_compact

    base, checkpoint, _ = run_dir
    out = tmp_path / "bands-2.safetensors"
    result = invoke("prune-level", "-c", checkpoint, "--task", "bands", "--budget", "2", "-o", out)
    assert result.exit_code == 0, result.output
    assert f"wrote {out}: bands level 2 of 4 (units [3, 2])" in result.stderr
    compact = load_compact(out)
    ckpt = load_checkpoint(checkpoint)
    images, _ = load_split(compact.spec.task, ckpt.network.config, "test", base / "data")
    virtual = predictions(lambda x: ckpt.network.eval()(x, "bands", 2), images, compact.spec.task)
    assert torch.equal(predictions(compact.plain, images, compact.spec.task), virtual)
    full = json.loads(
        invoke(
            "eval", "-c", checkpoint, "--task", "bands", "--budget", "2", "--json", "--data-root", base / "data"
        ).stdout
    )["rows"][0]
    small = json.loads(invoke("eval", "-c", out, "--json", "--data-root", base / "data").stdout)["rows"][0]
    assert small == full
    described = json.loads(invoke("info", "-c", out, "--json").stdout)
    assert described["level"] == 2 and described["task"]["name"] == "bands"
    assert "level 2 of 4" in invoke("info", "-c", out).stdout


def test_prune_level_default_name_and_refusals(run_dir):
    _, checkpoint, _ = run_dir
    result = invoke("prune-level", "-c", checkpoint, "--task", "colours", "--budget", "1")
    assert result.exit_code == 0, result.output
    written = checkpoint.parent / "colours-level1.safetensors"
    before = written.read_bytes()
    again = invoke("prune-level", "-c", checkpoint, "--task", "colours", "--budget", "1")
    assert again.exit_code == 1 and again.stderr == (
        f"error: cannot write to {written}: it already exists; pass --force to replace it or -o for another file\n"
    )
    assert written.read_bytes() == before
    compact = invoke("prune-level", "-c", written, "--task", "colours", "--budget", "2")
    assert compact.exit_code == 1
    assert compact.stderr.startswith(f"error: {written} is already a compact model (colours level 1)")
    other = invoke("eval", "-c", written, "--budget", "3")
    assert other.exit_code == 1 and "holds only colours level 1" in other.stderr
    missing = invoke("prune-level", "-c", checkpoint, "--task", "colours", "--budget", "5")
    assert missing.exit_code == 1 and missing.stderr == "error: level 5 does not exist: colours has levels 1..4\n"


def test_export_every_level_with_a_checked_manifest(run_dir, tmp_path):
    import hashlib

    _, checkpoint, _ = run_dir
    out = tmp_path / "export"
    result = invoke("export", "-c", checkpoint, "-o", out)
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    models = manifest["models"]
    assert [(m["task"], m["level"]) for m in models] == [(t, lv) for t in ("colours", "bands") for lv in (1, 2, 3, 4)]
    for m in models:
        assert hashlib.sha256((out / m["file"]).read_bytes()).hexdigest() == m["sha256"]
        assert m["check_max_abs_diff"] < 1e-4
        assert m["preprocess"]["channels"] == 3 and m["preprocess"]["height"] == 16
    one = invoke(
        "export", "-c", checkpoint, "--task", "bands", "--budget", "1", "--no-check", "-o", tmp_path / "one", "--json"
    )
    assert one.exit_code == 0, one.output
    entry = json.loads(one.stdout)["models"]
    assert [(m["task"], m["level"], m["check_max_abs_diff"]) for m in entry] == [("bands", 1, None)]


def test_export_never_replaces_an_export_of_another_file_without_force(run_dir, tmp_path):
    _, checkpoint, _ = run_dir
    out = tmp_path / "export"
    assert invoke("export", "-c", checkpoint, "-o", out, "--task", "bands", "--budget", "1").exit_code == 0
    before = (out / "manifest.json").read_bytes()
    compact = tmp_path / "bands1.safetensors"
    assert invoke("prune-level", "-c", checkpoint, "--task", "bands", "--budget", "1", "-o", compact).exit_code == 0
    refused = invoke("export", "-c", compact, "-o", out)
    assert refused.exit_code == 1
    assert refused.stderr.startswith(f"error: {out} holds an export of another file ({checkpoint}, sha256 ")
    assert (out / "manifest.json").read_bytes() == before
    again = invoke("export", "-c", checkpoint, "-o", out, "--task", "colours", "--budget", "2")
    assert again.exit_code == 0  # the same source adds to its own export
    assert len(json.loads((out / "manifest.json").read_text())["models"]) == 2
    forced = invoke("export", "-c", compact, "-o", out, "--force", "--json")
    assert forced.exit_code == 0 and json.loads(forced.stdout)["source"]["format"] == "dvn-compact"


def test_export_to_a_folder_that_cannot_be_written(run_dir, tmp_path):
    _, checkpoint, _ = run_dir
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    result = invoke("export", "-c", checkpoint, "-o", blocker, "--task", "bands", "--budget", "1")
    assert result.exit_code == 1 and result.stderr.startswith(f"error: cannot write to {blocker}")
    assert blocker.read_text() == "not a folder"


def test_eval_of_a_bundle_equals_the_checkpoint_at_its_levels(run_dir, tmp_path):
    base, checkpoint, _ = run_dir
    bundle = tmp_path / "bundle.safetensors"
    assert invoke("plan", "-c", checkpoint, "--budget", "60%", "--bundle", bundle).exit_code == 0
    rows = json.loads(invoke("eval", "-c", bundle, "--json", "--data-root", base / "data").stdout)["rows"]
    assert {r["task"] for r in rows} == {"colours", "bands"}
    for split in ("test", "val"):
        got = json.loads(invoke("eval", "-c", bundle, "--json", "--split", split, "--data-root", base / "data").stdout)
        for row in got["rows"]:
            full = invoke(
                "eval",
                "-c",
                checkpoint,
                "--task",
                row["task"],
                "--budget",
                row["level"],
                "--json",
                "--split",
                split,
                "--data-root",
                base / "data",
            )
            assert json.loads(full.stdout)["rows"] == [row]
    refused = invoke("eval", "-c", bundle, "--budget", "2", "--data-root", base / "data")
    assert refused.exit_code == 1 and "holds fixed levels" in refused.stderr
    described = json.loads(invoke("info", "-c", bundle, "--json").stdout)  # info, export and prune-level read bundles
    assert described["format"] == "dvn-bundle" and described["choices"] == {r["task"]: r["level"] for r in rows}
    assert "unit orders" in invoke("info", "-c", bundle).stdout
    exported = json.loads(invoke("export", "-c", bundle, "-o", tmp_path / "export", "--json").stdout)
    assert [(m["task"], m["level"]) for m in exported["models"]] == [(r["task"], r["level"]) for r in rows]
    assert all(m["check_max_abs_diff"] < 1e-4 for m in exported["models"])
    level = rows[0]["level"]
    compact = tmp_path / "from-bundle.safetensors"
    pruned = invoke("prune-level", "-c", bundle, "--task", rows[0]["task"], "--budget", level, "-o", compact)
    assert pruned.exit_code == 0, pruned.output
    from_compact = json.loads(invoke("eval", "-c", compact, "--json", "--data-root", base / "data").stdout)["rows"]
    assert from_compact == [rows[0]]


def test_eval_of_a_lower_precision_shared_folder_reports_the_bytes_it_stores(run_dir, tmp_path):
    """eval -c FOLDER --json showed float32 bytes for an int8 folder: each row's bytes are what the folder stores for
    its (task, level), as a budget in bytes counts them; a checkpoint's stay float32."""
    from dvn_cli.modelfile.registry import open_model

    base, checkpoint, _ = run_dir
    folder = tmp_path / "int8"
    exported = invoke("export", "-c", checkpoint, "--shared", "--precision", "int8", "--no-check", "-o", folder)
    assert exported.exit_code == 0, exported.output
    stored = open_model(folder)
    rows = json.loads(invoke("eval", "-c", folder, "--json", "--data-root", base / "data").stdout)["rows"]
    assert [r["bytes"] for r in rows] == [stored.stored_bytes(r["task"], r["level"]) for r in rows]
    assert all(r["bytes"] < 4 * r["params_total"] / 2 for r in rows)  # int8 blocks: well under float32's bytes
    rows = json.loads(invoke("eval", "-c", checkpoint, "--json", "--data-root", base / "data").stdout)["rows"]
    assert [r["bytes"] for r in rows] == [4 * r["params_total"] for r in rows]
