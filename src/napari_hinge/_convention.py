"""The one AnnData convention every reader produces and every tool consumes.

- ``adata.X``: raw counts (spots x genes), never normalised.
- ``adata.obsm['spatial']``: float (x, y) of each spot centre in level-0 pixels of the
  slide the spots belong to (``uns[META_KEY]['slide_path']`` when there is one).
- ``adata.uns[META_KEY]``: a dict with
  ``microns_per_pixel`` (float, of level 0 of that slide; absent when unknown),
  ``spot_diameter_px`` (float, in the same pixels),
  ``slide_path`` (str; absent when the data has no image),
  ``source`` (str: the file or folder that was read),
  ``format`` (str: 'spaceranger', 'legacy_st', 'h5ad', 'xenium', 'merscope', 'cosmx').
- ``adata.var_names``: unique gene symbols (:func:`unique_var`), ``var['gene_ids']`` the
  Ensembl ids where the source has them.
- ``adata.uns['spatial'][library_id]`` = ``{'images', 'scalefactors', 'metadata'}`` in
  scanpy's layout, with scale factors that map ``obsm['spatial']`` onto each stored image, so
  ``scanpy.pl.spatial`` works unchanged.
- ``adata.obs[LIBRARY_SIZE_KEY]`` (optional): each spot's UMI total over *all* genes measured,
  when ``X`` holds only a subset of them (the shipped sample); normalisation must use it.
"""

from __future__ import annotations

import os

import numpy as np

from napari_hinge.errors import InputError, positive_number

SPATIAL_KEY = "spatial"
META_KEY = "napari_hinge"
LIBRARY_SIZE_KEY = "total_counts_all_genes"

# Physical spot sizes (µm) of the platforms we read.
VISIUM_SPOT_UM = 55.0
VISIUM_PITCH_UM = 100.0
LEGACY_ST_SPOT_UM = 100.0
LEGACY_ST_PITCH_UM = 200.0

#: Pixel sizes (µm/px) a slide can have: 0.05 (beyond any light microscope) to 50 (a
#: low-resolution overview). Values outside come from broken or default metadata.
MPP_PLAUSIBLE = (0.05, 50.0)


def check_mpp(value, path: str | os.PathLike, field: str = "microns_per_pixel") -> float:
    """A pixel size read from a file: a finite positive number in :data:`MPP_PLAUSIBLE`,
    else an :class:`~napari_hinge.errors.InputError` naming the file and the field (and
    the ``mpp`` override, which takes any positive value)."""
    v = positive_number(value, path, field)
    lo, hi = MPP_PLAUSIBLE
    if not lo <= v <= hi:
        raise InputError.at(
            path, f"{v:g} µm/px is not a plausible slide pixel size ({lo:g}-{hi:g}); pass "
            "mpp= (--mpp) with the real value to override", field=field)
    return v


def unique_var(ids, names, feature_types=None):
    """``var`` with unique gene symbols as names and the ids in ``gene_ids`` (anndata's rule
    for repeats, GENE, GENE-1, ..., the same as scanpy's readers)."""
    import pandas as pd

    names = pd.Index(names if names is not None else ids).astype(str)
    var = pd.DataFrame(index=names)
    if ids is not None:
        var["gene_ids"] = np.asarray(ids, dtype=str)
    if feature_types is not None:
        var["feature_types"] = np.asarray(feature_types, dtype=str)
    if var.index.has_duplicates:
        from anndata.utils import make_index_unique

        var.index = make_index_unique(var.index.astype(str))
    return var


def spatial_meta(adata) -> dict:
    """Return ``adata.uns[META_KEY]``, raising a clear error if the convention is not met."""
    if SPATIAL_KEY not in adata.obsm:
        raise KeyError(
            f"AnnData has no obsm['{SPATIAL_KEY}'] (spot coordinates); "
            "read it with napari_hinge.io.read_spatial"
        )
    return dict(adata.uns.get(META_KEY, {}))


def library_size(adata) -> np.ndarray:
    """UMI total per spot over all genes: ``obs[LIBRARY_SIZE_KEY]`` when ``X`` is a gene
    subset, else the row sums of ``X``."""
    if LIBRARY_SIZE_KEY in adata.obs:
        return adata.obs[LIBRARY_SIZE_KEY].to_numpy(np.float64)
    return np.asarray(adata.X.sum(axis=1), dtype=np.float64).ravel()
