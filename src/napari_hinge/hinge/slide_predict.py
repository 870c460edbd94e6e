"""Whole-slide HINGE: predicted expression maps over all the tissue of a slide.

Two paths, both generators of ProgressEvents (the CLI shows a progress bar, the widget a
progress bar with Cancel) returning a :class:`SlidePrediction` (``genes x H x W`` mean and
standard-deviation rasters with the scale and translation, µm, that place them on the slide):

- :func:`predict_slide_dense_iter` (the default, ``defaults.SLIDE``): the encoder once over
  the tissue (:mod:`napari_hinge.dense`), the model's prior at every 16 µm cell, HINGE's
  samples every ``sample_stride_um`` interpolated, previews streamed as it goes;
- :func:`predict_slide_iter`: tissue mask -> tile grid at a chosen stride -> batched
  encoding (cached) -> S samples per tile.
"""

from __future__ import annotations

from collections.abc import Generator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from napari_hinge._progress import ProgressEvent
from napari_hinge.geometry import FIELD_OF_VIEW_UM
from napari_hinge.training import StopToken


@dataclass
class SlidePrediction:
    """Per-tile predictions and the rasters napari shows."""

    genes: list[str]
    mean: np.ndarray  # (n_tiles, G)
    std: np.ndarray  # (n_tiles, G)
    grid: object  # napari_hinge.tissue.TileGrid
    slide_path: str
    microns_per_pixel: float
    params: dict = field(default_factory=dict)
    prior: np.ndarray | None = None  # (n_tiles, G) the model's deterministic prior (dense)
    _rasters: dict = field(default_factory=dict, repr=False, compare=False)

    def raster(self, which: str = "mean", genes: Sequence[str] | None = None) -> np.ndarray:
        """(G', H, W) float32 raster of the mean, std (or prior); NaN off tissue. All
        genes' rasters are kept (:meth:`warm` makes them in a worker, not in the GUI)."""
        if not genes and which in self._rasters:
            return self._rasters[which]
        values = {"mean": self.mean, "std": self.std, "prior": self.prior}[which]
        if values is None:
            raise ValueError(f"this prediction has no {which!r} values")
        idx = [self.genes.index(g) for g in genes] if genes else slice(None)
        raster = self.grid.to_raster(values[:, idx])
        if not genes:
            self._rasters[which] = raster
        return raster

    def warm(self) -> SlidePrediction:
        """Make the mean and std rasters now (a worker does, so the viewer only shows them)."""
        self.raster("mean")
        self.raster("std")
        return self

    @property
    def placement(self) -> dict:
        """``scale``/``translate`` (µm, row/col) of a raster pixel on the slide."""
        return self.grid.placement(self.microns_per_pixel)

    def at(self, xy, which: str = "mean") -> np.ndarray:
        """Values at level-0 (x, y) positions (N, 2): bilinear between map positions (a
        neighbour off the tissue takes the nearest value on it; NaN where the nearest map
        position is off the map): how a map is read at measured spots."""
        from scipy.ndimage import distance_transform_edt, map_coordinates

        raster = self.raster(which)
        xy = np.asarray(xy, dtype=np.float64)
        rows = (xy[:, 1] - self.grid.origin_xy[1]) / self.grid.stride_px
        cols = (xy[:, 0] - self.grid.origin_xy[0]) / self.grid.stride_px
        valid = np.isfinite(raster[0])
        _, (ri, ci) = distance_transform_edt(~valid, return_indices=True)
        filled = raster[:, ri, ci]
        out = np.stack([map_coordinates(ch, [rows, cols], order=1, mode="nearest")
                        for ch in filled], 1)
        r, c = np.rint(rows).astype(int), np.rint(cols).astype(int)
        inside = (r >= 0) & (r < valid.shape[0]) & (c >= 0) & (c < valid.shape[1])
        on = np.zeros(len(xy), bool)
        on[inside] = valid[r[inside], c[inside]]
        out[~on] = np.nan
        return out

    def to_adata(self):
        """Per-tile AnnData: X = mean, layers['std'], obsm['spatial'] in slide pixels, so
        scanpy's spatial plots work on it."""
        import anndata as ad
        import pandas as pd

        from napari_hinge._convention import META_KEY, SPATIAL_KEY

        names = [f"tile_{r}_{c}" for r, c in zip(self.grid.rows, self.grid.cols, strict=True)]
        out = ad.AnnData(X=self.mean.astype(np.float32),
                         obs=pd.DataFrame({"row": self.grid.rows, "col": self.grid.cols},
                                          index=names),
                         var=pd.DataFrame(index=pd.Index(self.genes)))
        out.layers["std"] = self.std.astype(np.float32)
        out.obsm[SPATIAL_KEY] = np.asarray(self.grid.centers_xy, dtype=float)
        out.uns[META_KEY] = {"microns_per_pixel": self.microns_per_pixel,
                             "spot_diameter_px": float(self.grid.stride_px),
                             "slide_path": self.slide_path, "source": self.slide_path,
                             "format": "hinge_tiles"}
        out.uns["hinge_slide"] = {k: v for k, v in self.params.items() if v is not None}
        return out


