"""The warm-up of ``--order-rule affinity``: measure how alike the tasks are, place them, continue training.

The first ``affinity_steps`` optimiser steps of the run are ordinary training steps (all tasks, all levels, the
run's learning-rate schedule) with every task on the same order (``units.shared_orders``), so that every task
uses the same units at every level and no placement is favoured while measuring. Each of these steps runs the
backward pass once per task (the tasks' graphs are disjoint, so this costs about what one backward of the summed
loss costs) and keeps each task's gradient on the shared weights (every convolution of the backbone; batch norms
and heads are private). The affinity of tasks ``i`` and ``j`` is the cosine of their gradients, averaged over the
warm-up's steps (gradient similarity as in Du et al. 2018, "Adapting auxiliary losses using gradient
similarity", and Yu et al. 2020, "Gradient surgery for multi-task learning"). The lookahead affinity of Fifty et
al. 2021 ("Efficiently identifying task groupings for multi-task learning") was the alternative; it needs ``T``
extra lookahead passes per step, here ``T x k`` forwards each.

At the end of the warm-up ``core.affinity.best_placement`` places the tasks and the network continues with the
``nearest`` orders of that placement: same weights, same optimiser state, same step count (the warm-up counts
in the run's steps). Everything is kept in the training state, so ``--resume`` during or after the warm-up
reproduces an uninterrupted run.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from ..core.affinity import Placement, best_placement, placement_orders
from ..core.network import DeepVirtualNetwork

__all__ = ["MEASURE", "AffinityWarmup", "relayout", "shared_parameters"]

MEASURE = "cosine of the tasks' gradients on the shared convolution weights, averaged over the warm-up's steps"


def shared_parameters(network: DeepVirtualNetwork) -> list[torch.nn.Parameter]:
    """The weights every task uses: the backbone's convolutions (batch norms and heads are per task)."""
    return [p for name, p in network.named_parameters() if name.startswith("features.") and p.dim() > 1]


def relayout(network: DeepVirtualNetwork, orders: list[list[int]]) -> DeepVirtualNetwork:
    """The same network, the same tensors (not copies), under new orders; ``network`` is not to be used after."""
    with torch.device("meta"):
        placed = DeepVirtualNetwork(network.config, network.tasks, orders, network.order_rule)
    placed.load_state_dict(network.state_dict(), assign=True)
    return placed.train(network.training)


@dataclass
class AffinityWarmup:
    """The measurement in progress (or done) of one run.

    Args:
        steps: length of the warm-up in optimiser steps.
        names: task names, in the order of ``--tasks``.

    ``sums`` holds the sum over measured steps of the ``(T, T)`` gradient cosines; ``measured`` counts those
    steps; ``placement`` is set once the warm-up is over.
    """

    steps: int
    names: list[str]
    sums: np.ndarray = field(init=False)
    measured: int = 0
    placement: Placement | None = None

    def __post_init__(self) -> None:
        self.sums = np.zeros((len(self.names), len(self.names)))

    @property
    def matrix(self) -> np.ndarray:
        """The affinity so far: the mean gradient cosine of each pair of tasks (1 on the diagonal)."""
        return self.sums / max(self.measured, 1)

    def backward(self, network: DeepVirtualNetwork, losses: list[torch.Tensor], scaler: torch.amp.GradScaler) -> None:
        """Backward of each task's loss in turn: adds the step's gradient cosines to ``sums`` and leaves in every
        ``.grad`` the sum over tasks, as one backward of the summed loss would."""
        params = list(network.parameters())
        shared = {id(p) for p in shared_parameters(network)}
        totals: list[torch.Tensor | None] = [None] * len(params)
        per_task = []
        for loss in losses:
            scaler.scale(loss).backward()
            flat = []
            for i, p in enumerate(params):
                if p.grad is None:
                    continue
                if id(p) in shared:
                    flat.append(p.grad.detach().reshape(-1).to(torch.float64))
                so_far = totals[i]
                totals[i] = p.grad if so_far is None else so_far + p.grad
                p.grad = None
            per_task.append(torch.cat(flat))  # every task uses the stem: never empty
        for p, total in zip(params, totals, strict=True):
            p.grad = total
        grads = torch.stack(per_task)  # (T, shared weights)
        unit = grads / grads.norm(dim=1, keepdim=True).clamp_min(1e-30)
        self.sums = self.sums + (unit @ unit.T).cpu().numpy()
        self.measured += 1

    def place(self, units: int) -> list[list[int]]:
        """Choose the placement from the measured affinity; the orders the network continues with."""
        self.placement = placement = best_placement(self.matrix, units)
        return placement_orders(placement.slots, units)

    def orders(self, units: int) -> list[list[int]] | None:
        """The placement's orders, or None while warming up."""
        return None if self.placement is None else placement_orders(self.placement.slots, units)

    def state(self) -> dict[str, Any]:
        """What ``--resume`` needs (JSON: floats round-trip exactly)."""
        placement = None if self.placement is None else asdict(self.placement)
        return {"steps": self.steps, "measured": self.measured, "sums": self.sums.tolist(), "placement": placement}

    def load_state(self, state: dict[str, Any]) -> None:
        """Continue from ``state()``, refusing one of another warm-up."""
        sums = np.asarray(state["sums"], dtype=np.float64)
        if int(state["steps"]) != self.steps or sums.shape != self.sums.shape:
            raise ValueError("the affinity warm-up in the state is not this run's")
        self.sums, self.measured = sums, int(state["measured"])
        placed = state.get("placement")
        self.placement = None if placed is None else Placement(**{**placed, "slots": tuple(placed["slots"])})

    def summary(self, units: int) -> dict[str, Any]:
        """What the checkpoint's training summary and ``dvn info`` show."""
        out: dict[str, Any] = {
            "measure": MEASURE,
            "warmup_steps": self.steps,
            "measured_steps": self.measured,
            "tasks": list(self.names),
            "matrix": [[round(float(v), 4) for v in row] for row in self.matrix],
        }
        if self.placement is not None:
            p = self.placement
            out.update(
                slots=list(p.slots),
                line=p.line(self.names),
                orders=dict(zip(self.names, placement_orders(p.slots, units), strict=True)),
                score=round(p.score, 4),
                given_score=round(p.given_score, 4),
                search=p.search,
            )
        return out
