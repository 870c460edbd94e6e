"""Space Ranger 1.x/2.x/3.x ``outs/`` folders (Visium, CytAssist, Visium HD bins) -> the
AnnData convention of :mod:`napari_hinge._convention`.

HDF5 counts are read by :func:`scanpy.read_10x_h5`; on top stay only the checks scanpy does
not make (a self-consistent sparse matrix: scipy trusts the indices, and out-of-range ones
corrupt memory later) and the convention. Matrix Market folders are parsed here
(:func:`read_10x_mtx` says why).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from napari_hinge._convention import META_KEY, SPATIAL_KEY, VISIUM_SPOT_UM, check_mpp, unique_var
from napari_hinge.errors import positive_number

from .images import is_blank, load_image, read_image_shape
from .validate import (
    TEXT_ERRORS,
    SpatialDataError,
    abs_path,
    check_unique,
    find_file,
    match_ids,
    numeric_columns,
    open_text,
    validate_spatial,
    warn,
)

__all__ = ["read_10x_h5", "read_10x_mtx", "read_spaceranger"]


# --------------------------------------------------------------------------------------------
# counts


def read_10x_h5(path: str | Path) -> tuple[sp.csr_matrix, pd.Index, pd.DataFrame, dict]:
    """Counts (barcodes x features, CSR float32), barcodes, ``var`` and the file attributes of
    a 10x feature-barcode HDF5 (Cell Ranger / Space Ranger v1 legacy or v2+ layout), read by
    :func:`scanpy.read_10x_h5` after its structure has been checked."""
    path = Path(path)
    attrs = _check_10x_h5(path)
    try:
        import scanpy as sc

        adata = sc.read_10x_h5(path, gex_only=False)
    except Exception as err:  # scanpy raises a bare Exception for missing datasets
        raise SpatialDataError(f"{path}: not a 10x feature-barcode matrix ({err})",
                               path=path) from err
    X = adata.X
    n_feat = adata.n_vars
    if X.nnz and (X.indices.min() < 0 or X.indices.max() >= n_feat):
        raise _bad_matrix(path, "indices", f"gene indices span {X.indices.min()}.."
                          f"{X.indices.max()}, outside 0..{n_feat - 1} ({n_feat} features)")
    # keep the raw values; validation catches NaN/negatives, here we only flag fractions
    if X.data.dtype.kind == "f" and X.data.size and not np.all(X.data == np.round(X.data)):
        warn(f"{path}: counts are not integers; expected raw UMI counts")
    X = sp.csr_matrix(X.astype(np.float32, copy=False))
    ftype = adata.var["feature_types"].to_numpy() if "feature_types" in adata.var else None
    var = unique_var(adata.var["gene_ids"].to_numpy(), adata.var_names.to_numpy(), ftype)
    return X, pd.Index(adata.obs_names.to_numpy()), var, attrs


def _bad_matrix(path, field, problem) -> SpatialDataError:
    return SpatialDataError(f"{path}: matrix/{field}: {problem} (a corrupt or hand-edited "
                            "feature-barcode matrix)", path=path, field=field)


def _check_10x_h5(path: Path) -> dict:
    """The structure of a 10x HDF5 matrix (features x barcodes, compressed by barcode), from
    the dataset shapes and ``indptr`` only; returns the file attributes."""
    import h5py

    try:
        f = h5py.File(path, "r")
    except OSError as err:
        raise SpatialDataError(f"{path}: not a readable HDF5 file ({err})") from err
    with f:
        try:
            if "matrix" in f:  # Cell Ranger / Space Ranger >= 3.0 layout (format v2+)
                g = f["matrix"]
                n_ids = g["features"]["id"].shape[0]
            else:  # legacy v1: one group per genome
                groups = [k for k in f if isinstance(f[k], h5py.Group)]
                if not groups:
                    raise KeyError("no 'matrix' group")
                g = f[groups[0]]
                n_ids = g["genes"].shape[0]
            n_feat, n_bc = (int(v) for v in g["shape"][:])
            data, indices, indptr = g["data"], g["indices"], g["indptr"]
            n_barcodes = g["barcodes"].shape[0]
            ptr = indptr[:]
            attrs = {k: f.attrs[k] for k in f.attrs}
        except (KeyError, ValueError, TypeError, AttributeError, IndexError) as err:
            raise SpatialDataError(
                f"{path}: not a 10x feature-barcode matrix (HDF5 layout: {err})"
            ) from err

        if n_feat < 0 or n_bc < 0:
            raise _bad_matrix(path, "shape", f"negative size {n_feat} x {n_bc}")
        for name, ds in (("data", data), ("indices", indices), ("indptr", indptr)):
            if len(ds.shape) != 1:
                raise _bad_matrix(path, name, f"expected a 1-d array, got shape {ds.shape}")
        if data.dtype.kind not in "biuf":
            raise _bad_matrix(path, "data", f"counts must be numbers, got dtype {data.dtype}")
        for name, ds in (("indices", indices), ("indptr", indptr)):
            if ds.dtype.kind not in "iu":
                raise _bad_matrix(path, name, f"must be integers, got dtype {ds.dtype}")
        n_data = data.shape[0]
        if len(ptr) != n_bc + 1:
            raise _bad_matrix(path, "indptr",
                              f"{len(ptr)} entries, expected {n_bc + 1} (barcodes + 1)")
        if indices.shape[0] != n_data:
            raise _bad_matrix(path, "indices",
                              f"{indices.shape[0]} entries but data has {n_data}")
        if ptr[0] != 0 or ptr[-1] != n_data:
            raise _bad_matrix(path, "indptr",
                              f"runs from {ptr[0]} to {ptr[-1]}, expected 0 to {n_data}")
        if (np.diff(ptr.astype(np.int64)) < 0).any():
            raise _bad_matrix(path, "indptr", "decreases (must be non-decreasing)")
        if n_ids != n_feat or n_barcodes != n_bc:
            raise _bad_matrix(path, "shape", f"{n_feat} features x {n_bc} barcodes but {n_ids} "
                              f"feature ids and {n_barcodes} barcodes")
    return attrs


class _MatrixTablesDisagree(Exception):
    """The Matrix Market header's size does not match the feature and barcode tables."""


