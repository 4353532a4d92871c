"""Data-parallel training under ``torchrun``: process group, sharded batches and one flat gradient all-reduce.

Run ``torchrun --nproc_per_node N -m dvn_cli train ...`` on one machine, or the same command on each of M machines::

    torchrun --nnodes M --nproc_per_node N --rdzv_backend c10d --rdzv_endpoint HOST:29500 --rdzv_id dvn \\
        -m dvn_cli train ...

``torchrun`` sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``; ``init_distributed`` reads them and starts the
process group (gloo on CPU, NCCL on CUDA, one GPU per process: ``cuda:LOCAL_RANK``). Only rank 0 writes files and
shows progress; after each save every rank meets rank 0 in one small collective (``agree``), which is the barrier
and also carries an error of any rank to all of them. ``--resume`` reads the run folder on every rank, so with
several machines ``--out`` must be on a filesystem they share.

Why not ``DistributedDataParallel``: one optimiser step of a DVN runs ``tasks x levels`` forwards (8 for two tasks
at k = 4) through the same modules, and each forward leaves most batch norms and heads unused. DDP needs
``find_unused_parameters`` and hooks that fire once per parameter per backward for that, which is slow and fragile.
Instead every rank runs the whole multi-task loss on its shard, and after ``backward`` the gradients are averaged
over ranks in ONE flat all-reduce (``all_reduce_gradients``): a missing gradient counts as zeros, exactly as DDP
treats it, and a parameter that no rank touched keeps ``grad = None``. Since the ranks start from the same
weights (broadcast from rank 0) and apply the same averaged gradients, their weights stay identical.

Sharding (``ShardedBatches``): every rank draws the SAME global batch from the same seeded stream and keeps its
slice ``[rank * B/W, (rank + 1) * B/W)``, so the global batch is the single-process batch. Batch-norm statistics
are per rank (each normalises its own B/W images, like DDP without SyncBatchNorm), so a W-process run is close to,
not equal to, a 1-process run; running statistics are averaged over ranks before each validation and checkpoint.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, overload

import torch
import torch.distributed as dist
from torch import nn

from ..errors import BadConfig, DvnError

__all__ = [
    "DistEnv",
    "PeerFailed",
    "ShardedBatches",
    "agree",
    "all_reduce_gradients",
    "average_buffers",
    "broadcast_module",
    "detect_env",
    "init_distributed",
    "shutdown_distributed",
]

_MESSAGE_BYTES = 1024


class PeerFailed(DvnError):
    """Another rank stopped with an error; this rank stops too (rank 0 prints the message)."""


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in a ``torchrun`` job (a single process is rank 0 of 1).

    Args:
        rank: global rank, 0..world_size-1.
        world_size: number of processes.
        local_rank: rank on this machine (its GPU index).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes files and shows progress."""
        return self.rank == 0


def detect_env(environ: Mapping[str, str] | None = None) -> DistEnv:
    """The ``DistEnv`` that ``torchrun`` describes in ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``."""
    env: Mapping[str, str] = os.environ if environ is None else environ
    try:
        world = int(env.get("WORLD_SIZE", "1"))
        rank = int(env.get("RANK", "0"))
        local = int(env.get("LOCAL_RANK", str(rank)))
    except ValueError:
        raise BadConfig("RANK, WORLD_SIZE and LOCAL_RANK must be integers (they are set by torchrun)") from None
    if world < 1 or not 0 <= rank < world or local < 0:
        raise BadConfig(f"bad torchrun environment: RANK={rank} WORLD_SIZE={world} LOCAL_RANK={local}")
    return DistEnv(rank, world, local)


def init_distributed(env: DistEnv, device: torch.device, timeout_s: float = 1800.0) -> tuple[torch.device, bool]:
    """Start the process group of ``env`` (when it has more than one process and none is running yet).

    Args:
        env: this process's place in the job.
        device: the device asked for; ``cuda`` becomes ``cuda:LOCAL_RANK``.
        timeout_s: how long collectives wait for a missing rank.

    Returns:
        ``(device, started)``: the device this rank trains on, and whether this call started the group (and so
        must end it with ``shutdown_distributed``).
    """
    if device.type == "cuda":
        if env.local_rank >= torch.cuda.device_count():
            raise BadConfig(
                f"LOCAL_RANK {env.local_rank} has no GPU: this machine has {torch.cuda.device_count()}; "
                "start at most one process per GPU (torchrun --nproc_per_node)"
            )
        device = torch.device("cuda", env.local_rank)
        torch.cuda.set_device(device)
    if not env.distributed or dist.is_initialized():
        return device, False
    if not dist.is_available():
        raise BadConfig("this PyTorch build has no torch.distributed; run dvn train without torchrun")
    backend = "nccl" if device.type == "cuda" else "gloo"
    kwargs: dict[str, Any] = {"backend": backend, "timeout": timedelta(seconds=timeout_s)}
    if device.type == "cuda":
        kwargs["device_id"] = device
    dist.init_process_group(**kwargs)
    return device, True


def shutdown_distributed(started: bool, synchronize: bool = False) -> None:
    """End the process group if this process started it.

    ``synchronize`` (after a run every rank finished) first waits at a barrier, so that no rank tears down its
    gloo threads while a peer is still talking to it; after a failure a peer may be gone, so there is no barrier.
    """
    if started and dist.is_initialized():
        if synchronize:
            dist.barrier()
        dist.destroy_process_group()


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


