"""GUI-free rasterisation of spot domains into a label image, and a per-domain table.

Label value ``i + 1`` paints the i-th category of ``obs[key]``; 0 is background (no spot,
outside the tissue, or a spot without a domain). The napari widget shows the array as a
Labels layer with ``scale = 1 / scale`` over the slide's level 0.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy.spatial import cKDTree

from .._convention import META_KEY, SPATIAL_KEY, library_size
from ..pp import normalize_total


def _label_codes(adata, key: str) -> tuple[np.ndarray, pd.Index]:
    if key not in adata.obs:
        raise KeyError(f"AnnData has no obs['{key}']; run napari_hinge.tl.domains first")
    cat = pd.Categorical(adata.obs[key])
    codes = cat.codes.astype(np.int64) + 1  # NaN (code -1) becomes 0 = background
    return codes, cat.categories


def _dtype_for(n: int):
    if n <= np.iinfo(np.uint8).max:
        return np.uint8
    if n <= np.iinfo(np.uint16).max:
        return np.uint16
    raise ValueError(f"{n} domains do not fit a uint16 label image")


def _coords(adata, scale: float) -> np.ndarray:
    if SPATIAL_KEY not in adata.obsm:
        raise KeyError(f"AnnData has no obsm['{SPATIAL_KEY}'] (spot coordinates)")
    xy = np.asarray(adata.obsm[SPATIAL_KEY], dtype=np.float64)[:, :2] * float(scale)
    if not np.isfinite(xy).all():
        raise ValueError("some spots have missing (NaN) coordinates")
    return xy


def spot_diameter(adata) -> float:
    d = adata.uns.get(META_KEY, {}).get("spot_diameter_px")
    if d is None or not np.isfinite(d) or d <= 0:
        raise KeyError(
            f"uns['{META_KEY}']['spot_diameter_px'] is missing; read the data with "
            "napari_hinge.io so the spot size is known"
        )
    return float(d)


def domains_to_labels(
    adata,
    image_shape: tuple[int, ...],
    *,
    key: str = "domain",
    scale: float = 1.0,
    mode: str = "disc",
    tissue_mask: np.ndarray | None = None,
    max_distance: float | None = None,
    chunk: int = 256,
) -> np.ndarray:
    """Paint ``obs[key]`` as a label image of shape ``image_shape[:2]`` (rows, cols).

    Parameters
    ----------
    adata
        Spots with ``obsm['spatial']`` (x, y in level-0 px) and ``obs[key]``.
    image_shape
        Shape of the output raster; its pixel (r, c) covers level-0 point (c, r) / scale.
    scale
        Raster pixels per level-0 pixel (e.g. 0.25 for a raster at a quarter of level 0).
    mode
        'disc': each spot a disc of its true diameter (``uns['napari_hinge']
        ['spot_diameter_px']``); 'voronoi': every pixel takes its nearest spot's domain, up to
        ``max_distance`` raster px (default 1.5 spot diameters) and inside ``tissue_mask``.
    tissue_mask
        Optional boolean array of ``image_shape``; pixels outside stay 0 (both modes).

    Returns
    -------
    uint8 array (uint16 beyond 255 domains); value i + 1 is the i-th category of obs[key].
    """
    shape = tuple(int(s) for s in image_shape[:2])
    if len(shape) != 2 or min(shape) < 1:
        raise ValueError(f"image_shape must give (rows, cols), got {image_shape}")
    if scale <= 0:
        raise ValueError(f"scale must be > 0, got {scale}")
    codes, cats = _label_codes(adata, key)
    out = np.zeros(shape, dtype=_dtype_for(len(cats)))
    xy = _coords(adata, scale)
    radius = spot_diameter(adata) * scale / 2.0
    if tissue_mask is not None:
        tissue_mask = np.asarray(tissue_mask, dtype=bool)
        if tissue_mask.shape != shape:
            raise ValueError(f"tissue_mask has shape {tissue_mask.shape}, expected {shape}")
    if mode == "disc":
        r = int(np.ceil(radius)) + 1
        oy, ox = np.mgrid[-r : r + 1, -r : r + 1]
        oy, ox = oy.ravel(), ox.ravel()
        keep = codes > 0
        for start in range(0, int(keep.sum()), chunk):
            sel = np.flatnonzero(keep)[start : start + chunk]
            # Pixel centres are at integer (col, row); a pixel is in if its centre is.
            cx, cy = np.floor(xy[sel, 0] + 0.5), np.floor(xy[sel, 1] + 0.5)
            px = cx[:, None] + ox[None, :]
            py = cy[:, None] + oy[None, :]
            inside = (px - xy[sel, 0, None]) ** 2 + (py - xy[sel, 1, None]) ** 2 <= radius**2
            inside &= (px >= 0) & (py >= 0) & (px < shape[1]) & (py < shape[0])
            lab = np.broadcast_to(codes[sel, None], px.shape)
            out[py[inside].astype(np.int64), px[inside].astype(np.int64)] = lab[inside]
        if tissue_mask is not None:
            out[~tissue_mask] = 0
        return out
    if mode == "voronoi":
        maxd = 3.0 * radius if max_distance is None else float(max_distance)
        tree = cKDTree(xy)
        cols = np.arange(shape[1], dtype=np.float64)
        rows_per = max(1, (1 << 20) // max(1, shape[1]))
        for r0 in range(0, shape[0], rows_per):
            rr = np.arange(r0, min(shape[0], r0 + rows_per), dtype=np.float64)
            gx, gy = np.meshgrid(cols, rr)
            pts = np.column_stack([gx.ravel(), gy.ravel()])
            block = np.zeros(pts.shape[0], dtype=out.dtype)
            want = np.ones(pts.shape[0], bool)
            if tissue_mask is not None:
                want = tissue_mask[r0 : r0 + rr.size].ravel()
            if want.any():
                dist, idx = tree.query(pts[want], distance_upper_bound=maxd)
                hit = np.isfinite(dist)
                vals = np.zeros(idx.size, dtype=out.dtype)
                vals[hit] = codes[idx[hit]]
                block[want] = vals
            out[r0 : r0 + rr.size] = block.reshape(rr.size, shape[1])
        return out
    raise ValueError(f"unknown mode {mode!r}; use 'disc' or 'voronoi'")


#: Longest side of a slide-sized domain raster; finer adds memory, not insight.
MAX_LABEL_SIDE = 4096


def slide_labels(adata, slide_shape: tuple[int, int], *, key: str = "domain",
                 mode: str = "disc", max_side: int = MAX_LABEL_SIDE) -> tuple[np.ndarray, float]:
    """:func:`domains_to_labels` over a whole slide of ``slide_shape`` (level-0 rows, cols),
    at most ``max_side`` pixels on its longer side; returns the raster and its scale (raster
    pixels per level-0 pixel, at most 1)."""
    scale = min(1.0, max_side / max(slide_shape))
    shape = (max(1, int(np.ceil(slide_shape[0] * scale))),
             max(1, int(np.ceil(slide_shape[1] * scale))))
    return domains_to_labels(adata, shape, key=key, scale=scale, mode=mode), scale


def domain_table(adata, key: str = "domain", *, n_markers: int = 5, layer: str | None = None):
    """One row per domain: label value, spot count, fraction, top marker genes.

    Markers are the genes with the largest difference in mean log1p(counts per 10k) between
    the domain and all other spots (computed from raw counts in ``X`` or ``layer``).
    """
    codes, cats = _label_codes(adata, key)
    x = adata.layers[layer] if layer is not None else adata.X
    norm = normalize_total(sp.csr_matrix(x), library_size(adata) if layer is None else None,
                           log1p=True)
    genes = np.asarray(adata.var_names)
    total = np.asarray(norm.sum(axis=0)).ravel()
    n = codes.size
    rows = []
    for i, name in enumerate(cats):
        inside = codes == i + 1
        k = int(inside.sum())
        if 0 < k < n:
            s_in = np.asarray(norm[inside].sum(axis=0)).ravel()
            diff = s_in / k - (total - s_in) / (n - k)
            top = genes[np.argsort(-diff, kind="stable")[:n_markers]]
        else:
            top = genes[:0]
        rows.append({"domain": str(name), "label": i + 1, "n_spots": k,
                     "fraction": k / max(n, 1), "top_markers": ", ".join(map(str, top))})
    return pd.DataFrame(rows).set_index("domain")


# Expert labels the data may carry: obs columns the readers write (her2st pathologist labels)
# or that DLPFC-style tables name, and label tables found beside the counts (DLPFC layout).
TRUTH_COLUMNS = ("pathology_label", "layer", "ground_truth")
TRUTH_FILES = ("layer_labels.tsv",)
NOT_A_LABEL = ("", "nan", "undetermined")  # spots left out of the scores


def ground_truth(adata, data=None, truth: str | None = None) -> tuple[pd.Series | None, str]:
    """Expert labels for the spots of ``adata`` and where they came from.

    Parameters
    ----------
    adata
        The spots.
    data
        The path the spots were read from; a ``layer_labels.tsv`` in it (or beside it) is used
        when ``obs`` holds no labels.
    truth
        An ``obs`` column or a tab-separated file (first column the spot ids, last the labels);
        default: the first of ``TRUTH_COLUMNS`` in ``obs``, else a ``TRUTH_FILES`` table.

    Returns
    -------
    ``(labels as strings indexed like obs, NaN where unlabelled; source)``, or ``(None, '')``
    when there are none.
    """
    from pathlib import Path

    def from_file(path: Path) -> pd.Series:
        table = pd.read_csv(path, sep="\t", index_col=0)
        if table.shape[1] < 1:
            raise ValueError(f"{path}: expected spot ids and a label column")
        col = table.iloc[:, -1].reindex(adata.obs_names)
        if col.notna().sum() == 0:
            raise ValueError(f"{path}: none of its spot ids matches the data's")
        return col

    if truth is not None:
        if truth in adata.obs:
            labels, source = adata.obs[truth], f"obs['{truth}']"
        elif Path(truth).is_file():
            labels, source = from_file(Path(truth)), truth
        else:
            raise KeyError(f"--truth {truth!r} is neither an obs column "
                           f"({', '.join(map(str, adata.obs.columns)) or 'none'}) nor a file")
    else:
        column = next((c for c in TRUTH_COLUMNS if c in adata.obs), None)
        labels, source = (adata.obs[column], f"obs['{column}']") if column else (None, "")
        if labels is None and data is not None:
            data = Path(data)
            folders = [data] if data.is_dir() else []
            folders += [data.parent, data.parent.parent]
            found = next((f / n for f in folders for n in TRUTH_FILES if (f / n).is_file()), None)
            if found is None:
                return None, ""
            labels, source = from_file(found), str(found)
    if labels is None:
        return None, ""
    text = labels.astype(object).where(labels.notna(), None).map(
        lambda v: None if v is None or str(v).strip().lower() in NOT_A_LABEL else str(v))
    return pd.Series(text.to_numpy(), index=adata.obs_names, dtype=object), source


def domain_scores(adata, truth: pd.Series, key: str = "domain") -> dict:
    """ARI and NMI of ``obs[key]`` against ``truth`` over the labelled spots."""
    from ..metrics import ari, nmi

    keep = truth.notna().to_numpy() & adata.obs[key].notna().to_numpy()
    if keep.sum() < 2:
        raise ValueError(f"only {int(keep.sum())} spots carry a label; cannot score domains")
    t, p = truth.to_numpy()[keep].astype(str), adata.obs[key].to_numpy()[keep].astype(str)
    return {"ari": ari(t, p), "nmi": nmi(t, p), "n_labelled": int(keep.sum()),
            "n_truth_classes": int(len(set(t)))}
