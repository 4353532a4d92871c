"""The ``ModelFile`` interface every dvn model file answers, and the unit sources that shared runtimes read.

A checkpoint (``dvn-checkpoint``: every task at every level), a compact model (``dvn-compact``: one (task, level)
as a plain network) and a bundle (``dvn-bundle``: one level per task, shared unit blocks stored once) answer the
same questions: which (task, level)s they hold, the plain network, spec and cost of one of them, how the
training run split its data, and what the run reported. Commands ask these questions and never ask which kind
of file they hold. ``modelfile.registry.open_model`` reads any of them; which level a budget picks is planning's
(``planning.select``) and how a kind runs is deployment's (``runtime.runner``).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from ..errors import BadConfig, UnknownTask, WrongFileFormat
from ..fsutil import first_line, sha256_file
from .container import check_finite
from .spec import CompactSpec, DataSplit

if TYPE_CHECKING:
    from ..config import TaskSpec
    from ..core.cost import LevelCost
    from ..core.network import DeepVirtualNetwork
    from ..core.plain import PlainNetwork
    from ..core.units import BlockGrid

__all__ = [
    "BlockKey",
    "FileTensors",
    "ModelFile",
    "TensorReader",
    "UnitParts",
    "UnitSource",
]


class ModelFile(ABC):
    """What every dvn model file answers. Tasks are names; levels are ``1..k``."""

    format: ClassVar[str]  # the format name in the file's metadata
    kind: ClassVar[str]  # what messages call it: "checkpoint", "compact model", "bundle"
    holds_unit_blocks: ClassVar[bool] = False  # shared unit blocks (runtime, prune-level), not plain networks
    path: Path | None
    _sha256: str | None = None  # the file's sha256, computed on first use

    if TYPE_CHECKING:  # each kind holds these as attributes or derives them in properties: read-only here

        @property
        def split(self) -> DataSplit:
            """The training run's validation split settings."""

        @property
        def training(self) -> dict[str, Any]:
            """The training run's summary (empty when the file does not carry it)."""

    @abstractmethod
    def pairs(self) -> list[tuple[str, int]]:
        """Every (task, level) the file holds, in task order, levels ascending."""

    @abstractmethod
    def task_spec(self, task: str) -> TaskSpec:
        """Classes, normalisation and resize of a task the file holds."""

    @abstractmethod
    def spec_of(self, task: str, level: int) -> CompactSpec:
        """Plain backbone, task, units and cost of one (task, level): what a compact model of it records."""

    @abstractmethod
    def plain_of(self, task: str, level: int) -> PlainNetwork:
        """One (task, level) as an ordinary network in eval mode."""

    @abstractmethod
    def describe(self) -> dict[str, Any]:
        """What ``dvn info`` shows, as plain data."""

    def unit_source(self) -> UnitSource:
        """Where a shared runtime reads the unit-pair blocks, batch norms and heads of this file's (task, level)s.

        A file that was written is read again lazily, block by block, so the source keeps none of this object's
        tensors; one that never was is read from memory. Kinds that hold no unit blocks refuse.
        """
        raise BadConfig(
            f"{self.label} is a {self.kind}: it holds plain networks, not shared unit blocks; "
            "use a checkpoint or a bundle"
        )

    # ------------------------------------------------------------------ shared behaviour

    @property
    def label(self) -> str:
        """How messages name this file."""
        return str(self.path) if self.path is not None else f"this {self.kind}"

    @property
    def file_sha256(self) -> str:
        """sha256 of the file's bytes ("" for a model that was never written)."""
        if self.path is None or not self.path.is_file():
            return ""
        if self._sha256 is None:
            self._sha256 = sha256_file(self.path)
        return self._sha256

    def task_names(self) -> list[str]:
        return list(dict.fromkeys(task for task, _ in self.pairs()))

    def levels(self, task: str) -> list[int]:
        """Levels of ``task`` the file holds."""
        self.check_task(task)
        return [level for name, level in self.pairs() if name == task]

    def cost_of(self, task: str, level: int) -> LevelCost:
        return self.spec_of(task, level).cost

    def stored_bytes(self, task: str, level: int) -> int:
        """Bytes the file stores for (task, level) alone, what a budget in bytes compares: its float32 cost, but
        for a shared export at fp16 or int8, which stores its blocks in fewer."""
        return self.cost_of(task, level).bytes

    def check_task(self, task: str) -> None:
        if task not in self.task_names():
            raise UnknownTask(f"unknown task {task!r}; {self.label} has: {', '.join(self.task_names())}")

    def check_pair(self, task: str, level: int, verb: str = "use") -> None:
        """Refuse a (task, level) the file does not hold, saying what it holds."""
        if (task, level) not in self.pairs():
            held = ", ".join(f"{name} level {lv}" for name, lv in self.pairs())
            raise UnknownTask(f"{self.label} holds only {held}; {verb} the full checkpoint for other levels")


