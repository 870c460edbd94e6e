"""The GUI guides a newcomer: real pixel size or 'unknown', presets that follow the data,
docks as tabs that fit a 1080 px screen, Save only when there is something to save, a µm
scale bar and a titled colorbar."""

from __future__ import annotations

import pytest
from qtpy.QtWidgets import QApplication, QDockWidget

from napari_hinge._widgets.domains import DomainsWidget
from napari_hinge._widgets.slide_spots import SlideSpotsWidget

PLUGIN = "napari-hinge"


def test_pixel_size_of_a_slide_without_spots(make_napari_viewer):
    viewer = make_napari_viewer()
    viewer.open_sample(PLUGIN, "cmu1")
    widget = SlideSpotsWidget(viewer)
    assert widget.mpp_box.value() == pytest.approx(0.499, abs=1e-3)  # not the box's minimum
    assert "0.499 µm/px" in widget.info.text() and widget.mpp_button.isEnabled()
    assert viewer.scale_bar.visible and tuple(map(str, viewer.layers[0].units)) == (
        "micrometer", "micrometer")


def test_unknown_pixel_size_says_so(make_napari_viewer, shared_data, tmp_path):
    """A PNG records no pixel size: the widget says 'unknown' (not its box's minimum)."""
    from PIL import Image

    crop = Image.open(shared_data / "visium_tiny_fixture" / "spatial" / "tissue_lowres_image.png")
    crop.convert("RGB").save(tmp_path / "section.png")
    viewer = make_napari_viewer()
    viewer.open(tmp_path / "section.png", plugin=PLUGIN)
    widget = SlideSpotsWidget(viewer)
    assert widget.mpp_box.text() == "unknown" and "unknown" in widget.info.text()
    assert not viewer.scale_bar.visible  # pixels, not µm: a µm bar would mislead
    widget.mpp_box.setValue(0.5)
    widget._apply_mpp()  # with no spots, the pixel size goes to the slide
    assert tuple(viewer.layers[0].scale) == (0.5, 0.5) and "0.5 µm/px" in widget.info.text()


def test_empty_viewer_has_nothing_to_act_on(make_napari_viewer):
    viewer = make_napari_viewer()
    spots = SlideSpotsWidget(viewer)
    domains = DomainsWidget(viewer)
    assert not spots.mpp_button.isEnabled() and spots.mpp_box.text() == "unknown"
    assert not domains.run_button.isEnabled()
    assert not domains.save_h5ad_button.isEnabled() and not domains.save_tiff_button.isEnabled()
    for control in (domains.k_box, domains.preset_box, domains.epochs_box, domains.seed_box,
                    domains.refine_box, domains.mode_box, domains.run_button,
                    spots.mpp_box, spots.transform_box, spots.cmap_box, spots.search):
        assert control.toolTip(), control


def test_c2l_controls_have_tooltips(make_napari_viewer):
    from qtpy.QtWidgets import QAbstractButton, QAbstractSpinBox, QComboBox

    from napari_hinge._widgets.c2l import C2LWidget

    widget = C2LWidget(make_napari_viewer())
    controls = widget.findChildren((QAbstractSpinBox, QComboBox, QAbstractButton))
    missing = [type(c).__name__ + ":" + (c.text() if hasattr(c, "text") else "")
               for c in controls if not c.toolTip() and c.parent() is not widget.jobs
               and not widget.jobs.isAncestorOf(c)]
    assert controls and not missing, missing


def test_preset_follows_the_spots(make_napari_viewer, shared_data):
    viewer = make_napari_viewer()
    widget = DomainsWidget(viewer)
    viewer.open_sample(PLUGIN, "her2st_C3")
    assert widget.preset_box.currentText() == "legacy_st"
    assert widget.k_box.value() == 5 and widget.run_button.isEnabled()
    viewer.layers.clear()
    viewer.open(shared_data / "dlpfc_visium_lowres" / "151673", plugin=PLUGIN)
    assert widget.preset_box.currentText() == "dlpfc" and widget.k_box.value() == 7


def test_colorbar_is_titled_with_gene_and_unit(make_napari_viewer):
    viewer = make_napari_viewer()
    viewer.open_sample(PLUGIN, "her2st_C3")
    widget = SlideSpotsWidget(viewer)
    widget.select_gene("ERBB2")
    assert viewer.text_overlay.visible
    assert viewer.text_overlay.text == "ERBB2: log1p(counts per 10k)"
    widget.transform_box.setCurrentText("raw counts")
    assert viewer.text_overlay.text == "ERBB2: raw counts"


def test_docks_open_as_tabs_and_fit_1080(make_napari_viewer):
    from napari_hinge._widgets.c2l import C2LWidget

    viewer = make_napari_viewer(show=True)
    viewer.open_sample(PLUGIN, "her2st_C3")
    window = viewer.window._qt_window
    viewer.camera.zoom = 1e-4  # far out: docking must re-fit the tissue to the new canvas
    # as napari's Plugins menu adds them: one after the other, without tabify
    for widget, name in ((SlideSpotsWidget(viewer), "Slide & spots"),
                         (DomainsWidget(viewer), "Domains"),
                         (C2LWidget(viewer), "C2L")):
        viewer.window.add_dock_widget(widget, name=name, area="right")
        QApplication.processEvents()
    QApplication.processEvents()
    docks = {d.windowTitle() or d.objectName(): d for d in window.findChildren(QDockWidget)
             if d.objectName() in ("Slide & spots", "Domains", "C2L")}
    assert len(docks) == 3
    tabbed = set(window.tabifiedDockWidgets(docks["Slide & spots"]))
    assert {docks["Domains"], docks["C2L"]} <= tabbed
    assert window.minimumSizeHint().height() <= 1080
    zoom = viewer.camera.zoom
    viewer.reset_view()
    assert zoom > 1e-3 and viewer.camera.zoom == pytest.approx(zoom, rel=0.05)
