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
DOCUMENTED = ("demo", "spatial-info", "stmgac domains", "c2l pretrain", "c2l adapt", "c2l fill")


def _subparsers(parser: argparse.ArgumentParser) -> argparse._SubParsersAction:
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))


def _registered(command: str) -> argparse.ArgumentParser:
    """The parser a module's own ``register`` builds for ``command`` (its registered name)."""
    module, name, _ = cli.COMMANDS[command]
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    importlib.import_module(module).register(sub)
    return sub.choices[name]


def _listed(parser: argparse.ArgumentParser, prefix: str = "") -> dict:
    """Every command the parser lists (groups' commands as 'GROUP COMMAND') -> its summary."""
    out = {}
    for action in _subparsers(parser)._choices_actions:
        child = _subparsers(parser).choices[action.dest]
        if action.dest in cli.GROUPS and not prefix:
            out.update(_listed(child, f"{action.dest} "))
        else:
            out[prefix + action.dest] = action.help
    return out


def test_top_level_summaries_are_what_the_modules_register():
    """The table the --help reads (without importing) says what each module says, and every
    command of the table sits where the table puts it (models' commands in their group)."""
    everything = _listed(cli.build_parser())
    assert everything == {name: summary for name, (_, _, summary) in cli.COMMANDS.items()}
    without_imports = _listed(cli.build_parser("--none--"))
    assert without_imports == everything
    assert {"hinge train", "hinge predict", "hinge predict-slide", "hinge evaluate",
            "stmgac domains", "c2l pretrain", "c2l adapt", "c2l fill"} <= set(cli.COMMANDS)


@pytest.mark.parametrize("argv", [["--help"], *([g, "--help"] for g in cli.GROUPS),
                                  *([*c.split(), "--help"] for c in cli.COMMANDS),
                                  ["train", "--help"]],
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
    args = cli.build_parser("stmgac domains").parse_args(
        ["stmgac", "domains", "x.h5ad", "--k", "3", "--out", "d.h5ad"])
    assert imported == ["napari_hinge.stmgac.cli"] and args.k == 3
    # the others are still listed (and a typo names the valid commands)
    with pytest.raises(SystemExit):
        cli.main(["domain", "x"])
    with pytest.raises(SystemExit):
        cli.main(["stmgac", "domain", "x"])


def test_commands_run_as_GROUP_COMMAND(monkeypatch, capsys):
    """The grouped form runs the module's own command (its func, its options) and names
    itself so in errors."""
    ran = []
    monkeypatch.setattr("napari_hinge.io.cli.run", lambda args: ran.append(args) or 0)
    assert cli.main(["spatial-info", "data", "--section", "C3"]) == 0
    assert ran[-1].path == "data" and ran[-1].section == "C3"
    rc = cli.main(["c2l", "fill", "does-not-exist", "--model", "m", "--out", "o"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("napari-hinge c2l fill: error:") and "deprecated" not in err


@pytest.mark.parametrize("alias", sorted(cli.ALIASES))
def test_previous_verbs_still_run_with_a_deprecation_line(alias, capsys):
    """Today's verbs, kept for one release: the same parser as the new form, after one line on
    stderr naming it."""
    new = cli.ALIASES[alias]
    assert new in cli.COMMANDS
    with pytest.raises(SystemExit) as done:
        cli.main([alias, "--help"])
    assert done.value.code == 0
    out, err = capsys.readouterr()
    assert err.strip().splitlines() == [
        f"napari-hinge {alias} is deprecated and will be removed in the next release; "
        f"use: napari-hinge {new}"]
    assert f"usage: napari-hinge {new} " in out


def test_an_alias_runs_the_command(capsys):
    """One alias end to end (the others share the code path): `domains` on a missing file
    fails as `stmgac domains` does, after the deprecation line."""
    rc = cli.main(["domains", "no-such-file.h5ad", "--k", "3"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and "use: napari-hinge stmgac domains" in err[0]
    assert err[1].startswith("napari-hinge stmgac domains: error:") and "no-such-file" in err[1]
