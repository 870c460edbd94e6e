"""Spatial-transcriptomics readers: Space Ranger, legacy ST (her2st), h5ad -> one AnnData.

Every reader returns the convention of :mod:`napari_hinge._convention`:

- ``X``: raw counts, CSR ``float32`` (spots x genes); ``var_names`` unique gene symbols
  (``var['gene_ids']`` keeps Ensembl ids where the source has them);
- ``obsm['spatial']``: ``float64`` (x, y) in level-0 pixels of the slide the spots belong to;
- ``uns['napari_hinge']``: ``microns_per_pixel``, ``spot_diameter_px``, ``slide_path`` (absent
  without an image), ``source``, ``format``;
- ``uns['spatial'][library_id]`` = ``{'images', 'scalefactors', 'metadata'}`` in scanpy's layout,
  with scale factors that map ``obsm['spatial']`` onto each stored image, so
  ``scanpy.pl.spatial`` works unchanged.

Every reader ends with :func:`validate_spatial`. Problems that make the data unusable raise
:class:`SpatialDataError` (a ``ValueError``) naming the file; problems that leave it usable
warn with a :class:`SpatialDataWarning` that says how many spots are affected.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import os
import warnings
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from napari_hinge._convention import (
    LEGACY_ST_PITCH_UM,
    LEGACY_ST_SPOT_UM,
    LIBRARY_SIZE_KEY,
    META_KEY,
    SPATIAL_KEY,
    VISIUM_PITCH_UM,
    VISIUM_SPOT_UM,
    check_mpp,
)
from napari_hinge.errors import InputError, positive_number

__all__ = [
    "SpatialDataError",
    "SpatialDataWarning",
    "detect_spatial_format",
    "list_her2st_sections",
    "read_h5ad",
    "read_her2st",
    "read_legacy_st",
    "read_spaceranger",
    "read_spatial",
    "summary",
    "validate_spatial",
]

# Fraction of spots outside the image above which the coordinates are judged wrong (error).
_MAX_OUTSIDE_FRACTION = 0.5
# Fraction of count barcodes that must find a position, else the files do not belong together.
_MIN_MATCH_FRACTION = 0.5
# Longest side of the overview image stored in uns['spatial'] for legacy-ST slides.
_OVERVIEW_MAX_SIDE = 2000
_SLIDE_TIFF_SUFFIXES = (".tif", ".tiff", ".svs", ".ndpi", ".btf", ".scn", ".qptiff")


class SpatialDataError(InputError):
    """Spatial data that cannot be used as it is (the message names the file)."""


# What reading a damaged text or gzip file raises (a truncated .gz: EOFError or zlib.error).
_TEXT_ERRORS = (ValueError, OSError, EOFError, zlib.error, UnicodeDecodeError,
                pd.errors.ParserError)


def _numeric_columns(df: pd.DataFrame, columns, path) -> None:
    """Raise naming the column and the first rows whose values are not numbers."""
    for c in columns:
        if c not in df.columns or pd.api.types.is_numeric_dtype(df[c]):
            continue
        col = df[c]
        bad = pd.to_numeric(col, errors="coerce").isna() & col.notna()
        rows = list(col.index[bad.to_numpy()]) or list(col.index[:1])
        raise SpatialDataError(
            f"{path}: column {c!r} must hold numbers; not a number in {int(bad.sum())} row(s), "
            f"e.g. {_first([f'{r}: {col[r]!r}' for r in rows], 3)}", path=path)


class SpatialDataWarning(UserWarning):
    """Spatial data that is usable but has a problem worth knowing (with a count)."""


def _warn(message: str) -> None:
    warnings.warn(message, SpatialDataWarning, stacklevel=3)


def _first(items, n: int = 5) -> str:
    items = [str(i) for i in items]
    more = f" (and {len(items) - n} more)" if len(items) > n else ""
    return ", ".join(items[:n]) + more


# --------------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------------


def validate_spatial(
    adata: AnnData,
    *,
    source: str | Path,
    image_shape: tuple[int, ...] | None = None,
    counts_source: str | Path | None = None,
    coords_source: str | Path | None = None,
    image_source: str | Path | None = None,
) -> AnnData:
    """Check an AnnData against the spatial convention; raise or warn with the file named.

    Parameters
    ----------
    adata
        Spots x genes with ``obsm['spatial']``.
    source
        The file or folder the data came from (named in every message).
    image_shape
        ``(height, width, ...)`` of the image the coordinates refer to; when given, spots
        outside it are reported (error when most are outside: a wrong scale; a warning
        with the count when a few are). Spots are never clipped.
    counts_source, coords_source, image_source
        The files to name for count, coordinate and image problems (default ``source``).

    Returns
    -------
    The same ``adata`` (unchanged).

    Raises
    ------
    SpatialDataError
        Duplicated barcodes, missing ``obsm['spatial']`` or coordinates, negative or
        non-finite counts, or most spots outside the image.
    """
    counts_source = counts_source or source
    coords_source = coords_source or source
    image_source = image_source or source

    names = pd.Index(adata.obs_names)
    if names.has_duplicates:
        dup = names[names.duplicated()].unique()
        raise SpatialDataError(
            f"{counts_source}: {len(dup)} duplicated barcode(s)/spot id(s): {_first(dup)}"
        )

    if SPATIAL_KEY not in adata.obsm:
        raise SpatialDataError(f"{coords_source}: no obsm['{SPATIAL_KEY}'] (spot coordinates)")
    xy = np.asarray(adata.obsm[SPATIAL_KEY], dtype=np.float64)
    if xy.ndim != 2 or xy.shape[1] < 2 or xy.shape[0] != adata.n_obs:
        raise SpatialDataError(
            f"{coords_source}: obsm['{SPATIAL_KEY}'] has shape {xy.shape}, "
            f"expected ({adata.n_obs}, 2)"
        )
    bad_xy = ~np.isfinite(xy[:, :2]).all(axis=1)
    if bad_xy.any():
        raise SpatialDataError(
            f"{coords_source}: {int(bad_xy.sum())} of {adata.n_obs} spots have missing or "
            f"non-finite coordinates: {_first(names[bad_xy])}"
        )

    _check_counts(adata.X, names, counts_source)

    if image_shape is not None and adata.n_obs:
        h, w = int(image_shape[0]), int(image_shape[1])
        # Half a pixel of slack: centres on the last pixel row are still on the image.
        outside = (
            (xy[:, 0] < -0.5) | (xy[:, 1] < -0.5) | (xy[:, 0] > w - 0.5) | (xy[:, 1] > h - 0.5)
        )
        n_out = int(outside.sum())
        if n_out:
            lo, hi = xy[:, :2].min(axis=0), xy[:, :2].max(axis=0)
            detail = (
                f"{n_out} of {adata.n_obs} spots from {coords_source} lie outside the image "
                f"{image_source} ({w}x{h} px; spot x in [{lo[0]:.1f}, {hi[0]:.1f}], "
                f"y in [{lo[1]:.1f}, {hi[1]:.1f}])"
            )
            if n_out > _MAX_OUTSIDE_FRACTION * adata.n_obs:
                raise SpatialDataError(
                    detail + ": the coordinates are probably in another scale than the image "
                    "(full-resolution vs. hires/lowres pixels?) or belong to another image"
                )
            _warn(detail + "; they are kept (not clipped)")
    return adata


def _check_counts(X, names: pd.Index, counts_source) -> None:
    if sp.issparse(X):
        csr = X if sp.isspmatrix_csr(X) or isinstance(X, sp.csr_array) else sp.csr_matrix(X)
        data = csr.data

        def rows_of(flat):  # spot of each stored value, only computed on error
            return np.unique(np.searchsorted(csr.indptr, np.flatnonzero(flat), side="right") - 1)

    else:
        dense = np.atleast_2d(np.asarray(X))
        data = dense.ravel()

        def rows_of(flat):
            return np.unique(np.flatnonzero(flat) // max(dense.shape[1], 1))

    if data.dtype.kind not in "biuf":
        raise SpatialDataError(f"{counts_source}: counts have non-numeric dtype {data.dtype}")
    if data.dtype.kind == "f":
        nonfinite = ~np.isfinite(data)
        if nonfinite.any():
            rows = rows_of(nonfinite)
            raise SpatialDataError(
                f"{counts_source}: {int(nonfinite.sum())} NaN/infinite count value(s) in "
                f"{len(rows)} spot(s): {_first(names[rows])}"
            )
    negative = data < 0
    if negative.any():
        rows = rows_of(negative)
        raise SpatialDataError(
            f"{counts_source}: {int(negative.sum())} negative count value(s) in {len(rows)} "
            f"spot(s) (raw counts cannot be negative): {_first(names[rows])}"
        )


def _is_integral(X) -> bool:
    data = X.data if sp.issparse(X) else np.asarray(X).ravel()
    if data.dtype.kind in "biu":
        return True
    sample = data[:200_000]
    return bool(np.all(np.isfinite(sample)) and np.all(sample == np.round(sample)))


def _check_unique(ids: pd.Index, file) -> None:
    if ids.has_duplicates:
        dup = ids[ids.duplicated()].unique()
        raise SpatialDataError(
            f"{file}: {len(dup)} duplicated barcode(s)/spot id(s): {_first(dup)}"
        )


def _match(count_ids: pd.Index, pos_ids: pd.Index, *, counts_file, positions_file) -> np.ndarray:
    """Boolean mask over ``count_ids`` of spots that have a position; raise/warn on mismatch."""
    has_pos = count_ids.isin(pos_ids)
    n_match = int(has_pos.sum())
    n = len(count_ids)
    if n and n_match < _MIN_MATCH_FRACTION * n:
        raise SpatialDataError(
            f"only {n_match} of {n} spots in {counts_file} have a position in {positions_file}: "
            f"the files do not belong together (count ids e.g. {_first(count_ids[:3])}; "
            f"position ids e.g. {_first(pos_ids[:3])})"
        )
    if n_match < n:
        _warn(
            f"{n - n_match} of {n} spots in {counts_file} have no position in {positions_file} "
            f"and were dropped: {_first(count_ids[~has_pos])}"
        )
    return np.asarray(has_pos)


# --------------------------------------------------------------------------------------------
# small file helpers
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _pil_large_images():
    """Let PIL open whole-section JPEGs (her2st images exceed its decompression-bomb limit)."""
    from PIL import Image

    old = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        yield Image
    finally:
        Image.MAX_IMAGE_PIXELS = old


def _image_shape(path: Path) -> tuple[int, int]:
    """(height, width) of level 0 of an image or slide, from its header only."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    if path.suffix.lower() in _SLIDE_TIFF_SUFFIXES:
        import tifffile

        try:
            with tifffile.TiffFile(path) as tif:
                shape = tif.series[0].levels[0].shape
                axes = tif.series[0].levels[0].axes
        except Exception as err:
            raise SpatialDataError(f"{path}: cannot read the slide header ({err})") from err
        return int(shape[axes.index("Y")]), int(shape[axes.index("X")])
    with _pil_large_images() as Image:
        try:
            with Image.open(path) as img:
                w, h = img.size
        except Exception as err:
            raise SpatialDataError(f"{path}: cannot read the image ({err})") from err
    return int(h), int(w)


