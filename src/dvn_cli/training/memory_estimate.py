"""Size before allocation: what one training step will hold, estimated from shapes before any of it exists.

``dvn train`` once asked the kernel for 21.5 GB and was killed by the machine-wide OOM killer (issue 18). Now the
run first builds its network on PyTorch's ``meta`` device (shapes and dtypes, no storage) and runs every
``(task, level)`` forward of one step on a meta batch, counting the bytes autograd keeps for the backward pass
(``torch.autograd.graph.saved_tensors_hooks``): the activations, and the weight gathers of the unit layers. With
the weights, their gradients and the optimiser's momentum this is what a step holds at its peak. A run whose
estimate does not fit the memory the machine can give it (``MemAvailable``, the cgroup's limit, the process's
address-space limit; on CUDA the GPU's free memory) is refused in one line naming the estimate and a setting
that fits.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import resource
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import BackboneConfig, TaskSpec, TrainConfig
from ..core.network import DeepVirtualNetwork, build_network
from ..errors import BadConfig
from ..fsutil import first_line
from ..planning.budgets import format_bytes

__all__ = ["Headroom", "MemoryEstimate", "available_memory", "check_memory", "estimate_memory"]


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes one training step holds at its peak, by what holds them.

    Args:
        weights: parameters and buffers (batch-norm statistics).
        gradients: the parameters' gradients, and as much again for the gradients of the gathered unit weights.
        optimizer: the optimiser's state (SGD's momentum: one tensor per parameter, none without momentum).
        activations: what the forwards of one step keep for the backward, and their gradients in the backward, at
            ``batch_size`` images per task.
        batch_size: images per task per step the activations were counted at.
    """

    weights: int
    gradients: int
    optimizer: int
    activations: int
    batch_size: int

    @property
    def fixed(self) -> int:
        """What does not depend on the batch size."""
        return self.weights + self.gradients + self.optimizer

    @property
    def total(self) -> int:
        return self.fixed + self.activations

    def describe(self) -> str:
        return (
            f"about {format_bytes(self.total)} (weights {format_bytes(self.weights)}, gradients and optimiser "
            f"{format_bytes(self.gradients + self.optimizer)}, activations of {self.batch_size} images per task "
            f"{format_bytes(self.activations)})"
        )


@dataclass(frozen=True)
class Headroom:
    """The memory a run may still take and what limits it (for the refusal message)."""

    bytes: int
    source: str


def estimate_memory(
    backbone: BackboneConfig,
    specs: Sequence[TaskSpec],
    batch_size: int,
    *,
    order_rule: str = "nearest",
    order_table: tuple[tuple[int, ...], ...] | None = None,
    momentum: float = 0.9,
) -> MemoryEstimate:
    """The peak bytes of one float32 training step, from shapes alone (nothing is allocated; each distinct
    setting is counted once per process, as a meta forward costs about a second on a small CPU)."""
    return _estimate(backbone, tuple(specs), batch_size, order_rule, order_table, momentum > 0)


@functools.lru_cache(maxsize=64)
def _estimate(
    backbone: BackboneConfig,
    specs: tuple[TaskSpec, ...],
    batch_size: int,
    order_rule: str,
    order_table: tuple[tuple[int, ...], ...] | None,
    momentum: bool,
) -> MemoryEstimate:
    try:  # on the meta device nothing is allocated: an error here is a shape no tensor can have
        with torch.device("meta"):
            network = build_network(backbone, list(specs), order_rule, order_table)
    except RuntimeError as exc:  # e.g. "Storage size calculation overflowed"
        raise BadConfig(f"a network of widths {backbone.widths} cannot be built: {first_line(exc)}") from None
    params = list(network.parameters())
    try:
        saved = _saved_bytes(network, max(range(len(specs)), key=lambda t: specs[t].num_classes), batch_size)
    except (ValueError, RuntimeError) as exc:  # what the step would raise: batch norm over a 1x1 map of one image,
        # a batch whose activations overflow 64-bit sizes
        raise BadConfig(f"a training step of {batch_size} images per task cannot run: {first_line(exc)}") from None
    weights = sum(_nbytes(t) for t in params) + sum(_nbytes(b) for b in network.buffers())
    per_copy = sum(_nbytes(p) for p in params)
    # Every task runs the same shapes but for its head: the widest head's task is counted once for all of them.
    # The backward holds, besides what the forwards saved, the gradients of those tensors (of the gathered unit
    # weights too): twice each, which measured peaks bear out (docs/design.md, "Size before allocation").
    activations = 2 * len(specs) * saved
    return MemoryEstimate(weights, 2 * per_copy, per_copy if momentum else 0, activations, batch_size)


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _saved_bytes(network: DeepVirtualNetwork, task: int, batch_size: int) -> int:
    """Bytes autograd saves over the forwards of ``task`` in one step: every level, kept until the backward.

    Parameters are not counted again (they are weights); a tensor saved by several operations counts once.
    """
    cfg = network.config
    params = {id(p) for p in network.parameters()}
    seen: set[int] = set()
    kept: list[torch.Tensor] = []  # holds the saved tensors so that their ids stay unique

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        if id(tensor) not in seen and id(tensor) not in params:
            seen.add(id(tensor))
            kept.append(tensor)
        return tensor

    network.train()
    images = torch.empty(batch_size, cfg.in_channels, cfg.input_size, cfg.input_size, device="meta")
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        for level in range(1, network.units + 1):
            network(images, task, level)
    return _nbytes(images) + sum(_nbytes(t) for t in kept)


