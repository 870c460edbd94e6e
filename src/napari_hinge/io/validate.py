"""Validation every spatial reader ends with, and the checks and messages they share.

Problems that make the data unusable raise :class:`SpatialDataError` (an
:class:`~napari_hinge.errors.InputError`) naming the file; problems that leave it usable warn
with a :class:`SpatialDataWarning` that says how many spots are affected.
"""

from __future__ import annotations

import gzip
import os
import warnings
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from napari_hinge._convention import SPATIAL_KEY
from napari_hinge.errors import InputError

__all__ = ["SpatialDataError", "SpatialDataWarning", "validate_spatial"]

# Fraction of spots outside the image above which the coordinates are judged wrong (error).
_MAX_OUTSIDE_FRACTION = 0.5
# Fraction of count barcodes that must find a position, else the files do not belong together.
_MIN_MATCH_FRACTION = 0.5


class SpatialDataError(InputError):
    """Spatial data that cannot be used as it is (the message names the file)."""


# What reading a damaged text or gzip file raises (a truncated .gz: EOFError or zlib.error).
TEXT_ERRORS = (ValueError, OSError, EOFError, zlib.error, UnicodeDecodeError,
                pd.errors.ParserError)


def numeric_columns(df: pd.DataFrame, columns, path) -> None:
    """Raise naming the column and the first rows whose values are not numbers."""
    for c in columns:
        if c not in df.columns or pd.api.types.is_numeric_dtype(df[c]):
            continue
        col = df[c]
        bad = pd.to_numeric(col, errors="coerce").isna() & col.notna()
        rows = list(col.index[bad.to_numpy()]) or list(col.index[:1])
        raise SpatialDataError(
            f"{path}: column {c!r} must hold numbers; not a number in {int(bad.sum())} row(s), "
            f"e.g. {first([f'{r}: {col[r]!r}' for r in rows], 3)}", path=path)


class SpatialDataWarning(UserWarning):
    """Spatial data that is usable but has a problem worth knowing (with a count)."""


def warn(message: str) -> None:
    warnings.warn(message, SpatialDataWarning, stacklevel=3)


def first(items, n: int = 5) -> str:
    items = [str(i) for i in items]
    more = f" (and {len(items) - n} more)" if len(items) > n else ""
    return ", ".join(items[:n]) + more


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
            f"{counts_source}: {len(dup)} duplicated barcode(s)/spot id(s): {first(dup)}"
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
            f"non-finite coordinates: {first(names[bad_xy])}"
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
            warn(detail + "; they are kept (not clipped)")
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
                f"{len(rows)} spot(s): {first(names[rows])}"
            )
    negative = data < 0
    if negative.any():
        rows = rows_of(negative)
        raise SpatialDataError(
            f"{counts_source}: {int(negative.sum())} negative count value(s) in {len(rows)} "
            f"spot(s) (raw counts cannot be negative): {first(names[rows])}"
        )


def is_integral(X) -> bool:
    data = X.data if sp.issparse(X) else np.asarray(X).ravel()
    if data.dtype.kind in "biu":
        return True
    sample = data[:200_000]
    return bool(np.all(np.isfinite(sample)) and np.all(sample == np.round(sample)))


def check_unique(ids: pd.Index, file) -> None:
    if ids.has_duplicates:
        dup = ids[ids.duplicated()].unique()
        raise SpatialDataError(
            f"{file}: {len(dup)} duplicated barcode(s)/spot id(s): {first(dup)}"
        )


def match_ids(count_ids: pd.Index, pos_ids: pd.Index, *, counts_file, positions_file) -> np.ndarray:
    """Boolean mask over ``count_ids`` of spots that have a position; raise/warn on mismatch."""
    has_pos = count_ids.isin(pos_ids)
    n_match = int(has_pos.sum())
    n = len(count_ids)
    if n and n_match < _MIN_MATCH_FRACTION * n:
        raise SpatialDataError(
            f"only {n_match} of {n} spots in {counts_file} have a position in {positions_file}: "
            f"the files do not belong together (count ids e.g. {first(count_ids[:3])}; "
            f"position ids e.g. {first(pos_ids[:3])})"
        )
    if n_match < n:
        warn(
            f"{n - n_match} of {n} spots in {counts_file} have no position in {positions_file} "
            f"and were dropped: {first(count_ids[~has_pos])}"
        )
    return np.asarray(has_pos)


def abs_path(path) -> str:
    # absolute, symlinks kept: the name the user gave, valid from any working folder
    return os.path.abspath(path)


def open_text(path: Path):
    return gzip.open(path, "rt") if path.suffix == ".gz" else open(path)


def find_file(folder: Path, *names: str) -> Path | None:
    for name in names:
        if (folder / name).exists():
            return folder / name
    return None