def read_10x_mtx(folder: str | Path) -> tuple[sp.csr_matrix, pd.Index, pd.DataFrame, dict]:
    """Counts, barcodes and ``var`` of a 10x Matrix Market folder (``matrix.mtx[.gz]``,
    ``features.tsv[.gz]`` or 1.x ``genes.tsv[.gz]``, ``barcodes.tsv[.gz]``), each error naming
    its file.

    Not :func:`scanpy.read_10x_mtx`: it only accepts Space Ranger's exact file names (not a
    gunzipped folder), cannot say which file is broken, and its Matrix Market reader (scipy's)
    crashes on some damaged files (see below).
    """
    folder = Path(folder)
    mtx = find_file(folder, "matrix.mtx.gz", "matrix.mtx")
    feats = find_file(folder, "features.tsv.gz", "features.tsv", "genes.tsv.gz", "genes.tsv")
    bcs = find_file(folder, "barcodes.tsv.gz", "barcodes.tsv")
    missing = [
        n
        for n, p in (
            ("matrix.mtx[.gz]", mtx),
            ("features.tsv[.gz]", feats),
            ("barcodes.tsv[.gz]", bcs),
        )
        if p is None
    ]
    if missing:
        raise FileNotFoundError(f"{folder}: missing {', '.join(missing)}")
    try:
        ftab = pd.read_csv(feats, sep="\t", header=None, dtype=str)
    except TEXT_ERRORS as err:
        raise SpatialDataError(f"{feats}: not a readable features table ({err})",
                               path=feats) from err
    try:
        barcodes = pd.Index(pd.read_csv(bcs, sep="\t", header=None, dtype=str)[0].to_numpy())
    except TEXT_ERRORS as err:
        raise SpatialDataError(f"{bcs}: not a readable barcode list ({err})", path=bcs) from err
    try:
        with open_text(mtx) as fh:
            header = fh.readline()
            if not header.startswith("%%MatrixMarket"):
                raise ValueError("no %%MatrixMarket header")
            line = fh.readline()
            while line.startswith("%"):
                line = fh.readline()
            n_feat, n_bc, nnz = (int(v) for v in line.split())
            if n_feat != len(ftab) or n_bc != len(barcodes):  # before sizing anything by it
                raise _MatrixTablesDisagree(n_feat, n_bc)
            # pandas' C parser, not scipy.io.mmread (what anndata.io.read_mtx and
            # scanpy.read_10x_mtx call): on a last entry cut short by a stray byte ("34 3 1\x02"
            # at the end of the file) scipy 1.17's reader crashes the process, and it reads
            # "1x" as 1
            tab = pd.read_csv(fh, sep=" ", header=None, dtype={0: np.int64, 1: np.int64},
                              names=["i", "j", "v"], engine="c")
        if len(tab) != nnz:
            raise ValueError(f"{len(tab)} entries, header says {nnz}")
        if n_feat < 0 or n_bc < 0:
            raise ValueError(f"negative size {n_feat} x {n_bc} in the header")
        i, j = tab["i"].to_numpy(), tab["j"].to_numpy()
        if len(tab) and (i.min() < 1 or i.max() > n_feat or j.min() < 1 or j.max() > n_bc):
            raise ValueError(f"entries address rows {i.min()}..{i.max()} and columns "
                             f"{j.min()}..{j.max()}, outside the header's {n_feat} x {n_bc}")
        X = sp.csr_matrix((tab["v"].to_numpy(np.float32), (j - 1, i - 1)), shape=(n_bc, n_feat))
    except _MatrixTablesDisagree as err:
        n_feat, n_bc = err.args
        raise SpatialDataError(
            f"{folder}: matrix is {n_feat} features x {n_bc} barcodes but {feats.name} has "
            f"{len(ftab)} rows and {bcs.name} {len(barcodes)}"
        ) from None
    except (*TEXT_ERRORS, OverflowError) as err:  # OverflowError: a 40-digit index
        raise SpatialDataError(f"{mtx}: not a readable Matrix Market file ({err})",
                               path=mtx) from err
    names = ftab[1] if ftab.shape[1] > 1 else ftab[0]
    ftype = ftab[2] if ftab.shape[1] > 2 else None
    var = unique_var(
        ftab[0].to_numpy(), names.to_numpy(), None if ftype is None else ftype.to_numpy()
    )
    return X, barcodes, var, {}