def _slide_request(model, slide, *, genes, n_samples, reveal_steps, mpp):
    """What both slide paths check first: the sampler's defaults filled in, the slide opened
    with a known pixel size, the asked genes in the model's panel. Returns ``(slide, mpp,
    genes, gene_idx, n_samples, reveal_steps)``."""
    from napari_hinge.io.slides import open_slide

    from .pipeline import SAMPLER, unknown_genes_message

    n_samples = SAMPLER["slide_samples"] if n_samples is None else n_samples
    reveal_steps = SAMPLER["reveal_steps"] if reveal_steps is None else reveal_steps
    if not hasattr(slide, "levels"):
        slide = open_slide(slide, mpp=mpp)
    mpp = mpp or slide.microns_per_pixel
    if not mpp:
        raise ValueError(f"{slide.path}: the pixel size is unknown; pass mpp= (µm per pixel)")
    all_genes = list(model.config.genes)
    genes = list(genes) if genes else all_genes
    unknown = [g for g in genes if g not in all_genes]
    if unknown:
        raise KeyError(unknown_genes_message(unknown, all_genes))
    return slide, mpp, genes, [all_genes.index(g) for g in genes], n_samples, reveal_steps


def predict_slide_iter(model, slide, *, stride_um: float | None = None,
                       genes: Sequence[str] | None = None, n_samples: int | None = None,
                       reveal_steps: int | None = None, batch_tiles: int = 64, seed: int = 0,
                       mpp: float | None = None, min_tissue: float = 0.5,
                       stop: StopToken | None = None, cache: bool = True,
                       ) -> Generator[ProgressEvent, None, SlidePrediction | None]:
    """Predict ``genes`` (default: all the model's) on a tile grid over the tissue.

    Parameters
    ----------
    model
        A trained HINGE model (:func:`napari_hinge.hinge.pipeline.load_model`).
    slide
        A :class:`~napari_hinge.io.slides.Slide` or a path.
    stride_um
        Distance between tile centres (default: the patch side, 112 µm, about one spot
        pitch; a quarter of that gives sub-spot maps).
    n_samples, reveal_steps, seed
        Sampler settings (S samples per tile: mean = map, std = uncertainty).
    batch_tiles
        Tiles encoded and sampled per step (one progress event each).

    Yields 'step' events (``metrics['phase']``: 'encode' then 'sample', one per batch of
    tiles); returns the :class:`SlidePrediction` (``std``: the calibrated uncertainty when
    the model ships a calibration), or None when stopped.
    """
    from napari_hinge.features import encode_spots
    from napari_hinge.tissue import tile_grid, tissue_mask

    from .pipeline import calibrated_uncertainty, model_inputs, resolve_encoder
    from .sampler import sample

    slide, mpp, genes, gene_idx, n_samples, reveal_steps = _slide_request(
        model, slide, genes=genes, n_samples=n_samples, reveal_steps=reveal_steps, mpp=mpp)
    side_px = int(round(FIELD_OF_VIEW_UM / mpp))  # tiles have no spot: the field of view
    stride_px = (stride_um or FIELD_OF_VIEW_UM) / mpp
    grid = tile_grid(tissue_mask(slide), slide.shape, stride_px=stride_px,
                     min_tissue=min_tissue)
    encoder = resolve_encoder(model.config.encoder)
    n = len(grid)
    n_batches = (n + batch_tiles - 1) // batch_tiles
    # encode every tile first: a tile's neighbour context needs its neighbours' features
    feats = None
    for b in range(n_batches):
        if stop is not None and stop.requested:
            yield ProgressEvent("stopped", None, b, 2 * n_batches)
            return None
        sl = slice(b * batch_tiles, min(n, (b + 1) * batch_tiles))
        f = encode_spots(slide, grid.centers_xy[sl], encoder=encoder, side_px=side_px,
                         cache=cache)
        if feats is None:
            feats = np.empty((n, f.shape[-1]), np.float32)
        feats[sl] = f
        yield ProgressEvent("step", None, b + 1, 2 * n_batches,
                         metrics={"phase": "encode", "tiles": sl.stop, "of": n})
    inputs = model_inputs(model, feats, np.asarray(grid.centers_xy, np.float64) * mpp)
    cal = getattr(model, "calibration", None)
    depth = None
    if cal is not None and cal.uses_depth:  # relative to the slide: over all tiles at once
        import torch

        with torch.no_grad():
            depth = cal.depth(model.prior_mean(torch.as_tensor(inputs)).numpy())
    mean = np.empty((n, len(genes)), np.float32)
    std = np.empty((n, len(genes)), np.float32)
    for b in range(n_batches):
        if stop is not None and stop.requested:
            yield ProgressEvent("stopped", None, n_batches + b, 2 * n_batches)
            return None
        sl = slice(b * batch_tiles, min(n, (b + 1) * batch_tiles))
        res = sample(model, inputs[sl], n_samples=n_samples, reveal_steps=reveal_steps,
                     seed=seed + b)
        m = res.mean.numpy()[:, gene_idx]
        mean[sl] = m
        std[sl] = calibrated_uncertainty(model, m, res.std.numpy()[:, gene_idx], genes=genes,
                                         depth=None if depth is None else depth[sl])["std"]
        yield ProgressEvent("step", None, n_batches + b + 1, 2 * n_batches,
                         metrics={"phase": "sample", "tiles": sl.stop, "of": n})
    params = {"stride_um": float(stride_px * mpp), "patch_um": FIELD_OF_VIEW_UM,
              "n_samples": n_samples,
              "reveal_steps": reveal_steps, "seed": seed, "encoder": model.config.encoder,
              "n_tiles": n, "min_tissue": min_tissue,
              "value_transform": model.config.value_transform,
              "context_um": model.config.context_um,
              "uncertainty": "calibrated sd" if getattr(model, "calibration", None) is not None
              else "raw sample spread"}
    return SlidePrediction(genes=genes, mean=mean, std=std, grid=grid,
                           slide_path=str(Path(slide.path)), microns_per_pixel=float(mpp),
                           params=params).warm()


