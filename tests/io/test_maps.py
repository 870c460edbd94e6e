"""Outputs round-trip: a map OME-TIFF that predict-slide (or the layer writer) wrote opens in
the plugin's reader as value layers placed in µm on its slide."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from napari_hinge._reader import get_slide_reader
from napari_hinge._writer import write_image_ome_tiff
from napari_hinge.hinge.slide_predict import write_ome_tiff
from napari_hinge.io.maps import is_map_tiff, read_map


def _prediction(genes, raster, scale_um, origin_um):
    """What write_ome_tiff reads from a SlidePrediction (the maps, their placement)."""
    return SimpleNamespace(genes=genes, raster=lambda which="mean": raster,
                           placement={"scale": (scale_um, scale_um), "translate": origin_um})


def test_predict_slide_maps_open_on_their_slide(shared_data, tmp_path):
    from napari_hinge.io.slides import open_slide

    slide = open_slide(shared_data / "wsi_small" / "her2st_C2_HE_pyramid.tif")
    h_um, w_um = (n * slide.microns_per_pixel for n in slide.shape)
    raster = np.random.default_rng(0).random((2, 9, 8), dtype=np.float32)
    raster[:, 0, 0] = np.nan  # off tissue
    path = write_ome_tiff(_prediction(["GRB7", "ERBB2"], raster, 800.0, (400.0, 400.0)),
                          tmp_path / "maps.ome.tif")
    assert is_map_tiff(path) and not is_map_tiff(shared_data / "wsi_small" /
                                                 "her2st_C2_HE_pyramid.ome.tif")
    reader = get_slide_reader(str(path))
    [(data, kwargs, kind)] = reader(str(path))
    assert kind == "image" and kwargs["channel_axis"] == 0 and kwargs["name"] == ["GRB7", "ERBB2"]
    np.testing.assert_array_equal(data, raster)
    assert kwargs["scale"] == (800.0, 800.0) and kwargs["translate"] == (400.0, 400.0)
    assert kwargs["units"] == ("µm", "µm")
    # on the slide: the raster's extent in µm covers the slide's (both layers are in µm)
    extent = np.array(kwargs["translate"]) + np.array(kwargs["scale"]) * raster.shape[1:]
    assert extent[0] >= h_um * 0.9 and extent[1] >= w_um * 0.9 and extent[0] < h_um + 2000


def test_a_saved_map_layer_reopens_with_its_placement(tmp_path):
    values = np.linspace(0, 1, 30, dtype=np.float32).reshape(5, 6)
    [out] = write_image_ome_tiff(str(tmp_path / "erbb2.ome.tif"), values,
                                 {"name": "ERBB2", "scale": (10.0, 10.0),
                                  "translate": (5.0, 7.5)})
    m = read_map(out)
    assert m.names == ["ERBB2"] and m.scale == (10.0, 10.0) and m.translate == (5.0, 7.5)
    np.testing.assert_array_equal(m.data[0], values)


def test_a_map_with_a_bad_pixel_size_names_the_field(tmp_path):
    import tifffile

    path = tmp_path / "bad.ome.tif"
    tifffile.imwrite(path, np.zeros((4, 4), np.float32), ome=True,
                     metadata={"axes": "YX", "PhysicalSizeX": -2.0, "PhysicalSizeY": 1.0})
    with pytest.raises(ValueError, match="bad.ome.tif: PhysicalSizeX"):
        read_map(path)
