"""Whole-slide HINGE maps: dense path vs the per-tile path, GUI responsiveness, big slides.

    xvfb-run -a -s "-screen 0 1920x1080x24" python benchmarks/predict_slide.py --threads 2
    xvfb-run ... python benchmarks/predict_slide.py --threads 2 --accuracy \
        --accuracy-sections C2 C3 --per-patch-reference
    python benchmarks/predict_slide.py --threads 2 --no-gui --big-sizes 8192 16384

1. her2st C2 pyramid (../shared/data/wsi_small), 50 genes, uncertainty included: the dense
   path (:func:`~napari_hinge.hinge.slide_predict.predict_slide_dense_iter`: a value every
   16 µm, HINGE samples every ``--sample-stride`` µm) end to end, its first preview, and the
   per-tile path (:func:`~napari_hinge.hinge.slide_predict.predict_slide_iter`: encode +
   S samples per position) at the same grid and at the spot pitch, timed on a random
   subset of their positions in the same run and extrapolated to the whole grid.
2. GUI: the Predict widget's dense run on C2 with a 10 ms QTimer running from the click
   on: time from Run to the first painted map, longest event-loop stall (and when the five
   longest happened), and the layers added (two, refined in place).
3. Pyramids built like benchmarks/open_slide.py (mirror-tiled real C2 pixels, 0.69 µm/px)
   of ``--big-sizes`` px, each run in a fresh subprocess at the spot stride and at 16 µm:
   time and peak RSS.

4. ``--accuracy``: each dense-map choice (``--choices`` encoder dtype x sample stride) read
   at the measured spots of ``--accuracy-sections`` (C2: this slide, a training section of
   the shipped model; C3: held out), and with ``--per-patch-reference`` HINGE sampled on
   per-patch features at the same spots: mean Pearson r over the mapped genes.

Prints a table and writes JSON (``--out``); the device and the load go with every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SLIDE = REPO.parent / "shared" / "data" / "wsi_small" / "her2st_C2_HE_pyramid.tif"
SPOT_PITCH_UM = 200.0


def dense_run(model, slide, genes, args) -> dict:
    from napari_hinge.hinge.slide_predict import predict_slide_dense_iter

    start = time.perf_counter()
    first = None
    gen = predict_slide_dense_iter(model, slide, genes=genes, stride_um=args.stride,
                                   sample_stride_um=args.sample_stride,
                                   n_samples=args.samples, reveal_steps=args.reveal_steps)
    phases = {}
    while True:
        try:
            event = next(gen)
        except StopIteration as done:
            prediction = done.value
            break
        now = time.perf_counter() - start
        if first is None and "preview" in event.metrics:
            first = now
        phases[event.metrics.get("phase")] = now
    seconds = time.perf_counter() - start
    return {"seconds": round(seconds, 1), "first_preview_s": round(first or seconds, 1),
            "encode_done_s": round(phases.get("encode", 0.0), 1),
            "positions": len(prediction.grid), "raster": list(prediction.grid.shape),
            "stride_um": prediction.params["stride_um"],
            "sample_positions": _sample_positions(prediction),
            "device": prediction.params["device"]}, prediction


HER2ST = REPO.parent / "shared" / "data" / "her2st_subset"
SLIDES = {"C2": SLIDE, "C3": HER2ST / "images" / "C3_HE.jpg"}  # C3: held out from the model


def accuracy(model, genes, args) -> list[dict]:
    """Each dense-map choice read at the measured spots (bilinear, as
    :func:`~napari_hinge.hinge.slide_predict.compare_with_spots` reads it): mean Pearson r
    over the mapped genes on spots with >= 100 UMI, on the log1p CP10k scale; and the
    per-patch path at the spots themselves (the reference the dense map approximates)."""
    from napari_hinge._convention import library_size
    from napari_hinge.hinge.pipeline import calibrated_uncertainty, spot_features, transform_values
    from napari_hinge.hinge.slide_predict import predict_slide_dense_iter
    from napari_hinge.io.spatial import read_spatial
    from napari_hinge.metrics import gene_pearson
    from napari_hinge.training import run_to_end

    rows = []
    for name in args.accuracy_sections:
        adata = read_spatial(HER2ST, section=name)
        y, _ = transform_values(adata, genes)
        keep = library_size(adata) >= 100
        xy = np.asarray(adata.obsm["spatial"], dtype=float)

        def pcc(values, keep=keep, y=y):
            ok = keep & np.isfinite(values).all(1)
            return round(float(np.nanmean(gene_pearson(values[ok], y[ok]))), 4), int(ok.sum())

        reference = None
        if args.per_patch_reference:
            from napari_hinge.hinge.pipeline import model_inputs, resolve_encoder
            from napari_hinge.hinge.sampler import sample

            start = time.perf_counter()
            feats = spot_features(adata, encoder=resolve_encoder(model.config.encoder))
            coords = xy * float(adata.uns["napari_hinge"]["microns_per_pixel"])
            res = sample(model, model_inputs(model, feats, coords), n_samples=args.samples,
                         reveal_steps=args.reveal_steps, seed=0)
            calibrated_uncertainty(model, res.mean.numpy(), res.std.numpy(),
                                   prior=res.prior.numpy())
            idx = [model.config.genes.index(g) for g in genes]
            reference = (res.mean.numpy()[:, idx], round(time.perf_counter() - start, 1))
        for dtype, stride in args.choices:
            start = time.perf_counter()
            pred, _ = run_to_end(predict_slide_dense_iter(
                model, str(SLIDES[name]), genes=genes, stride_um=args.stride,
                sample_stride_um=stride, n_samples=args.samples,
                reveal_steps=args.reveal_steps, previews=False, bf16=dtype == "bf16",
                mpp=None if name == "C2" else
                float(adata.uns["napari_hinge"]["microns_per_pixel"])))
            seconds = round(time.perf_counter() - start, 1)
            if reference is not None:  # on the spots the map covers, for a like comparison
                on_map = np.isfinite(pred.at(xy, "mean")).all(1)
                values = np.where(on_map[:, None], reference[0], np.nan)
                r, n = pcc(values)
                rows.append({"section": name, "choice": "per patch at the spots (reference)",
                             "encoder_dtype": "float32", "sample_stride_um": None,
                             "map": "sampled mean", "pcc": r, "spots": n,
                             "seconds": reference[1]})
                print(json.dumps(rows[-1]), flush=True)
                reference = None
            for which, label in (("prior", "prior only"), ("mean", "prior + sampled residual")):
                if which == "prior" and stride != args.choices[0][1]:
                    continue  # the prior map does not depend on the sample stride
                r, n = pcc(pred.at(xy, which))
                rows.append({"section": name, "choice": f"dense, {label}",
                             "encoder_dtype": pred.params["encoder_dtype"],
                             "sample_stride_um": None if which == "prior" else
                             pred.params["sample_stride_um"], "map": which, "pcc": r,
                             "spots": n, "seconds": seconds,
                             "sample_positions": _sample_positions(pred)})
                print(json.dumps(rows[-1]), flush=True)
    return rows


def _sample_positions(prediction) -> int:
    grid = prediction.grid
    k = round(prediction.params["sample_stride_um"] / prediction.params["cell_um"])
    k_out = round(prediction.params["stride_um"] / prediction.params["cell_um"])
    rows, cols = grid.rows * k_out, grid.cols * k_out
    return int(((rows % k == k // 2) & (cols % k == k // 2)).sum())


def per_tile_rate(model, slide, centers_xy, genes, args, n: int) -> dict:
    """Seconds per position of the per-tile path (encode one patch + S samples), measured
    on ``n`` random positions of the grid."""
    from napari_hinge.features import encode_spots
    from napari_hinge.hinge.pipeline import calibrated_uncertainty, model_inputs, resolve_encoder
    from napari_hinge.hinge.sampler import sample

    rng = np.random.default_rng(0)
    pick = np.sort(rng.choice(len(centers_xy), min(n, len(centers_xy)), replace=False))
    xy = np.asarray(centers_xy)[pick]
    mpp = slide.microns_per_pixel
    encoder = resolve_encoder(model.config.encoder)
    start = time.perf_counter()
    feats = encode_spots(slide, xy, encoder=encoder, side_px=int(round(112 / mpp)), cache=False)
    encode = time.perf_counter() - start
    inputs = model_inputs(model, feats, xy * mpp)
    res = sample(model, inputs, n_samples=args.samples, reveal_steps=args.reveal_steps)
    calibrated_uncertainty(model, res.mean.numpy(), res.std.numpy(), prior=res.prior.numpy())
    total = time.perf_counter() - start
    return {"measured_positions": len(xy), "s_per_position": total / len(xy),
            "encode_share": round(encode / total, 3)}


def baseline(model, slide, genes, prediction, args) -> dict:
    from napari_hinge.tissue import tile_grid, tissue_mask

    out = {}
    rate = per_tile_rate(model, slide, prediction.grid.centers_xy, genes, args, args.tiles)
    out["same_grid"] = {**rate, "positions": len(prediction.grid),
                        "extrapolated_s": round(rate["s_per_position"] * len(prediction.grid))}
    spots = tile_grid(tissue_mask(slide), slide.shape[:2],
                      stride_px=SPOT_PITCH_UM / slide.microns_per_pixel)
    out["spot_pitch"] = {"positions": len(spots),
                         "extrapolated_s": round(rate["s_per_position"] * len(spots))}
    return out


def gui(model_dir, genes, args) -> dict:
    import napari
    from qtpy.QtWidgets import QApplication

    from napari_hinge._widgets.hinge import HingeWidget

    sys.path.insert(0, str(REPO / "benchmarks"))
    viewer = napari.Viewer(show=True)
    app = QApplication.instance()
    viewer.open(SLIDE, plugin="napari-hinge")
    widget = HingeWidget(viewer)
    viewer.window.add_dock_widget(widget)
    predict = widget.predict
    predict.set_model(model_dir)
    predict.genes.top_n.setValue(len(genes))
    predict.mode_box.setCurrentText("dense")
    predict.sample_stride_box.setValue(args.sample_stride)
    predict.samples_box.setValue(args.samples)
    meter = StallMeter()
    idle = meter.run_while(app, lambda: False, min_seconds=3.0)
    n_before = len(viewer.layers)
    paints = []
    predict.jobs.partial.connect(lambda p: paints.append(len(viewer.layers)))
    # the meter runs from the click on: Run's own work (opening the slide, starting the
    # worker) counts, and so does painting the final map after the worker returns
    busy = meter.run_while(app, lambda: predict.jobs.running, start=predict.run)
    result = {"idle": idle, "worker_running": busy,
              "first_paint_s": round(predict.first_paint_s or float("nan"), 2),
              "previews_painted": len(paints),
              "layers_added": len(viewer.layers) - n_before,
              "layers_after_each_preview": paints}
    viewer.close()
    return result


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
            self.at.append(now - self.t0)
        self.last = now

    def run_while(self, app, busy, min_seconds: float = 0.0, start=None) -> dict:
        self.gaps, self.at, self.last = [], [], None
        self.timer.start()
        t0 = self.t0 = time.perf_counter()
        app.processEvents()  # the first tick
        if start is not None:
            start()
        while busy() or time.perf_counter() - t0 < min_seconds:
            app.processEvents()
            time.sleep(0.002)
        for _ in range(20):  # the slots of the worker's last signals (the final paint)
            app.processEvents()
            time.sleep(0.005)
        self.timer.stop()
        gaps = np.asarray(self.gaps) * 1000 - 10  # ms beyond the timer's own period
        worst = np.argsort(gaps)[::-1][:5]
        return {"longest_stall_ms": round(float(gaps.max()), 1),
                "longest_5_ms_at_s": [(round(float(gaps[i]), 1), round(self.at[i], 2))
                                      for i in worst],
                "p99_stall_ms": round(float(np.percentile(gaps, 99)), 1),
                "ticks": len(gaps), "seconds": round(time.perf_counter() - t0, 2)}


def big_child(path: str, stride: float, genes: int, args) -> dict:
    """Run in a fresh interpreter so its peak RSS is its own."""
    code = f"""
