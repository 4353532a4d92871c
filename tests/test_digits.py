"""The UCI digits: prepared offline from scikit-learn's file, read as a registered dataset, split without overlap."""

import gzip
import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from dvn_cli.cli.app import app
from dvn_cli.data.datasets import load_task
from dvn_cli.data.digits import DIGITS_FILE, DIGITS_SHA256, DIGITS_TEST_FRACTION, load_digits, sklearn_digits_file
from dvn_cli.data.prepare import offline_data_status, prepare_digits, prepare_offline_data
from dvn_cli.data.registry import DATASETS
from dvn_cli.errors import MissingData

from .conftest import unavailable


@pytest.fixture(scope="module")
def digits_root(tmp_path_factory) -> Path:
    """A data root with the real digits file, copied from the installed scikit-learn (fails under CI without it)."""
    root = tmp_path_factory.mktemp("digits-root")
    row = prepare_digits(root)
    if row["status"] == "missing":
        unavailable(f"digits unavailable: {row['detail']}")
    assert row["status"] == "prepared"
    return root


def _fake_csv(path: Path, rows: int = 40) -> Path:
    rng = np.random.default_rng(0)
    table = np.concatenate([rng.integers(0, 17, (rows, 64)), (np.arange(rows) % 10)[:, None]], axis=1)
    with gzip.open(path, "wt") as f:
        np.savetxt(f, table, fmt="%d", delimiter=",")
    return path


def test_prepare_copies_the_file_checked_then_finds_it_ready(digits_root):
    raw = digits_root / "digits" / "raw"
    assert sorted(p.name for p in raw.iterdir()) == [DIGITS_FILE]  # no temporary file left
    assert hashlib.sha256((raw / DIGITS_FILE).read_bytes()).hexdigest() == DIGITS_SHA256[DIGITS_FILE]
    assert prepare_digits(digits_root)["status"] == "ready"
    assert offline_data_status(digits_root, datasets=("digits",))[0]["status"] == "ready"
    assert sklearn_digits_file() is not None


def test_prepare_refuses_another_file_and_says_what_to_install(tmp_path):
    fake = _fake_csv(tmp_path / DIGITS_FILE)
    row = prepare_digits(tmp_path / "root", source=fake)
    assert row["status"] == "missing" and "sha256" in row["detail"]
    assert not (tmp_path / "root" / "digits" / "raw" / DIGITS_FILE).exists()
    row = prepare_digits(tmp_path / "root", source=tmp_path / "absent.csv.gz")
    assert row["status"] == "missing" and "pip install scikit-learn" in row["detail"]
    assert prepare_offline_data(tmp_path / "r2", datasets=("digits",), verify=False)[0]["dataset"] == "digits"


def test_splits_are_stratified_disjoint_and_mnist_shaped(digits_root):
    train_x, train_y, classes = load_digits(digits_root, True, False)
    test_x, test_y, test_classes = load_digits(digits_root, False, False)
    assert classes == test_classes == tuple("0123456789")
    assert train_x.dtype == test_x.dtype == torch.uint8
    assert train_x.shape == (1438, 1, 28, 28) and test_x.shape == (359, 1, 28, 28)
    assert train_y.dtype == torch.int64 and set(train_y.tolist()) == set(test_y.tolist()) == set(range(10))
    counts = torch.bincount(torch.cat([train_y, test_y]), minlength=10)
    assert torch.equal(torch.bincount(test_y, minlength=10), (counts * DIGITS_TEST_FRACTION).round().long())
    train_keys = {bytes(x.numpy().tobytes()) for x in train_x}
    test_keys = {bytes(x.numpy().tobytes()) for x in test_x}
    assert len(train_keys) == 1438 and len(test_keys) == 359  # the 1,797 images are all different
    assert not train_keys & test_keys  # no image in both splits
    border = torch.ones(28, 28, dtype=torch.bool)
    border[4:24, 4:24] = False
    assert int(train_x[:, 0][:, border].max()) == 0 and int(train_x.max()) == 255  # a 20x20 digit centred in 28x28
    again = load_digits(digits_root, False, False)
    assert torch.equal(again[0], test_x) and torch.equal(again[1], test_y)  # a fixed split


def test_digits_is_a_registered_task(digits_root):
    info = DATASETS["digits"]
    assert (info.channels, info.size, info.augment) == (1, 28, "digits")
    task = load_task("digits", data_root=digits_root, channels=1, size=16, val_fraction=0.1, seed=3)
    assert len(task.train_labels) + len(task.val_labels) == 1438 and len(task.test_labels) == 359
    assert task.train_images.shape[1:] == (1, 16, 16) and task.spec.classes == tuple("0123456789")
    with pytest.raises(MissingData, match="dvn data prepare --datasets digits"):
        load_task("digits", data_root=digits_root / "elsewhere", channels=1, size=28)


def test_cli_prepares_digits(tmp_path):
    result = CliRunner().invoke(app, ["data", "prepare", "--datasets", "digits", "--data-root", str(tmp_path)])
    if sklearn_digits_file() is None and not os.environ.get("CI"):
        pytest.skip("scikit-learn is not installed")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "digits" / "raw" / DIGITS_FILE).is_file()
