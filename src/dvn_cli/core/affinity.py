"""Placing tasks on the line of anchors from a measured task affinity (``--order-rule affinity``).

The fixed rules (``nearest``, ``cyclic``) give task ``t`` the anchor of slot ``t``, so the order of ``--tasks``
decides which tasks share units. The affinity rule measures instead (``training/affinity_warmup.py``: the cosine of the
tasks' gradients on the shared weights during a warm-up) and then chooses the PLACEMENT, task -> slot, that gives
the most sharing to the tasks with the highest affinity; the ``nearest`` rule of each slot gives the orders.

Sharing of two slots ``a``, ``b`` (``slot_sharing``) is what their ``nearest`` orders share, counted as the plan
counts shared weights (docs/design.md §4): the unit-pair blocks both use, summed over the levels,

    S[a, b] = sum_l |order_a[:l] & order_b[:l]|^2

and a placement ``p`` scores ``sum_{i<j} A[i, j] * S[p_i, p_j]`` for the affinity matrix ``A``. For ``T <= 8``
every placement is scored (``T!`` of them, 40,320 at ``T = 8``); above, a steepest-ascent search over swaps of
two tasks' slots starts from the given order and stops where no swap improves (a local optimum, not
necessarily the best). Ties keep the placement found first, starting from the given order, so an order that is
already best is kept.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import BadConfig
from .units import nearest_orders

__all__ = ["EXACT_MAX_TASKS", "Placement", "best_placement", "placement_orders", "placement_score", "slot_sharing"]

EXACT_MAX_TASKS = 8
"""Up to this many tasks every placement is scored; above, a local search over swaps."""

_TIE = 1e-12  # scores closer than this are ties (sums of float products in another order)


def slot_sharing(num_tasks: int, units: int) -> np.ndarray:
    """``S[a, b]``: unit-pair blocks that the ``nearest`` orders of slots ``a`` and ``b`` share, over all levels."""
    orders = nearest_orders(num_tasks, units)
    sharing = np.zeros((num_tasks, num_tasks))
    for a, b in itertools.product(range(num_tasks), repeat=2):
        sharing[a, b] = sum(len(set(orders[a][:lv]) & set(orders[b][:lv])) ** 2 for lv in range(1, units + 1))
    return sharing


def placement_score(affinity: np.ndarray, sharing: np.ndarray, placement: Sequence[int]) -> float:
    """``sum_{i<j} A[i, j] * S[p_i, p_j]``: how much sharing goes to tasks of high affinity."""
    p = np.asarray(placement)
    upper = np.triu(np.ones_like(affinity, dtype=bool), 1)
    return float((affinity * sharing[np.ix_(p, p)])[upper].sum())


def placement_orders(placement: Sequence[int], units: int) -> list[list[int]]:
    """The orders of a placement: task ``t`` takes the ``nearest`` order of its slot ``placement[t]``."""
    slots = nearest_orders(len(placement), units)
    return [list(slots[s]) for s in placement]


@dataclass(frozen=True)
class Placement:
    """A chosen placement and how it was found.

    Args:
        slots: slot of each task, in the order of ``--tasks`` (a permutation of ``0..T-1``).
        score: its ``placement_score``.
        given_score: the score of the given order (``slots = 0..T-1``).
        search: ``exhaustive`` (every placement scored) or ``swaps`` (local search, ``T > 8``).
    """

    slots: tuple[int, ...]
    score: float
    given_score: float
    search: str

    def line(self, names: Sequence[str]) -> list[str]:
        """Task names in slot order: the line the tasks were placed on."""
        by_slot = sorted(range(len(self.slots)), key=lambda t: self.slots[t])
        return [names[t] for t in by_slot]


def _check(affinity: np.ndarray) -> np.ndarray:
    a = np.asarray(affinity, dtype=np.float64)
    if a.ndim != 2 or a.shape[0] != a.shape[1] or a.shape[0] < 1:
        raise BadConfig(f"an affinity matrix must be square, got shape {a.shape}")
    if not np.isfinite(a).all():
        raise BadConfig("the affinity matrix holds a non-finite value")
    return (a + a.T) / 2  # the score reads each pair once; an asymmetric measure counts both directions


def best_placement(affinity: np.ndarray, units: int) -> Placement:
    """The placement of the tasks on the anchors' line that gives the most sharing to the highest affinities.

    Args:
        affinity: ``(T, T)`` task affinity, higher = more alike (made symmetric by averaging with its transpose).
        units: k.
    """
    a = _check(affinity)
    n = a.shape[0]
    sharing = slot_sharing(n, units)
    given = tuple(range(n))
    given_score = placement_score(a, sharing, given)
    if n <= EXACT_MAX_TASKS:
        perms = np.array(list(itertools.permutations(range(n))))  # (T!, T), the given order first
        scores = np.zeros(len(perms))
        for i, j in itertools.combinations(range(n), 2):
            scores += a[i, j] * sharing[perms[:, i], perms[:, j]]
        first = int(np.flatnonzero(scores > scores.max() - _TIE)[0])
        best = tuple(int(s) for s in perms[first])
        return Placement(best, placement_score(a, sharing, best), given_score, "exhaustive")
    current, current_score = list(given), given_score
    while True:
        move, move_score = None, current_score
        for i, j in itertools.combinations(range(n), 2):
            trial = list(current)
            trial[i], trial[j] = trial[j], trial[i]
            score = placement_score(a, sharing, trial)
            if score > move_score + _TIE:
                move, move_score = trial, score
        if move is None:
            return Placement(tuple(current), current_score, given_score, "swaps")
        current, current_score = move, move_score
