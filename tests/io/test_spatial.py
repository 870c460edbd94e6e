"""Spatial readers on the real data in ../shared/data, and on broken copies of it in tmp_path."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from napari_hinge._convention import META_KEY, SPATIAL_KEY, VISIUM_SPOT_UM
from napari_hinge.io.h5ad import read_h5ad
from napari_hinge.io.legacy_st import list_her2st_sections, read_her2st, read_legacy_st
from napari_hinge.io.spaceranger import POSITION_COLUMNS, read_spaceranger
from napari_hinge.io.spatial import detect_spatial_format, read_spatial
from napari_hinge.io.validate import SpatialDataError, SpatialDataWarning, validate_spatial

DLPFC_SPOTS = {"151673": 3639, "151674": 3673, "151675": 3592}


# ------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------


def _copy(src: Path, dst: Path) -> Path:
    """Writable copy (the shared files are read-only)."""
    shutil.copytree(src, dst, copy_function=shutil.copyfile)
    return dst


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SpatialDataWarning)
        return fn(*args, **kwargs)


def _assert_convention(ad, *, image_shape=None):
    """The AnnData convention every reader promises."""
    meta = ad.uns[META_KEY]
    assert {"microns_per_pixel", "spot_diameter_px", "source", "format"} <= set(meta)
    assert sp.issparse(ad.X) and ad.X.dtype == np.float32
    data = ad.X.data
    assert np.all(data >= 0) and np.all(data == np.round(data)), "X must be raw integer counts"
    assert ad.X.sum() > 0
    assert ad.var_names.is_unique and ad.obs_names.is_unique
    xy = ad.obsm[SPATIAL_KEY]
    assert xy.dtype == np.float64 and xy.shape == (ad.n_obs, 2)
    assert np.isfinite(xy).all()
    if image_shape is not None:
        h, w = image_shape[:2]
        assert (xy[:, 0] >= 0).all() and (xy[:, 0] < w).all()
        assert (xy[:, 1] >= 0).all() and (xy[:, 1] < h).all()
    if "slide_path" in meta:
        assert Path(meta["slide_path"]).is_file()


def _gray(img: np.ndarray) -> np.ndarray:
    img = np.asarray(img, dtype=np.float64)
    return img[..., :3].mean(axis=-1) if img.ndim == 3 else img


def _spots_darker_than_background(img, xy, radius):
    """Mean grey under the spots vs. pixels farther than 3 spot pitches from any spot."""
    from scipy.spatial import cKDTree

    g = _gray(img)
    h, w = g.shape
    xi = np.clip(np.round(xy[:, 0]).astype(int), 0, w - 1)
    yi = np.clip(np.round(xy[:, 1]).astype(int), 0, h - 1)
    r = max(int(radius), 0)
    under = np.concatenate(
        [
            g[np.clip(yi + dy, 0, h - 1), np.clip(xi + dx, 0, w - 1)]
            for dy in range(-r, r + 1)
            for dx in range(-r, r + 1)
        ]
    )
    yy, xx = np.mgrid[0:h:4, 0:w:4]
    grid = np.column_stack([xx.ravel(), yy.ravel()])
    pitch = np.median(cKDTree(xy).query(xy, k=2)[0][:, 1])
    far = cKDTree(xy).query(grid)[0] > 3 * pitch
    background = g[grid[far, 1], grid[far, 0]]
    return under.mean(), background.mean()


# ------------------------------------------------------------------------------------------
# Space Ranger
# ------------------------------------------------------------------------------------------


def test_tiny_fixture_blank_hires_falls_back_to_lowres(shared_data):
    import scanpy as sc

    path = shared_data / "visium_tiny_fixture"
    with pytest.warns(SpatialDataWarning, match="tissue_hires_image.png is blank"):
        ad = read_spaceranger(path)
    meta = ad.uns[META_KEY]
    assert ad.shape == (100, 100)
    assert meta["format"] == "spaceranger"
    assert meta["slide_path"].endswith("tissue_lowres_image.png")
    assert meta["fullres_scalef"] == pytest.approx(0.045004502)
    sf = json.loads((path / "spatial" / "scalefactors_json.json").read_text())
    assert meta["microns_per_pixel"] == pytest.approx(
        VISIUM_SPOT_UM / sf["spot_diameter_fullres"] / sf["tissue_lowres_scalef"]
    )
    assert meta["spot_diameter_px"] == pytest.approx(89.4275 * 0.045004502, rel=1e-4)
    lib = ad.uns["spatial"]["custom"]
    assert set(lib["images"]) == {"lowres"}
    _assert_convention(ad, image_shape=lib["images"]["lowres"].shape)
    assert set(ad.obs.columns) >= {"in_tissue", "array_row", "array_col"}

    # independent implementation: scanpy's reader (coordinates in full-res px)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = sc.read_visium(path)
    ref = ref[ad.obs_names]
    np.testing.assert_array_equal(ad.X.toarray(), ref.X.toarray())
    np.testing.assert_allclose(
        ad.obsm[SPATIAL_KEY], ref.obsm["spatial"] * sf["tissue_lowres_scalef"], rtol=1e-12
    )
    np.testing.assert_array_equal(ad.var["gene_ids"], ref.var["gene_ids"])


@pytest.mark.parametrize("which", ["dlpfc", "her2st"])
def test_scanpy_pl_spatial_draws_our_anndata(shared_data, which):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import scanpy as sc

    if which == "dlpfc":
        ad = _quiet(read_spaceranger, shared_data / "dlpfc_visium_lowres" / "151673")
    else:
        ad = _quiet(read_her2st, shared_data / "her2st_subset", "C2")
    (lib,) = ad.uns["spatial"].values()
    (key, img), *_ = lib["images"].items()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        ax = sc.pl.spatial(ad, color="ERBB2" if which == "her2st" else "MBP", show=False)
    ax = ax[0] if isinstance(ax, list) else ax
    # scanpy places each spot at obsm['spatial'] * tissue_<key>_scalef on the stored image:
    # those positions must be our coordinates mapped onto the image, and land on tissue
    paths = ax.collections[0].get_paths()  # one circle per spot, in plotting order
    offsets = np.array([(p.vertices.min(0) + p.vertices.max(0)) / 2 for p in paths])
    diameters = np.array([np.ptp(p.vertices[:, 0]) for p in paths])
    np.testing.assert_allclose(
        diameters,
        lib["scalefactors"]["spot_diameter_fullres"] * lib["scalefactors"][f"tissue_{key}_scalef"],
        rtol=1e-3,
    )
    expected = ad.obsm[SPATIAL_KEY] * lib["scalefactors"][f"tissue_{key}_scalef"]
    np.testing.assert_allclose(np.sort(offsets, axis=0), np.sort(expected, axis=0), rtol=1e-6)
    under, background = _spots_darker_than_background(img, offsets, 1)
    assert under < background - 10, (under, background)
    plt.close("all")


def test_cytassist_spaceranger2_mtx(shared_data):
    path = shared_data / "visium_cytassist_mouse_sample"
    assert detect_spatial_format(path) == "spaceranger"
    ad = read_spaceranger(path)
    meta = ad.uns[META_KEY]
    assert ad.shape == (2898, 19465)
    # symbols as names, Ensembl ids kept
    assert "Sox17" in ad.var_names
    assert ad.var.loc["Sox17", "gene_ids"] == "ENSMUSG00000025902"
    assert ad.var["gene_ids"].str.startswith("ENSMUSG").all()
    assert ad.X.sum() / ad.n_obs == pytest.approx(1064, rel=0.01)  # README: mean 1,064 UMI
    assert meta["slide_path"].endswith("tissue_lowres_image.png")
    assert meta["microns_per_pixel"] == pytest.approx(55 / 14.964878633873417 / 0.2)
    _assert_convention(ad, image_shape=(600, 600))
    assert (ad.obs["in_tissue"] == 1).all()


@pytest.mark.parametrize("sample", sorted(DLPFC_SPOTS))
def test_dlpfc_lowres_spots_land_on_tissue(shared_data, sample):
    path = shared_data / "dlpfc_visium_lowres" / sample
    ad = read_spaceranger(path)
    meta = ad.uns[META_KEY]
    assert ad.n_obs == DLPFC_SPOTS[sample]
    assert ad.n_vars == 5000
    sf = json.loads((path / "spatial" / "scalefactors_json.json").read_text())
    assert meta["microns_per_pixel"] == pytest.approx(
        55 / sf["spot_diameter_fullres"] / sf["tissue_lowres_scalef"]
    )
    assert 12 < meta["microns_per_pixel"] < 14
    img = ad.uns["spatial"][sample]["images"]["lowres"]
    _assert_convention(ad, image_shape=img.shape)
    under, background = _spots_darker_than_background(img, ad.obsm[SPATIAL_KEY], 1)
    assert under < background - 10, (under, background)
    # the layer labels of the benchmark join on our obs_names
    labels = pd.read_csv(path / "layer_labels.tsv", sep="\t", index_col=0)
    assert labels.index.isin(ad.obs_names).all()


def test_spaceranger_with_fullres_slide_keeps_fullres_coords(shared_data, tmp_path):
    import tifffile

    path = shared_data / "dlpfc_visium_lowres" / "151673"
    sf = json.loads((path / "spatial" / "scalefactors_json.json").read_text())
    # a stand-in full-resolution slide of the right size (an empty, sparse TIFF: instant)
    size = round(600 / sf["tissue_lowres_scalef"])
    slide = tmp_path / "slide.tif"
    tifffile.imwrite(slide, shape=(size, size, 3), dtype=np.uint8)
    ad = read_spaceranger(path, slide=slide)
    meta = ad.uns[META_KEY]
    assert meta["slide_path"] == str(slide)
    assert "fullres_scalef" not in meta
    assert meta["microns_per_pixel"] == pytest.approx(55 / sf["spot_diameter_fullres"])
    assert meta["spot_diameter_px"] == pytest.approx(sf["spot_diameter_fullres"])
    pos = pd.read_csv(path / "spatial" / "tissue_positions_list.csv", header=None, index_col=0)
    np.testing.assert_allclose(ad.obsm[SPATIAL_KEY], pos.loc[ad.obs_names, [5, 4]].to_numpy())
    lib = ad.uns["spatial"]["151673"]
    assert lib["scalefactors"]["tissue_lowres_scalef"] == pytest.approx(0.045004502)
    # explicit mpp wins
    ad2 = read_spaceranger(path, slide=slide, mpp=0.5)
    assert ad2.uns[META_KEY]["microns_per_pixel"] == 0.5
    # passing the lowres PNG as the full-res slide: coordinates far outside -> clear error
    low = path / "spatial" / "tissue_lowres_image.png"
    with pytest.raises(SpatialDataError, match="outside the image") as err:
        read_spaceranger(path, slide=low)
    assert str(low) in str(err.value)


# ------------------------------------------------------------------------------------------
# legacy ST (her2st)
# ------------------------------------------------------------------------------------------


def test_her2st_c2_with_image(shared_data):
    folder = shared_data / "her2st_subset"
    ad = read_her2st(folder, "C2")
    meta = ad.uns[META_KEY]
    assert ad.shape == (187, 15706)
    assert meta["format"] == "legacy_st"
    assert meta["slide_path"].endswith("C2_HE.jpg")
    assert meta["microns_per_pixel"] == pytest.approx(0.69, abs=0.01)
    assert meta["spot_diameter_px"] == pytest.approx(100 / meta["microns_per_pixel"])
    _assert_convention(ad, image_shape=(9911, 9274))
    assert np.median(np.asarray(ad.X.sum(axis=1)).ravel()) == 8508  # README median UMI
    lib = ad.uns["spatial"]["C2"]
    ov = lib["images"]["hires"]
    assert max(ov.shape[:2]) <= 2000
    xy = ad.obsm[SPATIAL_KEY] * lib["scalefactors"]["tissue_hires_scalef"]
    under, background = _spots_darker_than_background(ov, xy, 3)
    assert under < background - 10, (under, background)
    # a spot row joins on f"{x}x{y}"
    spots = pd.read_csv(folder / "spots" / "C2_selection.tsv", sep="\t").set_index(["x", "y"])
    row = ad.obs.iloc[0]
    expected = spots.loc[(row["array_x"], row["array_y"]), ["pixel_x", "pixel_y"]].to_numpy()
    np.testing.assert_allclose(ad.obsm[SPATIAL_KEY][0], expected.astype(float))


def test_her2st_a1_without_image_with_labels(shared_data):
    folder = shared_data / "her2st_subset"
    ad = read_her2st(folder, "A1")
    meta = ad.uns[META_KEY]
    assert ad.n_obs == 346
    assert "slide_path" not in meta and "spatial" not in ad.uns
    _assert_convention(ad)
    counts = ad.obs["pathology_label"].value_counts()
    assert counts["invasive cancer"] == 282 and counts["immune infiltrate"] == 2
    assert ad.obs["pathology_label"].notna().all()
    # spot "9x21" is labelled "invasive cancer" at new_x/new_y 9.02/20.994 in the label file
    assert ad.obs.loc["9x21", "pathology_label"] == "invasive cancer"


def test_her2st_labels_without_coordinates_warn_with_count(shared_data):
    with pytest.warns(SpatialDataWarning, match="skipped 8 label row"):
        ad = read_her2st(shared_data / "her2st_subset", "G2", images=False)
    assert ad.obs["pathology_label"].notna().sum() == ad.n_obs


def test_read_legacy_st_direct_and_mpp_override(shared_data):
    folder = shared_data / "her2st_subset"
    ad = read_legacy_st(
        folder / "counts" / "C2.tsv.gz", folder / "spots" / "C2_selection.tsv", mpp=0.5
    )
    assert ad.uns[META_KEY]["microns_per_pixel"] == 0.5
    assert ad.uns[META_KEY]["spot_diameter_px"] == pytest.approx(200)
    assert "slide_path" not in ad.uns[META_KEY]


def test_list_her2st_sections(shared_data):
    sections = list_her2st_sections(shared_data / "her2st_subset")
    assert len(sections) == 30
    assert {"A1", "C2", "C6", "H3"} <= set(sections)
    assert "B1" not in sections
    assert list_her2st_sections(shared_data / "her2st_subset", with_image=True) == [
        "C2", "C3", "C4", "C5", "C6"]


def test_folder_reader_reads_only_sections_with_an_image(shared_data, monkeypatch):
    """Opening a her2st folder must not parse the count tables of the 25 sections it does not
    show (that made opening the folder take minutes)."""
    from napari_hinge import _reader
    from napari_hinge.io import legacy_st

    read = []
    real = legacy_st.read_her2st

    def recording(folder, section, **kwargs):
        read.append(section)
        return real(folder, section, **kwargs)

    monkeypatch.setattr(legacy_st, "read_her2st", recording)
    layers = _reader.read_spatial_layers(shared_data / "her2st_subset")
    assert sorted(read) == ["C2", "C3", "C4", "C5", "C6"]
    # the visible section comes last (napari selects the last layer it adds)
    assert [kw["name"] for _, kw, _ in layers[-2:]] == ["C2 H&E", "C2 spots"]
    assert [kw["visible"] for _, kw, _ in layers] == [False] * 8 + [True, True]


# ------------------------------------------------------------------------------------------
# h5ad, dispatch
# ------------------------------------------------------------------------------------------


def test_h5ad_round_trip(shared_data, tmp_path):
    ad = _quiet(read_her2st, shared_data / "her2st_subset", "C2")
    out = tmp_path / "c2.h5ad"
    ad.write_h5ad(out)
    assert detect_spatial_format(out) == "h5ad"
    back = read_spatial(out)
    assert back.uns[META_KEY] == ad.uns[META_KEY]
    np.testing.assert_array_equal(back.X.toarray(), ad.X.toarray())
    np.testing.assert_array_equal(back.obsm[SPATIAL_KEY], ad.obsm[SPATIAL_KEY])
    assert list(back.obs_names) == list(ad.obs_names)
    assert list(back.var_names) == list(ad.var_names)
    np.testing.assert_array_equal(
        back.uns["spatial"]["C2"]["images"]["hires"], ad.uns["spatial"]["C2"]["images"]["hires"]
    )
    _assert_convention(back, image_shape=(9911, 9274))


def test_h5ad_from_scanpy_fills_meta_from_scalefactors(shared_data, tmp_path):
    import scanpy as sc

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = sc.read_visium(shared_data / "visium_tiny_fixture")
    ref.var_names_make_unique()
    out = tmp_path / "scanpy.h5ad"
    ref.write_h5ad(out)
    with pytest.warns(SpatialDataWarning, match="assumed Visium"):
        ad = read_h5ad(out)
    meta = ad.uns[META_KEY]
    assert meta["format"] == "h5ad" and meta["source"] == str(out)
    assert meta["spot_diameter_px"] == pytest.approx(89.4275, rel=1e-4)
    assert meta["microns_per_pixel"] == pytest.approx(55 / 89.4275, rel=1e-4)


def test_h5ad_without_scalefactors_warns_unknown_mpp(shared_data, tmp_path):
    ad = _quiet(read_her2st, shared_data / "her2st_subset", "A1")
    del ad.uns[META_KEY]
    ad.obs["pathology_label"] = ad.obs["pathology_label"].astype(str)
    out = tmp_path / "bare.h5ad"
    ad.write_h5ad(out)
    with pytest.warns(SpatialDataWarning, match="microns per pixel unknown"):
        back = read_h5ad(out)
    assert "microns_per_pixel" not in back.uns[META_KEY]
    assert back.uns[META_KEY]["spot_diameter_px"] > 0


def test_detect_and_dispatch(shared_data):
    d = shared_data
    assert detect_spatial_format(d / "visium_tiny_fixture") == "spaceranger"
    assert detect_spatial_format(d / "dlpfc_visium_lowres" / "151673") == "spaceranger"
    h5 = d / "dlpfc_visium_lowres" / "151673" / "filtered_feature_bc_matrix.h5"
    assert detect_spatial_format(h5) == "spaceranger"
    assert detect_spatial_format(d / "her2st_subset") == "legacy_st"
    assert detect_spatial_format(d / "her2st_subset" / "counts" / "C2.tsv.gz") == "legacy_st"
    assert detect_spatial_format(d / "wsi_small" / "CMU-1-Small-Region.svs") is None
    assert detect_spatial_format(d / "dlpfc_visium_lowres") is None
    assert detect_spatial_format(d / "no_such_thing") is None
    ad = _quiet(read_spatial, d / "her2st_subset" / "counts" / "C2.tsv.gz", images=False)
    assert ad.uns[META_KEY]["section"] == "C2" and ad.n_obs == 187
    with pytest.raises(SpatialDataError, match=r"her2st_subset: holds 30 sections"):
        read_spatial(d / "her2st_subset")


# ------------------------------------------------------------------------------------------
# bad input: each error names the file
# ------------------------------------------------------------------------------------------


@pytest.fixture
def tiny(shared_data, tmp_path) -> Path:
    return _copy(shared_data / "visium_tiny_fixture", tmp_path / "tiny")


def _positions(tiny: Path) -> pd.DataFrame:
    return pd.read_csv(tiny / "spatial" / "tissue_positions_list.csv", header=None)


def _write_positions(tiny: Path, pos: pd.DataFrame) -> Path:
    f = tiny / "spatial" / "tissue_positions_list.csv"
    pos.to_csv(f, header=False, index=False)
    return f


@pytest.fixture
def st_small(shared_data, tmp_path) -> tuple[Path, Path]:
    """A small real legacy-ST pair: 30 spots x 40 genes of her2st C2, and its spot file."""
    src = shared_data / "her2st_subset"
    counts = pd.read_csv(src / "counts" / "C2.tsv.gz", sep="\t", index_col=0).iloc[:30, :40]
    cpath = tmp_path / "C2.tsv"
    counts.to_csv(cpath, sep="\t")
    spath = tmp_path / "C2_selection.tsv"
    shutil.copyfile(src / "spots" / "C2_selection.tsv", spath)
    return cpath, spath


def test_spots_not_matching_counts(tiny):
    pos = _positions(tiny)
    pos[0] = pos[0].str.replace("-1", "-2")
    f = _write_positions(tiny, pos)
    with pytest.raises(SpatialDataError) as err:
        _quiet(read_spaceranger, tiny)
    msg = str(err.value)
    assert "filtered_feature_bc_matrix.h5" in msg and str(f) in msg
    assert "only 0 of 100 spots" in msg


def test_some_spots_without_positions_warn_with_count(tiny):
    pos = _positions(tiny)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        keep = _quiet(read_spaceranger, tiny).obs_names[:7]
    f = _write_positions(tiny, pos[~pos[0].isin(keep)])
    with pytest.warns(SpatialDataWarning, match=r"7 of 100 spots .* no position in .*") as rec:
        ad = read_spaceranger(tiny)
    assert any(str(f) in str(w.message) for w in rec)
    assert ad.n_obs == 93


def test_legacy_st_spots_not_matching(st_small):
    cpath, spath = st_small
    spots = pd.read_csv(spath, sep="\t")
    spots["x"] += 100
    spots.to_csv(spath, sep="\t", index=False)
    with pytest.raises(SpatialDataError, match="do not belong together") as err:
        read_legacy_st(cpath, spath)
    assert str(cpath) in str(err.value) and str(spath) in str(err.value)


def test_coordinates_outside_image_error(tiny):
    pos = _positions(tiny)
    pos[[4, 5]] *= 20  # as if the coordinates were of another, larger image
    f = _write_positions(tiny, pos)
    with pytest.raises(SpatialDataError, match="outside the image") as err:
        _quiet(read_spaceranger, tiny)
    assert str(f) in str(err.value) and "tissue_lowres_image.png" in str(err.value)


def test_few_coordinates_outside_image_warn_not_clipped(tiny):
    ad0 = _quiet(read_spaceranger, tiny)
    pos = _positions(tiny).set_index(0)
    moved = ad0.obs_names[:3]
    pos.loc[moved, 5] = 20000.0  # x far off the 600 px lowres image
    _write_positions(tiny, pos.reset_index())
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        ad = read_spaceranger(tiny)
    msgs = [str(w.message) for w in rec if issubclass(w.category, SpatialDataWarning)]
    assert any("3 of 100 spots" in m and "outside the image" in m for m in msgs), msgs
    assert ad.n_obs == 100
    assert ad.obsm[SPATIAL_KEY][ad.obs_names.get_indexer(moved), 0].min() > 600  # not clipped


def test_missing_coordinates(tiny):
    pos = _positions(tiny).astype({4: float, 5: float})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bc = _quiet(read_spaceranger, tiny).obs_names[0]
    pos.loc[pos[0] == bc, [4, 5]] = np.nan
    f = _write_positions(tiny, pos)
    with pytest.raises(SpatialDataError, match="1 of 100 spots have missing") as err:
        _quiet(read_spaceranger, tiny)
    assert str(f) in str(err.value) and bc in str(err.value)


def test_duplicated_barcodes_in_positions(tiny):
    pos = _positions(tiny)
    pos = pd.concat([pos, pos.iloc[[5]]])
    f = _write_positions(tiny, pos)
    with pytest.raises(SpatialDataError, match="1 duplicated barcode") as err:
        read_spaceranger(tiny)
    assert str(f) in str(err.value) and pos.iloc[5, 0] in str(err.value)


def test_duplicated_spots_in_counts(st_small):
    cpath, spath = st_small
    counts = pd.read_csv(cpath, sep="\t", index_col=0)
    pd.concat([counts, counts.iloc[[2]]]).to_csv(cpath, sep="\t")
    with pytest.raises(SpatialDataError, match="duplicated") as err:
        read_legacy_st(cpath, spath)
    assert str(cpath) in str(err.value) and counts.index[2] in str(err.value)


def test_nan_counts_name_the_spots(st_small):
    cpath, spath = st_small
    counts = pd.read_csv(cpath, sep="\t", index_col=0).astype(float)
    counts.iloc[3, 5] = np.nan
    counts.iloc[4, 7] = np.nan
    counts.to_csv(cpath, sep="\t")
    with pytest.raises(SpatialDataError, match="NaN") as err:
        read_legacy_st(cpath, spath)
    msg = str(err.value)
    assert str(cpath) in msg and "in 2 spot(s)" in msg and counts.index[3] in msg


def test_negative_counts(st_small):
    cpath, spath = st_small
    counts = pd.read_csv(cpath, sep="\t", index_col=0)
    counts.iloc[1, 1] = -3
    counts.to_csv(cpath, sep="\t")
    with pytest.raises(SpatialDataError, match="negative") as err:
        read_legacy_st(cpath, spath)
    assert str(cpath) in str(err.value)


def test_corrupt_h5(tiny):
    h5 = tiny / "filtered_feature_bc_matrix.h5"
    h5.write_bytes(b"this is not an HDF5 file" * 100)
    with pytest.raises(SpatialDataError, match="not a readable HDF5") as err:
        read_spaceranger(tiny)
    assert str(h5) in str(err.value)


def test_h5_without_matrix(tiny):
    import h5py

    h5 = tiny / "filtered_feature_bc_matrix.h5"
    h5.unlink()
    with h5py.File(h5, "w") as f:
        f.create_dataset("something", data=[1, 2, 3])
    with pytest.raises(SpatialDataError, match="not a 10x feature-barcode matrix") as err:
        read_spaceranger(tiny)
    assert str(h5) in str(err.value)


def test_corrupt_h5ad(tmp_path):
    bad = tmp_path / "broken.h5ad"
    bad.write_bytes(b"\x89HDF\r\n garbage")
    with pytest.raises(SpatialDataError, match="not a readable .h5ad") as err:
        read_spatial(bad)
    assert str(bad) in str(err.value)


def test_h5ad_without_coordinates(tmp_path):
    import anndata as ad

    f = tmp_path / "nocoords.h5ad"
    ad.AnnData(X=np.ones((3, 2), dtype=np.float32)).write_h5ad(f)
    with pytest.raises(SpatialDataError, match=r"no obsm\['spatial'\]") as err:
        read_h5ad(f)
    assert str(f) in str(err.value)


def test_unsupported_paths(shared_data, tmp_path):
    txt = tmp_path / "notes.txt"
    txt.write_text("hello")
    with pytest.raises(SpatialDataError, match="not a recognised spatial dataset") as err:
        read_spatial(txt)
    assert str(txt) in str(err.value)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        read_spatial(tmp_path / "nowhere")
    with pytest.raises(SpatialDataError, match="not a recognised"):
        read_spatial(shared_data / "wsi_small" / "CMU-1-Small-Region.svs")
    with pytest.raises(FileNotFoundError, match="no counts for section 'Z9'"):
        read_her2st(shared_data / "her2st_subset", "Z9")
    with pytest.raises(FileNotFoundError, match="filtered_feature_bc_matrix"):
        read_spaceranger(tmp_path)


def test_validate_spatial_directly(shared_data):
    ad = _quiet(read_spaceranger, shared_data / "visium_tiny_fixture")
    assert validate_spatial(ad, source="x", image_shape=(600, 600)) is ad
    with pytest.raises(SpatialDataError, match="in.h5ad: .*duplicated"):
        bad = ad.copy()
        bad.obs_names = ["A"] * bad.n_obs
        validate_spatial(bad, source="in.h5ad")
    dense = ad.copy()
    dense.X = dense.X.toarray()
    dense.X[[4, 9], 3] = np.nan
    with pytest.raises(SpatialDataError, match="in.h5ad: 2 NaN/infinite .* in 2 spot") as err:
        validate_spatial(dense, source="in.h5ad")
    assert ad.obs_names[9] in str(err.value)
    dense.X[[4, 9], 3] = -1
    with pytest.raises(SpatialDataError, match="in.h5ad: 2 negative"):
        validate_spatial(dense, source="in.h5ad")


def test_spaceranger2_layout_mtx_and_header_positions_match_h5(tiny, tmp_path):
    """The same spots as a 2.x run folder (run/outs, MTX counts, positions with header)."""
    import gzip

    import h5py
    import scipy.io

    ref = _quiet(read_spaceranger, tiny)
    outs = tmp_path / "run" / "outs"
    (outs / "filtered_feature_bc_matrix").mkdir(parents=True)
    shutil.copytree(tiny / "spatial", outs / "spatial", copy_function=shutil.copyfile)
    with h5py.File(tiny / "filtered_feature_bc_matrix.h5") as f:
        g = f["matrix"]
        n_feat, n_bc = g["shape"][:]
        m = sp.csc_matrix((g["data"][:], g["indices"][:], g["indptr"][:]), shape=(n_feat, n_bc))
        ids = [v.decode() for v in g["features/id"][:]]
        bcs = [v.decode() for v in g["barcodes"][:]]
    mtx = outs / "filtered_feature_bc_matrix"
    with gzip.open(mtx / "matrix.mtx.gz", "wb") as fh:
        scipy.io.mmwrite(fh, m.astype(np.int64))
    feats = pd.DataFrame({"id": ids, "name": ids, "type": "Gene Expression"})
    feats.to_csv(mtx / "features.tsv.gz", sep="\t", header=False, index=False)
    pd.Series(bcs).to_csv(mtx / "barcodes.tsv.gz", header=False, index=False)
    pos = pd.read_csv(outs / "spatial" / "tissue_positions_list.csv", header=None)
    pos.columns = POSITION_COLUMNS
    (outs / "spatial" / "tissue_positions_list.csv").unlink()
    pos.to_csv(outs / "spatial" / "tissue_positions.csv", index=False)

    assert detect_spatial_format(tmp_path / "run") == "spaceranger"
    ad = _quiet(read_spatial, tmp_path / "run")
    assert ad.uns[META_KEY]["source"] == str(outs)
    np.testing.assert_array_equal(ad.X.toarray(), ref.X.toarray())
    np.testing.assert_array_equal(ad.obsm[SPATIAL_KEY], ref.obsm[SPATIAL_KEY])
    assert list(ad.obs_names) == list(ref.obs_names)


def test_visium_hd_microns_per_pixel_from_scalefactors(tiny):
    f = tiny / "spatial" / "scalefactors_json.json"
    sf = json.loads(f.read_text())
    sf["microns_per_pixel"] = 0.2738  # Visium HD writes the full-res pixel size
    f.write_text(json.dumps(sf))
    ad = _quiet(read_spaceranger, tiny)
    assert ad.uns[META_KEY]["microns_per_pixel"] == pytest.approx(0.2738 / 0.045004502)


def test_spaceranger_h5ad_round_trip(tiny, tmp_path):
    ad = _quiet(read_spaceranger, tiny)
    out = tmp_path / "tiny.h5ad"
    ad.write_h5ad(out)
    back = read_h5ad(out)
    assert back.uns[META_KEY] == ad.uns[META_KEY]
    np.testing.assert_array_equal(back.obsm[SPATIAL_KEY], ad.obsm[SPATIAL_KEY])
    assert back.uns["spatial"]["custom"]["scalefactors"] == pytest.approx(
        ad.uns["spatial"]["custom"]["scalefactors"]
    )


def test_h5ad_normalised_x_with_counts_layer(tiny, tmp_path):
    ad = _quiet(read_spaceranger, tiny)
    raw = ad.X.copy()
    ad.layers["counts"] = raw.copy()
    ad.X = sp.csr_matrix(np.log1p(raw.toarray() / 7.0).astype(np.float32))
    ad.uns[META_KEY]["slide_path"] = str(tmp_path / "moved_away.png")
    out = tmp_path / "norm.h5ad"
    ad.write_h5ad(out)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        back = read_h5ad(out)
    msgs = " | ".join(str(w.message) for w in rec if issubclass(w.category, SpatialDataWarning))
    assert "using layers['counts'] as X" in msgs and "moved_away.png not found" in msgs
    np.testing.assert_array_equal(back.X.toarray(), raw.toarray())
    np.testing.assert_allclose(back.layers["X_original"].toarray(), ad.X.toarray())


def test_her2st_original_repo_layout(shared_data, tmp_path):
    """almaan/her2st's own tree: data/ST-cnts, ST-spotfiles, ST-imgs/<patient>/<s>, ST-pat/lbl."""
    src = shared_data / "her2st_subset"
    data = tmp_path / "her2st" / "data"
    links = {
        data / "ST-cnts" / "C2.tsv.gz": src / "counts" / "C2.tsv.gz",
        data / "ST-spotfiles" / "C2_selection.tsv": src / "spots" / "C2_selection.tsv",
        data / "ST-imgs" / "C" / "C2" / "5714_HE_BT_C2.jpg": src / "images" / "C2_HE.jpg",
        data / "ST-cnts" / "A1.tsv.gz": src / "counts" / "A1.tsv.gz",
        data / "ST-spotfiles" / "A1_selection.tsv": src / "spots" / "A1_selection.tsv",
        data / "ST-pat" / "lbl" / "A1_labeled_coordinates.tsv": src
        / "pathology_labels"
        / "A1_labeled_coordinates.tsv",
    }
    for dst, target in links.items():
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.symlink_to(target)
    root = tmp_path / "her2st"
    assert list_her2st_sections(root) == ["A1", "C2"]
    assert detect_spatial_format(root) == "legacy_st"
    c2 = read_her2st(root, "C2", images=False)
    assert c2.uns[META_KEY]["slide_path"].endswith("5714_HE_BT_C2.jpg")
    a1 = read_spatial(data / "ST-cnts" / "A1.tsv.gz")
    assert a1.obs["pathology_label"].notna().all() and "slide_path" not in a1.uns[META_KEY]


