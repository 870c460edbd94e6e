"""The demo's display: its own Xvfb when there is none, or one line saying how to get one."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from napari_hinge import _display, cli, demo


@pytest.fixture
def no_display(monkeypatch):
    for name in ("DISPLAY", "WAYLAND_DISPLAY", "QT_QPA_PLATFORM"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def no_xvfb(monkeypatch, no_display):
    monkeypatch.setattr(_display.shutil, "which", lambda name: None)


@pytest.fixture
def no_prediction(monkeypatch):
    """The demo must stop before its minute of prediction: fail loudly if it gets there."""

    def reached(*args, **kwargs):
        raise AssertionError("run_demo reached without a display")

    monkeypatch.setattr(demo, "run_demo", reached)


def test_headless_demo_without_xvfb_fails_in_one_line(no_xvfb, no_prediction, tmp_path, capsys):
    assert cli.main(["demo", "--headless", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert "no display" in err and "install-system-deps.sh" in err and "xvfb-run" in err
    assert "xcb" not in err


def test_windowed_demo_without_display_points_to_headless(no_display, no_prediction, capsys):
    assert cli.main(["demo"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--headless" in err


def test_an_existing_display_is_used_as_is(monkeypatch):
    monkeypatch.setenv("DISPLAY", ":12345")
    monkeypatch.setattr(_display.shutil, "which", lambda name: None)
    with _display.virtual_display() as started:
        assert started is None and os.environ["DISPLAY"] == ":12345"


@pytest.mark.skipif(shutil.which("Xvfb") is None, reason="needs Xvfb")
def test_starts_and_stops_its_own_xvfb(no_display):
    with _display.virtual_display() as display:
        assert os.environ["DISPLAY"] == display
        socket = Path(f"/tmp/.X11-unix/X{display.lstrip(':')}")
        assert socket.exists()  # the server accepts clients once it reported its number
    assert "DISPLAY" not in os.environ
    assert not socket.exists()
