"""Folder tasks that stream from disk: images decoded on the fly in ``DataLoader`` worker processes.

A folder task above ``STREAM_ABOVE_BYTES`` at the model's input shape (or any folder task under
``--data-mode stream``) is never held in memory: it keeps its file names (one byte string each) and labels, and
worker processes read each batch with the same decoder as the in-memory path (``datasets.read_image``), augment
every image with ``torchvision.transforms.v2`` (random crop of the padded image, horizontal flip) and normalise
the batch (``datasets.normalize_batch``). Resident memory does not grow with the number of images.

Opening a streamed task reads every file once (in the workers): unreadable files are skipped and named, and
the per-channel pixel sums of the training images give the task's normalisation, so the splits and statistics
are exactly those of the in-memory path (``datasets.carve_folder``, ``datasets.stats_from_sums``).

Batch ``position`` of ``epoch`` is a pure function of ``(seed, task, epoch, position)``: which images (a seeded
permutation per epoch) and how each is augmented (a seeded draw per batch). Workers may finish in any order, and
there may be any number of them; the stream's state is ``(epoch, position)``, so ``--resume`` is bit-exact.
"""

from __future__ import annotations

import functools
import itertools
import os
from collections.abc import Generator, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..config import DATA_MODES, TaskSpec
from ..errors import BadConfig, MissingData
from ..fsutil import first_line
from .batches import AUGMENT_POLICIES, mixed_seed, normalize_batch, seeded_generator
from .datasets import TaskData, carve_validation, check_load_arguments, load_task
from .folders import carve_folder, folder_layout
from .pixels import image_mode, read_image, stats_from_sums
from .registry import parse_task
from .task import EpochStream, Task, check_batch_size, check_split

__all__ = [
    "STREAM_ABOVE_BYTES",
    "StreamBatches",
    "StreamFailed",
    "StreamedTask",
    "Task",
    "epoch_order",
    "excess_workers",
    "open_task",
    "worker_failure",
]

STREAM_ABOVE_BYTES = 256 * 2**20
"""A folder task streams (under ``--data-mode auto``) when its files at the input shape as uint8 would take more
than this: 256 MiB, e.g. 21,000 images at 3x64x64, 1,700 at 3x224x224. Smaller ones are read into memory,
which is faster (no decoding per epoch) and small enough not to matter."""

SCAN_CHUNK = 256  # files per work item of the opening scan


