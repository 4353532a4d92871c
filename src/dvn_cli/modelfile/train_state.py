"""The train-state file's tensors (``dvn-train-state``, docs/design.md §5): all ``--resume`` needs, weights included.

Written beside the checkpoint at every save; the state of a run's optimiser, gradient scaler and batch streams,
so that a resumed run continues bit for bit. No random generator's state: a run seeds its initialisation, and
every draw of a step comes from a generator of its own (batch streams, augmentation, level sampling), so torch's
global one holds nothing to resume. Files of older dvn versions also hold ``rng.torch``; it is ignored.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import torch

__all__ = ["load_train_state_tensors", "train_state_tensors"]


class Resumable(Protocol):
    """A batch stream that can be saved and continued (``TaskBatches``, ``StreamBatches``)."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def train_state_tensors(
    network: torch.nn.Module, optimizer, scaler, streams: Sequence[Resumable], names: list[str]
) -> dict[str, torch.Tensor]:
    """Everything resume needs, the weights included (so the state file alone restarts the run)."""
    tensors: dict[str, torch.Tensor] = {}
    for name, value in network.state_dict().items():
        tensors[f"model.{name}"] = value
    for i, state in optimizer.state_dict()["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{i}.{key}"] = value
    if scaler.is_enabled():
        scaler_state = scaler.state_dict()
        tensors["amp.scale"] = torch.tensor(scaler_state["scale"], dtype=torch.float64)
        tensors["amp.growth_tracker"] = torch.tensor(scaler_state["_growth_tracker"], dtype=torch.int64)
    for name, stream in zip(names, streams, strict=True):
        for key, value in stream.state_dict().items():
            tensors[f"batches.{name}.{key}"] = torch.as_tensor(value)
    return tensors


def load_train_state_tensors(
    tensors: Mapping[str, torch.Tensor], optimizer, scaler, streams: Sequence[Resumable], names: list[str]
) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": optimizer.state_dict()["param_groups"]})
    if scaler.is_enabled() and "amp.scale" in tensors:
        scaler.load_state_dict(
            {
                **scaler.state_dict(),
                "scale": float(tensors["amp.scale"]),
                "_growth_tracker": int(tensors["amp.growth_tracker"]),
            }
        )
    for name, stream in zip(names, streams, strict=True):
        prefix = f"batches.{name}."
        stream.load_state_dict({k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)})
