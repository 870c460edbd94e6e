"""Imaging-based platforms through spatialdata-io (optional: ``pip install
"napari-hinge[spatialdata]"``): 10x Xenium, Vizgen MERSCOPE and NanoString CosMx -> the AnnData
convention of :mod:`napari_hinge._convention`.

spatialdata-io reads the files (only the cell table: no transcripts, boundaries or images,
which this package does not use); on top stay the convention and the validation:

- ``X``: the cell x gene counts (CSR ``float32``), ``var_names`` unique gene symbols;
- ``obsm['spatial']``: cell centres in pixels of the platform's image (Xenium: the morphology
  image, ``pixel_size`` of ``experiment.xenium``; MERSCOPE: the mosaic images, through
  ``images/micron_to_mosaic_pixel_transform.csv``; CosMx: the global pixel frame of the
  slide), and ``uns['napari_hinge']['microns_per_pixel']`` that pixel's size, so that
  ``obsm['spatial'] * microns_per_pixel`` is in µm as for every other format;
- ``uns['napari_hinge']['spot_diameter_px']``: the median cell's diameter (from its area where
  the platform reports one, else :data:`CELL_DIAMETER_UM`);
- no ``slide_path``: the data are expression-only for the models here (an H&E registered to
  the cells can be given to the slide tools separately).

Visium HD is read natively by :func:`napari_hinge.io.spaceranger.read_spaceranger`
(``binned_outputs/square_<size>``), which needs no extra.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from napari_hinge._convention import META_KEY, SPATIAL_KEY, check_mpp, unique_var
from napari_hinge.errors import positive_number

from .validate import SpatialDataError, abs_path, validate_spatial

__all__ = ["read_cosmx", "read_merscope", "read_xenium"]

#: CosMx SMI pixel size (µm/px) of the global pixel frame (NanoString's documented value;
#: the exported files do not carry it).
COSMX_MPP = 0.12028
#: Cell diameter assumed when a platform gives no cell area (µm).
CELL_DIAMETER_UM = 10.0

EXTRA = 'pip install "napari-hinge[spatialdata]"'


def _spatialdata_io():
    try:
        with warnings.catch_warnings():  # its dependencies warn at import (pkg_resources, ...)
            warnings.simplefilter("ignore")
            import spatialdata_io
    except ImportError as err:
        raise ImportError(f"reading Xenium, MERSCOPE and CosMx needs spatialdata-io: {EXTRA}"
                          ) from err
    return spatialdata_io


def _read_table(reader: str, path: Path, **kwargs) -> AnnData:
    """The cell table of a spatialdata-io reader, its errors named by the folder."""
    read = getattr(_spatialdata_io(), reader)
    try:
        with warnings.catch_warnings():
            # about spatialdata's object model (the table annotates shapes we do not read),
            # deprecations inside spatialdata-io: nothing the user can act on
            for module in ("spatialdata", "spatialdata_io", "anndata", "legacy_api_wrap"):
                warnings.filterwarnings("ignore", module=module)
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            warnings.filterwarnings("ignore", message="Transforming to str index")
            sdata = read(path, **kwargs)
        return sdata.tables["table"]
    except (FileNotFoundError, PermissionError):
        raise
    except Exception as err:  # spatialdata-io raises what pandas, h5py, json, ... raise
        raise SpatialDataError(f"{path}: not a readable {reader} folder "
                               f"({type(err).__name__}: {err})", path=path) from err


def _convention(table: AnnData, xy_px, *, mpp: float, cell_diameter_um, fmt: str,
                source: Path, obs_drop=(), names=None) -> AnnData:
    """The convention over a spatialdata-io table: counts, unique gene names, positions in
    pixels of ``mpp``, the metadata; then validated."""
    X = table.X
    X = sp.csr_matrix(X, dtype=np.float32) if sp.issparse(X) else sp.csr_matrix(
        np.asarray(X, dtype=np.float32))
    obs = table.obs.drop(columns=[c for c in obs_drop if c in table.obs.columns])
    obs.index = pd.Index(np.asarray(table.obs_names if names is None else names, dtype=str))
    gene_ids = table.var["gene_ids"].to_numpy() if "gene_ids" in table.var else None
    adata = AnnData(X=X, obs=obs, var=unique_var(gene_ids, table.var_names.to_numpy()))
    adata.obsm[SPATIAL_KEY] = np.asarray(xy_px, dtype=np.float64)
    diameter = np.nanmedian(cell_diameter_um) if np.size(cell_diameter_um) else np.nan
    if not np.isfinite(diameter) or diameter <= 0:
        diameter = CELL_DIAMETER_UM
    adata.uns[META_KEY] = {"microns_per_pixel": float(mpp),
                           "spot_diameter_px": float(diameter) / float(mpp),
                           "source": abs_path(source), "format": fmt}
    return validate_spatial(adata, source=source)


def _pixel_size(value, path: Path, field: str, override) -> float:
    if override is not None:
        return positive_number(override, path, "mpp")
    return check_mpp(value, path, field)


def _folder(path, what: str) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{what} folder not found: {path}")
    return path


def read_xenium(path: str | Path, *, mpp: float | None = None) -> AnnData:
    """Read a 10x Xenium output folder (``experiment.xenium``, ``cell_feature_matrix.h5``,
    ``cells.parquet``; XOA 2+ also ``cells.zarr.zip``): one observation per cell.

    ``obsm['spatial']`` is in morphology-image pixels (``pixel_size`` of
    ``experiment.xenium``, overridden by ``mpp``).
    """
    import json

    path = _folder(path, "Xenium")
    specs_file = path / "experiment.xenium"
    try:
        specs = json.loads(specs_file.read_text())
    except FileNotFoundError:
        raise
    except (ValueError, UnicodeDecodeError) as err:
        raise SpatialDataError(f"{specs_file}: not valid JSON ({err})", path=specs_file) from err
    if not isinstance(specs, dict):
        raise SpatialDataError(f"{specs_file}: expected a JSON object", path=specs_file)
    pixel = _pixel_size(specs.get("pixel_size"), specs_file, "pixel_size", mpp)
    table = _read_table("xenium", path, cells_boundaries=False, nucleus_boundaries=False,
                        cells_as_circles=False, cells_labels=False, nucleus_labels=False,
                        transcripts=False, morphology_mip=False, morphology_focus=False,
                        aligned_images=False, cells_table=True)
    xy_um = np.asarray(table.obsm[SPATIAL_KEY], dtype=np.float64)  # x/y_centroid, µm
    area = table.obs["cell_area"].to_numpy(np.float64) if "cell_area" in table.obs else []
    adata = _convention(table, xy_um / pixel, mpp=pixel, fmt="xenium", source=path,
                        cell_diameter_um=2 * np.sqrt(np.asarray(area) / np.pi),
                        obs_drop=("region",), names=table.obs["cell_id"].astype(str))
    return adata


def read_merscope(path: str | Path, *, mpp: float | None = None) -> AnnData:
    """Read a Vizgen MERSCOPE region folder (``cell_by_gene.csv``, ``cell_metadata.csv``,
    ``images/micron_to_mosaic_pixel_transform.csv``): one observation per cell, blank
    (negative-control) barcodes left out of ``X`` as spatialdata-io does.

    ``obsm['spatial']`` is in mosaic-image pixels (the transform's scale; ``mpp`` overrides
    the pixel size, not the transform).
    """
    path = _folder(path, "MERSCOPE")
    transform_file = path / "images" / "micron_to_mosaic_pixel_transform.csv"
    try:
        affine = np.loadtxt(transform_file)
    except FileNotFoundError:
        raise
    except (ValueError, OSError) as err:
        raise SpatialDataError(f"{transform_file}: not a 3x3 transform ({err})",
                               path=transform_file) from err
    if affine.shape != (3, 3) or not np.isfinite(affine).all():
        raise SpatialDataError(f"{transform_file}: expected a finite 3x3 transform, got shape "
                               f"{affine.shape}", path=transform_file)
    px_per_um = float(np.sqrt(abs(np.linalg.det(affine[:2, :2]))))
    pixel = _pixel_size(1.0 / px_per_um if px_per_um > 0 else 0.0, transform_file,
                        "micron_to_mosaic_pixel_transform", mpp)
    table = _read_table("merscope", path, transcripts=False, cells_boundaries=False,
                        mosaic_images=False)
    xy_um = np.asarray(table.obsm[SPATIAL_KEY], dtype=np.float64)  # center_x/y, µm
    xy_px = xy_um @ affine[:2, :2].T + affine[:2, 2]
    obs = table.obs
    width = (obs["max_x"] - obs["min_x"]).to_numpy(np.float64) \
        if {"min_x", "max_x"} <= set(obs.columns) else []
    adata = _convention(table, xy_px, mpp=pixel, fmt="merscope", source=path,
                        cell_diameter_um=width, obs_drop=("cells_region",))
    if "blank" in table.obsm:
        adata.obsm["blank"] = np.asarray(table.obsm["blank"], dtype=np.float32)
    return adata


def read_cosmx(path: str | Path, *, mpp: float | None = None) -> AnnData:
    """Read a NanoString CosMx flat-file export (``<id>_exprMat_file.csv``,
    ``<id>_metadata_file.csv``, ``<id>_fov_positions_file.csv``, ``CellComposite/``,
    ``CellLabels/``): one observation per cell, named ``<cell_ID>_<fov>``.

    ``obsm['spatial']`` is in the slide's global pixels (``CenterX/Y_global_px``) at
    :data:`COSMX_MPP` µm/px unless ``mpp`` says otherwise; ``obsm['local']`` keeps the
    positions within each field of view.
    """
    path = _folder(path, "CosMx")
    pixel = positive_number(COSMX_MPP if mpp is None else mpp, path, "mpp")
    table = _read_table("cosmx", path, transcripts=False)
    area = table.obs["Area"].to_numpy(np.float64) * pixel**2 if "Area" in table.obs else []
    adata = _convention(table, table.obsm["global"], mpp=pixel, fmt="cosmx", source=path,
                        cell_diameter_um=2 * np.sqrt(np.asarray(area) / np.pi),
                        obs_drop=("fov_labels",))
    adata.obsm["local"] = np.asarray(table.obsm[SPATIAL_KEY], dtype=np.float64)
    return adata


def detect(path: Path) -> str | None:
    """'xenium', 'merscope', 'cosmx' for a folder laid out as that platform writes it, from
    file names only (no extra needed to answer)."""
    if not path.is_dir():
        return None
    if (path / "experiment.xenium").is_file():
        return "xenium"
    if (path / "cell_by_gene.csv").is_file() and (path / "cell_metadata.csv").is_file():
        return "merscope"
    if any(path.glob("*_exprMat_file.csv")) and any(path.glob("*_metadata_file.csv")):
        return "cosmx"
    return None


READERS = {"xenium": read_xenium, "merscope": read_merscope, "cosmx": read_cosmx}
