"""The core (models, data, training, the command line, pp/tl/pl) imports no GUI package.

`pip install napari-hinge` on a notebook server pulls no Qt, magicgui, superqt or npe2 (they
come with the `napari` extra); every core module must import with them unavailable.
"""

from __future__ import annotations

import subprocess
import sys
import tomllib

from conftest import REPO

SRC = REPO / "src" / "napari_hinge"
GUI = ("qtpy", "PyQt5", "PyQt6", "PySide2", "PySide6", "napari", "magicgui", "superqt", "npe2",
       "vispy", "pytestqt")
# The napari side: the dock widgets (Qt). The reader, writer, sample-data hooks and the demo
# import napari/Qt only inside the functions napari (or `napari-hinge demo`) calls, so they
# are imported here too.
GUI_ONLY = ("napari_hinge._widgets",)


def core_modules() -> list[str]:
    names = []
    for path in sorted(SRC.rglob("*.py")):
        parts = path.relative_to(SRC.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        if not name.startswith(GUI_ONLY):
            names.append(name)
    return names


BLOCKER = f"""
import importlib.abc, importlib.machinery, sys

BLOCKED = {GUI!r}

class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {{name!r}} (blocked: GUI package)")
        return None

sys.meta_path.insert(0, Blocker())
import importlib
failed = []
for name in sys.argv[1:]:
    try:
        importlib.import_module(name)
    except Exception as exc:
        failed.append(f"{{name}}: {{type(exc).__name__}}: {{exc}}")
loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
print("FAILED", failed)
print("LOADED", loaded)
"""


def test_every_core_module_imports_without_gui_packages():
    modules = core_modules()
    assert len(modules) > 60 and "napari_hinge.tl" in modules and "napari_hinge.cli" in modules
    done = subprocess.run([sys.executable, "-c", BLOCKER, *modules], capture_output=True,
                          text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in done.stdout.splitlines()
                 if line.startswith(("FAILED", "LOADED")))
    assert lines["FAILED"] == "[]", lines["FAILED"]
    assert lines["LOADED"] == "[]", lines["LOADED"]


def test_the_blocker_blocks():
    """The check above would see a GUI import: a widget module fails under the blocker."""
    done = subprocess.run([sys.executable, "-c", BLOCKER, "napari_hinge._widgets.hinge"],
                          capture_output=True, text=True, cwd=REPO)
    assert "napari_hinge._widgets.hinge: ModuleNotFoundError" in done.stdout


def test_gui_packages_are_only_in_the_napari_extra():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]

    def names(reqs):
        return {r.split("[")[0].split(">")[0].split("=")[0].split("<")[0].strip().lower()
                for r in reqs}

    core = names(project["dependencies"])
    assert not core & {g.lower() for g in GUI}, core & {g.lower() for g in GUI}
    assert {"napari", "magicgui", "qtpy", "superqt", "npe2"} <= names(
        project["optional-dependencies"]["napari"])


def test_pl_draws_without_gui_packages(tmp_path):
    """pl renders a real plot (the shipped sample over its H&E) with Qt & co. unavailable."""
    png = tmp_path / "erbb2.png"
    code = BLOCKER.replace("import importlib\nfailed = []", "import importlib\nfailed = []\n"
                           "import matplotlib\nmatplotlib.use('Agg')\n"
                           "from napari_hinge import pl\n"
                           "from napari_hinge.datasets import load_her2st_sample\n"
                           f"pl.genes(load_her2st_sample(), 'ERBB2').savefig({str(png)!r})")
    assert code != BLOCKER
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "LOADED []" in done.stdout and png.stat().st_size > 10_000
