"""Open a huge pyramidal slide in napari: lazy plugin path vs reading the base into memory.

Builds (once, cached in ``--workdir``) a pyramidal tiled TIFF of ``--size`` x ``--size`` px from
REAL her2st pixels: the C2 H&E JPEG, mirror-tiled, JPEG tiles of 512 px, levels in the main IFD
chain halving down to < 1024 px, written level by level from a generator of tiles so that the
multi-GB base never sits in memory. Then, each in a fresh subprocess so that peak RSS is honest:

1. plugin: ``viewer.open(path, plugin='napari-hinge')`` when the npe2 reader exists, else
   ``viewer.add_image(open_slide(path).levels, multiscale=True, ...)``;
2. direct: ``add_image(open_slide(path).levels)`` without napari's reader discovery;
3. naive: ``tifffile.imread(path, level=0)`` (the whole base in RAM), ``viewer.add_image(arr)``.

Both time from the open call until ``viewer.screenshot(canvas_only=True)`` returns a frame that is
not black, on a shown viewer (Xvfb when there is no display), and record peak RSS (ru_maxrss).

    xvfb-run -a python benchmarks/open_slide.py            # 40000 px, ~20 GB-free machine
    python benchmarks/open_slide.py --quick                # 8192 px smoke run (starts Xvfb itself)

Targets: plugin first frame < 2 s and < 1.5 GB peak, whatever the slide size.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("NAPARI_HINGE_SHARED", REPO.parent / "shared")) / "data"
SOURCE_JPG = SHARED / "her2st_subset" / "images" / "C2_HE.jpg"
TILE = 512
MPP = 0.69  # the her2st C2 estimate (see wsi_small/README.md)


# ----------------------------------------------------------------------------- build the slide


def _mirror(idx: np.ndarray, n: int) -> np.ndarray:
    """Mirror-tiling index: 0..n-1, n-1..0, 0..n-1, ... (no seams in the pixels)."""
    r = idx % (2 * n)
    return np.where(r < n, r, 2 * n - 1 - r)


def build_slide(out: Path, size: int, *, quality: int = 85) -> dict:
    """Write the pyramid TIFF at ``out`` (atomically) unless a complete one exists."""
    import tifffile
    from PIL import Image

    meta_path = out.with_suffix(".json")
    if out.exists() and meta_path.exists():
        meta = json.loads(meta_path.read_text())
        if meta.get("size") == size and meta.get("bytes") == out.stat().st_size:
            meta["reused"] = True
            return meta
    t0 = time.perf_counter()
    from napari_hinge.geometry import image_pixel_limit

    with image_pixel_limit(), Image.open(SOURCE_JPG) as src_img:  # a trusted 92 Mpx image
        src0 = src_img.convert("RGB")
    sizes = [size]
    while sizes[-1] >= 1024:
        sizes.append((sizes[-1] + 1) // 2)
    tmp = out.with_name(f".tmp-{out.name}")
    res = 1e4 / MPP  # px per cm
    with tifffile.TiffWriter(tmp, bigtiff=True) as tw:
        for k, n in enumerate(sizes):
            # Level k = mirror-tiling of the source shrunk 2**k (box filter): real pixels at
            # every level without ever holding a level of the big slide in memory.
            f = 2**k
            src = np.asarray(src0.reduce(f)) if f > 1 else np.asarray(src0)
            sh, sw = src.shape[:2]

            def tiles(n=n, src=src, sh=sh, sw=sw):
                for y in range(0, n, TILE):
                    rows = _mirror(np.arange(y, y + TILE), sh)
                    band = src[rows]
                    for x in range(0, n, TILE):
                        yield band[:, _mirror(np.arange(x, x + TILE), sw)]

            tw.write(
                tiles(),
                shape=(n, n, 3),
                dtype=np.uint8,
                tile=(TILE, TILE),
                photometric="rgb",
                compression="jpeg",
                compressionargs={"level": quality},
                subfiletype=1 if k else 0,
                resolution=(res, res),
                resolutionunit="CENTIMETER",
                metadata=None,
            )
            print(f"  level {k}: {n} x {n} written", flush=True)
    os.replace(tmp, out)
    meta = {
        "size": size,
        "levels": sizes,
        "bytes": out.stat().st_size,
        "source": str(SOURCE_JPG),
        "tile": TILE,
        "jpeg_quality": quality,
        "build_seconds": round(time.perf_counter() - t0, 1),
    }
    meta_path.write_text(json.dumps(meta, indent=1))
    meta["reused"] = False
    return meta


# ------------------------------------------------------------------------- child: one method


def _rss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _current_rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _open_and_render(viewer, method: str, path: Path) -> dict:
    """Open ``path`` with ``method`` and time until a non-black frame is on the canvas."""
    from qtpy.QtWidgets import QApplication

    t0 = time.perf_counter()
    if method == "plugin":
        try:
            import napari_hinge._reader  # noqa: F401 - the lead's npe2 reader

            viewer.open(str(path), plugin="napari-hinge")
            used = "plugin: viewer.open(plugin='napari-hinge')"
        except (ImportError, ValueError, KeyError) as err:
            from napari_hinge.io.slides import open_slide

            slide = open_slide(path)
            viewer.add_image(slide.levels, multiscale=True, rgb=True, contrast_limits=(0, 255))
            used = f"fallback: add_image(open_slide(p).levels) [{type(err).__name__}: {err}]"
    elif method == "direct":
        from napari_hinge.io.slides import open_slide

        slide = open_slide(path)
        viewer.add_image(slide.levels, multiscale=True, rgb=True, contrast_limits=(0, 255))
        used = "direct: add_image(open_slide(p).levels), no npe2 reader discovery"
    else:
        import tifffile

        arr = tifffile.imread(path, level=0)
        viewer.add_image(arr, rgb=True, contrast_limits=(0, 255))
        del arr
        used = "naive: tifffile.imread(level=0) + add_image"
    t_added = time.perf_counter()
    viewer.reset_view()
    shot = None
    for _ in range(200):  # a frame that is not black = the slide is on screen
        QApplication.processEvents()
        shot = viewer.screenshot(canvas_only=True, flash=False)
        if shot[..., :3].mean() > 20:
            break
        time.sleep(0.02)
    t_frame = time.perf_counter()
    layer = viewer.layers[-1]
    return {
        "used": used,
        "first_frame_ok": bool(shot is not None and shot[..., :3].mean() > 20),
        "frame_mean": float(shot[..., :3].mean()) if shot is not None else None,
        "seconds_to_first_frame": t_frame - t0,
        "seconds_open_call": t_added - t0,
        "layer_levels": len(layer.data) if layer.multiscale else 1,
        "data_level_shown": int(layer.data_level) if layer.multiscale else 0,
    }


def child(method: str, path: Path, result: Path, warm: bool) -> None:
    t_start = time.perf_counter()
    import napari
    from qtpy.QtWidgets import QApplication

    viewer = napari.Viewer(show=True)
    viewer.window._qt_window.resize(1400, 1000)
    QApplication.processEvents()
    if warm:
        # Pay the method's imports and napari's one-off first-layer set-up (unit registry,
        # shaders) on a warm-up open, as for a user opening the next slide of the day. The naive
        # warm-up reads only the smallest level so that two full bases never coexist in RAM.
        if method != "naive":
            _open_and_render(viewer, method, path)
        else:
            import tifffile

            viewer.add_image(tifffile.imread(path, level=-1), rgb=True, contrast_limits=(0, 255))
            viewer.screenshot(canvas_only=True, flash=False)
        viewer.layers.clear()
        QApplication.processEvents()
    t_viewer = time.perf_counter()
    rss_viewer = _current_rss_mib()
    out = {
        "method": method,
        "warm": warm,
        **_open_and_render(viewer, method, path),
        "peak_rss_mib": _rss_mib(),
        "seconds_viewer_start": t_viewer - t_start,
        "rss_before_open_mib": rss_viewer,
    }
    result.write_text(json.dumps(out))
    viewer.close()


def _run_child(method: str, path: Path, use_xvfb: bool, warm: bool) -> dict:
    with tempfile.TemporaryDirectory() as td:
        res = Path(td) / "r.json"
        cmd = [sys.executable, __file__, "--child", method, "--path", str(path)]
        cmd += ["--result", str(res)] + (["--warm"] if warm else [])
        if use_xvfb:
            cmd = ["xvfb-run", "-a", "-s", "-screen 0 1920x1080x24", *cmd]
        env = dict(os.environ, XDG_RUNTIME_DIR=os.environ.get("XDG_RUNTIME_DIR", td))
        t = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        wall = time.perf_counter() - t
        if proc.returncode != 0 or not res.exists():
            tail = (proc.stdout + proc.stderr)[-3000:]
            raise RuntimeError(f"{method} child failed (rc {proc.returncode}):\n{tail}")
        out = json.loads(res.read_text())
        out["process_wall_seconds"] = wall
        return out


# ------------------------------------------------------------------------------------- main


def machine_info() -> dict:
    import dask
    import napari
    import tifffile
    import zarr

    mem = None
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem = round(int(line.split()[1]) / 2**20, 1)
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "mem_total_gib": mem,
        "load_avg_at_start": os.getloadavg(),
        "napari": napari.__version__,
        "tifffile": tifffile.__version__,
        "zarr": zarr.__version__,
        "dask": dask.__version__,
        "display": os.environ.get("DISPLAY") or "xvfb-run per child",
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--size", type=int, default=40000, help="slide edge in px (default 40000)")
    p.add_argument("--quick", action="store_true", help="smoke run on an 8192 px slide")
    p.add_argument("--repeat", type=int, default=1, help="runs per method (median reported)")
    p.add_argument("--workdir", type=Path, default=REPO / "bench_out" / "open_slide")
    p.add_argument("--out", type=Path, default=None, help="JSON results (default workdir/...)")
    p.add_argument("--skip-naive", action="store_true", help="only the plugin path")
    p.add_argument("--child", choices=["plugin", "direct", "naive"], help=argparse.SUPPRESS)
    p.add_argument("--path", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--warm", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        child(a.child, a.path, a.result, a.warm)
        return 0

    size = 8192 if a.quick else a.size
    if not SOURCE_JPG.is_file():
        raise FileNotFoundError(f"{SOURCE_JPG}: her2st C2 image not found (NAPARI_HINGE_SHARED?)")
    a.workdir.mkdir(parents=True, exist_ok=True)
    out_json = a.out or a.workdir / f"results_{size}.json"
    use_xvfb = not os.environ.get("DISPLAY")
    if use_xvfb and shutil.which("xvfb-run") is None:
        raise RuntimeError("no DISPLAY and no xvfb-run: install xvfb or run under a display")

    slide_path = a.workdir / f"her2st_C2_mirror_{size}.tif"
    print(f"building / reusing {slide_path} ...", flush=True)
    build = build_slide(slide_path, size)
    how = "reused" if build["reused"] else f"built in {build['build_seconds']} s"
    print(f"  {build['bytes'] / 2**20:.0f} MiB, levels {build['levels']}, {how}")

    # direct = the same lazy levels without napari's reader discovery (splits the plugin's
    # cost into our reader and whatever npe2 runs before it)
    methods = ["plugin", "direct"] + ([] if a.skip_naive else ["naive"])
    runs: dict[str, list[dict]] = {f"{m}_{w}": [] for m in methods for w in ("cold", "warm")}
    for i in range(a.repeat):
        for m in methods:
            for w in ("cold", "warm"):
                r = _run_child(m, slide_path, use_xvfb, warm=w == "warm")
                runs[f"{m}_{w}"].append(r)
                print(f"  run {i + 1} {m} {w}: {r['seconds_to_first_frame']:.2f} s, "
                      f"peak {r['peak_rss_mib']:.0f} MiB ({r['used']})", flush=True)

    def med(key, field):
        return float(np.median([r[field] for r in runs[key]]))

    rows = []
    for m in methods:
        rows.append({
            "method": m,
            "slide_px": f"{size}x{size}",
            "seconds_to_first_frame": med(f"{m}_cold", "seconds_to_first_frame"),
            "warm_seconds_to_first_frame": med(f"{m}_warm", "seconds_to_first_frame"),
            "peak_rss_mib": med(f"{m}_cold", "peak_rss_mib"),
            "rss_after_viewer_mib": med(f"{m}_cold", "rss_before_open_mib"),
            "first_frame_ok": all(r["first_frame_ok"] for k in runs if k.startswith(m)
                                  for r in runs[k]),
        })  # fmt: skip
    ratios = {}
    if rows[-1]["method"] == "naive":
        naive, plug = rows[-1], rows[0]
        ratios = {
            "time_naive_over_plugin": naive["seconds_to_first_frame"]
            / plug["seconds_to_first_frame"],
            "warm_time_naive_over_plugin": naive["warm_seconds_to_first_frame"]
            / plug["warm_seconds_to_first_frame"],
            "memory_naive_over_plugin": naive["peak_rss_mib"] / plug["peak_rss_mib"],
        }
    plug = rows[0]
    targets = {
        "plugin_first_frame_under_2s_cold": plug["seconds_to_first_frame"] < 2.0,
        "plugin_first_frame_under_2s_warm": plug["warm_seconds_to_first_frame"] < 2.0,
        "plugin_peak_under_1.5GB": plug["peak_rss_mib"] < 1.5e9 / 2**20,
    }

    print()
    print(f"{'method':<8} {'slide':>12} {'s to 1st frame (cold)':>22} {'(warm)':>7} "
          f"{'peak MiB':>9} {'viewer MiB':>11}")
    for r in rows:
        print(f"{r['method']:<8} {r['slide_px']:>12} {r['seconds_to_first_frame']:>22.2f} "
              f"{r['warm_seconds_to_first_frame']:>7.2f} {r['peak_rss_mib']:>9.0f} "
              f"{r['rss_after_viewer_mib']:>11.0f}")
    if ratios:
        print(f"naive / plugin: time x{ratios['time_naive_over_plugin']:.1f} cold, "
              f"x{ratios['warm_time_naive_over_plugin']:.1f} warm; "
              f"peak memory x{ratios['memory_naive_over_plugin']:.1f}")
    print(f"plugin path used: {runs['plugin_cold'][0]['used']}")
    print(f"targets: {targets}")

    result = {
        "benchmark": "open_slide",
        "slide": {"path": str(slide_path), **build},
        "rows": rows,
        "ratios": ratios,
        "targets": targets,
        "runs": runs,
        "machine": machine_info(),
        "timing": "open call -> first non-black screenshot(canvas_only=True) on a shown viewer; "
        "cold = first open in a fresh process (includes first imports of dask/zarr/anndata and "
        "napari's one-off layer set-up); warm = fresh process after a warm-up open (plugin: the "
        "same slide; naive: its smallest level); peak RSS = ru_maxrss of the cold child "
        "(includes napari/Qt, see rss_after_viewer_mib)",
    }
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(result, indent=1, default=float))
    print(f"wrote {out_json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
