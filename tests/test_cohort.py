"""Cohort prediction on dask.distributed with real slides (the her2st C2 pyramids, the
shipped C3 sample image, the CMU Aperio slide): a 2-worker local cluster gives the maps of the
serial path, failing slides are reported while the rest finish, a rerun skips complete slides,
and a worker killed mid-run loses no finished output."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
import tifffile

from napari_hinge.hinge.cohort import (
    COMPLETE,
    CohortSlide,
    cohort_slides,
    completed,
    predict_cohort,
    predict_one,
    read_manifest,
)
from napari_hinge.hinge.slide_predict import SLIDE_OUTPUTS

distributed = pytest.importorskip("distributed")

REPO = Path(__file__).resolve().parents[1]
C3 = REPO / "src" / "napari_hinge" / "sample_data" / "her2st_C3" / "images" / "C3_HE.jpg"
C3_MPP = 1.375  # the sample's spot-grid estimate (read_her2st)
# coarse, cheap maps on the per-tile path: the test is about the cluster, not the maps (the
# dense default: test_dense.py)
SETTINGS = {"mode": "tiles", "stride_um": 800, "genes": ["ERBB2", "GRB7", "KRT19"],
            "n_samples": 2, "reveal_steps": 5}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """An untrained HINGE over 3 genes (the cluster, not the model, is under test; sampling
    the shipped model's 275 genes would multiply the test's time)."""
    from napari_hinge.hinge.pipeline import build_model, save_model

    return save_model(build_model(SETTINGS["genes"], 1280, encoder="efficientnet-lite0",
                                  ada_rank=8), tmp_path_factory.mktemp("model") / "hinge")


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    """Two single-threaded worker processes, with the tests' isolated cache."""
    cache = tmp_path_factory.getbasetemp() / "napari-hinge-cache"
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None,
                                  env={"NAPARI_HINGE_CACHE": str(cache)}) as cluster, \
            distributed.Client(cluster) as c:
        yield c


def _digest(folder: Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(folder.iterdir())}


def test_manifest_paths_names_and_errors(tmp_path):
    (tmp_path / "m.csv").write_text("slide,mpp,name\nimages/a.ome.tif,,\nb.jpg,0.5,second\n"
                                    "images/a.ome.tif,,\n")
    jobs = cohort_slides(["x/a.tif"], manifest=tmp_path / "m.csv", mpp=2.0)
    assert [j.name for j in jobs] == ["a", "a-2", "second"]  # the repeated row is dropped
    assert jobs[1].path == str(tmp_path / "images" / "a.ome.tif") and jobs[1].mpp == 2.0
    assert jobs[2].mpp == 0.5
    (tmp_path / "bad.csv").write_text("slide,mpp\na.tif,fast\n")
    with pytest.raises(ValueError, match=r"bad.csv: mpp: line 2: mpp 'fast' is not a number"):
        read_manifest(tmp_path / "bad.csv")
    (tmp_path / "nohead.csv").write_text("path\na.tif\n")
    with pytest.raises(ValueError, match="nohead.csv: slide: needs a header"):
        read_manifest(tmp_path / "nohead.csv")


def test_two_workers_give_the_serial_maps_and_report_bad_slides(client, model_dir, shared_data,
                                                                tmp_path):
    wsi = shared_data / "wsi_small"
    corrupt = tmp_path / "corrupt.tif"  # a pyramid cut short, as by a failed copy
    corrupt.write_bytes((wsi / "her2st_C2_HE_pyramid.tif").read_bytes()[:200_000])
    manifest = tmp_path / "slides.csv"
    manifest.write_text("slide,mpp\n" + "\n".join([
        f"{wsi / 'her2st_C2_HE_pyramid.tif'},", f"{wsi / 'her2st_C2_HE_pyramid.ome.tif'},",
        f"{C3},{C3_MPP}", f"{corrupt},",
        f"{wsi / 'CMU-1-Small-Region.svs'},"]) + "\n")  # a small field: no tile at 800 µm
    events = []
    summary = predict_cohort(manifest=manifest, model=model_dir, out=tmp_path / "maps",
                             scheduler=client,
                             progress=lambda kind, info: events.append((kind, info)),
                             **SETTINGS)
    status = {r["name"]: r["status"] for r in summary["slides"]}
    assert status == {"her2st_C2_HE_pyramid": "done", "her2st_C2_HE_pyramid-2": "done",
                      "C3_HE": "done", "corrupt": "failed", "CMU-1-Small-Region": "failed"}
    errors = {r["name"]: r["error"] for r in summary["slides"] if r["status"] == "failed"}
    assert str(corrupt) in errors["corrupt"] and "truncated" in errors["corrupt"]
    assert "CMU-1-Small-Region.svs" in errors["CMU-1-Small-Region"]
    assert "no tile has enough tissue" in errors["CMU-1-Small-Region"]
    assert not (tmp_path / "maps" / "corrupt").exists()
    assert json.loads((tmp_path / "maps" / "cohort.json").read_text())["counts"] == \
        {"done": 3, "skipped": 0, "failed": 2}
    assert summary["workers"] == 2

    def loaded_models():  # runs in each worker (a local function travels by value)
        from napari_hinge.hinge.cohort import _MODELS

        return list(_MODELS)

    # one model in each worker process, whatever the number of slides it mapped
    assert all(len(keys) <= 1 for keys in client.run(loaded_models).values())
    assert sum(kind == "slide" for kind, _ in events) == 5
    assert any(kind == "tiles" for kind, _ in events)  # the workers' tile progress arrived

    # the serial path: the same task in this process
    settings = json.loads((tmp_path / "maps" / "C3_HE" / COMPLETE).read_text())["settings"]
    settings["cache"] = False  # encode again: the workers' feature cache is not the test
    for job in cohort_slides(manifest=manifest)[:3]:
        record = predict_one(job, str(model_dir), tmp_path / "serial", settings,
                             torch_threads=1)
        assert record["status"] == "done"
        for name in ("maps.ome.tif", "uncertainty.ome.tif"):
            cluster = tifffile.imread(tmp_path / "maps" / job.name / name)
            serial = tifffile.imread(tmp_path / "serial" / job.name / name)
            assert cluster.shape == serial.shape and cluster.shape[0] == 3
            np.testing.assert_allclose(cluster, serial, rtol=1e-5, atol=1e-6)
            assert np.isfinite(cluster).any()

    # a rerun skips the complete slides and tries the failed ones again
    before = _digest(tmp_path / "maps" / "C3_HE")
    again = predict_cohort(manifest=manifest, model=model_dir, out=tmp_path / "maps",
                           scheduler=client, **SETTINGS)
    assert again["counts"] == {"done": 0, "skipped": 3, "failed": 2}
    assert _digest(tmp_path / "maps" / "C3_HE") == before
    # other settings never silently replace complete maps
    other = predict_cohort([C3], model=model_dir, out=tmp_path / "maps", scheduler=client,
                           mpp=C3_MPP, **(SETTINGS | {"stride_um": 1000}))
    assert other["counts"]["failed"] == 1 and "other settings" in other["slides"][0]["error"]
    assert _digest(tmp_path / "maps" / "C3_HE") == before


