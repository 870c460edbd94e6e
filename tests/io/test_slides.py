"""open_slide on real slides: SVS, generic and OME pyramidal TIFF, her2st JPEG, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
from PIL import Image

from napari_hinge.geometry import image_pixel_limit
from napari_hinge.io import slides
from napari_hinge.io.slides import (
    SLIDE_SUFFIXES,
    Slide,
    is_slide_path,
    needs_pyramid_build,
    open_slide,
)

C2_SHAPE = (9911, 9274)  # her2st C2 H&E, (H, W)


@pytest.fixture(scope="module")
def wsi(shared_data):
    return shared_data / "wsi_small"


@pytest.fixture(scope="module")
def c2_jpg(shared_data):
    return shared_data / "her2st_subset" / "images" / "C2_HE.jpg"


@pytest.fixture(scope="module")
def c2_pixels(c2_jpg):
    """The C2 JPEG decoded by PIL, the reference for every her2st pixel check."""
    with image_pixel_limit(), Image.open(c2_jpg) as img:
        return np.asarray(img.convert("RGB"))


def _isolated_cache(monkeypatch, tmp_path):
    cache = tmp_path / "cache"
    monkeypatch.setenv("NAPARI_HINGE_CACHE", str(cache))
    return cache / "pyramids"


def _entries(folder):
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


# ------------------------------------------------------------------------------------------ SVS


def test_svs_single_level_with_aperio_mpp(wsi):
    path = wsi / "CMU-1-Small-Region.svs"
    assert not needs_pyramid_build(path)  # below the threshold: opens lazily as it is
    with tifffile.TiffFile(path) as tif:
        assert len(tif.series) == 4  # baseline + thumbnail, label, macro
        ref = tif.pages[0].asarray()
    slide = open_slide(path)
    assert isinstance(slide, Slide)
    assert slide.format == "svs"
    assert len(slide.levels) == 1  # thumbnail/label/macro are not pyramid levels
    assert slide.levels[0].shape == (2967, 2220, 3)
    assert slide.levels[0].dtype == np.uint8
    assert slide.shape == (2967, 2220)
    assert slide.microns_per_pixel == pytest.approx(0.499)
    assert slide.mpp_source == "aperio"
    assert slide.downsamples == [1.0]
    assert slide.levels[0].chunksize == (512, 512, 3)  # re-chunked from 240 px tiles
    assert slide.pyramid_cache is None  # below the flat-pyramid threshold
    np.testing.assert_array_equal(slide.levels[0].compute(), ref)
    slide.close()


# --------------------------------------------------------------------------- pyramidal TIFFs


@pytest.fixture(scope="module")
def pyramids(wsi):
    tif = open_slide(wsi / "her2st_C2_HE_pyramid.tif")
    ome = open_slide(wsi / "her2st_C2_HE_pyramid.ome.tif")
    yield tif, ome
    tif.close()
    ome.close()


def test_pyramid_structure_and_mpp(pyramids):
    tif, ome = pyramids
    assert not needs_pyramid_build(tif.path) and not needs_pyramid_build(ome.path)
    assert (tif.format, ome.format) == ("tiff", "ome-tiff")
    assert (tif.mpp_source, ome.mpp_source) == ("tiff-resolution", "ome")
    for s in pyramids:
        assert len(s.levels) == 5
        sizes = [lv.shape[0] * lv.shape[1] for lv in s.levels]
        assert sizes == sorted(sizes, reverse=True) and len(set(sizes)) == 5
        assert s.levels[0].shape == (*C2_SHAPE, 3)
        assert all(lv.dtype == np.uint8 and lv.shape[2] == 3 for lv in s.levels)
        assert s.microns_per_pixel == pytest.approx(0.69)
        np.testing.assert_allclose(s.downsamples, [1, 2, 4, 8, 16], rtol=0.01)
        for lv in s.levels:
            assert lv.chunksize[0] == lv.chunksize[1] == min(512, *lv.shape[:2])


def test_levels_are_independent_reads(pyramids):
    """A coarse level must not be a strided view of the base (that decodes full-res tiles)."""
    for s in pyramids:
        base_name = s.levels[0].name
        for lv in s.levels[1:]:
            names = {k[0] if isinstance(k, tuple) else k for k in dict(lv.__dask_graph__())}
            assert not any(base_name in str(n) for n in names)


def test_tif_and_ome_have_equal_pixels(pyramids, wsi):
    tif, ome = pyramids
    for k in range(2, 5):  # small levels whole
        a = tif.levels[k].compute()
        np.testing.assert_array_equal(a, ome.levels[k].compute())
        np.testing.assert_array_equal(a, tifffile.imread(wsi / "her2st_C2_HE_pyramid.tif", level=k))
    for y, x in [(0, 0), (4000, 5000), (9911 - 700, 9274 - 900)]:  # big levels in windows
        for k in (0, 1):
            win = (slice(y >> k, (y >> k) + 700), slice(x >> k, (x >> k) + 900))
            a, b = tif.levels[k][win].compute(), ome.levels[k][win].compute()
            np.testing.assert_array_equal(a, b)


def test_read_region_matches_slice_and_pads_white(pyramids):
    slide = pyramids[0]
    inside = slide.read_region(3000, 4000, 300, 200)
    np.testing.assert_array_equal(inside, slide.levels[0][4000:4200, 3000:3300].compute())
    # x, y are level-0 pixels at every level; w, h are pixels of that level
    lv2 = slide.read_region(3000, 4000, 100, 60, level=2)
    np.testing.assert_array_equal(lv2, slide.levels[2][1000:1060, 750:850].compute())
    # straddling the top-left and bottom-right corners
    tl = slide.read_region(-50, -30, 200, 100)
    assert tl.shape == (100, 200, 3)
    assert (tl[:30] == 255).all() and (tl[:, :50] == 255).all()
    np.testing.assert_array_equal(tl[30:, 50:], slide.levels[0][:70, :150].compute())
    h, w = slide.shape
    br = slide.read_region(w - 10, h - 5, 40, 20)
    np.testing.assert_array_equal(br[:5, :10], slide.levels[0][h - 5 :, w - 10 :].compute())
    assert (br[5:] == 255).all() and (br[:, 10:] == 255).all()
    assert (slide.read_region(w + 100, 0, 8, 8) == 255).all()
    for bad in [(0, 5), (5, 0), (-1, 5)]:
        with pytest.raises(ValueError, match="positive"):
            slide.read_region(0, 0, *bad)
    with pytest.raises(ValueError, match="level 7"):
        slide.read_region(0, 0, 4, 4, level=7)


def test_thumbnail(pyramids):
    slide = pyramids[0]
    th = slide.thumbnail(1024)
    assert th.dtype == np.uint8 and max(th.shape[:2]) == 1024 and th.shape[2] == 3
    # the aspect ratio survives, and it looks like the slide's smallest level
    assert th.shape[0] / th.shape[1] == pytest.approx(C2_SHAPE[0] / C2_SHAPE[1], rel=0.01)
    small = slide.thumbnail(619)
    np.testing.assert_array_equal(small, slide.levels[4].compute())
    tiny = slide.thumbnail(100)
    assert max(tiny.shape[:2]) == 100
    assert abs(tiny.astype(float).mean() - small.astype(float).mean()) < 3


# -------------------------------------------------------------------------- her2st JPEG


def test_jpeg_builds_cached_pyramid_once(c2_jpg, c2_pixels, tmp_path, monkeypatch):
    root = _isolated_cache(monkeypatch, tmp_path)
    assert needs_pyramid_build(c2_jpg)
    slide = open_slide(c2_jpg)
    assert not needs_pyramid_build(c2_jpg)
    assert slide.format == "jpeg"
    assert slide.microns_per_pixel is None  # 72 dpi JPEG metadata is not a pixel size
    assert [lv.shape[:2] for lv in slide.levels] == [
        (9911, 9274), (4956, 4637), (2478, 2319), (1239, 1160), (620, 580), (310, 290)
    ]  # fmt: skip
    assert all(lv.chunksize == (512, 512, 3) for lv in slide.levels[:4])
    entries = _entries(root)
    assert len(entries) == 1 and not entries[0].startswith(".tmp")
    assert slide.pyramid_cache == root / entries[0]
    np.testing.assert_array_equal(slide.levels[0].compute(), c2_pixels)
    # level 1 is a 2x2 area mean of the original: close to PIL's box filter
    ref1 = np.asarray(Image.fromarray(c2_pixels[2000:4000, 3000:5000]).reduce(2))
    diff = np.abs(slide.levels[1][1000:2000, 1500:2500].compute().astype(np.int16) - ref1)
    assert diff.max() <= 1

    # Second open: from the cache, no rebuild (the builder would raise).
    def no_build(*a, **k):
        raise AssertionError("pyramid rebuilt although cached")

    monkeypatch.setattr(slides, "_build_pyramid", no_build)
    before = {p: p.stat().st_mtime_ns for p in slide.pyramid_cache.rglob("*")}
    again = open_slide(c2_jpg, mpp=0.69)
    assert again.pyramid_cache == slide.pyramid_cache
    assert {p: p.stat().st_mtime_ns for p in again.pyramid_cache.rglob("*")} == before
    assert again.microns_per_pixel == 0.69 and again.mpp_source == "argument"
    np.testing.assert_array_equal(again.levels[3].compute(), slide.levels[3].compute())


# ------------------------------------------------------------------- small / flat TIFFs


def test_single_level_tiff_resolution_and_override(c2_pixels, tmp_path):
    crop = c2_pixels[5000:5300, 4000:4200]
    path = tmp_path / "crop.tif"
    # 2 µm/px = 5000 px/cm
    tifffile.imwrite(
        path, crop, photometric="rgb", resolution=(5000, 5000), resolutionunit="CENTIMETER"
    )
    s = open_slide(path)
    assert s.microns_per_pixel == pytest.approx(2.0) and s.mpp_source == "tiff-resolution"
    assert len(s.levels) == 1 and s.pyramid_cache is None
    np.testing.assert_array_equal(s.levels[0].compute(), crop)
    s2 = open_slide(path, mpp=0.25)
    assert s2.microns_per_pixel == 0.25 and s2.mpp_source == "argument"

    inch = tmp_path / "inch.tif"  # 12700 dpi = 2 µm/px
    tifffile.imwrite(
        inch, crop, photometric="rgb", resolution=(12700, 12700), resolutionunit="INCH"
    )
    assert open_slide(inch).microns_per_pixel == pytest.approx(2.0)
    screen = tmp_path / "dpi72.tif"  # 72 dpi is a display setting, not a pixel size
    tifffile.imwrite(screen, crop, photometric="rgb", resolution=(72, 72), resolutionunit="INCH")
    assert open_slide(screen).microns_per_pixel is None
    with pytest.raises(ValueError, match="mpp"):
        open_slide(path, mpp=-1)


def test_grey_and_rgba_become_rgb(c2_pixels, tmp_path):
    crop = c2_pixels[5000:5100, 4000:4150]
    grey = crop.mean(axis=2).astype(np.uint8)
    tifffile.imwrite(tmp_path / "grey.tif", grey)
    g = open_slide(tmp_path / "grey.tif").levels[0].compute()
    assert g.shape == (100, 150, 3)
    np.testing.assert_array_equal(g[..., 0], grey)
    np.testing.assert_array_equal(g[..., 2], grey)
    rgba = np.dstack([crop, np.full(crop.shape[:2], 200, np.uint8)])
    tifffile.imwrite(tmp_path / "rgba.tif", rgba, photometric="rgb", extrasamples=["unassalpha"])
    np.testing.assert_array_equal(open_slide(tmp_path / "rgba.tif").levels[0].compute(), crop)
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    np.testing.assert_array_equal(open_slide(tmp_path / "rgba.png").levels[0].compute(), crop)


@pytest.fixture
def flat_tiff(c2_pixels, tmp_path):
    """A single-level tiled TIFF above the pyramid threshold (4400 px wide) from real pixels."""
    crop = np.ascontiguousarray(c2_pixels[3000:3700, 2000:6400])
    path = tmp_path / "flat.tif"
    tifffile.imwrite(path, crop, photometric="rgb", tile=(256, 256), compression="zlib")
    return path, crop


def test_flat_tiff_gets_pyramid_with_lazy_base(flat_tiff, tmp_path, monkeypatch):
    root = _isolated_cache(monkeypatch, tmp_path)
    path, crop = flat_tiff
    assert needs_pyramid_build(path)
    s = open_slide(path)
    assert not needs_pyramid_build(path)
    assert [lv.shape[:2] for lv in s.levels] == [
        (700, 4400), (350, 2200), (175, 1100), (88, 550), (44, 275)
    ]  # fmt: skip
    assert s.pyramid_cache is not None and s.pyramid_cache.parent == root
    # the base is read from the TIFF itself, not copied into the cache
    assert not (s.pyramid_cache / "0").exists()
    np.testing.assert_array_equal(s.levels[0].compute(), crop)
    np.testing.assert_array_equal(s.levels[1].compute(), slides._halve(crop))
    s.close()


def test_uncompressed_single_strip_tiff_is_memory_mapped(c2_pixels, tmp_path, monkeypatch):
    root = _isolated_cache(monkeypatch, tmp_path)
    crop = np.ascontiguousarray(c2_pixels[6000:6400, 1000:5300])  # one 5 MB strip
    path = tmp_path / "strip.tif"
    tifffile.imwrite(path, crop, photometric="rgb")
    s = open_slide(path)
    assert s.levels[0].chunksize == (400, 512, 3)  # not one image-sized chunk
    assert len(s.levels) == 5 and s.pyramid_cache.parent == root
    np.testing.assert_array_equal(s.read_region(1234, 100, 300, 200), crop[100:300, 1234:1534])
    np.testing.assert_array_equal(s.levels[1].compute(), slides._halve(crop))
    s.close()


def test_interrupted_build_leaves_no_cache(flat_tiff, tmp_path, monkeypatch):
    root = _isolated_cache(monkeypatch, tmp_path)
    path, crop = flat_tiff
    calls = {"n": 0}
    real_halve = slides._halve

    def crash_midway(band):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("simulated crash while building the pyramid")
        return real_halve(band)

    monkeypatch.setattr(slides, "_halve", crash_midway)
    with pytest.raises(ValueError, match="simulated crash") as info:
        open_slide(path)
    assert str(path) in str(info.value)
    assert calls["n"] == 3
    assert _entries(root) == []  # neither a final entry nor a leftover temp folder

    # A half-written entry under the final name (e.g. copied from elsewhere) is not trusted.
    monkeypatch.setattr(slides, "_halve", real_halve)
    stale = root / slides._cache_key(path, 512)
    stale.mkdir(parents=True)
    (stale / "zarr.json").write_text("{}")
    s = open_slide(path)
    assert s.pyramid_cache == stale and (stale / "COMPLETE").is_file()
    np.testing.assert_array_equal(s.levels[2].compute(), real_halve(real_halve(crop)))
    assert _entries(root) == [stale.name]


# ---------------------------------------------------------------------------- bad input


def test_truncated_pyramid_fails_at_open(wsi, tmp_path):
    for name in ("her2st_C2_HE_pyramid.tif", "her2st_C2_HE_pyramid.ome.tif"):
        data = (wsi / name).read_bytes()
        cut = tmp_path / f"cut_{name}"
        cut.write_bytes(data[: int(len(data) * 0.6)])
        with pytest.raises(ValueError, match="not a readable slide") as info:
            open_slide(cut)
        assert str(cut) in str(info.value)


def test_truncated_jpeg_fails_at_open(c2_jpg, tmp_path, monkeypatch):
    _isolated_cache(monkeypatch, tmp_path)
    data = c2_jpg.read_bytes()
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(data[: int(len(data) * 0.6)])
    with pytest.raises(ValueError, match="not a readable slide") as info:
        open_slide(cut)
    assert str(cut) in str(info.value)


def test_bad_paths(tmp_path):
    txt = tmp_path / "notes.svs"
    txt.write_text("this is a text file, not an Aperio slide\n" * 20)
    assert not needs_pyramid_build(txt)  # the cheap probe never raises
    with pytest.raises(ValueError, match="not a readable slide") as info:
        open_slide(txt)
    assert str(txt) in str(info.value)
    png = tmp_path / "fake.png"
    png.write_text("not a png")
    with pytest.raises(ValueError, match="not a readable slide"):
        open_slide(png)
    xyz = tmp_path / "slide.xyz"
    xyz.write_bytes(b"\0" * 64)
    with pytest.raises(ValueError, match=r"unsupported file type '\.xyz'"):
        open_slide(xyz)
    missing = tmp_path / "missing.svs"
    with pytest.raises(FileNotFoundError, match="missing.svs"):
        open_slide(missing)
    with pytest.raises(ValueError, match="folder"):
        open_slide(tmp_path)


def test_is_slide_path():
    assert set(SLIDE_SUFFIXES) >= {".svs", ".ndpi", ".tif", ".tiff", ".ome.tif", ".jpg", ".png"}
    assert all(s == s.lower() and s.startswith(".") for s in SLIDE_SUFFIXES)
    for ok in ["a.svs", "B.NDPI", "x.ome.tiff", "dir/y.tif", "z.JPEG", "w.png", "v.btf"]:
        assert is_slide_path(ok)
    for no in ["a.h5ad", "b.txt", "c.zarr", "tif", "d.svs.gz"]:
        assert not is_slide_path(no)

