"""HINGE end to end on real data: prepare -> fit -> predict -> evaluate, the CLI, the shipped
weights and the headless main job.

Training tests use a tiny colour-statistics encoder registered here (EfficientNet on hundreds of
patches is too slow for a unit test on 2 shared cores); one test runs the real efficientnet-lite0
on a handful of real her2st patches, and the shipped-weights tests run it on the shipped sample.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from napari_hinge import cli
from napari_hinge.encoders import Encoder, register_encoder
from napari_hinge.encoders.base import images_to_tensor
from napari_hinge.hinge.model import HingeModel, state_digest
from napari_hinge.hinge.pipeline import (
    build_model,
    evaluate,
    fit_hinge,
    load_model,
    predict_spots,
    prepare_dataset,
    save_model,
    shipped_model_dir,
    transform_values,
)
from napari_hinge.training import StopToken, run_to_end

TINY = "test-colour-stats"


class ColourStats(Encoder):
    """Per-channel mean/std/quantiles of a 32 px patch: 15 real image features, no weights."""

    name = TINY
    dim = 15
    input_size = 32
    weights_digest = "colour-stats-v1"

    def __init__(self):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1), requires_grad=False)

    def preprocess(self, images):
        return images_to_tensor(images, self.input_size) / 255.0

    def forward(self, x):
        flat = x.flatten(2)
        q = torch.quantile(flat, torch.tensor([0.1, 0.5, 0.9]), dim=2).permute(1, 2, 0)
        return torch.cat([flat.mean(2), flat.std(2), q.flatten(1)], dim=1)


@pytest.fixture(autouse=True)
def _tiny_encoder():
    register_encoder(TINY, lambda weights: ColourStats())


@pytest.fixture(scope="module")
def her2st(shared_data):
    return shared_data / "her2st_subset"


@pytest.fixture(scope="module")
def c2(her2st):
    from napari_hinge.io.spatial import read_her2st

    return read_her2st(her2st, "C2")


@pytest.fixture
def hinge_cli(monkeypatch):
    monkeypatch.setattr(cli, "COMMAND_MODULES", ["napari_hinge.hinge.cli"])
    return cli.main


def _drain(gen):
    """Run a generator to its end; its return value and every event it yielded."""
    events = []
    value, _ = run_to_end(gen, events.append)
    return value, events


# -- data ---------------------------------------------------------------------------------------
def test_prepare_dataset_real_efficientnet(c2):
    """The real encoder on 6 real patches; targets are log1p CP10k over all genes."""
    few = c2[:6].copy()
    genes = ["ERBB2", "CD74", "B2M"]
    feats, targets, names = prepare_dataset(few, genes=genes, min_umi=0)
    assert names == genes
    assert feats.shape == (6, 1280) and feats.dtype == np.float32
    assert np.isfinite(feats).all() and feats.std(0).max() > 0.01  # spots differ
    X = np.asarray(few.X.toarray(), dtype=np.float64)
    j = list(few.var_names).index("CD74")
    expect = np.log1p(X[:, j] / X.sum(1) * 1e4)
    np.testing.assert_allclose(targets[:, 1], expect, rtol=1e-5)


def test_prepare_dataset_errors(c2, tmp_path):
    with pytest.raises(KeyError, match="NOT_A_GENE"):
        prepare_dataset(c2[:5].copy(), genes=["CD74", "NOT_A_GENE"], encoder=TINY, min_umi=0)
    bare = c2[:5].copy()
    bare.uns["napari_hinge"] = {k: v for k, v in bare.uns["napari_hinge"].items()
                                if k != "slide_path"}
    with pytest.raises(FileNotFoundError, match="no H&E image"):
        prepare_dataset(bare, encoder=TINY)
    with pytest.raises(ValueError, match="not a recognised spatial dataset"):
        prepare_dataset(tmp_path, encoder=TINY)


def test_sample_library_size_uses_all_genes():
    from napari_hinge.datasets import load_her2st_sample

    a = load_her2st_sample()
    vals, missing = transform_values(a, ["CD74", "NOPE"])
    assert missing == ["NOPE"] and np.all(vals[:, 1] == 0)
    lib = a.obs["total_counts_all_genes"].to_numpy(float)
    x = np.asarray(a[:, "CD74"].X.toarray()).ravel()
    np.testing.assert_allclose(vals[:, 0], np.log1p(x / lib * 1e4), rtol=1e-5)
    subset = np.asarray(a.X.sum(1)).ravel()
    assert (lib >= subset).all() and np.median(lib / subset) > 1.5  # the subset is not the library


# -- fit / predict / evaluate -------------------------------------------------------------------
def test_fit_predict_evaluate(c2, tmp_path):
    stop = StopToken()
    gen = fit_hinge([c2[:80].copy()], n_genes=8, encoder=TINY, backbone="builtin", epochs=2,
                    batch_size=16, augment=True, seed=3, lr=1e-3, stop=stop,
                    checkpoint_dir=tmp_path / "ck")
    model, events = _drain(gen)
    kinds = [e.kind for e in events]
    assert kinds.count("epoch") == 2 and kinds[-1] == "done" and "step" in kinds
    assert isinstance(model, HingeModel) and model.n_genes == 8
    assert model.config.encoder == TINY and model.config.backbone_ref == "builtin"
    outside = events[-1].metrics["genes_outside_vocab"]
    assert outside == [g for g in model.config.genes if g not in model.backbone.vocab]
    # the feature standardisation is part of the weights of both folders
    for folder in ("final", "best"):
        saved = HingeModel.load(tmp_path / "ck" / folder)
        assert torch.equal(saved.feature_std, model.feature_std)
        assert not torch.equal(saved.feature_std, torch.ones_like(saved.feature_std))

    spots = c2[80:120].copy()
    pred = predict_spots(model, spots, n_samples=3, reveal_steps=5, seed=1, key_added="hz")
    G = model.n_genes
    assert pred.shape == (40, G) and list(pred.var_names) == model.config.genes
    assert pred.layers["std"].shape == (40, G) and (pred.layers["std"] > 0).any()
    assert pred.layers["measured"].shape == (40, G) and pred.var["measured"].all()
    assert spots.obsm["hz_mean"].shape == (40, G) and spots.obsm["hz_std"].shape == (40, G)
    assert spots.uns["hz"]["n_samples"] == 3 and spots.uns["hz"]["reveal_steps"] == 5
    np.testing.assert_array_equal(pred.obsm["spatial"], spots.obsm["spatial"])
    again = predict_spots(model, spots, n_samples=3, reveal_steps=5, seed=1, key_added="hz")
    np.testing.assert_array_equal(again.X, pred.X)  # seeded
    from napari_hinge import tl

    via_tl = tl.predict(spots, model, n_samples=3, reveal_steps=5, seed=1, key_added="hz")
    np.testing.assert_array_equal(via_tl.X, pred.X)  # the scanpy-style entry point

    scores = evaluate(pred, spots)
    assert scores["genes_scored"] == G and len(scores["pcc_per_gene"]) == G
    assert {"pcc_top10", "mse", "mae", "coexpression", "pcc_per_gene"} <= set(scores)


def test_fit_stop_and_explicit_panel_errors(c2):
    stop = StopToken()
    stop.request()
    model, events = _drain(fit_hinge([c2[:40].copy()], genes=["CD74", "B2M", "HLA-B"],
                                     encoder=TINY, epochs=1, augment=False, stop=stop))
    assert events[-1].kind == "stopped"
    with pytest.raises(KeyError, match="FAKEGENE1.*FAKEGENE2|FAKEGENE2.*FAKEGENE1"):
        _drain(fit_hinge([c2[:40].copy()], genes=["CD74", "FAKEGENE1", "FAKEGENE2"],
                         encoder=TINY, epochs=1, augment=False))
    # a gene the data measures but the backbone does not know gets a learned token
    model = build_model(["CD74", "B2M", "CEACAM6"], 15, backbone="builtin")
    assert model.config.extra_genes == ["CEACAM6"]


# -- command line -------------------------------------------------------------------------------
def test_cli_train_predict_evaluate(hinge_cli, tmp_path, capsys):
    from napari_hinge.datasets import her2st_sample_paths

    folder = str(her2st_sample_paths()["folder"])
    model_dir = tmp_path / "model"
    rc = hinge_cli(["train", folder, "--section", "C3", "--out", str(model_dir),
                    "--encoder", TINY, "--epochs", "2", "--n-genes", "6", "--batch-size", "32",
                    "--no-augment", "--seed", "1"])
    assert rc == 0, capsys.readouterr().err
    assert (model_dir / "config.json").is_file() and (model_dir / "model.safetensors").is_file()
    assert (tmp_path / "model.checkpoints" / "last.pt").is_file()
    # a second run must not overwrite the model nor the checkpoints
    rc = hinge_cli(["train", folder, "--section", "C3", "--out", str(model_dir),
                    "--encoder", TINY, "--epochs", "2", "--n-genes", "6"])
    assert rc == 2 and "already holds a model" in capsys.readouterr().err
    # resume: the run is complete, continuing it to 3 epochs trains one more epoch
    rc = hinge_cli(["train", folder, "--section", "C3", "--out", str(model_dir),
                    "--encoder", TINY, "--epochs", "3", "--n-genes", "6", "--batch-size", "32",
                    "--no-augment", "--seed", "1", "--resume"])
    assert rc == 0, capsys.readouterr().err

    out = tmp_path / "pred.h5ad"
    rc = hinge_cli(["predict", f"{folder}:C3", "--model", str(model_dir), "--out", str(out),
                    "--samples", "2", "--reveal-steps", "4"])
    assert rc == 0, capsys.readouterr().err
    assert out.is_file() and out.with_suffix(".png").stat().st_size > 10_000
    import anndata as ad

    pred = ad.read_h5ad(out)
    assert pred.n_vars == 6 and "std" in pred.layers and "spatial" in pred.obsm
    capsys.readouterr()
    rc = hinge_cli(["evaluate", folder, "--section", "C3", "--pred", str(out),
                    "--json", str(tmp_path / "s.json")])
    assert rc == 0
    assert "pcc_mean" in capsys.readouterr().out
    scores = json.loads((tmp_path / "s.json").read_text())
    assert scores["genes_scored"] == 6 and len(scores["pcc_per_gene"]) == 6


def test_cli_bad_input(hinge_cli, tmp_path, capsys):
    from napari_hinge.datasets import her2st_sample_paths

    folder = str(her2st_sample_paths()["folder"])
    rc = hinge_cli(["train", folder, "--section", "C3", "--out", str(tmp_path / "m"),
                    "--encoder", TINY, "--genes", "CD74,B2M,NOT_IN_VOCAB_XYZ"])
    err = capsys.readouterr().err
    assert rc == 2 and "NOT_IN_VOCAB_XYZ" in err
    not_data = tmp_path / "just_a_folder"
    not_data.mkdir()
    (not_data / "notes.txt").write_text("hello")
    rc = hinge_cli(["predict", str(not_data), "--out", str(tmp_path / "p.h5ad")])
    err = capsys.readouterr().err
    assert rc == 2 and "not a recognised spatial dataset" in err and "just_a_folder" in err
    rc = hinge_cli(["evaluate", folder, "--section", "C3", "--model", str(not_data)])
    err = capsys.readouterr().err
    assert rc == 2 and "not a saved HINGE model" in err


# -- shipped weights and the main job ------------------------------------------------------------
needs_shipped = pytest.mark.skipif(not (shipped_model_dir() / "config.json").is_file(),
                                   reason="shipped HINGE weights not built yet")


@needs_shipped
def test_shipped_weights_reload_bit_identically(tmp_path):
    a = load_model("shipped")
    b = load_model(shipped_model_dir())
    assert state_digest(a) == state_digest(b)
    assert torch.equal(a.feature_mean, b.feature_mean)
    assert torch.equal(a.feature_std, b.feature_std)
    save_model(a, tmp_path / "copy")
    c = load_model(tmp_path / "copy")
    sa, sc = a.state_dict(), c.state_dict()
    assert sa.keys() == sc.keys()
    assert all(torch.equal(sa[k], sc[k]) for k in sa)
    assert a.config == c.config
    assert a.config.backbone_ref == "builtin"  # refers to the shipped backbone, not a copy
    size = sum(f.stat().st_size for f in shipped_model_dir().iterdir() if f.is_file())
    assert size < 8 * 2**20


@needs_shipped
def test_shipped_weights_predict_the_held_out_sample(tmp_path, shared_data):
    """The shipped model on the shipped sample (her2st C3, never trained on): real, failable."""
    from napari_hinge.hinge.demo_job import run_hinge_demo

    summary = run_hinge_demo(tmp_path, n_samples=4, reveal_steps=5)
    scores = json.loads((tmp_path / "hinge_C3_summary.json").read_text())
    assert scores["genes_scored"] >= 250
    assert {"ERBB2", "CEACAM6", "MKI67"} <= set(load_model("shipped").config.genes)
    # against a tuned ridge trained on the same sections and scored on the same spots, with
    # exactly the inputs the shipped network sees
    ratio = summary["pcc_mean"] / _ridge_on_the_shipped_split(summary, shared_data)
    assert ratio > 0.95, ratio
    import anndata as ad

    pred = ad.read_h5ad(tmp_path / "hinge_C3.h5ad")
    assert "spatial" in pred.obsm and pred.n_obs == 180
    from PIL import Image

    img = Image.open(tmp_path / "hinge_C3.png")
    assert min(img.size) > 300


def _ridge_on_the_shipped_split(summary, shared_data) -> float:
    """Mean PCC on the shipped sample of a tuned ridge trained on the shipped model's training
    sections (real features, the model's own inputs), over the genes the demo scored."""
    import anndata as ad

    from napari_hinge._convention import library_size
    from napari_hinge.baselines import TunedRidge
    from napari_hinge.datasets import load_her2st_sample
    from napari_hinge.encoders import get_encoder
    from napari_hinge.expression import load_her2st_sections
    from napari_hinge.hinge.pipeline import coords_um_of, model_inputs, spot_features
    from napari_hinge.metrics import gene_pearson

    model = load_model("shipped")
    log = json.loads((shipped_model_dir() / "training_log.json").read_text())
    secs = load_her2st_sections(shared_data / "her2st_subset", log["train_sections"],
                                encoder=get_encoder(model.config.encoder), side_px=160)
    feats = np.concatenate([s.features for s in secs])
    coords = np.concatenate([np.asarray(s.adata.obsm["spatial"])
                             * s.adata.uns["napari_hinge"]["microns_per_pixel"] for s in secs])
    groups = np.concatenate([np.full(s.adata.n_obs, s.name) for s in secs])
    Y = np.concatenate([transform_values(s.adata, model.config.genes)[0] for s in secs])
    X = model_inputs(model, feats, coords, groups)
    ridge = TunedRidge().fit(X, Y, groups=groups)

    pred = ad.read_h5ad(summary["h5ad"])
    sample = load_her2st_sample()
    keep = library_size(sample) >= 100  # as evaluate() scores
    Xs = model_inputs(model, spot_features(sample, encoder=model.config.encoder),
                      coords_um_of(sample))
    ok = pred.var["measured"].to_numpy(bool)
    measured = np.asarray(pred.layers["measured"])
    return float(gene_pearson(ridge.predict(Xs)[keep][:, ok], measured[keep][:, ok]).mean())


def test_data_unlike_the_training_is_warned_about(c2):
    """Mouse-style symbols, or few of the model's genes measured: a warning names it."""
    import anndata as ad
    import pandas as pd

    from napari_hinge.hinge.pipeline import warn_if_unlike_training

    genes = ["ERBB2", "CD74", "B2M", "EPCAM"]
    mouse = ad.AnnData(np.zeros((3, 3), np.float32),
                       var=pd.DataFrame(index=["Erbb2", "Cd74", "Actb"]))
    with pytest.warns(UserWarning, match="mouse symbols"):
        warn_if_unlike_training(mouse, genes, missing=genes)
    with pytest.warns(UserWarning, match="only 1 of the model's 4 genes"):
        warn_if_unlike_training(c2, genes, missing=genes[1:])
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_if_unlike_training(c2, genes, missing=[])  # human data, all measured: silent