BlockKey = tuple[str, int, "int | None"]
"""One unit-pair block of the physical network: (convolution name under ``features``, u_out, u_in); ``u_in`` is
None for a convolution whose input is not split (the stem: a row block)."""


@dataclass
class UnitParts:
    """What a set of (task, level)s needs to run from one store of unit-pair blocks.

    Args:
        blocks: the requested unit-pair blocks, each a contiguous tensor of its own.
        private: (task index, level) -> its batch norms and head under the plain network's names
            (``features.<norm>.{weight,bias,running_mean,running_var}``, ``head.{weight,bias}``).
    """

    blocks: dict[BlockKey, torch.Tensor] = field(default_factory=dict)
    private: dict[tuple[int, int], dict[str, torch.Tensor]] = field(default_factory=dict)


class TensorReader:
    """Reads named tensors, or blocks of them, from a dict in memory or lazily from a safetensors file.

    A file is opened for each read and closed after it, so nothing of it stays mapped; a file that changed since
    the reader was made is refused (its blocks would not match the ones already held).
    """

    def __init__(self, label: str, path: Path | None = None, tensors: Mapping[str, torch.Tensor] | None = None):
        self.label, self.path, self.tensors = label, path, tensors
        self._stamp = self._file_stamp(path) if path is not None else None

    def _file_stamp(self, path: Path) -> tuple[int, int, int]:
        try:
            st = path.stat()
        except OSError as exc:
            raise WrongFileFormat(f"{self.label} cannot be read any more ({exc.strerror})") from None
        return st.st_ino, st.st_size, st.st_mtime_ns

    def _copy(self, name: str, tensor: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
        """``tensor`` as a tensor of its own, or copied into ``out`` (same shape)."""
        if out is None:
            return tensor.detach().clone(memory_format=torch.contiguous_format)
        if tensor.shape != out.shape:
            raise WrongFileFormat(
                f"{self.label} does not match its own metadata ({name}: a block of shape {tuple(tensor.shape)}, "
                f"expected {tuple(out.shape)})"
            )
        return out.copy_(tensor)

    @contextmanager
    def open(self) -> Iterator[Callable[..., torch.Tensor]]:
        """``read(name, index=None, out=None)``: the tensor ``name`` (or ``name[index]``) as a new contiguous
        tensor, or copied into ``out``. Nothing returned refers to the file (a tensor from safetensors may be a
        view of the mapped file: one held would keep the whole file resident)."""
        if self.path is None:
            tensors = self.tensors
            assert tensors is not None  # a reader is made with a path or with the tensors

            def read_memory(name: str, index: tuple[slice, ...] | None = None, out=None) -> torch.Tensor:
                tensor = tensors[name]
                return self._copy(name, tensor if index is None else tensor[index], out)

            try:
                yield read_memory
            except KeyError as exc:
                raise WrongFileFormat(f"{self.label} has no tensor {exc}") from None
            return
        if self._file_stamp(self.path) != self._stamp:
            raise WrongFileFormat(f"{self.label} changed since it was opened; open it again")
        from safetensors import safe_open

        try:
            handle = safe_open(str(self.path), framework="pt")
        except Exception as exc:  # safetensors raises several types for broken files
            raise WrongFileFormat(f"{self.label} cannot be read ({first_line(exc)})") from None

        def read_file(name: str, index: tuple[slice, ...] | None = None, out=None) -> torch.Tensor:
            try:
                tensor = handle.get_tensor(name) if index is None else handle.get_slice(name)[index]
            except Exception as exc:
                raise WrongFileFormat(f"{self.label} is damaged: {name} cannot be read ({first_line(exc)})") from None
            check_finite(self.label, name, tensor)
            return self._copy(name, tensor, out)

        with handle:
            yield read_file


class FileTensors(Mapping[str, torch.Tensor]):
    """The tensors of a safetensors file by name, each read from the file when asked for and not kept.

    A model file that runs through a shared runtime (which reads the blocks it needs itself) or only describes
    itself then holds none of its tensors: no second copy of a block (issue 20). Names and shapes come from the
    header; a file changed since it was opened is refused (``TensorReader``).
    """

    def __init__(self, reader: TensorReader, shapes: Mapping[str, tuple[int, ...]]) -> None:
        self.reader, self.shapes = reader, dict(shapes)

    @classmethod
    def open(cls, path: Path) -> FileTensors:
        """The tensors of the safetensors file ``path``; only its header is read now."""
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                shapes = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
        except Exception as exc:  # safetensors raises its own type for broken files
            raise WrongFileFormat(f"{path} is damaged: its tensors cannot be read ({first_line(exc)})") from None
        return cls(TensorReader(str(path), path=path), shapes)

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.shapes:
            raise KeyError(name)
        with self.reader.open() as read:
            return read(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)

    def numel(self, name: str) -> int:
        """Elements of tensor ``name``, from the header (nothing read)."""
        return math.prod(self.shapes[name])

    def check_all(self) -> None:
        """Read every tensor once, one at a time and none kept, refusing a damaged or non-finite one."""
        with self.reader.open() as read:
            for name in self.shapes:
                read(name)


class UnitSource(ABC):
    """Where a shared runtime (``runtime.shared.SharedRuntime``) reads the parts of (task, level)s, on demand.

    Args:
        network: the network's SHAPE on the meta device (no weights): task names and indices, orders, block grids
            of its ``UnitConv2d`` layers, batch-norm layers; plans and budgets are computed on it.
        reader: where the tensors are.
        label: how messages name the source.
        training: the training summary (validation accuracy for plans); empty when the file has none.
        fixed: task name -> the only level the source holds (a bundle); None when it holds every level.
    """

    def __init__(
        self,
        network: DeepVirtualNetwork,
        reader: TensorReader,
        label: str,
        training: Mapping[str, Any] | None = None,
        fixed: Mapping[str, int] | None = None,
    ) -> None:
        self.network, self.reader, self.label = network, reader, label
        self.training = dict(training or {})
        self.fixed = None if fixed is None else dict(fixed)

    @cached_property
    def grids(self) -> dict[str, BlockGrid]:
        """The block grid of every ``UnitConv2d``, by its name under ``features``."""
        from ..core.layers import UnitConv2d

        return {n: m.grid for n, m in self.network.features.named_modules() if isinstance(m, UnitConv2d)}

    @cached_property
    def norms(self) -> dict[str, Any]:
        """Every ``LevelBatchNorm2d``, by its name under ``features``."""
        from ..core.layers import LevelBatchNorm2d

        return {n: m for n, m in self.network.features.named_modules() if isinstance(m, LevelBatchNorm2d)}

    @abstractmethod
    def block_tensor(self, conv: str, unit_out: int, unit_in: int | None) -> tuple[str, tuple[slice, ...] | None]:
        """The stored tensor that holds a block, and where in it (None: the whole tensor)."""

    @abstractmethod
    def norm_tensor(self, norm: str, task: int, level: int, key: str) -> str:
        """The stored tensor of one batch-norm entry (``weight``, ``bias``, ``running_mean``, ``running_var``)."""

    @abstractmethod
    def head_tensor(self, task: int, level: int, key: str) -> tuple[str, list[int] | None]:
        """The stored tensor of the head's ``weight`` or ``bias``, and the input columns to keep (None: all)."""

    def check_pairs(self, pairs: Sequence[tuple[int, int]]) -> None:
        """Refuse a (task, level) the source does not hold, in one line."""
        if self.fixed is None:
            return
        names = self.network.task_names
        for t, level in pairs:
            if self.fixed[names[t]] != level:
                held = ", ".join(f"{name} level {lv}" for name, lv in self.fixed.items())
                raise UnknownTask(f"{self.label} holds only {held}; {names[t]} level {level} needs the full checkpoint")

    def parts(
        self,
        pairs: Sequence[tuple[int, int]],
        skip_blocks: Collection[BlockKey] = (),
        skip_private: Collection[tuple[int, int]] = (),
        into: Mapping[BlockKey, torch.Tensor] | None = None,
    ) -> UnitParts:
        """The blocks that ``pairs`` (task index, level) use and the private parts of each pair, except those in
        ``skip_blocks`` and ``skip_private`` (already held). A block in ``into`` is copied there (a view of where
        it will be held: no copy in between) instead of returned."""
        self.check_pairs(pairs)
        layout, convs, norms = self.network.layout, self.grids.items(), self.norms
        blocks = {
            (conv, uo, ui): None
            for conv, grid in convs
            for t, level in pairs
            for uo, ui in grid.blocks(layout.level_units(t, level))
            if (conv, uo, ui) not in skip_blocks
        }
        private = [(t, level) for t, level in pairs if (t, level) not in skip_private]
        parts = UnitParts()
        if not blocks and not private:
            return parts  # everything is held already: the source is not even opened
        with self.reader.open() as read:
            into = into or {}
            for block in blocks:
                if block in into:
                    read(*self.block_tensor(*block), out=into[block])
                else:
                    parts.blocks[block] = read(*self.block_tensor(*block))
            for t, level in private:
                state = {
                    f"features.{norm}.{key}": read(self.norm_tensor(norm, t, level, key))
                    for norm in norms
                    for key in ("weight", "bias", "running_mean", "running_var")
                }
                for key in ("weight", "bias"):
                    name, columns = self.head_tensor(t, level, key)
                    tensor = read(name)
                    state[f"head.{key}"] = tensor if columns is None else tensor[:, columns].contiguous()
                parts.private[t, level] = state
        return parts
