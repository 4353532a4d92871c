"""Units and orders: how each layer's channels split into k units and which units each (task, level) uses.

Deep Virtual Networks (Kim et al., CVPR 2019) split every layer into ``k`` disjoint units. Each task takes the
units in its own ORDER; level ``l`` of task ``t`` uses ``order_t[:l]``. Orders come from a pluggable rule
(``nearest`` by default, ``cyclic``, an explicit table, or ``affinity``, measured while training: see
``core/affinity.py``) and are stored in the checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch

from ..errors import BadConfig

__all__ = [
    "ORDER_RULES",
    "BlockGrid",
    "ChannelSelection",
    "UnitLayout",
    "anchor_units",
    "cyclic_orders",
    "make_orders",
    "nearest_orders",
    "register_order_rule",
    "shared_orders",
    "table_orders",
    "unit_channels",
]

Orders = list[list[int]]
ChannelSelection = slice | torch.Tensor
"""Active channels of one layer: a slice when they are contiguous (a view, no copy), else an index tensor."""


def unit_channels(num_channels: int, units: int, unit: int) -> range:
    """Channels ``[u*C/k, (u+1)*C/k)`` of unit ``u`` in a layer of ``C`` channels."""
    if num_channels % units:
        raise BadConfig(f"channels {num_channels} not divisible by k={units}")
    if not 0 <= unit < units:
        raise BadConfig(f"unit {unit} out of range 0..{units - 1}")
    size = num_channels // units
    return range(unit * size, (unit + 1) * size)


def anchor_units(num_tasks: int, units: int) -> list[int]:
    """Anchor unit of each task, spread evenly over ``0..k-1`` (rounded half up)."""
    if num_tasks < 1 or units < 1:
        raise BadConfig(f"need at least one task and one unit, got T={num_tasks}, k={units}")
    if num_tasks == 1:
        return [0]
    return [int(t * (units - 1) / (num_tasks - 1) + 0.5) for t in range(num_tasks)]


def nearest_orders(num_tasks: int, units: int) -> Orders:
    """Each task takes units by increasing distance from its anchor, ties to the lower index."""
    return [_by_distance(anchor, units) for anchor in anchor_units(num_tasks, units)]


def _by_distance(anchor: int, units: int) -> list[int]:
    """Units ``0..k-1`` by increasing distance from ``anchor``, ties to the lower index."""
    return sorted(range(units), key=lambda u: (abs(u - anchor), u))


def cyclic_orders(num_tasks: int, units: int) -> Orders:
    """Each task takes ``a_t, a_t + 1, ...`` modulo k."""
    return [[(anchor + i) % units for i in range(units)] for anchor in anchor_units(num_tasks, units)]


def table_orders(table: Sequence[Sequence[int]], num_tasks: int, units: int) -> Orders:
    """An explicit order per task, checked to be a permutation of ``0..k-1``."""
    orders = [[int(u) for u in row] for row in table]
    if len(orders) != num_tasks:
        raise BadConfig(f"order table has {len(orders)} rows for {num_tasks} tasks")
    for t, order in enumerate(orders):
        if sorted(order) != list(range(units)):
            raise BadConfig(f"order of task {t} {order} is not a permutation of 0..{units - 1}")
    return orders


def shared_orders(num_tasks: int, units: int) -> Orders:
    """Every task takes ``0, 1, ..., k-1``: the orders of the ``affinity`` rule's warm-up.

    With the same order every task uses the same units at every level, so the warm-up measures the tasks'
    affinity without favouring any placement; training then switches to the placement it chose.
    """
    return [list(range(units)) for _ in range(num_tasks)]


ORDER_RULES: dict[str, Callable[[int, int], Orders]] = {}
RESERVED_RULES = ("table", "affinity")
"""Rules ``make_orders`` handles itself: ``table`` needs the table, ``affinity`` a measurement (training)."""


def register_order_rule(name: str, rule: Callable[[int, int], Orders]) -> None:
    """Add an order rule ``rule(num_tasks, units) -> orders``; names are unique."""
    if name in RESERVED_RULES:
        raise ValueError(f"order rule {name!r} is reserved")
    if name in ORDER_RULES:
        raise ValueError(f"order rule {name!r} is already registered")
    ORDER_RULES[name] = rule


register_order_rule("nearest", nearest_orders)
register_order_rule("cyclic", cyclic_orders)


def make_orders(rule: str, num_tasks: int, units: int, table: Sequence[Sequence[int]] | None = None) -> Orders:
    """Orders from a named rule, or from ``table`` when ``rule == "table"``.

    ``affinity`` gives the warm-up's ``shared_orders``; the training loop replaces them after the warm-up.
    """
    if rule == "affinity":
        if num_tasks < 2:
            raise BadConfig("order rule 'affinity' places several tasks; with one task use nearest")
        return shared_orders(num_tasks, units)
    if rule == "table":
        if table is None:
            raise BadConfig("order rule 'table' needs a table of orders, one row per task")
        return table_orders(table, num_tasks, units)
    if rule not in ORDER_RULES:
        known = ", ".join([*ORDER_RULES, *RESERVED_RULES])
        raise BadConfig(f"unknown order rule {rule!r}; known: {known}")
    return ORDER_RULES[rule](num_tasks, units)


class UnitLayout:
    """The immutable (task, level) -> units map of one network, with the channel selections it implies.

    Selections are computed on first use and memoised per (channels, task, level, device); they never change,
    so there is no switch state: callers always pass ``(task, level)``.
    """

    def __init__(self, orders: Sequence[Sequence[int]], units: int) -> None:
        self.units = units
        self.orders: tuple[tuple[int, ...], ...] = tuple(tuple(o) for o in table_orders(orders, len(orders), units))
        self._selections: dict[tuple[int, int, int, torch.device], ChannelSelection] = {}
        self._masks: dict[tuple[int, int, int, torch.device], torch.Tensor] = {}

    @property
    def num_tasks(self) -> int:
        return len(self.orders)

    def check(self, task: int, level: int) -> None:
        """Refuse a task index or level outside the layout."""
        if not 0 <= task < self.num_tasks:
            raise BadConfig(f"task index {task} out of range 0..{self.num_tasks - 1}")
        if not 1 <= level <= self.units:
            raise BadConfig(f"level {level} out of range 1..{self.units}")

    def level_units(self, task: int, level: int) -> tuple[int, ...]:
        """Units of (task, level), in the task's order."""
        self.check(task, level)
        return self.orders[task][:level]

    def channel_indices(self, num_channels: int, task: int, level: int) -> list[int]:
        """Active channels of (task, level) in a layer of ``num_channels``, ascending.

        Ascending order makes every layer agree on the layout of compact activations.
        """
        return [c for u in sorted(self.level_units(task, level)) for c in unit_channels(num_channels, self.units, u)]

    def active_channels(self, num_channels: int, level: int) -> int:
        return num_channels * level // self.units

    def selection(
        self, num_channels: int, task: int, level: int, device: torch.device | None = None
    ) -> ChannelSelection:
        """A slice when the active channels are one contiguous run, else an int64 index tensor on ``device``."""
        device = torch.device("cpu") if device is None else device
        key = (num_channels, task, level, device)
        if key not in self._selections:
            idx = self.channel_indices(num_channels, task, level)
            if idx == list(range(idx[0], idx[-1] + 1)):
                self._selections[key] = slice(idx[0], idx[-1] + 1)
            else:
                self._selections[key] = torch.tensor(idx, dtype=torch.int64, device=device)
        return self._selections[key]

    def mask(self, num_channels: int, task: int, level: int, device: torch.device | None = None) -> torch.Tensor:
        """Float 0/1 mask over all channels: the reference semantics of (task, level)."""
        device = torch.device("cpu") if device is None else device
        key = (num_channels, task, level, device)
        if key not in self._masks:
            mask = torch.zeros(num_channels, device=device)
            mask[self.channel_indices(num_channels, task, level)] = 1.0
            self._masks[key] = mask
        return self._masks[key]


