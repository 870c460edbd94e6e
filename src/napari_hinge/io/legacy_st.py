"""Legacy Spatial Transcriptomics (the her2st layout: 100 µm spots on a 200 µm grid) -> the
AnnData convention of :mod:`napari_hinge._convention`.

A section is a spots x genes count table ``<s>.tsv[.gz]`` with rows named ``"<x>x<y>"`` (array
coordinates), a spot file ``<s>_selection.tsv`` with the pixel position of each spot, an
optional H&E, and optional pathologist labels; a folder holds them flat (``counts/``,
``spots/``, ``images/``, ``pathology_labels/``) or in the almaan/her2st repository layout.
"""

from __future__ import annotations

import io
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
    check_mpp,
    unique_var,
)
from napari_hinge.errors import positive_number

from .images import overview, read_image_shape
from .validate import (
    TEXT_ERRORS,
    SpatialDataError,
    abs_path,
    check_unique,
    find_file,
    first,
    match_ids,
    numeric_columns,
    open_text,
    validate_spatial,
    warn,
)

__all__ = ["list_her2st_sections", "read_her2st", "read_legacy_st"]


def _read_st_counts(path: Path) -> tuple[sp.csr_matrix, pd.Index, pd.DataFrame]:
    if not path.is_file():
        raise FileNotFoundError(f"counts file not found: {path}")
    try:
        fast = _read_st_counts_fast(path)
        if fast is not None:
            X, ids, genes = fast
            check_unique(ids, path)
            return X, ids, unique_var(None, genes)
        tab = pd.read_csv(path, sep="\t", index_col=0)
    except TEXT_ERRORS as err:
        raise SpatialDataError(f"{path}: not a readable tab-separated count table ({err})") from err
    if tab.shape[1] == 0 or tab.shape[0] == 0:
        raise SpatialDataError(f"{path}: empty count table (expected spots x genes)")
    kinds = tab.dtypes.map(lambda d: d.kind)
    non_numeric = list(tab.columns[~kinds.isin(list("biuf")).to_numpy()])
    if non_numeric:
        raise SpatialDataError(f"{path}: non-numeric count column(s): {first(non_numeric)}")
    ids = pd.Index(tab.index.astype(str))
    check_unique(ids, path)
    X = sp.csr_matrix(tab.to_numpy(np.float32))
    var = unique_var(None, tab.columns.astype(str))
    return X, ids, var


def _read_st_counts_fast(path: Path) -> tuple[sp.csr_matrix, pd.Index, pd.Index] | None:
    """Plain numeric spots x genes tables, ~2x faster than ``read_csv`` on 15k columns.

    Parses all values as one column (pandas' per-column cost dominates wide tables). Returns
    None for anything irregular (quotes, ragged rows, text), which the caller then reads with
    ``pd.read_csv`` for its exact error.
    """
    with open_text(path) as fh:
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
    except TEXT_ERRORS as err:
        raise SpatialDataError(f"{path}: not a readable spot file ({err})") from err
    missing = [c for c in ("x", "y", "pixel_x", "pixel_y") if c not in spots.columns]
    if missing:
        raise SpatialDataError(
            f"{path}: missing column(s) {', '.join(missing)} "
            "(expected x y new_x new_y pixel_x pixel_y selected)"
        )
    numeric_columns(spots, ("x", "y", "new_x", "new_y", "pixel_x", "pixel_y", "selected"), path)
    if "selected" in spots.columns:
        spots = spots[spots["selected"] == 1]
    ax, ay = spots["x"].to_numpy(np.float64), spots["y"].to_numpy(np.float64)
    if not (np.isfinite(ax).all() and np.isfinite(ay).all()):
        raise SpatialDataError(f"{path}: missing array coordinates x/y")
    spots = spots.copy()
    spots.index = pd.Index([f"{int(a)}x{int(b)}" for a, b in zip(ax, ay, strict=True)])
    check_unique(spots.index, path)
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
    keep = match_ids(ids, spots_df.index, counts_file=counts, positions_file=spots_path)
    X, ids = X[keep], ids[keep]
    matched = spots_df.loc[ids]

    meta: dict = {"source": abs_path(counts), "format": "legacy_st",
                  "spots_path": abs_path(spots_path)}
    if mpp is None:
        px_per_unit = _st_px_per_unit(spots_df)
        if px_per_unit is None or px_per_unit <= 0:
            warn(f"{spots_path}: too few spots to estimate microns per pixel; unknown")
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
        image_shape = read_image_shape(image)
        meta["slide_path"] = abs_path(image)
        if images:
            try:
                ov, scale = overview(image)
            except Exception as err:  # noqa: BLE001 - overview is for plotting only
                warn(f"{image}: no overview image for scanpy.pl.spatial ({err})")
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
    return validate_spatial(adata, source=counts, image_shape=image_shape, counts_source=counts,
                            coords_source=spots_path, image_source=image)


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
        counts = find_file(cdir, f"{section}.tsv.gz", f"{section}.tsv")
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
            "spots": find_file(sdir, f"{section}_selection.tsv", f"{section}_selection.tsv.gz")
            or sdir / f"{section}_selection.tsv",
            "image": image,
            "labels": find_file(ldir, f"{section}_labeled_coordinates.tsv"),
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
    except TEXT_ERRORS as err:
        raise SpatialDataError(f"{path}: not a readable label file ({err})") from err
    if not {"x", "y", "label"} <= set(lab.columns):
        raise SpatialDataError(f"{path}: expected columns x, y, label")
    numeric_columns(lab, ("x", "y"), path)
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
        warn(
            f"{path}: skipped {n_nocoord} label row(s) without coordinates and {n_nospot} "
            f"matching no selected spot; {int(labels.notna().sum())} of {adata.n_obs} spots "
            "labelled"
        )
    adata.obs["pathology_label"] = pd.Categorical(labels.to_numpy())
    adata.uns[META_KEY]["labels_path"] = abs_path(path)