# --------------------------------------------------------------------------------------------
# positions and scale factors


#: The columns of tissue_positions[_list].csv (1.x files have no header row).
POSITION_COLUMNS = ["barcode", "in_tissue", "array_row", "array_col", "pxl_row_in_fullres",
                    "pxl_col_in_fullres"]


def _read_positions(spatial: Path) -> tuple[pd.DataFrame, Path]:
    path = find_file(
        spatial,
        "tissue_positions.csv",
        "tissue_positions_list.csv",
        "tissue_positions.parquet",
        "tissue_positions_list.txt",
    )
    if path is None:
        raise FileNotFoundError(
            f"{spatial}: no tissue_positions.csv, tissue_positions_list.csv or "
            "tissue_positions.parquet"
        )
    try:
        if path.suffix == ".parquet":
            try:
                pos = pd.read_parquet(path)
            except ImportError as err:
                raise SpatialDataError(
                    f"{path}: reading parquet needs pyarrow (pip install pyarrow)"
                ) from err
        else:
            with open(path) as fh:
                first = fh.readline()
            has_header = "barcode" in first or "in_tissue" in first
            pos = pd.read_csv(path, header=0 if has_header else None)
            if not has_header:
                if pos.shape[1] != 6:
                    raise ValueError(f"{pos.shape[1]} columns, expected 6")
                pos.columns = POSITION_COLUMNS
    except TEXT_ERRORS as err:
        raise SpatialDataError(f"{path}: not a Space Ranger positions file ({err})") from err
    missing = [c for c in POSITION_COLUMNS if c not in pos.columns]
    if missing:
        raise SpatialDataError(f"{path}: missing column(s) {', '.join(missing)}")
    numeric_columns(pos.set_index(pos["barcode"].astype(str)), POSITION_COLUMNS[1:], path)
    pos = pos.set_index("barcode")
    pos.index = pos.index.astype(str)
    check_unique(pos.index, path)
    return pos, path


