"""HINGE maps for a cohort of slides on dask.distributed (``napari-hinge hinge predict-cohort``).

Each slide is one task that runs the whole-slide path ``predict-slide`` runs (dense by
default, :func:`napari_hinge.hinge.slide_predict.predict_slide_dense_iter`; ``mode='tiles'``:
:func:`~napari_hinge.hinge.slide_predict.predict_slide_iter`) and writes its maps into
``OUT/<name>/``, plus ``complete.json`` (the settings and the files, written last,
inside a folder that :func:`napari_hinge._files.atomic_write_dir` swaps in whole). So:

- a slide's folder is either absent or complete, whatever kills a worker when; a folder without
  ``complete.json`` is treated as incomplete and replaced;
- a rerun skips the slides whose ``complete.json`` records the same settings and model;
- a slide that fails (an unreadable file, no tissue) is recorded with its error in
  ``OUT/cohort.json`` and the others go on;
- every worker process loads the model once (:func:`cached_model`, keyed by the model folder's
  path and file digest) and sets torch's threads so that workers x threads fill the machine.

The cluster is a :class:`distributed.LocalCluster` by default (one single-threaded worker
process per core, at most one per slide) or any running scheduler (``scheduler=
'tcp://host:8786'``, a :class:`distributed.Client`, e.g. of a dask-jobqueue ``SLURMCluster``).
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from napari_hinge._files import atomic_write, atomic_write_dir
from napari_hinge.defaults import SLIDE
from napari_hinge.errors import InputError

__all__ = ["CohortSlide", "cohort_settings", "cohort_slides", "predict_cohort", "predict_one",
           "read_manifest"]

COMPLETE = "complete.json"  # written last in a slide's folder: its presence means complete
SUMMARY = "cohort.json"
TILES_TOPIC = "napari-hinge-tiles"  # worker events that feed the tiles progress bar
_SLIDE_SUFFIXES = (".ome.tiff", ".ome.tif", ".ome.zarr")


@dataclass(frozen=True)
class CohortSlide:
    """One slide of a cohort: its file, the output folder name, its µm per pixel if the file
    does not record it."""

    path: str
    name: str
    mpp: float | None = None


def slide_name(path: str | os.PathLike) -> str:
    """The output folder name of a slide: its file name without the (double) suffix."""
    name = Path(path).name
    for suffix in _SLIDE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


def read_manifest(path: str | os.PathLike) -> list[CohortSlide]:
    """Slides listed in a CSV with a ``slide`` column (paths relative to the CSV's folder)
    and optional ``name`` (output folder) and ``mpp`` (µm per pixel) columns."""
    path = Path(path)
    if not path.is_file():
        raise InputError.at(path, "manifest not found")
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows or "slide" not in rows[0]:
        raise InputError.at(path, "needs a header with a 'slide' column (and optional 'name', "
                                  "'mpp') and at least one row", field="slide")
    slides = []
    for i, row in enumerate(rows, start=2):
        file = (row.get("slide") or "").strip()
        if not file:
            raise InputError.at(path, f"line {i}: empty slide path", field="slide")
        mpp = (row.get("mpp") or "").strip()
        try:
            mpp = float(mpp) if mpp else None
        except ValueError:
            raise InputError.at(path, f"line {i}: mpp {mpp!r} is not a number",
                                field="mpp") from None
        if mpp is not None and not mpp > 0:
            raise InputError.at(path, f"line {i}: mpp must be > 0, got {mpp}", field="mpp")
        resolved = Path(file) if Path(file).is_absolute() else path.parent / file
        slides.append(CohortSlide(str(resolved), (row.get("name") or "").strip()
                                  or slide_name(file), mpp))
    return slides


def cohort_slides(slides: Sequence = (), *, manifest: str | os.PathLike | None = None,
                  mpp: float | None = None) -> list[CohortSlide]:
    """The cohort from slide paths and/or a manifest (``mpp`` fills in missing pixel sizes);
    output names are made unique (``name``, ``name-2``, ...), a slide listed twice once."""
    jobs = [s if isinstance(s, CohortSlide) else CohortSlide(str(s), slide_name(s))
            for s in slides]
    if manifest is not None:
        jobs += read_manifest(manifest)
    if not jobs:
        raise InputError("predict-cohort: no slides given (list SLIDES or pass a manifest)")
    seen_paths, names, out = set(), set(), []
    for job in jobs:
        key = os.path.realpath(job.path)
        if key in seen_paths:
            continue
        seen_paths.add(key)
        name, k = job.name, 2
        while name in names:
            name, k = f"{job.name}-{k}", k + 1
        names.add(name)
        # absolute: a worker on another host or in another folder opens the same file
        out.append(CohortSlide(os.path.abspath(job.path), name,
                               job.mpp if job.mpp is not None else mpp))
    return out


# ------------------------------------------------------------------------------------------
# one slide (runs on a worker)

_MODELS: dict = {}  # per process: (model folder, digest) -> model


def model_key(spec: str | os.PathLike) -> tuple[str, str]:
    """(resolved model folder, digest of its files' names, sizes and modification times):
    a model retrained into the same folder gets a new key."""
    from napari_hinge.hinge.pipeline import SHIPPED_MODEL, shipped_model_dir

    folder = shipped_model_dir() if str(spec) == SHIPPED_MODEL else Path(spec)
    if not folder.is_dir():
        raise FileNotFoundError(f"HINGE model folder not found: {folder}")
    folder = folder.resolve()
    h = hashlib.sha256()
    for f in sorted(folder.rglob("*")):
        if f.is_file():
            st = f.stat()
            h.update(f"{f.relative_to(folder)}:{st.st_size}:{st.st_mtime_ns};".encode())
    return str(folder), h.hexdigest()[:16]


def cached_model(spec: str | os.PathLike):
    """The model of ``spec``, loaded once per process (per folder and digest)."""
    from napari_hinge.hinge.pipeline import load_model

    key = model_key(spec)
    if key not in _MODELS:
        _MODELS.clear()  # one model per worker: a new digest replaces the old one
        _MODELS[key] = load_model(key[0])
    return _MODELS[key]


def _tile_reporter(name: str) -> Callable | None:
    """On a dask worker, a callback that publishes a slide's progress as worker events."""
    try:
        from distributed import get_worker

        worker = get_worker()
    except (ImportError, ValueError):
        return None

    def report(event) -> None:
        worker.log_event(TILES_TOPIC, {"name": name, "done": event.step,
                                       "total": event.total_steps})

    return report


def _torch_threads(threads: int | None, host_workers: dict | None) -> int:
    """Threads for torch in this task: given, or the CPUs this worker may use shared by its
    dask threads (and by the host's other workers when they all see the whole machine, as a
    LocalCluster's do; a worker pinned to its own CPUs, e.g. a SLURM task, keeps them)."""
    if threads:
        return int(threads)
    cpus = len(os.sched_getaffinity(0))
    try:
        from distributed import get_worker

        worker = get_worker()
        shared = cpus == os.cpu_count()
        busy = worker.state.nthreads * ((host_workers or {}).get(worker.ip, 1) if shared else 1)
    except (ImportError, ValueError):
        busy = 1
    return max(1, cpus // max(1, busy))


def predict_one(slide: CohortSlide, model: str, out: str | os.PathLike, settings: dict, *,
                torch_threads: int | None = None, host_workers: dict | None = None) -> dict:
    """Map one slide into ``out/<slide.name>`` (atomically, ``complete.json`` last); returns
    its record (``status`` 'done' or 'failed' with the error). The task a worker runs; called
    in-process it is the serial path."""
    import dask
    import torch

    from napari_hinge.cli import one_line
    from napari_hinge.hinge.slide_predict import (
        predict_slide_dense_iter,
        predict_slide_iter,
        write_slide_outputs,
    )
    from napari_hinge.training import run_to_end

    folder = Path(out) / slide.name
    record = {"name": slide.name, "slide": slide.path, "out": str(folder)}
    t0 = time.perf_counter()
    done = completed(folder)
    if done is not None and _same_settings(done.get("settings", {}), settings):
        return record | {"status": "skipped", "tiles": done.get("tiles")}  # a task run again
    try:
        threads = _torch_threads(torch_threads, host_workers)
        torch.set_num_threads(threads)
        net = cached_model(model)
        predict = {k: v for k, v in settings.items() if k not in ("model", "mode")}
        # settings recorded before there were modes are the per-tile path's
        if settings.get("mode", "tiles") == "dense":
            job = predict_slide_dense_iter(net, slide.path, mpp=slide.mpp, previews=False,
                                           **predict)
        else:
            job = predict_slide_iter(net, slide.path, mpp=slide.mpp, **predict)
        # the slide's own dask arrays (pyramid tiles) run in this task's threads, not as
        # tasks on the cluster it runs on
        with dask.config.set(scheduler="threads", num_workers=threads):
            prediction, _ = run_to_end(job, _tile_reporter(slide.name))
        seconds = time.perf_counter() - t0

        def write(tmp: Path) -> None:
            # OME-TIFF + tiles only: complete.json lists files (OME-Zarr folders not yet)
            files = write_slide_outputs(prediction, tmp, ome_zarr=False)
            marker = {"slide": slide.path, "settings": settings, "tiles": len(prediction.grid),
                      "files": sorted(Path(f).name for f in files.values()),
                      "params": prediction.params, "seconds": round(seconds, 3)}
            atomic_write(tmp / COMPLETE, lambda t: Path(t).write_text(
                json.dumps(marker, indent=1, default=str)))

        atomic_write_dir(folder, write)
        record |= {"status": "done", "tiles": len(prediction.grid),
                   "seconds": round(time.perf_counter() - t0, 3)}
    except Exception as exc:  # noqa: BLE001 -- one slide's failure is recorded, the rest go on
        error = one_line(exc)
        if slide.path not in error:  # every message names the file
            error = f"{slide.path}: {error}"
        record |= {"status": "failed", "error": error, "error_type": type(exc).__name__,
                   "seconds": round(time.perf_counter() - t0, 3)}
    return record


def _same_settings(a: dict, b: dict) -> bool:
    """Settings that make the same maps (``batch_tiles`` only sets the progress steps)."""
    return ({k: v for k, v in a.items() if k != "batch_tiles"}
            == {k: v for k, v in b.items() if k != "batch_tiles"})


def completed(folder: str | os.PathLike) -> dict | None:
    """``complete.json`` of a slide folder whose files are all there, else None."""
    marker = Path(folder) / COMPLETE
    try:
        info = json.loads(marker.read_text())
    except (OSError, ValueError):
        return None
    if not all((Path(folder) / f).is_file() for f in info.get("files", ())):
        return None
    return info


# ------------------------------------------------------------------------------------------
# the cohort (runs on the client)

def default_workers(n_slides: int, threads_per_worker: int = 1) -> int:
    """LocalCluster workers: one per ``threads_per_worker`` cores, no more than slides."""
    cores = len(os.sched_getaffinity(0))
    return max(1, min(n_slides, cores // max(1, threads_per_worker)))


@contextmanager
def _client(scheduler, n_workers: int, threads_per_worker: int):
    """A distributed Client: of ``scheduler`` (an address or a Client) or of a new
    LocalCluster of ``n_workers`` single-process workers (closed at the end)."""
    from distributed import Client, LocalCluster

    if scheduler is not None and not isinstance(scheduler, str):
        yield scheduler  # the caller's Client: theirs to close
        return
    if scheduler is not None:
        with Client(scheduler) as client:
            yield client
        return
    with LocalCluster(n_workers=n_workers, threads_per_worker=threads_per_worker,
                      processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        yield client


def _clean_stale(out: Path, names: Sequence[str]) -> None:
    """Remove temporary folders a killed worker left beside a slide's folder."""
    for name in names:
        for tmp in out.glob(f".{name}.*.tmp"):
            shutil.rmtree(tmp, ignore_errors=True)


def cohort_settings(model: str | os.PathLike = "shipped", *, mode: str = SLIDE["mode"],
                    stride_um: float | None = None, sample_stride_um: float | None = None,
                    genes: Sequence[str] | None = None, n_samples: int | None = None,
                    reveal_steps: int | None = None, seed: int = 0, min_tissue: float = 0.5,
                    batch_tiles: int = 64) -> dict:
    """The settings a slide's task runs with and ``complete.json`` records (the mode's own
    options only; the model by folder and digest): what :func:`predict_one` takes."""
    if mode not in ("dense", "tiles"):
        raise ValueError(f"mode must be 'dense' or 'tiles', got {mode!r}")
    folder, digest = model_key(model)
    settings = {"mode": mode, "stride_um": stride_um, "genes": list(genes) if genes else None,
                "n_samples": n_samples, "reveal_steps": reveal_steps, "seed": seed,
                "min_tissue": min_tissue, "model": {"folder": folder, "digest": digest}}
    return settings | ({"sample_stride_um": sample_stride_um} if mode == "dense"
                       else {"batch_tiles": batch_tiles})


def predict_cohort(slides: Sequence = (), model: str | os.PathLike = "shipped",
                   out: str | os.PathLike = "cohort_maps", *,
                   manifest: str | os.PathLike | None = None, scheduler=None,
                   n_workers: int | None = None, threads_per_worker: int = 1,
                   torch_threads: int | None = None, mode: str = SLIDE["mode"],
                   stride_um: float | None = None, sample_stride_um: float | None = None,
                   genes: Sequence[str] | None = None, n_samples: int | None = None,
                   reveal_steps: int | None = None, seed: int = 0, mpp: float | None = None,
                   min_tissue: float = 0.5, batch_tiles: int = 64, overwrite: bool = False,
                   progress: Callable[[str, dict], None] | None = None) -> dict:
    """Map every slide of a cohort with HINGE on dask.distributed; returns the summary also
    written to ``out/cohort.json``.

    Parameters
    ----------
    slides, manifest
        Slide paths (or :class:`CohortSlide`) and/or a CSV (:func:`read_manifest`).
    model
        A HINGE model folder or ``'shipped'``; each worker loads it once.
    out
        Output folder: ``out/<name>/`` per slide (``maps.ome.tif``, ``uncertainty.ome.tif``,
        ``tiles.h5ad``, ``complete.json``) and ``out/cohort.json``.
    scheduler
        None: a LocalCluster of ``n_workers`` (default: one per ``threads_per_worker`` cores,
        at most one per slide) worker processes; an address (``'tcp://host:8786'``) or a
        :class:`distributed.Client`: that cluster.
    torch_threads
        torch threads per task (default: the host's CPUs divided by its dask threads).
    mode
        'dense' (default, as ``predict-slide``:
        :func:`~napari_hinge.hinge.slide_predict.predict_slide_dense_iter`, which takes
        ``sample_stride_um``) or 'tiles'
        (:func:`~napari_hinge.hinge.slide_predict.predict_slide_iter`, ``batch_tiles``).
    stride_um, sample_stride_um, genes, n_samples, reveal_steps, seed, mpp, min_tissue
        As the mode's function (``mpp`` for the slides whose file and manifest row do not
        give one).
    overwrite
        Replace complete slides made with other settings or another model (without it they
        are reported as failed and left as they are). Complete slides with the same settings
        are always skipped.
    progress
        ``progress(kind, info)``: ``('slide', record)`` as each slide ends (``record['status']``:
        done, skipped, failed), ``('tiles', {'name', 'done', 'total'})`` as workers go
        through a slide's tile batches.

    Returns
    -------
    dict
        ``slides``: one record per slide in input order (status, error, tiles, seconds, out),
        ``counts`` per status, ``settings``, ``workers``, ``seconds``.
    """
    t0 = time.perf_counter()
    jobs = cohort_slides(slides, manifest=manifest, mpp=mpp)
    out = Path(out).absolute()
    if out.exists() and not out.is_dir():
        raise InputError.at(out, "exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    settings = cohort_settings(model, mode=mode, stride_um=stride_um,
                               sample_stride_um=sample_stride_um, genes=genes,
                               n_samples=n_samples, reveal_steps=reveal_steps, seed=seed,
                               min_tissue=min_tissue, batch_tiles=batch_tiles)
    folder = settings["model"]["folder"]
    records: dict[str, dict] = {}
    todo = []
    for job in jobs:
        done = completed(out / job.name)
        base = {"name": job.name, "slide": job.path, "out": str(out / job.name)}
        if done is None:
            todo.append(job)
        elif _same_settings(done.get("settings", {}), settings):
            records[job.name] = base | {"status": "skipped", "tiles": done.get("tiles")}
        elif overwrite:
            todo.append(job)
        else:
            records[job.name] = base | {
                "status": "failed", "error_type": "InputError",
                "error": f"{out / job.name} holds maps made with other settings or another "
                         f"model; pass overwrite=True (--overwrite) to replace them"}
    for rec in records.values():
        if progress is not None:
            progress("slide", rec)
    # every slide's, also a complete one's: a worker killed while writing a slide that was
    # then rescheduled and finished leaves its temporary folder beside the complete one
    names = [job.name for job in jobs]
    _clean_stale(out, names)
    workers = 0
    if todo:
        n_workers = n_workers or default_workers(len(todo), threads_per_worker)
        with _client(scheduler, n_workers, threads_per_worker) as client:
            records |= _run(client, todo, folder, out, settings, torch_threads, progress)
            workers = len(_workers(client))
        _clean_stale(out, names)  # every task has ended: what a killed one left is debris
    ordered = [records[job.name] for job in jobs]
    counts = {s: sum(r["status"] == s for r in ordered) for s in ("done", "skipped", "failed")}
    summary = {"out": str(out), "model": settings["model"], "settings": settings,
               "workers": workers, "counts": counts,
               "seconds": round(time.perf_counter() - t0, 3), "slides": ordered}
    atomic_write(out / SUMMARY, lambda tmp: Path(tmp).write_text(
        json.dumps(summary, indent=1, default=str)))
    return summary


def _workers(client) -> dict:
    """Address -> info of every worker (newer distributed lists only 5 unless asked)."""
    try:
        return client.scheduler_info(n_workers=-1)["workers"]
    except TypeError:  # distributed before the n_workers argument
        return client.scheduler_info()["workers"]


def _run(client, jobs: Sequence[CohortSlide], model: str, out: Path, settings: dict,
         torch_threads: int | None, progress) -> dict[str, dict]:
    """Submit one task per slide and collect the records as they finish."""
    from collections import Counter

    from distributed import as_completed

    from napari_hinge.cli import one_line

    host_workers = dict(Counter(w["host"] for w in _workers(client).values()))
    if progress is not None:
        client.subscribe_topic(TILES_TOPIC, lambda event: progress("tiles", event[1]))
    futures = {client.submit(predict_one, job, model, str(out), settings,
                             torch_threads=torch_threads, host_workers=host_workers,
                             key=f"predict-slide-{job.name}-{os.urandom(4).hex()}",
                             pure=False): job for job in jobs}
    records = {}
    try:
        for future in as_completed(futures):
            job = futures[future]
            try:
                record = future.result()
                # forget the result at once: a lost worker holding it would otherwise make
                # the scheduler run the finished slide again
                future.release()
            except Exception as exc:  # noqa: BLE001 -- its workers died (KilledWorker)
                record = {"name": job.name, "slide": job.path, "out": str(out / job.name),
                          "status": "failed", "error": one_line(exc),
                          "error_type": type(exc).__name__}
            records[job.name] = record
            if progress is not None:
                progress("slide", record)
    finally:
        if progress is not None:
            client.unsubscribe_topic(TILES_TOPIC)
        for future in futures:
            future.cancel()
    return records


def summary_table(summary: dict) -> str:
    """The per-slide records as a plain-text table."""
    rows = [("slide", "status", "tiles", "seconds", "error")]
    for r in summary["slides"]:
        rows.append((r["name"], r["status"], str(r.get("tiles") or ""),
                     "" if r.get("seconds") is None else f"{r['seconds']:.1f}",
                     r.get("error", "")))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row[:4], widths, strict=True))
                     + ("  " + row[4] if row[4] else "") for row in rows)
