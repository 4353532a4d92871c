"""dvn: Deep Virtual Networks for memory-efficient inference of multiple tasks (Kim et al., CVPR 2019).

One convolutional network, trained once, serves several classification tasks at several memory budgets;
each (task, level) can be handed out as a small stand-alone model.
"""

from .config import BackboneConfig, TaskSpec, TrainConfig
from .core.network import DeepVirtualNetwork, build_network
from .errors import DvnError

__version__ = "0.1.0"

__all__ = [
    "BackboneConfig",
    "DeepVirtualNetwork",
    "DvnError",
    "TaskSpec",
    "TrainConfig",
    "__version__",
    "build_network",
]
