"""Dense encoding: the patch encoder run fully convolutionally over the tissue.

The per-patch path crops a 112 µm patch around every position, resizes it to the encoder's
input (224 px: 0.5 µm per encoder pixel) and global-average-pools the encoder's last map
(7 x 7 cells of 32 px). Neighbouring positions share most of their pixels, so here the
tissue is resampled once to the same 0.5 µm per pixel and encoded in overlapping tiles;
each tile's interior cells (16 µm) go into one cell map over the slide, and the mean over
the 7 x 7 cells around a cell is the per-patch feature of a patch centred on that cell.
Encoding cost follows tissue area, not the number of output positions.

Geometry (one convention, pixel centres): level-0 pixel ``i`` is centred at ``i`` (spots'
``obsm['spatial']`` and napari use the same). The encoder frame has ``s = input_size /
side_px`` pixels per level-0 pixel (the per-patch resize factor); its pixel ``u`` is
centred at level-0 ``(u + 0.5) / s - 0.5``. Cell ``c`` covers encoder pixels
``32c .. 32c + 31``, so its centre is at level-0 ``(32c + 16) / s - 0.5``:
:func:`cell_geometry` is the one place that says so.

Tiles are ``tile_cells`` cells square plus ``margin_cells`` on every side that are encoded
and thrown away (their receptive field meets the tile edge); :func:`iter_cell_maps` yields
the interior cells of each tile.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .geometry import FIELD_OF_VIEW_UM

# Interior cells per tile side and discarded margin cells: 16 + 2 x 2 cells = 640 encoder
# pixels per tile (benchmarks/dense_features.py measures the margin's effect).
TILE_CELLS = 16
MARGIN_CELLS = 2


@dataclass(frozen=True)
class CellGeometry:
    """Where the encoder's cells lie on a slide (level-0 pixel-centre coordinates)."""

    scale: float  # encoder pixels per level-0 pixel
    cell_px: int  # encoder pixels per cell (the encoder's dense_stride)
    window: int  # cells per patch side (input_size / cell_px)
    shape: tuple[int, int]  # cells covering the slide and the halo (rows, cols)
    first: int = 0  # absolute index of array cell 0 (-halo: cells beyond the slide edge)

    @property
    def stride_px(self) -> float:
        """Level-0 pixels between cell centres."""
        return self.cell_px / self.scale

    @property
    def origin_xy(self) -> tuple[float, float]:
        """Level-0 (x, y) of the centre of cell (0, 0)."""
        o = (self.first * self.cell_px + self.cell_px / 2) / self.scale - 0.5
        return (o, o)

    def centers_xy(self, rows, cols) -> np.ndarray:
        ox, oy = self.origin_xy
        return np.stack([ox + np.asarray(cols) * self.stride_px,
                         oy + np.asarray(rows) * self.stride_px], axis=1)

    def to_cells(self, xy) -> np.ndarray:
        """Level-0 (x, y) -> fractional (row, col) cell coordinates."""
        xy = np.asarray(xy, dtype=np.float64)
        ox, oy = self.origin_xy
        return np.stack([(xy[:, 1] - oy) / self.stride_px, (xy[:, 0] - ox) / self.stride_px],
                        axis=1)


