"""Which levels one training step trains: every level, or the sandwich rule of universally slimmable networks.

The sandwich rule (Yu and Huang, "Universally Slimmable Networks and Improved Training Techniques", ICCV 2019)
trains the smallest and the largest level at every step and a random one between them: the bounds of the
levels' accuracies are trained every step, and the middle levels, which share all their units with the largest,
ride along. At ``k = 4`` a step then runs 3 of 4 levels per task, about 0.78x the step's work (docs/results.md).

The sample is a pure function of ``(seed, step)``, as the learning rate is, so ``--resume`` needs no state for it
and reproduces an uninterrupted run bit for bit.
"""

from __future__ import annotations

import random

from ..config import LEVEL_SAMPLINGS

__all__ = ["sample_levels"]


def sample_levels(sampling: str, units: int, seed: int, step: int) -> list[int]:
    """The levels step ``step`` trains, top first (so the top level can teach the lower ones).

    Args:
        sampling: one of ``config.LEVEL_SAMPLINGS``: ``all`` trains levels ``k..1``; ``sandwich`` trains ``k``,
            one level drawn uniformly from ``2..k-1``, and 1 (with ``k <= 3``, every level).
        units: k, the number of levels.
        seed: the run's seed.
        step: the step's index (0-based), so the sample depends on nothing else.
    """
    if sampling == "all" or units <= 3:
        return list(range(units, 0, -1))
    if sampling != "sandwich":
        raise ValueError(f"unknown level sampling {sampling!r}; use {', '.join(LEVEL_SAMPLINGS)}")
    middle = random.Random(f"dvn-levels:{seed}:{step}").randint(2, units - 1)
    return [units, middle, 1]
