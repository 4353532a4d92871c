"""Shared graphs in canonical unit order: no ``Concat`` of weights where every pair's units are one contiguous run.

A (task, level) of a plain network holds its units' channels in ascending unit order (docs/design.md §3). When
every exported (task, level)'s units are a contiguous run ``a..b-1`` of the canonical units (``nearest`` orders
always; ``cyclic`` ones without a wrap), each layer's weight of a pair is a rectangle of the layer's full weight
``W`` (canonical order) that can be read without assembling it (docs/design.md §5, "Canonical layout"):

- when every pair runs at the top level, every pair reads ``W`` itself: one tensor per layer, one copy;
- otherwise a layer that splits its input into units stores, per input unit ``j``, ``V_j = W[rows, in(j)]`` over
  the rows of every run that contains ``j`` (one contiguous range: runs that share ``j`` overlap), and a pair of
  run ``R`` reads ``V_j[out(R)]``, a contiguous range of ``V_j``: its convolution is the sum over ``j`` in ``R``
  of ``Conv(x_j, V_j[out(R)])``, no weight assembled; a layer that does not split its input (the stem, a
  depthwise layer) stores its used rows ``W[out(a..b-1)]`` in contiguous segments and a pair reads its rows;
- a head is stored transposed, ``head.task<i>.weight_t`` with the input features of its task's units as rows, so
  that a level reads a contiguous range of rows (``Gemm``); batch norms are ``BatchNormalization`` ops
  (``scale``, ``shift``, and zeros and ones as mean and variance, epsilon 0: constants stored in the graph, not
  parameters), which onnxruntime's layout transform keeps in its blocked layout.

A range of a stored tensor is a graph initializer of its own (a "view"): the manifest entry maps it to
``[tensor, first row, end row]`` and its external data names that byte range of the weights file, so the graphs
stay standard ONNX that any engine runs alone, and the runtime hands every session an ``OrtValue`` over the same
memory. Orders whose units are not contiguous runs keep the ``Concat`` graphs (``export.block_graphs``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import DvnError
from ..modelfile.base import ModelFile
from ..modelfile.spec import CompactSpec
from .pairs import norm_scale_shift, set_submodule

__all__ = ["CANONICAL_MODE", "CanonicalLayout", "unit_runs"]

CANONICAL_MODE = "canonical"


def unit_runs(model: ModelFile, pairs: Sequence[tuple[str, int]]) -> dict[tuple[str, int], tuple[int, int]] | None:
    """(task, level) -> its units as a run ``(a, b)`` (units ``a..b-1``), or None when a pair's units are not one
    contiguous run."""
    runs = {}
    for task, level in pairs:
        units = sorted(model.spec_of(task, level).units)
        if units != list(range(units[0], units[0] + len(units))):
            return None
        runs[task, level] = (units[0], units[0] + len(units))
    return runs


class _Stored:
    """The weights file's float32 tensors, each a contiguous run of rows of a layer (``first`` unit), and the
    views of them the graphs read."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.tensors: dict[str, np.ndarray] = {}
        self.first: dict[str, int] = {}  # tensor -> the unit of its first row (rows come in units of equal size)
        self.unit_rows: dict[str, int] = {}

    def add(self, name: str, array: np.ndarray, first: int = 0, unit_rows: int = 0) -> None:
        array = np.ascontiguousarray(array, dtype=np.float32)
        if name in self.tensors:
            if not np.array_equal(self.tensors[name], array):
                raise DvnError(f"{self.label}: tensor {name} differs between two (task, level)s of the same file")
            return
        self.tensors[name], self.first[name], self.unit_rows[name] = array.copy(), first, unit_rows

    def range_of(self, name: str, run: tuple[int, int]) -> tuple[str, int, int]:
        """(tensor, first row, end row) of the units ``run`` of a tensor stored by unit rows."""
        rows = self.unit_rows[name]
        begin, end = (run[0] - self.first[name]) * rows, (run[1] - self.first[name]) * rows
        if begin < 0 or end > self.tensors[name].shape[0]:
            raise RuntimeError(f"units {run} outside tensor {name}")  # a dvn bug
        return name, begin, end


def view_name(tensor: str, begin: int, end: int) -> str:
    """The graph initializer of rows ``begin:end`` of ``tensor``."""
    return f"{tensor}[{begin}:{end}]"


class _RowsConv2d(nn.Module):
    """A convolution on one contiguous weight (a full layer, a range of rows, a depthwise layer's rows)."""

    def __init__(self, conv: nn.Conv2d, weight: nn.Parameter) -> None:
        super().__init__()
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups
        self.weight = weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight, None, self.stride, self.padding, self.dilation, self.groups)