def _resolve_outs(path: Path, bin_size: str | None) -> Path:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"Space Ranger folder not found: {path}")
    if path.is_file():  # the matrix file itself was given
        path = path.parent
    if path.name == "spatial" and not has_counts(path):
        path = path.parent
    if (path / "outs").is_dir() and not has_counts(path):
        path = path / "outs"
    binned = path / "binned_outputs"
    if not has_counts(path) and binned.is_dir():
        sizes = sorted(p.name for p in binned.iterdir() if p.is_dir())
        want = f"square_{bin_size}" if bin_size else "square_008um"
        if want not in sizes:
            raise FileNotFoundError(f"{binned}: no {want} (found: {', '.join(sizes) or 'none'})")
        path = binned / want
    return path


def _read_scalefactors(path: Path) -> dict:
    """scalefactors_json.json, every scale factor and size a finite positive number."""
    try:
        sf = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise SpatialDataError(f"{path}: not valid JSON ({err})", path=path) from err
    if not isinstance(sf, dict):
        raise SpatialDataError(f"{path}: expected a JSON object of scale factors, got "
                               f"{type(sf).__name__}", path=path)
    positive_number(sf.get("spot_diameter_fullres"), path, "spot_diameter_fullres")
    for key, value in sf.items():
        if key.endswith(("_scalef", "_fullres")):
            positive_number(value, path, key)
    if sf.get("microns_per_pixel") is not None:
        check_mpp(sf["microns_per_pixel"], path)
    return sf


def has_counts(folder: Path) -> bool:
    return (folder / "filtered_feature_bc_matrix.h5").is_file() or (
        folder / "filtered_feature_bc_matrix"
    ).is_dir()


# --------------------------------------------------------------------------------------------
# the outs folder


