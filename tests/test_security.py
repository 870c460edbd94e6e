"""No code from any file: a crafted pickle fed to every loading path of the package.

The payload is a real ``torch.save`` file whose unpickling calls ``open(marker, 'w')``; the
control test proves that a full unpickle runs it. Every loader must refuse the file, name it,
and leave no marker behind. Inputs are tiny: each case stops at the load.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from napari_hinge import cli
from napari_hinge.training import load_checkpoint, run_to_end

torch.set_num_threads(1)


class _Payload:
    """Unpickling this creates ``marker``: a stand-in for any code."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def write_payload(path: Path, marker: Path) -> Path:
    """A crafted checkpoint at ``path`` (a valid torch zip file holding the payload)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": _Payload(marker), "epoch": 1, "x": torch.zeros(2)}, path)
    return path


@pytest.fixture
def marker(tmp_path) -> Path:
    return tmp_path / "CODE_RAN"


def refused(call, path: Path, marker: Path, exc=(ValueError, OSError)) -> str:
    """Run ``call``; it must raise naming ``path`` and must not have run the payload."""
    with pytest.raises(exc) as err:
        call()
    assert not marker.exists(), f"the payload in {path} ran"
    assert path.name in str(err.value), f"the error does not name {path}: {err.value}"
    return str(err.value)


def test_control_full_unpickling_runs_the_payload(tmp_path, marker):
    path = write_payload(tmp_path / "last.pt", marker)
    torch.load(path, weights_only=False)  # what load_checkpoint must never do
    assert marker.exists()


def test_load_checkpoint_refuses_a_crafted_pickle(tmp_path, marker):
    path = write_payload(tmp_path / "last.pt", marker)
    msg = refused(lambda: load_checkpoint(path), path, marker)
    assert "refused" in msg


# -- resume paths -------------------------------------------------------------------------------
def test_hinge_train_resume(tmp_path, marker):
    from napari_hinge.hinge.model import HingeConfig, HingeModel
    from napari_hinge.hinge.train import train_hinge
    from napari_hinge.scfm import BackboneConfig, BuiltinBackbone

    genes = [f"G{i}" for i in range(6)]
    cfg = BackboneConfig(d_model=16, n_layers=1, n_heads=2, d_ff=16)
    bb = BuiltinBackbone(cfg, {"<pad>": 0} | {g: i + 1 for i, g in enumerate(genes)})
    model = HingeModel(bb, HingeConfig(genes=genes, feature_dim=4))
    path = write_payload(tmp_path / "ck" / "last.pt", marker)
    rng = np.random.default_rng(0)
    gen = train_hinge(model, rng.standard_normal((12, 4), dtype=np.float32),
                      rng.random((12, 6), dtype=np.float32), checkpoint_dir=path.parent,
                      resume=True, epochs=1)
    refused(lambda: next(gen), path, marker)


def test_cli_train_resume(tmp_path, marker, monkeypatch, capsys):
    """``napari-hinge train --resume``: one line on stderr, exit 2, no code run."""
    from napari_hinge.datasets import her2st_sample_paths
    from napari_hinge.encoders import register_encoder
    from test_hinge_pipeline import TINY, ColourStats

    register_encoder(TINY, lambda weights: ColourStats())
    out = tmp_path / "model"
    path = write_payload(tmp_path / "model.checkpoints" / "last.pt", marker)
    folder = her2st_sample_paths()["folder"]
    monkeypatch.setattr(cli, "COMMAND_MODULES", ["napari_hinge.hinge.cli"])
    rc = cli.main(["train", str(folder), "--section", "C3", "--out", str(out), "--encoder", TINY,
                   "--epochs", "1", "--n-genes", "4", "--no-augment", "--resume"])
    err = capsys.readouterr().err
    assert rc == 2 and not marker.exists()
    assert str(path) in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


@pytest.fixture(scope="module")
def patches():
    """Four real 64 px H&E patches (112 µm) from the shipped her2st C3 image."""
    from PIL import Image

    from napari_hinge.datasets import her2st_sample_paths

    with Image.open(her2st_sample_paths()["image"]) as img:
        w, h = img.size
        crop = np.asarray(img.convert("RGB").crop((w // 2, h // 2, w // 2 + 128, h // 2 + 128)))
    return np.stack([crop[y:y + 64, x:x + 64] for y in (0, 64) for x in (0, 64)])


def _tiny_central(latent: bool):
    from napari_hinge.c2l.autoencoder import AutoencoderConfig
    from napari_hinge.c2l.central import CentralConfig, CentralModel
    from napari_hinge.c2l.unet import UNetConfig

    unet = {"channels": (8, 16), "attention_levels": (), "time_dim": 16, "groups": 8}
    if latent:
        return CentralModel(CentralConfig(
            unet=UNetConfig(image_size=16, in_channels=4, stem=1, **unet),
            autoencoder=AutoencoderConfig(channels=(8, 16, 32), groups=8), timesteps=10))
    return CentralModel(CentralConfig(unet=UNetConfig(stem=4, **unet), timesteps=10))


@pytest.mark.parametrize("which", ["central", "latent-central", "local", "autoencoder", "refine"])
def test_c2l_resume(which, tmp_path, marker, patches):
    """C2L pre-training (c2l-pretrain), adaptation (c2l-adapt) and the autoencoder stages."""
    from napari_hinge.c2l.autoencoder import AutoencoderConfig, PatchAutoencoder
    from napari_hinge.c2l.local import build_local
    from napari_hinge.c2l.train import (
        refine_decoder,
        train_autoencoder,
        train_central,
        train_local,
    )

    path = write_payload(tmp_path / "ck" / "last.pt", marker)
    kw = {"steps": 1, "batch_size": 2, "checkpoint_dir": path.parent, "resume": True}
    if which in ("central", "latent-central"):
        gen = train_central(_tiny_central(which == "latent-central"), patches, val_count=0, **kw)
    elif which == "local":
        local = build_local(_tiny_central(False), ["A", "B"], hidden=8)
        gen = train_local(local, patches, np.ones((len(patches), 2)), val_count=0, **kw)
    else:
        ae = PatchAutoencoder(AutoencoderConfig(channels=(8, 16, 32), groups=8))
        train = train_autoencoder if which == "autoencoder" else refine_decoder
        gen = train(ae, patches, val_count=0, **kw)
    refused(lambda: run_to_end(gen), path, marker)


def test_stmgac_resume(tmp_path, marker, shared_data):
    from napari_hinge.io.spatial import read_her2st
    from napari_hinge.stmgac.graph import knn_adjacency
    from napari_hinge.stmgac.train import train_stmgac

    adata = read_her2st(shared_data / "her2st_subset", "C2", images=False)[:60]
    x = np.log1p(adata.X[:, :32].toarray())
    path = write_payload(tmp_path / "last.pt", marker)
    gen = train_stmgac(x, knn_adjacency(adata.obsm["spatial"], 6), "legacy_st", n_domains=3,
                       epochs=1, checkpoint_dir=path.parent, resume=True)
    refused(lambda: next(gen), path, marker)


# -- model folders and user weight files --------------------------------------------------------
def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("target", ["model.safetensors", "meta.json", "calibration.json"])
def test_hinge_model_folder(tmp_path, marker, target):
    from napari_hinge.hinge.pipeline import load_model, shipped_model_dir

    folder = _copy(shipped_model_dir(), tmp_path / "hinge")
    path = write_payload(folder / target, marker)
    with pytest.raises(Exception) as err:  # any refusal; the payload must not run
        load_model(folder)
    assert not marker.exists()
    assert path.name in str(err.value)


@pytest.mark.parametrize("kind", ["central", "local"])
def test_c2l_model_folder(tmp_path, marker, kind):
    from napari_hinge.c2l.central import CentralModel
    from napari_hinge.c2l.local import LocalModel, build_local

    model = _tiny_central(False) if kind == "central" else build_local(_tiny_central(False),
                                                                        ["A", "B"], hidden=8)
    folder = model.save(tmp_path / kind)
    path = write_payload(folder / "model.safetensors", marker)
    load = CentralModel.load if kind == "central" else LocalModel.load
    refused(lambda: load(folder), path, marker)


def test_backbone_folders_and_files(tmp_path, marker, shared_data):
    from napari_hinge.scfm import BUILTIN_DIR, BuiltinBackbone, load_backbone

    saved = _copy(BUILTIN_DIR, tmp_path / "builtin")
    path = write_payload(saved / "model.safetensors", marker)
    refused(lambda: load_backbone(saved), path, marker)
    refused(lambda: BuiltinBackbone.load(saved), path, marker)

    scgpt = tmp_path / "scgpt"
    scgpt.mkdir()
    (scgpt / "args.json").write_text(json.dumps(
        {"embsize": 16, "nheads": 2, "d_hid": 16, "nlayers": 1}))
    (scgpt / "vocab.json").write_text(json.dumps({"<pad>": 0, "<cls>": 1, "A": 2}))
    path = write_payload(scgpt / "best_model.pt", marker)
    refused(lambda: load_backbone(scgpt), path, marker)

    cellfm = tmp_path / "cellfm"
    cellfm.mkdir()
    (cellfm / "gene_info.csv").write_text("gene_name,chrom\nA,1\nB,1\n")
    path = write_payload(cellfm / "cellfm.pt", marker)
    refused(lambda: load_backbone(path), path, marker)


@pytest.mark.parametrize("suffix", [".bin", ".pth", ".pt", ".ckpt", ".safetensors"])
def test_encoder_weights(tmp_path, marker, suffix):
    from napari_hinge.encoders import get_encoder

    path = write_payload(tmp_path / f"pytorch_model{suffix}", marker)
    refused(lambda: get_encoder("uni", weights=path), path, marker)
