"""How a run computes: the device, the precision of the forward, the optimiser and the learning-rate schedule."""

from __future__ import annotations

import math

import torch

from ..config import PRECISIONS, TrainConfig
from ..core.network import DeepVirtualNetwork
from ..errors import BadConfig

__all__ = ["AUTOCAST_DTYPES", "lr_at", "make_optimizer", "resolve_device", "resolve_precision"]


def resolve_device(device: str) -> torch.device:
    """``cpu``, ``cuda``, ``cuda:N`` or ``auto`` (CUDA when available)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise BadConfig(f"device {device!r} asked for but CUDA is not available here; use --device cpu")
    try:
        return torch.device(device)
    except RuntimeError:
        raise BadConfig(f"unknown device {device!r}; use cpu, cuda or auto") from None


def lr_at(step: int, total_steps: int, base_lr: float, warmup_steps: int) -> float:
    """Linear warm-up then cosine decay to zero: a pure function of the step, so resume needs no state."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * base_lr * (1.0 + math.cos(math.pi * min(1.0, progress)))


def make_optimizer(network: DeepVirtualNetwork, cfg: TrainConfig) -> torch.optim.SGD:
    """SGD with Nesterov momentum; weight decay on conv and linear weights only (not batch norm or biases)."""
    decay = [p for p in network.parameters() if p.dim() > 1]
    no_decay = [p for p in network.parameters() if p.dim() <= 1]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0)


AUTOCAST_DTYPES: dict[str, torch.dtype | None] = {
    name: None if dtype == "float32" else getattr(torch, dtype) for name, dtype in PRECISIONS.items()
}
"""``--precision`` -> the autocast dtype of the training forward (None: plain float32), from ``PRECISIONS``."""


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``precision`` on ``device``, refusing what the device cannot do.

    Weights, optimizer state and checkpoints stay float32; only the training forward runs in the lower
    precision. ``fp16`` adds gradient scaling. It runs on CPU too (PyTorch >= 2.3 autocasts float16 there), but
    only GPUs gain speed from it; ``bf16`` is the CPU choice where the CPU has bfloat16 instructions.
    """
    if precision not in AUTOCAST_DTYPES:
        raise BadConfig(f"unknown precision {precision!r}; use {', '.join(AUTOCAST_DTYPES)}")
    dtype = AUTOCAST_DTYPES[precision]
    if dtype is torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise BadConfig(f"this GPU ({torch.cuda.get_device_name(device)}) has no bfloat16; use --precision fp16")
    if dtype is not None and not torch.amp.is_autocast_available(device.type):
        raise BadConfig(f"this PyTorch cannot autocast on {device.type}; use --precision fp32")
    return dtype
