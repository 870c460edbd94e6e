"""Fill sparse regions of a slide with synthetic H&E tiles, and hand them out as training pairs.

1. **Where**: a polygon in level-0 pixels (:func:`tiles_in_polygon`), or tissue tiles farther
   than ``n_spacings`` spot spacings from any measured spot (:func:`propose_sparse_tiles`).
   Tiles sit edge to edge on a grid whose step is the model's patch (112 µm of tissue).
2. **What expression**: per tile, from the measured neighbours (inverse-distance weighted k
   nearest spots, :func:`expression_from_neighbours`) or from a HINGE model applied to the real
   H&E under the tile (:func:`expression_from_hinge`).
3. **Generate**: DDIM with classifier-free guidance from a :class:`~napari_hinge.c2l.local.
   LocalModel`, by default as one seamless canvas of overlapping windows
   (:mod:`~napari_hinge.c2l.canvas`; ``seamless=False``: independent tiles, about four times
   cheaper, with visible seams), then an RGBA mosaic (alpha 0 outside the tiles) with the
   ``scale`` / ``translate`` that lays it exactly over the region in napari. The slide is never
   modified.
4. :func:`as_training_pairs` turns a :class:`FillResult` into ``(features, expression, genes)``
   for :func:`napari_hinge.hinge.pipeline.fit_hinge_arrays` (or patches, for any other model),
   the tiles encoded exactly as the slide's real spots (:func:`napari_hinge.c2l.pairs.
   encode_pairs`); :func:`napari_hinge.c2l.pairs.pairs_from_fill` for the pairs file.
"""

from __future__ import annotations

from collections.abc import Generator, Sequence
from dataclasses import dataclass, field

import numpy as np

from napari_hinge._convention import META_KEY, SPATIAL_KEY
from napari_hinge._progress import ProgressEvent
from napari_hinge.defaults import C2L_FILL, SAMPLER
from napari_hinge.geometry import edge_placement, region_grid, spot_pitch_px
from napari_hinge.patches import slide_path as slide_file
from napari_hinge.training import StopToken

from .local import LocalModel


@dataclass
class TileLayout:
    """Tile centres on an edge-to-edge grid: centre of (row r, col c) is
    ``origin_xy + (c, r) * side_px`` in level-0 pixels."""

    centers_xy: np.ndarray
    rows: np.ndarray
    cols: np.ndarray
    origin_xy: tuple[float, float]
    side_px: float

    def __len__(self) -> int:
        return len(self.centers_xy)

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.rows.max()) + 1, int(self.cols.max()) + 1

    def compact(self) -> TileLayout:
        """Drop empty leading rows/columns (the mosaic starts at the first tile)."""
        r0, c0 = int(self.rows.min()), int(self.cols.min())
        origin = (self.origin_xy[0] + c0 * self.side_px, self.origin_xy[1] + r0 * self.side_px)
        return TileLayout(self.centers_xy, self.rows - r0, self.cols - c0, origin, self.side_px)


@dataclass
class FillResult:
    """Synthetic tiles over a region and how to place them."""

    mosaic: np.ndarray  # (R*S, C*S, 4) uint8 RGBA, alpha 0 where no tile
    layout: TileLayout
    patches: np.ndarray  # (n, S, S, 3) uint8
    expression: np.ndarray  # (n, G) float32: the conditioning expression of each tile
    genes: list[str]
    microns_per_pixel: float | None
    params: dict = field(default_factory=dict)

    @property
    def tile_size(self) -> int:
        return int(self.patches.shape[1])

    def placement(self) -> dict:
        """``scale`` / ``translate`` (row, col) putting :attr:`mosaic` over its region in napari,
        in µm when the slide's pixel size is known (as the slide layer), else level-0 pixels.

        Mosaic pixel ``j`` of the tile starting at level-0 pixel ``x0`` has size ``d = side /
        S`` (:func:`napari_hinge.geometry.edge_placement` holds the half-pixel convention).
        """
        d = self.layout.side_px / self.tile_size
        x0 = self.layout.origin_xy[0] - self.layout.side_px / 2
        y0 = self.layout.origin_xy[1] - self.layout.side_px / 2
        return edge_placement((x0, y0), d, self.microns_per_pixel)

    def table(self):
        """Per-tile table: row, col, x, y (level-0 px) and the conditioning expression."""
        import pandas as pd

        df = pd.DataFrame({"row": self.layout.rows, "col": self.layout.cols,
                           "x": self.layout.centers_xy[:, 0], "y": self.layout.centers_xy[:, 1]})
        expr = pd.DataFrame(self.expression, columns=self.genes)
        return pd.concat([df, expr], axis=1)

    def tile_index_raster(self) -> np.ndarray:
        """``(R, C)`` int array: index of the tile at each grid cell, -1 where none."""
        out = np.full(self.layout.shape, -1, np.int64)
        out[self.layout.rows, self.layout.cols] = np.arange(len(self.layout))
        return out


