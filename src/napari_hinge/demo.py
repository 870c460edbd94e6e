"""The main job on the shipped sample: ``make demo`` / ``napari-hinge demo``.

1. HINGE predicts the shipped model's genes on the shipped her2st section C3 (held out from the
   shipped weights) and writes ``hinge_C3.h5ad``, ``hinge_C3.png`` and the scores.
2. With a display it opens napari with the sample (H&E under its spots, coloured by ERBB2),
   the "Slide & spots" widget and the HINGE dock with the shipped model. Headless
   (``--headless``) it renders the same scene plus a predicted map over the H&E, writes the
   screenshots and a ``summary.json`` into ``--out``; without a display it starts its own
   Xvfb (or says in one line how to get one).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

SAMPLE_LAYER = "her2st C3"


def register(subparsers) -> None:
    parser = subparsers.add_parser("demo", help="open the shipped sample (headless: screenshots)")
    parser.add_argument("--out", type=Path, default=Path("demo_out"), help="output folder")
    parser.add_argument("--headless", action="store_true",
                        help="render, write screenshots + summary, and exit")
    parser.set_defaults(func=_cmd_demo)


def _cmd_demo(args) -> int:
    from napari_hinge._display import NoDisplayError, has_display, virtual_display

    if has_display():
        return run_demo(args.out, headless=args.headless)
    # Checked before the minute of prediction, so a missing display fails at once.
    if not args.headless:
        raise NoDisplayError("no display to open napari on (DISPLAY is not set): pass "
                             "--headless to write screenshots and a summary into --out")
    # The demo runs in a child on our Xvfb, which is stopped only once the child has exited:
    # Qt still talks to its display while the interpreter shuts down.
    import subprocess
    import sys

    with virtual_display():
        return subprocess.call([sys.executable, "-m", "napari_hinge.demo", "--headless",
                                "--out", str(args.out)])


def _screenshot(viewer, path: Path) -> dict:
    from PIL import Image

    shot = viewer.screenshot(canvas_only=True, flash=False)
    Image.fromarray(shot).save(path)
    rgb = shot[..., :3].astype(float)
    # Share of pixels that are neither black background nor pure white.
    content = float(((rgb.sum(-1) > 30) & (rgb.min(-1) < 250)).mean())
    return {"file": path.name, "shape": list(shot.shape), "content_fraction": round(content, 3),
            "mean_rgb": [round(float(v), 1) for v in rgb.reshape(-1, 3).mean(0)]}


def _predicted_map(viewer, hinge, out: Path) -> dict:
    """Run the Predict tab (worker thread, as a user would) for one gene at spot stride and
    screenshot its map over the H&E."""
    from qtpy.QtWidgets import QApplication

    done = []
    hinge.predict.layers_added.connect(done.append)
    gene = hinge.predict.model.config.genes[0]
    hinge.predict.genes.list.item(0).setSelected(True)
    hinge.predict.steps_box.setValue(10)
    hinge.predict.run()
    while hinge.predict.jobs.running:  # the worker runs; keep the GUI thread serving it
        QApplication.processEvents()
        time.sleep(0.02)
    QApplication.processEvents()
    if not done:
        raise RuntimeError(f"prediction failed: {hinge.predict.jobs.status.text()}")
    viewer.layers[f"{SAMPLE_LAYER} spots"].visible = False
    QApplication.processEvents()
    return _screenshot(viewer, out / f"her2st_C3_{gene}_predicted_map.png")


def run_demo(out: Path, *, headless: bool) -> int:
    import napari
    from qtpy.QtWidgets import QApplication

    from napari_hinge._layers import slide_layer_data, spatial_layer_data
    from napari_hinge._sample_data import SAMPLE_GENE
    from napari_hinge._widgets._viewer import show_scale_bar
    from napari_hinge._widgets.hinge import HingeWidget
    from napari_hinge._widgets.slide_spots import SlideSpotsWidget
    from napari_hinge.datasets import cmu_slide_path, load_her2st_sample
    from napari_hinge.hinge.demo_job import run_hinge_demo
    from napari_hinge.io.slides import open_slide

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    hinge_summary = run_hinge_demo(out)
    adata = load_her2st_sample()

    viewer = napari.Viewer(show=True, title="napari-hinge demo")
    viewer.window._qt_window.resize(1600, 1000)
    for data, kwargs, kind in spatial_layer_data(adata, name=SAMPLE_LAYER):
        getattr(viewer, f"add_{kind}")(data, **kwargs)
    show_scale_bar(viewer)
    widget = SlideSpotsWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Slide & spots", area="right")
    widget.select_gene(SAMPLE_GENE)
    hinge = HingeWidget(viewer)
    # as a tab beside Slide & spots: stacked, the two overflow a 1080 px screen
    viewer.window.add_dock_widget(hinge, name="HINGE", area="right", tabify=True)
    hinge.predict.set_model("shipped")
    viewer.reset_view()
    QApplication.processEvents()

    summary = {
        "sample": "her2st C3",
        "spots": int(adata.n_obs),
        "genes": int(adata.n_vars),
        "microns_per_pixel": adata.uns["napari_hinge"].get("microns_per_pixel"),
        "spot_diameter_px": adata.uns["napari_hinge"].get("spot_diameter_px"),
        "layers": [f"{type(layer).__name__} {layer.name!r}" for layer in viewer.layers],
        "colored_by": SAMPLE_GENE,
        "hinge": hinge_summary,
        "seconds_to_scene": round(time.perf_counter() - t0, 2),
    }
    if not headless:
        napari.run()
        return 0

    summary["screenshots"] = [_screenshot(viewer, out / f"her2st_C3_{SAMPLE_GENE}.png")]
    summary["screenshots"].append(_predicted_map(viewer, hinge, out))
    viewer.layers.clear()
    data, kwargs, _ = slide_layer_data(open_slide(cmu_slide_path()))
    viewer.add_image(data, **kwargs)
    viewer.reset_view()
    QApplication.processEvents()
    summary["screenshots"].append(_screenshot(viewer, out / "cmu1_slide.png"))
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    viewer.close()
    print(json.dumps(summary, indent=2))
    print(f"wrote {out}/")
    return 0


if __name__ == "__main__":
    import sys

    from napari_hinge.cli import main

    sys.exit(main(["demo", *sys.argv[1:]]))
