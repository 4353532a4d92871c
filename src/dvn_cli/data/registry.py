"""The dataset registry: task names, the torchvision datasets and the UCI digits, and how a task string is parsed.

A task is a registered dataset (``mnist``, ``fashion-mnist``, ``kmnist``, ``cifar10``, ``cifar100``, ``svhn``,
``digits``) or ``name=path/to/folder`` (``data/folders.py``). ``register_dataset`` adds one (CONTRIBUTING.md).
"""

from __future__ import annotations

import contextlib
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..config import TaskSpec
from ..errors import BadConfig, MissingData, UnknownTask
from .batches import AUGMENT_POLICIES
from .digits import DIGITS_FOLDER, load_digits

__all__ = [
    "DATASETS",
    "TASK_NAME",
    "DatasetInfo",
    "load_registered",
    "parse_task",
    "register_dataset",
    "task_string",
    "unknown_task",
]

Loader = Callable[[Path, bool, bool], tuple[torch.Tensor, torch.Tensor, tuple[str, ...]]]


TASK_NAME = re.compile(r"^[^\W_][\w.-]{0,63}$")
"""Task names ``dvn train`` accepts: letters of any script, digits, ``.``, ``_``, ``-``; never a path."""


def parse_task(task: str) -> tuple[str, Path | None]:
    """Split a task string into its name and, for ``name=path/to/folder``, the folder.

    Args:
        task: a dataset name (``mnist``) or ``name=path/to/folder``.

    Returns:
        ``(name, folder)``; ``folder`` is None for a registered dataset name.
    """
    name, sep, folder = task.strip().partition("=")
    name = name.strip()
    if not name:
        raise BadConfig(f"task {task!r} has no name; write name=path/to/folder")
    if not TASK_NAME.match(name):
        raise BadConfig(
            f"task name {name!r} is not allowed: use 1 to 64 letters (any script), digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    if sep:
        if not folder.strip():
            raise BadConfig(f"task {task!r} has no folder; write {name}=path/to/folder")
        return name, Path(folder.strip()).expanduser()
    return name, None


def task_string(spec: TaskSpec) -> str:
    """The task string that loads ``spec``'s data again (for eval of a checkpoint's tasks)."""
    if spec.source in DATASETS and spec.source == spec.name:
        return spec.name
    return f"{spec.name}={spec.source}"


@dataclass(frozen=True)
class DatasetInfo:
    """A registered dataset.

    Args:
        name: the task name on the command line.
        load: ``load(root, train, download) -> (images uint8 (N, C, H, W), labels int64 (N,), class names)``.
        channels: native channel count.
        size: native image size.
        augment: default augmentation policy (see ``AUGMENT_POLICIES``).
        folder: where under the data root the files live (named in "not found" messages).
        hint: what to do when the files are missing.
    """

    name: str
    load: Loader
    channels: int
    size: int
    augment: str
    folder: str
    hint: str = "pass --download to fetch it"


DATASETS: dict[str, DatasetInfo] = {}


def register_dataset(
    name: str,
    load: Loader,
    *,
    channels: int,
    size: int,
    augment: str,
    folder: str,
    hint: str = "pass --download to fetch it",
) -> DatasetInfo:
    """Add a dataset to ``DATASETS``; a name can be registered only once."""
    if name in DATASETS:
        raise ValueError(f"dataset {name!r} is already registered")
    if "=" in name or "," in name:
        raise ValueError(f"dataset name {name!r} must not contain '=' or ','")
    if augment not in AUGMENT_POLICIES:
        raise ValueError(f"unknown augmentation policy {augment!r}; known: {', '.join(AUGMENT_POLICIES)}")
    info = DatasetInfo(name, load, channels, size, augment, folder, hint)
    DATASETS[name] = info
    return info


def _build_torchvision_loader(class_name: str, split_kw: str) -> Loader:
    """A loader reading a torchvision dataset's in-memory arrays (no per-sample ``__getitem__``)."""

    def load(root: Path, train: bool, download: bool) -> tuple[torch.Tensor, torch.Tensor, tuple[str, ...]]:
        import torchvision.datasets as tvd

        cls = getattr(tvd, class_name)
        split = {"train": train} if split_kw == "train" else {"split": "train" if train else "test"}
        # torchvision prints download progress to stdout; keep stdout clean for --json output.
        redirect = contextlib.redirect_stdout(sys.stderr) if download else contextlib.nullcontext()
        with redirect:
            ds = cls(str(root), download=download, **split)
        data = ds.data if isinstance(ds.data, torch.Tensor) else torch.from_numpy(np.asarray(ds.data))
        if data.ndim == 3:  # MNIST-likes: (N, H, W)
            data = data.unsqueeze(1)
        elif data.shape[-1] == 3:  # CIFAR: (N, H, W, 3)
            data = data.permute(0, 3, 1, 2)
        targets = getattr(ds, "targets", None)
        if targets is None:
            targets = ds.labels
        labels = torch.as_tensor(np.asarray(targets), dtype=torch.int64)
        classes = tuple(getattr(ds, "classes", None) or (str(i) for i in range(int(labels.max()) + 1)))
        return data.to(torch.uint8).contiguous(), labels, classes

    return load


_OFFLINE_HINT = "run 'dvn data prepare' (works offline) or pass --download"
_SVHN_HINT = "pass --download to fetch train_32x32.mat and test_32x32.mat"
for _name, _cls, _split, _channels, _size, _augment, _folder, _hint in (
    ("mnist", "MNIST", "train", 1, 28, "digits", "MNIST/raw", _OFFLINE_HINT),
    ("fashion-mnist", "FashionMNIST", "train", 1, 28, "clothes", "FashionMNIST/raw", _OFFLINE_HINT),
    ("kmnist", "KMNIST", "train", 1, 28, "digits", "KMNIST/raw", None),
    ("cifar10", "CIFAR10", "train", 3, 32, "natural", "cifar-10-batches-py", None),
    ("cifar100", "CIFAR100", "train", 3, 32, "natural", "cifar-100-python", None),
    ("svhn", "SVHN", "split", 3, 32, "digits", ".", _SVHN_HINT),
):
    register_dataset(
        _name,
        _build_torchvision_loader(_cls, _split),
        channels=_channels,
        size=_size,
        augment=_augment,
        folder=_folder,
        hint=_hint or "pass --download to fetch it",
    )


register_dataset(
    "digits",
    load_digits,
    channels=1,
    size=28,
    augment="digits",
    folder=DIGITS_FOLDER,
    hint="run 'dvn data prepare --datasets digits' (it copies the file scikit-learn ships: pip install scikit-learn)",
)


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())[:300]


def load_registered(info: DatasetInfo, root: Path, train: bool, download: bool):
    where = root / info.folder if info.folder != "." else root
    try:
        return info.load(root, train, download)
    except ImportError as e:
        raise MissingData(f"{info.name} needs the module {e.name!r} to read its files; pip install {e.name}") from e
    except (RuntimeError, OSError) as e:
        if download:
            raise MissingData(f"{info.name} could not be downloaded into {where}: {_one_line(e)}") from e
        raise MissingData(f"{info.name} not found in {where}; {info.hint}") from e


def unknown_task(name: str) -> UnknownTask:
    return UnknownTask(
        f"unknown task {name!r}; known datasets: {', '.join(sorted(DATASETS))}, "
        f"or name=path/to/folder for a folder of class sub-folders"
    )
