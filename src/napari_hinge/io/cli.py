"""``napari-hinge spatial-info PATH``: read any spatial dataset, describe it, optionally save it.

Kept apart from :mod:`napari_hinge.io.spatial` so that registering the subcommand (and so
``--help``) does not import anndata.
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
        description="Read spatial transcriptomics data into the napari-hinge AnnData "
        "convention, report problems, print a summary and optionally write it as .h5ad.",
    )
    p.add_argument("path", help="Space Ranger outs/ folder, her2st-layout folder or file, .h5ad")
    p.add_argument("--section", help="her2st section (e.g. C3) when the folder holds several")
    p.add_argument("--slide", help="Space Ranger: the full-resolution H&E the spots belong to")
    p.add_argument("--mpp", type=float, help="microns per pixel of the slide (override)")
    p.add_argument("-o", "--output", help="write the AnnData here (.h5ad)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    p.set_defaults(func=run)


def run(args) -> int:
    from napari_hinge._files import atomic_write
    from napari_hinge.io.spatial import (
        SpatialDataError,
        SpatialDataWarning,
        read_spatial,
        summary,
    )

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