Block = tuple[int, int | None]
"""A unit-pair block ``(u_out, u_in)`` of a convolution's weight; ``u_in`` is None where the input is not split."""


@dataclass(frozen=True)
class BlockGrid:
    """How one convolution's weight splits into unit-pair blocks ``W[out(u_o), in(u_i)]``.

    Level ``l`` of task ``t`` uses the blocks whose two units are both in ``S = order_t[:l]``; a layer whose
    input is not split (the stem: the image is never split) uses whole rows ``W[out(u_o), :]``. Plans count these
    blocks and bundles store them, so both read them here.

    Args:
        out_channels: output channels of the physical layer.
        in_channels: input channels of the physical layer.
        kernel_elements: ``kh * kw``.
        units: k.
        split_input: False for the stem.
    """

    out_channels: int
    in_channels: int
    kernel_elements: int
    units: int
    split_input: bool = True

    def blocks(self, unit_set: Iterable[int]) -> list[Block]:
        """Blocks a unit set uses: rows (output units) ascending, then columns (input units) ascending."""
        ordered = sorted(unit_set)
        if not self.split_input:
            return [(uo, None) for uo in ordered]
        return [(uo, ui) for uo in ordered for ui in ordered]

    def bits(self, unit_set: Iterable[int]) -> int:
        """The blocks of a unit set as a bit set: bit ``u_o*k + u_i`` (split input) or ``u_o`` (stem)."""
        k = self.units
        return sum(1 << (uo if ui is None else uo * k + ui) for uo, ui in self.blocks(unit_set))

    @property
    def block_params(self) -> int:
        """Weights in one block: ``(C_out/k) * (C_in/k or C_in) * kh * kw``."""
        cols = self.in_channels // self.units if self.split_input else self.in_channels
        return (self.out_channels // self.units) * cols * self.kernel_elements

    def index(self, unit_out: int, unit_in: int | None) -> tuple[slice, ...]:
        """Where the block ``(unit_out, unit_in)`` lies in the full weight: ``weight[index]`` is the block.

        One indexing step, so it also slices a tensor still in a file (``safetensors`` ``get_slice``).
        """
        rows = unit_channels(self.out_channels, self.units, unit_out)
        if unit_in is None:
            return (slice(rows.start, rows.stop),)
        cols = unit_channels(self.in_channels, self.units, unit_in)
        return slice(rows.start, rows.stop), slice(cols.start, cols.stop)

    def block(self, weight: torch.Tensor, unit_out: int, unit_in: int | None) -> torch.Tensor:
        """The block ``(unit_out, unit_in)`` of the full weight ``(C_out, C_in, kh, kw)``, as a view."""
        return weight[self.index(unit_out, unit_in)]
