"""Patch corpora for C2L-ST.

- **Unpaired** patches (central pre-training): tissue tiles of any slide, each ``patch_um`` of
  tissue resampled to ``out_size`` pixels (:func:`slide_patches`); slides whose pixels are
  coarser than that (the DLPFC low-resolution images, ~12.7 µm/px) are cut at their own scale
  with ``native=True`` (no upsampling: it would invent no morphology, only blur).
- **Paired** ``(patch, expression)`` spots of one slide (local adaptation):
  :func:`paired_spots` cuts the spot-centred patch at the same physical scale and computes
  ``log1p(counts / library size * 1e4)`` over a gene panel (the project's target rule).

Patches are uint8 ``(N, S, S, 3)``; :func:`napari_hinge.c2l.schedule.from_uint8` turns them
into network inputs.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from napari_hinge._convention import META_KEY, SPATIAL_KEY
from napari_hinge.geometry import FIELD_OF_VIEW_UM, MIN_UMI

PATCH_UM = FIELD_OF_VIEW_UM  # the tissue side of a C2L patch: the shared field of view
PATCH_PX = 64


def _open(slide_or_path, mpp: float | None):
    if hasattr(slide_or_path, "read_region"):
        return slide_or_path
    from napari_hinge.io.slides import open_slide

    return open_slide(Path(slide_or_path), mpp=mpp)


def patch_side_px(mpp: float | None, *, patch_um: float = PATCH_UM,
                  out_size: int = PATCH_PX) -> int:
    """Side in level-0 pixels of a ``patch_um`` patch (``out_size`` when the pixel size is
    unknown or coarser than the patch grid: then patches are cut at the slide's own scale)."""
    if not mpp:
        return int(out_size)
    return max(int(out_size), int(round(patch_um / float(mpp))))


def slide_patches(slide_or_path, *, mpp: float | None = None, patch_um: float = PATCH_UM,
                  out_size: int = PATCH_PX, native: bool = False, overlap: float = 0.5,
                  min_tissue: float = 0.6, max_patches: int | None = None, seed: int = 0,
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Tissue tiles of one slide as ``(patches, centres_xy)``.

    Parameters
    ----------
    slide_or_path
        A :class:`~napari_hinge.io.slides.Slide` or a path ``open_slide`` reads.
    mpp
        Pixel size when the file does not carry one (JPEG/PNG).
    patch_um, out_size
        Each patch covers ``patch_um`` µm resampled to ``out_size`` px.
    native
        Cut ``out_size`` px tiles at the slide's own scale (no resampling).
    overlap
        Fraction of overlap between neighbouring tiles (0.5: stride = half a patch).
    min_tissue
        Minimum tissue fraction under a tile (tissue mask of :mod:`napari_hinge.tissue`).
    max_patches, seed
        Keep a random subset of at most this many tiles.
    """
    from napari_hinge.patches import spot_patches
    from napari_hinge.tissue import tile_grid, tissue_mask

    slide = _open(slide_or_path, mpp)
    mpp = mpp or getattr(slide, "microns_per_pixel", None)
    if native:
        side = int(out_size)
    else:
        if not mpp:
            raise ValueError(f"{getattr(slide, 'path', 'slide')}: unknown pixel size; pass mpp= "
                             "or native=True")
        side = patch_side_px(mpp, patch_um=patch_um, out_size=out_size)
    if not 0 <= overlap < 1:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    mask = tissue_mask(slide)
    grid = tile_grid(mask, slide.shape, stride_px=max(1.0, side * (1 - overlap)),
                     min_tissue=min_tissue)
    centres = grid.centers_xy
    if max_patches is not None and len(centres) > max_patches:
        pick = np.sort(np.random.default_rng(seed).choice(len(centres), max_patches,
                                                          replace=False))
        centres = centres[pick]
    patches = spot_patches(slide, centres, side_px=side, out_size=out_size)
    return patches, centres


@dataclass
class CorpusSource:
    """One slide of an unpaired corpus."""

    path: str
    mpp: float | None = None
    native: bool = False
    max_patches: int | None = None
    name: str = ""


@dataclass
class PatchCorpus:
    """Unpaired patches with the slide each came from."""

    patches: np.ndarray
    source: np.ndarray
    names: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.patches)

    def summary(self) -> dict[str, int]:
        return {n: int((self.source == i).sum()) for i, n in enumerate(self.names)}


def build_corpus(sources: Sequence[CorpusSource], *, patch_um: float = PATCH_UM,
                 out_size: int = PATCH_PX, overlap: float = 0.5, seed: int = 0,
                 progress=None) -> PatchCorpus:
    """Concatenate :func:`slide_patches` of every source."""
    chunks, owner, names = [], [], []
    for i, src in enumerate(sources):
        path = Path(src.path)
        if not path.is_file():
            raise FileNotFoundError(f"corpus slide not found: {path}")
        p, _ = slide_patches(path, mpp=src.mpp, patch_um=patch_um, out_size=out_size,
                             native=src.native, overlap=overlap, max_patches=src.max_patches,
                             seed=seed + i)
        chunks.append(p)
        owner.append(np.full(len(p), i, np.int16))
        names.append(src.name or path.name)
        if progress is not None:
            progress(i + 1, len(sources))
    if not chunks:
        raise ValueError("build_corpus needs at least one source")
    return PatchCorpus(np.concatenate(chunks), np.concatenate(owner), names)


def save_corpus(corpus: PatchCorpus, path: str | os.PathLike) -> Path:
    from napari_hinge.training import atomic_write

    def write(tmp):
        with open(tmp, "wb") as f:
            np.savez(f, patches=corpus.patches, source=corpus.source,
                     names=np.array(corpus.names))

    return atomic_write(path, write)


def load_corpus(path: str | os.PathLike) -> PatchCorpus:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"patch corpus not found: {path}")
    with np.load(path) as z:
        return PatchCorpus(z["patches"], z["source"], [str(n) for n in z["names"]])


# ---------------------------------------------------------------------------------------------
# paired spots


def spot_patch_side(adata, *, patch_um: float = PATCH_UM, out_size: int = PATCH_PX) -> int:
    """Level-0 side of a ``patch_um`` patch on the slide of ``adata``."""
    meta = adata.uns.get(META_KEY, {})
    mpp = meta.get("microns_per_pixel")
    if not mpp:
        raise KeyError(f"adata.uns['{META_KEY}'] has no 'microns_per_pixel'; C2L patches are cut "
                       "at a physical scale")
    return patch_side_px(mpp, patch_um=patch_um, out_size=out_size)


def default_genes(adata, n_genes: int = 50, *, min_umi: int = MIN_UMI) -> list[str]:
    """The project's panel rule on one section (expressed in >= 10% of spots, top ``n_genes``
    by variance of log1p CP10k)."""
    from napari_hinge.expression import select_gene_panel
    from napari_hinge.hinge.pipeline import library_size, transform_values

    keep = library_size(adata) >= min_umi
    sub = adata[keep]
    return select_gene_panel([sub], n_genes, targets=[transform_values(sub)[0]])


def paired_spots(adata, genes: Sequence[str] | None = None, *, n_genes: int = 50,
                 patch_um: float = PATCH_UM, out_size: int = PATCH_PX, min_umi: int = MIN_UMI,
                 slide=None) -> tuple[np.ndarray, np.ndarray, list[str], np.ndarray]:
    """Spot-centred patches and expression of one slide.

    Returns
    -------
    patches
        uint8 ``(N, out_size, out_size, 3)``.
    expression
        float32 ``(N, G)``: ``log1p(count / library size * 1e4)`` over ``genes``.
    genes
        The panel (default :func:`default_genes`). Genes the table lacks raise KeyError.
    index
        Indices into ``adata.obs`` of the spots kept (>= ``min_umi`` UMI).
    """
    from napari_hinge.hinge.pipeline import library_size, transform_values
    from napari_hinge.patches import spot_patches

    if SPATIAL_KEY not in adata.obsm:
        raise KeyError(f"adata has no obsm['{SPATIAL_KEY}'] (spot coordinates)")
    meta = adata.uns.get(META_KEY, {})
    if slide is None:
        path = meta.get("slide_path")
        if not path:
            raise FileNotFoundError(f"adata.uns['{META_KEY}'] names no slide; C2L needs the H&E")
        slide = _open(path, meta.get("microns_per_pixel"))
    genes = default_genes(adata, n_genes, min_umi=min_umi) if genes is None else list(genes)
    values, missing = transform_values(adata, genes)
    if missing:
        raise KeyError(f"{len(missing)} genes are not measured in the data: "
                       f"{', '.join(missing[:20])}")
    keep = np.flatnonzero(library_size(adata) >= min_umi)
    if not len(keep):
        raise ValueError(f"no spot has >= {min_umi} UMI")
    side = spot_patch_side(adata, patch_um=patch_um, out_size=out_size)
    xy = np.asarray(adata.obsm[SPATIAL_KEY], dtype=float)[keep]
    patches = spot_patches(slide, xy, side_px=side, out_size=out_size)
    return patches, values[keep], genes, keep


def dihedral_torch(x, k: int):
    """One of the 8 flips/rotations of ``(B, C, H, W)`` tensors."""
    import torch

    if k >= 4:
        x = torch.flip(x, dims=(-1,))
    return torch.rot90(x, k % 4, dims=(-2, -1))