# ---------------------------------------------------------------------------------------------
# where


def spot_spacing_px(adata) -> float:
    """Median nearest-neighbour distance between measured spots (level-0 px)."""
    pitch = spot_pitch_px(adata.obsm[SPATIAL_KEY])
    if pitch is None:
        raise ValueError("at least 2 measured spots are needed to know their spacing")
    return pitch


def tile_side_px(model_or_um, microns_per_pixel: float | None) -> float:
    """Level-0 side of one generated tile (the model's ``patch_um`` of tissue)."""
    patch_um = model_or_um if isinstance(model_or_um, (int, float)) else \
        model_or_um.central.config.patch_um
    if not microns_per_pixel:
        raise ValueError("the slide's pixel size (µm/px) is unknown; C2L tiles have a physical "
                         "size: set it on the slide first")
    return float(patch_um) / float(microns_per_pixel)


def propose_sparse_tiles(slide, adata, *, side_px: float, n_spacings: float = 0.6,
                         min_tissue: float = 0.5, tissue=None) -> TileLayout:
    """Tissue tiles whose centre is farther than ``n_spacings`` spot spacings from every
    measured spot.

    Raises ValueError when no tissue tile is that far (nothing to fill).
    """
    from scipy.spatial import cKDTree

    from napari_hinge.tissue import tile_grid, tissue_mask

    tissue = tissue if tissue is not None else tissue_mask(slide)
    grid = tile_grid(tissue, slide.shape, stride_px=side_px, min_tissue=min_tissue)
    spacing = spot_spacing_px(adata)
    d, _ = cKDTree(np.asarray(adata.obsm[SPATIAL_KEY], float)).query(grid.centers_xy)
    far = d > n_spacings * spacing
    if not far.any():
        raise ValueError(f"no tissue tile is farther than {n_spacings} spot spacings "
                         f"({n_spacings * spacing:.0f} px) from a measured spot")
    return TileLayout(grid.centers_xy[far], grid.rows[far], grid.cols[far], grid.origin_xy,
                      float(side_px)).compact()


def tiles_in_polygon(polygon_xy, *, side_px: float, slide=None, min_tissue: float = 0.0,
                     tissue=None) -> TileLayout:
    """Tiles (edge to edge from the polygon's top-left corner) whose centre is inside the
    polygon ``(V, 2)`` (x, y level-0 px); with ``min_tissue > 0`` also on tissue."""
    from matplotlib.path import Path as MplPath

    poly = np.asarray(polygon_xy, dtype=float)
    if poly.ndim != 2 or poly.shape[1] != 2 or len(poly) < 3:
        raise ValueError(f"a region polygon needs >= 3 (x, y) vertices, got shape {poly.shape}")
    grid = region_grid(poly.min(0), poly.max(0), side_px)
    rows, cols, centres = grid.cells()
    keep = MplPath(poly).contains_points(centres)
    if min_tissue > 0:
        from napari_hinge.tissue import tissue_mask

        tissue = tissue if tissue is not None else tissue_mask(slide)
        keep &= tissue.coverage_at(centres, side_px) >= min_tissue
    if not keep.any():
        raise ValueError("the region holds no tile centre"
                         + (" on tissue" if min_tissue > 0 else "")
                         + f" (tile side {side_px:.0f} px); draw a larger region")
    return TileLayout(centres[keep], rows[keep], cols[keep], grid.origin_xy,
                      float(side_px)).compact()