class _InputUnitsConv2d(nn.Module):
    """The sum over a run's input units ``j`` of ``Conv(x_j, V_j[out(run)])``: no weight assembled."""

    def __init__(self, conv: nn.Conv2d, pieces: list[nn.Parameter]) -> None:
        super().__init__()
        self.stride, self.padding, self.dilation = conv.stride, conv.padding, conv.dilation
        self.pieces = nn.ParameterList(pieces)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pieces = list(self.pieces)  # one per input unit of the run: at least one
        chunks = torch.split(x, x.shape[1] // len(pieces), dim=1) if len(pieces) > 1 else (x,)
        out = F.conv2d(chunks[0], pieces[0], None, self.stride, self.padding, self.dilation)
        for chunk, piece in zip(chunks[1:], pieces[1:], strict=True):
            out = out + F.conv2d(chunk, piece, None, self.stride, self.padding, self.dilation)
        return out


class _BatchNormOp(nn.Module):
    """Eval-mode batch norm as one ``BatchNormalization``: ``x * scale + shift`` (mean 0, variance 1, epsilon 0)."""

    def __init__(self, scale: nn.Parameter, shift: nn.Parameter, zeros: nn.Parameter, ones: nn.Parameter) -> None:
        super().__init__()
        self.scale, self.shift, self.zeros, self.ones = scale, shift, zeros, ones

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, self.zeros, self.ones, self.scale, self.shift, False, 0.0, 0.0)


class _HeadRows(nn.Module):
    """A head whose weight is stored transposed (input features as rows): ``x @ weight_t + bias``."""

    def __init__(self, weight_t: nn.Parameter, bias: nn.Parameter) -> None:
        super().__init__()
        self.weight_t, self.bias = weight_t, bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.bias, x, self.weight_t)


def _unit_slice(tensor: torch.Tensor, dim: int, units: int, index: int) -> np.ndarray:
    size = tensor.shape[dim] // units
    return tensor.detach().float().narrow(dim, index * size, size).contiguous().numpy()