def excess_workers(workers: int) -> str | None:
    """A warning when ``workers`` decoding processes per streamed task outnumber this machine's CPU cores (beyond
    the default 2), else None.

    Warned, not refused: a config file may come from a larger machine, decoding also waits on storage, and the
    setting changes nothing but speed (``user_config.NOT_COMPARED``). But each worker is a process of its own, with its
    own memory, and past the cores they only take turns.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if workers <= max(cores, 2):
        return None
    return (
        f"--workers {workers} is more than the {cores} CPU cores here: each streamed task starts {workers} decoding "
        "processes, which only take turns"
    )


class StreamFailed(MissingData):
    """A streamed task can no longer give what it gave when opened: a file became unreadable, or a worker that
    decodes it failed or died. Training saves its progress on it, since the run continues once that is mended."""


def open_task(
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
    mode: str = "auto",
    workers: int = 2,
) -> Task:
    """A task in memory (``datasets.load_task``) or streamed from its folder, as ``mode`` and its size say.

    Args:
        task, data_root, channels, size, val_fraction, seed, limit, val_limit, download: as ``load_task``.
        mode: ``auto`` (folder tasks above ``STREAM_ABOVE_BYTES`` stream), ``memory`` or ``stream`` (every
            folder task streams; registered datasets are always in memory: their loaders hand over whole arrays).
        workers: worker processes that decode a streamed task (0: in this process).
    """
    if mode not in DATA_MODES:
        raise BadConfig(f"unknown data mode {mode!r}; use {', '.join(DATA_MODES)}")
    if workers < 0:
        raise BadConfig(f"workers {workers} must be 0 or more")
    check_load_arguments(channels, size, val_fraction, limit, val_limit)
    name, folder = parse_task(task)
    if folder is None or mode == "memory":
        return _in_memory(task, data_root, channels, size, val_fraction, seed, limit, val_limit, download)
    layout = folder_layout(name, folder)
    files = layout.files()
    if mode == "auto" and len(files) * channels * size * size <= STREAM_ABOVE_BYTES:
        return _in_memory(task, data_root, channels, size, val_fraction, seed, limit, val_limit, download)
    root, classes = folder.resolve(), layout.classes
    # (N,) bytes: no Python object per file is kept (a list of N objects would be copied into every worker)
    names = np.array([os.fsencode(f.relative_to(folder)) for f in files])
    numbers = {f: i for i, f in enumerate(files)}
    ok, sums, squares = _scan(root, names, channels, size, workers)
    parts = carve_folder(layout, lambda group: [numbers[f] if ok[numbers[f]] else None for f in group])
    train = np.asarray(parts.train[0], dtype=np.int64)
    own_val = parts.val is not None
    val_idx, train_idx = carve_validation(
        len(train), val_fraction=val_fraction, seed=seed, limit=limit, val_limit=val_limit, own_val=own_val
    )
    if parts.val is not None:  # the folder's own val/
        val = np.asarray(parts.val[0], dtype=np.int64)[:val_limit]
    else:
        assert val_idx is not None  # carve_validation holds images out unless the task has its own val split
        val = train[val_idx.numpy()]
    train = train[train_idx.numpy()]
    if len(train) == 0:
        raise MissingData(f"task {name!r} has no training images left after the validation split")
    labels = np.full(len(names), -1, dtype=np.int64)
    for items, split_labels in (parts.train, parts.test) + ((parts.val,) if parts.val is not None else ()):
        labels[np.asarray(items, dtype=np.int64)] = split_labels
    mean, std = stats_from_sums(sums[train].sum(0).tolist(), squares[train].sum(0).tolist(), len(train) * size * size)
    spec = TaskSpec(name=name, classes=classes, mean=mean, std=std, source=str(folder), resize="bilinear")
    return StreamedTask(
        spec=spec,
        root=root,
        names=names,
        labels=labels,
        train_index=train,
        val_index=val,
        test_index=np.asarray(parts.test[0], dtype=np.int64),
        channels=channels,
        size=size,
        augment="natural",
        skipped=parts.skipped,
        workers=workers,
    )


def _in_memory(task, data_root, channels, size, val_fraction, seed, limit, val_limit, download) -> TaskData:
    return load_task(
        task,
        data_root=data_root,
        channels=channels,
        size=size,
        val_fraction=val_fraction,
        seed=seed,
        limit=limit,
        val_limit=val_limit,
        download=download,
    )


# ----------------------------------------------------------------------------------------- the streamed task


@dataclass
class StreamedTask(Task):
    """One folder task read from disk batch by batch; answers what ``TaskData`` answers, without its images.

    Args:
        spec: name, classes, normalisation (of the training images), source and resize method.
        root: the task's folder.
        names: every file under ``root`` that was listed, as relative path bytes.
        labels: each file's class (-1 for unreadable files).
        train_index, val_index, test_index: positions in ``names`` of each split's files, in split order.
        channels, size: the model's input shape.
        augment: augmentation policy name (see ``AUGMENT_POLICIES``).
        skipped: the files PIL could not read when the task was opened (``summary`` counts them).
        workers: decoding worker processes (0: in this process).
    """

    spec: TaskSpec
    root: Path
    names: np.ndarray
    labels: np.ndarray
    train_index: np.ndarray
    val_index: np.ndarray
    test_index: np.ndarray
    channels: int
    size: int
    augment: str = "natural"
    skipped: tuple[str, ...] = ()
    workers: int = 2

    def index(self, name: str) -> np.ndarray:
        """Positions in ``names`` of split ``name``'s files."""
        return getattr(self, f"{check_split(name)}_index")

    def split_size(self, name: str) -> int:
        return len(self.index(name))

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.channels, self.size, self.size

    def batches(
        self, name: str, batch_size: int, start: int = 0, stop: int | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """uint8 ``(images, labels)`` batches of images ``[start, stop)`` of split ``name``, in order, decoded
        by the workers (as ``TaskData.batches``, without holding the split)."""
        check_batch_size(batch_size)
        dataset = _SplitImages(self, self.index(name)[start:stop], batch_size)
        for images, labels, unreadable in _guarded(_loader(dataset, range(len(dataset)), self.workers), self):
            _refuse_unreadable(unreadable, self)
            yield images, labels

    def train_batches(self, batch_size: int, *, seed: int, task_index: int) -> StreamBatches:
        """The task's seeded, resumable stream of training batches, decoded by the workers."""
        return StreamBatches(self, batch_size, seed=seed, task_index=task_index)

    def storage(self) -> dict[str, Any]:
        return {"storage": "stream", "workers": self.workers}

    def read(self, positions: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, str]:
        """Decode the files at ``positions``: uint8 ``(B, C, H, W)``, labels, and the first unreadable file's
        path ("" when all were read)."""
        mode = image_mode(self.channels)
        images = np.empty((len(positions), self.size, self.size, self.channels), dtype=np.uint8)
        for i, p in enumerate(positions.tolist()):
            path = self.root / os.fsdecode(self.names[p])
            array = read_image(path, mode, self.size)
            if array is None:
                empty = torch.empty(0, self.channels, self.size, self.size, dtype=torch.uint8)
                return empty, torch.empty(0, dtype=torch.int64), str(path)
            images[i] = array.reshape(self.size, self.size, self.channels)
        batch = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()  # (B, C, H, W)
        return batch, torch.from_numpy(self.labels[positions]), ""


class StreamBatches(EpochStream):
    """Infinite, seeded, resumable stream of augmented, normalised training batches of a streamed task.

    As ``TaskBatches`` (only full batches; a split smaller than ``batch_size`` is yielded whole), but each batch
    is decoded and augmented by a worker process, and batch ``position`` of ``epoch`` depends only on ``(seed,
    task_index, epoch, position)``. ``state_dict()`` is ``epoch``, ``position`` and ``num_images``.
    """

    def __init__(self, data: StreamedTask, batch_size: int, *, seed: int = 0, task_index: int = 0) -> None:
        super().__init__(data.spec, len(data.train_index), batch_size)
        self.data = data
        self.seed, self.task_index = seed, task_index
        self._batches: Generator[Any, None, None] | None = None

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        try:
            return self._next_batch()
        except RuntimeError as exc:  # a worker's death reported by DataLoader's SIGCHLD handler, mid-way
            failure = worker_failure(exc, self.data)
            if failure is None:
                raise
            raise failure from None

    def _next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.position >= self.batches_per_epoch:
            self.epoch, self.position = self.epoch + 1, 0
        if self._batches is None:
            dataset = _TrainBatches(self.data, self.batch_size, self.seed, self.task_index)
            per_epoch = self.batches_per_epoch  # work items (epoch, position) from where the stream stands, no end
            steps = itertools.count(self.epoch * per_epoch + self.position)
            keys = ((step // per_epoch, step % per_epoch) for step in steps)
            self._batches = _guarded(_loader(dataset, keys, self.data.workers), self.data)
        images, labels, unreadable = next(self._batches)
        _refuse_unreadable(unreadable, self.data)
        self.position += 1
        return images, labels

    def close(self) -> None:
        """Shut the decoding workers down (the stream starts them again where it stands when next asked)."""
        if self._batches is not None:
            self._batches.close()  # GeneratorExit in _guarded drops the loader's iterator: its workers end
            self._batches = None

    def state_dict(self) -> dict[str, Any]:
        """``epoch``, ``position`` and ``num_images`` (ints): all a resumed stream needs."""
        return {"epoch": self.epoch, "position": self.position, "num_images": self.num_images}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._check_state(state)
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._batches = None  # the workers start again at (epoch, position)


# ------------------------------------------------------------------------------------- what the workers run


@functools.lru_cache(maxsize=2)
def epoch_order(seed: int, task_index: int, epoch: int, n: int) -> torch.Tensor:
    """The order of a streamed task's ``n`` training images in ``epoch``: a permutation seeded by the arguments."""
    return torch.randperm(n, generator=seeded_generator(seed, task_index, epoch))


def _augmenter(policy: str, size: int):
    """``torchvision.transforms.v2`` for one uint8 image ``(C, H, W)`` under ``policy`` (None for ``none``)."""
    from torchvision.transforms import v2

    pad, flip = AUGMENT_POLICIES[policy]
    steps = [v2.RandomCrop(size, padding=pad)] if pad else []  # zero-pad, crop back: a shift by up to pad pixels
    steps += [v2.RandomHorizontalFlip()] if flip else []
    return v2.Compose(steps) if steps else None


class _TrainBatches(Dataset):
    """Work item ``(epoch, position)`` -> that training batch, augmented and normalised, + unreadable path."""

    def __init__(self, data: StreamedTask, batch_size: int, seed: int, task_index: int) -> None:
        self.data, self.batch_size, self.seed, self.task_index = data, batch_size, seed, task_index
        self.augment = _augmenter(data.augment, data.size)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, str]:
        epoch, position = key
        order = epoch_order(self.seed, self.task_index, epoch, len(self.data.train_index))
        chosen = order[position * self.batch_size : (position + 1) * self.batch_size].numpy()
        images, labels, unreadable = self.data.read(self.data.train_index[chosen])
        if self.augment is not None and not unreadable:
            # v2 draws from torch's global generator: seed it per batch, and leave the caller's as it was.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(mixed_seed(self.seed, self.task_index, epoch, position))
                images = torch.stack([self.augment(image) for image in images])
        return normalize_batch(images, self.data.spec), labels, unreadable


class _SplitImages(Dataset):
    """Work item ``i`` -> the ``i``-th batch of ``positions``, uint8, + unreadable path."""

    def __init__(self, data: StreamedTask, positions: np.ndarray, batch_size: int) -> None:
        self.data, self.positions, self.batch_size = data, positions, batch_size

    def __len__(self) -> int:
        return -(-len(self.positions) // self.batch_size)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, str]:
        return self.data.read(self.positions[i * self.batch_size : (i + 1) * self.batch_size])


class _ScanFiles(Dataset):
    """Work item ``i`` -> for ``SCAN_CHUNK`` files: readable?, per-channel pixel sums and sums of squares."""

    def __init__(self, root: Path, names: np.ndarray, channels: int, size: int) -> None:
        self.root, self.names, self.channels, self.size = root, names, channels, size

    def __len__(self) -> int:
        return -(-len(self.names) // SCAN_CHUNK)

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # as tensors in the loop
        names = self.names[i * SCAN_CHUNK : (i + 1) * SCAN_CHUNK]
        ok = np.zeros(len(names), dtype=bool)
        sums = np.zeros((len(names), self.channels), dtype=np.int64)
        squares = np.zeros((len(names), self.channels), dtype=np.int64)
        for j, name in enumerate(names):
            array = read_image(self.root / os.fsdecode(name), image_mode(self.channels), self.size)
            if array is not None:
                pixels = array.reshape(-1, self.channels).astype(np.int64)
                ok[j], sums[j], squares[j] = True, pixels.sum(0), (pixels * pixels).sum(0)
        return ok, sums, squares


def _scan(root: Path, names: np.ndarray, channels: int, size: int, workers: int):
    """Read every file once: ``(readable (N,), pixel sums (N, C), sums of squares (N, C))``."""
    ok = np.zeros(len(names), dtype=bool)
    sums = np.zeros((len(names), channels), dtype=np.int64)
    squares = np.zeros((len(names), channels), dtype=np.int64)
    dataset = _ScanFiles(root, names, channels, size)
    for i, (chunk_ok, chunk_sums, chunk_squares) in enumerate(_guarded(_loader(dataset, range(len(dataset)), workers))):
        part = slice(i * SCAN_CHUNK, i * SCAN_CHUNK + len(chunk_ok))
        ok[part], sums[part], squares[part] = chunk_ok.numpy(), chunk_sums.numpy(), chunk_squares.numpy()
    return ok, sums, squares


def _one_thread(worker_id: int) -> None:
    """Each worker computes with one thread: N workers and the training process share the cores."""
    del worker_id
    torch.set_num_threads(1)


class _Loader(DataLoader):
    """A ``DataLoader`` that leaves more workers than cores to dvn to say: PyTorch would say it in two multi-line
    warnings at every start of every loader, dvn says it once, in one line (``excess_workers``)."""

    def check_worker_number_rationality(self) -> None:
        pass


def _loader(dataset: Dataset, keys: Iterable[Any], workers: int) -> DataLoader:
    """Work items ``keys`` of ``dataset`` run by ``workers`` processes, results in the order of ``keys``.

    The loader draws its workers' base seed from a generator of its own, not from torch's global one: the
    training process's random state then does not depend on how often a stream was (re)started, so a resumed
    run's state equals an uninterrupted one's (the batches are seeded by their keys anyway)."""
    return _Loader(
        dataset,
        sampler=keys,
        batch_size=None,  # every work item is already a batch
        num_workers=workers,
        worker_init_fn=_one_thread if workers else None,
        prefetch_factor=2 if workers else None,
        generator=torch.Generator(),
    )


def _guarded(loader: DataLoader, data: StreamedTask | None = None) -> Generator[Any, None, None]:
    """``loader``'s items; a worker that fails or dies ends in ONE clear ``StreamFailed`` line, never a hang."""
    what = f"task {data.spec.name!r}" if data is not None else "a folder task"
    iterator = iter(loader)
    while True:
        try:
            item = next(iterator)
        except StopIteration:
            return
        except (ConnectionError, EOFError) as exc:  # a worker killed while its batch was in the pipe
            failure = StreamFailed(
                f"a data worker reading {what} died: its connection closed mid-batch ({first_line(exc)})"
            )
        except Exception as exc:
            lines = [line for line in str(exc).splitlines() if line.strip()]
            detail = lines[-1].strip() if lines else first_line(exc)
            failure = StreamFailed(f"a data worker reading {what} failed: {detail}")
        else:
            yield item
            continue
        # The last reference to the loader's iterator: its workers are shut down now, so DataLoader's SIGCHLD
        # handler no longer raises for them while the run saves its progress.
        del iterator
        raise failure


def worker_failure(exc: BaseException, data: StreamedTask | None = None) -> StreamFailed | None:
    """The one line for a worker's death that ``DataLoader`` reports outside ``next`` (its SIGCHLD handler raises
    ``RuntimeError`` wherever the main thread is), or None when ``exc`` is something else."""
    if isinstance(exc, RuntimeError) and str(exc).startswith("DataLoader worker"):
        what = f"reading task {data.spec.name!r} failed" if data is not None else "of a streamed task died"
        return StreamFailed(f"a data worker {what}: {first_line(exc)}")
    return None


def _refuse_unreadable(path: str, data: StreamedTask) -> None:
    if path:
        raise StreamFailed(
            f"{path} of task {data.spec.name!r} can no longer be read (it could when the task was opened); "
            "restore it, or remove it and start again"
        )