# ---------------------------------------------------------------------------------------------
# what expression


def expression_from_neighbours(adata, genes: Sequence[str], xy, *, k: int = 6,
                               power: float = 1.0) -> np.ndarray:
    """Inverse-distance weighted mean of the ``k`` nearest measured spots' expression
    (``log1p`` CP10k over ``genes``) at positions ``xy`` ``(n, 2)``."""
    from scipy.spatial import cKDTree

    from napari_hinge.hinge.pipeline import transform_values

    values, missing = transform_values(adata, list(genes))
    if missing:
        raise KeyError(f"{len(missing)} genes of the local model are not measured in the data: "
                       f"{', '.join(missing[:20])}")
    spots = np.asarray(adata.obsm[SPATIAL_KEY], dtype=float)
    k = int(min(k, len(spots)))
    if k < 1:
        raise ValueError("no measured spots to take expression from")
    d, idx = cKDTree(spots).query(np.asarray(xy, float), k=k)
    d, idx = d.reshape(len(xy), k), idx.reshape(len(xy), k)
    w = 1.0 / np.maximum(d, 1e-6) ** power
    w /= w.sum(1, keepdims=True)
    return np.einsum("nk,nkg->ng", w, values[idx]).astype(np.float32)


def expression_from_hinge(model, slide_path, xy, genes: Sequence[str], *, side_px: int,
                          mpp: float | None = None, n_samples: int = SAMPLER["slide_samples"],
                          reveal_steps: int | None = SAMPLER["reveal_steps"], seed: int = 0,
                          progress=None) -> np.ndarray:
    """Mean of HINGE samples at positions ``xy`` (from the real H&E under each tile), over the
    local model's ``genes`` (KeyError naming those the HINGE model does not predict). ``mpp``
    (µm per pixel) places the tiles for a model with neighbour context."""
    from napari_hinge.encoders import get_encoder
    from napari_hinge.features import encode_spots
    from napari_hinge.hinge.pipeline import model_inputs
    from napari_hinge.hinge.sampler import sample

    hgenes = list(model.config.genes)
    missing = [g for g in genes if g not in hgenes]
    if missing:
        raise KeyError(f"the HINGE model does not predict {len(missing)} genes of the local "
                       f"model: {', '.join(missing[:20])}; use neighbour expression or adapt "
                       "the local model on the HINGE genes")
    vt = getattr(model.config, "value_transform", "log1p_cp10k")
    if vt not in (None, "log1p_cp10k"):
        raise ValueError(f"the HINGE model predicts {vt!r} values; the local model is "
                         "conditioned on log1p_cp10k")
    if not model.config.encoder:
        raise ValueError("the HINGE model records no encoder")
    feats = encode_spots(slide_path, np.asarray(xy, float), encoder=get_encoder(
        model.config.encoder), side_px=int(side_px), progress=progress)
    coords = None
    if model.config.context_um:
        if not mpp:
            raise ValueError(f"{slide_path}: the pixel size is needed to place the tiles for "
                             "the HINGE model's neighbour context")
        coords = np.asarray(xy, float) * float(mpp)
    res = sample(model, model_inputs(model, feats, coords), n_samples=n_samples,
                 reveal_steps=reveal_steps, seed=seed)
    mean = res.mean.numpy()
    return mean[:, [hgenes.index(g) for g in genes]].astype(np.float32)


# ---------------------------------------------------------------------------------------------
# generate


def assemble_mosaic(patches: np.ndarray, layout: TileLayout) -> np.ndarray:
    """RGBA mosaic ``(R*S, C*S, 4)``: each tile at its grid cell, alpha 0 elsewhere."""
    s = patches.shape[1]
    r, c = layout.shape
    mosaic = np.zeros((r * s, c * s, 4), np.uint8)
    for p, row, col in zip(patches, layout.rows, layout.cols, strict=True):
        mosaic[row * s:(row + 1) * s, col * s:(col + 1) * s, :3] = p
        mosaic[row * s:(row + 1) * s, col * s:(col + 1) * s, 3] = 255
    return mosaic


