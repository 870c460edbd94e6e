"""Read any supported spatial dataset: format detection and dispatch to the per-format
readers, each of which returns the AnnData convention of :mod:`napari_hinge._convention`.

====================  ==========================================  ===========================
format                what is read                                reader
====================  ==========================================  ===========================
``spaceranger``       Space Ranger ``outs/`` (Visium, CytAssist,  :mod:`~.io.spaceranger`
                      Visium HD ``binned_outputs``)
``legacy_st``         her2st-layout folders and count tables      :mod:`~.io.legacy_st`
``h5ad``              ``.h5ad`` with ``obsm['spatial']``          :mod:`~.io.h5ad`
``xenium``,           Xenium, MERSCOPE, CosMx output folders      :mod:`~.io.spatialdata`
``merscope``,         (through the optional spatialdata-io)
``cosmx``
====================  ==========================================  ===========================

Every reader ends with :func:`~napari_hinge.io.validate.validate_spatial`: problems that make
the data unusable raise :class:`~napari_hinge.io.validate.SpatialDataError` naming the file;
problems that leave it usable warn with a :class:`~napari_hinge.io.validate.SpatialDataWarning`.
"""

from __future__ import annotations

from pathlib import Path

from anndata import AnnData

from . import spatialdata
from .h5ad import read_h5ad
from .legacy_st import list_her2st_sections, read_her2st
from .spaceranger import has_counts, read_spaceranger
from .validate import SpatialDataError, first

__all__ = ["detect_spatial_format", "read_spatial"]


def detect_spatial_format(path: str | Path) -> str | None:
    """Which reader handles ``path``: 'spaceranger', 'legacy_st', 'h5ad', 'xenium',
    'merscope', 'cosmx' or None.

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
        if (root / "spatial").is_dir() and has_counts(root):
            return "spaceranger"
        if (root / "binned_outputs").is_dir():
            return "spaceranger"
    if list_her2st_sections(p):
        return "legacy_st"
    return spatialdata.detect(p)


_READER_OPTIONS = {
    "spaceranger": {"slide", "mpp", "library_id", "bin_size"},
    "legacy_st": {"section", "mpp", "images"},
    "h5ad": set(),
    **{fmt: {"mpp"} for fmt in spatialdata.READERS},
}


def read_spatial(path: str | Path, **kwargs) -> AnnData:
    """Read any supported spatial dataset, dispatching on :func:`detect_spatial_format`.

    Parameters
    ----------
    path
        A Space Ranger ``outs`` folder, a ``.h5ad``, a her2st-layout folder (pass
        ``section=``; optional when it holds one section) or one of its ``counts/<s>.tsv.gz``,
        a Xenium, MERSCOPE or CosMx output folder.
    **kwargs
        Options of the matching reader: ``slide``, ``mpp``, ``library_id``, ``bin_size``
        (Space Ranger); ``section``, ``mpp``, ``images`` (legacy ST); none for ``.h5ad``;
        ``mpp`` for Xenium, MERSCOPE and CosMx (read through the optional spatialdata-io).
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"spatial data not found: {p}")
    fmt = detect_spatial_format(p)
    if fmt is None:
        raise SpatialDataError(
            f"{p}: not a recognised spatial dataset (expected a Space Ranger outs/ folder, a "
            "her2st-layout folder with counts/ and spots/, a .h5ad file, or a Xenium, MERSCOPE "
            "or CosMx output folder)"
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
    if fmt in spatialdata.READERS:
        return spatialdata.READERS[fmt](p, **kwargs)
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
                f"{p}: holds {len(sections)} sections ({first(sections, 10)}); pass section=..."
            )
        section = sections[0]
    return read_her2st(p, section, **kwargs)
