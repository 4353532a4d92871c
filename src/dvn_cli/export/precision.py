"""Convolution weights stored at lower precision, turned back into float32 inside standard ONNX graphs.

``fp16`` stores a weight as float16; ``int8`` stores it as int8 with one float32 scale per output channel
(symmetric, zero point 0: ``w = q * scale``, ``q`` in -127..127). In the shared export (``shared_export``) every unit
block is quantized on its own, so a block stays one tensor that every (task, level) using it shares; in the
per-pair export (``export``) each folded convolution weight is. The graph converts each stored weight to float32
just before the op that uses it, with a plain ``Cast`` (fp16) or ``DequantizeLinear`` (int8, ``axis=0``): any ONNX
runtime runs it, activations stay float32, and only the weights lose bits. Batch-norm scales and shifts, biases
and heads stay float32: they are a few percent of the bytes, per (task, level) rather than shared, and the head
writes the logits directly (docs/design.md §5).

onnx is imported by the functions that edit graphs; their callers have checked it is installed.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np

from ..core.sizes import SCALE_SUFFIX, check_precision
from ..errors import BadConfig

__all__ = ["SCALE_SUFFIX", "lower_onnx", "lower_graph", "lower_tensors", "quantize_int8"]

_INT8_MAX = 127


def quantize_int8(array: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 of ``array`` with one scale per index of its first axis: ``(q, scale)``, ``array ~ q * scale``.

    A row of zeros gets scale 1 (its ``q`` is 0), so no scale is 0 or divides by 0.
    """
    rows = array.reshape(array.shape[0], -1).astype(np.float64)
    largest = np.abs(rows).max(axis=1) if rows.size else np.zeros(array.shape[0])
    scale = np.where(largest > 0, largest / _INT8_MAX, 1.0).astype(np.float32)
    q = np.clip(np.rint(rows / scale.astype(np.float64)[:, None]), -_INT8_MAX, _INT8_MAX)
    return q.astype(np.int8).reshape(array.shape), scale


def _lower_one(name: str, array: np.ndarray, precision: str) -> dict[str, np.ndarray]:
    if precision == "fp16":
        with np.errstate(over="ignore"):  # an overflow is refused below in one line, without numpy's warning
            half = array.astype(np.float16)
        if not np.isfinite(half).all() and np.isfinite(array).all():
            raise BadConfig(f"{name} holds values beyond float16's range (65504); export at fp32 or int8")
        return {name: half}
    q, scale = quantize_int8(array)
    return {name: q, name + SCALE_SUFFIX: scale}


def lower_tensors(tensors: Mapping[str, np.ndarray], lowered: Iterable[str], precision: str) -> dict[str, np.ndarray]:
    """The tensors as stored: those named in ``lowered`` at ``precision`` (an int8 one followed by its scale),
    the others float32 as given; the order of ``tensors`` is kept."""
    check_precision(precision)
    lowered = set(lowered) if precision != "fp32" else set()
    stored: dict[str, np.ndarray] = {}
    for name, array in tensors.items():
        stored.update(_lower_one(name, array, precision) if name in lowered else {name: array})
    return stored


def lower_graph(graph, stored: Mapping[str, np.ndarray], lowered: Iterable[str], precision: str) -> None:
    """Make each initializer named in ``lowered`` hold its stored array (``lower_tensors``) and insert, just before
    its first consumer, the ``Cast`` or ``DequantizeLinear`` that its consumers now read as float32.

    Inserting it there (not at the top of the graph) keeps a float32 copy alive only while its consumer runs
    under onnxruntime's priority-based order, which follows the node order among equals.
    """
    from onnx import TensorProto, helper, numpy_helper

    check_precision(precision)
    names = set(lowered) if precision != "fp32" else set()
    if not names:
        return
    inits = {init.name: init for init in graph.initializer}
    for name in names:
        inits[name].CopyFrom(numpy_helper.from_array(stored[name], name))
        if precision == "int8":
            graph.initializer.append(numpy_helper.from_array(stored[name + SCALE_SUFFIX], name + SCALE_SUFFIX))
    nodes, converted = [], set()
    for node in graph.node:
        for name in [n for n in node.input if n in names and n not in converted]:
            if precision == "fp16":
                nodes.append(helper.make_node("Cast", [name], [f"{name}.float"], to=TensorProto.FLOAT))
            else:
                nodes.append(
                    helper.make_node("DequantizeLinear", [name, name + SCALE_SUFFIX], [f"{name}.float"], axis=0)
                )
            converted.add(name)
        node.input[:] = [f"{n}.float" if n in names else n for n in node.input]
        nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)


def lower_onnx(model, precision: str) -> None:
    """Store every convolution weight of a self-contained ONNX model (the per-pair export) at ``precision``."""
    from onnx import numpy_helper

    inits = {init.name: init for init in model.graph.initializer}
    weights = {n.input[1] for n in model.graph.node if n.op_type == "Conv" and n.input[1] in inits}
    tensors = {name: numpy_helper.to_array(inits[name]) for name in sorted(weights)}
    lower_graph(model.graph, lower_tensors(tensors, weights, precision), weights, precision)
