"""Shared constants and slide geometry: the one home of numbers and conventions every model,
reader and widget uses.

**Pixel convention.** Positions on a slide are continuous level-0 pixel coordinates ``(x, y)``
in which pixel (column ``i``, row ``j``) is *centred* at ``(i, j)`` and covers
``[i - 1/2, i + 1/2) x [j - 1/2, j + 1/2)``: the convention of napari (a layer's pixel ``i``
sits at ``i * scale + translate``), of matplotlib's ``imshow`` (so ``scanpy.pl.spatial``) and of
Space Ranger's ``pxl_*_in_fullres``. ``obsm['spatial']``, tile centres and crop origins are all
in it. Consequences, each implemented once here:

- a crop of ``side`` pixels around ``(x, y)`` starts at pixel ``round(x - side / 2)``
  (:func:`crop_origin`), so its centre is within half a pixel of ``(x, y)``;
- a raster whose pixel ``(0, 0)`` is centred at level-0 ``(x, y)`` is placed in napari with
  ``translate = (y, x)`` (:meth:`Grid.placement`); one whose pixels start at the outer edge of
  level-0 pixel ``(i, j)`` needs ``translate = (j - 1/2 + d/2, i - 1/2 + d/2)`` for a pixel
  size ``d`` (:func:`edge_placement`);
- the tile grid over a slide (:func:`slide_grid`) has tile ``(r, c)`` centred at
  ``((c + 1/2) s, (r + 1/2) s)`` for a stride ``s``: its tiles start at the centre of pixel 0,
  half a pixel inside the outer edge (the grid every shipped model and benchmark was made on;
  half a pixel is far below a tile).

**Image-size limits** are set per call (:func:`image_pixel_limit`), never process-wide.
"""

from __future__ import annotations

import contextlib
import threading
import warnings
from dataclasses import dataclass

import numpy as np

#: Side of the tissue field every model looks at (µm): HINGE's spot patches are
#: ``max(spot diameter, FIELD_OF_VIEW_UM)``, slide tiles and C2L tiles are this wide (the
#: HEST/Stem convention: 224 px at 0.5 µm/px).
FIELD_OF_VIEW_UM = 112.0

#: Spots with fewer UMI than this are too shallow to train or score on.
MIN_UMI = 100

#: Largest image our own readers decode (pixels). PIL's default decompression-bomb limit
#: (~179 Mpx, warning above ~89 Mpx) guards web apps; histology sections are legitimately that
#: big (her2st JPEGs: 92 Mpx), so our reads allow up to 2**31 px (6 GiB as RGB) -- still a cap,
#: so that a corrupt header claiming absurd dimensions fails clearly instead of exhausting memory.
MAX_IMAGE_PIXELS = 1 << 31

_PIL_LOCK = threading.RLock()


@contextlib.contextmanager
def image_pixel_limit(max_pixels: int | None = MAX_IMAGE_PIXELS):
    """Let PIL decode images up to ``max_pixels`` inside this block only.

    PIL keeps its limit in one module attribute: it is set on entry and the old value restored
    on exit, under a lock so that our reads in several threads (napari workers) never restore
    each other's value early or leave a raised one behind. Code outside these blocks sees
    PIL's own limit. Yields :mod:`PIL.Image`.
    """
    from PIL import Image

    with _PIL_LOCK:
        old = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = max_pixels
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                yield Image
        finally:
            Image.MAX_IMAGE_PIXELS = old


# --------------------------------------------------------------------------------------------
# spots


def spot_pitch_px(xy) -> float | None:
    """Centre-to-centre spot distance: the median nearest-neighbour distance of the finite
    positions ``xy`` ``(n, 2+)``, in their unit; None for fewer than 2 spots."""
    xy = np.asarray(xy, dtype=np.float64)[:, :2]
    xy = xy[np.isfinite(xy).all(axis=1)]
    if len(xy) < 2:
        return None
    from scipy.spatial import cKDTree

    distance, _ = cKDTree(xy).query(xy, k=2)
    return float(np.median(distance[:, 1]))


