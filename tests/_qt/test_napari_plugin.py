"""The plugin as a user meets it: manifest, readers through ``viewer.open``, sample data,
the Slide & spots widget, and a screenshot that shows tissue (headless napari on Xvfb)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from napari_hinge._reader import get_slide_reader, get_spatial_reader

PLUGIN = "napari-hinge"


def test_manifest_is_valid_and_imports():
    import npe2

    manifest = npe2.PluginManifest.from_distribution(PLUGIN)
    manifest.validate_imports()
    assert {r.command for r in manifest.contributions.readers} == {
        f"{PLUGIN}.get_slide_reader", f"{PLUGIN}.get_spatial_reader"}


def test_readers_decline_what_they_do_not_read(tmp_path):
    note = tmp_path / "notes.txt"
    note.write_text("not a slide")
    empty = tmp_path / "empty_folder"
    empty.mkdir()
    assert get_slide_reader(str(note)) is None
    assert get_spatial_reader(str(note)) is None
    assert get_spatial_reader(str(empty)) is None
    assert get_slide_reader(str(tmp_path / "missing.svs")) is None


@pytest.mark.parametrize(
    ("name", "levels", "mpp"),
    [("CMU-1-Small-Region.svs", 1, 0.499), ("her2st_C2_HE_pyramid.tif", 5, 0.69),
     ("her2st_C2_HE_pyramid.ome.tif", 5, 0.69)],
)
def test_open_slide_through_plugin(make_napari_viewer, shared_data, name, levels, mpp):
    viewer = make_napari_viewer()
    [layer] = viewer.open(shared_data / "wsi_small" / name, plugin=PLUGIN)
    assert layer.rgb
    assert len(layer.data) == levels if levels > 1 else layer.data.ndim == 3
    if levels > 1:
        shapes = [level.shape[0] for level in layer.data]
        assert shapes == sorted(shapes, reverse=True)
    assert layer.scale[0] == pytest.approx(mpp, rel=0.01)
    assert str(layer.units[0]) in ("micrometer", "µm")


@pytest.mark.parametrize(
    "folder",
    ["visium_tiny_fixture", "visium_cytassist_mouse_sample", "dlpfc_visium_lowres/151673"],
)
def test_open_spaceranger_folder_through_plugin(make_napari_viewer, shared_data, folder):
    viewer = make_napari_viewer()
    layers = viewer.open(shared_data / folder, plugin=PLUGIN)
    image, points = layers
    assert type(image).__name__ == "Image" and type(points).__name__ == "Points"
    adata = points.metadata["adata"]
    assert len(points.data) == adata.n_obs
    # Spots and slide share one frame: every spot lies inside the image (in µm).
    extent = np.asarray(image.data[0].shape[:2] if image.multiscale else image.data.shape[:2])
    assert np.allclose(points.scale, image.scale)
    assert (points.data >= 0).all() and (points.data < extent).all()
    # True diameter: Visium spots are 55 µm.
    assert points.size[0] * points.scale[0] == pytest.approx(55, rel=0.05)


def test_open_h5ad_through_plugin(make_napari_viewer, shared_data, tmp_path):
    from napari_hinge.io.spaceranger import read_spaceranger

    adata = read_spaceranger(shared_data / "visium_tiny_fixture")
    path = tmp_path / "tiny.h5ad"
    adata.write_h5ad(path)
    viewer = make_napari_viewer()
    layers = viewer.open(path, plugin=PLUGIN)
    points = layers[-1]
    assert type(points).__name__ == "Points" and len(points.data) == adata.n_obs


def test_sample_data_and_widget_color_by_gene(make_napari_viewer):
    from napari_hinge._widgets.slide_spots import SlideSpotsWidget

    viewer = make_napari_viewer()
    layers = viewer.open_sample(PLUGIN, "her2st_C3")
    image, points = layers
    assert points.metadata["microns_per_pixel"] == pytest.approx(image.scale[0])
    widget = SlideSpotsWidget(viewer)
    assert widget.layer is points
    assert "spots" in widget.info.text() and "µm/px" in widget.info.text()

    widget.search.setText("erbb")
    listed = [widget.gene_list.item(i).text() for i in range(widget.gene_list.count())]
    assert "ERBB2" in listed and all("ERBB" in g for g in listed)

    widget.select_gene("ERBB2")
    assert points.face_colorbar.visible
    colors = np.asarray(points.face_color)
    assert len(np.unique(colors.round(3), axis=0)) > 10  # a real gradient, not one colour
    values = points.features["ERBB2"].to_numpy()
    # Brighter (magma) where ERBB2 is higher: colour brightness follows the values.
    brightness = colors[:, :3].sum(1)
    assert np.corrcoef(values, brightness)[0, 1] > 0.8

    with pytest.raises(KeyError, match="NOT_A_GENE"):
        widget.select_gene("NOT_A_GENE")


def test_pixel_size_from_the_user(make_napari_viewer, shared_data, tmp_path):
    """A plain PNG has no pixel size; the widget sets it on the spots and their slide."""
    from napari_hinge._widgets.slide_spots import SlideSpotsWidget

    viewer = make_napari_viewer()
    folder = tmp_path / "tiny"
    shutil.copytree(shared_data / "visium_tiny_fixture", folder)
    image, points = viewer.open(folder, plugin=PLUGIN)
    widget = SlideSpotsWidget(viewer)
    widget.mpp_box.setValue(2.5)
    widget._apply_mpp()
    assert tuple(points.scale) == (2.5, 2.5) and tuple(image.scale) == (2.5, 2.5)
    assert points.metadata["adata"].uns["napari_hinge"]["microns_per_pixel"] == 2.5


def test_screenshot_shows_tissue_under_spots(make_napari_viewer, tmp_path):
    """What a user sees: H&E (pink/purple) under coloured spots, not a black frame."""
    from PIL import Image
    from qtpy.QtWidgets import QApplication

    from napari_hinge._widgets.slide_spots import SlideSpotsWidget

    viewer = make_napari_viewer(show=True)
    viewer.window._qt_window.resize(1400, 1000)
    viewer.open_sample(PLUGIN, "her2st_C3")
    widget = SlideSpotsWidget(viewer)
    viewer.window.add_dock_widget(widget)
    widget.select_gene("ERBB2")
    viewer.reset_view()
    QApplication.processEvents()
    shot = viewer.screenshot(canvas_only=True, flash=False)[..., :3].astype(int)
    out = Path(os.environ.get("NAPARI_HINGE_SCREENSHOTS", tmp_path))
    out.mkdir(parents=True, exist_ok=True)
    Image.fromarray(shot.astype(np.uint8)).save(out / "slide_spots_ERBB2.png")

    assert shot.mean() > 20, "black frame"
    r, g, b = shot[..., 0], shot[..., 1], shot[..., 2]
    # H&E stain: red and blue above green (eosin pink, haematoxylin purple).
    stained = (r > g + 15) & (b > g + 5) & (r < 250)
    assert stained.mean() > 0.05


def test_bad_slide_keeps_existing_layers(make_napari_viewer, shared_data, tmp_path):
    source = shared_data / "wsi_small" / "her2st_C2_HE_pyramid.tif"
    truncated = tmp_path / "truncated.tif"
    truncated.write_bytes(source.read_bytes()[: int(source.stat().st_size * 0.6)])
    viewer = make_napari_viewer()
    viewer.open_sample(PLUGIN, "cmu1")
    with pytest.raises(Exception, match="truncated.tif"):
        viewer.open(truncated, plugin=PLUGIN)
    assert [layer.name for layer in viewer.layers] == ["CMU-1-Small-Region.svs"]


def test_open_legacy_st_folder_and_section(make_napari_viewer, shared_data):
    """A her2st folder opens its sections that have an H&E (first visible); a count table
    opens its own section."""
    viewer = make_napari_viewer()
    layers = viewer.open(shared_data / "her2st_subset", plugin=PLUGIN)
    names = [layer.name for layer in layers]
    assert names[-2:] == ["C2 H&E", "C2 spots"] and len(layers) == 10
    assert [layer.visible for layer in layers[-4:]] == [False, False, True, True]
    points = layers[-1]
    # the visible section's spots on top; its slide selected (test_gui_guides.py)
    assert viewer.layers[-1] is points
    assert points.scale[0] == pytest.approx(0.688, rel=0.01)
    assert points.size[0] * points.scale[0] == pytest.approx(100, rel=0.05)  # ST spots: 100 µm

    viewer.layers.clear()
    [points] = viewer.open(shared_data / "her2st_subset" / "counts" / "A1.tsv.gz", plugin=PLUGIN)
    assert type(points).__name__ == "Points" and len(points.data) == points.metadata["adata"].n_obs


def test_writers_keep_scale_and_predictions(make_napari_viewer, tmp_path):
    import anndata
    import tifffile

    viewer = make_napari_viewer()
    _, points = viewer.open_sample(PLUGIN, "her2st_C3")
    features = points.features.copy()
    features["pred_ERBB2"] = np.arange(len(features), dtype=float)
    points.features = features
    [written] = points.save(str(tmp_path / "spots.h5ad"), plugin=PLUGIN)
    back = anndata.read_h5ad(written)
    assert back.n_obs == len(points.data)
    assert np.array_equal(back.obs["pred_ERBB2"].to_numpy(), features["pred_ERBB2"].to_numpy())

    raster = np.random.default_rng(0).random((12, 9)).astype(np.float32)
    layer = viewer.add_image(raster, scale=(200.0, 200.0), translate=(100.0, 50.0), name="map")
    [written] = layer.save(str(tmp_path / "map.ome.tif"), plugin=PLUGIN)
    with tifffile.TiffFile(written) as tif:
        assert tif.is_ome and np.array_equal(tif.asarray(), raster)
        assert 'PhysicalSizeX="200.0"' in tif.ome_metadata
