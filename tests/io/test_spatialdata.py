"""Xenium, MERSCOPE and CosMx through spatialdata-io (the optional extra) into the convention.

We have no real sample of these platforms, so each test writes a format-faithful folder (the
files and columns the platform writes, at the sizes spatialdata-io reads) whose content is
real: the counts and positions of her2st section C2, one cell per spot. The reader must give
back exactly those counts and those positions (in µm through ``microns_per_pixel``).
"""

from __future__ import annotations

import json
import sys
import warnings

import h5py
import numpy as np
import pandas as pd
import pytest

from napari_hinge._convention import META_KEY, SPATIAL_KEY
from napari_hinge.errors import InputError
from napari_hinge.io.spatial import detect_spatial_format, read_spatial

N_GENES = 60


@pytest.fixture(scope="module")
def sdio():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pytest.importorskip("spatialdata_io")


@pytest.fixture(scope="module")
def cells(shared_data):
    """her2st C2 as cells: counts of its 60 most expressed genes, centres in µm."""
    from napari_hinge.io.legacy_st import read_her2st

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ad = read_her2st(shared_data / "her2st_subset", "C2", images=False)
    top = np.argsort(-np.asarray(ad.X.sum(axis=0)).ravel(), kind="stable")[:N_GENES]
    counts = pd.DataFrame(ad.X[:, top].toarray().astype(np.int64), index=ad.obs_names,
                          columns=ad.var_names[top])
    um = ad.obsm[SPATIAL_KEY] * ad.uns[META_KEY]["microns_per_pixel"]
    return counts, pd.DataFrame(um, index=ad.obs_names, columns=["x", "y"])


def _same_counts(adata, counts, names):
    got = pd.DataFrame(adata.X.toarray(), index=adata.obs_names, columns=adata.var_names)
    want = counts.set_axis(names, axis=0)
    assert adata.X.dtype == np.float32 and sorted(got.columns) == sorted(want.columns)
    assert np.array_equal(got.loc[want.index, want.columns].to_numpy(), want.to_numpy())


# ------------------------------------------------------------------------------------------
# Xenium (XOA 1.x outs: experiment.xenium, cell_feature_matrix.h5, cells.parquet)


def write_xenium(folder, counts, um, pixel_size=0.2125):
    folder.mkdir()
    (folder / "experiment.xenium").write_text(json.dumps({
        "major_version": 4, "minor_version": 0, "run_name": "her2st-C2",
        "region_name": "C2", "pixel_size": pixel_size,
        "analysis_sw_version": "xenium-1.9.0.0", "panel_name": "her2st top genes"}))
    ids = [f"cell{i:04d}" for i in range(len(counts))]
    genes = list(counts.columns)
    controls = ["NegControlProbe_00042", "NegControlCodeword_0500"]
    dense = np.c_[counts.to_numpy(), np.ones((len(counts), 2), np.int64)]  # cells x features
    csc = __import__("scipy.sparse", fromlist=["csr_matrix"]).csr_matrix(dense)
    with h5py.File(folder / "cell_feature_matrix.h5", "w") as f:
        f.attrs["software_version"] = "xenium-1.9.0.0"
        g = f.create_group("matrix")
        g["barcodes"] = np.array(ids, dtype="S")
        g["data"] = csc.data.astype(np.int32)
        g["indices"] = csc.indices.astype(np.int64)
        g["indptr"] = csc.indptr.astype(np.int64)
        g["shape"] = np.array([len(genes) + 2, len(ids)], np.int32)
        feats = g.create_group("features")
        feats["id"] = np.array([f"ENSG{i:011d}" for i in range(len(genes))] + controls, "S")
        feats["name"] = np.array(genes + controls, dtype="S")
        feats["feature_type"] = np.array(["Gene Expression"] * len(genes)
                                         + ["Negative Control Probe",
                                            "Negative Control Codeword"], dtype="S")
        feats["genome"] = np.array(["GRCh38"] * (len(genes) + 2), dtype="S")
        feats["_all_tag_keys"] = np.array([b"genome"])
    area = np.full(len(ids), 78.5)  # a 10 µm cell
    pd.DataFrame({"cell_id": ids, "x_centroid": um["x"].to_numpy(),
                  "y_centroid": um["y"].to_numpy(),
                  "transcript_counts": counts.sum(axis=1).to_numpy(),
                  "control_probe_counts": 1, "control_codeword_counts": 1,
                  "total_counts": counts.sum(axis=1).to_numpy() + 2, "cell_area": area,
                  "nucleus_area": area / 3}).to_parquet(folder / "cells.parquet")
    return ids