import json, resource, time, torch
torch.set_num_threads({args.threads})
from napari_hinge.hinge.pipeline import load_model
from napari_hinge.hinge.slide_predict import predict_slide_dense_iter
from napari_hinge.training import run_to_end
m = load_model("shipped")
t = time.perf_counter()
p, _ = run_to_end(predict_slide_dense_iter(m, {path!r}, genes=m.config.genes[:{genes}],
                  stride_um={stride}, sample_stride_um={args.sample_stride},
                  n_samples={args.samples}, reveal_steps={args.reveal_steps}, previews=False))
print(json.dumps({{"seconds": round(time.perf_counter() - t, 1), "positions": len(p.grid),
                  "raster": list(p.grid.shape), "device": p.params["device"],
                  "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                                        / 1024)}}))
"""
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, check=False)
    if done.returncode:
        return {"error": done.stderr[-2000:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    import torch

    from napari_hinge.hinge.pipeline import load_model, shipped_model_dir
    from napari_hinge.io.slides import open_slide

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="shipped")
    parser.add_argument("--genes", type=int, default=50)
    parser.add_argument("--stride", type=float, default=None, help="map µm (default 16)")
    parser.add_argument("--sample-stride", type=float, default=None)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--reveal-steps", type=int, default=10)
    parser.add_argument("--tiles", type=int, default=24,
                        help="positions timed for the per-tile baseline")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-gui", action="store_true")
    parser.add_argument("--gui-only", action="store_true", help="only part 2")
    parser.add_argument("--big-sizes", type=int, nargs="*", default=[],
                        help="also pyramids of these sizes (px), e.g. 8192 16384 40000")
    parser.add_argument("--accuracy", action="store_true",
                        help="also each dense choice read at measured spots (part 4)")
    parser.add_argument("--accuracy-only", action="store_true", help="only part 4")
    parser.add_argument("--accuracy-sections", nargs="*", default=["C2"],
                        help="her2st sections (C2: this slide; C3: held out from the model)")
    parser.add_argument("--choices", nargs="*", default=["bf16:448", "fp32:448", "bf16:896",
                                                          "bf16:224"],
                        help="dense choices DTYPE:SAMPLE_STRIDE_UM for part 4")
    parser.add_argument("--per-patch-reference", action="store_true",
                        help="part 4 also samples HINGE on per-patch features at the spots")
    parser.add_argument("--workdir", type=Path, default=REPO / "bench_out" / "big_slides")
    parser.add_argument("--out", type=Path, default=REPO / "bench_out" / "predict_slide.json")
    args = parser.parse_args()
    from napari_hinge.hinge.defaults import SLIDE as DEFAULTS

    args.stride = args.stride or DEFAULTS["stride_um"]
    args.sample_stride = args.sample_stride or DEFAULTS["sample_stride_um"]
    args.choices = [(c.split(":")[0], float(c.split(":")[1])) for c in args.choices]
    torch.set_num_threads(args.threads)
    os.environ.setdefault("NAPARI_HINGE_CACHE", tempfile.mkdtemp(prefix="hinge-bench-"))
    model_dir = shipped_model_dir() if args.model == "shipped" else Path(args.model)
    model = load_model(model_dir)
    genes = list(model.config.genes[:args.genes])
    slide = open_slide(SLIDE)
    results = {"slide": SLIDE.name, "genes": len(genes), "n_samples": args.samples,
               "reveal_steps": args.reveal_steps, "threads": args.threads,
               "cpus": os.cpu_count(), "machine": platform.processor() or platform.machine(),
               "load_avg_start": os.getloadavg()}
    if args.accuracy or args.accuracy_only:
        results["accuracy"] = accuracy(model, genes, args)
    if not args.gui_only and not args.accuracy_only:
        dense, prediction = dense_run(model, slide, genes, args)
        results["dense"] = dense
        results["per_tile"] = baseline(model, slide, genes, prediction, args)
        results["speedup_same_grid"] = round(
            results["per_tile"]["same_grid"]["extrapolated_s"] / dense["seconds"], 1)
        results["dense_vs_per_tile_at_spot_pitch"] = round(
            results["per_tile"]["spot_pitch"]["extrapolated_s"] / dense["seconds"], 2)
    if not args.no_gui and not args.accuracy_only:
        results["gui"] = gui(model_dir, genes, args)
    results["big"] = []
    if args.big_sizes:
        sys.path.insert(0, str(REPO / "benchmarks"))
        from open_slide import build_slide

        args.workdir.mkdir(parents=True, exist_ok=True)
        for size in args.big_sizes:
            path = args.workdir / f"her2st_mirror_{size}.tif"
            build_slide(path, size)
            for stride in (SPOT_PITCH_UM, args.stride):
                row = {"size_px": size, "stride_um": stride,
                       **big_child(str(path), stride, len(genes), args)}
                results["big"].append(row)
                print(json.dumps(row), flush=True)
    results["load_avg_end"] = os.getloadavg()

    print(f"\nWhole-slide HINGE on {SLIDE.name}: {len(genes)} genes, S = {args.samples}, "
          f"T = {args.reveal_steps}, {args.threads} threads, load "
          f"{results['load_avg_start'][0]:.1f} -> {results['load_avg_end'][0]:.1f}")
    if "dense" in results:
        speed_table(results, args)
    if "accuracy" in results:
        print(f"\nAccuracy on measured spots (mean Pearson r over {len(genes)} genes, "
              ">= 100 UMI):")
        print(f"{'section':<8}{'choice':<38}{'encoder':<10}{'samples every':>14}"
              f"{'r':>8}{'seconds':>9}")
        for row in results["accuracy"]:
            every = f"{row['sample_stride_um']:g} µm" if row["sample_stride_um"] else "-"
            print(f"{row['section']:<8}{row['choice']:<38}{row['encoder_dtype']:<10}"
                  f"{every:>14}{row['pcc']:>8.3f}{row['seconds']:>9}")
    if "gui" in results:
        g = results["gui"]
        print(f"GUI: first map painted {g['first_paint_s']} s after Run (target < 5 s); "
              f"longest stall {g['worker_running']['longest_stall_ms']} ms (idle "
              f"{g['idle']['longest_stall_ms']} ms; target < 100 ms); {g['previews_painted']} "
              f"previews, {g['layers_added']} layers added "
              f"(after each preview: {g['layers_after_each_preview']})")
    for row in results["big"]:
        print(f"big {row['size_px']} px, {row['stride_um']:g} µm: " + (
            f"{row['seconds']} s, {row['positions']} positions, peak RSS "
            f"{row['peak_rss_mib']} MiB, device {row['device']}" if "seconds" in row
            else row["error"][-300:]))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2, default=str))
    print(f"wrote {args.out}")


def speed_table(results, args) -> None:
    d, pt = results["dense"], results["per_tile"]
    print(f"device {d['device']}")
    print(f"{'path':<34}{'grid µm':>8}{'positions':>10}{'seconds':>10}")
    label = f"dense (samples every {args.sample_stride:g} µm)"
    print(f"{label:<34}{d['stride_um']:>8.1f}"
          f"{d['positions']:>10}{d['seconds']:>10}")
    print(f"{'per-tile, same grid (extrap.)':<34}{d['stride_um']:>8.1f}"
          f"{pt['same_grid']['positions']:>10}{pt['same_grid']['extrapolated_s']:>10}")
    print(f"{'per-tile, spot pitch (extrap.)':<34}{SPOT_PITCH_UM:>8.1f}"
          f"{pt['spot_pitch']['positions']:>10}{pt['spot_pitch']['extrapolated_s']:>10}")
    print(f"speed-up at the same grid x{results['speedup_same_grid']}; first preview "
          f"{d['first_preview_s']} s, encoding done {d['encode_done_s']} s; per-tile "
          f"{pt['same_grid']['s_per_position']:.3f} s/position measured on "
          f"{pt['same_grid']['measured_positions']} positions; target < 60 s on 2 cores")


if __name__ == "__main__":
    main()
