"""Slow end-to-end runs on real MNIST + Fashion-MNIST subsets (CI prepares the data; these never skip there)."""

import json

import pytest
from typer.testing import CliRunner

from dvn_cli.cli.app import app

pytestmark = pytest.mark.slow
# The tests of the shared real run go to one worker, which trains it once (make test runs two pytest-xdist workers).
SHARES_REAL_RUN = pytest.mark.xdist_group("real_run")


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def real_run(real_data_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("real") / "run"
    result = invoke(
        "train", "--tasks", "mnist,fashion-mnist", "--data-root", real_data_root, "--limit", 4000,
        "--depth", 8, "--widths", "16,32,64", "--stem-stride", 2, "--epochs", 3, "--batch-size", 64,
        "--warmup-steps", 20, "--no-augment", "--out", out,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    return real_data_root, out


@SHARES_REAL_RUN
def test_train_then_eval_on_real_digits_and_clothes(real_run):
    root, out = real_run
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [1, 2, 3]
    result = invoke("eval", "-c", out / "model.safetensors", "--data-root", root, "--limit", 2000, "--json")
    assert result.exit_code == 0, result.output
    rows = {(r["task"], r["level"]): r for r in json.loads(result.stdout)["rows"]}
    assert len(rows) == 8 and all(r["samples"] == 2000 for r in rows.values())
    # far above chance (10 %) after 3 short epochs on 4,000 images per task; measured about 0.95 / 0.82 / 0.92
    assert rows["mnist", 4]["accuracy"] > 0.9
    assert rows["fashion-mnist", 4]["accuracy"] > 0.72
    assert rows["mnist", 1]["accuracy"] > 0.85
    assert rows["mnist", 1]["params"] < rows["mnist", 2]["params"] < rows["mnist", 4]["params"]


@SHARES_REAL_RUN
def test_prune_and_export_real_models(real_run, tmp_path):
    root, out = real_run
    checkpoint = out / "model.safetensors"
    compact = tmp_path / "fashion.safetensors"
    assert (
        invoke("prune-level", "-c", checkpoint, "--task", "fashion-mnist", "--budget", "50%", "-o", compact).exit_code
        == 0
    )
    full = json.loads(
        invoke(
            "eval",
            "-c",
            checkpoint,
            "--task",
            "fashion-mnist",
            "--budget",
            "50%",
            "--json",
            "--data-root",
            root,
            "--limit",
            1000,
        ).stdout
    )["rows"][0]
    small = json.loads(invoke("eval", "-c", compact, "--json", "--data-root", root, "--limit", 1000).stdout)["rows"][0]
    assert small == full
    exported = invoke("export", "-c", compact, "-o", tmp_path / "onnx", "--json")
    assert exported.exit_code == 0, exported.output
    model = json.loads(exported.stdout)["models"][0]
    assert model["classes"][:2] == ["T-shirt/top", "Trouser"] and model["check_max_abs_diff"] < 1e-4


def test_same_seed_gives_identical_weights_on_real_data(real_data_root, tmp_path):
    import torch

    from dvn_cli.modelfile.checkpoint import load_checkpoint

    common = [
        "--tasks",
        "mnist,fashion-mnist",
        "--data-root",
        real_data_root,
        "--limit",
        512,
        "--depth",
        8,
        "--widths",
        "8,16,32",
        "--stem-stride",
        2,
        "--batch-size",
        64,
        "--warmup-steps",
        4,
        "--val-fraction",  # validating 600 images, not 6,000, per task: most of the time, and no weight depends on it
        0.01,
    ]
    assert invoke("train", *common, "--epochs", 2, "--out", tmp_path / "a").exit_code == 0
    assert invoke("train", *common, "--epochs", 2, "--out", tmp_path / "b").exit_code == 0
    state_b = load_checkpoint(tmp_path / "b" / "model.safetensors").network.state_dict()
    state_a = load_checkpoint(tmp_path / "a" / "model.safetensors").network.state_dict()
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
