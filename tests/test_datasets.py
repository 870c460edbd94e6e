"""The shipped sample data: present, readable by the real reader, faithful to its source."""

from __future__ import annotations

import hashlib
import importlib.util
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from napari_hinge import datasets
from napari_hinge._convention import META_KEY, SPATIAL_KEY
from napari_hinge.io.legacy_st import read_her2st, read_legacy_st
from napari_hinge.io.validate import SpatialDataWarning

REPO = Path(__file__).resolve().parents[1]
CMU_SHA256 = "ed92d5a9f2e86df67640d6f92ce3e231419ce127131697fbbce42ad5e002c8a7"


@pytest.fixture(scope="module")
def sample():
    return datasets.load_her2st_sample()


@pytest.fixture(scope="module")
def source_c3(shared_data):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SpatialDataWarning)
        return read_her2st(shared_data / "her2st_subset", "C3", images=False)


def test_sample_dir_and_readme():
    d = datasets.sample_dir()
    assert d.is_dir()
    readme = (d / "README.md").read_text()
    for needle in (
        "Andersson",
        "12, 6012",
        "CC0",
        "85df7411b987a7dec3feff9718b869a7a82091ec",
        "scripts/make_sample_data.py",
        CMU_SHA256,
    ):
        assert needle in readme, needle
    total = sum(f.stat().st_size for f in d.rglob("*") if f.is_file())
    assert total < 6 * 2**20, f"sample data is {total / 2**20:.1f} MiB"


def test_her2st_sample_paths_layout():
    p = datasets.her2st_sample_paths()
    assert set(p) == {"folder", "counts", "spots", "image"}
    assert p["counts"] == p["folder"] / "counts" / "C3.tsv.gz"
    assert p["spots"] == p["folder"] / "spots" / "C3_selection.tsv"
    assert p["image"] == p["folder"] / "images" / "C3_HE.jpg"
    assert p["image"].stat().st_size <= 3 * 2**20


def test_load_her2st_sample_convention(sample):
    from PIL import Image

    meta = sample.uns[META_KEY]
    assert sample.shape == (180, 1000)
    assert meta["format"] == "legacy_st"
    assert Path(meta["slide_path"]) == datasets.her2st_sample_paths()["image"]
    w, h = Image.open(meta["slide_path"]).size
    assert (w, h) == (4635, 4968)
    xy = sample.obsm[SPATIAL_KEY]
    assert (xy[:, 0] >= 0).all() and (xy[:, 0] < w).all()
    assert (xy[:, 1] >= 0).all() and (xy[:, 1] < h).all()
    # 2x downsample of a ~0.69 um/px image
    assert meta["microns_per_pixel"] == pytest.approx(1.375, abs=0.01)
    assert meta["spot_diameter_px"] == pytest.approx(100 / meta["microns_per_pixel"])
    data = sample.X.data
    assert np.all(data >= 0) and np.all(data == np.round(data))
    # the spots sit on tissue: darker than the far background of the overview image
    lib = sample.uns["spatial"]["C3"]
    ov = lib["images"]["hires"].astype(float).mean(axis=-1)
    s = lib["scalefactors"]["tissue_hires_scalef"]
    xi, yi = np.round(xy[:, 0] * s).astype(int), np.round(xy[:, 1] * s).astype(int)
    under = ov[yi, xi].mean()
    border = np.concatenate([ov[:40].ravel(), ov[-40:].ravel()]).mean()
    assert under < border - 20, (under, border)


def test_sample_is_faithful_to_source(sample, source_c3):
    """Same spots and counts as the source; coordinates exactly halved; library sizes kept."""
    assert list(sample.obs_names) == list(source_c3.obs_names)
    src = source_c3[:, sample.var_names]
    np.testing.assert_array_equal(sample.X.toarray(), src.X.toarray())
    np.testing.assert_allclose(sample.obsm[SPATIAL_KEY], source_c3.obsm[SPATIAL_KEY] / 2, atol=1e-3)
    np.testing.assert_array_equal(
        sample.obs["total_counts_all_genes"].to_numpy(),
        np.asarray(source_c3.X.sum(axis=1)).ravel(),
    )
    assert sample.uns[META_KEY]["microns_per_pixel"] == pytest.approx(
        2 * source_c3.uns[META_KEY]["microns_per_pixel"], rel=1e-3
    )


