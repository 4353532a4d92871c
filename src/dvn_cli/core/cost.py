"""What one virtual network costs: parameters, float32 bytes and multiply-accumulates per image.

``params`` counts conv and linear weights (the part that grows like (l/k)^2); ``params_total`` adds that
(task, level)'s batch-norm affine parameters and its head's bias: everything a stand-alone model of it stores
besides batch-norm running statistics. ``bytes`` is ``4 * params_total`` (float32). The paper does not say
which weights its counts include, so both are reported.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from .layers import LevelBatchNorm2d, UnitConv2d, UnitLinear
from .network import DeepVirtualNetwork

__all__ = ["LevelCost", "level_cost", "stored_params"]

BYTES_PER_PARAM = 4


@dataclass(frozen=True)
class LevelCost:
    """Size and compute of one (task, level)."""

    params: int
    params_total: int
    macs: int

    @property
    def bytes(self) -> int:
        return BYTES_PER_PARAM * self.params_total

    def to_dict(self) -> dict[str, int]:
        return {**asdict(self), "bytes": self.bytes}


def level_cost(network: DeepVirtualNetwork, task: int | str, level: int) -> LevelCost:
    """Count (task, level) by running one image through it and reading each unit layer's active shape."""
    t = network.task_index(task)
    network.layout.check(t, level)
    weights = extras = macs = 0

    def count(module: torch.nn.Module, _inputs: tuple, output: torch.Tensor) -> None:
        nonlocal weights, extras, macs
        if isinstance(module, UnitConv2d):
            out_c, in_c = module.active_shape(t, level)
            n = out_c * in_c * module.weight.shape[2] * module.weight.shape[3]
            weights += n
            macs += n * output.shape[2] * output.shape[3]
        elif isinstance(module, UnitLinear):
            out_f, in_f = module.active_shape(t, level)
            weights += out_f * in_f
            extras += out_f  # bias
            macs += out_f * in_f
        elif isinstance(module, LevelBatchNorm2d):
            extras += sum(p.numel() for p in module.norm(t, level).parameters())

    hooks = [
        m.register_forward_hook(count)
        for m in network.modules()
        if isinstance(m, UnitConv2d | UnitLinear | LevelBatchNorm2d)
    ]
    was_training = network.training
    try:
        network.eval()
        cfg = network.config
        param = next(network.parameters())
        x = torch.zeros(1, cfg.in_channels, cfg.input_size, cfg.input_size, device=param.device)
        with torch.no_grad():
            network(x, t, level)
    finally:
        for h in hooks:
            h.remove()
        network.train(was_training)
    return LevelCost(params=weights, params_total=weights + extras, macs=macs)


def stored_params(network: DeepVirtualNetwork) -> int:
    """Every parameter the physical network stores: shared weights, all batch norms, all heads."""
    return sum(p.numel() for p in network.parameters())
