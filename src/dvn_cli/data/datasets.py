"""Datasets as in-memory uint8 tensors, and fast whole-batch normalisation and augmentation.

Every task of a multi-task run is read ONCE into memory at the model's input shape (channels and size) as
uint8 tensors ``(N, C, H, W)``; batches are then augmented and normalised as whole tensors, so the training
loop never touches PIL or per-sample Python code (a 2-core CPU has none to spare). Tasks come from a registry
of torchvision datasets (``mnist``, ``fashion-mnist``, ``kmnist``, ``cifar10``, ``cifar100``, ``svhn``), the UCI
hand-written ``digits`` (``data/digits.py``), or
from ``name=path/to/folder``: a folder of class sub-folders of images (torchvision ``ImageFolder`` layout).
Each task keeps its own normalisation (per-channel mean/std of its training images) in its ``TaskSpec``.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..config import TaskSpec
from ..errors import BadConfig, MissingData, UnknownTask
from .digits import DIGITS_FOLDER, load_digits

__all__ = [
    "AUGMENT_POLICIES",
    "DATASETS",
    "DatasetInfo",
    "TaskBatches",
    "TaskData",
    "augment_batch",
    "channel_stats",
    "convert_images",
    "default_data_root",
    "iterate_split",
    "load_image",
    "load_task",
    "native_shape",
    "normalize_batch",
    "parse_task",
    "register_dataset",
    "task_string",
]

DATA_ROOT_ENV = "DVN_DATA_ROOT"
FOLDER_TEST_FRACTION = 0.2
FOLDER_TEST_SEED = 0  # fixed, independent of --seed, so every run of a folder task sees the same test split
FOLDER_SIZE_RANGE = (32, 64)
_LUMA = (0.299, 0.587, 0.114)  # ITU-R 601-2, the weights of PIL's convert("L")
_CHUNK = 4096  # images converted per float step, to bound memory

AUGMENT_POLICIES: dict[str, tuple[int, bool]] = {
    "none": (0, False),
    "digits": (2, False),  # random translation by up to 2 pixels, never flipped (a flipped 2 is no 2)
    "clothes": (2, True),  # translation by up to 2 pixels and mirroring: a mirrored shirt is still a shirt
    "natural": (4, True),  # pad 4 + random crop + horizontal flip, the CIFAR recipe
}
"""Augmentation policy name -> (padding of the random crop, horizontal flip)."""

Loader = Callable[[Path, bool, bool], tuple[torch.Tensor, torch.Tensor, tuple[str, ...]]]


# ---------------------------------------------------------------------------------------------------- helpers


TASK_NAME = re.compile(r"^[^\W_][\w.-]{0,63}$")
"""Task names ``dvn train`` accepts: letters of any script, digits, ``.``, ``_``, ``-``; never a path."""


def default_data_root() -> str:
    """The data root: ``$DVN_DATA_ROOT`` when set, else ``data``."""
    return os.environ.get(DATA_ROOT_ENV) or "data"


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


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Exact per-channel mean and std of uint8 images, on pixel values scaled to 0..1.

    Uses a 256-bin histogram per channel, so it needs no float copy of the images.

    Args:
        images: uint8 tensor ``(N, C, H, W)``.

    Returns:
        ``stats_from_sums`` of the images' pixel sums.
    """
    values = torch.arange(256, dtype=torch.int64)
    sums, squares = [], []
    for c in range(images.shape[1]):
        counts = torch.bincount(images[:, c].reshape(-1), minlength=256)
        sums.append(int((counts * values).sum()))
        squares.append(int((counts * values * values).sum()))
    return stats_from_sums(sums, squares, images[:, 0].numel())