def available_memory(device: torch.device) -> Headroom | None:
    """What this process may still allocate on ``device`` (None where nothing says): the tightest of the machine's,
    the cgroup's and the address-space limit's headroom on CPU; the free memory of the GPU on CUDA."""
    if device.type == "cuda":
        return Headroom(torch.cuda.mem_get_info(device)[0], f"the free memory of {device}")
    candidates = [(_meminfo("MemAvailable"), "the machine's available memory (MemAvailable)")]
    candidates.append((_cgroup_headroom(), "the cgroup's memory limit"))
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY:
        candidates.append((soft - _status("VmSize"), "the address-space limit (ulimit -v)"))
    known = [Headroom(found, source) for found, source in candidates if found is not None]
    return min(known, key=lambda c: c.bytes) if known else None


def check_memory(cfg: TrainConfig, specs: Sequence[TaskSpec], device: torch.device) -> MemoryEstimate:
    """The run's estimate; refused in one line, naming it and a batch size (or widths) that fits, when the step
    would not fit the memory ``available_memory`` finds."""
    estimate = _of(cfg, specs, cfg.backbone, cfg.batch_size)
    headroom = available_memory(device)
    if headroom is None or estimate.total <= headroom.bytes:
        return estimate
    batch = _largest_batch(cfg, specs, headroom.bytes)
    if batch:
        fits = f"--batch-size {batch} or less fits"
    else:
        fits = f"the model alone does not fit; {_smaller_widths(cfg, specs, headroom.bytes)}"
    raise BadConfig(
        f"training would need {estimate.describe()}, but {headroom.source} leaves {format_bytes(headroom.bytes)}; "
        f"{fits}"
    )


def _of(cfg: TrainConfig, specs: Sequence[TaskSpec], backbone: BackboneConfig, batch_size: int) -> MemoryEstimate:
    return estimate_memory(
        backbone, specs, batch_size, order_rule=cfg.order_rule, order_table=cfg.order_table, momentum=cfg.momentum
    )


def _largest_batch(cfg: TrainConfig, specs: Sequence[TaskSpec], available: int) -> int:
    """The largest batch size below the run's whose step fits, by bisection; 0 when not even 2 images fit (a batch
    of 1 is not offered: batch norm cannot train on one value per channel, as a 1x1 feature map gives)."""
    low, high = 1, cfg.batch_size  # a step of ``low`` images is known to fit (1: not yet known), ``high`` does not
    while high - low > 1:
        middle = (low + high) // 2
        if _of(cfg, specs, cfg.backbone, middle).total <= available:
            low = middle
        else:
            high = middle
    return low if low > 1 else 0


def _smaller_widths(cfg: TrainConfig, specs: Sequence[TaskSpec], available: int) -> str:
    """Widths halved until a step at the run's batch size fits (kept divisible by k)."""
    backbone, k = cfg.backbone, cfg.backbone.units
    while any(w > k for w in backbone.widths):
        widths = tuple(max(k, w // 2 // k * k) for w in backbone.widths)
        backbone = dataclasses.replace(backbone, widths=widths)
        if _of(cfg, specs, backbone, cfg.batch_size).total <= available:
            return f"--widths {','.join(map(str, widths))} fits at this batch size"
    return "choose a smaller network or a larger machine"


def _meminfo(field: str) -> int | None:
    return _kib_field(Path("/proc/meminfo"), field)


def _status(field: str) -> int:
    return _kib_field(Path("/proc/self/status"), field) or 0


def _kib_field(path: Path, field: str) -> int | None:
    """A ``Field:  123 kB`` line of a /proc file, in bytes (None where the file or field is missing)."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in path.read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    return None


def _cgroup_headroom() -> int | None:
    """The cgroup (v2, else v1) memory limit less its current usage; None without a limit."""
    for limit, usage in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
    ):
        with contextlib.suppress(OSError, ValueError):
            cap = Path(limit).read_text().strip()
            if cap == "max" or int(cap) >= 2**60:  # v1 writes a huge number for "no limit"
                return None
            return int(cap) - int(Path(usage).read_text().strip())
    return None
