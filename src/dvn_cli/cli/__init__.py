"""The command line: Typer commands that parse and print, and their rich rendering.

Importing it makes the OpenMP threads of PyTorch's CPU kernels (GNU libgomp) wait passively
(``OMP_WAIT_POLICY=PASSIVE``) unless the environment says otherwise. It must be set before torch loads, which
this package's modules do. On a 2-core CPU that something else also uses, libgomp's default spin-waiting lets
each of the thousands of parallel regions of a training step wait for a thread that is not running:
a main-job step took 26 s instead of 3.8 s with passive waiting (AMD EPYC, AVX2, load average 5;
docs/results.md §2). Inference calls of a few images do not pay for it: they run on one intra-op thread
(``core/threads.py``).
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