def stats_from_sums(
    sums: Sequence[int], squares: Sequence[int], pixels: int
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std (pixel values scaled to 0..1) from exact integer sums of uint8 pixel values.

    The one formula of a task's normalisation, whether its images are in memory or streamed (then the sums are
    gathered image by image). Integer arithmetic until the last division, so both give the same numbers.

    Args:
        sums: per channel, the sum of the pixel values (0..255).
        squares: per channel, the sum of their squares.
        pixels: pixels per channel (images x height x width).

    Returns:
        ``(mean, std)`` rounded to 4 decimals; a constant channel gets std 1 (no scaling).
    """
    n = max(int(pixels), 1)
    means, stds = [], []
    for total, total_sq in zip(sums, squares, strict=True):
        mean = int(total) / (255 * n)
        std = ((int(total_sq) * n - int(total) ** 2) / (255 * n) ** 2) ** 0.5
        means.append(round(mean, 4))
        stds.append(round(std, 4) if std >= 1.0 / 255.0 else 1.0)
    return tuple(means), tuple(stds)


def convert_images(images: torch.Tensor, channels: int, size: int) -> tuple[torch.Tensor, str]:
    """Bring uint8 images to ``channels`` and ``size`` x ``size``.

    Grey to RGB repeats the channel; RGB to grey uses the luminance weights (0.299, 0.587, 0.114).
    Images smaller than ``size`` are zero-padded, centred (``pad``); others are resized bilinearly with
    antialiasing (``bilinear``; a no-op when the size already matches).

    Args:
        images: uint8 tensor ``(N, C, H, W)`` with C in {1, 3}.
        channels: target channel count, 1 or 3.
        size: target height and width.

    Returns:
        ``(images, resize)``: the converted uint8 tensor and the resize method used.
    """
    n, c, h, w = images.shape
    if channels not in (1, 3) or c not in (1, 3):
        raise BadConfig(f"cannot convert {c}-channel images to {channels} channels; use 1 or 3")
    if c == 1 and channels == 3:
        images = images.expand(n, 3, h, w).contiguous()
    elif c == 3 and channels == 1:
        weights = torch.tensor(_LUMA).view(1, 3, 1, 1)
        grey = torch.empty(n, 1, h, w, dtype=torch.uint8)
        for i in range(0, n, _CHUNK):
            chunk = images[i : i + _CHUNK].float()
            grey[i : i + _CHUNK] = (chunk * weights).sum(1, keepdim=True).round_().clamp_(0, 255).to(torch.uint8)
        images = grey
    if h <= size and w <= size and (h, w) != (size, size):
        top, left = (size - h) // 2, (size - w) // 2
        return F.pad(images, (left, size - w - left, top, size - h - top)), "pad"
    if (h, w) == (size, size):
        return images, "bilinear"
    out = torch.empty(n, channels, size, size, dtype=torch.uint8)
    for i in range(0, n, _CHUNK):
        chunk = images[i : i + _CHUNK].float()
        resized = F.interpolate(chunk, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        out[i : i + _CHUNK] = resized.round_().clamp_(0, 255).to(torch.uint8)
    return out, "bilinear"


def mixed_seed(*entropy: int) -> int:
    """One 63-bit seed from several integers, well mixed (numpy SeedSequence)."""
    state = np.random.SeedSequence([int(e) for e in entropy]).generate_state(1, np.uint64)[0]
    return int(state) & ((1 << 63) - 1)


def _seeded_generator(*entropy: int) -> torch.Generator:
    """A CPU generator seeded from several integers (``mixed_seed``)."""
    return torch.Generator().manual_seed(mixed_seed(*entropy))


# -------------------------------------------------------------------------------------- torchvision datasets


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


def _load_registered(info: DatasetInfo, root: Path, train: bool, download: bool):
    where = root / info.folder if info.folder != "." else root
    try:
        return info.load(root, train, download)
    except ImportError as e:
        raise MissingData(f"{info.name} needs the module {e.name!r} to read its files; pip install {e.name}") from e
    except (RuntimeError, OSError) as e:
        if download:
            raise MissingData(f"{info.name} could not be downloaded into {where}: {_one_line(e)}") from e
        raise MissingData(f"{info.name} not found in {where}; {info.hint}") from e


# ---------------------------------------------------------------------------------------------- image folders


def _class_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))


def read_image(path: Path | IO[bytes], mode: str, size: int | None) -> np.ndarray | None:
    """One image (a file, or an open binary stream) as a uint8 array ``(size, size[, 3])`` (its own size when
    ``size`` is None), or None when PIL cannot read it.

    The one decoder of folder images: training in memory, streaming workers, ``dvn eval``, ``dvn predict`` and
    ``dvn serve`` all read through it, so all see the same pixels. The resize is PIL's bilinear filter (what
    ``torchvision.transforms.v2.Resize`` runs on a PIL image), as the export manifest documents.
    """
    try:
        with Image.open(path) as im:
            if size is not None:
                im.draft(mode, (size, size))  # JPEG: decode at a reduced scale, much faster for big photos
            if im.mode == "P" and "transparency" in im.info:
                im = im.convert("RGBA")
            im = im.convert(mode)
            if size is not None and im.size != (size, size):
                im = im.resize((size, size), Image.Resampling.BILINEAR)
            return np.asarray(im, dtype=np.uint8)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None


def image_mode(channels: int) -> str:
    """The PIL mode folder images are read in for a model of ``channels`` input channels."""
    return "L" if channels == 1 else "RGB"


def load_image(path: Path | IO[bytes], channels: int, size: int, resize: str) -> torch.Tensor | None:
    """One image file (or binary stream) as a model input, uint8 ``(channels, size, size)``, converted as its
    task's training images were; None when PIL cannot read it.

    ``bilinear`` (folder tasks): read in the model's mode and resized by PIL, as folders are read for training.
    ``pad`` (datasets of small images): read at its own size, then ``convert_images`` (zero-padded, centred, when
    no larger than the input; else resized bilinearly).
    """
    array = read_image(path, image_mode(channels), size if resize == "bilinear" else None)
    if array is None:
        return None
    image = torch.from_numpy(array.copy())
    image = image.unsqueeze(0) if image.ndim == 2 else image.permute(2, 0, 1)
    return convert_images(image.unsqueeze(0).contiguous(), channels, size)[0][0]


def _stack(arrays: list[np.ndarray], labels: list[int], channels: int, size: int):
    if not arrays:
        return torch.empty(0, channels, size, size, dtype=torch.uint8), torch.empty(0, dtype=torch.int64)
    images = torch.from_numpy(np.stack(arrays))
    images = images.unsqueeze(1) if images.ndim == 3 else images.permute(0, 3, 1, 2)
    return images.contiguous(), torch.tensor(labels, dtype=torch.int64)


@dataclass
class _Splits:
    """Native-shape splits returned by the loaders, before the val carve and conversion."""

    train: tuple[torch.Tensor, torch.Tensor]
    test: tuple[torch.Tensor, torch.Tensor]
    val: tuple[torch.Tensor, torch.Tensor] | None
    classes: tuple[str, ...]
    skipped: int = 0


PerClass = dict[int, list[Path]]


@dataclass(frozen=True)
class FolderLayout:
    """The image files of a folder task by split and class (label -> files), before any file is read.

    ``val`` and ``test`` are None where the folder has no such sub-folder (``test`` is then carved).
    """

    train_root: Path
    classes: tuple[str, ...]
    train: PerClass
    val: PerClass | None
    test: PerClass | None

    def files(self) -> list[Path]:
        """Every file, train then val then test, class by class."""
        return [f for split in (self.train, self.val, self.test) if split for files in split.values() for f in files]


def folder_layout(name: str, folder: Path) -> FolderLayout:
    """List ``folder``: class sub-folders, or ``train/`` (+ ``test/``, ``val/``) of them; refuses bad layouts."""
    if not folder.is_dir():
        raise MissingData(f"folder {folder} for task {name!r} not found; pass {name}=path/to/an/existing/folder")
    has_splits = (folder / "train").is_dir()
    train_root = folder / "train" if has_splits else folder
    class_dirs = _class_dirs(train_root)
    if not class_dirs:
        raise MissingData(
            f"{train_root} has no class sub-folders; put each class's images in its own sub-folder "
            f"(e.g. {train_root / 'cat' / '1.png'})"
        )
    if len(class_dirs) < 2:
        raise BadConfig(
            f"{train_root} has only one class sub-folder ({class_dirs[0].name!r}); a task needs at least 2 classes"
        )
    classes = tuple(d.name for d in class_dirs)
    index = {c: i for i, c in enumerate(classes)}

    def list_split(root: Path) -> PerClass:
        found = _class_dirs(root)
        extra = sorted({d.name for d in found} - set(classes))
        if extra:
            raise BadConfig(f"{root} has classes not in {train_root}: {', '.join(extra)}")
        return {index[d.name]: _image_files(d) for d in found}

    train = list_split(train_root)
    val = test = None
    if has_splits:
        val_dir = next((folder / v for v in ("val", "valid", "validation") if (folder / v).is_dir()), None)
        val = list_split(val_dir) if val_dir is not None else None
        test = list_split(folder / "test") if (folder / "test").is_dir() else None
    return FolderLayout(train_root, classes, train, val, test)


Items = tuple[list[Any], list[int]]


@dataclass
class FolderSplits:
    """The readable items of a folder task's splits, each as ``(items, labels)`` in class order."""

    train: Items
    val: Items | None
    test: Items
    skipped: int