@overload
def all_reduce_gradients(parameters: Sequence[nn.Parameter], extra: torch.Tensor) -> torch.Tensor: ...
@overload
def all_reduce_gradients(parameters: Sequence[nn.Parameter], extra: None = None) -> None: ...
def all_reduce_gradients(parameters: Sequence[nn.Parameter], extra: torch.Tensor | None = None) -> torch.Tensor | None:
    """Average the gradients of ``parameters`` (and the values ``extra``) over all ranks, in one flat all-reduce.

    A ``None`` gradient counts as zeros; a parameter without a gradient on EVERY rank keeps ``None`` (so SGD
    skips it as it would in one process). Without a process group this returns ``extra`` unchanged.

    Args:
        parameters: the parameters, in the same order on every rank.
        extra: a 1-D float tensor of per-rank values to average with them (the step's task losses).

    Returns:
        ``extra`` averaged over ranks.
    """
    if not _active():
        return extra
    world = dist.get_world_size()
    params = list(parameters)
    device = params[0].device
    pieces = [
        p.grad.reshape(-1).float() if p.grad is not None else p.new_zeros(p.numel(), dtype=torch.float32)
        for p in params
    ]
    has_grad = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=device)
    extra_flat = extra.to(device, torch.float32).reshape(-1) if extra is not None else has_grad.new_zeros(0)
    flat = torch.cat([*pieces, has_grad, extra_flat])  # one bucket: gradients, flags, extras
    dist.all_reduce(flat)
    flat.div_(world)
    offset = 0
    total = sum(p.numel() for p in params)
    flags = flat[total : total + len(params)].tolist()  # one device sync, not one per parameter
    for i, p in enumerate(params):
        n = p.numel()
        averaged = flat[offset : offset + n].view(p.shape)
        offset += n
        if flags[i] == 0:
            p.grad = None
        elif p.grad is None:
            p.grad = torch.empty_like(p).copy_(averaged)
        else:
            p.grad.copy_(averaged)
    return flat[total + len(params) :].to(extra.device) if extra is not None else None


def average_buffers(module: nn.Module) -> None:
    """Average the floating-point buffers (batch-norm running statistics) of ``module`` over all ranks."""
    if not _active():
        return
    buffers = [b for b in module.buffers() if b.is_floating_point()]
    if not buffers:
        return
    flat = torch.cat([b.reshape(-1).float() for b in buffers])
    dist.all_reduce(flat)
    flat.div_(dist.get_world_size())
    offset = 0
    for b in buffers:
        b.copy_(flat[offset : offset + b.numel()].view(b.shape))
        offset += b.numel()


def broadcast_module(module: nn.Module, src: int = 0) -> None:
    """Give every rank ``src``'s parameters and buffers (the same start, as DDP does)."""
    if not _active():
        return
    tensors = [*module.parameters(), *module.buffers()]
    for dtype in sorted({t.dtype for t in tensors}, key=str):
        group = [t for t in tensors if t.dtype == dtype]
        flat = torch.cat([t.detach().reshape(-1) for t in group])
        dist.broadcast(flat, src)
        offset = 0
        with torch.no_grad():
            for t in group:
                t.copy_(flat[offset : offset + t.numel()].view(t.shape))
                offset += t.numel()


def agree(error: BaseException | None, device: torch.device | str = "cpu") -> None:
    """Make every rank stop together: re-raise this rank's ``error``, or raise ``PeerFailed`` if another failed.

    A collective that every rank must reach (so one rank's error cannot leave the others waiting forever). The
    message of the lowest failing rank travels to the others as bytes (no pickling).

    Args:
        error: what this rank raised in the section just run, or None.
        device: where the collective's tensors live (the rank's device; NCCL needs CUDA tensors).
    """
    if not _active():
        if error is not None:
            raise error
        return
    rank, world = dist.get_rank(), dist.get_world_size()
    flags = torch.zeros(world, device=device)
    flags[rank] = float(error is not None)
    dist.all_reduce(flags)
    failed = flags.nonzero().flatten().tolist()
    if not failed:
        return
    first = int(failed[0])
    message = torch.zeros(_MESSAGE_BYTES, dtype=torch.uint8, device=device)
    text = (str(error) or type(error).__name__).encode()[:_MESSAGE_BYTES] if rank == first else b""
    if text:
        message[: len(text)] = torch.tensor(list(text), dtype=torch.uint8, device=device)
    dist.broadcast(message, first)
    if error is not None:
        raise error
    sent = bytes(message.cpu().tolist()).rstrip(b"\0").decode(errors="replace")
    raise PeerFailed(f"rank {first} stopped: {sent}")


class ShardedBatches:
    """This rank's slice of every batch of a global stream (``data.TaskBatches``).

    Every rank holds an identical stream (same seed), draws the same global batch of B images and keeps images
    ``[rank * B/W, (rank + 1) * B/W)``: the W slices together are exactly the single-process batch. Augmentation
    runs on the whole global batch on every rank, so the random draws stay in step.

    Args:
        stream: the global batch stream; its ``state_dict`` is the run's (identical on every rank).
        env: this rank's place in the job.
    """

    def __init__(self, stream: Any, env: DistEnv) -> None:
        if stream.batch_size % env.world_size:
            name = stream.data.spec.name
            capped = stream.batch_size == stream.num_images  # TaskBatches caps the batch at the split's size
            why = f" (task {name!r} has only {stream.num_images} training images)" if capped else ""
            raise BadConfig(
                f"batch size {stream.batch_size}{why} is not divisible by the {env.world_size} processes; "
                f"use a --batch-size that is a multiple of {env.world_size}"
            )
        self.stream = stream
        self.env = env
        self.batch_size = stream.batch_size
        self.batches_per_epoch = stream.batches_per_epoch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = next(self.stream)
        per_rank = len(labels) // self.env.world_size
        start = self.env.rank * per_rank
        return images[start : start + per_rank], labels[start : start + per_rank]

    def state_dict(self) -> dict[str, Any]:
        return self.stream.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stream.load_state_dict(state)
