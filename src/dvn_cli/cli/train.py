"""``dvn train``: an option for each setting of ``config.TrainConfig`` and ``config.BackboneConfig``, then ``fit``.

An option is its field's parameter, of the same name: ``--batch-size`` for ``batch_size``, ``--x/--no-x`` for a
bool, unless it names its flags (``-k``, ``--input-channels``, ``--orders``, ``--download``). Its help and its range
live on the field (``config.setting``); the option reads the help through ``HELP``. Every option defaults to None,
"not given", so that the config file and a resumed run's stored settings fill it
(``training.train_config.load_train_config``). A list option is one string, ``--widths 32,64,128`` or
``--orders '0,1,2,3;3,2,1,0'``, parsed into its field's list (``list_option``, ``rows_option``).
``tests/test_train_config.py`` checks that each field has exactly one option, with its help.
"""

from __future__ import annotations

import contextlib
import dataclasses
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, TypeVar

import typer

from ..config import BackboneConfig, TrainConfig
from ..errors import DvnError
from ..training.observer import TrainObserver
from . import ui, views
from .common import user_errors
from .progress import TrainProgress

__all__ = ["HELP", "train"]

HELP: dict[str, str] = {
    f.name: f.metadata["help"] for cls in (BackboneConfig, TrainConfig) for f in dataclasses.fields(cls) if f.metadata
}
"""The help of each setting, as its config field declares it."""

_BACKBONE = tuple(f.name for f in dataclasses.fields(BackboneConfig))
_TRAIN = tuple(f.name for f in dataclasses.fields(TrainConfig) if f.name != "backbone")


def train(
    ctx: typer.Context,
    *,
    # config.BackboneConfig
    arch: Annotated[str | None, typer.Option(help=HELP["arch"])] = None,
    depth: Annotated[int | None, typer.Option(help=HELP["depth"])] = None,
    widths: Annotated[str | None, typer.Option(help=HELP["widths"])] = None,
    units: Annotated[int | None, typer.Option("--units", "-k", help=HELP["units"])] = None,
    in_channels: Annotated[int | None, typer.Option("--input-channels", help=HELP["in_channels"])] = None,
    input_size: Annotated[int | None, typer.Option(help=HELP["input_size"])] = None,
    stem_stride: Annotated[int | None, typer.Option(help=HELP["stem_stride"])] = None,
    # config.TrainConfig
    tasks: Annotated[str | None, typer.Option(help=HELP["tasks"])] = None,
    order_rule: Annotated[str | None, typer.Option(help=HELP["order_rule"])] = None,
    order_table: Annotated[str | None, typer.Option("--orders", help=HELP["order_table"])] = None,
    affinity_steps: Annotated[int | None, typer.Option(help=HELP["affinity_steps"])] = None,
    epochs: Annotated[float | None, typer.Option(help=HELP["epochs"])] = None,
    batch_size: Annotated[int | None, typer.Option(help=HELP["batch_size"])] = None,
    lr: Annotated[float | None, typer.Option(help=HELP["lr"])] = None,
    momentum: Annotated[float | None, typer.Option(help=HELP["momentum"])] = None,
    weight_decay: Annotated[float | None, typer.Option(help=HELP["weight_decay"])] = None,
    warmup_steps: Annotated[int | None, typer.Option(help=HELP["warmup_steps"])] = None,
    label_smoothing: Annotated[float | None, typer.Option(help=HELP["label_smoothing"])] = None,
    level_weights: Annotated[str | None, typer.Option(help=HELP["level_weights"])] = None,
    level_sampling: Annotated[str | None, typer.Option(help=HELP["level_sampling"])] = None,
    distill: Annotated[float | None, typer.Option(help=HELP["distill"])] = None,
    seed: Annotated[int | None, typer.Option(help=HELP["seed"])] = None,
    limit: Annotated[int | None, typer.Option(help=HELP["limit"])] = None,
    val_fraction: Annotated[float | None, typer.Option(help=HELP["val_fraction"])] = None,
    data_root: Annotated[str | None, typer.Option(help=HELP["data_root"])] = None,
    download: Annotated[bool | None, typer.Option("--download", help=HELP["download"])] = None,
    data_mode: Annotated[str | None, typer.Option(help=HELP["data_mode"])] = None,
    workers: Annotated[int | None, typer.Option(help=HELP["workers"])] = None,
    augment: Annotated[bool | None, typer.Option(help=HELP["augment"])] = None,
    channels_last: Annotated[bool | None, typer.Option(help=HELP["channels_last"])] = None,
    task_threads: Annotated[bool | None, typer.Option(help=HELP["task_threads"])] = None,
    device: Annotated[str | None, typer.Option(help=HELP["device"])] = None,
    precision: Annotated[str | None, typer.Option(help=HELP["precision"])] = None,
    out: Annotated[str | None, typer.Option(help=HELP["out"])] = None,
    init: Annotated[str | None, typer.Option(help=HELP["init"])] = None,
    # the command's own
    width: Annotated[float | None, typer.Option(help="Width multiplier of the family's widths, e.g. 0.5.")] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue the run in --out with its stored settings.")
    ] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace a run already in --out.")] = False,
    config: Annotated[Path | None, typer.Option("--config", help="TOML file of these settings.")] = None,
) -> None:
    """Train one DVN on several tasks; writes the checkpoint, training state and metrics into --out.

    Under torchrun (torchrun --nproc_per_node N -m dvn_cli train ...) it trains data-parallel: --batch-size
    stays the global batch per task, each process takes its share, and only rank 0 writes and prints.
    """
    from ..data.streaming import excess_workers  # these import torch: dvn --help does not wait for it
    from ..training.distributed import detect_env
    from ..training.loop import fit
    from ..training.schedule import resolve_device
    from ..training.train_config import load_train_config

    # The settings reach the config by name: each option's parameter is named after its field.
    given = ctx.params | {
        "tasks": list_option(tasks, str, "--tasks"),
        "widths": list_option(widths, int, "--widths"),
        "order_table": rows_option(order_table, int, "--orders"),
        "level_weights": list_option(level_weights, float, "--level-weights"),
    }
    flags = {name: given[name] for name in _TRAIN}
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
        progress = TrainProgress() if main_rank else TrainObserver()
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
    views.accuracy_table(
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


# ------------------------------------------------------------------------------------------------ list options

Item = TypeVar("Item", int, float, str)


def list_option(value: str | None, kind: type[Item], flag: str) -> list[Item] | None:
    """``32,64,128`` -> ``[32, 64, 128]``: a list option's text as its field's list; None (not given) stays None."""
    return None if value is None else _split(value, [value], kind, flag)[0]


def rows_option(value: str | None, kind: type[Item], flag: str) -> list[list[Item]] | None:
    """``0,1,2,3;3,2,1,0`` -> ``[[0, 1, 2, 3], [3, 2, 1, 0]]``: ``;`` between rows (``--orders``)."""
    return None if value is None else _split(value, value.split(";"), kind, flag)


def _split(value: str, rows: list[str], kind: type[Item], flag: str) -> list[list[Item]]:
    """Each row's comma-separated items as ``kind`` (blanks skipped); one that is not refuses ``flag``'s value."""
    try:
        return [[kind(v.strip()) for v in row.split(",") if v.strip()] for row in rows]
    except ValueError:
        words = {int: "integers", float: "numbers"}.get(kind, "values")
        raise typer.BadParameter(f"must be comma-separated {words}, got {value!r}", param_hint=flag) from None
