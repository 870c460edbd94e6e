"""HINGE widgets on the shipped sample with a tiny untrained model: layers of the right
shape and scale over the H&E, a clean cancel, and two epochs of training from the GUI."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from napari_hinge._widgets.hinge import HingeWidget

PLUGIN = "napari-hinge"
GENES = ["ERBB2", "GRB7", "KRT19", "CD74", "COL1A1", "EPCAM"]


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    from napari_hinge.hinge.pipeline import build_model, save_model

    model = build_model(GENES, 1280, encoder="efficientnet-lite0", ada_rank=4)
    return save_model(model, tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture
def sample_viewer(make_napari_viewer):
    viewer = make_napari_viewer(show=True)
    viewer.open_sample(PLUGIN, "her2st_C3")
    return viewer


def test_predict_adds_gene_layers_over_the_slide(sample_viewer, qtbot, tiny_model_dir,
                                                 tmp_path):
    viewer = sample_viewer
    widget = HingeWidget(viewer)
    viewer.window.add_dock_widget(widget)
    predict = widget.predict
    predict.set_model(tiny_model_dir)
    assert predict.mode_box.currentText() == "dense"  # the default (hinge/defaults.SLIDE)
    predict.mode_box.setCurrentText("tiles")
    assert predict.stride_box.value() == pytest.approx(200, rel=0.1)  # the ST spot pitch
    predict.stride_box.setValue(400)
    predict.genes.list.item(0).setSelected(True)  # ERBB2
    predict.genes.list.item(1).setSelected(True)  # GRB7
    predict.steps_box.setValue(5)
    with qtbot.waitSignal(predict.layers_added, timeout=600_000) as added:
        predict.run()
    layers = added.args[0]
    # both genes in one layer per kind, the gene on the viewer's slider
    assert [layer.name.split(" (")[0] for layer in layers] == [
        "2 genes predicted", "2 genes uncertainty"]
    assert [layer.metadata["genes"] for layer in layers] == [["ERBB2", "GRB7"]] * 2
    slide = viewer.layers["her2st C3 H&E"]
    grid = predict.last_prediction.grid
    for layer in layers:
        assert layer.data.shape == (2, *grid.shape)
        assert layer.scale[-1] == pytest.approx(400, rel=0.01)  # µm per map pixel
        # The map lies within the slide's extent (both in µm).
        top, left = layer.translate[-2:]
        assert top >= 0 and left >= 0
        assert top + layer.data.shape[0] * layer.scale[0] <= slide.extent.world[1][0] + 400
    spots = viewer.layers["her2st C3 spots"]
    assert "pred_ERBB2" in spots.features and "Pearson r" in predict.scores.text()
    maps, uncertainty = predict.save(tmp_path / "maps.ome.tif")
    assert maps.is_file() and uncertainty.name == "maps_uncertainty.ome.tif"
    [tiles] = predict.save(tmp_path / "tiles.h5ad")
    assert tiles.is_file()

    from PIL import Image
    from qtpy.QtWidgets import QApplication

    viewer.reset_view()
    QApplication.processEvents()
    shot = viewer.screenshot(canvas_only=True, flash=False)[..., :3].astype(int)
    out = Path(os.environ.get("NAPARI_HINGE_SCREENSHOTS", tmp_path))
    out.mkdir(parents=True, exist_ok=True)
    Image.fromarray(shot.astype(np.uint8)).save(out / "hinge_map_over_he.png")
    r, g, b = shot[..., 0], shot[..., 1], shot[..., 2]
    he = (r > g + 15) & (b > g + 5)  # stain visible through the map
    assert he.mean() > 0.02 and shot.mean() > 20


def test_cancel_leaves_no_layer_and_a_live_gui(sample_viewer, qtbot, tiny_model_dir):
    viewer = sample_viewer
    widget = HingeWidget(viewer)
    predict = widget.predict
    predict.set_model(tiny_model_dir)
    predict.mode_box.setCurrentText("tiles")  # per-tile maps appear only when they end
    predict.stride_box.setValue(60)  # many tiles: still running when we cancel
    before = [layer.name for layer in viewer.layers]
    ticks = []
    from qtpy.QtCore import QTimer

    timer = QTimer()
    timer.timeout.connect(lambda: ticks.append(1))
    timer.start(10)  # before Run: the loop must tick while the worker is busy
    worker = predict.run()
    qtbot.waitUntil(lambda: predict.jobs.last_event is not None, timeout=300_000)
    with qtbot.waitSignal(worker.finished, timeout=300_000):
        predict.jobs.cancel_button.click()
    timer.stop()
    assert ticks, "the event loop did not run while the worker was busy"
    assert [layer.name for layer in viewer.layers] == before
    assert "cancelled" in predict.jobs.status.text()
    assert predict.run_button.isEnabled()


def test_train_widget_two_epochs(sample_viewer, qtbot, tmp_path):
    viewer = sample_viewer
    widget = HingeWidget(viewer)
    train = widget.train
    train.datasets.item(0).setSelected(True)
    train.n_genes.setValue(8)
    train.epochs.setValue(2)
    train.augment.setChecked(False)
    train.checkpoints.setText(str(tmp_path / "run"))
    events = []
    worker = train.run()
    worker.yielded.connect(events.append)
    with qtbot.waitSignal(train.jobs.succeeded, timeout=600_000):
        pass
    kinds = {e.kind for e in events}
    assert {"step", "epoch", "done"} <= kinds
    assert max(e.epoch for e in events) >= 1
    assert train.use_button.isEnabled() and (tmp_path / "run" / "last.pt").is_file()
    train.use_button.click()
    assert widget.predict.model is train.model and widget.currentWidget() is widget.predict
    assert len(widget.predict.genes.genes) == 8


@pytest.fixture
def crop_viewer(make_napari_viewer, tmp_path):
    """A real 900 px (1.2 mm) crop of the C3 H&E opened as a slide, with its pixel size."""
    from PIL import Image

    from napari_hinge._layers import slide_layer_data
    from napari_hinge.io.slides import open_slide
    from napari_hinge.io.spatial import read_spatial

    section = read_spatial("src/napari_hinge/sample_data/her2st_C3")
    meta = section.uns["napari_hinge"]
    image = np.asarray(Image.open(meta["slide_path"]).convert("RGB"))
    cx, cy = np.median(section.obsm["spatial"], 0).astype(int)
    path = tmp_path / "c3_crop.png"
    Image.fromarray(image[cy - 450:cy + 450, cx - 450:cx + 450]).save(path)
    viewer = make_napari_viewer(show=True)
    data, kwargs, _ = slide_layer_data(open_slide(path, mpp=meta["microns_per_pixel"]))
    viewer.add_image(data, **kwargs)
    return viewer


def _dense_widget(viewer, model_dir):
    widget = HingeWidget(viewer)
    viewer.window.add_dock_widget(widget)
    predict = widget.predict
    predict.set_model(model_dir)
    predict.mode_box.setCurrentText("dense")
    predict.genes.top_n.setValue(2)
    predict.sample_stride_box.setValue(400)
    predict.samples_box.setValue(2)
    predict.steps_box.setValue(2)
    return predict


def test_dense_map_is_painted_early_and_refined_in_place(crop_viewer, qtbot, tiny_model_dir):
    viewer = crop_viewer
    predict = _dense_widget(viewer, tiny_model_dir)
    previews = []
    predict.jobs.partial.connect(lambda p: previews.append(
        dict(predict.map_layers)))
    with qtbot.waitSignal(predict.layers_added, timeout=600_000) as added:
        predict.run()
    layers = added.args[0]
    assert len(layers) == 2  # (map, uncertainty) of both genes, added once
    assert previews, "no preview was painted before the run ended"
    first = previews[0]
    assert first and all(predict.map_layers[name] is layer for name, layer in first.items())
    mean = next(layer for layer in layers if layer.metadata["kind"] == "mean" and layer.visible)
    prediction = predict.last_prediction
    assert prediction.params["final"] and prediction.params["stride_um"] <= 25
    assert mean.data.shape == (2, *prediction.grid.shape)
    assert mean.scale[-1] == pytest.approx(prediction.params["stride_um"], rel=1e-6)
    np.testing.assert_allclose(mean.translate[-2:], prediction.placement["translate"])
    assert mean.interpolation2d == "linear"
    assert np.isnan(mean.data).any()  # off tissue: transparent
    predict.opacity.setValue(40)
    assert all(layer.opacity == pytest.approx(0.4) for layer in layers)
    # a hidden map was kept up to date when shown
    hidden = next(layer for layer in layers if not layer.visible)
    hidden.visible = True
    np.testing.assert_array_equal(
        np.isnan(hidden.data), np.isnan(prediction.raster(hidden.metadata["kind"])))
    # the slider picks the gene: contrast and colorbar title follow it
    viewer.dims.set_point(0, 1)
    second = prediction.genes[1]
    assert hidden.metadata["gene"] == second and second in predict.gene_label.text()


def test_dense_cancel_keeps_the_painted_map(crop_viewer, qtbot, tiny_model_dir):
    viewer = crop_viewer
    predict = _dense_widget(viewer, tiny_model_dir)
    worker = predict.run()
    qtbot.waitUntil(lambda: bool(predict.map_layers), timeout=600_000)
    with qtbot.waitSignal(worker.finished, timeout=600_000):
        predict.jobs.cancel_button.click()
    assert all(layer in viewer.layers for layer in predict.map_layers.values())
    assert "kept" in predict.jobs.status.text()
    assert predict.run_button.isEnabled()
