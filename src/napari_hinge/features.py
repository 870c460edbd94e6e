"""Encode spot patches once: features cached on disk, keyed by content.

The cache key combines the slide's content digest, a hash of the spot coordinates (rounded
to 0.01 px), the patch side, the encoder (name + weights digest) and whether the 8
dihedral augmentations were encoded. Entries are ``.npy`` files in
``cache_dir('features')`` written atomically, so an interrupted run never leaves a
half-written entry that a later run would trust.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ._cache import cache_dir, file_digest
from .patches import DIHEDRAL, dihedral, open_any_slide, slide_path, spot_patches

CACHE_VERSION = 1
# Spots read and encoded per chunk: bounds memory for whole-slide grids.
CHUNK = 256


def feature_cache_key(
    slide_file: str | Path, coords_xy: np.ndarray, *, side_px: int, encoder, augment: bool
) -> str:
    """The cache key (hex) of one ``encode_spots`` call."""
    coords = np.round(np.asarray(coords_xy, dtype=np.float64), 2)
    h = hashlib.sha256()
    h.update(f"v{CACHE_VERSION}|{file_digest(slide_file)}|{int(side_px)}|".encode())
    h.update(f"{encoder.name}|{getattr(encoder, 'weights_digest', 'random')}|".encode())
    h.update(f"{encoder.input_size}|aug={bool(augment)}|".encode())
    h.update(np.ascontiguousarray(coords).tobytes())
    return h.hexdigest()[:32]


def _save_npy(path: Path, array: np.ndarray) -> None:
    from .training import atomic_write

    def write(tmp):
        with open(tmp, "wb") as f:  # a handle: np.save would append '.npy' to the name
            np.save(f, array)

    atomic_write(path, write)


def encode_spots(
    slide_or_path,
    coords_xy: np.ndarray,
    *,
    encoder,
    side_px: int,
    augment: bool = False,
    cache: bool = True,
    batch_size: int = 8,
    progress: Callable[[int, int], None] | None = None,
    device=None,
) -> np.ndarray:
    """Features of spot-centred patches, from the cache when this exact job ran before.

    Parameters
    ----------
    slide_or_path
        A slide object (``read_region``), a path to a slide/image, or an RGB array.
    coords_xy
        ``(N, 2)`` spot centres in level-0 pixels.
    encoder
        An :class:`napari_hinge.encoders.Encoder` (``get_encoder(name)``).
    side_px
        Patch side in level-0 pixels (see :func:`napari_hinge.patches.patch_side_px`).
    augment
        Also encode the 8 dihedral transforms of every patch.
    cache
        Read/write the on-disk cache (needs a slide backed by a file).
    batch_size
        Encoder batch size (4-8 is fastest on CPU).
    progress
        ``progress(done, total)`` called after each batch, counted in patches.

    Returns
    -------
    float32 ``(N, dim)``, or ``(8, N, dim)`` with ``augment`` (index 0 = identity).
    """
    coords = np.asarray(coords_xy, dtype=float)
    if coords.ndim != 2 or coords.shape[1] != 2:
        raise ValueError(f"coords_xy must be (N, 2) x, y pixels, got shape {coords.shape}")
    src = slide_path(slide_or_path) if cache else None
    path = None
    if src is not None:
        key = feature_cache_key(src, coords, side_px=side_px, encoder=encoder, augment=augment)
        path = cache_dir("features") / f"{encoder.name}-{key}.npy"
        if path.is_file():
            try:
                feats = np.load(path)
                if feats.shape[-2:] == (len(coords), encoder.dim):
                    if progress is not None:
                        total = len(coords) * (len(DIHEDRAL) if augment else 1)
                        progress(total, total)
                    return feats
            except (OSError, ValueError):
                pass  # unreadable entry: recompute and overwrite it
    slide = open_any_slide(slide_or_path)
    views = list(DIHEDRAL) if augment else [0]
    n = len(coords)
    total = n * len(views)
    feats = np.empty((len(views), n, encoder.dim), dtype=np.float32)
    done = 0
    for start in range(0, n, CHUNK):
        # patches much larger than the encoder input are read from a coarser level
        out_size = encoder.input_size if side_px >= 2 * encoder.input_size else None
        patches = spot_patches(
            slide, coords[start : start + CHUNK], side_px=side_px, out_size=out_size
        )
        for v, k in enumerate(views):

            def tick(d, _t, base=done):
                if progress is not None:
                    progress(base + d, total)

            feats[v, start : start + len(patches)] = encoder.encode(
                dihedral(patches, k), batch_size=batch_size, device=device, progress=tick
            )
            done += len(patches)
    out = feats if augment else feats[0]
    if path is not None:
        _save_npy(path, out)
    return out
