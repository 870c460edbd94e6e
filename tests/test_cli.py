"""The command line's dispatcher: fast, light --help, and help text on every option."""

from __future__ import annotations

import argparse
import importlib
import subprocess
import sys

import pytest

from napari_hinge import cli

HEAVY = ("torch", "anndata", "napari", "scanpy", "dask")
# Subcommands whose options all carry help text (HINGE's train/predict/... still have a few
# without; they live in hinge/cli.py).
DOCUMENTED = ("demo", "spatial-info", "domains", "c2l-pretrain", "c2l-adapt", "synthesize")


def _subparsers(parser: argparse.ArgumentParser) -> argparse._SubParsersAction:
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))


def _registered(command: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    importlib.import_module(cli.COMMANDS[command][0]).register(sub)
    return sub.choices[command]


def test_top_level_summaries_are_what_the_modules_register():
    """The table the top-level --help reads (without importing) says what each module says."""
    sub = _subparsers(cli.build_parser())
    registered = {a.dest: a.help for a in sub._choices_actions}
    assert registered == {name: summary for name, (_, summary) in cli.COMMANDS.items()}


@pytest.mark.parametrize("argv", [["--help"], *([c, "--help"] for c in cli.COMMANDS)],
                         ids=lambda argv: " ".join(argv))
def test_help_imports_nothing_heavy(argv):
    code = (
        "import sys\n"
        "from napari_hinge.cli import main\n"
        "try:\n"
        f"    main({argv!r})\n"
        "except SystemExit as e:\n"
        "    assert e.code == 0, e.code\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "usage: napari-hinge" in out.stdout
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout[-300:]


@pytest.mark.parametrize("command", DOCUMENTED)
def test_every_option_has_help(command):
    parser = _registered(command)
    missing = [a.option_strings or [a.dest] for a in parser._actions
               if a.help is None and not isinstance(a, argparse._HelpAction)]
    assert not missing, f"{command}: options without help: {missing}"


def test_only_the_named_subcommand_is_imported(monkeypatch):
    imported = []
    real = importlib.import_module
    monkeypatch.setattr(cli.importlib, "import_module",
                        lambda name: imported.append(name) or real(name))
    args = cli.build_parser("domains").parse_args(["domains", "x.h5ad", "--k", "3",
                                                   "--out", "d.h5ad"])
    assert imported == ["napari_hinge.stmgac.cli"] and args.k == 3
    # the others are still listed (and a typo names the valid commands)
    with pytest.raises(SystemExit):
        cli.main(["domain", "x"])
