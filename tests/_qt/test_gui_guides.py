"""The GUI guides a newcomer: real pixel size or 'unknown', presets that follow the data,
docks as tabs that fit a 1080 px screen with their titles in full, the slide selected after a
folder opens, buttons enabled only when they can act, a tooltip on every control, texts that
show in full, a µm scale bar and a titled colorbar."""

from __future__ import annotations

import pytest
from qtpy.QtWidgets import QApplication

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


def _all_docks(viewer):
    from napari_hinge._widgets.c2l import C2LWidget
    from napari_hinge._widgets.hinge import HingeWidget

    return (SlideSpotsWidget(viewer), HingeWidget(viewer), DomainsWidget(viewer),
            C2LWidget(viewer))


def test_empty_viewer_has_nothing_to_act_on(make_napari_viewer):
    viewer = make_napari_viewer()
    spots, hinge, domains, c2l = _all_docks(viewer)
    assert not spots.mpp_button.isEnabled() and spots.mpp_box.text() == "unknown"
    assert not domains.run_button.isEnabled()
    assert not domains.save_h5ad_button.isEnabled() and not domains.save_tiff_button.isEnabled()
    assert not domains.show_all_button.isEnabled()
    assert not hinge.predict.run_button.isEnabled() and not hinge.predict.save_button.isEnabled()
    assert not hinge.train.start.isEnabled() and not hinge.train.use_button.isEnabled()
    assert not c2l.run_button.isEnabled() and not c2l.pairs_button.isEnabled()
    assert not c2l.save_pairs_button.isEnabled()
    assert not any(panel.cancel_button.isEnabled()
                   for panel in (domains.jobs, hinge.predict.jobs, hinge.train.jobs, c2l.jobs))


def test_buttons_follow_what_they_can_act_on(make_napari_viewer):
    viewer = make_napari_viewer()
    spots, hinge, domains, c2l = _all_docks(viewer)
    viewer.open_sample(PLUGIN, "her2st_C3")
    assert spots.mpp_button.isEnabled() and domains.run_button.isEnabled()
    assert hinge.predict.run_button.isEnabled() and c2l.run_button.isEnabled()
    assert not hinge.predict.save_button.isEnabled()  # nothing predicted yet
    assert not hinge.train.start.isEnabled()  # no dataset selected yet
    hinge.train.datasets.item(0).setSelected(True)
    assert hinge.train.start.isEnabled()
    hinge.train.datasets.clearSelection()
    assert not hinge.train.start.isEnabled()
    viewer.layers.remove("her2st C3 spots")  # a slide without spots: nothing to fill from
    assert hinge.predict.run_button.isEnabled() and not c2l.run_button.isEnabled()
    assert not domains.run_button.isEnabled()
    viewer.layers.clear()
    assert not hinge.predict.run_button.isEnabled()


def test_every_control_has_a_tooltip(make_napari_viewer):
    """Buttons, boxes, lists, fields and sliders of the four docks say what they do (the
    parts Qt builds inside a spin box, combo box or tab bar excepted)."""
    from qtpy.QtWidgets import (
        QAbstractButton,
        QAbstractItemView,
        QAbstractSpinBox,
        QComboBox,
        QLineEdit,
        QSlider,
        QTabBar,
    )

    kinds = (QAbstractSpinBox, QComboBox, QAbstractButton, QLineEdit, QAbstractItemView, QSlider)
    missing = []
    for dock in _all_docks(make_napari_viewer()):
        for control in dock.findChildren(kinds):
            if isinstance(control.parent(), (QAbstractSpinBox, QComboBox, QTabBar)) or \
                    isinstance(control.parent().parent(), QComboBox):
                continue
            if not control.toolTip():
                text = control.text() if hasattr(control, "text") else ""
                missing.append(f"{type(dock).__name__}: {type(control).__name__} {text!r}")
    assert not missing, missing
    hinge = _all_docks(make_napari_viewer())[1]
    assert all(hinge.tabToolTip(i) for i in range(hinge.count()))


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


def cut_texts(widget, dock) -> list[str]:
    """Texts of ``widget`` that do not show in full in its ``dock``: labels running out of
    the dock (napari scrolls a dock's content sideways) and clipped spin-box values."""
    from qtpy.QtCore import QPoint
    from qtpy.QtWidgets import QAbstractSpinBox, QLabel

    for _ in range(3):
        QApplication.processEvents()
    cut = [label.text() for label in widget.findChildren(QLabel)
           if label.isVisible() and label.text()
           and (label.mapTo(dock, QPoint(label.width(), 0)).x() > dock.width()
                or label.width() < label.minimumSizeHint().width())]
    title_bar = dock.titleBarWidget()  # napari's, with the dock's name
    cut += [label.text() for label in title_bar.findChildren(QLabel)
            if label.isVisible() and label.width() < label.sizeHint().width()]
    return cut + [box.text() for box in widget.findChildren(QAbstractSpinBox)
                  if box.isVisible() and box.lineEdit().width()
                  < box.fontMetrics().horizontalAdvance(box.text())]


@pytest.mark.parametrize("menu_name", ["Slide & spots", "Spatial domains (STMGAC)"])
def test_a_dock_alone_shows_its_texts_in_full(make_napari_viewer, menu_name):
    viewer = make_napari_viewer(show=True)
    viewer.window._qt_window.resize(1500, 950)  # as the docs screenshots
    viewer.open_sample(PLUGIN, "her2st_C3")
    dock, widget = viewer.window.add_plugin_dock_widget(PLUGIN, menu_name)
    if menu_name == "Slide & spots":
        widget.select_gene("ERBB2")
    # were: the pixel size as "1.3748 µ"; "Spatial domains (STMGAC) (napari-hinge" in the
    # title bar
    assert not cut_texts(widget, dock)