def test_a_killed_worker_loses_no_finished_slide(client, model_dir, shared_data, tmp_path):
    slides = []
    for name in ("s1", "s2"):  # copies of the real pyramid: same pixels, own caches
        slides.append(tmp_path / f"{name}.tif")
        shutil.copyfile(shared_data / "wsi_small" / "her2st_C2_HE_pyramid.tif", slides[-1])
    slides.append(C3)
    out = tmp_path / "maps"
    finished: dict[str, dict] = {}

    def kill_a_busy_worker(kind, info):
        if kind != "slide" or info["status"] != "done" or finished:
            return
        finished[info["name"]] = _digest(out / info["name"])
        busy = [w for w, keys in client.processing().items() if keys] or \
            list(client.scheduler_info()["workers"])
        pid = client.run(os.getpid, workers=busy[:1])[busy[0]]
        os.kill(pid, signal.SIGKILL)

    summary = predict_cohort(slides, model_dir, out, scheduler=client, mpp=C3_MPP,
                             progress=kill_a_busy_worker, **SETTINGS)
    assert finished, "no slide finished"
    assert not list(out.glob(".*.tmp"))  # what the killed task was writing is cleared
    (name, digest), = finished.items()
    assert _digest(out / name) == digest  # untouched by the kill and the rest of the run
    # the killed worker's slide was rescheduled (or reported): nothing half-written looks complete
    for record in summary["slides"]:
        folder = out / record["name"]
        if record["status"] == "done":
            assert completed(folder) is not None
            assert sorted(completed(folder)["files"]) == sorted(SLIDE_OUTPUTS)
        else:
            assert not folder.exists() or completed(folder) is None
    rerun = predict_cohort(slides, model_dir, out, scheduler=client, mpp=C3_MPP, **SETTINGS)
    assert rerun["counts"]["failed"] == 0
    assert {r["status"] for r in rerun["slides"]} <= {"done", "skipped"}
    assert all(completed(out / r["name"]) for r in rerun["slides"])
    assert not list(out.glob(".*.tmp"))  # a killed task's temporary folder is cleared
    assert _digest(out / name) == digest


def test_cohort_slide_is_plain_data():
    job = CohortSlide("/data/a.tif", "a", 0.5)
    assert cohort_slides([job]) == [job]


def test_the_model_is_loaded_once_per_process_and_per_digest(tmp_path):
    from napari_hinge.hinge.cohort import cached_model, model_key
    from napari_hinge.hinge.pipeline import shipped_model_dir

    assert cached_model("shipped") is cached_model(str(shipped_model_dir()))
    copy = tmp_path / "model"
    shutil.copytree(shipped_model_dir(), copy)
    key = model_key(copy)
    (copy / "calibration.json").write_text((copy / "calibration.json").read_text() + " ")
    assert model_key(copy) != key  # a retrained model in the same folder is loaded again


def test_command_line_on_a_running_scheduler(client, tmp_path, capsys):
    from napari_hinge.cli import main

    out = tmp_path / "cli_maps"
    argv = ["hinge", "predict-cohort", str(C3), "--mpp", str(C3_MPP), "--out", str(out),
            "--mode", "tiles", "--stride", "800", "--genes", "ERBB2,GRB7", "--samples", "2",
            "--reveal-steps", "5", "--scheduler", client.scheduler.address]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "C3_HE" in printed and '"done": 1' in printed
    recorded = completed(out / "C3_HE")["settings"]
    assert recorded["genes"] == ["ERBB2", "GRB7"] and recorded["mode"] == "tiles"
    assert main(argv) == 0 and '"skipped": 1' in capsys.readouterr().out
    # a missing manifest: one line naming the file, exit status 2
    assert main(["hinge", "predict-cohort", "--manifest", str(tmp_path / "none.csv"), "--out",
                 str(out)]) == 2
    assert "none.csv: manifest not found" in capsys.readouterr().err
