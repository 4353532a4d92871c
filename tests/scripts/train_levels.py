"""The subprocess of the native-crash test: train steps at every level of a DVN in channels-last, batch by batch.

Usage: python train_levels.py CHANNELS BATCH [BATCH ...]. Exits 0 when every step of every batch size ran; a
native crash ends it by a signal. Each batch size is named on stderr before it runs, so a crash names its batch.
One process runs all the batch sizes: torch is imported once instead of once per case (most of the test's time).
"""

import sys

import torch
import torch.nn.functional as F

from dvn_cli.config import BackboneConfig, TaskSpec
from dvn_cli.core.network import build_network

channels, batches = int(sys.argv[1]), [int(b) for b in sys.argv[2:]]
torch.set_num_threads(2)
torch.manual_seed(0)
config = BackboneConfig(depth=8, widths=(32, 64, 128), units=4, in_channels=channels, input_size=16, stem_stride=1)
tasks = [TaskSpec("a", tuple("0123456789"), (0.5,) * channels, (0.25,) * channels)]
network = build_network(config, tasks).to(memory_format=torch.channels_last).train()
for batch in batches:
    print(f"batch {batch}", file=sys.stderr, flush=True)
    x = torch.randn(batch, channels, 16, 16).to(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,))
    for _ in range(3):
        network.zero_grad(set_to_none=True)
        loss = sum(F.cross_entropy(network(x, "a", level), y) for level in range(1, 5))
        loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in network.parameters() if p.grad is not None)
print("ok")
