"""Whole-slide HINGE on the real her2st C2 pyramid with an untrained tiny model: the maps
have the grid's shape, sit on the tissue, cancel cleanly and write an OME-TIFF in µm."""

from __future__ import annotations

import numpy as np
import pytest

from napari_hinge.hinge.slide_predict import predict_slide_iter, write_ome_tiff
from napari_hinge.training import StopToken, run_to_end

GENES = ["ERBB2", "GRB7", "KRT19", "CD74"]


@pytest.fixture(scope="module")
def model():
    from napari_hinge.hinge.pipeline import build_model

    return build_model(GENES, 1280, encoder="efficientnet-lite0", ada_rank=8)


@pytest.fixture(scope="module")
def slide(shared_data):
    from napari_hinge.io.slides import open_slide

    return open_slide(shared_data / "wsi_small" / "her2st_C2_HE_pyramid.tif")


def drain(gen):
    """Run a generator to its end; its return value and every event it yielded."""
    events = []
    value, _ = run_to_end(gen, events.append)
    return value, events


def test_maps_cover_the_tissue_grid(model, slide, tmp_path):
    prediction, events = drain(predict_slide_iter(
        model, slide, stride_um=800, genes=["GRB7", "ERBB2"], n_samples=2, reveal_steps=5,
        batch_tiles=8))
    grid = prediction.grid
    assert 5 < len(grid) < 60
    assert [e.step for e in events] == list(range(1, len(events) + 1))
    assert events[-1].step == events[-1].total_steps
    mean = prediction.raster("mean")
    std = prediction.raster("std")
    assert mean.shape == std.shape == (2, *grid.shape)
    assert np.isfinite(mean[:, grid.rows, grid.cols]).all()
    assert np.isnan(mean).sum() == 2 * (grid.shape[0] * grid.shape[1] - len(grid))
    assert (std[:, grid.rows, grid.cols] >= 0).all()
    scale = prediction.placement["scale"][0]
    assert scale == pytest.approx(800, rel=0.01)  # µm per raster pixel = the stride

    adata = prediction.to_adata()
    assert adata.shape == (len(grid), 2) and adata.obsm["spatial"].shape == (len(grid), 2)

    import tifffile

    path = write_ome_tiff(prediction, tmp_path / "maps.ome.tif")
    with tifffile.TiffFile(path) as tif:
        assert tif.is_ome and tif.series[0].shape == (2, *grid.shape)
        assert 'PhysicalSizeX="800' in tif.ome_metadata[:4000].replace("800.0", "800")
        assert "GRB7" in tif.ome_metadata


def test_cancel_returns_nothing(model, slide):
    stop = StopToken()
    gen = predict_slide_iter(model, slide, stride_um=800, n_samples=1, reveal_steps=2,
                             batch_tiles=4, stop=stop)
    first = next(gen)
    stop.request()
    result, events = drain(gen)
    assert first.kind == "step" and events[-1].kind == "stopped" and result is None


def test_bad_input(model, slide):
    with pytest.raises(KeyError, match="NOT_A_GENE"):
        next(predict_slide_iter(model, slide, genes=["NOT_A_GENE"]))


def test_predict_slide_command(model, shared_data, tmp_path):
    import tifffile

    from napari_hinge.cli import main
    from napari_hinge.hinge.pipeline import save_model

    model_dir = save_model(model, tmp_path / "tiny")
    slide = shared_data / "wsi_small" / "her2st_C2_HE_pyramid.ome.tif"
    rc = main(["hinge", "predict-slide", str(slide), "--model", str(model_dir), "--genes",
               "ERBB2,GRB7,CD74", "--mode", "tiles", "--stride", "900", "--samples", "1",
               "--reveal-steps", "2", "--out", str(tmp_path / "out")])
    assert rc == 0
    with tifffile.TiffFile(tmp_path / "out" / "maps.ome.tif") as tif:
        assert tif.series[0].shape[0] == 3 and "CD74" in tif.ome_metadata
    assert (tmp_path / "out" / "uncertainty.ome.tif").is_file()
    assert (tmp_path / "out" / "tiles.h5ad").is_file()
    assert main(["hinge", "predict-slide", str(tmp_path / "missing.svs"),
                 "--out", str(tmp_path)]) == 2


def test_compare_with_spots_reads_the_map_at_each_spot(model, slide, shared_data):
    """The map at the measured C2 spots (same pixels as the pyramid): a spot at a map
    position gets that position's value, others the bilinear mix of their neighbours, spots
    off the map none; a Pearson r per measured gene."""
    import warnings

    from napari_hinge.hinge.slide_predict import compare_with_spots
    from napari_hinge.io.legacy_st import read_her2st

    prediction, _ = drain(predict_slide_iter(
        model, slide, stride_um=800, genes=["GRB7", "ERBB2"], n_samples=2, reveal_steps=5,
        batch_tiles=8))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        spots = read_her2st(shared_data / "her2st_subset", "C2", images=False)
    values, scores = compare_with_spots(prediction, spots)
    assert sorted(values) == ["ERBB2", "GRB7"] and sorted(scores) == ["ERBB2", "GRB7"]
    # at the map's own positions the reading is the map itself
    centre_values, _ = compare_with_spots(prediction, _at(spots, prediction.grid.centers_xy))
    np.testing.assert_allclose(centre_values["GRB7"], prediction.mean[:, 0], rtol=1e-5)
    grid = prediction.grid
    xy = spots.obsm["spatial"]
    hits = 0
    for j, (x, y) in enumerate(xy):
        # the cell whose square [centre - stride/2, centre + stride/2) holds the spot
        d = np.abs(grid.centers_xy - (x, y)).max(axis=1)
        near = np.flatnonzero(d <= grid.stride_px / 2 + 1e-6)
        if len(near):
            hits += 1
            assert np.isfinite(values["GRB7"][j])
        else:  # its cell is off the tissue: no value
            assert np.isnan(values["GRB7"][j])
    assert hits > 0.8 * spots.n_obs
    assert all(-1 <= r <= 1 for r in scores.values())


def _at(adata, xy):
    """``adata``'s first ``len(xy)`` spots moved to ``xy`` (level-0 pixels)."""
    moved = adata[: len(xy)].copy() if adata.n_obs >= len(xy) else None
    assert moved is not None
    moved.obsm["spatial"] = np.asarray(xy, dtype=float)
    return moved
