"""Tissue masks and tile grids on real slides."""

from __future__ import annotations

import numpy as np
import pytest

from napari_hinge.io.slides import open_slide
from napari_hinge.tissue import tile_grid, tissue_mask


@pytest.fixture(scope="module")
def c2(shared_data):
    from napari_hinge.io.legacy_st import read_her2st

    slide = open_slide(shared_data / "wsi_small" / "her2st_C2_HE_pyramid.tif")
    spots = read_her2st(shared_data / "her2st_subset", "C2", images=False)
    return slide, spots


def test_measured_spots_lie_on_the_tissue_mask(c2):
    slide, spots = c2
    tissue = tissue_mask(slide)
    assert 0.05 < tissue.fraction < 0.6
    xy = spots.obsm["spatial"] / tissue.downsample
    on_tissue = tissue.mask[xy[:, 1].astype(int), xy[:, 0].astype(int)]
    assert on_tissue.mean() > 0.9
    # ...and the glass in the corners is not tissue.
    assert not tissue.mask[:20, :20].any() and not tissue.mask[-20:, -20:].any()


def test_grid_at_spot_pitch_matches_the_measured_spots(c2):
    slide, spots = c2
    pitch = 200 / slide.microns_per_pixel  # legacy ST: 200 µm between spot centres
    grid = tile_grid(tissue_mask(slide), slide.shape, stride_px=pitch)
    assert 0.7 * spots.n_obs < len(grid) < 1.5 * spots.n_obs
    half = tile_grid(tissue_mask(slide), slide.shape, stride_px=pitch / 2)
    assert 3 * len(grid) < len(half) < 5 * len(grid)


def test_raster_placement_round_trip(c2):
    slide, _ = c2
    grid = tile_grid(tissue_mask(slide), slide.shape, stride_px=400)
    values = np.stack([grid.centers_xy[:, 0], grid.centers_xy[:, 1]], axis=1)
    raster = grid.to_raster(values)  # (2, H, W)
    assert raster.shape == (2, *grid.shape)
    assert np.isnan(raster[0]).sum() == raster[0].size - len(grid)
    place = grid.placement(slide.microns_per_pixel)
    # A raster pixel's world position (µm) is the centre of its tile on the slide.
    r, c = grid.rows[7], grid.cols[7]
    world_y = place["translate"][0] + r * place["scale"][0]
    world_x = place["translate"][1] + c * place["scale"][1]
    assert world_x == pytest.approx(raster[0, r, c] * slide.microns_per_pixel)
    assert world_y == pytest.approx(raster[1, r, c] * slide.microns_per_pixel)


def test_blank_slide_has_no_tissue(tmp_path):
    from PIL import Image

    blank = tmp_path / "glass.png"
    Image.fromarray(np.full((600, 800, 3), 245, np.uint8)).save(blank)
    with pytest.raises(ValueError, match="glass.png: no tissue"):
        tissue_mask(open_slide(blank))
