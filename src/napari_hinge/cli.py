"""The command line: every job the widgets run, headless, grouped by model.

    napari-hinge hinge train|predict|predict-slide|evaluate
    napari-hinge stmgac domains
    napari-hinge c2l pretrain|adapt|fill
    napari-hinge spatial-info | demo

Each feature module contributes its subcommands through a ``register(subparsers)``
function (the per-command parser builders); this file only groups and dispatches them. Only
the module of the subcommand being run is imported: ``napari-hinge --help`` (or
``napari-hinge hinge --help``) imports none of them (no torch, anndata or napari).
"""

from __future__ import annotations

import argparse
import importlib
import sys

# Command as typed -> (module whose ``register(subparsers)`` adds it, the name that module
# registers, the one line the --help lists without importing the module; tests/test_cli.py
# checks they match). A command of a model group is "GROUP COMMAND".
COMMANDS = {
    "demo": ("napari_hinge.demo", "demo", "open the shipped sample (headless: screenshots)"),
    "spatial-info": (
        "napari_hinge.io.cli", "spatial-info",
        "read spatial data (Space Ranger outs/, her2st folder, .h5ad) and describe it",
    ),
    "hinge train": ("napari_hinge.hinge.cli", "train", "train HINGE on spatial datasets"),
    "hinge predict": ("napari_hinge.hinge.cli", "predict",
                      "predict expression on spots with HINGE"),
    "hinge predict-slide": ("napari_hinge.hinge.cli", "predict-slide",
                            "paint predicted expression maps over a whole slide"),
    "hinge predict-cohort": ("napari_hinge.hinge.cli", "predict-cohort",
                             "paint expression maps over many slides on a dask cluster"),
    "hinge evaluate": ("napari_hinge.hinge.cli", "evaluate",
                       "score HINGE against measured expression"),
    "stmgac domains": (
        "napari_hinge.stmgac.cli", "domains",
        "find spatial domains with STMGAC and write them to an h5ad (and a label TIFF)",
    ),
    "c2l pretrain": ("napari_hinge.c2l.cli", "c2l-pretrain", "pre-train a C2L-ST central model"),
    "c2l adapt": ("napari_hinge.c2l.cli", "c2l-adapt",
                  "adapt a C2L-ST local model on paired spots"),
    "c2l fill": ("napari_hinge.c2l.cli", "synthesize",
                 "fill a sparse region with synthetic H&E"),
}
GROUPS = {
    "hinge": "HINGE: expression from histology (napari-hinge hinge --help lists its commands)",
    "stmgac": "STMGAC: spatial domains",
    "c2l": "C2L-ST: synthetic histology",
}
# Today's verbs, kept for one release: each still runs, after one line naming the new form.
ALIASES = {
    "train": "hinge train", "predict": "hinge predict", "predict-slide": "hinge predict-slide",
    "evaluate": "hinge evaluate", "domains": "stmgac domains", "c2l-pretrain": "c2l pretrain",
    "c2l-adapt": "c2l adapt", "synthesize": "c2l fill",
}
# The modules that may register subcommands (tests narrow it to one).
COMMAND_MODULES = list(dict.fromkeys(module for module, _, _ in COMMANDS.values()))


class _Router:
    """What a module's ``register`` sees as ``subparsers``: each ``add_parser(name)`` lands
    under the group and name of :data:`COMMANDS` (a name it lacks stays top-level)."""

    def __init__(self, module: str, top, groups: dict) -> None:
        self.module, self.top, self.groups = module, top, groups

    def add_parser(self, name: str, **kwargs):
        for command, (module, registered, _) in COMMANDS.items():
            if (module, registered) == (self.module, name):
                group, _, sub = command.rpartition(" ")
                target = self.groups[group] if group else self.top
                return target.add_parser(sub, **kwargs)
        return self.top.add_parser(name, **kwargs)


def run_with_bar(gen, desc: str, *, unit: str = "step"):
    """Drive a TrainEvent generator with a tqdm bar on stderr (loss and validation loss
    as postfix); returns ``(the generator's return value, the last event)``."""
    from napari_hinge._progress import EventBar
    from napari_hinge.training import run_to_end

    with EventBar(desc, unit=unit) as bar:
        return run_to_end(gen, bar)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; with ``command`` (a key of :data:`COMMANDS`), only that subcommand's module
    is imported and registered (the others are listed by name and summary), with None every
    module in COMMAND_MODULES."""
    parser = argparse.ArgumentParser(
        prog="napari-hinge",
        description="H&E slides to spatial gene expression (HINGE, STMGAC, C2L-ST).",
        epilog="napari-hinge COMMAND --help describes a command's options; the commands of "
               "a model are grouped under its name (napari-hinge hinge --help).",
    )
    top = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    groups = {}
    for name in COMMANDS:  # groups and top-level commands in the table's order
        group = name.rpartition(" ")[0]
        if group and group not in groups:
            sub = top.add_parser(group, help=GROUPS[group], description=GROUPS[group])
            groups[group] = sub.add_subparsers(dest="subcommand", required=True,
                                               metavar="COMMAND")
    if command is None:
        modules = COMMAND_MODULES
    else:
        module = COMMANDS.get(command, (None,))[0]
        modules = [module] if module in COMMAND_MODULES else []
    for module in modules:
        importlib.import_module(module).register(_Router(module, top, groups))
    for name, (module, _, summary) in COMMANDS.items():
        group, _, sub = name.rpartition(" ")
        target = groups[group] if group else top
        if sub not in target.choices and module in COMMAND_MODULES:
            target.add_parser(sub, help=summary)
    return parser


def _command(argv: list[str]) -> tuple[str | None, int]:
    """The command named on the command line ("GROUP COMMAND" for a model's) and the index
    of its first word (the first word not starting with '-')."""
    words = [(i, a) for i, a in enumerate(argv) if not a.startswith("-")]
    if not words:
        return None, -1
    i, first = words[0]
    if first in GROUPS:
        rest = argv[i + 1] if i + 1 < len(argv) and not argv[i + 1].startswith("-") else ""
        return f"{first} {rest}".strip(), i
    return first, i


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command, at = _command(argv)
    if command in ALIASES:
        new = ALIASES[command]
        print(f"napari-hinge {command} is deprecated and will be removed in the next release; "
              f"use: napari-hinge {new}", file=sys.stderr)
        argv[at:at + 1] = new.split()
        command = new
    if command not in COMMANDS:  # --help, a group's --help or a typo: argparse lists them
        command = "--none--"
    args = build_parser(command).parse_args(argv)
    if getattr(args, "subcommand", None):
        args.command = f"{args.command} {args.subcommand}"
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
