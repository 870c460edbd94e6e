"""The command line: every job the widgets run, headless.

Each feature module contributes its subcommands through a ``register(subparsers)``
function, so this file stays a thin dispatcher. Only the module of the subcommand being run
is imported: ``napari-hinge --help`` imports none of them (no torch, anndata or napari).
"""

from __future__ import annotations

import argparse
import importlib
import sys

# Subcommand -> (module whose ``register(subparsers)`` adds it, the one line the top-level
# --help lists without importing the module; tests/test_cli.py checks they match).
COMMANDS = {
    "demo": ("napari_hinge.demo", "open the shipped sample (headless: screenshots)"),
    "spatial-info": (
        "napari_hinge.io.cli",
        "read spatial data (Space Ranger outs/, her2st folder, .h5ad) and describe it",
    ),
    "domains": ("napari_hinge.stmgac.cli",
                "find spatial domains with STMGAC and write them to an h5ad (and a label TIFF)"),
    "train": ("napari_hinge.hinge.cli", "train HINGE on spatial datasets"),
    "predict": ("napari_hinge.hinge.cli", "predict expression on spots with HINGE"),
    "evaluate": ("napari_hinge.hinge.cli", "score HINGE against measured expression"),
    "predict-slide": ("napari_hinge.hinge.cli",
                      "paint predicted expression maps over a whole slide"),
    "predict-cohort": ("napari_hinge.hinge.cli",
                       "paint expression maps over many slides on a dask cluster"),
    "c2l-pretrain": ("napari_hinge.c2l.cli", "pre-train a C2L-ST central model"),
    "c2l-adapt": ("napari_hinge.c2l.cli", "adapt a C2L-ST local model on paired spots"),
    "synthesize": ("napari_hinge.c2l.cli", "fill a sparse region with synthetic H&E"),
}
# The modules that may register subcommands (tests narrow it to one).
COMMAND_MODULES = list(dict.fromkeys(module for module, _ in COMMANDS.values()))


def run_with_bar(gen, desc: str, *, unit: str = "step"):
    """Drive a TrainEvent generator with a tqdm bar on stderr (loss and validation loss
    as postfix); returns ``(the generator's return value, the last event)``."""
    from napari_hinge._progress import EventBar
    from napari_hinge.training import run_to_end

    with EventBar(desc, unit=unit) as bar:
        return run_to_end(gen, bar)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; with ``command``, only that subcommand's module is imported and registered
    (others are listed by name and summary), with None every module in COMMAND_MODULES."""
    parser = argparse.ArgumentParser(
        prog="napari-hinge",
        description="H&E slides to spatial gene expression (HINGE, STMGAC, C2L-ST).",
        epilog="napari-hinge COMMAND --help describes a command's options.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    if command is None:
        modules = COMMAND_MODULES
    else:
        module = COMMANDS.get(command, (None,))[0]
        modules = [module] if module in COMMAND_MODULES else []
    for name in modules:
        importlib.import_module(name).register(subparsers)
    for name, (module, summary) in COMMANDS.items():
        if name not in subparsers.choices and module in COMMAND_MODULES:
            subparsers.add_parser(name, help=summary)
    return parser


def _command(argv: list[str]) -> str | None:
    """The subcommand named on the command line (the first word not starting with '-')."""
    return next((a for a in argv if not a.startswith("-")), None)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = _command(argv)
    if command not in COMMANDS:  # top-level --help or a typo: argparse lists the commands
        command = "--none--"
    args = build_parser(command).parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, KeyError, OSError, MemoryError) as exc:
        # Bad input (InputError is a ValueError), an unreadable or full disk, a file too big
        # for memory: one line naming the file and the problem, no traceback.
        print(f"napari-hinge {args.command}: error: {one_line(exc)}", file=sys.stderr)
        return 2


def one_line(exc: BaseException) -> str:
    """An exception as one line (KeyError's quotes dropped, whitespace runs collapsed)."""
    text = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
    return " ".join(str(text).split()) or type(exc).__name__


if __name__ == "__main__":
    sys.exit(main())
