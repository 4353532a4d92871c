"""The docs contract: every command has help, and every `dvn ...` line in the README parses."""

import re
import shlex
from pathlib import Path

import pytest
import typer.main
from typer.testing import CliRunner

from dvn_cli.cli.app import app

README = Path(__file__).resolve().parents[1] / "README.md"
GROUP = typer.main.get_command(app)


def readme_commands() -> list[str]:
    blocks = re.findall(r"```(\w*)\n(.*?)```", README.read_text(), flags=re.S)
    shell = [body for lang, body in blocks if lang in ("", "bash", "sh", "console")]
    lines = [line.split("  #")[0].strip() for block in shell for line in block.splitlines()]
    return [line for line in lines if line.startswith("dvn ")]


def parse(line: str) -> dict:
    """Parse a command line exactly as `dvn` would, without running it; raises on unknown options."""
    tokens = shlex.split(line)[1:]
    command, ctx = GROUP, GROUP.context_class(GROUP, info_name="dvn")
    while hasattr(command, "get_command"):
        name, tokens = tokens[0], tokens[1:]
        command = command.get_command(ctx, name)
        assert command is not None, f"unknown command {name!r} in {line!r}"
        ctx = command.context_class(command, info_name=name, parent=ctx)
    return command.make_context(ctx.info_name, tokens, parent=ctx.parent).params


def all_commands() -> list[list[str]]:
    ctx = GROUP.context_class(GROUP, info_name="dvn")
    paths = []
    for name in GROUP.list_commands(ctx):
        sub = GROUP.get_command(ctx, name)
        if hasattr(sub, "list_commands"):
            paths += [[name, child] for child in sub.list_commands(ctx)]
        else:
            paths.append([name])
    return paths


def test_readme_has_commands_for_each_main_job():
    commands = readme_commands()
    for expected in ("dvn train --tasks cifar10,svhn", "dvn eval --task svhn --budget 3", "dvn export"):
        assert expected in commands


@pytest.mark.parametrize("line", readme_commands())
def test_each_readme_command_parses(line):
    parse(line)


@pytest.mark.parametrize("path", all_commands(), ids=" ".join)
def test_every_command_has_help(path):
    result = CliRunner().invoke(app, [*path, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage: dvn" in result.output and len(result.output.splitlines()) > 5


def test_expected_commands_exist():
    names = {" ".join(p) for p in all_commands()}
    assert {"train", "eval", "prune-level", "export", "info", "plan", "data prepare"} <= names


def test_version_has_one_source():
    from dvn_cli import __version__

    result = CliRunner().invoke(app, ["--version"])
    assert result.stdout == f"dvn {__version__}\n"


def test_readme_is_short_with_a_quick_start_from_training_to_serving():
    text = README.read_text()
    assert len(text.splitlines()) <= 150
    quick = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    commands = [line.split("  #")[0].strip() for line in quick.splitlines() if line.startswith("dvn ")]
    verbs = [shlex.split(c)[1] for c in commands]
    assert {"train", "eval", "plan", "export", "serve", "predict"} <= set(verbs)
    for command in commands:
        parse(command)
