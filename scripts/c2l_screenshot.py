"""Screenshot of a C2L-ST fill on the shipped sample (docs/images/c2l_fill.png).

Opens the shipped her2st C3 sample in napari, docks the "Fill sparse regions (C2L-ST)" widget,
draws a rectangular region over tissue, fills it from the widget (neighbour expression,
classifier-free guidance) and saves a screenshot of the viewer, plus a side-by-side picture of
the real H&E and the synthetic mosaic of the same region (``--compare``)::

    xvfb-run -a -s "-screen 0 1920x1080x24" python scripts/c2l_screenshot.py \
        --local bench_out/c2l_local_fewshot --out docs/images/c2l_fill.png

``--local`` is a local model folder (``napari-hinge c2l adapt`` or ``benchmarks/c2l.py
--save-local``); without it a local model is adapted on the sample's spots first
(``--adapt-steps``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    p.add_argument("--local", type=Path, default=None)
    p.add_argument("--adapt-steps", type=int, default=200)
    p.add_argument("--out", type=Path, default=Path("docs/images/c2l_fill.png"))
    p.add_argument("--compare", type=Path, default=None,
                   help="also write real-vs-synthetic of the region here")
    p.add_argument("--tiles", default="6x4", help="region size in tiles (cols x rows)")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=2.0)
    p.add_argument("--strength", type=float, default=1.0,
                   help="1: generate from noise; below 1: edit the real H&E (SDEdit)")
    args = p.parse_args(argv)

    import napari

    viewer = napari.Viewer(show=True)
    viewer.window._qt_window.resize(1600, 1000)
    ok = fill_scene(viewer, local=args.local, adapt_steps=args.adapt_steps, out=args.out,
                    compare=args.compare, tiles=args.tiles, steps=args.steps,
                    guidance=args.guidance, strength=args.strength)
    viewer.close()
    return 0 if ok else 1


def fill_scene(viewer, *, local: Path | None = None, adapt_steps: int = 200,
               out: Path = Path("docs/images/c2l_fill.png"), compare: Path | None = None,
               tiles: str = "6x4", steps: int = 25, guidance: float = 2.0,
               strength: float = 1.0) -> bool:
    """Open the sample in ``viewer``, fill a region from the C2L dock as a user would, save
    the screenshot (and the real-vs-synthetic picture); False when the fill failed."""
    from qtpy.QtCore import QEventLoop
    from qtpy.QtWidgets import QApplication

    viewer.open_sample("napari-hinge", "her2st_C3")
    slide = viewer.layers["her2st C3 H&E"]
    spots = viewer.layers["her2st C3 spots"]
    # as the Plugins menu opens it (napari's dock title)
    _, widget = viewer.window.add_plugin_dock_widget("napari-hinge",
                                                     "Fill sparse regions (C2L-ST)")
    if local is not None:
        widget.set_local(local)
    widget.adapt_steps.setValue(adapt_steps)
    widget.steps.setValue(steps)
    widget.guidance.setValue(guidance)
    widget.strength.setValue(strength)

    mpp = slide.metadata["microns_per_pixel"]
    xy = np.asarray(spots.metadata["adata"].obsm["spatial"], float) * mpp  # µm
    cols, rows = (int(v) for v in tiles.split("x"))
    w, h = cols * 112.0 - 1, rows * 112.0 - 1
    centre = np.median(xy, axis=0)
    x0, y0 = centre[0] - w / 2, centre[1] - h / 2
    rect = np.array([[y0, x0], [y0, x0 + w], [y0 + h, x0 + w], [y0 + h, x0]])
    viewer.add_shapes([rect], shape_type="polygon", name="region", face_color="transparent",
                      edge_color="yellow", edge_width=6, units=("µm", "µm"))
    widget.region_box.setCurrentText("region")
    spots.opacity = 0.35

    loop = QEventLoop()
    widget.jobs.ended.connect(loop.quit)
    widget.run()
    loop.exec()
    if widget.last_layer is None:
        print(f"fill failed: {widget.jobs.status.text()}", file=sys.stderr)
        return False
    spots.visible = False
    viewer.layers.selection.active = viewer.layers["region"]
    camera = viewer.scene.camera if hasattr(viewer, "scene") else viewer.camera  # napari < 0.9
    camera.center = (centre[1], centre[0])
    camera.zoom = min(800 / (w * 3.0), 800 / (h * 3.0))
    QApplication.processEvents()  # let the dock lay out the wrapped summary before the picture
    out.parent.mkdir(parents=True, exist_ok=True)
    viewer.screenshot(str(out), canvas_only=False, flash=False)
    print(f"wrote {out}")
    if compare is not None:
        from PIL import Image

        from napari_hinge.c2l.fill import slide_under_layout
        from napari_hinge.io.slides import open_slide

        result = widget.last_result
        real = slide_under_layout(open_slide(slide.metadata["slide_path"], mpp=mpp),
                                  result.layout, result.patches.shape[1])
        syn = result.mosaic[..., :3].copy()
        syn[result.mosaic[..., 3] == 0] = 255
        gap = np.full((real.shape[0], 8, 3), 255, np.uint8)
        Image.fromarray(np.concatenate([real, gap, syn], axis=1)).resize(
            (2 * (2 * real.shape[1] + 8), 2 * real.shape[0]), Image.NEAREST).save(compare)
        print(f"wrote {compare}")
    return True


if __name__ == "__main__":
    sys.exit(main())
