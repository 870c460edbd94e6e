"""Seamless fills: sample a whole region as one canvas of overlapping windows.

Tiles sampled one by one meet at visible seams: nothing ties the nuclei on one side of an edge
to those on the other. Here the region's grid of tiles is one canvas in the model's sample space
(the latent code), and every denoising step is shared (MultiDiffusion, Bar-Tal et al. 2023):
the network sees windows of its own size, one on each tile and one straddling each pair (and
each 2 x 2 block) of neighbouring tiles; where windows overlap, their predictions are averaged
with weights that fall off toward each window's edge. A straddling window is conditioned on
the mean expression of the tiles it covers. Because ``v``-prediction is linear in ``x0`` and
noise, averaging ``v`` averages both, so the DDIM sampler runs unchanged on the canvas. The
canvas is decoded window by window and blended with the same weights (the code is shared, so
overlapping decodes agree up to the decoder's edge effects).

The cost is the number of windows: about four per tile inside a filled rectangle, one for an
isolated tile.
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass

import numpy as np
import torch

from .local import LocalModel, no_grad_model
from .schedule import ddim_sample_iter, from_uint8, to_uint8


@dataclass
class CanvasWindows:
    """Windows over a grid of tiles, in half-tile units: window ``i`` covers half-tile rows
    ``top[i] .. top[i] + 1`` (so tile rows ``top/2 ..``) and likewise for columns."""

    top: np.ndarray  # (W,) int, in half tiles
    left: np.ndarray  # (W,) int, in half tiles
    cond_weights: np.ndarray  # (W, n_tiles) float32: rows sum to 1 (the tiles a window covers)

    def __len__(self) -> int:
        return len(self.top)


def canvas_windows(rows: np.ndarray, cols: np.ndarray) -> CanvasWindows:
    """One window per tile plus one per pair / 2 x 2 block of present neighbouring tiles."""
    rows, cols = np.asarray(rows, int), np.asarray(cols, int)
    index = {(int(r), int(c)): i for i, (r, c) in enumerate(zip(rows, cols, strict=True))}
    tops, lefts, weights = [], [], []
    for dr, dc in ((0, 0), (0, 1), (1, 0), (1, 1)):
        for r, c in zip(rows, cols, strict=True):
            covered = [index.get((int(r) + a, int(c) + b))
                       for a in range(dr + 1) for b in range(dc + 1)]
            if any(i is None for i in covered):
                continue
            w = np.zeros(len(rows), np.float32)
            w[covered] = 1.0 / len(covered)
            tops.append(2 * int(r) + dr)
            lefts.append(2 * int(c) + dc)
            weights.append(w)
    return CanvasWindows(np.array(tops, int), np.array(lefts, int), np.stack(weights))


def window_weight(side: int) -> torch.Tensor:
    """``(side, side)`` blending weight: 1 in the middle, falling linearly toward the edges
    (never 0, so a pixel covered by one window alone keeps it)."""
    ramp = torch.minimum(torch.arange(side) + 0.5, side - torch.arange(side) - 0.5) / (side / 2)
    return ramp[:, None] * ramp[None, :]


def blend_windows(x: torch.Tensor, windows: CanvasWindows, side: int, fn, batch_size: int,
                  scale: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``fn(crops, window_slice)`` on batches of the ``side``-sized windows of a ``(1, C, H,
    W)`` canvas and add its outputs (``scale`` times larger, any channel count) into one canvas
    with tent weights; returns ``(weighted sum (C', H*scale, W*scale), summed weight)`` on the
    outputs' device."""
    half, size = side // 2, side * scale
    weight = window_weight(size)
    tops, lefts = windows.top * half, windows.left * half
    out = total = None
    for start in range(0, len(windows), batch_size):
        sl = slice(start, start + batch_size)
        crops = torch.stack([x[0, :, a:a + side, b:b + side]
                             for a, b in zip(tops[sl], lefts[sl], strict=True)])
        results = fn(crops, sl)
        if out is None:
            _, _, h, w = x.shape
            out = results.new_zeros(results.shape[1], h * scale, w * scale)
            total = results.new_zeros(1, h * scale, w * scale)
            weight = weight.to(results.device)
        for r, a, b in zip(results, tops[sl] * scale, lefts[sl] * scale, strict=True):
            out[:, a:a + size, b:b + size] += r * weight
            total[:, a:a + size, b:b + size] += weight
    return out, total


