"""The one AnnData convention every reader produces and every tool consumes.

- ``adata.X``: raw counts (spots x genes), never normalised.
- ``adata.obsm['spatial']``: float (x, y) of each spot centre in level-0 pixels of the
  slide the spots belong to (``uns[META_KEY]['slide_path']`` when there is one).
- ``adata.uns[META_KEY]``: a dict with
  ``microns_per_pixel`` (float, of level 0 of that slide; absent when unknown),
  ``spot_diameter_px`` (float, in the same pixels),
  ``slide_path`` (str; absent when the data has no image),
  ``source`` (str: the file or folder that was read),
  ``format`` (str: 'spaceranger', 'legacy_st', 'h5ad').
- ``adata.obs[LIBRARY_SIZE_KEY]`` (optional): each spot's UMI total over *all* genes measured,
  when ``X`` holds only a subset of them (the shipped sample); normalisation must use it.
"""

from __future__ import annotations

import numpy as np

SPATIAL_KEY = "spatial"
META_KEY = "napari_hinge"
LIBRARY_SIZE_KEY = "total_counts_all_genes"

# Physical spot sizes (µm) of the platforms we read.
VISIUM_SPOT_UM = 55.0
VISIUM_PITCH_UM = 100.0
LEGACY_ST_SPOT_UM = 100.0
LEGACY_ST_PITCH_UM = 200.0


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
