"""Spot patches from real H&E, dihedral transforms, and the on-disk feature cache."""

from __future__ import annotations

import numpy as np
import pytest

from napari_hinge._cache import cache_dir
from napari_hinge.encoders import get_encoder
from napari_hinge.features import encode_spots
from napari_hinge.io.legacy_st import read_her2st
from napari_hinge.io.slides import open_slide
from napari_hinge.patches import (
    DIHEDRAL,
    ArraySlide,
    _resize,
    dihedral,
    dihedral_all,
    patch_side_px,
    spot_patches,
)


@pytest.fixture(scope="module")
def c2(shared_data):
    return read_her2st(shared_data / "her2st_subset", "C2", images=False)


@pytest.fixture(scope="module")
def tif(shared_data):
    return shared_data / "wsi_small" / "her2st_C2_HE_pyramid.tif"


@pytest.fixture(scope="module")
def effnet():
    return get_encoder("efficientnet-lite0")


def test_patch_side_px(c2):
    meta = c2.uns["napari_hinge"]
    side = patch_side_px(c2)
    assert side == round(max(meta["spot_diameter_px"], 112 / meta["microns_per_pixel"]))
    assert 150 < side < 175  # ~0.69 um/px: 112 um is ~163 px, more than the 145 px spot


def test_spot_patches_match_direct_crop(c2, tif):
    slide = open_slide(tif)
    xy = c2.obsm["spatial"][:5]
    patches = spot_patches(slide, xy, side_px=160)
    assert patches.shape == (5, 160, 160, 3) and patches.dtype == np.uint8
    x, y = xy[0]
    x0, y0 = int(np.floor(x - 80 + 0.5)), int(np.floor(y - 80 + 0.5))
    direct = np.asarray(slide.levels[0][y0 : y0 + 160, x0 : x0 + 160].compute())
    np.testing.assert_array_equal(patches[0], direct)
    # the same spots from an in-memory adapter over the same pixels
    region = np.asarray(slide.levels[0][: int(xy[:, 1].max()) + 200, :].compute())
    np.testing.assert_array_equal(spot_patches(ArraySlide(region), xy, side_px=160), patches)
    assert patches.std() > 10  # tissue, not glass


def test_spot_patches_edges_are_white_and_errors():
    img = np.zeros((50, 60, 3), np.uint8)
    p = spot_patches(img, [[0.0, 0.0]], side_px=20)
    assert (p[0, :10, :10] == 255).all() and (p[0, 10:, 10:] == 0).all()
    with pytest.raises(ValueError, match="coords_xy"):
        spot_patches(img, [1.0, 2.0], side_px=20)
    with pytest.raises(FileNotFoundError, match="nope.tif"):
        spot_patches("nope.tif", [[1.0, 2.0]], side_px=20)


def test_coarse_level_read_matches_level0_resize(c2, tif):
    slide = open_slide(tif)
    xy = c2.obsm["spatial"][:6]
    coarse = spot_patches(slide, xy, side_px=640, out_size=64).astype(float)  # level 3 (8x)
    level0 = spot_patches(slide, xy, side_px=640)  # out_size None: level 0, no resize
    fine = np.stack([_resize(p, 64) for p in level0]).astype(float)
    same = np.abs(coarse - fine).mean()
    other = np.abs(coarse - fine[::-1]).mean()
    assert same < 12 and same < 0.5 * other  # resampling filters differ, content does not


def test_dihedral_group():
    x = np.arange(2 * 3 * 3 * 3).reshape(2, 3, 3, 3)  # N, H, W, C
    views = [dihedral(x, k) for k in DIHEDRAL]
    assert len({v.tobytes() for v in views}) == 8  # all distinct
    np.testing.assert_array_equal(views[0], x)
    np.testing.assert_array_equal(views[4], x[:, :, ::-1])  # mirror left-right
    np.testing.assert_array_equal(dihedral(dihedral(x, 1), 3), x)  # 90 then 270
    np.testing.assert_array_equal(dihedral(dihedral(x, 6), 6), x)  # flip+180 is an involution
    assert dihedral_all(x[0]).shape == (8, 3, 3, 3)
    with pytest.raises(ValueError, match="0..7"):
        dihedral(x, 8)


def test_encode_spots_caches_to_disk(c2, tif, effnet, monkeypatch, tmp_path):
    monkeypatch.setenv("NAPARI_HINGE_CACHE", str(tmp_path))  # a cache of its own to count
    xy = c2.obsm["spatial"][:5]
    seen = []
    feats = encode_spots(tif, xy, encoder=effnet, side_px=160, batch_size=4,
                         progress=lambda d, t: seen.append((d, t)))
    assert feats.shape == (5, 1280) and feats.dtype == np.float32
    assert seen[-1] == (5, 5)
    files = list(cache_dir("features").glob("efficientnet-lite0-*.npy"))
    assert len(files) == 1
    direct = effnet.encode(spot_patches(tif, xy, side_px=160))
    np.testing.assert_allclose(feats, direct, rtol=1e-4, atol=1e-4)

    def boom(*a, **k):
        raise AssertionError("encoder called although the features are cached")

    monkeypatch.setattr(effnet, "encode", boom)
    again = encode_spots(tif, xy, encoder=effnet, side_px=160)
    np.testing.assert_array_equal(again, feats)
    # a different patch size or coordinate set is a different entry (and would encode)
    with pytest.raises(AssertionError, match="encoder called"):
        encode_spots(tif, xy, encoder=effnet, side_px=161)
    with pytest.raises(AssertionError, match="encoder called"):
        encode_spots(tif, xy[:4], encoder=effnet, side_px=160)


def test_encode_spots_augmented_and_corrupt_entry(c2, tif, effnet):
    xy = c2.obsm["spatial"][10:13]
    aug = encode_spots(tif, xy, encoder=effnet, side_px=160, augment=True)
    assert aug.shape == (8, 3, 1280)
    plain = encode_spots(tif, xy, encoder=effnet, side_px=160)
    np.testing.assert_allclose(aug[0], plain, rtol=1e-4, atol=1e-4)
    assert not np.allclose(aug[1], aug[0], atol=1e-3)  # a rotated view is a different input
    # a truncated cache entry is recomputed, not trusted
    for f in cache_dir("features").glob("*.npy"):
        f.write_bytes(b"garbage")
    again = encode_spots(tif, xy, encoder=effnet, side_px=160, augment=True)
    np.testing.assert_allclose(again, aug, rtol=1e-5, atol=1e-5)
