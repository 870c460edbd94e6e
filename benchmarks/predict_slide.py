"""Whole-slide HINGE prediction speed and GUI responsiveness.

    xvfb-run -a -s "-screen 0 1920x1080x24" python benchmarks/predict_slide.py [--quick]

1. Tiles per second of :func:`predict_slide_iter` on the her2st C2 pyramid
   (../shared/data/wsi_small) at spot stride (200 µm) and half-spot stride, 50 genes, S = 4,
   with a cold and a warm feature cache (the encoder's share of the time is the difference).
2. The longest event-loop stall while the Predict widget's worker runs, measured with a 10 ms
   QTimer, against the same viewer idle. Target: no stall above 100 ms.

Prints a table and writes JSON (``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SLIDE = REPO.parent / "shared" / "data" / "wsi_small" / "her2st_C2_HE_pyramid.tif"
SPOT_PITCH_UM = 200.0


def speed(model, stride_um: float, n_samples: int, reveal_steps: int | None) -> dict:
    from napari_hinge.hinge.slide_predict import predict_slide_iter
    from napari_hinge.training import run_to_end

    rows = {}
    for cache in ("cold", "warm"):
        start = time.perf_counter()
        prediction, _ = run_to_end(predict_slide_iter(model, SLIDE, stride_um=stride_um,
                                                      n_samples=n_samples,
                                                      reveal_steps=reveal_steps))
        seconds = time.perf_counter() - start
        rows[cache] = {"tiles": len(prediction.grid), "seconds": round(seconds, 2),
                       "tiles_per_s": round(len(prediction.grid) / seconds, 2)}
    return rows


class StallMeter:
    """Longest gap between 10 ms timer ticks: how long the GUI thread was blocked."""

    def __init__(self) -> None:
        from qtpy.QtCore import QTimer

        self.timer = QTimer()
        self.timer.setInterval(10)
        self.timer.timeout.connect(self._tick)
        self.gaps: list[float] = []
        self.last = None

    def _tick(self) -> None:
        now = time.perf_counter()
        if self.last is not None:
            self.gaps.append(now - self.last)
        self.last = now

    def run_while(self, app, busy, min_seconds: float = 0.0) -> dict:
        self.gaps, self.last = [], None
        self.timer.start()
        start = time.perf_counter()
        while busy() or time.perf_counter() - start < min_seconds:
            app.processEvents()
            time.sleep(0.002)
        self.timer.stop()
        gaps = np.asarray(self.gaps) * 1000 - 10  # ms beyond the timer's own period
        return {"longest_stall_ms": round(float(gaps.max()), 1),
                "p99_stall_ms": round(float(np.percentile(gaps, 99)), 1),
                "ticks": len(gaps), "seconds": round(time.perf_counter() - start, 2)}


def responsiveness(model_dir, stride_um: float, n_samples: int) -> dict:
    import napari
    from qtpy.QtWidgets import QApplication

    from napari_hinge._widgets.hinge import HingeWidget

    viewer = napari.Viewer(show=True)
    app = QApplication.instance()
    viewer.open(SLIDE, plugin="napari-hinge")
    widget = HingeWidget(viewer)
    viewer.window.add_dock_widget(widget)
    widget.predict.set_model(model_dir)
    widget.predict.stride_box.setValue(stride_um)
    widget.predict.samples_box.setValue(n_samples)
    meter = StallMeter()
    idle = meter.run_while(app, lambda: False, min_seconds=5.0)
    widget.predict.run()
    busy = meter.run_while(app, lambda: widget.predict.jobs.running)
    viewer.close()
    ratio = busy["longest_stall_ms"] / max(idle["longest_stall_ms"], 1.0)
    return {"idle": idle, "worker_running": busy, "ratio_longest": round(ratio, 2)}


def main() -> None:
    import torch

    from napari_hinge.hinge.pipeline import load_model, shipped_model_dir

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="shipped")
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--reveal-steps", type=int, default=None)
    parser.add_argument("--quick", action="store_true", help="strides 400/800 µm: a smoke run")
    parser.add_argument("--out", type=Path, default=REPO / "bench_out" / "predict_slide.json")
    args = parser.parse_args()
    os.environ.setdefault("NAPARI_HINGE_CACHE", tempfile.mkdtemp(prefix="hinge-bench-"))
    model_dir = shipped_model_dir() if args.model == "shipped" else Path(args.model)
    model = load_model(model_dir)
    strides = (400.0, 800.0) if args.quick else (SPOT_PITCH_UM, SPOT_PITCH_UM / 2)
    results = {"slide": str(SLIDE.name), "genes": len(model.config.genes),
               "n_samples": args.samples, "reveal_steps": args.reveal_steps or 50,
               "torch_threads": torch.get_num_threads(), "machine": platform.processor() or
               platform.machine(), "cpus": os.cpu_count(), "speed": {}}
    for stride in strides:
        results["speed"][f"{stride:g}um"] = speed(model, stride, args.samples, args.reveal_steps)
    results["gui"] = responsiveness(model_dir, strides[0], args.samples)

    print(f"\nWhole-slide HINGE on {SLIDE.name}: {results['genes']} genes, S = {args.samples}, "
          f"T = {results['reveal_steps']}, {results['torch_threads']} threads")
    print(f"{'stride':>8} {'cache':>6} {'tiles':>6} {'seconds':>8} {'tiles/s':>8}")
    for stride, rows in results["speed"].items():
        for cache, row in rows.items():
            print(f"{stride:>8} {cache:>6} {row['tiles']:>6} {row['seconds']:>8} "
                  f"{row['tiles_per_s']:>8}")
    gui = results["gui"]
    print(f"\nGUI event loop (10 ms timer): idle longest stall "
          f"{gui['idle']['longest_stall_ms']} ms;"
          f" while predicting {gui['worker_running']['longest_stall_ms']} ms "
          f"(p99 {gui['worker_running']['p99_stall_ms']} ms), ratio {gui['ratio_longest']}; "
          f"target < 100 ms")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