def carve_folder(layout: FolderLayout, read: Callable[[list[Path]], list[Any]]) -> FolderSplits:
    """Keep the readable files of every split and, without a ``test/`` folder, carve the test split.

    ``read(files)`` gives one item per file (an image, or where a streamed task keeps it), None where the file
    cannot be read; unreadable files are skipped and counted. Without ``test/``, a stratified 20% of each class
    becomes the test split (fixed seed, independent of ``--seed``). In memory or streamed, a folder task gets
    the same files in every split.
    """
    skipped = 0

    def keep(per_class: PerClass, *, require_all: bool) -> dict[int, list[Any]]:
        nonlocal skipped
        kept = {}
        for c, files in per_class.items():
            items = read(files)
            good = [item for item in items if item is not None]
            skipped += len(items) - len(good)
            if require_all and not good:
                folder = layout.train_root / layout.classes[c]
                raise MissingData(f"class folder {folder} has no readable images; add images or remove the folder")
            kept[c] = good
        return kept

    def flatten(per_class: dict[int, list[Any]]) -> Items:
        order = sorted(per_class)
        return [a for c in order for a in per_class[c]], [c for c in order for _ in per_class[c]]

    train_pc = keep(layout.train, require_all=True)
    val = flatten(keep(layout.val, require_all=False)) if layout.val is not None else None
    if layout.test is not None:
        test = flatten(keep(layout.test, require_all=False))
        return FolderSplits(flatten(train_pc), val, test, skipped)
    generator = torch.Generator().manual_seed(FOLDER_TEST_SEED)
    test_pc: dict[int, list[Any]] = {}
    for c, items in train_pc.items():
        n = len(items)
        n_test = min(n - 1, max(1, round(n * FOLDER_TEST_FRACTION))) if n >= 2 else 0
        perm = torch.randperm(n, generator=generator).tolist()
        test_pc[c] = [items[i] for i in sorted(perm[:n_test])]
        train_pc[c] = [items[i] for i in sorted(perm[n_test:])]
    return FolderSplits(flatten(train_pc), val, flatten(test_pc), skipped)