def test_sample_genes_cover_the_evaluation_hvg_rule(shared_data, sample):
    """The protocol's 50 genes (>= 10% expressed in every training section, then top variance
    of log1p(normalize_total 1e4) over C2, C4-C6) are all in the shipped subset."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SpatialDataWarning)
        ads = [
            read_her2st(shared_data / "her2st_subset", s, images=False)
            for s in ("C2", "C4", "C5", "C6")
        ]
    common = ads[0].var_names
    for a in ads[1:]:
        common = common.intersection(a.var_names)
    ok = np.ones(len(common), bool)
    logs = []
    for a in ads:
        X = a.X.toarray()
        lib = X.sum(axis=1, keepdims=True)
        sub = X[:, a.var_names.get_indexer(common)]
        ok &= (sub > 0).mean(axis=0) >= 0.10
        logs.append(np.log1p(sub / lib * 1e4))
    var = np.vstack(logs).var(axis=0)
    top50 = common[ok][np.argsort(-var[ok])[:50]]
    missing = set(top50) - set(sample.var_names)
    assert not missing, missing
    assert "ERBB2" in sample.var_names  # the HER2 gene itself


def test_cmu_slide_path():
    import tifffile

    p = datasets.cmu_slide_path()
    assert hashlib.sha256(p.read_bytes()).hexdigest() == CMU_SHA256
    with tifffile.TiffFile(p) as tif:
        assert tif.is_svs
        assert tif.series[0].levels[0].shape[:2] == (2967, 2220)


def test_sample_also_reads_as_her2st_folder(sample):
    folder = datasets.her2st_sample_paths()["folder"]
    ad = read_her2st(folder, "C3")
    np.testing.assert_array_equal(ad.obsm[SPATIAL_KEY], sample.obsm[SPATIAL_KEY])


@pytest.mark.slow
def test_make_sample_data_rebuilds_the_shipped_files(shared_data, tmp_path):
    spec = importlib.util.spec_from_file_location(
        "make_sample_data", REPO / "scripts" / "make_sample_data.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.main(["--shared", str(shared_data), "--out", str(tmp_path)])
    shipped = datasets.sample_dir()
    for rel in (
        "her2st_C3/counts/C3.tsv.gz",
        "her2st_C3/spots/C3_selection.tsv",
        "CMU-1-Small-Region.svs",
    ):
        assert (tmp_path / rel).read_bytes() == (shipped / rel).read_bytes(), rel
    # JPEG bytes may differ across libjpeg builds: compare pixels
    from PIL import Image

    a = np.asarray(Image.open(tmp_path / "her2st_C3/images/C3_HE.jpg"), dtype=float)
    b = np.asarray(Image.open(shipped / "her2st_C3/images/C3_HE.jpg"), dtype=float)
    assert a.shape == b.shape and np.abs(a - b).mean() < 0.5
    ad = read_legacy_st(
        tmp_path / "her2st_C3/counts/C3.tsv.gz", tmp_path / "her2st_C3/spots/C3_selection.tsv"
    )
    assert ad.n_vars == 1000
    assert pd.Index(ad.var_names).equals(pd.Index(datasets.load_her2st_sample().var_names))


def test_read_spatial_on_the_sample_folder(sample):
    from napari_hinge.io.spatial import detect_spatial_format, read_spatial

    folder = datasets.her2st_sample_paths()["folder"]
    assert detect_spatial_format(folder) == "legacy_st"
    ad = read_spatial(folder)  # one section: no section= needed
    assert ad.uns[META_KEY]["section"] == "C3"
    np.testing.assert_array_equal(ad.X.toarray(), sample.X.toarray())