def cut_tiles(canvas: np.ndarray, layout: TileLayout, size: int) -> np.ndarray:
    """The ``(n, S, S, 3)`` tiles of an RGB canvas ``(R*S, C*S, 3)`` at the layout's cells."""
    return np.stack([canvas[r * size:(r + 1) * size, c * size:(c + 1) * size]
                     for r, c in zip(layout.rows, layout.cols, strict=True)])


def slide_under_layout(slide, layout: TileLayout, size: int) -> np.ndarray:
    """The real H&E under a layout's grid, ``(R*size, C*size, 3)`` uint8: read in one piece
    (so it has no seams of its own making) and resized to ``size`` px per tile, to set beside
    or measure against a fill's mosaic."""
    from PIL import Image

    n_rows, n_cols = layout.shape
    x0 = layout.origin_xy[0] - layout.side_px / 2
    y0 = layout.origin_xy[1] - layout.side_px / 2
    w, h = int(round(n_cols * layout.side_px)), int(round(n_rows * layout.side_px))
    rgb = slide.read_region(int(round(x0)), int(round(y0)), w, h, level=0)
    return np.asarray(Image.fromarray(rgb).resize((n_cols * size, n_rows * size),
                                                  Image.Resampling.LANCZOS))


def fill_region_iter(local: LocalModel, slide, adata, *, region=None,
                     n_spacings: float = C2L_FILL["n_spacings"], source=C2L_FILL["source"],
                     hinge_model=None, k: int = C2L_FILL["k"],
                     guidance: float = C2L_FILL["guidance"], steps: int = C2L_FILL["steps"],
                     seed: int = C2L_FILL["seed"], max_tiles: int | None = C2L_FILL["max_tiles"],
                     batch_size: int = 32, strength: float = C2L_FILL["strength"],
                     seamless: bool = True,
                     stop: StopToken | None = None, device=None
                     ) -> Generator[ProgressEvent, None, FillResult | None]:
    """Generate synthetic tiles over a region; a generator of ProgressEvents ('step' per
    denoising step of a batch, 'stopped' or 'done') whose value is a :class:`FillResult`
    (``None`` when stopped: nothing half-made is returned).

    Parameters
    ----------
    local
        The adapted :class:`LocalModel`.
    slide
        The slide (``read_region``, ``shape``, ``levels``) the spots sit on.
    adata
        Measured spots (convention of ``napari_hinge._convention``); their pixel size sets
        the tile size, their positions the sparse-region proposal and neighbour expression.
    region
        ``(V, 2)`` polygon (x, y) in level-0 px, or ``None`` to propose tissue farther than
        ``n_spacings`` spot spacings from any spot.
    source
        ``'neighbours'`` (IDW over ``k`` nearest spots) or ``'hinge'`` (``hinge_model``, or the
        shipped HINGE model when ``None``).
    guidance, steps, seed
        Classifier-free guidance scale, DDIM steps, random seed.
    max_tiles
        Refuse regions with more tiles (ValueError) instead of running for hours.
    strength
        1: generate every tile from noise; below 1: edit the real H&E under each tile toward
        its expression (SDEdit; lower keeps more of the slide's morphology).
    seamless
        Sample the region as one canvas of overlapping windows (no seams between neighbouring
        tiles; about four times the work inside a filled rectangle), or each tile on its own.
    """
    stop = stop or StopToken()
    meta = adata.uns.get(META_KEY, {})
    mpp = meta.get("microns_per_pixel") or getattr(slide, "microns_per_pixel", None)
    side = tile_side_px(local, mpp)
    if region is None:
        layout = propose_sparse_tiles(slide, adata, side_px=side, n_spacings=n_spacings)
    else:
        layout = tiles_in_polygon(region, side_px=side)
    if max_tiles is not None and len(layout) > max_tiles:
        raise ValueError(f"the region holds {len(layout)} tiles (> max_tiles={max_tiles}); "
                         "draw a smaller region")
    genes = local.genes
    if source == "neighbours":
        expression = expression_from_neighbours(adata, genes, layout.centers_xy, k=k)
    elif source == "hinge":
        if hinge_model is None:
            from napari_hinge.hinge.pipeline import load_model

            hinge_model = load_model("shipped")
        slide_path = meta.get("slide_path") or getattr(slide, "path", None)
        from napari_hinge.patches import patch_side_px

        expression = expression_from_hinge(hinge_model, slide_path, layout.centers_xy, genes,
                                           side_px=patch_side_px(adata),
                                           mpp=mpp, seed=seed)
    else:
        raise ValueError(f"unknown expression source {source!r}; use 'neighbours' or 'hinge'")
    init = None
    if strength < 1:
        from napari_hinge.patches import spot_patches

        init = spot_patches(slide, layout.centers_xy, side_px=side,
                            out_size=local.central.config.image_size)
    if seamless:
        from .canvas import sample_canvas_iter

        gen = sample_canvas_iter(local, layout.rows, layout.cols, expression,
                                 guidance=guidance, steps=steps, seed=seed,
                                 batch_size=batch_size, device=device, init=init,
                                 strength=strength)
    else:
        gen = local.sample_iter(expression, guidance=guidance, steps=steps, seed=seed,
                                batch_size=batch_size, device=device, init=init,
                                strength=strength)
    total = len(layout) * steps
    while True:
        if stop.requested:
            gen.close()
            yield ProgressEvent("stopped", None, 0, total)
            return None
        try:
            done, total = next(gen)
        except StopIteration as fin:
            generated = fin.value
            break
        yield ProgressEvent("step", None, done, total)
    params = {"source": source, "guidance": float(guidance), "steps": int(steps),
              "seed": int(seed), "n_tiles": len(layout), "tile_side_px": side,
              "n_spacings": None if region is not None else float(n_spacings),
              "region": "polygon" if region is not None else "proposed sparse tissue",
              "k": int(k), "genes": genes, "patch_um": local.central.config.patch_um,
              "strength": float(strength), "seamless": bool(seamless),
              "slide_path": slide_file(slide)}
    # a canvas covers exactly the layout's cells: its tiles put back in place are the canvas
    patches = (cut_tiles(generated, layout, local.central.config.image_size) if seamless
               else generated)
    result = FillResult(assemble_mosaic(patches, layout), layout, patches, expression, genes,
                        mpp, params)
    yield ProgressEvent("done", None, total, total, metrics={"n_tiles": len(layout)})
    return result