def test_xenium(sdio, cells, tmp_path):
    counts, um = cells
    folder = tmp_path / "xenium_outs"
    ids = write_xenium(folder, counts, um)
    assert detect_spatial_format(folder) == "xenium"
    adata = read_spatial(folder)
    _same_counts(adata, counts, ids)  # the control probes are not genes
    meta = adata.uns[META_KEY]
    assert meta["format"] == "xenium" and meta["microns_per_pixel"] == 0.2125
    assert meta["spot_diameter_px"] == pytest.approx(10.0 / 0.2125, rel=1e-3)
    assert "slide_path" not in meta
    xy_um = adata.obsm[SPATIAL_KEY] * meta["microns_per_pixel"]
    assert np.allclose(xy_um, um.set_axis(ids).loc[adata.obs_names].to_numpy())
    assert read_spatial(folder, mpp=0.5).uns[META_KEY]["microns_per_pixel"] == 0.5


def test_xenium_bad_files_name_the_file(sdio, cells, tmp_path):
    counts, um = cells
    folder = tmp_path / "xenium_outs"
    write_xenium(folder, counts, um, pixel_size=-1)
    with pytest.raises(InputError, match="experiment.xenium.*pixel_size"):
        read_spatial(folder)
    spec = json.loads((folder / "experiment.xenium").read_text())
    (folder / "experiment.xenium").write_text(json.dumps({**spec, "pixel_size": 0.2125}))
    data = (folder / "cells.parquet").read_bytes()
    (folder / "cells.parquet").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="xenium_outs: not a readable xenium folder"):
        read_spatial(folder)
    (folder / "cells.parquet").unlink()
    with pytest.raises(OSError, match="cells.parquet"):
        read_spatial(folder)


# ------------------------------------------------------------------------------------------
# MERSCOPE (region folder: cell_by_gene.csv, cell_metadata.csv, the micron->mosaic transform)


def write_merscope(folder, counts, um, px_per_um=9.259, offset=(1200.0, 800.0)):
    (folder / "images").mkdir(parents=True)
    np.savetxt(folder / "images" / "micron_to_mosaic_pixel_transform.csv",
               [[px_per_um, 0, offset[0]], [0, px_per_um, offset[1]], [0, 0, 1]])
    ids = [str(1000 + i) for i in range(len(counts))]
    by_gene = counts.set_axis(ids, axis=0)
    by_gene["Blank-0"], by_gene["Blank-1"] = 0, 1
    by_gene.rename_axis("cell").to_csv(folder / "cell_by_gene.csv")
    half = 5.0  # a 10 µm cell
    pd.DataFrame({"fov": 0, "volume": 800.0, "center_x": um["x"].to_numpy(),
                  "center_y": um["y"].to_numpy(), "min_x": um["x"].to_numpy() - half,
                  "min_y": um["y"].to_numpy() - half, "max_x": um["x"].to_numpy() + half,
                  "max_y": um["y"].to_numpy() + half},
                 index=pd.Index(ids, name="EntityID")).to_csv(folder / "cell_metadata.csv")
    return ids


def test_merscope(sdio, cells, tmp_path):
    counts, um = cells
    folder = tmp_path / "slide1" / "region_0"
    ids = write_merscope(folder, counts, um)
    assert detect_spatial_format(folder) == "merscope"
    adata = read_spatial(folder)
    _same_counts(adata, counts, ids)  # blanks are in obsm['blank'], not in X
    assert adata.obsm["blank"].shape == (len(ids), 2)
    meta = adata.uns[META_KEY]
    assert meta["format"] == "merscope"
    assert meta["microns_per_pixel"] == pytest.approx(1 / 9.259)
    assert meta["spot_diameter_px"] == pytest.approx(10.0 * 9.259)
    expected_px = um.set_axis(ids).loc[adata.obs_names].to_numpy() * 9.259 + (1200.0, 800.0)
    assert np.allclose(adata.obsm[SPATIAL_KEY], expected_px)