def write_ome_tiff(prediction: SlidePrediction, path: str | Path, *, which: str = "mean"
                   ) -> Path:
    """The (genes, H, W) raster as a pyramidal OME-TIFF with µm pixel size, origin and gene
    channel names (:func:`napari_hinge.io.maps.write_map_ome_tiff`); written atomically."""
    from napari_hinge.io.maps import write_map_ome_tiff

    place = prediction.placement
    return write_map_ome_tiff(prediction.raster(which), prediction.genes, place["scale"],
                              place["translate"], path)


SLIDE_OUTPUTS = ("maps.ome.tif", "uncertainty.ome.tif", "tiles.h5ad")
# Folders next to them (``ome_zarr=True``): the same rasters as multiscale OME-Zarr (NGFF).
SLIDE_ZARR_OUTPUTS = ("maps.ome.zarr", "uncertainty.ome.zarr")
# ``spatialdata=True``: slide, maps, uncertainty (and spots) in one SpatialData store
SLIDE_SPATIALDATA_OUTPUT = "maps.sdata.zarr"


def write_spatialdata(prediction: SlidePrediction, path: str | Path, *, spots=None) -> Path:
    """Slide, maps and uncertainty (and the measured ``spots``, an AnnData on this slide,
    with the maps read at them as ``obs['pred_<gene>']``) as one SpatialData store in µm
    (:func:`napari_hinge.io.maps.write_maps_spatialdata`; ``spatialdata`` extra)."""
    from napari_hinge.io.maps import write_maps_spatialdata
    from napari_hinge.io.slides import open_slide

    mpp = prediction.microns_per_pixel
    slide = open_slide(prediction.slide_path, mpp=mpp)
    values = compare_with_spots(prediction, spots)[0] if spots is not None else None
    place = prediction.placement
    return write_maps_spatialdata(
        path, slide=slide.levels[0], microns_per_pixel=mpp,
        maps={"hinge_mean": prediction.raster("mean"), "hinge_std": prediction.raster("std")},
        names=prediction.genes, scale=place["scale"], translate=place["translate"],
        spots=spots, spot_values=values)


