"""Whole-slide HINGE: predicted expression maps over all the tissue of a slide.

Tissue mask -> tile grid at a chosen stride -> batched encoding (cached per batch of tile
centres, so rerunning the same grid skips the encoder) -> S samples per tile -> a
``genes x H x W`` mean raster and its per-gene standard deviation, with the scale and
translation (µm) that place them on the slide. A generator of ProgressEvents, so the CLI shows
a progress bar and the widget a progress bar with Cancel.
"""

from __future__ import annotations

from collections.abc import Generator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from napari_hinge._progress import ProgressEvent
from napari_hinge.training import StopToken

PATCH_UM = 112.0  # the HINGE/Stem patch: max(spot diameter, 112 µm); tiles have no spot


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

    def raster(self, which: str = "mean", genes: Sequence[str] | None = None) -> np.ndarray:
        """(G', H, W) float32 raster of the mean or std; NaN off tissue."""
        values = {"mean": self.mean, "std": self.std}[which]
        idx = [self.genes.index(g) for g in genes] if genes else slice(None)
        return self.grid.to_raster(values[:, idx])

    @property
    def placement(self) -> dict:
        """``scale``/``translate`` (µm, row/col) of a raster pixel on the slide."""
        return self.grid.placement(self.microns_per_pixel)

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
    from napari_hinge.io.slides import open_slide
    from napari_hinge.tissue import tile_grid, tissue_mask

    from .pipeline import (
        SAMPLER,
        calibrated_uncertainty,
        model_inputs,
        resolve_encoder,
        unknown_genes_message,
    )
    from .sampler import sample

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
    gene_idx = [all_genes.index(g) for g in genes]
    side_px = int(round(PATCH_UM / mpp))
    stride_px = (stride_um or PATCH_UM) / mpp
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
        std[sl] = calibrated_uncertainty(model, m, res.std.numpy()[:, gene_idx],
                                         genes=genes)["std"]
        yield ProgressEvent("step", None, n_batches + b + 1, 2 * n_batches,
                         metrics={"phase": "sample", "tiles": sl.stop, "of": n})
    params = {"stride_um": float(stride_px * mpp), "patch_um": PATCH_UM, "n_samples": n_samples,
              "reveal_steps": reveal_steps, "seed": seed, "encoder": model.config.encoder,
              "n_tiles": n, "min_tissue": min_tissue,
              "value_transform": model.config.value_transform,
              "context_um": model.config.context_um,
              "uncertainty": "calibrated sd" if getattr(model, "calibration", None) is not None
              else "raw sample spread"}
    return SlidePrediction(genes=genes, mean=mean, std=std, grid=grid,
                           slide_path=str(Path(slide.path)), microns_per_pixel=float(mpp),
                           params=params)


def write_ome_tiff(prediction: SlidePrediction, path: str | Path, *, which: str = "mean"
                   ) -> Path:
    """The (genes, H, W) raster as an OME-TIFF with µm pixel size and gene channel names;
    written atomically."""
    import tifffile

    from napari_hinge.training import atomic_write

    data = prediction.raster(which)
    um = float(prediction.placement["scale"][0])
    origin = prediction.placement["translate"]
    metadata = {"axes": "CYX", "Channel": {"Name": list(prediction.genes)},
                "PhysicalSizeX": um, "PhysicalSizeXUnit": "µm",
                "PhysicalSizeY": um, "PhysicalSizeYUnit": "µm",
                "Plane": {"PositionX": [origin[1]] * len(prediction.genes),
                          "PositionY": [origin[0]] * len(prediction.genes),
                          "PositionXUnit": ["µm"] * len(prediction.genes),
                          "PositionYUnit": ["µm"] * len(prediction.genes)}}
    path = Path(path)
    return atomic_write(path, lambda tmp: tifffile.imwrite(
        tmp, data, ome=True, metadata=metadata, compression="zlib",
        photometric="minisblack"))
