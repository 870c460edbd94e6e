"""The shared geometry on real data: one pixel convention for crops, grids and placements,
spot pitch on real platforms, and PIL's size limit changed only inside our own reads."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from PIL import Image

from napari_hinge.geometry import (
    FIELD_OF_VIEW_UM,
    MAX_IMAGE_PIXELS,
    Grid,
    crop_origin,
    edge_placement,
    image_pixel_limit,
    region_grid,
    slide_grid,
    spot_pitch_px,
    spot_pitch_um,
)


@pytest.fixture(scope="module")
def c2(shared_data):
    from napari_hinge.io.legacy_st import read_her2st

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return read_her2st(shared_data / "her2st_subset", "C2", images=False)


def test_pil_limit_only_inside_our_reads(shared_data, monkeypatch):
    """her2st JPEGs (92 Mpx) exceed PIL's default limit: our reads open them without a
    warning, and afterwards the process has PIL's own limit back (patches.py used to switch
    it off for the whole session)."""
    from napari_hinge.patches import ArraySlide

    default = int(1024 * 1024 * 1024 // 4 // 3)  # PIL's own (~89 Mpx)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", default)
    jpg = shared_data / "her2st_subset" / "images" / "C2_HE.jpg"
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with image_pixel_limit() as pil:
            assert pil.MAX_IMAGE_PIXELS == MAX_IMAGE_PIXELS
            with pil.open(jpg) as img:
                assert img.size == (9274, 9911)
        slide = ArraySlide.from_file(jpg)
    assert slide.shape[:2] == (9911, 9274)
    assert default == Image.MAX_IMAGE_PIXELS
    with pytest.warns(Image.DecompressionBombWarning), Image.open(jpg):
        pass  # outside our reads PIL guards as it always does


def test_crop_is_centred_by_the_convention(c2, shared_data):
    """spot_patches reads the crop crop_origin gives: pixel (i, j) centred at (i, j)."""
    from napari_hinge.patches import ArraySlide, spot_patches

    with image_pixel_limit() as pil, pil.open(shared_data / "her2st_subset" / "images"
                                              / "C2_HE.jpg") as img:
        rgb = np.asarray(img.convert("RGB").crop((0, 0, 3000, 3000)))
    xy = c2.obsm["spatial"]
    xy = xy[(xy < 2800).all(axis=1) & (xy > 200).all(axis=1)][:5]
    for side in (31, 32):
        patches = spot_patches(ArraySlide(rgb), xy, side_px=side)
        for (x, y), patch in zip(xy, patches, strict=True):
            x0, y0 = crop_origin(x, side), crop_origin(y, side)
            assert np.array_equal(patch, rgb[y0:y0 + side, x0:x0 + side])
            # the crop's centre, (x0 + (side - 1) / 2), is within half a pixel of the spot
            assert abs(x0 + (side - 1) / 2 - x) <= 0.5 + 1e-9
            assert abs(y0 + (side - 1) / 2 - y) <= 0.5 + 1e-9


def test_grid_placement_puts_each_cell_on_its_tile():
    grid = slide_grid((9911, 9274), 162.8)
    rows, cols, centers = grid.cells()
    assert grid.shape == (9911 // 162.8, 9274 // 162.8)
    assert tuple(centers[0]) == (81.4, 81.4)  # tiles start at the centre of pixel 0
    place = grid.placement(0.688)
    # napari puts raster pixel (r, c) at translate + scale * (r, c): the tile centre in µm
    world = np.asarray(place["translate"]) + np.asarray(place["scale"]) * np.c_[rows, cols]
    assert np.allclose(world, centers[:, ::-1] * 0.688)
    r, c, inside = grid.cell_of(centers + 0.4 * grid.step_px)
    assert inside.all() and np.array_equal(r, rows) and np.array_equal(c, cols)
    assert not grid.cell_of(np.array([[-200.0, 50.0]]))[2].any()
    region = region_grid((100.0, 50.0), (420.0, 51.0), 100.0)
    assert region.shape == (1, 4) and region.origin_xy == (150.0, 100.0)
    with pytest.raises(ValueError, match="stride must be positive"):
        slide_grid((10, 10), 0)


def test_edge_placement_matches_the_pixel_convention():
    """A raster of level-0-sized pixels starting at pixel (x0, y0) coincides with the slide's
    own pixels; one of 4-px pixels has its first centre 1.5 px further (edge at x0 - 1/2)."""
    assert edge_placement((10, 20), 1.0, None) == {"scale": (1.0, 1.0),
                                                    "translate": (20.0, 10.0)}
    place = edge_placement((10, 20), 4.0, 0.5)
    assert place["scale"] == (2.0, 2.0)
    assert place["translate"] == ((20 + 1.5) * 0.5, (10 + 1.5) * 0.5)
    assert Grid((11.5, 21.5), 4.0, (3, 3)).placement(0.5)["translate"] == place["translate"]


def test_spot_pitch_on_real_platforms(c2, shared_data):
    from napari_hinge.io.spaceranger import read_spaceranger

    # legacy ST: a 200 µm grid; the nearest neighbour of a hand-aligned spot is often closer
    assert spot_pitch_um(c2) == pytest.approx(200, rel=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dlpfc = read_spaceranger(shared_data / "dlpfc_visium_lowres" / "151673")
    # Visium: a hexagonal grid, neighbours in one array row are 2 columns apart
    obs, xy = dlpfc.obs, dlpfc.obsm["spatial"]
    key = {(r, c): i for i, (r, c) in enumerate(zip(obs["array_row"], obs["array_col"],
                                                    strict=True))}
    steps = [np.hypot(*(xy[key[(r, c + 2)]] - xy[i])) for (r, c), i in key.items()
             if (r, c + 2) in key]
    assert spot_pitch_px(xy) == pytest.approx(np.median(steps), rel=0.01)
    assert spot_pitch_px(c2.obsm["spatial"][:1]) is None
    no_mpp = c2.copy()
    no_mpp.uns["napari_hinge"] = {}
    assert spot_pitch_um(no_mpp) is None
    assert FIELD_OF_VIEW_UM == 112.0


def test_slide_labels_cap_the_raster(c2):
    from napari_hinge.stmgac.labels import slide_labels

    ad = c2.copy()
    ad.obs["domain"] = (np.arange(ad.n_obs) % 3).astype(str)
    ad.obs["domain"] = ad.obs["domain"].astype("category")
    labels, scale = slide_labels(ad, (9911, 9274), max_side=1000)
    assert scale == pytest.approx(1000 / 9911)
    assert labels.shape[0] in (1000, 1001) and labels.shape[1] == 936  # ceil of a float
    rows = np.floor(ad.obsm["spatial"][:, 1] * scale + 0.5).astype(int)
    cols = np.floor(ad.obsm["spatial"][:, 0] * scale + 0.5).astype(int)
    codes = ad.obs["domain"].cat.codes.to_numpy() + 1
    assert np.array_equal(labels[rows, cols], codes)  # each spot's domain under its centre
    small, one = slide_labels(ad, (900, 800))
    assert one == 1.0 and small.shape == (900, 800)