def write_slide_outputs(prediction: SlidePrediction, folder: str | Path, *,
                        ome_zarr: bool = True, spatialdata: bool = False,
                        spots=None) -> dict[str, str]:
    """The files of ``hinge predict-slide`` in ``folder``: the mean and the uncertainty rasters
    as pyramidal OME-TIFFs (QuPath) and the per-tile AnnData, with ``ome_zarr`` the rasters
    as multiscale OME-Zarr too, with ``spatialdata`` slide, rasters and ``spots`` as one
    SpatialData store (each written atomically); returns name -> path."""
    from napari_hinge._files import atomic_write

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    maps, uncertainty, tiles_name = (folder / name for name in SLIDE_OUTPUTS)
    write_ome_tiff(prediction, maps)
    write_ome_tiff(prediction, uncertainty, which="std")
    tiles = prediction.to_adata()
    atomic_write(tiles_name, lambda tmp: tiles.write_h5ad(tmp))
    written = {"maps": str(maps), "uncertainty": str(uncertainty), "tiles": str(tiles_name)}
    if ome_zarr:
        maps_zarr, uncertainty_zarr = (folder / name for name in SLIDE_ZARR_OUTPUTS)
        write_ome_zarr(prediction, maps_zarr)
        write_ome_zarr(prediction, uncertainty_zarr, which="std")
        written |= {"maps_zarr": str(maps_zarr), "uncertainty_zarr": str(uncertainty_zarr)}
    if spatialdata:
        written["spatialdata"] = str(write_spatialdata(
            prediction, folder / SLIDE_SPATIALDATA_OUTPUT, spots=spots))
    return written


def compare_with_spots(prediction: SlidePrediction, adata
                       ) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """The predicted map read at measured spots (:meth:`SlidePrediction.at`: bilinear between
    map positions) against their measurements.

    Returns ``values`` (gene -> per-spot prediction, NaN where the map has no value) and
    ``scores`` (gene -> Pearson r over the spots with a value, for genes ``adata`` measures,
    on the log1p CP10k scale the model predicts).
    """
    from napari_hinge._convention import SPATIAL_KEY
    from napari_hinge._layers import gene_values
    from napari_hinge.metrics import gene_pearson

    at_spots = prediction.at(np.asarray(adata.obsm[SPATIAL_KEY], dtype=float))
    values, scores = {}, {}
    for i, gene in enumerate(prediction.genes):
        predicted = at_spots[:, i].astype(np.float32)
        values[gene] = predicted
        if gene in adata.var_names:
            ok = np.isfinite(predicted)
            if ok.sum() > 2:
                measured = gene_values(adata, gene)
                scores[gene] = float(gene_pearson(predicted[ok, None], measured[ok, None])[0])
    return values, scores


def write_ome_zarr(prediction: SlidePrediction, path: str | Path, *, which: str = "mean"
                   ) -> Path:
    """The (genes, H, W) raster as a multiscale OME-Zarr (NGFF 0.4) placed on the slide in
    µm (:func:`napari_hinge.io.maps.write_map_ome_zarr`)."""
    from napari_hinge.io.maps import write_map_ome_zarr

    place = prediction.placement
    return write_map_ome_zarr(prediction.raster(which), prediction.genes, place["scale"],
                              place["translate"], path, name=f"hinge {which}")


# ---------------------------------------------------------------------------------------------
# dense maps