def _load_png(path: Path) -> np.ndarray:
    with _pil_large_images() as Image:
        try:
            with Image.open(path) as img:
                arr = np.asarray(img)
        except Exception as err:
            raise SpatialDataError(f"{path}: cannot read the image ({err})") from err
    if arr.ndim == 3 and arr.shape[2] == 4:
        arr = arr[..., :3]
    return np.ascontiguousarray(arr)


def _is_blank(img: np.ndarray) -> bool:
    """True for placeholder images (a single value everywhere, e.g. all zeros)."""
    return img.size == 0 or bool(img.min() == img.max())


def _overview(path: Path, max_side: int = _OVERVIEW_MAX_SIDE) -> tuple[np.ndarray, float]:
    """A small RGB copy of a large image and its scale (overview px per image px)."""
    if Path(path).suffix.lower() in _SLIDE_TIFF_SUFFIXES:
        return _tiff_overview(Path(path), max_side)
    with _pil_large_images() as Image, Image.open(path) as img:
        w, h = img.size
        factor = 1
        while max(w, h) / factor > max_side and factor < 64:
            factor *= 2
        if img.format == "JPEG":
            # JPEG decodes at 1/2, 1/4, 1/8 directly (DCT scaling): fast and light.
            img.draft("RGB", (int(np.ceil(w / factor)), int(np.ceil(h / factor))))
        img = img.convert("RGB")
        if max(img.size) > max_side:
            target = (max(1, round(w / factor)), max(1, round(h / factor)))
            img = img.resize(target, Image.Resampling.LANCZOS)
        arr = np.asarray(img)
    return np.ascontiguousarray(arr), arr.shape[1] / w


