"""Do C2L-ST fills show tile seams? Independent tiles against the seamless canvas.

Fills ``--regions`` rectangles of ``--tiles`` tiles on the shipped her2st C3 sample (centred on
randomly drawn measured spots; neighbour expression, 25 DDIM steps, guidance 2) twice: each tile
sampled on its own (``seamless=False``) and the region as one canvas of overlapping windows
(``seamless=True``, :mod:`napari_hinge.c2l.canvas`); the real H&E of the same tiles, read at
the model's scale, is the reference.

- **Seam ratio**: mean absolute difference between neighbouring pixels across tile borders over
  the same inside tiles (grey levels, both axes). Real tissue has no seams: about 1; a seam
  shows as a ratio above 1.
- **Detail**: mean absolute difference between neighbouring pixels inside tiles, over the real
  H&E's (blending overlapping windows could blur: below 1 is softer than the slide).
- **Seconds** per region, and the ratio to independent tiles.

    python benchmarks/c2l_seams.py --local bench_out/c2l_local_fewshot

(``--local``: a local model folder, e.g. from ``benchmarks/c2l.py --save-local``.)
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch


def neighbour_differences(rgb: np.ndarray, size: int) -> tuple[float, float]:
    """``(across tile borders, inside tiles)`` mean |grey difference| of neighbouring pixels
    of a mosaic of ``size``-pixel tiles (both axes)."""
    grey = rgb.astype(np.float64).mean(-1)
    across, inside = [], []
    for d in (np.abs(np.diff(grey, axis=1)), np.abs(np.diff(grey, axis=0)).T):
        border = (np.arange(d.shape[1]) % size) == size - 1
        across.append(d[:, border].ravel())
        inside.append(d[:, ~border].ravel())
    return float(np.concatenate(across).mean()), float(np.concatenate(inside).mean())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--local", type=Path, default=Path("bench_out/c2l_local_fewshot"))
    p.add_argument("--regions", type=int, default=4)
    p.add_argument("--tiles", default="6x4", help="region size in tiles (cols x rows)")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=2.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path("bench_out/c2l_seams.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    from napari_hinge.c2l.fill import fill_region, slide_under_layout, tile_side_px
    from napari_hinge.c2l.local import LocalModel
    from napari_hinge.datasets import load_her2st_sample
    from napari_hinge.io.slides import open_slide

    local = LocalModel.load(args.local)
    sample = load_her2st_sample()
    meta = sample.uns["napari_hinge"]
    slide = open_slide(meta["slide_path"], mpp=meta["microns_per_pixel"])
    side = tile_side_px(local, meta["microns_per_pixel"])
    size = local.central.config.image_size
    cols, rows = (int(v) for v in args.tiles.split("x"))
    xy = np.asarray(sample.obsm["spatial"], float)
    centres = xy[np.random.default_rng(args.seed).choice(len(xy), args.regions, replace=False)]

    per_method: dict[str, list[dict]] = {"real": [], "independent": [], "seamless": []}
    for i, (cx, cy) in enumerate(centres):
        w, h = cols * side - 1, rows * side - 1
        poly = np.array([[cx - w / 2, cy - h / 2], [cx + w / 2, cy - h / 2],
                         [cx + w / 2, cy + h / 2], [cx - w / 2, cy + h / 2]])
        for method in ("independent", "seamless"):
            t = time.perf_counter()
            res = fill_region(local, slide, sample, region=poly, steps=args.steps,
                              guidance=args.guidance, seed=args.seed + i,
                              seamless=method == "seamless")
            seconds = time.perf_counter() - t
            across, inside = neighbour_differences(res.mosaic[..., :3], size)
            per_method[method].append({"across": across, "inside": inside, "seconds": seconds})
        across, inside = neighbour_differences(slide_under_layout(slide, res.layout, size), size)
        per_method["real"].append({"across": across, "inside": inside, "seconds": None})
        print(f"region {i + 1}/{args.regions} done", flush=True)

    real_inside = np.mean([r["inside"] for r in per_method["real"]])
    base_seconds = np.mean([r["seconds"] for r in per_method["independent"]])
    table = {}
    for method, runs in per_method.items():
        seconds = None if method == "real" else float(np.mean([r["seconds"] for r in runs]))
        table[method] = {
            "seam_ratio": float(np.mean([r["across"] / r["inside"] for r in runs])),
            "detail_vs_real": float(np.mean([r["inside"] for r in runs]) / real_inside),
            "seconds_per_region": seconds,
            "seconds_vs_independent": None if seconds is None else seconds / base_seconds,
        }
    print(f"\nSeams over {args.regions} regions of {args.tiles} tiles on her2st C3 "
          f"({args.steps} DDIM steps, guidance {args.guidance}):")
    print(f"{'':<13}{'seam ratio':>12}{'detail/real':>13}{'s/region':>10}{'x indep.':>10}")
    for method, row in table.items():
        s = row["seconds_per_region"]
        print(f"{method:<13}{row['seam_ratio']:>12.3f}{row['detail_vs_real']:>13.3f}"
              + (f"{s:>10.1f}{row['seconds_vs_independent']:>10.2f}" if s is not None else
                 f"{'-':>10}{'-':>10}"))
    out = {"command": " ".join(["python", *sys.argv]), "local": str(args.local),
           "regions": args.regions, "tiles": args.tiles, "steps": args.steps,
           "guidance": args.guidance, "seed": args.seed, "threads": args.threads,
           "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
           "results": table, "per_region": per_method}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