def _load_folder(name: str, folder: Path, channels: int, size: int) -> _Splits:
    """Read a folder task into memory at the input shape (``folder_layout``, ``carve_folder``)."""
    layout = folder_layout(name, folder)
    mode = image_mode(channels)
    parts = carve_folder(layout, lambda files: [read_image(f, mode, size) for f in files])
    val = _stack(*parts.val, channels, size) if parts.val is not None else None
    train, test = _stack(*parts.train, channels, size), _stack(*parts.test, channels, size)
    return _Splits(train, test, val, layout.classes, parts.skipped)


def _first_image_size(folder: Path) -> int | None:
    for path in _image_files(folder):
        try:
            with Image.open(path) as im:
                return min(im.size)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
            continue
    return None


def native_shape(task: str, data_root: str | os.PathLike[str] | None = None) -> tuple[int, int]:
    """The ``(channels, size)`` a task's images have natively, for choosing a default input shape.

    Registered datasets give their own shape (mnist-likes ``(1, 28)``, cifar/svhn ``(3, 32)``). A folder gives
    3 channels and the shorter side of its first readable image, clipped to 32..64 (32 when it has none).

    Args:
        task: a dataset name or ``name=path/to/folder``.
        data_root: unused for folders; kept so callers treat every task alike.
    """
    name, folder = parse_task(task)
    if folder is None:
        if name not in DATASETS:
            raise _unknown_task(name)
        info = DATASETS[name]
        return info.channels, info.size
    if not folder.is_dir():
        raise MissingData(f"folder {folder} for task {name!r} not found; pass {name}=path/to/an/existing/folder")
    low, high = FOLDER_SIZE_RANGE
    size = _first_image_size(folder)
    return 3, low if size is None else min(max(size, low), high)


def _unknown_task(name: str) -> UnknownTask:
    return UnknownTask(
        f"unknown task {name!r}; known datasets: {', '.join(sorted(DATASETS))}, "
        f"or name=path/to/folder for a folder of class sub-folders"
    )


# ------------------------------------------------------------------------------------------------- task data