def spot_pitch_um(adata) -> float | None:
    """:func:`spot_pitch_px` of ``obsm['spatial']`` in µm; None when the pixel size is unknown
    or there are fewer than 2 spots."""
    from napari_hinge._convention import META_KEY, SPATIAL_KEY

    mpp = adata.uns.get(META_KEY, {}).get("microns_per_pixel")
    pitch = spot_pitch_px(adata.obsm[SPATIAL_KEY]) if mpp else None
    return None if pitch is None else pitch * float(mpp)


# --------------------------------------------------------------------------------------------
# crops, grids and their placement


def crop_origin(center: float, side: int) -> int:
    """First pixel (index) of a ``side``-pixel crop centred on ``center``: ``round(center -
    side / 2)`` with halves rounded up."""
    return int(np.floor(center - side / 2 + 0.5))


@dataclass(frozen=True)
class Grid:
    """Square cells of ``step_px`` level-0 pixels in ``shape`` (rows, cols); cell ``(r, c)``
    is centred at ``origin_xy + (c, r) * step_px``."""

    origin_xy: tuple[float, float]
    step_px: float
    shape: tuple[int, int]

    def cells(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``rows``, ``cols`` and ``(n, 2)`` centres (x, y) of every cell, row by row."""
        rows, cols = (a.ravel() for a in np.mgrid[0:self.shape[0], 0:self.shape[1]])
        centers = np.stack([self.origin_xy[0] + cols * self.step_px,
                            self.origin_xy[1] + rows * self.step_px], axis=1)
        return rows, cols, centers

    def cell_of(self, xy) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``rows``, ``cols`` of the cell nearest each position ``(n, 2)`` and whether it lies
        on the grid."""
        xy = np.asarray(xy, dtype=np.float64)
        cols = np.rint((xy[:, 0] - self.origin_xy[0]) / self.step_px).astype(int)
        rows = np.rint((xy[:, 1] - self.origin_xy[1]) / self.step_px).astype(int)
        inside = (rows >= 0) & (rows < self.shape[0]) & (cols >= 0) & (cols < self.shape[1])
        return rows, cols, inside

    def placement(self, microns_per_pixel: float | None) -> dict:
        """napari ``scale``/``translate`` (row, col) of a raster with one pixel per cell, in
        µm when the pixel size is known (as the slide layer), else level-0 pixels."""
        unit = microns_per_pixel or 1.0
        return {"scale": (self.step_px * unit, self.step_px * unit),
                "translate": (self.origin_xy[1] * unit, self.origin_xy[0] * unit)}


def slide_grid(slide_shape: tuple[int, int], step_px: float) -> Grid:
    """Tiles of ``step_px`` over a ``(height, width)`` slide: ``floor(side / step)`` per axis
    (at least 1), tile ``(r, c)`` centred at ``((c + 1/2) step, (r + 1/2) step)``."""
    if step_px <= 0:
        raise ValueError(f"stride must be positive, got {step_px}")
    height, width = slide_shape
    shape = (max(1, int(height // step_px)), max(1, int(width // step_px)))
    return Grid((step_px / 2.0, step_px / 2.0), float(step_px), shape)


def region_grid(corner_xy, far_corner_xy, step_px: float) -> Grid:
    """Tiles of ``step_px`` edge to edge from ``corner_xy`` covering the box up to
    ``far_corner_xy`` (``ceil`` per axis, at least 1)."""
    x0, y0 = (float(v) for v in corner_xy)
    x1, y1 = (float(v) for v in far_corner_xy)
    shape = (max(1, int(np.ceil((y1 - y0) / step_px))),
             max(1, int(np.ceil((x1 - x0) / step_px))))
    return Grid((x0 + step_px / 2, y0 + step_px / 2), float(step_px), shape)


def edge_placement(first_pixel_xy, pixel_px: float, microns_per_pixel: float | None) -> dict:
    """napari ``scale``/``translate`` of a raster of ``pixel_px``-sized pixels that starts at
    the outer edge of level-0 pixel ``first_pixel_xy`` (x, y): that edge is at ``index - 1/2``
    (the pixel convention above), the raster's first pixel centre ``pixel_px / 2`` further."""
    unit = microns_per_pixel or 1.0
    x0, y0 = first_pixel_xy
    d = float(pixel_px)
    return {"scale": (d * unit, d * unit),
            "translate": ((y0 + d / 2 - 0.5) * unit, (x0 + d / 2 - 0.5) * unit)}
