"""Spot-centred RGB patches from a slide, and the 8 dihedral (flip/rotation) transforms.

Patches are read from level 0 of a slide object with
``read_region(x, y, w, h, level=0) -> (h, w, 3 or 4) uint8`` (``napari_hinge.io.slides``).
Plain images (a path to a JPEG/PNG/TIFF or an RGB array) are wrapped in a small in-memory
adapter with the same method, so everything here works before and without the slide API.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from ._convention import META_KEY, spatial_meta
from .geometry import FIELD_OF_VIEW_UM, crop_origin, image_pixel_limit

#: The 8 dihedral transforms: k = 0..3 rotate by k*90 degrees, k = 4..7 flip then rotate.
DIHEDRAL = range(8)


class ArraySlide:
    """Minimal single-level slide over an in-memory RGB image (for plain images and tests)."""

    def __init__(self, image: np.ndarray, *, microns_per_pixel: float | None = None, path=None):
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[-1] not in (3, 4):
            raise ValueError(f"expected an RGB(A) image (H, W, 3|4), got shape {image.shape}")
        self.image = image[..., :3]
        self.microns_per_pixel = microns_per_pixel
        self.path = None if path is None else str(path)
        self.levels = [self.image]
        self.shape = self.image.shape

    @classmethod
    def from_file(cls, path: str | os.PathLike, *, microns_per_pixel: float | None = None):
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"image not found: {path}")
        try:
            with image_pixel_limit() as Image, Image.open(path) as im:
                rgb = np.asarray(im.convert("RGB"))
        except Exception as exc:
            raise ValueError(f"{path}: cannot read as an image ({exc})") from exc
        return cls(rgb, microns_per_pixel=microns_per_pixel, path=path)

    def read_region(self, x: int, y: int, w: int, h: int, level: int = 0) -> np.ndarray:
        if level != 0:
            raise ValueError("ArraySlide has only level 0")
        return _crop_padded(self.image, x, y, w, h)


def _crop_padded(image: np.ndarray, x: int, y: int, w: int, h: int, fill: int = 255):
    """Crop ``image[y:y+h, x:x+w]``; parts outside the image are white (glass)."""
    out = np.full((h, w, 3), fill, dtype=np.uint8)
    H, W = image.shape[:2]
    x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, W), min(y + h, H)
    if x1 > x0 and y1 > y0:
        out[y0 - y : y1 - y, x0 - x : x1 - x] = image[y0:y1, x0:x1, :3]
    return out


def open_any_slide(slide):
    """A slide object from a slide, a path or an RGB array.

    Paths go through ``napari_hinge.io.slides.open_slide`` when that module exists, and
    fall back to reading the whole image into memory with PIL.
    """
    if hasattr(slide, "read_region"):
        return slide
    if isinstance(slide, np.ndarray):
        return ArraySlide(slide)
    path = Path(slide)
    if not path.exists():
        raise FileNotFoundError(f"slide not found: {path}")
    try:
        from .io.slides import open_slide  # written in parallel; optional here
    except ImportError:
        return ArraySlide.from_file(path)
    return open_slide(path)


def slide_path(slide) -> str | None:
    """The file behind a slide object (for cache keys), or None."""
    if isinstance(slide, (str, os.PathLike)):
        return str(slide)
    for attr in ("path", "source_path", "source"):
        value = getattr(slide, attr, None)
        if isinstance(value, (str, os.PathLike)) and Path(value).is_file():
            return str(value)
    return None


def patch_side_px(adata) -> int:
    """Side of the spot patch in level-0 pixels: ``max(spot diameter, FIELD_OF_VIEW_UM / mpp)``
    (:data:`napari_hinge.geometry.FIELD_OF_VIEW_UM`, 112 µm).

    Without a known pixel size, the spot diameter alone.
    """
    meta = spatial_meta(adata)
    diameter = meta.get("spot_diameter_px")
    mpp = meta.get("microns_per_pixel")
    if diameter is None and mpp is None:
        raise KeyError(
            f"adata.uns['{META_KEY}'] has neither 'spot_diameter_px' nor 'microns_per_pixel'; "
            "cannot size spot patches"
        )
    side = float(diameter or 0.0)
    if mpp:
        side = max(side, FIELD_OF_VIEW_UM / float(mpp))
    return int(round(side))


def spot_patches(
    slide,
    coords_xy: np.ndarray,
    *,
    side_px: int,
    out_size: int | None = None,
) -> np.ndarray:
    """Square RGB patches centred on spots, read from level 0.

    Parameters
    ----------
    slide
        A slide with ``read_region(x, y, w, h, level=0)``, a path, or an RGB array.
    coords_xy
        ``(N, 2)`` spot centres (x, y) in level-0 pixels (``adata.obsm['spatial']``).
    side_px
        Patch side in level-0 pixels.
    out_size
        Resize each patch to ``out_size`` pixels (antialiased) when given. When the patch
        shrinks by 2x or more, it is read from the coarsest pyramid level that is still
        at least as fine as the output.

    Returns
    -------
    ``(N, S, S, 3)`` uint8, S = ``out_size`` or ``side_px``. Pixels beyond the slide are white.
    """
    slide = open_any_slide(slide)
    coords = np.asarray(coords_xy, dtype=float)
    if coords.ndim != 2 or coords.shape[1] != 2:
        raise ValueError(f"coords_xy must be (N, 2) x, y pixels, got shape {coords.shape}")
    side = int(side_px)
    if side < 1:
        raise ValueError(f"side_px must be positive, got {side_px}")
    size = side if out_size is None else int(out_size)
    level, ds = _pick_level(slide, side / size)
    read = max(1, int(round(side / ds)))  # region side in pixels of that level
    out = np.empty((len(coords), size, size, 3), dtype=np.uint8)
    for i, (x, y) in enumerate(coords):
        x0, y0 = crop_origin(x, side), crop_origin(y, side)
        patch = np.asarray(slide.read_region(x0, y0, read, read, level=level))[..., :3]
        if patch.shape[:2] != (read, read):
            patch = _crop_padded(patch, 0, 0, read, read)
        out[i] = patch if size == read else _resize(patch, size)
    return out


def _pick_level(slide, zoom_out: float) -> tuple[int, float]:
    """The coarsest pyramid level still at least as fine as the output (level 0 if none).

    A 1 mm patch shrunk to 224 px needs no level-0 pixels: reading a level that is at most
    ``zoom_out`` times coarser gives the same antialiased result for a fraction of the I/O.
    """
    downsamples = getattr(slide, "downsamples", None)
    if not downsamples or zoom_out < 2:
        return 0, 1.0
    best = 0
    for i, ds in enumerate(downsamples):
        if ds <= zoom_out * 1.001 and ds > downsamples[best]:
            best = i
    return best, float(downsamples[best])


def _resize(patch: np.ndarray, size: int) -> np.ndarray:
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(np.ascontiguousarray(patch)).permute(2, 0, 1)[None].float()
    x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True)
    return x[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()


def dihedral(images: np.ndarray, k: int) -> np.ndarray:
    """One of the 8 flips/rotations of ``(..., H, W, C)`` images; k = 0 is the identity.

    k = 0..3 rotate by k * 90 degrees; k = 4..7 mirror left-right, then rotate by (k-4) * 90.
    """
    if k not in DIHEDRAL:
        raise ValueError(f"dihedral index must be in 0..7, got {k}")
    images = np.asarray(images)
    if k >= 4:
        images = images[..., :, ::-1, :]
    return np.ascontiguousarray(np.rot90(images, k % 4, axes=(-3, -2)))


def dihedral_all(images: np.ndarray, ks: Iterable[int] = DIHEDRAL) -> np.ndarray:
    """Stack of the dihedral transforms: ``(len(ks), ...)``."""
    return np.stack([dihedral(images, k) for k in ks])
