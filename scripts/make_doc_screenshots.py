"""Render the screenshots in docs/ with the real widgets on real data.

    xvfb-run -a -s "-screen 0 1920x1080x24" python scripts/make_doc_screenshots.py [--only NAME]

Each scene drives the dock widgets exactly as a user would (worker threads included) and
saves the napari canvas into docs/images/. DLPFC data are read from ../shared/data and only
their rendering is saved.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image

REPO = Path(__file__).resolve().parents[1]
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


def scene_slide_spots(viewer, app):
    from napari_hinge._widgets.slide_spots import SlideSpotsWidget

    viewer.open_sample("napari-hinge", "her2st_C3")
    widget = SlideSpotsWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Slide & spots")
    widget.search.setText("ERBB")
    widget.select_gene("ERBB2")
    return shoot(viewer, "slide_spots_her2st_C3_ERBB2.png")


def scene_domains(viewer, app):
    from napari_hinge._widgets.domains import DomainsWidget

    viewer.open(SHARED / "dlpfc_visium_lowres" / "151673", plugin="napari-hinge")
    viewer.layers["151673 spots"].visible = False
    widget = DomainsWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Domains")
    widget.k_box.setValue(7)
    widget.run()
    wait_for(widget.jobs.succeeded, app)
    app.processEvents()
    return shoot(viewer, "domains_dlpfc_151673.png")


def scene_hinge_dense(viewer, app):
    """The shipped HINGE's dense SCGB2A2 map over the C3 H&E (16 µm, linear interpolation,
    transparent off tissue) and its uncertainty, both saved."""
    from napari_hinge._widgets.hinge import HingeWidget

    viewer.open_sample("napari-hinge", "her2st_C3")
    viewer.layers["her2st C3 spots"].visible = False
    widget = HingeWidget(viewer)
    viewer.window.add_dock_widget(widget, name="HINGE")
    predict = widget.predict
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


SCENES = {"slide_spots": scene_slide_spots, "domains": scene_domains,
          "hinge_dense": scene_hinge_dense}


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