def test_docks_open_as_tabs_and_fit_1080(make_napari_viewer):
    """The four docks as napari's Plugins menu opens them (titled "Menu name (napari-hinge)"),
    the HINGE dock first: one tabbed dock, every tab's short title in full, the view fitted
    to the canvas each dock leaves."""
    from qtpy.QtWidgets import QStyle, QTabBar

    viewer = make_napari_viewer(show=True)
    viewer.open_sample(PLUGIN, "her2st_C3")
    window = viewer.window._qt_window
    menu_names = {"Predict expression (HINGE)": "HINGE", "Slide & spots": "Slide & spots",
                  "Spatial domains (STMGAC)": "Domains", "Fill sparse regions (C2L-ST)": "C2L fill"}
    docks, widgets = {}, {}
    for menu_name, title in menu_names.items():
        viewer.camera.zoom = 1e-4  # far out: the new dock must re-fit the tissue to the canvas
        docks[title], widgets[title] = viewer.window.add_plugin_dock_widget(PLUGIN, menu_name)
        for _ in range(3):
            QApplication.processEvents()
        zoom = viewer.camera.zoom
        viewer.reset_view()
        assert zoom > 1e-3 and viewer.camera.zoom == pytest.approx(zoom, rel=0.05), title
    assert window.tabifiedDockWidgets(docks["HINGE"]), "HINGE, shown first, is not tabbed"
    tabbed = set(window.tabifiedDockWidgets(docks["Slide & spots"])) | {docks["Slide & spots"]}
    assert tabbed == set(docks.values())
    assert window.minimumSizeHint().height() <= 1080
    bars = [bar for bar in window.findChildren(QTabBar) if bar.count() == len(docks)]
    assert len(bars) == 1
    bar = bars[0]
    # '&&' shows as '&' (a lone '&' marks a shortcut: "Slide & spots" showed as "Slide _s…")
    shown = [bar.tabText(i).replace("&&", "&") for i in range(bar.count())]
    assert sorted(shown) == sorted(menu_names.values())
    assert not any("&" in bar.tabText(i).replace("&&", "") for i in range(bar.count()))
    space = bar.style().pixelMetric(QStyle.PixelMetric.PM_TabBarTabHSpace, None, bar)
    for i, text in enumerate(shown):  # not elided: each tab as wide as its whole title needs
        needed = bar.fontMetrics().horizontalAdvance(text) + space
        assert bar.tabRect(i).width() >= needed, (text, bar.tabRect(i).width(), needed)
    assert bar.tabText(bar.currentIndex()) == "C2L fill"  # the dock opened last is in front
    assert docks["HINGE"].name == "Predict expression (HINGE) (napari-hinge)"  # napari's key
    # no text runs out of its dock (napari scrolls a dock's content sideways instead)
    widgets["Slide & spots"].select_gene("ERBB2")  # the longest status line
    for title, dock in docks.items():
        dock.raise_()
        for _ in range(3):
            QApplication.processEvents()
        assert not cut_texts(widgets[title], dock), title


def test_opening_a_folder_selects_its_slide(make_napari_viewer, shared_data):
    """napari selects the layer it adds last (spots, or a hidden section's); after a folder
    opens the visible slide is selected, and the docks pick the visible section."""
    from napari_hinge._widgets.c2l import C2LWidget
    from napari_hinge._widgets.hinge import HingeWidget

    viewer = make_napari_viewer()
    spots, hinge, c2l = SlideSpotsWidget(viewer), HingeWidget(viewer), C2LWidget(viewer)
    viewer.open(shared_data / "her2st_subset", plugin=PLUGIN)
    QApplication.processEvents()
    shown = [layer.name for layer in viewer.layers if layer.visible]
    assert shown == ["C2 H&E", "C2 spots"] and len(viewer.layers) > 2
    assert viewer.layers.selection.active.name == "C2 H&E"
    assert list(viewer.layers.selection) == [viewer.layers["C2 H&E"]]
    assert spots.layer_box.currentText() == "C2 spots"
    assert hinge.predict.slide_box.currentText() == "C2 H&E"
    assert (c2l.slide_box.currentText(), c2l.spots_box.currentText()) == ("C2 H&E", "C2 spots")
    hinge.predict.slide_box.setCurrentText("C4 H&E")  # a hidden section, chosen: it stays
    viewer.add_shapes(name="region")
    assert hinge.predict.slide_box.currentText() == "C4 H&E"
    viewer.layers.clear()
    viewer.open(shared_data / "dlpfc_visium_lowres" / "151673", plugin=PLUGIN)
    QApplication.processEvents()
    assert viewer.layers.selection.active.name == "151673 H&E"


def test_loss_plot_of_a_hidden_dock_queues_no_draw(make_napari_viewer):
    """A draw queued by a loss plot that is never shown could run after Python collected
    its widget: Qt then printed "FigureCanvasQTAgg has been deleted" during the tests."""
    from napari_hinge._progress import ProgressEvent
    from napari_hinge._widgets.hinge import TrainWidget

    train = TrainWidget(make_napari_viewer())
    plot = train.jobs.plot
    plot.add(ProgressEvent("step", 1, 1, 2, loss=1.0))
    plot.add(ProgressEvent("epoch", 1, 2, 2, val_loss=0.5))
    assert not getattr(plot.canvas, "_draw_pending", False)
    train.show()
    assert plot.canvas._draw_pending  # drawn once shown
    QApplication.processEvents()
    assert plot.epochs == [(2, 0.5)] and not plot.canvas._draw_pending
    train.close()