def fill_region(local: LocalModel, slide, adata, **kwargs) -> FillResult:
    """:func:`fill_region_iter` run to the end."""
    from napari_hinge.training import run_to_end

    result, _ = run_to_end(fill_region_iter(local, slide, adata, **kwargs))
    return result


# ---------------------------------------------------------------------------------------------
# training pairs


def as_training_pairs(result: FillResult, *, encoder="efficientnet-lite0", features: bool = True,
                      batch_size: int = 8, progress=None
                      ) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Synthetic pairs for an expression predictor.

    Returns ``(X, expression, genes)``: ``X`` = encoder features ``(n, F)`` (``features=True``;
    ready for :func:`napari_hinge.hinge.pipeline.fit_hinge_arrays` next to real spots encoded
    the same way) or the uint8 patches ``(n, S, S, 3)``; ``expression`` ``(n, G)`` is the
    conditioning expression (``log1p`` CP10k) over ``genes``.
    """
    if not features:
        return result.patches, result.expression, list(result.genes)
    from .pairs import encode_pairs, pairs_from_fill

    # encoded as a real spot of this slide is (same field of view, same pixels into the encoder)
    feats = encode_pairs(pairs_from_fill(result), encoder=encoder,
                         side_px=int(round(result.layout.side_px)), batch_size=batch_size,
                         progress=progress)
    return feats, result.expression, list(result.genes)