def _tiff_overview(path: Path, max_side: int) -> tuple[np.ndarray, float]:
    """Overview from the smallest pyramid level that is still >= ``max_side / 2``."""
    import tifffile
    from PIL import Image

    with tifffile.TiffFile(path) as tif:
        levels = tif.series[0].levels
        axes = levels[0].axes
        sizes = [(lv.shape[axes.index("Y")], lv.shape[axes.index("X")]) for lv in levels]
        ok = [i for i, (h, w) in enumerate(sizes) if max(h, w) >= max_side // 2] or [0]
        i = ok[-1]
        if sizes[i][0] * sizes[i][1] > 2e8:
            raise ValueError(f"no pyramid level small enough ({sizes[i][1]}x{sizes[i][0]} px)")
        arr = levels[i].asarray()
    if axes.index("Y") != 0:  # e.g. 'SYX' planar: move samples last
        arr = np.moveaxis(arr, axes.index("S") if "S" in axes else 0, -1)
    img = Image.fromarray(np.ascontiguousarray(arr[..., :3]) if arr.ndim == 3 else arr)
    h0, w0 = sizes[0]
    if max(img.size) > max_side:
        f = max_side / max(img.size)
        img = img.resize(
            (max(1, round(img.width * f)), max(1, round(img.height * f))), Image.Resampling.LANCZOS
        )
    out = np.asarray(img.convert("RGB"))
    return np.ascontiguousarray(out), out.shape[1] / w0


def _decode(values) -> np.ndarray:
    return np.array([v.decode() if isinstance(v, bytes) else str(v) for v in values], dtype=object)


def _make_var(ids, names, feature_types=None) -> pd.DataFrame:
    """var with unique gene symbols as names and the ids in ``gene_ids``."""
    names = pd.Index(names if names is not None else ids).astype(str)
    var = pd.DataFrame(index=names)
    if ids is not None:
        var["gene_ids"] = np.asarray(ids, dtype=str)
    if feature_types is not None:
        var["feature_types"] = np.asarray(feature_types, dtype=str)
    if var.index.has_duplicates:
        # anndata's rule (GENE, GENE-1, ...), the same as scanpy.read_visium
        from anndata.utils import make_index_unique

        var.index = make_index_unique(var.index.astype(str))
    return var


def _read_10x_h5(path: Path) -> tuple[sp.csr_matrix, pd.Index, pd.DataFrame, dict]:
    import h5py

    try:
        f = h5py.File(path, "r")
    except OSError as err:
        raise SpatialDataError(f"{path}: not a readable HDF5 file ({err})") from err
    with f:
        try:
            if "matrix" in f:  # Cell Ranger / Space Ranger >= 3.0 layout (format v2+)
                g = f["matrix"]
                feats = g["features"]
                ids, names = _decode(feats["id"][:]), _decode(feats["name"][:])
                ftype = _decode(feats["feature_type"][:]) if "feature_type" in feats else None
            else:  # legacy v1: one group per genome
                groups = [k for k in f if isinstance(f[k], h5py.Group)]
                if not groups:
                    raise KeyError("no 'matrix' group")
                g = f[groups[0]]
                ids, names = _decode(g["genes"][:]), _decode(g["gene_names"][:])
                ftype = None
            n_feat, n_bc = (int(v) for v in g["shape"][:])
            data, indices, indptr = g["data"][:], g["indices"][:], g["indptr"][:]
            barcodes = pd.Index(_decode(g["barcodes"][:]))
            # scipy trusts indices and indptr: out-of-range ones corrupt memory later
            _check_csc(path, data, indices, indptr, n_feat, n_bc, len(ids), len(barcodes))
            X = sp.csr_matrix((data.astype(np.float32), indices, indptr), shape=(n_bc, n_feat))
            attrs = {k: f.attrs[k] for k in f.attrs}
        except SpatialDataError:
            raise
        except (KeyError, ValueError, TypeError, AttributeError, IndexError) as err:
            raise SpatialDataError(
                f"{path}: not a 10x feature-barcode matrix (HDF5 layout: {err})"
            ) from err
    # keep the raw values; validation catches NaN/negatives, here we only flag fractions
    if data.dtype.kind == "f" and data.size and not np.all(data == np.round(data)):
        _warn(f"{path}: counts are not integers; expected raw UMI counts")
    var = _make_var(ids, names, ftype)
    return X, barcodes, var, attrs


def _check_csc(path, data, indices, indptr, n_feat, n_bc, n_ids, n_barcodes) -> None:
    """The 10x matrix (features x barcodes, compressed by barcode) must be self-consistent."""

    def bad(field, problem):
        return SpatialDataError(f"{path}: matrix/{field}: {problem} (a corrupt or hand-edited "
                                "feature-barcode matrix)", path=path, field=field)

    if n_feat < 0 or n_bc < 0:
        raise bad("shape", f"negative size {n_feat} x {n_bc}")
    for name, arr in (("data", data), ("indices", indices), ("indptr", indptr)):
        if arr.ndim != 1:
            raise bad(name, f"expected a 1-d array, got shape {arr.shape}")
    if data.dtype.kind not in "biuf":
        raise bad("data", f"counts must be numbers, got dtype {data.dtype}")
    for name, arr in (("indices", indices), ("indptr", indptr)):
        if arr.dtype.kind not in "iu":
            raise bad(name, f"must be integers, got dtype {arr.dtype}")
    if len(indptr) != n_bc + 1:
        raise bad("indptr", f"{len(indptr)} entries, expected {n_bc + 1} (barcodes + 1)")
    if len(indices) != len(data):
        raise bad("indices", f"{len(indices)} entries but data has {len(data)}")
    if indptr[0] != 0 or indptr[-1] != len(data):
        raise bad("indptr", f"runs from {indptr[0]} to {indptr[-1]}, expected 0 to {len(data)}")
    if (np.diff(indptr.astype(np.int64)) < 0).any():
        raise bad("indptr", "decreases (must be non-decreasing)")
    if len(indices) and (indices.min() < 0 or indices.max() >= n_feat):
        raise bad("indices", f"gene indices span {indices.min()}..{indices.max()}, outside "
                  f"0..{n_feat - 1} ({n_feat} features)")
    if n_ids != n_feat or n_barcodes != n_bc:
        raise bad("shape", f"{n_feat} features x {n_bc} barcodes but {n_ids} feature ids and "
                  f"{n_barcodes} barcodes")


def _abs(path) -> str:
    # absolute, symlinks kept: the name the user gave, valid from any working folder
    return os.path.abspath(path)


def _open_text(path: Path):
    return gzip.open(path, "rt") if path.suffix == ".gz" else open(path)


def _find(folder: Path, *names: str) -> Path | None:
    for name in names:
        if (folder / name).exists():
            return folder / name
    return None


def _read_10x_mtx(folder: Path) -> tuple[sp.csr_matrix, pd.Index, pd.DataFrame, dict]:
    mtx = _find(folder, "matrix.mtx.gz", "matrix.mtx")
    feats = _find(folder, "features.tsv.gz", "features.tsv", "genes.tsv.gz", "genes.tsv")
    bcs = _find(folder, "barcodes.tsv.gz", "barcodes.tsv")
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
        with _open_text(mtx) as fh:
            header = fh.readline()
            if not header.startswith("%%MatrixMarket"):
                raise ValueError("no %%MatrixMarket header")
            line = fh.readline()
            while line.startswith("%"):
                line = fh.readline()
            n_feat, n_bc, nnz = (int(v) for v in line.split())
            # pandas' C parser is ~10x faster than scipy.io.mmread on large files
            tab = pd.read_csv(
                fh,
                sep=" ",
                header=None,
                dtype={0: np.int64, 1: np.int64},
                names=["i", "j", "v"],
                engine="c",
            )
        if len(tab) != nnz:
            raise ValueError(f"{len(tab)} entries, header says {nnz}")
        if n_feat < 0 or n_bc < 0:
            raise ValueError(f"negative size {n_feat} x {n_bc} in the header")
        i, j = tab["i"].to_numpy(), tab["j"].to_numpy()
        if len(tab) and (i.min() < 1 or i.max() > n_feat or j.min() < 1 or j.max() > n_bc):
            raise ValueError(f"entries address rows {i.min()}..{i.max()} and columns "
                             f"{j.min()}..{j.max()}, outside the header's {n_feat} x {n_bc}")
        X = sp.csr_matrix(
            (tab["v"].to_numpy(np.float32), (tab["j"].to_numpy() - 1, tab["i"].to_numpy() - 1)),
            shape=(n_bc, n_feat),
        )
    except _TEXT_ERRORS as err:
        raise SpatialDataError(f"{mtx}: not a readable Matrix Market file ({err})",
                               path=mtx) from err
    try:
        ftab = pd.read_csv(feats, sep="\t", header=None, dtype=str)
    except _TEXT_ERRORS as err:
        raise SpatialDataError(f"{feats}: not a readable features table ({err})",
                               path=feats) from err
    try:
        barcodes = pd.Index(pd.read_csv(bcs, sep="\t", header=None, dtype=str)[0].to_numpy())
    except _TEXT_ERRORS as err:
        raise SpatialDataError(f"{bcs}: not a readable barcode list ({err})", path=bcs) from err
    if len(ftab) != n_feat or len(barcodes) != n_bc:
        raise SpatialDataError(
            f"{folder}: matrix is {n_feat} features x {n_bc} barcodes but {feats.name} has "
            f"{len(ftab)} rows and {bcs.name} {len(barcodes)}"
        )
    names = ftab[1] if ftab.shape[1] > 1 else ftab[0]
    ftype = ftab[2] if ftab.shape[1] > 2 else None
    var = _make_var(
        ftab[0].to_numpy(), names.to_numpy(), None if ftype is None else ftype.to_numpy()
    )
    return X, barcodes, var, {}


_POS_COLS = [
    "barcode",
    "in_tissue",
    "array_row",
    "array_col",
    "pxl_row_in_fullres",
    "pxl_col_in_fullres",
]


def _read_positions(spatial: Path) -> tuple[pd.DataFrame, Path]:
    path = _find(
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
                pos.columns = _POS_COLS
    except _TEXT_ERRORS as err:
        raise SpatialDataError(f"{path}: not a Space Ranger positions file ({err})") from err
    missing = [c for c in _POS_COLS if c not in pos.columns]
    if missing:
        raise SpatialDataError(f"{path}: missing column(s) {', '.join(missing)}")
    _numeric_columns(pos.set_index(pos["barcode"].astype(str)), _POS_COLS[1:], path)
    pos = pos.set_index("barcode")
    pos.index = pos.index.astype(str)
    _check_unique(pos.index, path)
    return pos, path


# --------------------------------------------------------------------------------------------
# Space Ranger
# --------------------------------------------------------------------------------------------


def _resolve_outs(path: Path, bin_size: str | None) -> Path:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"Space Ranger folder not found: {path}")
    if path.is_file():  # the matrix file itself was given
        path = path.parent
    if path.name == "spatial" and not _has_counts(path):
        path = path.parent
    if (path / "outs").is_dir() and not _has_counts(path):
        path = path / "outs"
    binned = path / "binned_outputs"
    if not _has_counts(path) and binned.is_dir():
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


def _has_counts(folder: Path) -> bool:
    return (folder / "filtered_feature_bc_matrix.h5").is_file() or (
        folder / "filtered_feature_bc_matrix"
    ).is_dir()


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
        X, barcodes, var, attrs = _read_10x_h5(h5)
        counts_file = h5
    elif mtx_dir.is_dir():
        X, barcodes, var, attrs = _read_10x_mtx(mtx_dir)
        counts_file = mtx_dir
    else:
        raise FileNotFoundError(
            f"{outs}: no filtered_feature_bc_matrix.h5 or filtered_feature_bc_matrix/ "
            "(is this a Space Ranger outs folder?)"
        )
    _check_unique(barcodes, counts_file)
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

    keep = _match(barcodes, pos.index, counts_file=counts_file, positions_file=pos_file)
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
        img = _load_png(f)
        if _is_blank(img):
            _warn(f"{f} is blank (a single value everywhere, a placeholder); not used")
            continue
        if f"tissue_{key}_scalef" not in sf:
            _warn(f"{sf_file} has no tissue_{key}_scalef; {f.name} not used")
            continue
        images[key], image_files[key] = img, f

    # paths stored absolute: the h5ad written from this must open from any folder
    meta: dict = {"source": _abs(outs), "format": "spaceranger"}
    if slide is not None:
        slide = Path(slide)
        image_shape = _image_shape(slide)
        scalef = 1.0
        meta["slide_path"] = _abs(slide)
        image_source = slide
    elif images:
        key = "hires" if "hires" in images else "lowres"
        scalef = float(sf[f"tissue_{key}_scalef"])
        image_shape = images[key].shape
        meta["slide_path"] = _abs(image_files[key])
        meta["fullres_scalef"] = scalef
        image_source = image_files[key]
    else:
        _warn(f"{spatial}: no usable tissue image; coordinates stay in full-resolution pixels")
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
    return validate_spatial(
        adata,
        source=outs,
        image_shape=image_shape,
        counts_source=counts_file,
        coords_source=pos_file,
        image_source=image_source,
    )


# --------------------------------------------------------------------------------------------
# legacy Spatial Transcriptomics (her2st layout)
# --------------------------------------------------------------------------------------------


def _read_st_counts(path: Path) -> tuple[sp.csr_matrix, pd.Index, pd.DataFrame]:
    if not path.is_file():
        raise FileNotFoundError(f"counts file not found: {path}")
    try:
        fast = _read_st_counts_fast(path)
        if fast is not None:
            X, ids, genes = fast
            _check_unique(ids, path)
            return X, ids, _make_var(None, genes)
        tab = pd.read_csv(path, sep="\t", index_col=0)
    except _TEXT_ERRORS as err:
        raise SpatialDataError(f"{path}: not a readable tab-separated count table ({err})") from err
    if tab.shape[1] == 0 or tab.shape[0] == 0:
        raise SpatialDataError(f"{path}: empty count table (expected spots x genes)")
    kinds = tab.dtypes.map(lambda d: d.kind)
    non_numeric = list(tab.columns[~kinds.isin(list("biuf")).to_numpy()])
    if non_numeric:
        raise SpatialDataError(f"{path}: non-numeric count column(s): {_first(non_numeric)}")
    ids = pd.Index(tab.index.astype(str))
    _check_unique(ids, path)
    X = sp.csr_matrix(tab.to_numpy(np.float32))
    var = _make_var(None, tab.columns.astype(str))
    return X, ids, var


def _read_st_counts_fast(path: Path) -> tuple[sp.csr_matrix, pd.Index, pd.Index] | None:
    """Plain numeric spots x genes tables, ~2x faster than ``read_csv`` on 15k columns.

    Parses all values as one column (pandas' per-column cost dominates wide tables). Returns
    None for anything irregular (quotes, ragged rows, text), which the caller then reads with
    ``pd.read_csv`` for its exact error.
    """
    with _open_text(path) as fh:
        text = fh.read()
    head, _, body = text.partition("\n")
    genes = head.rstrip("\r").split("\t")[1:]
    lines = [line.rstrip("\r") for line in body.split("\n")]
    while lines and not lines[-1]:
        lines.pop()
    if not genes or not lines or '"' in head:
        return None
    ids, rows = [], []
    for line in lines:
        spot, _, rest = line.partition("\t")
        if rest.count("\t") != len(genes) - 1 or not rest or rest.endswith("\t"):
            return None
        ids.append(spot)
        rows.append(rest)
    try:
        values = pd.read_csv(
            io.StringIO("\n".join(rows).replace("\t", "\n")),
            header=None,
            dtype=np.float32,
            skip_blank_lines=False,
            engine="c",
        )[0].to_numpy()
    except (ValueError, pd.errors.ParserError):
        return None
    if values.size != len(ids) * len(genes):
        return None
    X = sp.csr_matrix(values.reshape(len(ids), len(genes)))
    return X, pd.Index(ids, dtype=str), pd.Index(genes, dtype=str)


def _read_st_spots(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise FileNotFoundError(f"spot file not found: {path}")
    try:
        spots = pd.read_csv(path, sep="\t")
    except _TEXT_ERRORS as err:
        raise SpatialDataError(f"{path}: not a readable spot file ({err})") from err
    missing = [c for c in ("x", "y", "pixel_x", "pixel_y") if c not in spots.columns]
    if missing:
        raise SpatialDataError(
            f"{path}: missing column(s) {', '.join(missing)} "
            "(expected x y new_x new_y pixel_x pixel_y selected)"
        )
    _numeric_columns(spots, ("x", "y", "new_x", "new_y", "pixel_x", "pixel_y", "selected"), path)
    if "selected" in spots.columns:
        spots = spots[spots["selected"] == 1]
    ax, ay = spots["x"].to_numpy(np.float64), spots["y"].to_numpy(np.float64)
    if not (np.isfinite(ax).all() and np.isfinite(ay).all()):
        raise SpatialDataError(f"{path}: missing array coordinates x/y")
    spots = spots.copy()
    spots.index = pd.Index([f"{int(a)}x{int(b)}" for a, b in zip(ax, ay, strict=True)])
    _check_unique(spots.index, path)
    return spots


def _st_px_per_unit(spots: pd.DataFrame) -> float | None:
    """Pixels per ST array step from a least-squares affine fit of pixel vs. array coords."""
    ax = spots["new_x"] if "new_x" in spots else spots["x"]
    ay = spots["new_y"] if "new_y" in spots else spots["y"]
    A = np.column_stack([ax, ay, np.ones(len(spots))]).astype(np.float64)
    P = spots[["pixel_x", "pixel_y"]].to_numpy(np.float64)
    ok = np.isfinite(A).all(axis=1) & np.isfinite(P).all(axis=1)
    if ok.sum() < 3 or np.linalg.matrix_rank(A[ok]) < 3:
        return None
    coef, *_ = np.linalg.lstsq(A[ok], P[ok], rcond=None)
    lin = coef[:2].T  # 2x2: pixel = lin @ array + t
    return float(np.sqrt(abs(np.linalg.det(lin))))


def read_legacy_st(
    counts: str | Path,
    spots: str | Path,
    *,
    image: str | Path | None = None,
    mpp: float | None = None,
    library_id: str | None = None,
    images: bool = True,
) -> AnnData:
    """Read a legacy Spatial Transcriptomics section (her2st layout).

    Parameters
    ----------
    counts
        ``<s>.tsv[.gz]``: spots x genes raw counts, rows named ``"<x>x<y>"`` (array coords).
    spots
        ``<s>_selection.tsv`` with columns ``x y new_x new_y pixel_x pixel_y selected``;
        rows with ``selected == 1`` are joined to the counts on ``f"{x}x{y}"``.
    image
        The H&E the pixel coordinates refer to (becomes ``slide_path``); optional.
    mpp
        Microns per pixel; default: estimated from the spot grid (least-squares fit of pixel
        against array coordinates, 200 µm pitch).
    library_id
        Key under ``uns['spatial']`` (default: the counts file name without suffixes).
    images
        Store a <= 2000 px overview of ``image`` in ``uns['spatial']`` for ``scanpy.pl.spatial``.

    Returns
    -------
    AnnData in the napari-hinge convention; ``obs`` has ``array_x``, ``array_y``.
    """
    counts, spots_path = Path(counts), Path(spots)
    X, ids, var = _read_st_counts(counts)
    spots_df = _read_st_spots(spots_path)
    keep = _match(ids, spots_df.index, counts_file=counts, positions_file=spots_path)
    X, ids = X[keep], ids[keep]
    matched = spots_df.loc[ids]

    meta: dict = {"source": _abs(counts), "format": "legacy_st", "spots_path": _abs(spots_path)}
    if mpp is None:
        px_per_unit = _st_px_per_unit(spots_df)
        if px_per_unit is None or px_per_unit <= 0:
            _warn(f"{spots_path}: too few spots to estimate microns per pixel; unknown")
        else:
            mpp = check_mpp(LEGACY_ST_PITCH_UM / px_per_unit, spots_path,
                            "pixel_x/pixel_y (pixel size estimated from the 200 µm spot grid)")
            meta["mpp_estimated_from"] = "spot grid (200 um pitch)"
    else:
        mpp = positive_number(mpp, counts, "mpp")
    if mpp is not None:
        meta["microns_per_pixel"] = float(mpp)
        meta["spot_diameter_px"] = LEGACY_ST_SPOT_UM / float(mpp)

    if library_id is None:
        library_id = counts.name.split(".")[0]
    obs = pd.DataFrame(
        {"array_x": matched["x"].to_numpy(int), "array_y": matched["y"].to_numpy(int)},
        index=ids,
    )
    if "total_counts" in matched:
        # written by scripts/make_sample_data.py: library size over all genes of the source,
        # for normalising a gene subset exactly as the full table would be
        obs[LIBRARY_SIZE_KEY] = matched["total_counts"].to_numpy(np.float64)
    adata = AnnData(X=X, obs=obs, var=var)
    adata.obsm[SPATIAL_KEY] = matched[["pixel_x", "pixel_y"]].to_numpy(np.float64)

    image_shape = None
    if image is not None:
        image = Path(image)
        image_shape = _image_shape(image)
        meta["slide_path"] = _abs(image)
        if images:
            try:
                ov, scale = _overview(image)
            except Exception as err:  # noqa: BLE001 - overview is for plotting only
                _warn(f"{image}: no overview image for scanpy.pl.spatial ({err})")
            else:
                adata.uns["spatial"] = {
                    library_id: {
                        "images": {"hires": ov},
                        "scalefactors": {
                            "tissue_hires_scalef": scale,
                            "spot_diameter_fullres": meta.get("spot_diameter_px", 1.0),
                        },
                        "metadata": {"source": str(image)},
                    }
                }
    adata.uns[META_KEY] = meta
    return validate_spatial(
        adata,
        source=counts,
        image_shape=image_shape,
        counts_source=counts,
        coords_source=spots_path,
        image_source=image,
    )


def _her2st_files(folder: Path, section: str) -> dict[str, Path | None]:
    """Locate one section's files in the flat layout or in the almaan/her2st repo layout."""
    folder = Path(folder)
    layouts = [
        (folder / "counts", folder / "spots", folder / "images", folder / "pathology_labels"),
        (
            folder / "data" / "ST-cnts",
            folder / "data" / "ST-spotfiles",
            folder / "data" / "ST-imgs",
            folder / "data" / "ST-pat" / "lbl",
        ),
    ]
    for cdir, sdir, idir, ldir in layouts:
        counts = _find(cdir, f"{section}.tsv.gz", f"{section}.tsv")
        if counts is None:
            continue
        image = None
        if idir.is_dir():
            cands = sorted(idir.glob(f"{section}_*.jp*g")) + sorted(idir.glob(f"{section}.jp*g"))
            # repo layout: ST-imgs/<patient>/<section>/<name>.jpg
            cands += sorted(idir.glob(f"{section[0]}/{section}/*.jp*g"))
            image = cands[0] if cands else None
        return {
            "counts": counts,
            "spots": _find(sdir, f"{section}_selection.tsv", f"{section}_selection.tsv.gz")
            or sdir / f"{section}_selection.tsv",
            "image": image,
            "labels": _find(ldir, f"{section}_labeled_coordinates.tsv"),
        }
    sections = list_her2st_sections(folder)
    raise FileNotFoundError(
        f"{folder}: no counts for section {section!r} "
        f"(available: {', '.join(sections) if sections else 'none'})"
    )


def list_her2st_sections(folder: str | Path, *, with_image: bool = False) -> list[str]:
    """Sections of a her2st-layout folder that have both a count table and a spot file.

    Parameters
    ----------
    folder
        The her2st-layout folder (flat or the almaan/her2st repository layout).
    with_image
        Only the sections with an H&E image (looked up by name; no count table is read).
    """
    folder = Path(folder)
    out = []
    for cdir, sdir in (
        (folder / "counts", folder / "spots"),
        (folder / "data" / "ST-cnts", folder / "data" / "ST-spotfiles"),
    ):
        if not cdir.is_dir():
            continue
        for f in cdir.iterdir():
            if f.name.endswith((".tsv.gz", ".tsv")):
                s = f.name.split(".")[0]
                if (sdir / f"{s}_selection.tsv").is_file():
                    out.append(s)
    out = sorted(set(out))
    if with_image:
        out = [s for s in out if _her2st_files(folder, s)["image"] is not None]
    return out


def read_her2st(
    folder: str | Path,
    section: str,
    *,
    mpp: float | None = None,
    images: bool = True,
) -> AnnData:
    """Read one section of a her2st-layout folder (counts/, spots/, images/, pathology_labels/).

    The H&E is optional (sections without one are expression-only). Pathologist labels, where
    the folder has them, go to ``obs['pathology_label']`` (matched on array coordinates).
    """
    files = _her2st_files(Path(folder), section)
    adata = read_legacy_st(
        files["counts"],
        files["spots"],
        image=files["image"],
        mpp=mpp,
        library_id=section,
        images=images,
    )
    if files["labels"] is not None:
        spot_ids = _read_st_spots(Path(files["spots"])).index
        _add_pathology_labels(adata, files["labels"], spot_ids)
    adata.uns[META_KEY]["section"] = section
    return adata


def _add_pathology_labels(adata: AnnData, path: Path, spot_ids: pd.Index) -> None:
    try:
        lab = pd.read_csv(path, sep="\t")
    except _TEXT_ERRORS as err:
        raise SpatialDataError(f"{path}: not a readable label file ({err})") from err
    if not {"x", "y", "label"} <= set(lab.columns):
        raise SpatialDataError(f"{path}: expected columns x, y, label")
    _numeric_columns(lab, ("x", "y"), path)
    # x, y are the spot file's new_x/new_y (sub-step array coordinates): rounding gives x, y.
    ok = np.isfinite(lab["x"].to_numpy(float)) & np.isfinite(lab["y"].to_numpy(float))
    n_nocoord = int((~ok).sum())
    lab = lab[ok]
    keys = pd.Index([f"{round(a)}x{round(b)}" for a, b in zip(lab["x"], lab["y"], strict=True)])
    mapping = pd.Series(lab["label"].astype(str).to_numpy(), index=keys)
    mapping = mapping[~mapping.index.duplicated()]
    labels = mapping.reindex(adata.obs_names)
    # labels of selected spots without counts are expected; labels of no spot at all are not
    n_nospot = int((~mapping.index.isin(spot_ids)).sum())
    if n_nocoord or n_nospot:
        _warn(
            f"{path}: skipped {n_nocoord} label row(s) without coordinates and {n_nospot} "
            f"matching no selected spot; {int(labels.notna().sum())} of {adata.n_obs} spots "
            "labelled"
        )
    adata.obs["pathology_label"] = pd.Categorical(labels.to_numpy())
    adata.uns[META_KEY]["labels_path"] = _abs(path)


# --------------------------------------------------------------------------------------------
# h5ad
# --------------------------------------------------------------------------------------------


def read_h5ad(path: str | Path) -> AnnData:
    """Read any ``.h5ad`` with ``obsm['spatial']`` into the convention.

    An existing ``uns['napari_hinge']`` is kept as written. Otherwise it is filled from scanpy's
    ``uns['spatial'][library]['scalefactors']`` (coordinates then in full-resolution pixels)
    where present; an unknown pixel size is left out with a warning. When ``X`` is not integral
    but ``layers['counts']`` is, the counts become ``X`` and the old ``X`` moves to
    ``layers['X_original']``.
    """
    import anndata as ad

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"h5ad file not found: {path}")
    try:
        adata = ad.read_h5ad(path)
    except Exception as err:
        raise SpatialDataError(f"{path}: not a readable .h5ad file ({err})") from err
    if SPATIAL_KEY not in adata.obsm:
        raise SpatialDataError(
            f"{path}: no obsm['{SPATIAL_KEY}'] (spot coordinates); obsm has "
            f"{list(adata.obsm.keys()) or 'nothing'}"
        )
    try:
        adata.obsm[SPATIAL_KEY] = np.asarray(adata.obsm[SPATIAL_KEY], dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise SpatialDataError(f"{path}: obsm['{SPATIAL_KEY}'] must hold numbers ({err})",
                               path=path, field=f"obsm['{SPATIAL_KEY}']") from err
    for name, values in (("X", adata.X), *((f"layers[{k!r}]", v) for k, v in adata.layers.items())):
        kind = (values.data if sp.issparse(values) else np.asarray(values)).dtype.kind
        if kind not in "biuf":
            raise SpatialDataError(f"{path}: {name} must hold numbers (counts), got "
                                   f"{'text' if kind in 'OSU' else 'dtype kind ' + kind}",
                                   path=path, field=name)

    if not _is_integral(adata.X):
        counts = adata.layers.get("counts") if "counts" in adata.layers else None
        if counts is not None and _is_integral(counts):
            _warn(
                f"{path}: X is not raw counts; using layers['counts'] as X "
                "(the old X is in layers['X_original'])"
            )
            adata.layers["X_original"] = adata.X
            adata.X = counts
        else:
            _warn(
                f"{path}: X does not look like raw counts (non-integer values) and there is "
                "no integral layers['counts']"
            )

    if META_KEY in adata.uns:
        meta = _checked_meta(adata.uns[META_KEY], path)
    else:
        meta = {"source": _abs(path), "format": "h5ad"}
        lib = adata.uns.get("spatial", {})
        sf = next(iter(lib.values())).get("scalefactors", {}) if len(lib) == 1 else {}
        if sf.get("spot_diameter_fullres"):
            meta["spot_diameter_px"] = float(sf["spot_diameter_fullres"])
            if sf.get("microns_per_pixel"):
                meta["microns_per_pixel"] = float(sf["microns_per_pixel"])
            else:
                meta["microns_per_pixel"] = VISIUM_SPOT_UM / float(sf["spot_diameter_fullres"])
                _warn(
                    f"{path}: microns per pixel not stored; assumed Visium (55 um spots): "
                    f"{meta['microns_per_pixel']:.3f} um/px"
                )
        else:
            _warn(
                f"{path}: microns per pixel unknown (no uns['{META_KEY}'] and no scanpy "
                "scalefactors); spot diameter estimated from the spot spacing"
            )
            d = _nn_spacing(adata.obsm[SPATIAL_KEY])
            if d:
                meta["spot_diameter_px"] = d * VISIUM_SPOT_UM / VISIUM_PITCH_UM
    adata.uns[META_KEY] = meta
    # the slide the coordinates refer to, when it is still where it was: check them against it
    image_shape = None
    slide = meta.get("slide_path")
    if slide:
        if Path(slide).is_file():
            image_shape = _image_shape(Path(slide))
        else:
            _warn(f"{path}: slide_path {slide} not found (moved?); coordinates not checked")
    return validate_spatial(adata, source=path, image_shape=image_shape, image_source=slide)


def _checked_meta(meta, path: Path) -> dict:
    """A stored ``uns['napari_hinge']``: pixel size and spot diameter real numbers, a relative
    ``slide_path`` resolved against the h5ad's folder (older files stored it as typed)."""
    if not isinstance(meta, dict):
        raise SpatialDataError(f"{path}: uns['{META_KEY}'] must be a dict, got "
                               f"{type(meta).__name__}", path=path)
    meta = dict(meta)
    field = f"uns['{META_KEY}']"
    if meta.get("microns_per_pixel") is not None:
        meta["microns_per_pixel"] = check_mpp(np.asarray(meta["microns_per_pixel"]).item()
                                              if np.ndim(meta["microns_per_pixel"]) == 0
                                              else meta["microns_per_pixel"], path,
                                              f"{field}['microns_per_pixel']")
    if meta.get("spot_diameter_px") is not None:
        value = meta["spot_diameter_px"]
        meta["spot_diameter_px"] = positive_number(
            np.asarray(value).item() if np.ndim(value) == 0 else value, path,
            f"{field}['spot_diameter_px']")
    slide = meta.get("slide_path")
    if slide is not None:
        if not isinstance(slide, str):
            raise SpatialDataError(f"{path}: {field}['slide_path'] must be a path, got "
                                   f"{slide!r}", path=path)
        if not Path(slide).is_absolute():
            beside, typed = path.parent / slide, Path(slide)
            meta["slide_path"] = _abs(typed if typed.exists() and not beside.exists()
                                      else beside)
    return meta


def _nn_spacing(xy: np.ndarray) -> float | None:
    xy = np.asarray(xy, dtype=np.float64)[:, :2]
    xy = xy[np.isfinite(xy).all(axis=1)]
    if len(xy) < 2:
        return None
    from scipy.spatial import cKDTree

    d, _ = cKDTree(xy).query(xy, k=2)
    return float(np.median(d[:, 1]))


# --------------------------------------------------------------------------------------------
# dispatch
# --------------------------------------------------------------------------------------------


def detect_spatial_format(path: str | Path) -> str | None:
    """Which reader handles ``path``: 'spaceranger', 'legacy_st', 'h5ad' or None.

    Cheap: it only looks at names and folder listings (for napari's reader hook).
    """
    p = Path(path)
    name = p.name.lower()
    if p.is_file():
        if name.endswith(".h5ad"):
            return "h5ad"
        if name == "filtered_feature_bc_matrix.h5" and (p.parent / "spatial").is_dir():
            return "spaceranger"
        if name.endswith((".tsv.gz", ".tsv")) and not name.endswith("_selection.tsv"):
            spots = p.parent.parent / ("spots" if p.parent.name == "counts" else "ST-spotfiles")
            if (spots / f"{p.name.split('.')[0]}_selection.tsv").is_file():
                return "legacy_st"
        return None
    if not p.is_dir():
        return None
    for root in (p, p / "outs", p.parent if name == "spatial" else p):
        if (root / "spatial").is_dir() and _has_counts(root):
            return "spaceranger"
        if (root / "binned_outputs").is_dir():
            return "spaceranger"
    if list_her2st_sections(p):
        return "legacy_st"
    return None


_READER_OPTIONS = {
    "spaceranger": {"slide", "mpp", "library_id", "bin_size"},
    "legacy_st": {"section", "mpp", "images"},
    "h5ad": set(),
}


def read_spatial(path: str | Path, **kwargs) -> AnnData:
    """Read any supported spatial dataset, dispatching on :func:`detect_spatial_format`.

    Parameters
    ----------
    path
        A Space Ranger ``outs`` folder, a ``.h5ad``, a her2st-layout folder (pass
        ``section=``; optional when it holds one section) or one of its ``counts/<s>.tsv.gz``.
    **kwargs
        Options of the matching reader: ``slide``, ``mpp``, ``library_id``, ``bin_size``
        (Space Ranger); ``section``, ``mpp``, ``images`` (legacy ST); none for ``.h5ad``.
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"spatial data not found: {p}")
    fmt = detect_spatial_format(p)
    if fmt is None:
        raise SpatialDataError(
            f"{p}: not a recognised spatial dataset (expected a Space Ranger outs/ folder, a "
            "her2st-layout folder with counts/ and spots/, or a .h5ad file)"
        )
    unknown = set(kwargs) - _READER_OPTIONS[fmt]
    if unknown:
        raise SpatialDataError(
            f"{p}: option(s) {', '.join(sorted(unknown))} do not apply to {fmt} data "
            f"(options: {', '.join(sorted(_READER_OPTIONS[fmt])) or 'none'})"
        )
    if fmt == "spaceranger":
        return read_spaceranger(p, **kwargs)
    if fmt == "h5ad":
        return read_h5ad(p)
    if p.is_file():  # legacy_st: one section's count table
        section = p.name.split(".")[0]
        root = p.parent.parent
        if p.parent.name == "ST-cnts":
            root = root.parent
        kwargs.pop("section", None)
        return read_her2st(root, section, **kwargs)
    section = kwargs.pop("section", None)
    if section is None:
        sections = list_her2st_sections(p)
        if len(sections) != 1:
            raise SpatialDataError(
                f"{p}: holds {len(sections)} sections ({_first(sections, 10)}); pass section=..."
            )
        section = sections[0]
    return read_her2st(p, section, **kwargs)


# --------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------


def summary(adata: AnnData) -> str:
    """A few lines describing a spatial AnnData (what was read, where, at what pixel size)."""
    meta = dict(adata.uns.get(META_KEY, {}))
    xy = np.asarray(adata.obsm[SPATIAL_KEY])
    mpp = meta.get("microns_per_pixel")
    lines = [
        f"format      {meta.get('format', '?')} ({meta.get('source', '?')})",
        f"spots       {adata.n_obs}",
        f"genes       {adata.n_vars}",
        f"UMI/spot    median {np.median(np.asarray(adata.X.sum(axis=1)).ravel()):.0f}",
        f"slide       {meta.get('slide_path', '(none)')}",
        f"um/px       {mpp:.4g}" if mpp else "um/px       unknown",
        f"spot        {meta.get('spot_diameter_px', float('nan')):.1f} px across",
        f"x range     {xy[:, 0].min():.1f} .. {xy[:, 0].max():.1f}",
        f"y range     {xy[:, 1].min():.1f} .. {xy[:, 1].max():.1f}",
    ]
    extra = [c for c in adata.obs.columns if adata.obs[c].dtype.name == "category"]
    if extra:
        lines.append(f"annotations {', '.join(extra)}")
    return "\n".join(lines)
