"""A display for Qt when there is none: start Xvfb, or say in one line how to get one.

Torch-, Qt- and napari-free, so the demo can check before it spends a minute predicting.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator

# Virtual screen: a 1080p monitor, so docks and screenshots look as on a common laptop.
SCREEN = "1920x1080x24"
HOW_TO_GET_ONE = ("install Xvfb (bash scripts/install-system-deps.sh, or apt-get install xvfb) "
                  "or run under xvfb-run -a")


class NoDisplayError(OSError):
    """No display to draw on and no Xvfb to start one."""


def has_display() -> bool:
    """True when Qt has somewhere to draw: an X or Wayland display, or an offscreen platform."""
    platform = os.environ.get("QT_QPA_PLATFORM", "")
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")
                or platform.startswith(("offscreen", "minimal", "vnc")))


@contextlib.contextmanager
def virtual_display(*, start: bool = True) -> Iterator[str | None]:
    """Make sure Qt can open windows for the duration of the block.

    Parameters
    ----------
    start
        Start an Xvfb server when there is no display (else raise at once).

    Yields
    ------
    The ``DISPLAY`` of the Xvfb started here, or None when a display was already there.

    Raises
    ------
    NoDisplayError
        Without a display and without an ``Xvfb`` binary (or with ``start=False``); the message
        says how to get one.
    """
    if has_display():
        yield None
        return
    xvfb = shutil.which("Xvfb")
    if not start or xvfb is None:
        raise NoDisplayError(f"no display (DISPLAY is not set) and no Xvfb on PATH: "
                             f"{HOW_TO_GET_ONE}")
    # stderr to a file, not a pipe: a chatty Xvfb must never block on a full pipe.
    with tempfile.TemporaryFile() as log:
        read_fd, write_fd = os.pipe()
        # -displayfd: Xvfb picks a free display number and writes it once it takes clients.
        proc = subprocess.Popen([xvfb, "-displayfd", str(write_fd), "-screen", "0", SCREEN,
                                 "-nolisten", "tcp"], pass_fds=(write_fd,),
                                stdout=subprocess.DEVNULL, stderr=log)
        os.close(write_fd)
        with os.fdopen(read_fd) as pipe:
            number = pipe.readline().strip()  # '' when Xvfb exits without starting
        if not number:
            proc.wait(timeout=10)
            log.seek(0)
            err = log.read().decode(errors="replace").strip().splitlines()
            raise NoDisplayError(f"Xvfb ({xvfb}) did not start: "
                                 f"{err[-1] if err else 'no output'}; {HOW_TO_GET_ONE}")
        display = f":{number}"
        os.environ["DISPLAY"] = display
        try:
            yield display
        finally:
            os.environ.pop("DISPLAY", None)
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
