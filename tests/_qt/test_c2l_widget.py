"""C2L-ST dock widget on the shipped sample with a tiny local model: a filled Shapes region
becomes a new mosaic layer placed over it, cancel adds nothing, training pairs come out."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_hinge._widgets.c2l import PROPOSE, C2LWidget

PLUGIN = "napari-hinge"
GENES = ["ERBB2", "GRB7", "CD74", "MGP"]


@pytest.fixture(scope="module")
def tiny_local_dir(tmp_path_factory):
    from napari_hinge.c2l.central import CentralConfig, CentralModel
    from napari_hinge.c2l.local import build_local
    from napari_hinge.c2l.unet import UNetConfig

    torch.manual_seed(0)
    central = CentralModel(CentralConfig(unet=UNetConfig(
        stem=4, channels=(16, 32), attention_levels=(1,), time_dim=32, groups=8), timesteps=100))
    local = build_local(central, GENES, hidden=16)
    with torch.no_grad():  # non-zero FiLM heads: the expression changes the tiles
        for head in local.film:
            head.weight.normal_(0, 0.02)
    return local.save(tmp_path_factory.mktemp("c2l") / "local")


@pytest.fixture
def viewer_widget(make_napari_viewer, tiny_local_dir):
    viewer = make_napari_viewer(show=True)
    viewer.open_sample(PLUGIN, "her2st_C3")
    widget = C2LWidget(viewer)
    viewer.window.add_dock_widget(widget)
    widget.set_local(tiny_local_dir)
    widget.steps.setValue(3)
    return viewer, widget


def test_fill_a_drawn_region_adds_a_placed_mosaic(viewer_widget, qtbot, tmp_path):
    viewer, widget = viewer_widget
    slide = viewer.layers["her2st C3 H&E"]
    spots = viewer.layers["her2st C3 spots"]
    mpp = slide.metadata["microns_per_pixel"]
    xy = spots.metadata["adata"].obsm["spatial"]
    x0, y0 = xy.min(0) * mpp  # µm, world coordinates
    rect = np.array([[y0, x0], [y0, x0 + 300], [y0 + 250, x0 + 300], [y0 + 250, x0]])
    viewer.add_shapes([rect], shape_type="polygon", name="region")
    widget.region_box.setCurrentText("region")
    assert widget.slide_box.currentText() == "her2st C3 H&E"
    assert widget.spots_box.currentText() == "her2st C3 spots"
    n_before = len(viewer.layers)
    with qtbot.waitSignal(widget.jobs.ended, timeout=300_000):
        widget.run()
    layer = widget.last_layer
    assert layer is not None, widget.jobs.status.text()  # the job's error, if it failed
    assert len(viewer.layers) == n_before + 1
    result = widget.last_result
    assert layer.rgb and layer.data.shape == result.mosaic.shape
    assert layer.data.shape[-1] == 4 and layer.data.shape[0] % 64 == 0
    # 112 µm tiles: 3 columns x 2 rows of tile centres fall inside 300 x 250 µm
    assert (len(result.layout)) == 6 and layer.data.shape[:2] == (2 * 64, 3 * 64)
    assert widget.seamless.isChecked() and result.params["seamless"] is True
    d = 112.0 / 64
    np.testing.assert_allclose(layer.scale, [d, d], rtol=1e-6)
    # the mosaic's top-left corner is the region's top-left corner (within half a slide pixel)
    corner = np.asarray(layer.translate) - np.asarray(layer.scale) / 2
    np.testing.assert_allclose(corner, [y0 - mpp / 2, x0 - mpp / 2], atol=1e-6)
    table = layer.metadata["c2l_tiles"]
    assert list(table.columns[4:]) == GENES and len(table) == 6
    assert slide.data is not None and "c2l" not in slide.metadata  # the slide is untouched

    # the pairs reach HINGE's Train tab (another dock) and train with the real spots
    from napari_hinge._widgets.hinge import HingeWidget
    from napari_hinge.c2l.pairs import load_pairs

    hinge = HingeWidget(viewer)  # held: its Train tab lives as long as the dock
    train = hinge.train
    got = []
    widget.training_pairs.connect(got.append)
    widget.pairs_button.click()
    pairs = got[0]
    assert pairs.patches.shape == (6, 64, 64, 3) and pairs.expression.shape == (6, 4)
    assert pairs.genes == GENES and layer.metadata["c2l_pairs"] is pairs
    assert pairs.slide_path == slide.metadata["slide_path"]
    assert train.chosen_pairs() == [pairs]
    saved = widget.save_pairs(tmp_path / "pairs.npz")
    np.testing.assert_array_equal(load_pairs(saved).patches, pairs.patches)
    train.pairs_list.clearSelection()
    train.add_pairs(saved)
    assert len(train.chosen_pairs()) == 1 and train.chosen_pairs()[0] is not pairs
    train.datasets.item(0).setSelected(True)
    train.epochs.setValue(1)
    train.augment.setChecked(False)
    train.pairs_weight.setValue(0.5)
    train.checkpoints.setText(str(tmp_path / "run"))
    train.run()
    with qtbot.waitSignal(train.jobs.succeeded, timeout=600_000):
        pass
    assert train.model.training_data["n_synthetic"] == 6
    assert train.model.training_data["synthetic_weight"] == 0.5
    assert list(train.model.config.genes) == GENES


def test_cancel_leaves_no_layer(viewer_widget, qtbot):
    viewer, widget = viewer_widget
    widget.region_box.setCurrentText(PROPOSE)
    widget.steps.setValue(200)
    names = [layer.name for layer in viewer.layers]
    with qtbot.waitSignal(widget.jobs.ended, timeout=300_000):
        widget.run()
        widget.jobs.cancel()
    assert [layer.name for layer in viewer.layers] == names
    assert widget.last_result is None
    assert "cancelled" in widget.jobs.status.text()