def test_slide_header_sizes_without_decoding(shared_data):
    from napari_hinge.io.images import read_image_shape

    wsi = shared_data / "wsi_small"
    assert read_image_shape(wsi / "CMU-1-Small-Region.svs") == (2967, 2220)
    assert read_image_shape(wsi / "her2st_C2_HE_pyramid.ome.tif") == (9911, 9274)
    assert read_image_shape(shared_data / "her2st_subset" / "images" / "C2_HE.jpg") == (9911, 9274)


def test_legacy_st_on_pyramid_tiff_slide(shared_data):
    """The her2st spots apply to level 0 of the pyramid built from the same JPEG; the overview
    for scanpy comes from a small pyramid level."""
    folder = shared_data / "her2st_subset"
    slide = shared_data / "wsi_small" / "her2st_C2_HE_pyramid.tif"
    ad = read_legacy_st(
        folder / "counts" / "C2.tsv.gz", folder / "spots" / "C2_selection.tsv", image=slide
    )
    assert ad.uns[META_KEY]["slide_path"] == str(slide)
    _assert_convention(ad, image_shape=(9911, 9274))
    lib = ad.uns["spatial"]["C2"]
    ov = lib["images"]["hires"]
    assert ov.shape == (1238, 1159, 3)
    xy = ad.obsm[SPATIAL_KEY] * lib["scalefactors"]["tissue_hires_scalef"]
    under, background = _spots_darker_than_background(ov, xy, 3)
    assert under < background - 10, (under, background)


def test_cli_spatial_info(shared_data, tmp_path, capsys):
    import argparse

    from napari_hinge.io import cli

    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers(dest="command"))

    def run(*argv):
        args = parser.parse_args(["spatial-info", *map(str, argv)])
        return args.func(args)

    out = tmp_path / "c2.h5ad"
    assert run(shared_data / "her2st_subset", "--section", "C2", "-o", out) == 0
    text = capsys.readouterr().out
    assert "spots       187" in text and "um/px       0.688" in text and f"wrote {out}" in text
    back = read_h5ad(out)
    assert back.n_obs == 187 and back.uns[META_KEY]["section"] == "C2"
    before = out.read_bytes()
    with pytest.raises(SpatialDataError, match="exists; pass --overwrite"):
        run(shared_data / "visium_tiny_fixture", "-o", out)
    assert out.read_bytes() == before  # what the user had is untouched
    run(shared_data / "visium_tiny_fixture", "-o", out, "--overwrite")
    err = capsys.readouterr().err
    assert "warning:" in err and "blank" in err
    assert read_h5ad(out).n_obs == 100
    with pytest.raises(SpatialDataError, match="section do not apply to h5ad"):
        run(out, "--section", "C2")
