"""Build a two-task Deep Virtual Network with the dvn library, run each task at every level, print the sizes.

python examples/two_task_dvn.py
"""

import torch

from dvn_cli import BackboneConfig, TaskSpec, build_network
from dvn_cli.core.cost import level_cost, stored_params

config = BackboneConfig(depth=14, widths=(32, 64, 128), units=4, in_channels=1, input_size=28, stem_stride=2)
tasks = [
    TaskSpec(name="digits", classes=tuple("0123456789")),
    TaskSpec(
        name="clothes",
        classes=("top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot"),
    ),
]
network = build_network(config, tasks).eval()
images = torch.randn(2, 1, 28, 28)

print(f"physical network: {stored_params(network):,} parameters stored once for both tasks")
for task, order in zip(network.task_names, network.layout.orders, strict=True):
    print(f"{task}: unit order {list(order)}")
    for level in range(1, network.units + 1):
        with torch.no_grad():
            logits = network(images, task, level)
        cost = level_cost(network, task, level)
        print(
            f"  level {level}: units {list(network.layout.level_units(network.task_index(task), level))} "
            f"logits {tuple(logits.shape)}  params {cost.params:,}  with bn+head {cost.params_total:,}  "
            f"MACs {cost.macs:,}"
        )
