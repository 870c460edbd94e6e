"""Cohort prediction on dask.distributed: throughput on 1 vs 2 local workers, and the
per-slide overhead of the cluster against the same task run serially in this process.

    python benchmarks/cohort.py [--slides 8] [--stride 400] [--out docs/results/cohort.json]

The cohort: ``--slides`` copies of the real her2st C2 pyramid (../shared/data/wsi_small;
copies so that every slide has its own feature cache, as distinct slides would). Each of the
three runs (serial, 1 worker, 2 workers) starts from a cold feature cache. Workers are single
threaded with one torch thread each, as the serial run. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SLIDE = REPO.parent / "shared" / "data" / "wsi_small" / "her2st_C2_HE_pyramid.tif"


def serial(slides, settings: dict, out: Path) -> float:
    """The cohort's tasks one after another in this process (model loaded once)."""
    from napari_hinge.hinge.cohort import cohort_slides, predict_one

    start = time.perf_counter()
    for job in cohort_slides(slides):
        record = predict_one(job, "shipped", out, settings, torch_threads=1)
        assert record["status"] == "done", record
    return time.perf_counter() - start


def on_cluster(slides, settings: dict, out: Path, workers: int, cache: Path) -> dict:
    from distributed import Client, LocalCluster

    from napari_hinge.hinge.cohort import predict_cohort

    start = time.perf_counter()
    load = os.getloadavg()[0]
    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                      dashboard_address=None, env={"NAPARI_HINGE_CACHE": str(cache)}) as cluster, \
            Client(cluster) as client:
        client.wait_for_workers(workers)
        up = time.perf_counter() - start
        t = time.perf_counter()
        client.run(warm_up)  # torch imported and the model loaded once per worker
        warm = time.perf_counter() - t
        t = time.perf_counter()
        summary = predict_cohort(slides, "shipped", out, scheduler=client, torch_threads=1,
                                 **{k: v for k, v in settings.items() if k != "model"})
        seconds = time.perf_counter() - t
    assert summary["counts"]["done"] == len(slides), summary["counts"]
    tasks = [r["seconds"] for r in summary["slides"]]
    return {"startup_s": round(up, 2), "warm_up_s": round(warm, 2), "seconds": round(seconds, 2),
            "task_seconds": tasks, "load_average": [round(load, 2), round(os.getloadavg()[0], 2)],
            # the scheduler's share: wall time not spent inside the tasks (1 worker)
            "overhead_per_slide_s": round((seconds * workers - sum(tasks)) / len(tasks), 3)}


def warm_up() -> None:
    from napari_hinge.hinge.cohort import cached_model

    cached_model("shipped")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--slides", type=int, default=8)
    p.add_argument("--mode", choices=("dense", "tiles"), default="tiles",
                   help="the slide path (tiles: the one the JSON in docs/results measured)")
    p.add_argument("--stride", type=float, default=400.0, help="µm between map positions")
    p.add_argument("--samples", type=int, default=2)
    p.add_argument("--reveal-steps", type=int, default=5)
    p.add_argument("--out", type=Path, default=REPO / "docs" / "results" / "cohort.json")
    args = p.parse_args()
    import torch

    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="cohort-bench-"))
    try:
        slides = []
        for i in range(args.slides):
            slides.append(work / f"slide{i:02d}.tif")
            shutil.copyfile(SLIDE, slides[-1])
        load = os.getloadavg()
        os.environ["NAPARI_HINGE_CACHE"] = str(work / "cache-serial")
        from napari_hinge.hinge.cohort import cohort_settings

        settings = cohort_settings("shipped", mode=args.mode, stride_um=args.stride,
                                   n_samples=args.samples, reveal_steps=args.reveal_steps)
        serial_load = os.getloadavg()[0]
        t_serial = serial(slides, settings, work / "serial")
        serial_load = [round(serial_load, 2), round(os.getloadavg()[0], 2)]
        runs = {w: on_cluster(slides, settings, work / f"w{w}", w, work / f"cache-w{w}")
                for w in (1, 2)}
        load_after = os.getloadavg()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    n = args.slides
    rows = [("serial (this process)", t_serial, "", serial_load)] + \
        [(f"LocalCluster, {w} worker{'s' * (w > 1)}", r["seconds"],
          f"{r['startup_s']:.1f} + {r['warm_up_s']:.1f}", r["load_average"])
         for w, r in runs.items()]
    print(f"{'run':26s} {'seconds':>8s} {'slides/min':>10s} {'start+warm s':>12s} "
          f"{'load avg':>11s}")
    for name, sec, up, ld in rows:
        print(f"{name:26s} {sec:8.1f} {60 * n / sec:10.2f} {up:>12s} {ld[0]:5.1f}-{ld[1]:<5.1f}")
    ratio = runs[1]["seconds"] / runs[2]["seconds"]
    overhead = (runs[1]["seconds"] - t_serial) / n
    print(f"throughput 2 workers / 1 worker: x{ratio:.2f}; per-slide overhead, 1 worker vs "
          f"serial: {overhead:+.2f} s ({100 * overhead * n / t_serial:+.0f}%); wall time outside "
          f"the tasks per slide (1 worker): {runs[1]['overhead_per_slide_s']:.2f} s")
    print(f"load average before {load[0]:.1f}, after {load_after[0]:.1f} on "
          f"{os.cpu_count()} cores (shared machine)")
    result = {
        "command": f"python benchmarks/cohort.py --mode {args.mode} --slides {n} "
                   f"--stride {args.stride:g} "
                   f"--samples {args.samples} --reveal-steps {args.reveal_steps}",
        "slides": n, "slide": SLIDE.name, "settings": {k: v for k, v in settings.items()
                                                      if k != "model"},
        "serial_s": round(t_serial, 2), "serial_load_average": serial_load,
        "workers": {str(w): r for w, r in runs.items()},
        "throughput_ratio_2_vs_1_workers": round(ratio, 3),
        "per_slide_overhead_s": round(overhead, 3),
        **machine_record(load, load_after)}
    write_result(args.out, result)
    return 0


def machine_record(load: tuple, load_after: tuple) -> dict:
    """Where a benchmark ran: the load (the machine is shared), cores, CPU, torch."""
    import torch

    return {"load_average_before_after": [round(load[0], 2), round(load_after[0], 2)],
            "cpu_count": os.cpu_count(), "machine": platform.processor() or platform.machine(),
            "torch": torch.__version__}


def write_result(path: Path, result: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    raise SystemExit(main())