@dataclass
class TaskData:
    """One task's images in memory at the model's input shape.

    Args:
        spec: name, classes, normalisation, source and resize method of the task.
        train_images: uint8 ``(N, C, H, W)``.
        train_labels: int64 ``(N,)``.
        val_images: uint8, carved from the training split (or the folder's ``val/``).
        val_labels: int64.
        test_images: uint8, the dataset's own test split (a fixed 20% carve for a plain folder).
        test_labels: int64.
        augment: augmentation policy name (see ``AUGMENT_POLICIES``).
        skipped: files of a folder task that PIL could not read.
    """

    spec: TaskSpec
    train_images: torch.Tensor
    train_labels: torch.Tensor
    val_images: torch.Tensor
    val_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    augment: str = "none"
    skipped: int = 0

    def split(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(images, labels)`` of ``train``, ``val`` or ``test``."""
        if name not in ("train", "val", "test"):
            raise BadConfig(f"unknown split {name!r}; use train, val or test")
        return getattr(self, f"{name}_images"), getattr(self, f"{name}_labels")

    def split_size(self, name: str) -> int:
        """Images in split ``name``."""
        return len(self.split(name)[1])

    def batches(
        self, name: str, batch_size: int, start: int = 0, stop: int | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """uint8 ``(images, labels)`` batches of images ``[start, stop)`` of split ``name``, in order (for
        evaluation; a streamed task answers the same, reading from disk)."""
        if batch_size < 1:
            raise BadConfig(f"batch size {batch_size} must be at least 1")
        images, labels = self.split(name)
        images, labels = images[start:stop], labels[start:stop]
        for i in range(0, len(labels), batch_size):
            yield images[i : i + batch_size], labels[i : i + batch_size]

    def train_batches(self, batch_size: int, *, seed: int, task_index: int) -> TaskBatches:
        """The task's seeded, resumable stream of training batches."""
        return TaskBatches(self, batch_size, seed=seed, task_index=task_index)

    def summary(self) -> dict[str, Any]:
        """A row for tables and JSON: sizes of the splits, classes, shape, normalisation."""
        return {
            "task": self.spec.name,
            "source": self.spec.source,
            "classes": self.spec.num_classes,
            "train": len(self.train_labels),
            "val": len(self.val_labels),
            "test": len(self.test_labels),
            "shape": list(self.train_images.shape[1:]),
            "resize": self.spec.resize,
            "mean": list(self.spec.mean),
            "std": list(self.spec.std),
            "augment": self.augment,
            "skipped": self.skipped,
            "storage": "memory",
        }


def check_load_arguments(
    channels: int, size: int, val_fraction: float, limit: int | None, val_limit: int | None
) -> None:
    """Refuse load settings no task can be read with (``load_task`` and streamed tasks alike)."""
    if not 0.0 <= val_fraction < 1.0:
        raise BadConfig(f"val fraction {val_fraction} must be in [0, 1)")
    for label, value in (("limit", limit), ("val limit", val_limit)):
        if value is not None and value < 1:
            raise BadConfig(f"{label} {value} must be at least 1")
    if channels not in (1, 3):
        raise BadConfig(f"input channels {channels} not supported; use 1 or 3")
    if size < 1:
        raise BadConfig(f"input size {size} must be positive")


def carve_validation(
    n: int, *, val_fraction: float, seed: int, limit: int | None, val_limit: int | None, own_val: bool
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Which of ``n`` training images become validation images and which stay for training (sorted indices).

    A seeded random ``val_fraction`` is held out unless the task has its own validation split (``own_val``;
    then the first index is None); ``limit`` keeps the first ``limit`` of the rest in the same seeded
    permutation, ``val_limit`` the first of the held-out ones.
    """
    perm = torch.randperm(n, generator=_seeded_generator(seed, 0x5EED))
    val_idx = None
    if not own_val:
        n_val = round(n * val_fraction)
        if val_fraction > 0 and n >= 2:
            n_val = min(max(n_val, 1), n - 1)
        val_idx = perm[:n_val][:val_limit].sort().values
        perm = perm[n_val:]
    return val_idx, perm[:limit].sort().values


def load_task(
    task: str,
    *,
    data_root: str | os.PathLike[str] | None = None,
    channels: int,
    size: int,
    val_fraction: float = 0.1,
    seed: int = 0,
    limit: int | None = None,
    val_limit: int | None = None,
    download: bool = False,
) -> TaskData:
    """Load one task into memory at the input shape ``(channels, size, size)``.

    The validation split is a seeded random ``val_fraction`` of the training split (unless a folder has its
    own ``val/``); ``limit`` then keeps the first ``limit`` training images of a seeded permutation. The test
    split is never limited. Normalisation statistics come from the (limited) training images after conversion.

    Args:
        task: a registered dataset name or ``name=path/to/folder``.
        data_root: where torchvision datasets live; default ``$DVN_DATA_ROOT`` or ``data``.
        channels: model input channels (1 or 3).
        size: model input height and width.
        val_fraction: share of the training split held out for validation, in [0, 1).
        seed: seed of the validation carve and of ``limit``'s choice.
        limit: at most this many training images.
        val_limit: at most this many validation images (first of the carve), for quick runs.
        download: let torchvision download missing files.

    Returns:
        The task's ``TaskData``.
    """
    check_load_arguments(channels, size, val_fraction, limit, val_limit)
    name, folder = parse_task(task)
    root = Path(data_root if data_root is not None else default_data_root()).expanduser()
    if folder is None:
        if name not in DATASETS:
            raise _unknown_task(name)
        info = DATASETS[name]
        train_x, train_y, classes = _load_registered(info, root, True, download)
        test_x, test_y, _ = _load_registered(info, root, False, download)
        splits = _Splits((train_x, train_y), (test_x, test_y), None, classes)
        source, augment = name, info.augment
    else:
        splits = _load_folder(name, folder, channels, size)
        source, augment = str(folder), "natural"

    train_x, train_y = splits.train
    own_val = splits.val is not None
    val_idx, train_idx = carve_validation(
        len(train_y), val_fraction=val_fraction, seed=seed, limit=limit, val_limit=val_limit, own_val=own_val
    )
    if val_idx is not None:
        val_x, val_y = train_x[val_idx], train_y[val_idx]
    else:  # the folder's own val/
        val_x, val_y = splits.val[0][:val_limit], splits.val[1][:val_limit]
    train_x, train_y = train_x[train_idx], train_y[train_idx]
    if len(train_y) == 0:
        raise MissingData(f"task {name!r} has no training images left after the validation split")

    train_x, resize = convert_images(train_x, channels, size)
    val_x, _ = convert_images(val_x, channels, size)
    test_x, _ = convert_images(splits.test[0], channels, size)
    if folder is not None:
        resize = "bilinear"  # PIL resized every image, whatever its size
    mean, std = channel_stats(train_x)
    spec = TaskSpec(name=name, classes=splits.classes, mean=mean, std=std, source=source, resize=resize)
    test_y = splits.test[1].to(torch.int64)
    return TaskData(spec, train_x, train_y, val_x, val_y, test_x, test_y, augment=augment, skipped=splits.skipped)


# ------------------------------------------------------------------------------------------------ batches


def normalize_batch(images: torch.Tensor, spec: TaskSpec) -> torch.Tensor:
    """uint8 images ``(B, C, H, W)`` -> float32 ``(x / 255 - mean) / std`` with the task's statistics."""
    c = images.shape[1]
    mean = torch.tensor(spec.mean, dtype=torch.float32)
    std = torch.tensor(spec.std, dtype=torch.float32)
    if len(mean) == 1 and c > 1:
        mean, std = mean.expand(c), std.expand(c)
    if len(mean) != c or len(std) != c:
        raise BadConfig(f"task {spec.name!r} has statistics for {len(spec.mean)} channels, images have {c}")
    scale = (1.0 / (255.0 * std)).view(1, c, 1, 1)
    shift = (-mean / std).view(1, c, 1, 1)
    return images.to(torch.float32, copy=True).mul_(scale).add_(shift)


def augment_batch(images: torch.Tensor, policy: str, generator: torch.Generator | None = None) -> torch.Tensor:
    """Augment a whole uint8 batch at once: zero-pad, random crop back to size, optional horizontal flip.

    Each sample gets its own offsets (and flip), drawn from ``generator``; one gather applies them all.

    Args:
        images: uint8 ``(B, C, H, W)``.
        policy: ``none``, ``digits`` (pad 2 + random crop) or ``natural`` (pad 4 + random crop + flip).
        generator: CPU generator of the random draws.

    Returns:
        uint8 ``(B, C, H, W)``; ``images`` itself for ``none``.
    """
    if policy not in AUGMENT_POLICIES:
        raise BadConfig(f"unknown augmentation policy {policy!r}; known: {', '.join(AUGMENT_POLICIES)}")
    pad, flip = AUGMENT_POLICIES[policy]
    b, c, h, w = images.shape
    if b == 0 or (pad == 0 and not flip):
        return images
    padded = F.pad(images, (pad, pad, pad, pad))  # (B, C, H+2p, W+2p)
    dy = torch.randint(0, 2 * pad + 1, (b, 1), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (b, 1), generator=generator)
    rows = dy + torch.arange(h)  # (B, H)
    cols = dx + torch.arange(w)  # (B, W)
    if flip:
        flipped = torch.rand(b, 1, generator=generator) < 0.5
        cols = torch.where(flipped, cols.flip(1), cols)
    padded = padded.gather(2, rows.view(b, 1, h, 1).expand(b, c, h, w + 2 * pad))  # (B, C, H, W+2p)
    return padded.gather(3, cols.view(b, 1, 1, w).expand(b, c, h, w))  # (B, C, H, W)


def iterate_split(
    images: torch.Tensor, labels: torch.Tensor, spec: TaskSpec, batch_size: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Normalised ``(x, y)`` batches of a split in order, without augmentation (for evaluation)."""
    if batch_size < 1:
        raise BadConfig(f"batch size {batch_size} must be at least 1")
    for i in range(0, len(labels), batch_size):
        yield normalize_batch(images[i : i + batch_size], spec), labels[i : i + batch_size]


class TaskBatches:
    """Infinite, seeded, resumable stream of augmented, normalised training batches of one task.

    Every epoch is a fresh permutation of the training split drawn from the stream's own generator, seeded
    from ``(seed, task_index)``; the same generator draws the augmentation. Only full batches are yielded
    (a split smaller than ``batch_size`` is yielded whole). ``state_dict()`` captures everything needed to
    continue with exactly the same batches.

    Args:
        data: the task's data.
        batch_size: images per batch.
        seed: run seed.
        task_index: position of the task in the run, so tasks get independent streams.
        augment: apply the task's augmentation policy (``data.augment``); False gives ``none``.
    """

    def __init__(
        self, data: TaskData, batch_size: int, *, seed: int = 0, task_index: int = 0, augment: bool = True
    ) -> None:
        if batch_size < 1:
            raise BadConfig(f"batch size {batch_size} must be at least 1")
        self.data = data
        self.num_images = len(data.train_labels)
        if self.num_images == 0:
            raise MissingData(f"task {data.spec.name!r} has no training images")
        self.batch_size = min(batch_size, self.num_images)
        self.batches_per_epoch = self.num_images // self.batch_size
        self.policy = data.augment if augment else "none"
        self.generator = _seeded_generator(seed, task_index)
        self.epoch = 0
        self.position = 0
        self._start_epoch()

    def _start_epoch(self) -> None:
        self._epoch_state = self.generator.get_state()
        self._perm = torch.randperm(self.num_images, generator=self.generator)

    def __iter__(self) -> TaskBatches:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.position >= self.batches_per_epoch:
            self.epoch += 1
            self.position = 0
            self._start_epoch()
        start = self.position * self.batch_size
        idx = self._perm[start : start + self.batch_size]
        self.position += 1
        images = augment_batch(self.data.train_images[idx], self.policy, self.generator)
        return normalize_batch(images, self.data.spec), self.data.train_labels[idx]

    def state_dict(self) -> dict[str, Any]:
        """Generator states (uint8 tensors) and ``epoch``, ``position``, ``num_images`` (ints)."""
        return {
            "epoch_generator_state": self._epoch_state.clone(),
            "generator_state": self.generator.get_state(),
            "epoch": self.epoch,
            "position": self.position,
            "num_images": self.num_images,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state_dict()`` output; ints may also come as 0-d tensors (safetensors)."""
        num_images = int(state["num_images"])
        if num_images != self.num_images:
            raise BadConfig(
                f"task {self.data.spec.name!r} has {self.num_images} training images, the saved state "
                f"{num_images}; resume with the same data, --limit and --seed"
            )
        self.generator.set_state(state["epoch_generator_state"].to(torch.uint8).cpu())
        self._start_epoch()
        self.generator.set_state(state["generator_state"].to(torch.uint8).cpu())
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