def dense_projection(model, encoder, gene_idx, prior_mix=None
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(A_self, A_ctx, const)``: encoder cell features (F) -> the model's first affine
    maps (prior of the genes ``gene_idx``, then ``prior @ prior_mix`` for a (G_model, E)
    ``prior_mix`` such as the calibration's depth map, then the image code), with the
    shipped dense adapter and the feature standardisation folded in. A cell's network value
    is ``f @ A_self + mean_neighbours(f) @ A_ctx - section_mean + const``."""
    from napari_hinge.dense import load_adapter

    weight, bias = (t.double().numpy() for t in model.image_linear())
    G = model.n_genes
    mixed_w = np.zeros((weight.shape[0], 0)) if prior_mix is None else \
        weight[:, :G] @ np.asarray(prior_mix, np.float64)
    mixed_b = np.zeros(0) if prior_mix is None else bias[:G] @ np.asarray(prior_mix, np.float64)
    idx = np.asarray(gene_idx, int)
    weight = np.concatenate([weight[:, idx], mixed_w, weight[:, G:]], 1)
    bias = np.concatenate([bias[idx], mixed_b, bias[G:]])
    # the network standardises its features itself: fold that in too
    mean = model.feature_mean.detach().double().cpu().numpy()
    std = model.feature_std.detach().double().cpu().numpy()
    weight = weight / std[:, None]
    bias = bias - mean @ weight
    F = encoder.dim
    halves = [weight[:F], weight[F:]] if model.config.context_um else [weight, None]
    adapter = load_adapter(encoder)
    if adapter is not None:
        aw, ab = (np.asarray(a, np.float64) for a in adapter)
        if not model.config.center_sections:  # centring removes the adapter's offset
            bias = bias + sum(ab @ h for h in halves if h is not None)
        halves = [None if h is None else aw @ h for h in halves]
    return (halves[0].astype(np.float32),
            None if halves[1] is None else halves[1].astype(np.float32),
            bias.astype(np.float32))


def _spread(values: np.ndarray, have: np.ndarray, on: np.ndarray) -> np.ndarray:
    """Fill the ``on`` cells of (C, H, W) ``values`` that are not in ``have`` with the
    nearest cell that is (a preview before every tile is encoded or sampled)."""
    import torch
    from scipy.ndimage import distance_transform_edt

    if have.all() or not have.any():
        return values
    _, (ri, ci) = distance_transform_edt(~have, return_indices=True)
    v = torch.from_numpy(np.ascontiguousarray(values))  # torch: no GIL held while indexing
    out = v[:, torch.from_numpy(ri), torch.from_numpy(ci)]
    return torch.where(torch.from_numpy(on)[None], out, v).numpy()


def _smooth_upsample(values: np.ndarray, rows, cols, shape, step: int) -> np.ndarray:
    """(N, C) values at lattice cells ``rows``/``cols`` (every ``step`` cells) -> (C, H, W)
    over the cell grid, by normalised bilinear interpolation (cells beyond the sampled
    ones take the nearest sampled value)."""
    import torch
    import torch.nn.functional as F

    lr, lc = rows // step, cols // step
    H, W = shape
    lh, lw = (H + step - 1) // step + 1, (W + step - 1) // step + 1
    lattice = np.zeros((values.shape[1], lh, lw), np.float32)
    weight = np.zeros((lh, lw), np.float32)
    lattice[:, lr, lc] = values.T
    weight[lr, lc] = 1.0
    lattice = _spread(lattice, weight > 0, np.ones_like(weight, bool))
    # cell (r, c) sits at lattice coordinate ((r - step // 2) / step, ...): bilinear, clamped
    gy = (torch.arange(H, dtype=torch.float32) - step // 2) / step
    gx = (torch.arange(W, dtype=torch.float32) - step // 2) / step
    gy = 2 * gy / max(lh - 1, 1) - 1
    gx = 2 * gx / max(lw - 1, 1) - 1
    grid = torch.stack(torch.meshgrid(gy, gx, indexing="ij")[::-1], dim=-1)[None]
    out = F.grid_sample(torch.from_numpy(lattice)[None], grid, mode="bilinear",
                        padding_mode="border", align_corners=True)
    return out[0].numpy()


def predict_slide_dense_iter(model, slide, *, stride_um: float | None = None,
                             sample_stride_um: float | None = None,
                             genes: Sequence[str] | None = None, n_samples: int | None = None,
                             reveal_steps: int | None = None, seed: int = 0,
                             mpp: float | None = None, min_tissue: float = 0.5,
                             stop: StopToken | None = None, device=None,
                             previews: bool = True, bf16: bool | str | None = None,
                             ) -> Generator[ProgressEvent, None, SlidePrediction | None]:
    """Dense whole-slide maps: the encoder once over the tissue, HINGE's prior at every
    16 µm cell, HINGE's samples (mean residual, calibrated uncertainty) every
    ``sample_stride_um``, interpolated onto the map.

    ``bf16``: the encoder in bfloat16 autocast, True, False or 'auto' (default
    ``defaults.SLIDE['encoder_bf16']``: where that is fast,
    :func:`~napari_hinge.device.fast_bf16`; benchmarks/predict_slide.py --accuracy measures
    what it costs on measured spots).

    Yields 'step' events; with ``previews`` an event carries ``metrics['preview']``, a
    :class:`SlidePrediction` of the map so far (the whole tissue from the first sixteenth of
    the tiles on, refined as tiles and samples arrive), so a viewer can paint it in place.
    Returns the final :class:`SlidePrediction` (``params['mode'] == 'dense'``), or the last
    preview when stopped (what is painted stays).
    """
    import torch
    import torch.nn.functional as F

    from napari_hinge.dense import (
        box_mean,
        cell_geometry,
        iter_cell_maps,
        load_adapter,
        neighbour_mean,
        tiles_over,
    )
    from napari_hinge.device import default_device, fast_bf16
    from napari_hinge.tissue import TileGrid, tile_grid, tissue_mask

    from .defaults import SLIDE
    from .pipeline import calibrated_uncertainty, resolve_encoder
    from .sampler import sample

    slide, mpp, genes, gene_idx, n_samples, reveal_steps = _slide_request(
        model, slide, genes=genes, n_samples=n_samples, reveal_steps=reveal_steps, mpp=mpp)
    stride_um = SLIDE["stride_um"] if stride_um is None else float(stride_um)
    sample_stride_um = SLIDE["sample_stride_um"] if sample_stride_um is None \
        else float(sample_stride_um)
    G = len(genes)
    device = default_device(device)
    bf16 = SLIDE["encoder_bf16"] if bf16 is None else bf16
    bf16 = fast_bf16(device) if bf16 == "auto" else bool(bf16)
    encoder = resolve_encoder(model.config.encoder).to(device)
    geom = cell_geometry(encoder, slide.shape[:2], mpp)
    cell_um = geom.stride_px * mpp
    cells = tile_grid(tissue_mask(slide), slide.shape[:2], stride_px=geom.stride_px,
                      min_tissue=min_tissue, origin_xy=geom.origin_xy, shape=geom.shape)
    inside = (cells.centers_xy >= -0.5).all(1) & \
        (cells.centers_xy[:, 0] < slide.shape[1] - 0.5) & \
        (cells.centers_xy[:, 1] < slide.shape[0] - 0.5)  # the halo is not map
    cells = TileGrid(centers_xy=cells.centers_xy[inside], rows=cells.rows[inside],
                     cols=cells.cols[inside], shape=cells.shape, origin_xy=cells.origin_xy,
                     stride_px=cells.stride_px)
    on = np.zeros(geom.shape, bool)
    on[cells.rows, cells.cols] = True
    half = geom.window // 2
    from scipy.ndimage import binary_dilation

    need = binary_dilation(on, structure=np.ones((2 * half + 1, 2 * half + 1), bool))
    tiles = tiles_over(need, geom)
    cal = getattr(model, "calibration", None)
    depth_w = np.asarray(cal.depth_weight)[:, None] if cal is not None and cal.uses_depth \
        else None
    E = 0 if depth_w is None else 1  # the depth row after the prior's (calibration)
    a_self, a_ctx, const = dense_projection(model, encoder, gene_idx, prior_mix=depth_w)
    D = a_self.shape[1]
    proj = torch.as_tensor(np.concatenate([a_self] + ([a_ctx] if a_ctx is not None else []),
                                          1)).to(device)
    # the box means of the projected cells, accumulated tile by tile (a tile's box spreads
    # half a window beyond it); float16 around a per-channel offset (the first tile's
    # mean): half the memory, and centring later subtracts values of similar size
    pooled = np.zeros((proj.shape[1], *geom.shape), np.float16)
    offset = None
    have = np.zeros(geom.shape, bool)
    k_out = max(1, int(np.floor(stride_um / cell_um + 1e-6)))
    k_smp = max(1, int(round(sample_stride_um / cell_um)))
    smp = (cells.rows % k_smp == k_smp // 2) & (cells.cols % k_smp == k_smp // 2)
    s_rows, s_cols = cells.rows[smp], cells.cols[smp]
    if not len(s_rows):  # a tissue sliver narrower than the sample stride
        s_rows, s_cols = cells.rows[:1], cells.cols[:1]
    model = model.to(device)
    sample_batch = 8  # positions per sampler call: one progress event (and Cancel check) each
    n_sample_batches = (len(s_rows) + sample_batch - 1) // sample_batch
    total = len(tiles) + n_sample_batches
    radius = (model.config.context_um or 0.0) / cell_um
    calibrated = getattr(model, "calibration", None) is not None
    params = {"mode": "dense", "stride_um": float(k_out * cell_um), "cell_um": float(cell_um),
              "sample_stride_um": float(k_smp * cell_um), "patch_um": FIELD_OF_VIEW_UM,
              "n_samples": n_samples, "reveal_steps": reveal_steps, "seed": seed,
              "encoder": model.config.encoder, "min_tissue": min_tissue,
              "value_transform": model.config.value_transform,
              "context_um": model.config.context_um, "device": str(device),
              "encoder_dtype": "bfloat16" if bf16 else "float32",
              "adapter": load_adapter(encoder) is not None,
              "uncertainty": "calibrated sd" if calibrated else "raw sample spread"}
    out_sel = (cells.rows % k_out == 0) & (cells.cols % k_out == 0)

    out_grid = TileGrid(centers_xy=cells.centers_xy[out_sel], rows=cells.rows[out_sel] // k_out,
                        cols=cells.cols[out_sel] // k_out,
                        shape=((geom.shape[0] + k_out - 1) // k_out,
                               (geom.shape[1] + k_out - 1) // k_out),
                        origin_xy=geom.origin_xy, stride_px=geom.stride_px * k_out)
    state = {"prior": None, "code": None, "residual": None, "std": None}

    # previews need only the prior's channels (self and context); the image code (the
    # sampler's input) is computed once, when every tile is in
    prior_channels = np.r_[0:G, D:D + G] if a_ctx is not None else np.arange(G)

    def network_values(channels=None):
        """(G or D, H, W): the prior (and with ``channels=None`` the image code) per cell
        from the tiles encoded so far."""
        sel = np.arange(len(pooled)) if channels is None else channels
        n_self = int((sel < D).sum())
        values = (pooled if channels is None else pooled[channels]).astype(np.float32)
        values += offset[sel, None, None]
        complete = box_mean(have[None].astype(np.float32), geom.window)[0] > 0.999
        if not complete[on].all():
            values = _spread(values, complete & on, on)
        y = values[:n_self]
        if a_ctx is not None:
            y = y + neighbour_mean(values[n_self:], on, radius)
        if model.config.center_sections:
            y = y - y[:, on].mean(1)[:, None, None]
        return y + const[sel[:n_self], None, None]

    def prediction(final: bool) -> SlidePrediction:
        mean = state["prior"][:, cells.rows, cells.cols].T
        std = np.full_like(mean, np.nan)  # no samples yet: no uncertainty to show
        if state["residual"] is not None:
            mean = mean + state["residual"][:, cells.rows, cells.cols].T
            std = state["std"][:, cells.rows, cells.cols].T
        p = dict(params, final=final)
        prior = state["prior"][:, cells.rows, cells.cols].T
        return SlidePrediction(genes=genes, mean=mean[out_sel].astype(np.float32),
                               std=std[out_sel].astype(np.float32), grid=out_grid,
                               slide_path=str(Path(slide.path)), microns_per_pixel=float(mpp),
                               params=p, prior=prior[out_sel].astype(np.float32)).warm()

    def stopped(step):
        yield ProgressEvent("stopped", None, step, total)
        return prediction(False) if state["prior"] is not None else None

    # previews once every fourth tile in each direction is in (the whole tissue, coarse),
    # then at a quarter, a half and three quarters
    preview_at = {max(1, len(tiles) // 16)} | {round(len(tiles) * f) for f in (0.25, 0.5, 0.75)}
    step = 0
    half = geom.window // 2
    for r0, c0, fmap in iter_cell_maps(slide, encoder, geom, tiles, device=device, bf16=bf16):
        if stop is not None and stop.requested:
            return (yield from stopped(step))
        c, h, w = fmap.shape
        projected = torch.einsum("chw,cd->dhw", fmap, proj).cpu()
        if offset is None:
            offset = projected.reshape(len(projected), -1).mean(1).numpy()
        projected -= torch.from_numpy(offset)[:, None, None]
        # this tile's share of every box mean it reaches: zeros around it, then the box
        spread = F.avg_pool2d(F.pad(projected, (half, half, half, half))[None], geom.window,
                              stride=1, padding=half, count_include_pad=True)[0].numpy()
        ra, ca = max(r0 - half, 0), max(c0 - half, 0)
        rb, cb = min(r0 + h + half, geom.shape[0]), min(c0 + w + half, geom.shape[1])
        part = spread[:, ra - (r0 - half):rb - (r0 - half), ca - (c0 - half):cb - (c0 - half)]
        pooled[:, ra:rb, ca:cb] = pooled[:, ra:rb, ca:cb].astype(np.float32) + part
        have[r0:r0 + h, c0:c0 + w] = True
        step += 1
        metrics = {"phase": "encode", "tiles": step, "of": len(tiles)}
        if previews and step in preview_at and step < len(tiles):
            state["prior"] = network_values(prior_channels)
            metrics["preview"] = prediction(False)
        yield ProgressEvent("step", None, step, total, metrics=metrics)
    y = network_values()
    state["prior"], state["depth"], state["code"] = y[:G], y[G:G + E], y[G + E:]
    pooled = None  # the cell maps are no longer needed: free them before sampling
    codes = state["code"][:, s_rows, s_cols].T.astype(np.float32)
    res_mean = np.zeros((len(s_rows), G), np.float32)
    res_std = np.zeros((len(s_rows), G), np.float32)
    done = np.zeros(len(s_rows), bool)
    # samples coarse-first too: a spread-out subset refines the whole map early
    order = np.argsort(((s_rows // k_smp) % 4) * 4 + (s_cols // k_smp) % 4, kind="stable")
    preview_b = {max(1, n_sample_batches // 4), max(1, n_sample_batches // 2)}
    for b in range(n_sample_batches):
        if stop is not None and stop.requested:
            return (yield from stopped(step))
        idx = order[b * sample_batch:(b + 1) * sample_batch]
        res = sample(model, codes[idx], n_samples=n_samples, reveal_steps=reveal_steps,
                     seed=seed + b, device=device, image_code=True)
        m = res.mean.numpy()[:, gene_idx]
        res_mean[idx] = m
        res_std[idx] = res.std.numpy()[:, gene_idx]
        done[idx] = True
        step += 1
        metrics = {"phase": "sample", "positions": int(done.sum()), "of": len(s_rows)}
        if (previews and b + 1 in preview_b) or b + 1 == n_sample_batches:
            full = state["prior"][:, s_rows[done], s_cols[done]].T + res_mean[done]
            # relative to the slide: centred on all tissue cells
            depth = cal.clip_depth(state["depth"][0, s_rows[done], s_cols[done]],
                                   state["depth"][0, cells.rows, cells.cols].mean()) if E \
                else None
            sd = calibrated_uncertainty(model, full, res_std[done], genes=genes,
                                        depth=depth)["std"]
            both = _smooth_upsample(np.concatenate([res_mean[done], sd], 1), s_rows[done],
                                    s_cols[done], geom.shape, k_smp)
            state["residual"], state["std"] = both[:G], both[G:]
            if b + 1 < n_sample_batches:
                metrics["preview"] = prediction(False)
        yield ProgressEvent("step", None, step, total, metrics=metrics)
    return prediction(True)