class _CanvasDenoiser:
    """``(x_canvas, t, cond) -> v_canvas``: the model on every window, blended."""

    def __init__(self, model, windows: CanvasWindows, side: int, window_cond: torch.Tensor,
                 batch_size: int, on_windows):
        self.model, self.windows, self.side = model, windows, side
        self.window_cond, self.batch_size, self.on_windows = window_cond, batch_size, on_windows

    def __call__(self, x, t, cond):
        def run(crops, sl):
            c = None if cond is None else self.window_cond[sl].to(x.device)
            v = self.model(crops, t[:1].expand(len(crops)), c).float()
            self.on_windows(len(crops))
            return v

        out, total = blend_windows(x, self.windows, self.side, run, self.batch_size)
        return (out / total.clamp_min(1e-12))[None]


def sample_canvas_iter(local: LocalModel, rows, cols, expression, *, guidance: float = 2.0,
                       steps: int = 25, seed: int = 0, batch_size: int = 32, device=None,
                       init: np.ndarray | None = None, strength: float = 1.0
                       ) -> Generator[tuple[int, int], None, np.ndarray]:
    """Sample the tiles at grid cells ``(rows, cols)`` (one ``expression`` row each) as one
    seamless canvas; yields ``(done, total)`` window evaluations and returns the ``(R*S, C*S,
    3)`` uint8 canvas (cells without a tile are 0). ``init`` (uint8 patches, one per tile) with
    ``strength`` < 1 edits them instead (SDEdit), as :meth:`LocalModel.sample_iter`."""
    rows, cols = np.asarray(rows, int), np.asarray(cols, int)
    expr = torch.as_tensor(np.asarray(expression, dtype=np.float32))
    if expr.shape != (len(rows), len(local.genes)):
        raise ValueError(f"expression must be ({len(rows)}, {len(local.genes)}) over the local "
                         f"model's genes, got {tuple(expr.shape)}")
    cfg = local.central.config
    channels, side, _ = cfg.sample_shape
    if side % 2:
        raise ValueError(f"canvas sampling needs an even sample side, got {side}")
    device = device or local.expr_mean.device
    windows = canvas_windows(rows, cols)
    window_cond = torch.as_tensor(windows.cond_weights) @ expr
    n_rows, n_cols = int(rows.max()) + 1, int(cols.max()) + 1
    shape = (1, channels, n_rows * side, n_cols * side)
    guided = guidance != 1.0
    total = len(windows) * steps * (2 if guided else 1)
    done = [0]

    def count(n: int) -> None:
        done[0] += n

    was = local.training
    local.eval()
    try:
        x_init = None
        if init is not None:
            init = np.asarray(init)
            if len(init) != len(rows):
                raise ValueError(f"{len(init)} init patches for {len(rows)} tiles")
            x_init = torch.zeros(shape)
            for start in range(0, len(init), batch_size):
                codes = local.central.encode(from_uint8(init[start:start + batch_size])
                                             .to(device)).cpu()
                for code, r, c in zip(codes, rows[start:start + batch_size],
                                      cols[start:start + batch_size], strict=True):
                    x_init[0, :, r * side:(r + 1) * side, c * side:(c + 1) * side] = code
        denoiser = _CanvasDenoiser(no_grad_model(local), windows, side, window_cond, batch_size,
                                   count)
        g = torch.Generator().manual_seed(int(seed))
        x = None
        for _i, x_i in ddim_sample_iter(denoiser, local.schedule, shape, cond=window_cond,
                                        guidance=guidance, steps=steps, generator=g,
                                        device=device, clip=cfg.x0_clip, x_init=x_init,
                                        strength=strength):
            x = x_i
            yield done[0], total
        return decode_canvas(local.central, x, windows, batch_size)
    finally:
        local.train(was)


@torch.no_grad()
def decode_canvas(central, x: torch.Tensor, windows: CanvasWindows,
                  batch_size: int = 32) -> np.ndarray:
    """Decode a ``(1, C, H, W)`` canvas window by window, blended: ``(H*f, W*f, 3)`` uint8
    (``f`` = image side over sample side; 0 outside the windows)."""
    side = central.config.sample_shape[-1]

    def decode(crops, _):
        return central.decode(crops).float().cpu()

    out, total = blend_windows(x, windows, side, decode, batch_size,
                               scale=central.config.image_size // side)
    images = torch.where(total > 0, out / total.clamp_min(1e-12), torch.full_like(out, -1.0))
    return to_uint8(images[None])[0]
