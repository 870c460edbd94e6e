"""DDP under torchrun on CPU (gloo): two processes, each computing half of every batch,
reach the parameters of one process with the same global batch, and resume from the
checkpoint rank 0 wrote. Real inputs: EfficientNet features of the shipped C3 sample's spots
and their measured expression."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
RUN = REPO / "tests" / "ddp" / "hinge_run.py"
N_SPOTS, N_GENES = 72, 12


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Features and log-normalised expression of 72 spots of the shipped C3 sample."""
    from napari_hinge._convention import META_KEY
    from napari_hinge.encoders import get_encoder
    from napari_hinge.features import encode_spots
    from napari_hinge.hinge.pipeline import read_dataset

    adata = read_dataset(REPO / "src" / "napari_hinge" / "sample_data" / "her2st_C3",
                         section="C3")
    adata = adata[:N_SPOTS]
    counts = np.asarray(adata.X.todense() if hasattr(adata.X, "todense") else adata.X,
                        np.float64)
    x = np.log1p(counts / counts.sum(1, keepdims=True) * 1e4)
    top = np.argsort(-x.var(0))[:N_GENES]
    meta = adata.uns[META_KEY]
    feats = encode_spots(meta["slide_path"], adata.obsm["spatial"],
                         encoder=get_encoder("efficientnet-lite0"),
                         side_px=int(round(112 / meta["microns_per_pixel"])))
    path = tmp_path_factory.mktemp("ddp") / "c3.npz"
    np.savez(path, features=feats.astype(np.float32), targets=x[:, top].astype(np.float32),
             genes=np.array([str(g) for g in adata.var_names[top]], dtype=str))
    return path


def _launch(script: Path, *args, nproc: int) -> None:
    """Run ``script`` in one process, or under torchrun in ``nproc``; on failure the message
    holds each rank's "finished training" marker and the start and end of stderr."""
    env = os.environ | {"PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(script), *map(str, args)]
    if nproc > 1:
        cmd[1:1] = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    err = proc.stderr
    assert proc.returncode == 0, (
        f"rc {proc.returncode}\n" + "\n".join(line for line in err.splitlines()
                                              if "finished training" in line)
        + f"\n--- stderr start ---\n{err[:1500]}\n--- stderr end ---\n{err[-3000:]}")


def _run(data, out: Path, *extra: str, nproc: int = 1) -> dict:
    _launch(RUN, data, out, *extra, nproc=nproc)
    from safetensors.torch import load_file

    return {"state": load_file(str(out / "state.safetensors")),
            **json.loads((out / "losses.json").read_text())}


def _assert_close(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    # atol 1e-4: the two ranks' gradients are summed in another order than one process's,
    # and Adam turns a near-zero gradient's last bits into a step (seen on one CPU model: 1
    # of 163,840 weights off by 2.8e-5, the losses equal to 1e-4)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-4,
                                   msg=lambda m, k=k: f"{k}: {m}")


def test_two_gloo_processes_train_as_one(data, tmp_path):
    one = _run(data, tmp_path / "one", "--epochs", "2")
    two = _run(data, tmp_path / "two", "--epochs", "2", nproc=2)
    assert one["world_size"] == 1 and two["world_size"] == 2
    # 58 training spots, batches of 16: 4 steps per epoch, the last one uneven (10 = 5 + 5)
    assert len(one["losses"]) == len(two["losses"]) == 8
    np.testing.assert_allclose(two["losses"], one["losses"], rtol=1e-4)
    # each rank computed its half of every batch, not the whole batch
    assert one["rows"] == [2 * 58] and two["rows"] == [58, 58]
    _assert_close(two["state"], one["state"])
    # training moved the weights: the comparison is not between two untrained models
    from napari_hinge.hinge.pipeline import build_model

    genes = [str(g) for g in np.load(data)["genes"]]
    init = build_model(genes, 1280, ada_rank=8, seed=3, predict_variance=True)
    init = init.trainable_state_dict()
    assert max(float((one["state"][k] - init[k]).abs().max()) for k in init) > 1e-3

    # only rank 0 wrote: one checkpoint, one best/ folder
    assert sorted(p.name for p in (tmp_path / "two" / "checkpoints").iterdir()) == \
        ["best", "last.pt"]

    # resume under DDP: stop after epoch 1, continue from rank 0's checkpoint
    _run(data, tmp_path / "resumed", "--epochs", "2", "--stop-after-epoch", "1", nproc=2)
    resumed = _run(data, tmp_path / "resumed", "--epochs", "2", "--resume", nproc=2)
    _assert_close(resumed["state"], one["state"])


@pytest.fixture(scope="module")
def patches(tmp_path_factory):
    """24 real tissue patches of the shipped C3 sample (64 px, 112 µm)."""
    from napari_hinge.c2l.data import slide_patches
    from napari_hinge.io.slides import open_slide

    slide = open_slide(REPO / "src" / "napari_hinge" / "sample_data" / "her2st_C3" / "images"
                       / "C3_HE.jpg", mpp=1.375)
    path = tmp_path_factory.mktemp("ddp_c2l") / "patches.npz"
    np.savez(path, patches=slide_patches(slide, max_patches=24, seed=2)[0])
    return path


def test_c2l_central_pretraining_is_data_parallel_and_resumes(patches, tmp_path):
    from safetensors.torch import load_file

    run = REPO / "tests" / "ddp" / "c2l_run.py"
    _launch(run, patches, tmp_path / "straight", nproc=2)
    ranks = json.loads((tmp_path / "straight" / "ranks.json").read_text())
    # 6 steps of a global batch of 8: each rank ran 4 rows per step; DDP kept them in step
    assert [r["rows"] for r in ranks] == [24, 24]
    assert ranks[0]["digest"] == ranks[1]["digest"]
    assert sorted(p.name for p in (tmp_path / "straight" / "checkpoints").iterdir()) == \
        ["last.pt"]
    # stopped after step 4 and resumed from rank 0's checkpoint (each rank's noise stream
    # is in it): the weights of the uninterrupted run
    _launch(run, patches, tmp_path / "resumed", "--stop-at", 4, nproc=2)
    _launch(run, patches, tmp_path / "resumed", "--resume", nproc=2)
    _assert_close(load_file(str(tmp_path / "resumed" / "state.safetensors")),
                  load_file(str(tmp_path / "straight" / "state.safetensors")))
