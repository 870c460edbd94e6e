"""``napari-hinge spatial-info PATH``: read any spatial dataset, describe it, optionally save it.

Registering the subcommand (and so ``--help``) imports no reader and no anndata.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path


def register(subparsers) -> None:
    """Add ``spatial-info``: read any spatial dataset, print a summary, optionally save h5ad."""
    p = subparsers.add_parser(
        "spatial-info",
        help="read spatial data (Space Ranger outs/, her2st folder, .h5ad) and describe it",
        description="Read spatial transcriptomics data (Space Ranger outs/, her2st folder, "
        ".h5ad; Xenium, MERSCOPE, CosMx with the spatialdata extra) into the napari-hinge "
        "AnnData convention, report problems, print a summary and optionally write it as .h5ad.",
    )
    p.add_argument("path", help="Space Ranger outs/ folder, her2st-layout folder or file, .h5ad, "
                   "Xenium / MERSCOPE / CosMx output folder (these need the spatialdata extra)")
    p.add_argument("--section", help="her2st section (e.g. C3) when the folder holds several")
    p.add_argument("--slide", help="Space Ranger: the full-resolution H&E the spots belong to")
    p.add_argument("--mpp", type=float, help="microns per pixel of the slide (override)")
    p.add_argument("-o", "--output", help="write the AnnData here (.h5ad)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    p.set_defaults(func=run)


def run(args) -> int:
    from napari_hinge._files import atomic_write
    from napari_hinge.io.spatial import read_spatial
    from napari_hinge.io.validate import SpatialDataError, SpatialDataWarning

    kwargs = {k: getattr(args, k) for k in ("section", "slide", "mpp") if getattr(args, k)}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", SpatialDataWarning)
        adata = read_spatial(args.path, **kwargs)
    for w in caught:
        if issubclass(w.category, SpatialDataWarning):
            print(f"warning: {w.message}", file=sys.stderr)
    print(summary(adata))
    if args.output:
        out = Path(args.output)
        if out.suffix != ".h5ad":
            raise SpatialDataError(f"{out}: output must end in .h5ad")
        if out.exists() and not args.overwrite:
            raise SpatialDataError(f"{out} exists; pass --overwrite to replace it")
        atomic_write(out, lambda tmp: adata.write_h5ad(tmp))
        print(f"wrote {out}")
    return 0


def summary(adata) -> str:
    """A few lines describing a spatial AnnData (what was read, where, at what pixel size)."""
    import numpy as np

    from napari_hinge._convention import META_KEY, SPATIAL_KEY

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
