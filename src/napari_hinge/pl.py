"""Spatial plots for notebooks, on matplotlib: spots over their H&E at the right scale.

- :func:`spatial`: any per-spot values (or categories) drawn as discs of the true spot
  diameter over the slide the spots belong to;
- :func:`genes`: measured expression, log1p CP10k (:func:`napari_hinge.pp.expression_values`);
- :func:`predictions`: a :func:`napari_hinge.tl.predict` result, mean and uncertainty;
- :func:`domains`: :func:`napari_hinge.tl.domains` labels.

Placement follows the AnnData convention (:mod:`napari_hinge._convention`): ``obsm['spatial']``
holds (x, y) in level-0 pixels of ``uns['napari_hinge']['slide_path']``, pixel ``i`` centred at
``i`` (as napari draws it); a pyramid level of downsample ``d`` is drawn so that its pixel ``j``
covers level-0 ``[j d - 1/2, (j + 1) d - 1/2)``. Axes are in µm when the pixel size is known,
else in level-0 pixels. No Qt, no napari: matplotlib only (pyplot only when no ``ax`` is given).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ._convention import META_KEY, SPATIAL_KEY

#: Longest side, in screen pixels, of the slide region drawn under the spots: the smallest
#: pyramid level at least this large is read (and only the window around the spots).
MAX_SIDE = 1000


def _axes(ax, n: int = 1, *, ncols: int = 3, panel: float = 4.0):
    if ax is not None:
        return ax.figure, [ax] if n == 1 else list(np.ravel(ax))
    import matplotlib.pyplot as plt

    ncols = min(ncols, n)
    nrows = -(-n // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(panel * ncols, panel * nrows),
                             squeeze=False, layout="constrained")
    for extra in axes.ravel()[n:]:
        extra.set_visible(False)
    return fig, list(axes.ravel()[:n])


def slide_background(adata, *, margin_px: float | None = None, max_side: int = MAX_SIDE):
    """The H&E under the spots: ``(rgb, extent_px)`` with ``rgb`` an (H, W, 3) uint8 window of
    the smallest pyramid level whose window is at least ``max_side`` pixels long (or level 0)
    and ``extent_px`` its (left, right, bottom, top) edges in level-0 pixel coordinates; None
    when the AnnData names no slide."""
    from .io.slides import open_slide

    meta = adata.uns.get(META_KEY, {})
    if not meta.get("slide_path"):
        return None
    xy = np.asarray(adata.obsm[SPATIAL_KEY], dtype=np.float64)
    diameter = float(meta.get("spot_diameter_px", 0.0))
    margin = 2 * diameter if margin_px is None else float(margin_px)
    with open_slide(meta["slide_path"], mpp=meta.get("microns_per_pixel")) as slide:
        h0, w0 = slide.shape
        x0, y0 = np.maximum(xy.min(axis=0) - margin, 0)
        x1, y1 = np.minimum(xy.max(axis=0) + margin, (w0 - 1, h0 - 1))
        span = max(x1 - x0, y1 - y0, 1.0)
        level = 0
        for i, d in enumerate(slide.downsamples):
            if span / d >= max_side:
                level = i
        arr = slide.levels[level]
        dy, dx = h0 / arr.shape[0], w0 / arr.shape[1]  # per axis: a level may not be dyadic
        r0, r1 = int(np.floor(y0 / dy)), int(np.ceil((y1 + 1) / dy))
        c0, c1 = int(np.floor(x0 / dx)), int(np.ceil((x1 + 1) / dx))
        rgb = np.asarray(arr[r0:r1, c0:c1, :3])
    extent = (c0 * dx - 0.5, c1 * dx - 0.5, r1 * dy - 0.5, r0 * dy - 0.5)
    return rgb, extent


def spatial(adata, values=None, *, ax=None, image: bool = True, categorical: bool | None = None,
            cmap: str | None = None, vmin: float | None = None, vmax: float | None = None,
            title: str | None = None, label: str | None = None, alpha: float = 0.85,
            colorbar: bool = True, max_side: int = MAX_SIDE, background=None):
    """Draw per-spot ``values`` (length n_obs; numbers, or categories) as discs of the true spot
    diameter over the slide.

    Parameters
    ----------
    adata
        Spots in the AnnData convention (``obsm['spatial']``, ``uns['napari_hinge']``).
    values
        One value per spot; None draws the spots in one colour. Strings or a pandas
        Categorical are drawn as categories with a legend (``categorical`` forces it).
    ax
        A matplotlib Axes (default: a new figure through pyplot).
    image
        Draw the H&E under the spots (when the AnnData names its slide).
    cmap, vmin, vmax
        Colour map and limits of numeric values (default magma, 1st-99th percentile).
    label
        Colorbar title (a gene and its unit).
    background
        A precomputed :func:`slide_background` (several panels of one section read it once).

    Returns
    -------
    The Axes.
    """
    import matplotlib as mpl
    import pandas as pd
    from matplotlib.collections import EllipseCollection

    from ._layers import robust_limits

    fig, (ax,) = _axes(ax)
    meta = adata.uns.get(META_KEY, {})
    mpp = meta.get("microns_per_pixel")
    unit = float(mpp) if mpp else 1.0
    xy = np.asarray(adata.obsm[SPATIAL_KEY], dtype=np.float64)
    diameter = float(meta.get("spot_diameter_px", 10.0))
    if image:
        background = slide_background(adata, max_side=max_side) if background is None \
            else background
        if background is not None:
            rgb, extent = background
            ax.imshow(rgb, extent=tuple(e * unit for e in extent), interpolation="antialiased")
    discs = EllipseCollection(widths=diameter * unit, heights=diameter * unit, angles=0.0,
                              units="xy", offsets=xy * unit, offset_transform=ax.transData,
                              edgecolors="none", alpha=alpha)
    handles = None
    if values is None:
        discs.set_facecolor("tab:blue")
    else:
        series = pd.Series(values.to_numpy() if hasattr(values, "to_numpy") else values)
        if len(series) != len(xy):
            raise ValueError(f"{len(series)} values for {len(xy)} spots")
        if categorical is None:
            categorical = not pd.api.types.is_numeric_dtype(series)
        if categorical:
            cats = pd.Categorical(series)
            palette = mpl.colormaps[cmap or ("tab10" if len(cats.categories) <= 10
                                             else "tab20")]
            table = {c: palette(i % palette.N) for i, c in enumerate(cats.categories)}
            discs.set_facecolor([table.get(c, (0, 0, 0, 0)) for c in cats])
            handles = [mpl.lines.Line2D([], [], ls="", marker="o", color=table[c], label=str(c))
                       for c in cats.categories]
        else:
            # The discs are the colour mapping itself (array, cmap, norm): the colorbar and
            # anyone reading the figure see the values drawn.
            v = series.to_numpy(np.float64)
            lo, hi = robust_limits(v)
            discs.set_array(v)
            discs.set_cmap(cmap or "magma")
            discs.set_norm(mpl.colors.Normalize(lo if vmin is None else vmin,
                                                hi if vmax is None else vmax))
            if colorbar:
                fig.colorbar(discs, ax=ax, shrink=0.7, label=label)
    ax.add_collection(discs)
    pad = diameter * unit
    lo_xy, hi_xy = xy.min(axis=0) * unit - pad, xy.max(axis=0) * unit + pad
    ax.set_xlim(lo_xy[0], hi_xy[0])
    ax.set_ylim(hi_xy[1], lo_xy[1])  # image rows grow downwards
    ax.set_aspect("equal")
    ax.set_xlabel("x (µm)" if mpp else "x (level-0 px)")
    ax.set_ylabel("y (µm)" if mpp else "y (level-0 px)")
    if handles:
        ax.legend(handles=handles, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False,
                  title=label)
    if title:
        ax.set_title(title)
    return ax


def genes(adata, genes: str | Sequence[str], *, ncols: int = 3, ax=None, image: bool = True,
          **kwargs):
    """Measured expression of ``genes`` (log1p counts per 10k, library size over all genes),
    one panel per gene. Returns the Figure."""
    from .pp import expression_values

    names = [genes] if isinstance(genes, str) else list(genes)
    values, missing = expression_values(adata, names)
    if missing:
        raise KeyError(f"not measured in this data: {', '.join(missing)}")
    fig, axes = _axes(ax, len(names), ncols=ncols)
    background = slide_background(adata) if image else None
    for i, (gene, axis) in enumerate(zip(names, axes, strict=True)):
        spatial(adata, values[:, i], ax=axis, image=image, background=background, title=gene,
                label="log1p(counts per 10k)", **kwargs)
    return fig


def predictions(adata, genes: str | Sequence[str], *, key: str = "hinge",
                uncertainty: bool = True, ax=None, image: bool = True, **kwargs):
    """A :func:`napari_hinge.tl.predict` result for ``genes``: the predicted mean and (with
    ``uncertainty``) its standard deviation, one row per gene. Returns the Figure."""
    if key not in adata.uns or f"{key}_mean" not in adata.obsm:
        raise KeyError(f"no prediction under {key!r}: run napari_hinge.tl.predict(adata, "
                       f"key_added={key!r}) first")
    names = [genes] if isinstance(genes, str) else list(genes)
    panel = list(adata.uns[key]["genes"])
    unknown = [g for g in names if g not in panel]
    if unknown:
        raise KeyError(f"not predicted under {key!r}: {', '.join(unknown)}")
    kinds = ["mean", "std"] if uncertainty else ["mean"]
    fig, axes = _axes(ax, len(names) * len(kinds), ncols=len(kinds))
    background = slide_background(adata) if image else None
    axes = iter(axes)
    for gene in names:
        j = panel.index(gene)
        for kind in kinds:
            spatial(adata, np.asarray(adata.obsm[f"{key}_{kind}"])[:, j], ax=next(axes),
                    image=image, background=background,
                    cmap="viridis" if kind == "std" else None,
                    title=f"{gene}: predicted {'sd' if kind == 'std' else 'mean'}",
                    label="log1p(counts per 10k)", **kwargs)
    return fig


def domains(adata, *, key: str = "domain", ax=None, image: bool = True, **kwargs):
    """:func:`napari_hinge.tl.domains` labels ``obs[key]``, one colour per domain with a
    legend. Returns the Axes."""
    if key not in adata.obs:
        raise KeyError(f"no obs[{key!r}]: run napari_hinge.tl.domains(adata, key_added={key!r}) "
                       "first")
    return spatial(adata, adata.obs[key], ax=ax, image=image, categorical=True,
                   title=kwargs.pop("title", f"domains ({key})"), label="domain", **kwargs)
