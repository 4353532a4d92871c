"""Deployable models of (task, level) pairs: batch norm folded, ONNX (or torch.export) files and a manifest.

Each (task, level) is first taken as a plain network (``ModelFile.plain_of``), then every convolution that
feeds its batch norm is fused with it (eval-mode statistics become a bias) and the model is written in a
registered export format. ``onnx`` is checked against PyTorch with onnxruntime; ``torch-export`` writes a
``torch.export`` program (``.pt2``). ``manifest.json`` beside the files says, per model, everything a deployer
without dvn needs: file and sha256, classes in output order, cost, and the preprocessing of a raw image whose
pixel values are scaled to 0..1 (docs/design.md §5). File names, the manifest and the staged swap that replaces
an earlier export are ``export_folder``'s, shared with ``shared_export``; the checks here are shared too.

ONNX uses PyTorch's TorchScript-based exporter (``dynamo=False``): it needs only ``onnx`` and ``onnxruntime``
(the ``export`` extra), runs offline, and writes one self-contained file. The dynamo exporter would add
``onnxscript`` to the extra; switch when PyTorch drops the TorchScript path. onnx and onnxruntime are imported
lazily so that dvn works without them.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import io
import json
import os
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import __version__
from ..core.plain import PlainNetwork
from ..core.sizes import STORAGE_PRECISIONS, check_precision
from ..errors import BadConfig, DvnError
from ..fsutil import sha256_file, write_atomic
from ..modelfile.base import ModelFile
from ..modelfile.registry import open_model
from ..modelfile.spec import CompactSpec
from .folder import (
    MANIFEST_NAME,
    LogitCheck,
    WrittenManifest,
    build_manifest,
    is_export_file_name,
    model_entry,
    pair_file_name,
    preprocess_of,
    requested_pairs,
    source_entry,
    staged_export,
)
from .precision import lower_onnx

__all__ = [
    "CHECK_TOLERANCE",
    "EXPORT_FORMATS",
    "MANIFEST_NAME",
    "ExportFormat",
    "LogitCheck",
    "NonFiniteLogits",
    "check_onnx",
    "check_torch_program",
    "export_models",
    "export_onnx",
    "export_torch_program",
    "fold_batchnorm",
    "compare_logits",
    "import_optional",
    "non_finite_stops_export",
    "preprocess_of",
    "register_export_format",
    "stamp_onnx",
    "task_inputs",
    "trace_onnx",
]

CHECK_TOLERANCE = 1e-4
"""Largest |exported - PyTorch| logit difference that callers should accept without a warning."""
INSTALL_HINT = "pip install 'dvn-cli[export]'"

Inputs = torch.Tensor | Sequence[torch.Tensor] | None


# ------------------------------------------------------------------------------------------------ folding


def _conv_bn_pairs(module: nn.Module) -> list[tuple[str, str]]:
    """(conv, bn) module names where a ``Conv2d``'s only use is to feed a ``BatchNorm2d``, found by fx tracing."""
    graph = torch.fx.symbolic_trace(module).graph
    modules = dict(module.named_modules())
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    pairs: list[tuple[str, str]] = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules[node.target], nn.BatchNorm2d) or len(node.args) != 1:
            continue
        src = node.args[0]
        if (
            isinstance(src, torch.fx.Node)
            and src.op == "call_module"
            and isinstance(src.target, str)  # always, for call_module: the called module's name
            and isinstance(modules[src.target], nn.Conv2d)
            and len(src.users) == 1
            and calls[src.target] == calls[node.target] == 1  # a module called twice cannot be fused in place
        ):
            pairs.append((src.target, node.target))
    return pairs


