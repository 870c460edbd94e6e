"""Tissue masks and whole-slide tile grids.

The mask comes from a low pyramid level: Otsu's threshold on HSV saturation (stained tissue
is saturated, glass and background are not), with near-black pixels (pen, slide edges)
excluded, small specks removed and holes filled. A :class:`TileGrid` lays tiles over the
tissue at a chosen stride and turns per-tile values back into rasters that napari places on
the slide with ``scale`` and ``translate``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from napari_hinge.geometry import Grid, slide_grid

MASK_MAX_SIDE = 2048


@dataclass
class TissueMask:
    """A boolean tissue mask and the level-0 pixels each mask pixel covers."""

    mask: np.ndarray
    downsample: float

    @property
    def fraction(self) -> float:
        return float(self.mask.mean())

    def coverage_at(self, centers_xy, side_px: float) -> np.ndarray:
        """Tissue fraction of the ``side_px`` square around each level-0 centre (x, y),
        measured on the mask."""
        mask = self.mask.astype(np.float32)
        size = max(1, int(round(side_px / self.downsample)))
        coverage = ndimage.uniform_filter(mask, size=size, mode="constant")
        centers_xy = np.asarray(centers_xy)
        my = np.clip((centers_xy[:, 1] / self.downsample).astype(int), 0, mask.shape[0] - 1)
        mx = np.clip((centers_xy[:, 0] / self.downsample).astype(int), 0, mask.shape[1] - 1)
        return coverage[my, mx]


def _saturation_value(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """HSV saturation and value of an RGB image in 0..1, as ``skimage.color.rgb2hsv``
    gives them, without its hue (a third of the time on a slide's mask level)."""
    rgb = np.asarray(image)[..., :3]
    high = rgb.max(-1).astype(np.float64)
    low = rgb.min(-1).astype(np.float64)
    saturation = np.divide(high - low, high, out=np.zeros_like(high), where=high > 0)
    scale = 255.0 if rgb.dtype == np.uint8 else 1.0
    return saturation, high / scale


def tissue_mask(slide, *, max_side: int = MASK_MAX_SIDE, min_area_um2: float = 20_000.0
                ) -> TissueMask:
    """Otsu on saturation of the smallest level with a side of at least ~512 px.

    Raises ValueError naming the slide when no tissue is found (a blank or all-glass image).
    """
    from skimage.filters import threshold_otsu

    # The smallest level that still resolves the tissue; never above max_side if avoidable.
    index = 0
    for i, level in enumerate(slide.levels):
        if max(level.shape[:2]) <= max_side:
            index = i
            break
        index = i
    if max(slide.levels[index].shape[:2]) > max_side:
        image = slide.thumbnail(max_side)
        downsample = slide.shape[1] / image.shape[1]
    else:
        image = np.asarray(slide.levels[index].compute())
        downsample = slide.shape[1] / image.shape[1]
    saturation, value = _saturation_value(image)
    if np.ptp(saturation) < 0.02:
        raise ValueError(f"{slide.path}: no tissue found (the image has no stained area)")
    threshold = max(threshold_otsu(saturation), 0.05)
    mask = (saturation > threshold) & (value > 0.15)
    mask = ndimage.binary_opening(mask, iterations=1)
    mask = ndimage.binary_fill_holes(ndimage.binary_closing(mask, iterations=2))
    mpp = slide.microns_per_pixel or 1.0
    min_pixels = max(4, int(min_area_um2 / (mpp * downsample) ** 2))
    labels, n = ndimage.label(mask)
    if n:
        sizes = ndimage.sum(mask, labels, index=np.arange(1, n + 1))
        mask = np.isin(labels, 1 + np.flatnonzero(sizes >= min_pixels))
    if not mask.any():
        raise ValueError(f"{slide.path}: no tissue found (nothing above the saturation threshold)")
    return TissueMask(mask=mask, downsample=float(downsample))


@dataclass
class TileGrid:
    """Tile centres on a regular grid over the tissue.

    ``centers_xy`` are level-0 pixel (x, y) of the tiles kept; ``rows``/``cols`` their
    indices in a ``shape`` raster whose pixel (0, 0) is centred at ``origin_xy``.
    """

    centers_xy: np.ndarray
    rows: np.ndarray
    cols: np.ndarray
    shape: tuple[int, int]
    origin_xy: tuple[float, float]
    stride_px: float

    def __len__(self) -> int:
        return len(self.centers_xy)

    def to_raster(self, values: np.ndarray, fill: float = np.nan) -> np.ndarray:
        """(n_tiles, ...) per-tile values -> (..., H, W) raster, ``fill`` off tissue."""
        values = np.asarray(values)
        if values.shape[0] != len(self):
            raise ValueError(f"expected {len(self)} tile values, got {values.shape[0]}")
        trailing = values.shape[1:]
        raster = np.full((*trailing, *self.shape), fill, dtype=np.float32)
        raster[..., self.rows, self.cols] = np.moveaxis(values, 0, -1)
        return raster

    @property
    def grid(self) -> Grid:
        """The full grid the tiles sit on (one raster pixel per cell)."""
        return Grid(self.origin_xy, self.stride_px, self.shape)

    def placement(self, microns_per_pixel: float | None) -> dict:
        """``scale``/``translate`` (row, col) that put a raster from :meth:`to_raster`
        on its slide in napari (µm when the pixel size is known, else level-0 pixels)."""
        return self.grid.placement(microns_per_pixel)


def tile_grid(tissue: TissueMask, slide_shape: tuple[int, int], *, stride_px: float,
              min_tissue: float = 0.5, origin_xy: tuple[float, float] | None = None,
              shape: tuple[int, int] | None = None) -> TileGrid:
    """Tiles every ``stride_px`` level-0 pixels (:func:`napari_hinge.geometry.slide_grid`)
    whose centre area is at least ``min_tissue`` tissue (measured on the mask). ``origin_xy``
    (level-0 centre of tile (0, 0)) and ``shape`` (rows, cols) place the grid on another
    lattice, e.g. the dense encoder's cells (:func:`napari_hinge.dense.cell_geometry`)."""
    grid = slide_grid(slide_shape, stride_px)
    if origin_xy is not None or shape is not None:
        grid = Grid(grid.origin_xy if origin_xy is None else
                    (float(origin_xy[0]), float(origin_xy[1])),
                    grid.step_px, grid.shape if shape is None else (int(shape[0]), int(shape[1])))
    rows, cols, centers = grid.cells()
    keep = tissue.coverage_at(centers, stride_px) >= min_tissue
    if not keep.any():
        raise ValueError("no tile has enough tissue; lower min_tissue or the stride")
    return TileGrid(
        centers_xy=centers[keep],
        rows=rows[keep],
        cols=cols[keep],
        shape=grid.shape,
        origin_xy=grid.origin_xy,
        stride_px=grid.step_px,
    )
