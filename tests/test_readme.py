"""The README's command lines keep working: every ``napari-hinge`` line of its bash blocks
parses with the real parser (options that exist, required ones given), and the fast ones
(``spatial-info``, ``--help``) run as written from the repository root."""

from __future__ import annotations

import importlib.util
import shlex
import subprocess
import sys

import pytest

from conftest import REPO
from napari_hinge import cli

README = REPO / "README.md"
FAST = ("spatial-info",)  # seconds each; the others train or predict for minutes


def _first_hour():
    """scripts/first_hour.py, which owns how the README is cut into steps."""
    spec = importlib.util.spec_from_file_location("first_hour", REPO / "scripts" / "first_hour.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def readme_commands() -> list[list[str]]:
    """The argv of each ``napari-hinge ...`` line in the README's bash blocks."""
    steps = _first_hour().readme_steps(README)
    return [shlex.split(s["code"])[1:] for s in steps
            if s["kind"] == "bash" and s["code"].startswith("napari-hinge ")]


COMMANDS = readme_commands()


def _id(argv: list[str]) -> str:
    return " ".join(argv)[:60]


def _name(argv: list[str]) -> str:
    """The command of a command line: 'GROUP COMMAND' for a model's."""
    return " ".join(argv[:2]) if argv[0] in cli.GROUPS else argv[0]


def test_the_readme_has_command_lines():
    names = {_name(argv) for argv in COMMANDS}
    assert names >= {"spatial-info", "stmgac domains", "demo", "hinge train", "c2l adapt"}
    # the README shows the grouped form only (the previous verbs are aliases for one release)
    assert not names & set(cli.ALIASES) and names <= set(cli.COMMANDS)


@pytest.mark.parametrize("argv", COMMANDS, ids=_id)
def test_readme_command_parses(argv):
    parser = cli.build_parser(_name(argv))
    if "--help" in argv or "-h" in argv:
        with pytest.raises(SystemExit) as done:
            parser.parse_args(argv)
        assert done.value.code == 0
        return
    args = parser.parse_args(argv)
    assert [args.command, *filter(None, [getattr(args, "subcommand", None)])] == \
        _name(argv).split() and callable(args.func)


@pytest.mark.parametrize("argv", [a for a in COMMANDS if _name(a) in FAST] or [None], ids=str)
def test_fast_readme_command_runs_as_written(argv):
    if argv is None:
        pytest.skip("no fast command in the README")
    done = subprocess.run([sys.executable, "-m", "napari_hinge.cli", *argv], cwd=REPO,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "spots" in done.stdout


@pytest.mark.parametrize("command", sorted({_name(argv) for argv in COMMANDS}))
def test_readme_command_help(command):
    done = subprocess.run([sys.executable, "-m", "napari_hinge.cli", *command.split(), "--help"],
                          cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0 and f"usage: napari-hinge {command}" in done.stdout
