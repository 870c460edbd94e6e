"""Any ``.h5ad`` with ``obsm['spatial']`` -> the AnnData convention of
:mod:`napari_hinge._convention` (files this package wrote, and scanpy's Visium layout)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import scipy.sparse as sp
from anndata import AnnData

from napari_hinge._convention import (
    META_KEY,
    SPATIAL_KEY,
    VISIUM_PITCH_UM,
    VISIUM_SPOT_UM,
    check_mpp,
)
from napari_hinge.errors import positive_number
from napari_hinge.geometry import spot_pitch_px

from .images import read_image_shape
from .validate import SpatialDataError, abs_path, is_integral, validate_spatial, warn

__all__ = ["read_h5ad"]


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

    if not is_integral(adata.X):
        counts = adata.layers.get("counts") if "counts" in adata.layers else None
        if counts is not None and is_integral(counts):
            warn(
                f"{path}: X is not raw counts; using layers['counts'] as X "
                "(the old X is in layers['X_original'])"
            )
            adata.layers["X_original"] = adata.X
            adata.X = counts
        else:
            warn(
                f"{path}: X does not look like raw counts (non-integer values) and there is "
                "no integral layers['counts']"
            )

    if META_KEY in adata.uns:
        meta = _checked_meta(adata.uns[META_KEY], path)
    else:
        meta = {"source": abs_path(path), "format": "h5ad"}
        lib = adata.uns.get("spatial", {})
        sf = next(iter(lib.values())).get("scalefactors", {}) if len(lib) == 1 else {}
        if sf.get("spot_diameter_fullres"):
            meta["spot_diameter_px"] = float(sf["spot_diameter_fullres"])
            if sf.get("microns_per_pixel"):
                meta["microns_per_pixel"] = float(sf["microns_per_pixel"])
            else:
                meta["microns_per_pixel"] = VISIUM_SPOT_UM / float(sf["spot_diameter_fullres"])
                warn(
                    f"{path}: microns per pixel not stored; assumed Visium (55 um spots): "
                    f"{meta['microns_per_pixel']:.3f} um/px"
                )
        else:
            warn(
                f"{path}: microns per pixel unknown (no uns['{META_KEY}'] and no scanpy "
                "scalefactors); spot diameter estimated from the spot spacing"
            )
            d = spot_pitch_px(adata.obsm[SPATIAL_KEY])
            if d:
                meta["spot_diameter_px"] = d * VISIUM_SPOT_UM / VISIUM_PITCH_UM
    adata.uns[META_KEY] = meta
    # the slide the coordinates refer to, when it is still where it was: check them against it
    image_shape = None
    slide = meta.get("slide_path")
    if slide:
        if Path(slide).is_file():
            image_shape = read_image_shape(Path(slide))
        else:
            warn(f"{path}: slide_path {slide} not found (moved?); coordinates not checked")
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
            meta["slide_path"] = abs_path(typed if typed.exists() and not beside.exists()
                                      else beside)
    return meta
