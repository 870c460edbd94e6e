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


def run_with_bar(gen, desc: str, *, unit: str = "step"):
    """Drive a TrainEvent generator with a tqdm bar on stderr (loss and validation loss
    as postfix); returns ``(the generator's return value, the last event)``."""
    from tqdm.auto import tqdm

    from napari_hinge.training import run_to_end

    bar = None

    def show(event) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=event.total_steps, desc=desc, unit=unit, file=sys.stderr,
                       dynamic_ncols=True)
        bar.n = min(event.step, event.total_steps)
        postfix = {}
        if event.loss is not None:
            postfix["loss"] = f"{event.loss:.4f}"
        if event.val_loss is not None:
            postfix["val"] = f"{event.val_loss:.4f}"
        bar.set_postfix(postfix, refresh=False)
        bar.refresh()

    try:
        return run_to_end(gen, show)
    finally:
        if bar is not None:
            bar.close()


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
