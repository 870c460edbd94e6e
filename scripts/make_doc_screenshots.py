"""Render the widget screenshots in docs/images/ with the real widgets on real data.

    xvfb-run -a -s "-screen 0 1920x1080x24" python scripts/make_doc_screenshots.py [--only NAME]

Each scene opens its docks as the Plugins menu does (napari's titles, tabbed as the plugin
tabs them) and drives them exactly as a user would (worker threads included), then saves the
window. DLPFC and her2st data are read from ../shared/data and only their rendering is
saved. The C2L scene adapts a local model on the sample's spots first (a few minutes).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image

REPO = Path(__file__).resolve().parents[1]
PLUGIN = "napari-hinge"
SHARED = REPO.parent / "shared" / "data"
OUT = REPO / "docs" / "images"


def wait_for(signal, app, timeout_s: float = 3600.0):
    """Spin the Qt event loop until ``signal`` fires (the worker's result arrives)."""
    import time

    fired = []
    signal.connect(lambda *a: fired.append(a))
    start = time.monotonic()
    while not fired:
        app.processEvents()
        time.sleep(0.02)
        if time.monotonic() - start > timeout_s:
            raise TimeoutError("the worker did not finish")
    return fired[0]


def shoot(viewer, name: str) -> Path:
    from qtpy.QtWidgets import QApplication

    viewer.reset_view()
    QApplication.processEvents()
    path = OUT / name
    Image.fromarray(viewer.screenshot(canvas_only=False, flash=False)).save(path)
    print("wrote", path)
    return path


def open_dock(viewer, app, menu_name: str):
    """Open a dock as Plugins > napari-hinge > ``menu_name`` does; returns its widget."""
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, menu_name)
    app.processEvents()
    return widget


def scene_slide_spots(viewer, app):
    viewer.open_sample(PLUGIN, "her2st_C3")
    widget = open_dock(viewer, app, "Slide & spots")
    widget.search.setText("ERBB")
    widget.select_gene("ERBB2")
    return shoot(viewer, "slide_spots_her2st_C3_ERBB2.png")


def scene_docks(viewer, app):
    """The her2st folder (30 sections, 5 with an H&E) and the four docks, tabbed: the
    first section's slide selected, short tab titles in full."""
    viewer.open(SHARED / "her2st_subset", plugin=PLUGIN)
    app.processEvents()
    for menu_name in ("Predict expression (HINGE)", "Spatial domains (STMGAC)",
                      "Fill sparse regions (C2L-ST)", "Slide & spots"):
        widget = open_dock(viewer, app, menu_name)
    widget.select_gene("ERBB2")
    return shoot(viewer, "docks_her2st_folder.png")


def scene_domains(viewer, app):
    viewer.open(SHARED / "dlpfc_visium_lowres" / "151673", plugin=PLUGIN)
    viewer.layers["151673 spots"].visible = False
    widget = open_dock(viewer, app, "Spatial domains (STMGAC)")
    widget.k_box.setValue(7)
    widget.run()
    wait_for(widget.jobs.succeeded, app)
    app.processEvents()
    return shoot(viewer, "domains_dlpfc_151673.png")


def scene_hinge_dense(viewer, app):
    """The shipped HINGE's dense SCGB2A2 map over the C3 H&E (16 µm, linear interpolation,
    transparent off tissue) and its uncertainty, both saved."""
    viewer.open_sample(PLUGIN, "her2st_C3")
    viewer.layers["her2st C3 spots"].visible = False
    predict = open_dock(viewer, app, "Predict expression (HINGE)").predict
    predict.mode_box.setCurrentText("dense")
    item = predict.genes.list.findItems("SCGB2A2", __import__("qtpy").QtCore.Qt.MatchExactly)[0]
    item.setSelected(True)
    predict.run()
    wait_for(predict.layers_added, app)
    app.processEvents()
    paths = [shoot(viewer, "hinge_dense_SCGB2A2_over_he.png")]
    for layer in predict.map_layers.values():
        layer.visible = layer.metadata["kind"] == "std"
    app.processEvents()
    paths.append(shoot(viewer, "hinge_dense_SCGB2A2_uncertainty.png"))
    return paths


def scene_c2l(viewer, app):
    """A 6 x 4-tile region filled from the C2L dock with the local model the dock adapts on
    the sample's spots (scripts/c2l_screenshot.py's scene; that script also draws the
    real-vs-generated pictures, with a chosen local model)."""
    import sys

    sys.path.insert(0, str(REPO / "scripts"))
    from c2l_screenshot import fill_scene

    viewer.window._qt_window.resize(1600, 1000)
    path = OUT / "c2l_fill.png"
    if not fill_scene(viewer, out=path):
        raise RuntimeError("the C2L fill failed")
    return path


SCENES = {"slide_spots": scene_slide_spots, "docks": scene_docks, "domains": scene_domains,
          "hinge_dense": scene_hinge_dense, "c2l": scene_c2l}


def main() -> None:
    import napari
    from qtpy.QtWidgets import QApplication

    parser = argparse.ArgumentParser()
    parser.add_argument("--only", choices=sorted(SCENES), action="append")
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    for name in args.only or SCENES:
        viewer = napari.Viewer(show=True)
        viewer.window._qt_window.resize(1500, 950)
        SCENES[name](viewer, QApplication.instance())
        viewer.close()


if __name__ == "__main__":
    main()
