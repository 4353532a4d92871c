"""What one virtual network costs: parameters, float32 bytes and multiply-accumulates per image.

``params`` counts conv and linear weights (the part that grows like (l/k)^2); ``params_total`` adds that
(task, level)'s batch-norm affine parameters and its head's bias (and any convolution bias, such as the ones
folding batch norm leaves): everything a stand-alone model of it stores besides batch-norm running statistics.
``bytes`` is ``4 * params_total`` (float32; ``LevelCost`` itself lives in ``core/sizes.py``, without torch). The
paper does not say which weights its counts include, so both are reported (docs/design.md §4).

There is one counter, ``count_cost``, over ordinary layers. A (task, level) is counted as its plain twin, built
with the same shapes on the ``meta`` device (no memory, no weights copied).
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from ..config import BackboneConfig
from .network import DeepVirtualNetwork
from .plain import PlainNetwork, plain_config
from .sizes import BYTES_PER_PARAM, LevelCost

__all__ = ["BYTES_PER_PARAM", "LevelCost", "count_cost", "level_cost", "stored_params"]


def count_cost(model: nn.Module, config: BackboneConfig) -> LevelCost:
    """Count an ordinary network by running one image of ``config``'s input shape through it.

    Conv and linear weights are ``params``; their biases and batch-norm affine parameters are the extras that
    ``params_total`` adds; MACs are weights times output positions.
    """
    weights = extras = macs = 0

    def count(module: nn.Module, _inputs: tuple, output: torch.Tensor) -> None:
        nonlocal weights, extras, macs
        if isinstance(module, nn.Conv2d | nn.Linear):
            n = module.weight.numel()
            weights += n
            macs += n * (output.shape[2] * output.shape[3] if output.dim() == 4 else 1)
            extras += 0 if module.bias is None else module.bias.numel()
        elif isinstance(module, nn.BatchNorm2d) and module.affine:
            extras += module.weight.numel() + module.bias.numel()

    hooks = [m.register_forward_hook(count) for m in model.modules()]
    was_training = model.training
    try:
        model.eval()
        device = next(model.parameters()).device
        x = torch.zeros(1, config.in_channels, config.input_size, config.input_size, device=device)
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return LevelCost(params=weights, params_total=weights + extras, macs=macs)


def level_cost(network: DeepVirtualNetwork, task: int | str, level: int) -> LevelCost:
    """Cost of (task, level): its plain twin's, counted on the ``meta`` device."""
    t = network.task_index(task)
    network.layout.check(t, level)
    return _plain_cost(network.config, network.tasks[t].num_classes, level)


@functools.lru_cache(maxsize=1024)
def _plain_cost(config: BackboneConfig, num_classes: int, level: int) -> LevelCost:
    """The cost depends on shapes only (a frozen config, classes, level), so each one is counted once."""
    with torch.device("meta"):
        twin = PlainNetwork(plain_config(config, level), num_classes)
    return count_cost(twin, config)


def stored_params(network: DeepVirtualNetwork) -> int:
    """Every parameter the physical network stores: shared weights, all batch norms, all heads."""
    return sum(p.numel() for p in network.parameters())