def cell_geometry(encoder, slide_shape, microns_per_pixel: float) -> CellGeometry:
    """The cell grid of ``encoder`` over a slide of ``slide_shape`` (rows, cols) level-0
    pixels of ``microns_per_pixel`` µm, at the scale the per-patch path feeds the encoder,
    with a halo of half a window beyond every edge (a patch at the edge sees white glass
    there, as a per-patch crop does)."""
    cell = getattr(encoder, "dense_stride", None)
    if not cell:
        raise ValueError(f"encoder {encoder.name!r} cannot run densely (no dense_stride); "
                         "use the per-tile path")
    if encoder.input_size % cell or (encoder.input_size // cell) % 2 == 0:
        raise ValueError(f"encoder {encoder.name!r}: input {encoder.input_size} px is not an "
                         f"odd number of {cell}-px cells")
    side_px = int(round(FIELD_OF_VIEW_UM / float(microns_per_pixel)))
    scale = encoder.input_size / side_px
    h, w = slide_shape
    window = encoder.input_size // cell
    halo = window // 2 + 1
    shape = (max(1, math.ceil(h * scale / cell)) + 2 * halo,
             max(1, math.ceil(w * scale / cell)) + 2 * halo)
    return CellGeometry(scale=scale, cell_px=int(cell), window=window, shape=shape,
                        first=-halo)


def _pick_level(slide, scale: float) -> tuple[int, float]:
    """Coarsest level whose pixels are still no larger than the encoder's."""
    downsamples = getattr(slide, "downsamples", None) or [1.0]
    best = 0
    for i, ds in enumerate(downsamples):
        if ds * scale <= 1.001 and ds > downsamples[best]:
            best = i
    return best, float(downsamples[best])


def read_encoder_frame(slide, geom: CellGeometry, u0: int, v0: int, size: int) -> torch.Tensor:
    """RGB float (3, size, size) in 0..255 of encoder pixels ``u0..u0+size`` (columns) and
    ``v0..v0+size`` (rows): the slide resampled exactly as the per-patch resize does
    (bilinear; antialiased first when a level has to shrink). White beyond the slide."""
    level, ds = _pick_level(slide, geom.scale)
    rel = geom.scale * ds  # encoder pixels per pixel of that level
    # centres of the wanted encoder pixels in level pixel-centre coordinates
    lv_x = (np.arange(u0, u0 + size) + 0.5) / (geom.scale * ds) - 0.5
    lv_y = (np.arange(v0, v0 + size) + 0.5) / (geom.scale * ds) - 0.5
    ax, ay = int(np.floor(lv_x[0])) - 2, int(np.floor(lv_y[0])) - 2
    bx, by = int(np.ceil(lv_x[-1])) + 3, int(np.ceil(lv_y[-1])) + 3
    region = np.asarray(slide.read_region(int(round(ax * ds)), int(round(ay * ds)), bx - ax,
                                          by - ay, level=level))[..., :3]
    x = torch.from_numpy(np.ascontiguousarray(region)).permute(2, 0, 1)[None].float()
    gx, gy = lv_x - ax, lv_y - ay  # pixel-centre coordinates inside the region
    if rel < 0.999:  # shrinking: antialias to about the encoder's pixel size first
        out_h = max(1, round(x.shape[-2] * rel))
        out_w = max(1, round(x.shape[-1] * rel))
        fy, fx = out_h / x.shape[-2], out_w / x.shape[-1]
        x = F.interpolate(x, size=(out_h, out_w), mode="bilinear", antialias=True)
        gx, gy = (gx + 0.5) * fx - 0.5, (gy + 0.5) * fy - 0.5
    h, w = x.shape[-2:]
    grid_x = torch.as_tensor((2 * gx + 1) / w - 1, dtype=torch.float32)
    grid_y = torch.as_tensor((2 * gy + 1) / h - 1, dtype=torch.float32)
    grid = torch.stack(torch.meshgrid(grid_y, grid_x, indexing="ij")[::-1], dim=-1)[None]
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out[0]


def tiles_over(need: np.ndarray, geom: CellGeometry, *, tile_cells: int = TILE_CELLS,
               order: str = "coarse_first") -> list[tuple[int, int]]:
    """Top-left cells (row, col) of the tiles whose interior meets ``need`` (a boolean
    cell mask over ``geom.shape``). ``'coarse_first'``: every fourth tile in each direction
    first, so the first sixteenth of the work already spans the whole tissue."""
    rows, cols = geom.shape
    out = []
    for r0 in range(0, rows, tile_cells):
        for c0 in range(0, cols, tile_cells):
            if need[r0:r0 + tile_cells, c0:c0 + tile_cells].any():
                out.append((r0, c0))
    if order == "coarse_first":
        out.sort(key=lambda rc: (_bit_reversed((rc[0] // tile_cells) % 4),
                                 _bit_reversed((rc[1] // tile_cells) % 4), rc[0], rc[1]))
    return out


def _bit_reversed(i: int) -> int:
    """0, 2, 1, 3 for 0..3: after every fourth tile, the ones half-way between come next."""
    return ((i & 1) << 1) | (i >> 1)


def iter_cell_maps(slide, encoder, geom: CellGeometry, tiles, *,
                   margin_cells: int = MARGIN_CELLS, tile_cells: int = TILE_CELLS,
                   device=None, bf16: bool | None = None
                   ) -> Iterator[tuple[int, int, torch.Tensor]]:
    """``(r0, c0, cells)`` per tile: ``cells`` (dim, h, w) float32 are the encoder's
    pre-pool map over cells ``r0..r0+h``, ``c0..c0+w`` (the tile's interior).

    The encoder runs its inference-only fused form where it has one
    (:meth:`~napari_hinge.encoders.efficientnet_lite0.EfficientNetLite0.fused_map`); ``bf16``:
    bfloat16 autocast (default: on CUDA, and on CPUs with native bf16, see
    :func:`~napari_hinge.device.fast_bf16`)."""
    from .device import fast_bf16

    device = torch.device(device) if device is not None else next(encoder.parameters()).device
    encoder.eval()
    forward = encoder.fused_map() if hasattr(encoder, "fused_map") else encoder.forward_map
    bf16 = fast_bf16(device) if bf16 is None else bf16
    cast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
    cell = geom.cell_px
    size = (tile_cells + 2 * margin_cells) * cell
    for r0, c0 in tiles:
        u0 = (c0 + geom.first - margin_cells) * cell
        v0 = (r0 + geom.first - margin_cells) * cell
        rgb = read_encoder_frame(slide, geom, u0, v0, size)
        x = ((rgb - 127.0) / 128.0)[None].to(device)
        with torch.inference_mode(), cast:
            fmap = forward(x)[0].float()
        h = min(tile_cells, geom.shape[0] - r0)
        w = min(tile_cells, geom.shape[1] - c0)
        yield r0, c0, fmap[:, margin_cells:margin_cells + h, margin_cells:margin_cells + w]


# The map arithmetic below runs in torch, which releases the GIL: a worker thread doing it
# leaves napari's event loop free (scipy.ndimage holds the GIL for seconds on a slide).


def box_mean(maps: np.ndarray, window: int) -> np.ndarray:
    """Mean over the ``window x window`` cells centred on each cell of ``(C, H, W)`` maps;
    cells beyond the array count as zero (callers pad with a halo of encoded cells).
    Separable: a row pass then a column pass (2 x window adds per cell, not window²)."""
    x = torch.from_numpy(np.ascontiguousarray(maps, dtype=np.float32))[None]
    half = window // 2
    x = F.avg_pool2d(x, (1, window), stride=1, padding=(0, half), count_include_pad=True)
    x = F.avg_pool2d(x, (window, 1), stride=1, padding=(half, 0), count_include_pad=True)
    return x[0].numpy()


def _fft_size(n: int) -> int:
    """The smallest ``m >= n`` with no prime factor above 7 (pocketfft is several times
    slower on sizes with a large prime factor, e.g. 473 = 11 x 43)."""
    m = n
    while True:
        k = m
        for p in (2, 3, 5, 7):
            while k % p == 0:
                k //= p
        if k == 1:
            return m
        m += 1


def _conv_same(x: torch.Tensor, kernel: np.ndarray) -> torch.Tensor:
    """(C, H, W) convolved with a symmetric (kh, kw) kernel, zero outside, same size (FFT)."""
    kh, kw = kernel.shape
    h, w = x.shape[-2:]
    size = (_fft_size(h + kh - 1), _fft_size(w + kw - 1))
    k = torch.from_numpy(np.ascontiguousarray(kernel, dtype=np.float32))
    y = torch.fft.irfft2(torch.fft.rfft2(x, s=size) * torch.fft.rfft2(k, s=size), s=size)
    return y[..., kh // 2:kh // 2 + h, kw // 2:kw // 2 + w]


def disc_kernel(radius_cells: float) -> np.ndarray:
    """Cells whose centre is within ``radius_cells`` of the centre cell, the centre excluded
    (a spot's neighbours: :func:`napari_hinge.features.context_features`)."""
    r = int(math.floor(radius_cells + 1e-9))
    yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
    k = (yy ** 2 + xx ** 2 <= radius_cells ** 2 + 1e-9).astype(np.float32)
    k[r, r] = 0.0
    return k


def neighbour_mean(maps: np.ndarray, on: np.ndarray, radius_cells: float) -> np.ndarray:
    """Mean of ``maps`` (C, H, W) over the ``on`` cells within ``radius_cells`` of each
    cell, the cell itself excluded; a cell without such neighbours gets its own value (the
    rule of :func:`~napari_hinge.features.context_features` on a cell grid)."""
    k = disc_kernel(radius_cells)
    on_t = torch.from_numpy(np.asarray(on, np.float32))
    x = torch.from_numpy(np.ascontiguousarray(maps, dtype=np.float32))
    count = _conv_same(on_t[None], k)[0].round()
    total = _conv_same(x * on_t, k)
    out = torch.where(count > 0, total / count.clamp_min(1.0), x)
    return out.numpy()


def sample_cells(maps: np.ndarray, rc: np.ndarray) -> np.ndarray:
    """Bilinear values of ``(C, H, W)`` cell maps at fractional (row, col) cell
    coordinates ``rc`` (N, 2): ``(N, C)``."""
    from scipy.ndimage import map_coordinates

    coords = np.asarray(rc, dtype=np.float64).T
    return np.stack([map_coordinates(m, coords, order=1, mode="nearest") for m in maps],
                    axis=1).astype(np.float32)


def positions_need(geom: CellGeometry, rc: np.ndarray) -> np.ndarray:
    """Cells to encode so every fractional cell position in ``rc`` has its full window
    (and the bilinear neighbour's)."""
    need = np.zeros(geom.shape, bool)
    half = geom.window // 2 + 1
    r = np.clip(np.floor(rc[:, 0]).astype(int), 0, geom.shape[0] - 1)
    c = np.clip(np.floor(rc[:, 1]).astype(int), 0, geom.shape[1] - 1)
    need[r, c] = True
    from scipy.ndimage import binary_dilation

    return binary_dilation(need, structure=np.ones((2 * half + 2, 2 * half + 2), bool))


def encode_dense_at(slide, coords_xy, *, encoder, microns_per_pixel: float,
                    margin_cells: int = MARGIN_CELLS, tile_cells: int = TILE_CELLS,
                    device=None, channel_chunk: int = 160, adapt: bool = True
                    ) -> np.ndarray:
    """Per-patch-equivalent features ``(N, dim)`` at level-0 positions ``coords_xy`` from
    the dense cell map: a drop-in for :func:`napari_hinge.features.encode_spots` (the
    112 µm window pooled around each position, bilinear between cell centres; mapped by
    the shipped adapter (:func:`load_adapter`) unless ``adapt=False``)."""
    from .patches import open_any_slide

    slide = open_any_slide(slide)
    geom = cell_geometry(encoder, slide.shape[:2], microns_per_pixel)
    rc = geom.to_cells(coords_xy)
    need = positions_need(geom, rc)
    rows, cols = np.nonzero(need)
    r_lo, c_lo = rows.min(), cols.min()
    h, w = rows.max() - r_lo + 1, cols.max() - c_lo + 1
    cells = np.zeros((encoder.dim, h, w), np.float16)
    for r0, c0, fmap in iter_cell_maps(slide, encoder, geom, tiles_over(need, geom,
                                       tile_cells=tile_cells), margin_cells=margin_cells,
                                       tile_cells=tile_cells, device=device):
        a, b = r0 - r_lo, c0 - c_lo
        fr = fmap.cpu().numpy()
        ra, ca = max(a, 0), max(b, 0)
        rb, cb = min(a + fr.shape[1], h), min(b + fr.shape[2], w)
        if rb > ra and cb > ca:
            cells[:, ra:rb, ca:cb] = fr[:, ra - a:rb - a, ca - b:cb - b]
    local = rc - np.array([r_lo, c_lo])
    out = np.empty((len(rc), encoder.dim), np.float32)
    for k in range(0, encoder.dim, channel_chunk):
        pooled = box_mean(cells[k:k + channel_chunk].astype(np.float32), geom.window)
        out[:, k:k + channel_chunk] = sample_cells(pooled, local)
    adapter = load_adapter(encoder) if adapt else None
    if adapter is not None:
        out = (out @ adapter[0] + adapter[1]).astype(np.float32)
    return out


ADAPTER_DIR = "dense_adapter"


def load_adapter(encoder) -> tuple[np.ndarray, np.ndarray] | None:
    """The shipped linear map from dense to per-patch features of ``encoder`` (weight
    (dim, dim), bias (dim,)), fitted by ``scripts/fit_dense_adapter.py``; None when there is
    none for this encoder and weights."""
    import json
    from pathlib import Path

    from .training import load_safetensors

    folder = Path(__file__).parent / "weights" / ADAPTER_DIR
    path = folder / f"{encoder.name}.safetensors"
    meta_path = folder / f"{encoder.name}.json"
    if not path.is_file() or not meta_path.is_file():
        return None
    meta = json.loads(meta_path.read_text())
    if meta.get("weights_digest") != getattr(encoder, "weights_digest", None):
        return None  # fitted on other weights: it would map the wrong features
    state = load_safetensors(path)
    return state["weight"].float().numpy(), state["bias"].float().numpy()
