"""Readers and writers: slides (lazy multiscale) and spatial data (AnnData).

==========================  ===============================================================
module                      owns
==========================  ===============================================================
:mod:`.io.spatial`          :func:`read_spatial`: format detection and dispatch
:mod:`.io.spaceranger`      Space Ranger outs/ (Visium, CytAssist, Visium HD); 10x counts
:mod:`.io.legacy_st`        legacy ST / her2st folders and count tables
:mod:`.io.h5ad`             any .h5ad with obsm['spatial']
:mod:`.io.spatialdata`      Xenium, MERSCOPE, CosMx through spatialdata-io (optional extra)
:mod:`.io.validate`         the checks every reader ends with; SpatialDataError / Warning
:mod:`.io.images`           image size from a header, small overviews for uns['spatial']
:mod:`.io.slides`           whole-slide images, lazily (pyramids, pixel size)
:mod:`.io.maps`             OME-TIFF maps the package writes
:mod:`.io.cli`              the ``spatial-info`` command
==========================  ===============================================================

The AnnData convention every reader produces is :mod:`napari_hinge._convention`.
"""

# Readers, importable from here without paying for anndata until one is used.
_LAZY = {
    "read_spatial": "spatial",
    "detect_spatial_format": "spatial",
    "read_spaceranger": "spaceranger",
    "read_her2st": "legacy_st",
    "read_legacy_st": "legacy_st",
    "list_her2st_sections": "legacy_st",
    "read_h5ad": "h5ad",
    "SpatialDataError": "validate",
    "SpatialDataWarning": "validate",
    "validate_spatial": "validate",
    "open_slide": "slides",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