def read_spaceranger(
    path: str | Path,
    *,
    slide: str | Path | None = None,
    mpp: float | None = None,
    library_id: str | None = None,
    bin_size: str | None = None,
) -> AnnData:
    """Read a Space Ranger 1.x/2.x/3.x ``outs/`` folder (Visium, CytAssist, Visium HD bins).

    Parameters
    ----------
    path
        The ``outs`` folder (or its parent run folder, or ``filtered_feature_bc_matrix.h5``).
        Counts come from ``filtered_feature_bc_matrix.h5`` or ``filtered_feature_bc_matrix/``;
        positions from ``spatial/tissue_positions.csv`` (2.x), ``tissue_positions_list.csv``
        (1.x) or ``tissue_positions.parquet``.
    slide
        The full-resolution H&E the spots were aligned to. Coordinates then stay in full-res
        pixels and ``slide_path`` is this file. Without it the slide is the best real image in
        ``spatial/`` (hires, else lowres; blank placeholders are skipped with a warning) and
        coordinates are scaled to it (``uns['napari_hinge']['fullres_scalef']``).
    mpp
        Microns per pixel of the slide, overriding the value derived from the scale factors
        (``microns_per_pixel`` for Visium HD, else 55 µm / ``spot_diameter_fullres``).
    library_id
        Key under ``uns['spatial']`` (default: the library id in the h5, else the folder name).
    bin_size
        Visium HD only: which ``binned_outputs/square_<bin_size>`` to read (default ``008um``).

    Returns
    -------
    AnnData in the napari-hinge convention, spots with counts only.
    """
    outs = _resolve_outs(Path(path), bin_size)
    h5 = outs / "filtered_feature_bc_matrix.h5"
    mtx_dir = outs / "filtered_feature_bc_matrix"
    if h5.is_file():
        X, barcodes, var, attrs = read_10x_h5(h5)
        counts_file = h5
    elif mtx_dir.is_dir():
        X, barcodes, var, attrs = read_10x_mtx(mtx_dir)
        counts_file = mtx_dir
    else:
        raise FileNotFoundError(
            f"{outs}: no filtered_feature_bc_matrix.h5 or filtered_feature_bc_matrix/ "
            "(is this a Space Ranger outs folder?)"
        )
    check_unique(barcodes, counts_file)
    if "feature_types" in var and (var["feature_types"] != "Gene Expression").any():
        keep = (var["feature_types"] == "Gene Expression").to_numpy()
        X, var = X[:, keep], var.loc[keep]

    spatial = outs / "spatial"
    if not spatial.is_dir():
        raise FileNotFoundError(f"{outs}: no spatial/ folder (positions and scale factors)")
    pos, pos_file = _read_positions(spatial)
    sf_file = spatial / "scalefactors_json.json"
    if not sf_file.is_file():
        raise FileNotFoundError(f"{spatial}: no scalefactors_json.json")
    sf = _read_scalefactors(sf_file)
    spot_full = sf["spot_diameter_fullres"]

    keep = match_ids(barcodes, pos.index, counts_file=counts_file, positions_file=pos_file)
    X, barcodes = X[keep], barcodes[keep]
    pos = pos.loc[barcodes]
    obs = pd.DataFrame(
        {
            "in_tissue": pos["in_tissue"].to_numpy(),
            "array_row": pos["array_row"].to_numpy(),
            "array_col": pos["array_col"].to_numpy(),
        },
        index=pd.Index(barcodes, name=None),
    )
    xy_full = pos[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(np.float64)

    # The images in spatial/, blank placeholders dropped.
    images: dict[str, np.ndarray] = {}
    image_files: dict[str, Path] = {}
    for key in ("hires", "lowres"):
        f = spatial / f"tissue_{key}_image.png"
        if not f.is_file():
            continue
        img = load_image(f)
        if is_blank(img):
            warn(f"{f} is blank (a single value everywhere, a placeholder); not used")
            continue
        if f"tissue_{key}_scalef" not in sf:
            warn(f"{sf_file} has no tissue_{key}_scalef; {f.name} not used")
            continue
        images[key], image_files[key] = img, f

    # paths stored absolute: the h5ad written from this must open from any folder
    meta: dict = {"source": abs_path(outs), "format": "spaceranger"}
    if slide is not None:
        slide = Path(slide)
        image_shape = read_image_shape(slide)
        scalef = 1.0
        meta["slide_path"] = abs_path(slide)
        image_source = slide
    elif images:
        key = "hires" if "hires" in images else "lowres"
        scalef = float(sf[f"tissue_{key}_scalef"])
        image_shape = images[key].shape
        meta["slide_path"] = abs_path(image_files[key])
        meta["fullres_scalef"] = scalef
        image_source = image_files[key]
    else:
        warn(f"{spatial}: no usable tissue image; coordinates stay in full-resolution pixels")
        scalef, image_shape, image_source = 1.0, None, None

    if mpp is None:
        if sf.get("microns_per_pixel"):
            mpp = float(sf["microns_per_pixel"]) / scalef
        else:
            mpp = VISIUM_SPOT_UM / float(spot_full) / scalef
        # the stored image may be a coarse copy: its own pixel size must still be real
        check_mpp(mpp, sf_file, "microns per pixel of the slide (from the scale factors)")
    else:
        mpp = positive_number(mpp, outs, "mpp")
    meta["microns_per_pixel"] = float(mpp)
    meta["spot_diameter_px"] = float(spot_full) * scalef

    if library_id is None:
        lib = attrs.get("library_ids")
        if lib is not None and np.size(lib) == 1:
            lib = np.ravel(lib)[0]
            library_id = lib.decode() if isinstance(lib, bytes) else str(lib)
        else:
            library_id = outs.parent.name if outs.name == "outs" else outs.name

    adata = AnnData(X=X, obs=obs, var=var)
    adata.obsm[SPATIAL_KEY] = xy_full * scalef
    scalefactors = {
        k: (float(v) / scalef if k.startswith("tissue_") and k.endswith("_scalef") else v)
        for k, v in sf.items()
    }
    for k in ("spot_diameter_fullres", "fiducial_diameter_fullres"):
        if k in sf:
            scalefactors[k] = float(sf[k]) * scalef
    adata.uns["spatial"] = {
        library_id: {
            "images": images,
            "scalefactors": scalefactors,
            "metadata": {"source": str(outs), "coordinates": "obsm['spatial'] (slide px)"},
        }
    }
    adata.uns[META_KEY] = meta
    return validate_spatial(adata, source=outs, image_shape=image_shape,
                            counts_source=counts_file, coords_source=pos_file,
                            image_source=image_source)
