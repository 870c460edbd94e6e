"""The command line: every job the widgets run, headless.

Each feature module contributes its subcommands through a ``register(subparsers)``
function, so this file stays a thin dispatcher and ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# Modules that define ``register(subparsers)``; each parser sets ``func``.
COMMAND_MODULES = [
    "napari_hinge.demo",
    "napari_hinge.io.spatial",
    "napari_hinge.stmgac.cli",
    "napari_hinge.hinge.cli",
    "napari_hinge.c2l.cli",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="napari-hinge",
        description="H&E slides to spatial gene expression (HINGE, STMGAC, C2L-ST).",
    )
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (FileNotFoundError, ValueError, KeyError) as exc:
        # Bad input: one clear line naming the file and the problem, no traceback.
        print(f"napari-hinge {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