class CanonicalLayout:
    """The tensors of a canonical shared export of ``pairs`` and, per pair, the module that reads them.

    Args:
        model: a checkpoint or a bundle.
        pairs: the exported (task, level)s.
        runs: ``unit_runs(model, pairs)`` (not None).
        split: conv layer name -> whether its input is split into units.
    """

    def __init__(
        self,
        model: ModelFile,
        pairs: Sequence[tuple[str, int]],
        runs: Mapping[tuple[str, int], tuple[int, int]],
        split: Mapping[str, bool],
    ) -> None:
        self.model, self.pairs, self.runs, self.split = model, list(pairs), dict(runs), dict(split)
        self.k = model.spec_of(*self.pairs[0]).k
        self.full = all(b - a == self.k for a, b in self.runs.values())
        self.names = model.task_names()
        self.stored = _Stored(model.label)
        self.views: dict[str, tuple[str, int, int]] = {}
        self.constants: dict[str, np.ndarray] = {}  # not parameters: stored in the graphs themselves
        self._collect()

    # -------------------------------------------------------------------------------------------- tensors

    def _collect(self) -> None:
        """Every tensor once: each pair's plain weights give the rows of its run; a row seen twice must agree."""
        pieces: dict[tuple[str, int | None], dict[int, np.ndarray]] = {}  # (key, input unit) -> unit -> its rows
        for task, level in self.pairs:
            a, b = self.runs[task, level]
            plain, tag = self.model.plain_of(task, level), f"task{self.names.index(task)}.level{level}"
            for name, module in plain.features.named_modules():
                if isinstance(module, nn.Conv2d):
                    if name not in self.split:
                        raise DvnError(f"{self.model.label}: convolution {name} is not in the source's unit layers")
                    if module.bias is not None:
                        raise DvnError("a shared export needs bias-free convolutions")
                    weight = module.weight.detach().float()
                    for i, uo in enumerate(range(a, b)):
                        rows = weight.narrow(0, i * weight.shape[0] // (b - a), weight.shape[0] // (b - a))
                        if not self.split[name] or self.full:  # whole rows: the stem, a depthwise or a full layer
                            self._piece(pieces, (f"features.{name}.weight", None), uo, rows.numpy())
                            continue
                        for ji, j in enumerate(range(a, b)):
                            self._piece(
                                pieces, (f"features.{name}.weight.in{j}", j), uo, _unit_slice(rows, 1, b - a, ji)
                            )
                elif isinstance(module, nn.BatchNorm2d):
                    scale, shift = norm_scale_shift(module)
                    channels = scale.numel()
                    self.stored.add(f"features.{name}.{tag}.scale", scale.float().numpy())
                    self.stored.add(f"features.{name}.{tag}.shift", shift.float().numpy())
                    self.constants[f"norm.zeros.{channels}"] = np.zeros(channels, np.float32)
                    self.constants[f"norm.ones.{channels}"] = np.ones(channels, np.float32)
            index = self.names.index(task)
            for i, u in enumerate(range(a, b)):
                self._piece(
                    pieces, (f"head.task{index}.weight_t", -1), u, _unit_slice(plain.head.weight, 1, b - a, i).T
                )
            self.stored.add(f"head.task{index}.bias", plain.head.bias.detach().float().numpy())
        for (key, unit), by_unit in pieces.items():
            if unit is None:  # whole rows: each maximal segment of the union of the runs
                ranges = self._segments()
            else:  # one input unit's rows (or a head's): the runs that hold it overlap, so one range
                ranges = [(min(by_unit), max(by_unit) + 1)]
            for lo, hi in ranges:
                name = key if unit is not None or (lo, hi) == (0, self.k) else f"{key}.units{lo}-{hi - 1}"
                segment = np.concatenate([by_unit[u] for u in range(lo, hi)], 0)
                self.stored.add(name, segment, lo, by_unit[lo].shape[0])

    def _segments(self) -> list[tuple[int, int]]:
        """The maximal unit ranges of the union of the runs."""
        segments: list[list[int]] = []
        for a, b in sorted(set(self.runs.values())):
            if segments and a <= segments[-1][1]:
                segments[-1][1] = max(segments[-1][1], b)
            else:
                segments.append([a, b])
        return [(a, b) for a, b in segments]

    def _piece(
        self, pieces: dict[tuple[str, int | None], dict[int, np.ndarray]], key: tuple, unit: int, rows: np.ndarray
    ) -> None:
        rows = np.ascontiguousarray(rows, dtype=np.float32)
        seen = pieces.setdefault(key, {}).get(unit)
        if seen is not None and not np.array_equal(seen, rows):
            raise DvnError(f"{self.model.label}: {key[0]} rows of unit {unit} differ between two (task, level)s")
        pieces[key][unit] = rows

    def _tensor_of(self, key: str, run: tuple[int, int]) -> str:
        """The stored tensor whose rows hold ``run`` for layer key ``key``."""
        for name in (key, *(n for n in self.stored.tensors if n.startswith(key + ".units"))):
            if name in self.stored.tensors:
                first, rows = self.stored.first[name], self.stored.tensors[name].shape[0] // self.stored.unit_rows[name]
                if first <= run[0] and run[1] <= first + rows:
                    return name
        raise RuntimeError(f"no stored tensor of {key} holds units {run}")  # a dvn bug

    def _read(self, key: str, run: tuple[int, int]) -> tuple[str, nn.Parameter]:
        """(initializer name, parameter) of the rows of ``run`` of layer key ``key``: the tensor when it is all of
        them, else a view."""
        tensor, begin, end = self.stored.range_of(self._tensor_of(key, run), run)
        array = self.stored.tensors[tensor]
        if (begin, end) == (0, array.shape[0]):
            name = tensor
        else:
            name = view_name(tensor, begin, end)
            self.views[name] = (tensor, begin, end)
        return name, nn.Parameter(torch.from_numpy(array[begin:end].copy()), requires_grad=False)

    # -------------------------------------------------------------------------------------------- modules

    def module(self, task: str, level: int) -> tuple[nn.Module, nn.Module, CompactSpec, dict[str, str]]:
        """(module reading the stored tensors, the plain reference network, spec, parameter name -> initializer
        name) of one (task, level)."""
        plain, spec = self.model.plain_of(task, level), self.model.spec_of(task, level)
        shared = self.model.plain_of(task, level)
        run, index = self.runs[task, level], self.names.index(task)
        tag = f"task{index}.level{level}"
        named: dict[int, str] = {}  # id(parameter) -> initializer name
        constants: dict[str, nn.Parameter] = {}

        def param(name: str, make) -> nn.Parameter:
            if name not in constants:
                constants[name] = make()
                named[id(constants[name])] = name
            return constants[name]

        for name, module in list(shared.features.named_modules()):
            if isinstance(module, nn.Conv2d):
                if not self.split[name] or self.full:
                    key = f"features.{name}.weight"
                    init, weight = self._read(key, run)
                    set_submodule(shared.features, name, _RowsConv2d(module, param(init, lambda w=weight: w)))
                    continue
                inits = [self._read(f"features.{name}.weight.in{j}", run) for j in range(*run)]
                weights = [param(init, lambda w=w: w) for init, w in inits]
                set_submodule(shared.features, name, _InputUnitsConv2d(module, weights))
            elif isinstance(module, nn.BatchNorm2d):
                c = module.num_features
                scale, shift = (f"features.{name}.{tag}.{part}" for part in ("scale", "shift"))
                values = {**self.stored.tensors, **self.constants}
                parts = [
                    param(n, lambda n=n, values=values: nn.Parameter(torch.from_numpy(values[n].copy()), False))
                    for n in (scale, shift, f"norm.zeros.{c}", f"norm.ones.{c}")
                ]
                set_submodule(shared.features, name, _BatchNormOp(*parts))
        init, weight_t = self._read(f"head.task{index}.weight_t", run)
        bias = f"head.task{index}.bias"
        head = _HeadRows(
            param(init, lambda: weight_t),
            param(bias, lambda: nn.Parameter(torch.from_numpy(self.stored.tensors[bias].copy()), False)),
        )
        set_submodule(shared, "head", head)  # by name: the result is no PlainNetwork (its head a Linear)
        keys = {pname: named[id(p)] for pname, p in shared.named_parameters() if id(p) in named}
        return shared.eval(), plain.eval(), spec, keys
