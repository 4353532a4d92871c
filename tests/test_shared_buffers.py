"""The shared ONNX runtime's sessions run on ITS mapped buffers, not on weights onnxruntime reads itself.

Every graph of a shared export names its blocks as external data in ``weights.safetensors``, so onnxruntime
alone would read them from the file (one private copy per session) and compute the same logits: an equality
test cannot tell sharing from not sharing. Here the file is swapped for one of zeros AFTER the runtime has
mapped it (the mapping keeps the old bytes: it holds the old inode) and BEFORE any session exists. A session
given the runtime's OrtValues (``SessionOptions.add_initializer``) still computes the exported logits; one that
reads the external data itself reads zeros.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from dvn_cli.export.shared import export_shared
from dvn_cli.modelfile.checkpoint import load_checkpoint, save_checkpoint
from dvn_cli.modelfile.shared_weights import WEIGHTS_NAME
from dvn_cli.runtime.ort import SharedOrtRuntime

from .conftest import require_module, settle_batch_norm

ort = require_module("onnxruntime")

PAIRS = [("task0", 2), ("task1", 3)]


@pytest.fixture
def shared_dir(tiny_network, tmp_path):
    checkpoint = load_checkpoint(save_checkpoint(settle_batch_norm(tiny_network), tmp_path / "model.safetensors"))
    export_shared(checkpoint, tmp_path / "shared", PAIRS, check=False)
    return tmp_path / "shared"


def _batch() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((4, 3, 12, 12)).astype(np.float32)


def _zero_the_weights_file(folder) -> None:
    """Replace ``weights.safetensors`` by a file of the same header and zero tensors (a new inode)."""
    path = folder / WEIGHTS_NAME
    data = bytearray(path.read_bytes())
    start = 8 + int.from_bytes(data[:8], "little")
    data[start:] = bytes(len(data) - start)
    swap = folder / "zeros.tmp"
    swap.write_bytes(data)
    os.replace(swap, path)


def test_sessions_run_on_the_runtime_buffers_not_on_the_file(shared_dir):
    expected = {pair: SharedOrtRuntime(shared_dir).run(*pair, _batch()) for pair in PAIRS}
    tensors = [set(SharedOrtRuntime(shared_dir).model(*pair)["tensors"]) for pair in PAIRS]
    assert tensors[0] & tensors[1], "the two pairs share no block: nothing would be shared"
    runtime = SharedOrtRuntime(shared_dir)  # maps the file; no session yet
    _zero_the_weights_file(shared_dir)
    for pair in PAIRS:
        np.testing.assert_array_equal(runtime.run(*pair, _batch()), expected[pair])
    # the control: onnxruntime reading the external data itself now sees zeros, and computes something else
    session = ort.InferenceSession(str(shared_dir / "task0-level2.onnx"), providers=["CPUExecutionProvider"])
    (alone,) = session.run(["logits"], {"input": _batch()})
    assert np.abs(alone - expected["task0", 2]).max() > 1e-2
