"""Turn slides and spatial AnnData into napari layer data, without importing napari.

Every layer carries ``scale`` = microns per pixel and ``units`` = µm when the pixel
size is known, so layers of different resolutions overlay correctly; otherwise they
stay in pixels and say so in their metadata.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from napari_hinge._convention import META_KEY, SPATIAL_KEY, library_size

LayerData = tuple[Any, dict[str, Any], str]
UNITS = ("µm", "µm")


def physical_kwargs(mpp: float | None) -> dict[str, Any]:
    """scale/units for a layer whose data are level-0 pixels of ``mpp`` µm."""
    if mpp is None:
        return {"scale": (1.0, 1.0)}
    return {"scale": (mpp, mpp), "units": UNITS}


def slide_layer_data(slide, *, name: str | None = None) -> LayerData:
    """A lazy multiscale RGB Image layer for a :class:`~napari_hinge.io.slides.Slide`."""
    levels = slide.levels
    kwargs = {
        "name": name or Path(slide.path).name,
        "rgb": True,
        "multiscale": len(levels) > 1,
        # Explicit limits: napari must not compute them on a dask pyramid.
        "contrast_limits": (0, 255),
        "metadata": {
            "slide_path": str(slide.path),
            "microns_per_pixel": slide.microns_per_pixel,
        },
        **physical_kwargs(slide.microns_per_pixel),
    }
    data = levels if len(levels) > 1 else levels[0]
    return data, kwargs, "image"


def map_layer_data(m) -> LayerData:
    """Image layer(s) for a :class:`~napari_hinge.io.maps.MapImage`: one per channel, in µm
    (scale and translate from the file), so they land on their slide."""
    limits = []
    for channel in m.data:
        finite = channel[np.isfinite(channel)]
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
        limits.append((lo, hi if hi > lo else lo + 1.0))
    kwargs = {"scale": m.scale, "translate": m.translate, "units": UNITS,
              "colormap": "magma", "blending": "additive"}
    if len(m.data) == 1:
        return m.data[0], {**kwargs, "name": m.names[0], "contrast_limits": limits[0]}, "image"
    return m.data, {**kwargs, "channel_axis": 0, "name": list(m.names),
                    "contrast_limits": limits}, "image"


MAP_COLORMAPS = {"mean": "magma", "prior": "magma", "std": "viridis"}


def map_layer_kwargs(prediction, gene: str, which: str = "mean", *, name: str,
                     visible: bool = True, opacity: float = 0.7) -> dict[str, Any]:
    """Image-layer keywords for one gene's map of a
    :class:`~napari_hinge.hinge.slide_predict.SlidePrediction`: placed on its slide in µm,
    smoothly interpolated (a map is a sampled field, not a mosaic), NaN (transparent) off
    the tissue, the colorbar on for the visible one."""
    raster = prediction.raster(which, [gene])[0]
    return {"name": name, "colormap": MAP_COLORMAPS[which],
            "contrast_limits": robust_limits(raster), "opacity": opacity,
            "blending": "translucent", "visible": visible, "units": UNITS,
            "interpolation2d": "linear",
            "metadata": {"hinge": prediction.params, "gene": gene, "kind": which,
                         "unit": "log1p(counts per 10k)"},
            **prediction.placement}


def spot_features(adata, genes: list[str] = ()) -> pd.DataFrame:
    """Per-spot features: barcode, total counts (all genes), genes detected in ``X``, and the
    given genes' counts."""
    import scipy.sparse as sp

    totals = library_size(adata)
    detected = np.asarray((adata.X > 0).sum(axis=1)).ravel()
    features = pd.DataFrame(
        {"barcode": adata.obs_names.to_numpy(), "total_counts": totals, "n_genes": detected}
    )
    for gene in genes:
        column = adata[:, gene].X
        column = column.toarray() if sp.issparse(column) else np.asarray(column)
        features[gene] = column.ravel().astype(np.float32)
    return features


def spots_layer_data(adata, *, name: str = "spots", color_by: str | None = None) -> LayerData:
    """A Points layer of the measured spots at their true diameter.

    Points are (row, col) = (y, x) level-0 pixels scaled to µm; the AnnData itself rides
    in ``metadata['adata']`` so widgets can colour by any gene without copying the table.
    """
    meta = adata.uns.get(META_KEY, {})
    xy = np.asarray(adata.obsm[SPATIAL_KEY], dtype=float)
    kwargs: dict[str, Any] = {
        "name": name,
        "size": float(meta.get("spot_diameter_px", 10.0)),
        "features": spot_features(adata, [color_by] if color_by else []),
        "border_width": 0.0,
        "opacity": 0.85,
        "metadata": {"adata": adata, **{k: meta[k] for k in meta}},
        **physical_kwargs(meta.get("microns_per_pixel")),
    }
    if color_by:
        kwargs.update(face_color=color_by, face_colormap="magma")
    return xy[:, ::-1], kwargs, "points"


def spatial_layer_data(adata, *, name: str | None = None, color_by: str | None = None
                       ) -> list[LayerData]:
    """The slide (when the data has one) under its spots."""
    from napari_hinge.io.slides import open_slide

    meta = adata.uns.get(META_KEY, {})
    label = name or Path(str(meta.get("source", "spots"))).name
    layers: list[LayerData] = []
    slide_path = meta.get("slide_path")
    if slide_path:
        slide = open_slide(slide_path, mpp=meta.get("microns_per_pixel"))
        layers.append(slide_layer_data(slide, name=f"{label} H&E"))
    layers.append(spots_layer_data(adata, name=f"{label} spots", color_by=color_by))
    return layers


GENE_TRANSFORMS = ("log1p(counts per 10k)", "raw counts")


def gene_values(adata, gene: str, transform: str = GENE_TRANSFORMS[0]) -> np.ndarray:
    """One gene's values per spot, as shown on the spots: raw counts or log1p of counts
    per 10k (the library-size-normalised scale HINGE predicts on)."""
    import scipy.sparse as sp

    if gene not in adata.var_names:
        source = adata.uns.get(META_KEY, {}).get("source", "this data")
        raise KeyError(f"gene {gene!r} is not measured in {source}")
    if transform not in GENE_TRANSFORMS:
        raise ValueError(f"unknown transform {transform!r}; choose one of {GENE_TRANSFORMS}")
    column = adata[:, gene].X
    values = (column.toarray() if sp.issparse(column) else np.asarray(column)).ravel()
    values = values.astype(np.float64)
    if transform == "raw counts":
        return values
    from napari_hinge.pp import log1p_cp10k

    return log1p_cp10k(values[:, None], library_size(adata))[:, 0].astype(np.float64)


def robust_limits(values: np.ndarray, low: float = 1.0, high: float = 99.0) -> tuple[float, float]:
    """Contrast limits from quantiles, widened when the data are constant."""
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return 0.0, 1.0
    lo, hi = np.percentile(finite, [low, high])
    if hi <= lo:
        hi = lo + 1.0
    return float(lo), float(hi)