def test_merscope_bad_transform(sdio, cells, tmp_path):
    counts, um = cells
    folder = tmp_path / "region_0"
    write_merscope(folder, counts, um)
    (folder / "images" / "micron_to_mosaic_pixel_transform.csv").write_text("9.2 0\n0 9.2\n")
    with pytest.raises(InputError, match="micron_to_mosaic_pixel_transform.csv"):
        read_spatial(folder)


# ------------------------------------------------------------------------------------------
# CosMx (flat files: exprMat, metadata, fov positions; CellComposite/, CellLabels/)


def write_cosmx(folder, counts, um, mpp=0.12028):
    folder.mkdir()
    (folder / "CellComposite").mkdir()
    (folder / "CellLabels").mkdir()
    px = um.to_numpy() / mpp
    fov = np.where(px[:, 0] < np.median(px[:, 0]), 1, 2)
    origin = {f: px[fov == f].min(axis=0) - 50 for f in (1, 2)}
    cell = np.zeros(len(px), np.int64)
    for f in (1, 2):
        cell[fov == f] = np.arange(1, (fov == f).sum() + 1)
    local = px - np.array([origin[f] for f in fov])
    expr = counts.reset_index(drop=True)
    expr.insert(0, "cell_ID", cell)
    expr.insert(0, "fov", fov)
    expr["NegPrb1"] = 0
    background = expr.iloc[:2].assign(cell_ID=0, fov=[1, 2])  # CosMx writes cell 0: no cell
    pd.concat([background, expr]).to_csv(folder / "her2st_exprMat_file.csv", index=False)
    pd.DataFrame({"fov": fov, "cell_ID": cell, "Area": np.pi * (5.0 / mpp) ** 2,
                  "CenterX_local_px": local[:, 0], "CenterY_local_px": local[:, 1],
                  "CenterX_global_px": px[:, 0], "CenterY_global_px": px[:, 1]}
                 ).to_csv(folder / "her2st_metadata_file.csv", index=False)
    pd.DataFrame({"fov": [1, 2], "x_global_px": [origin[1][0], origin[2][0]],
                  "y_global_px": [origin[1][1], origin[2][1]]}
                 ).to_csv(folder / "her2st_fov_positions_file.csv", index=False)
    return [f"{c}_{f}" for c, f in zip(cell, fov, strict=True)], px


def test_cosmx(sdio, cells, tmp_path):
    counts, um = cells
    folder = tmp_path / "cosmx"
    ids, px = write_cosmx(folder, counts, um)
    assert detect_spatial_format(folder) == "cosmx"
    adata = read_spatial(folder)
    assert adata.n_obs == len(ids)  # the background rows (cell 0) have no cell
    got = pd.DataFrame(adata.X.toarray(), index=adata.obs_names, columns=adata.var_names)
    assert np.array_equal(got.loc[ids, list(counts.columns)].to_numpy(), counts.to_numpy())
    meta = adata.uns[META_KEY]
    assert meta["format"] == "cosmx" and meta["microns_per_pixel"] == 0.12028
    assert meta["spot_diameter_px"] == pytest.approx(10.0 / 0.12028)
    order = pd.Index(ids).get_indexer(adata.obs_names)
    assert np.allclose(adata.obsm[SPATIAL_KEY], px[order])


# ------------------------------------------------------------------------------------------
# without the extra, and in napari


def test_without_the_extra_the_error_says_what_to_install(cells, tmp_path, monkeypatch):
    from napari_hinge.io.spatialdata import read_xenium

    counts, um = cells
    folder = tmp_path / "xenium_outs"
    write_xenium(folder, counts, um)
    monkeypatch.setitem(sys.modules, "spatialdata_io", None)  # import now fails
    assert detect_spatial_format(folder) == "xenium"  # detection needs no extra
    with pytest.raises(ImportError, match=r'pip install "napari-hinge\[spatialdata\]"'):
        read_xenium(folder)


def test_napari_reader_opens_a_xenium_folder(sdio, cells, tmp_path):
    from napari_hinge._reader import get_spatial_reader

    counts, um = cells
    folder = tmp_path / "xenium_outs"
    write_xenium(folder, counts, um)
    reader = get_spatial_reader(str(folder))
    assert reader is not None
    layers = reader(str(folder))
    kinds = [kind for _, _, kind in layers]
    assert kinds == ["points"]
    data, kwargs, _ = layers[0]
    assert len(data) == len(counts) and kwargs["units"]