def set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` in place of ``root``'s submodule ``name`` (a dotted path)."""
    parent, _, attr = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, attr, module)


def norm_scale_shift(norm: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """The eval-mode batch norm ``norm`` as float64 ``(scale, shift)``: ``y = x * scale + shift`` per channel."""
    # a plain twin's batch norms track running statistics (nn.BatchNorm2d's default)
    assert norm.running_var is not None and norm.running_mean is not None
    with torch.no_grad():
        var, mean = norm.running_var.double(), norm.running_mean.double()
        scale = norm.weight.double() / torch.sqrt(var + norm.eps)
        return scale, norm.bias.double() - mean * scale


def fold_batchnorm(plain: nn.Module) -> nn.Module:
    """An eval-mode copy of ``plain`` in which each Conv2d → BatchNorm2d pair is one Conv2d with a bias.

    The batch norm becomes ``nn.Identity``; outputs equal the eval-mode outputs of ``plain`` to float tolerance.
    ``plain`` itself is not changed.
    """
    folded = copy.deepcopy(plain).eval()
    for conv_name, bn_name in _conv_bn_pairs(folded):
        conv, bn = folded.get_submodule(conv_name), folded.get_submodule(bn_name)
        assert isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d)  # what _conv_bn_pairs found
        set_submodule(folded, conv_name, torch.nn.utils.fusion.fuse_conv_bn_eval(conv, bn))
        set_submodule(folded, bn_name, nn.Identity())
    return folded.requires_grad_(False)


# ------------------------------------------------------------------------------------------------ helpers


def _example_input(config, batch: int = 1, device: torch.device | str = "cpu") -> torch.Tensor:
    return torch.zeros(batch, config.in_channels, config.input_size, config.input_size, device=device)


def _sample_batches(plain: nn.Module, inputs: Inputs) -> list[torch.Tensor]:
    """Batches to compare on: the given ones, plus the first image alone; else seeded noise of batch 1 and 4 (of a
    ``PlainNetwork``'s input shape)."""
    if inputs is None:
        if not isinstance(plain, PlainNetwork):
            raise TypeError(f"sample inputs are needed to check a {type(plain).__name__}, which has no input shape")
        generator = torch.Generator().manual_seed(0)
        cfg = plain.config
        shape = (cfg.in_channels, cfg.input_size, cfg.input_size)
        return [torch.randn(1, *shape, generator=generator), torch.randn(4, *shape, generator=generator)]
    batches = [inputs] if isinstance(inputs, torch.Tensor) else list(inputs)
    batches = [b.detach().float().cpu() for b in batches if b.shape[0] > 0]
    if not batches:
        raise DvnError("no sample inputs to check the export against")
    if all(b.shape[0] > 1 for b in batches):
        batches.append(batches[0][:1])
    return batches


@torch.no_grad()
def _reference_logits(plain: nn.Module, x: torch.Tensor) -> torch.Tensor:
    device = next(plain.parameters()).device
    was_training = plain.training
    try:
        return plain.eval()(x.to(device)).float().cpu()
    finally:
        plain.train(was_training)


class NonFiniteLogits(DvnError):
    """An exported model, or the PyTorch model it came from, gives NaN or infinite logits."""


@contextlib.contextmanager
def non_finite_stops_export(label: str, task: str, level: int) -> Iterator[None]:
    """A check that meets non-finite logits ends the export with one line naming the source and the pair."""
    try:
        yield
    except NonFiniteLogits:
        raise NonFiniteLogits(
            f"{label}: {task} level {level} gives non-finite logits (NaN or infinity); nothing exported"
        ) from None


def _logit_difference(label: str | os.PathLike, got: torch.Tensor, expected: torch.Tensor) -> tuple[float, int]:
    """(largest |got - expected|, rows with the same top class); a non-finite logit is an error naming ``label``."""
    if not (bool(torch.isfinite(got).all()) and bool(torch.isfinite(expected).all())):
        raise NonFiniteLogits(f"{label} gives non-finite logits (NaN or infinity)")
    return float((got - expected).abs().max()), int((got.argmax(1) == expected.argmax(1)).sum())


def compare_logits(
    run: Callable[[torch.Tensor], torch.Tensor], plain: nn.Module, inputs: Inputs, label: str | os.PathLike
) -> LogitCheck:
    """``run`` against ``plain`` over the sample batches of ``inputs``: how every export is checked.

    Args:
        run: the exported model as a batch -> logits function.
        plain: the PyTorch model it was made from (compared in eval mode, float32).
        inputs: preprocessed image batches ``(B, C, H, W)``; the first image is also run alone. Default: seeded
            noise of batch 1 and 4.
        label: what a non-finite logit is blamed on.
    """
    worst, same, rows = 0.0, 0, 0
    for x in _sample_batches(plain, inputs):
        diff, agree = _logit_difference(label, run(x), _reference_logits(plain, x))
        worst, same, rows = max(worst, diff), same + agree, rows + x.shape[0]
    return LogitCheck(worst, same / rows)


def task_inputs(sample_inputs: torch.Tensor | Mapping[str, torch.Tensor] | None, task: str) -> Inputs:
    """The sample batches of ``task``: one tensor for every task, or one per task name."""
    if isinstance(sample_inputs, Mapping):
        return sample_inputs.get(task)
    return sample_inputs


def import_optional(name: str):
    """Import ``name`` lazily, or say how to install the ``export`` extra."""
    try:
        return importlib.import_module(name)
    except ImportError:
        raise DvnError(f"ONNX export needs onnx and onnxruntime ({name} is missing): {INSTALL_HINT}") from None


def _require_onnx() -> None:
    import_optional("onnx")
    import_optional("onnxruntime")


# ------------------------------------------------------------------------------------------------ onnx


def trace_onnx(module: nn.Module, config, opset: int, constant_folding: bool) -> bytes:
    """``module`` as ONNX bytes from PyTorch's TorchScript exporter: input ``input`` with a dynamic batch axis,
    output ``logits``. The one place dvn calls the exporter (per-pair and shared exports)."""
    buffer = io.BytesIO()
    with warnings.catch_warnings():  # the TorchScript exporter announces its own deprecation
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            (_example_input(config),),
            # torch annotates f as a path, but its TorchScript exporter (dynamo=False) writes to a BytesIO too
            # (torch.onnx._internal.torchscript_exporter.onnx_proto_utils._export_file takes io.BytesIO | str)
            buffer,  # type: ignore[arg-type]
            dynamo=False,
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
            opset_version=opset,
            do_constant_folding=constant_folding,
        )
    return buffer.getvalue()


def stamp_onnx(model, spec: CompactSpec, producer: str, **extra: str) -> None:
    """Write the spec (task, level, units, classes, preprocessing, source) into an ONNX model's metadata."""
    model.producer_name, model.producer_version = "dvn", __version__
    model.doc_string = f"{producer}: task {spec.task.name} level {spec.level} of {spec.k} (units {list(spec.units)})"
    props = {
        "dvn_task": spec.task.name,
        "dvn_level": str(spec.level),
        "dvn_units": json.dumps(list(spec.units)),
        "dvn_classes": json.dumps(list(spec.task.classes)),
        "dvn_preprocess": json.dumps(preprocess_of(spec)),
        "dvn_source_sha256": spec.source_sha256,
        **extra,
    }
    for key, value in props.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value


def _onnx_bytes(plain: PlainNetwork, spec: CompactSpec, opset: int, precision: str = "fp32") -> bytes:
    """Fold, export with a dynamic batch axis, store the convolution weights at ``precision``
    (``precision.lower_onnx``), stamp the spec into the model's metadata, check the graph."""
    onnx = import_optional("onnx")
    folded = fold_batchnorm(plain).cpu()
    model = onnx.load_from_string(trace_onnx(folded, plain.config, opset, constant_folding=True))
    lower_onnx(model, precision)
    stamp_onnx(model, spec, "dvn", dvn_precision=precision)
    onnx.checker.check_model(model)
    return model.SerializeToString()


def export_onnx(
    plain: PlainNetwork, spec: CompactSpec, path: str | os.PathLike, opset: int = 17, precision: str = "fp32"
) -> Path:
    """Write ``plain`` (batch norm folded) as one self-contained ONNX file, atomically.

    Input ``input``: float32 ``(batch, C, H, W)`` after preprocessing; output ``logits``: ``(batch, classes)``.
    The spec (task, level, units, classes, preprocessing) is stored in the model's ``metadata_props``; the
    convolution weights at ``precision`` (``fp32``, ``fp16``, ``int8``: ``export.precision``).
    """
    return write_atomic(path, _onnx_bytes(plain, spec, opset, check_precision(precision)))


def check_onnx(path: str | os.PathLike, plain: nn.Module, inputs: Inputs = None) -> LogitCheck:
    """onnxruntime (CPU) against PyTorch logits on sample batches (``compare_logits``).

    Args:
        path: an ONNX file written by ``export_onnx``.
        plain: the PyTorch model it was made from (compared in eval mode).
        inputs: preprocessed image batches ``(B, C, H, W)``; the first image is also run alone. Default: seeded
            noise of batch 1 and 4.
    """
    ort = import_optional("onnxruntime")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return compare_logits(
        lambda x: torch.from_numpy(session.run(["logits"], {"input": x.numpy()})[0]), plain, inputs, path
    )


# ------------------------------------------------------------------------------------------------ torch.export


def _torch_program_bytes(plain: PlainNetwork, spec: CompactSpec, opset: int, precision: str = "fp32") -> bytes:
    del spec, opset, precision  # the program carries its own graph; the manifest carries the spec; float32 only
    folded = fold_batchnorm(plain).cpu()
    batch = torch.export.Dim("batch", min=1)
    program = torch.export.export(folded, (_example_input(plain.config, 2),), dynamic_shapes=({0: batch},))
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    return buffer.getvalue()


def export_torch_program(plain: PlainNetwork, spec: CompactSpec, path: str | os.PathLike) -> Path:
    """Write ``plain`` (batch norm folded) as a ``torch.export`` program (``.pt2``) with a dynamic batch axis.

    Load it with ``torch.export.load(path).module()``; no dvn needed. Weights are stored raw, but PyTorch's
    archive also records the example input with ``torch.save``: treat ``.pt2`` files like any PyTorch file.
    """
    return write_atomic(path, _torch_program_bytes(plain, spec, 0))


def check_torch_program(path: str | os.PathLike, plain: nn.Module, inputs: Inputs = None) -> LogitCheck:
    """The loaded ``.pt2`` program against PyTorch logits on sample batches (``compare_logits``)."""
    program = torch.export.load(str(path)).module()
    with torch.no_grad():
        return compare_logits(program, plain, inputs, path)


# ------------------------------------------------------------------------------------------------ registry


@dataclass(frozen=True)
class ExportFormat:
    """A deployable format: file suffix, ``to_bytes(plain, spec, opset, precision)``, ``check(path, plain, inputs)``
    and the precisions it can store weights at."""

    suffix: str
    to_bytes: Callable[[PlainNetwork, CompactSpec, int, str], bytes]
    check: Callable[[Path, nn.Module, Inputs], LogitCheck]
    requires: Callable[[], object] = lambda: None
    precisions: tuple[str, ...] = ("fp32",)


EXPORT_FORMATS: dict[str, ExportFormat] = {}


def register_export_format(name: str, fmt: ExportFormat) -> None:
    if name in EXPORT_FORMATS:
        raise ValueError(f"export format {name!r} is already registered")
    EXPORT_FORMATS[name] = fmt


register_export_format("onnx", ExportFormat(".onnx", _onnx_bytes, check_onnx, _require_onnx, tuple(STORAGE_PRECISIONS)))
register_export_format("torch-export", ExportFormat(".pt2", _torch_program_bytes, check_torch_program))


# ------------------------------------------------------------------------------------------------ models


def _kept_models(out_dir: Path, old: dict[str, Any] | None, models: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Entries of an earlier manifest of the same source whose files still hold what it says; ours replace."""
    if old is None or old.get("layout") is not None:  # a shared export's graphs need its weights file: not kept
        return []
    ours = [(m["task"], m["level"]) for m in models] + [m["file"] for m in models]  # a list: old values may not hash
    kept = []
    for m in old["models"]:
        if not is_export_file_name(m.get("file")) or (m.get("task"), m.get("level")) in ours or m["file"] in ours:
            continue
        file = out_dir / m["file"]
        if file.is_file() and not file.is_symlink() and sha256_file(file) == m.get("sha256"):
            kept.append(m)
    return kept


def export_models(
    source: ModelFile | str | os.PathLike,
    out_dir: str | os.PathLike,
    pairs: Sequence[tuple[int | str, int]] | None = None,
    check: bool = True,
    sample_inputs: torch.Tensor | Mapping[str, torch.Tensor] | None = None,
    format: str = "onnx",
    opset: int = 17,
    force: bool = False,
    precision: str = "fp32",
) -> WrittenManifest:
    """Write one deployable file per (task, level) and ``manifest.json`` into ``out_dir``; never prints.

    Every file is built and checked in a staging folder first and swapped into place only when all succeed
    (``export_folder.staged_export``), so a failed export leaves the folder as it was.

    Args:
        source: any dvn model file (``modelfile.open_model``), loaded or its path.
        out_dir: folder for the files; created when missing.
        pairs: ``(task name or index, level)`` pairs; None for every pair the source holds.
        check: run each file against PyTorch and record the largest logit difference.
        sample_inputs: preprocessed batches to check on, one for all tasks or one per task name; default noise.
        format: a name in ``EXPORT_FORMATS`` (``onnx``, ``torch-export``).
        opset: ONNX opset.
        force: replace an export of ANOTHER source, or a manifest dvn did not write, in ``out_dir``.
        precision: what the convolution weights are stored at: ``fp32``, ``fp16`` or ``int8`` (ONNX only). The check
            compares with the float32 PyTorch model either way.

    Returns:
        The manifest written (``models`` also keeps earlier entries of the same source file), with the files of
        the previous export it no longer lists (``removed``, ``left``).
    """
    if format not in EXPORT_FORMATS:
        raise DvnError(f"unknown export format {format!r}; known: {', '.join(EXPORT_FORMATS)}")
    fmt = EXPORT_FORMATS[format]
    if check_precision(precision) not in fmt.precisions:
        raise BadConfig(f"{format} stores float32 weights only; --precision {precision} needs --format onnx")
    fmt.requires()
    model = source if isinstance(source, ModelFile) else open_model(source)
    selected = requested_pairs(model, pairs)
    source_info = source_entry(model, selected[0])
    with staged_export(out_dir, source_info, force) as stage:
        models = []
        for task, level in selected:
            plain, spec = model.plain_of(task, level), model.spec_of(task, level)
            name = pair_file_name(task, level, fmt.suffix)
            data = fmt.to_bytes(plain, spec, opset, precision)
            path = write_atomic(stage.file(name), data)
            with non_finite_stops_export(model.label, task, level):
                result = fmt.check(path, plain, task_inputs(sample_inputs, task)) if check else None
            models.append(model_entry(spec, name, data, format, result, precision=precision))
        kept = [] if force else _kept_models(stage.out, stage.previous, models)
        return stage.commit(build_manifest(source_info, kept + models))
