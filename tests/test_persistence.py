"""The one model-folder contract (napari_hinge.persistence): a round trip per model on real
inputs (save -> load -> bit-identical outputs) and the refusals (other kind, other version,
unknown keys, missing or corrupt files, format-1 folders and their upgrade)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from napari_hinge.c2l.central import CentralModel
from napari_hinge.c2l.local import LocalModel, build_local
from napari_hinge.errors import InputError
from napari_hinge.hinge.model import HingeModel
from napari_hinge.hinge.pipeline import load_model, model_inputs, predict_spots, spot_features
from napari_hinge.hinge.sampler import sample
from napari_hinge.persistence import CONFIG_FILE, WEIGHTS_FILE
from napari_hinge.scfm import load_backbone
from napari_hinge.stmgac.model import STMGAC
from napari_hinge.upgrade import FEATURE_NORM_FILE, upgrade_folder


@pytest.fixture(scope="module")
def c3():
    from napari_hinge.datasets import load_her2st_sample

    return load_her2st_sample()


@pytest.fixture(scope="module")
def shipped_hinge():
    return load_model("shipped")


@pytest.fixture(scope="module")
def c3_features(c3, shipped_hinge, tmp_path_factory):
    sub = c3[:24].copy()
    return sub, spot_features(sub, encoder=shipped_hinge.config.encoder, cache=False)


def _same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


# -- round trips ---------------------------------------------------------------------------
def test_hinge_round_trip_predicts_bit_identically(shipped_hinge, c3_features, tmp_path):
    sub, feats = c3_features
    folder = shipped_hinge.save(tmp_path / "hinge")
    assert not (folder / FEATURE_NORM_FILE).exists()  # the standardisation is in the weights
    assert (folder / "calibration.json").is_file()
    again = load_model(folder)
    _same_state(shipped_hinge, again)
    assert again.config == shipped_hinge.config
    assert again.calibration == shipped_hinge.calibration
    kw = {"features": feats, "n_samples": 2, "reveal_steps": 5, "seed": 3}
    a = predict_spots(shipped_hinge, sub.copy(), **kw)
    b = predict_spots(again, sub.copy(), **kw)
    np.testing.assert_array_equal(a.X, b.X)
    np.testing.assert_array_equal(a.layers["std"], b.layers["std"])


def test_hinge_standardises_inside_the_model(shipped_hinge, c3_features):
    """No caller standardises: the same features give the same samples as standardising by
    hand and running an identity-standardised copy."""
    sub, feats = c3_features
    from napari_hinge.hinge.pipeline import coords_um_of

    x = model_inputs(shipped_hinge, feats, coords_um_of(sub))
    assert not np.allclose(shipped_hinge.feature_std.numpy(), 1.0)
    by_hand = ((x - shipped_hinge.feature_mean.numpy()) / shipped_hinge.feature_std.numpy())
    plain = HingeModel(shipped_hinge.backbone, shipped_hinge.config)
    plain.load_trainable_state_dict({**shipped_hinge.trainable_state_dict(),
                                     "feature_mean": torch.zeros(x.shape[-1]),
                                     "feature_std": torch.ones(x.shape[-1])})
    a = sample(shipped_hinge, x, n_samples=2, reveal_steps=5, seed=1)
    b = sample(plain.eval(), by_hand.astype(np.float32), n_samples=2, reveal_steps=5, seed=1)
    torch.testing.assert_close(a.mean, b.mean, atol=1e-5, rtol=0)


def test_backbone_round_trip(tmp_path, c3):
    bb = load_backbone("builtin")
    folder = bb.save(tmp_path / "bb")
    again = load_backbone(folder)
    _same_state(bb, again)
    assert again.vocab == bb.vocab and again.config == bb.config
    genes = [g for g in c3.var_names if g in bb.vocab][:16]
    ids, _ = bb.gene_ids(genes)
    x = torch.as_tensor(np.log1p(c3[:8, genes].X.toarray()), dtype=torch.float32)
    with torch.no_grad():
        h1 = bb.embed(ids.expand(8, -1), x)
        h2 = again.embed(ids.expand(8, -1), x)
    assert torch.equal(h1, h2)


def test_stmgac_round_trip(tmp_path, c3):
    from napari_hinge.stmgac.graph import gcn_normalize, knn_adjacency, to_torch
    from napari_hinge.stmgac.train import train_stmgac
    from napari_hinge.training import run_to_end

    x = np.log1p(c3.X[:, :40].toarray()).astype(np.float32)
    adj = knn_adjacency(c3.obsm["spatial"], 6)
    model, _ = run_to_end(train_stmgac(x, adj, "legacy_st", n_domains=3, epochs=3, seed=1,
                                       device="cpu"))
    folder = model.save(tmp_path / "stmgac")
    again = STMGAC.load(folder)
    _same_state(model, again)
    xt, a = torch.from_numpy(x), to_torch(gcn_normalize(adj), torch.device("cpu"))
    assert torch.equal(model.embed(xt, a), again.embed(xt, a))


def test_c2l_central_and_local_round_trip(tmp_path, c3):
    from napari_hinge.c2l.data import paired_spots

    central = CentralModel.load("shipped")
    folder = central.save(tmp_path / "central", half=True)  # as shipped: float16
    again = CentralModel.load(folder)
    _same_state(central, again)
    np.testing.assert_array_equal(central.sample(2, steps=3, seed=2),
                                  again.sample(2, steps=3, seed=2))

    patches, expr, genes, _ = paired_spots(c3[:40], ["ERBB2", "CD74", "B2M"])
    local = build_local(central, genes, hidden=16, seed=0)
    local.set_expression_stats(expr)
    with torch.no_grad():  # away from the zero-initialised heads
        for p in local.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.01)
    folder = local.save(tmp_path / "local")
    assert (folder / "central" / CONFIG_FILE).is_file()
    again = LocalModel.load(folder)
    _same_state(local, again)
    x0 = central.encode(torch.from_numpy(patches[:2]).permute(0, 3, 1, 2).float() / 127.5 - 1)
    t, cond = torch.tensor([10, 500]), torch.as_tensor(expr[:2])
    with torch.no_grad():
        assert torch.equal(local.eval()(x0, t, cond), again(x0, t, cond))


# -- refusals ------------------------------------------------------------------------------
@pytest.fixture
def stmgac_folder(tmp_path):
    from napari_hinge.stmgac.model import STMGACConfig

    torch.manual_seed(0)
    return STMGAC(STMGACConfig(in_dim=12)).save(tmp_path / "m")


def _rewrite(folder, change):
    path = folder / CONFIG_FILE
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def test_unknown_config_keys_are_named(stmgac_folder):
    _rewrite(stmgac_folder, lambda d: d["config"].update(mask_rat=0.5))
    with pytest.raises(InputError, match=r"unknown STMGACConfig key\(s\) \['mask_rat'\]") as err:
        STMGAC.load(stmgac_folder)
    assert str(stmgac_folder) in str(err.value)


def test_nested_unknown_keys_are_named(tmp_path):
    folder = CentralModel.load("shipped").save(tmp_path / "c")
    _rewrite(folder, lambda d: d["config"]["unet"].update(chanels=[1]))
    with pytest.raises(InputError, match=r"unet: unknown UNetConfig key\(s\) \['chanels'\]"):
        CentralModel.load(folder)


def test_wrong_kind_and_version(stmgac_folder):
    with pytest.raises(InputError, match="holds a 'stmgac' model, not a 'c2l-central' model"):
        CentralModel.load(stmgac_folder)
    _rewrite(stmgac_folder, lambda d: d.update(version=99))
    with pytest.raises(InputError, match="newer release"):
        STMGAC.load(stmgac_folder)
    _rewrite(stmgac_folder, lambda d: d.update(version=1))
    with pytest.raises(InputError, match="python -m napari_hinge.upgrade"):
        STMGAC.load(stmgac_folder)


def test_missing_and_corrupt_files(stmgac_folder, tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        STMGAC.load(tmp_path / "nothing")
    weights = stmgac_folder / WEIGHTS_FILE
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0xFF  # one flipped bit inside a tensor: the header still parses
    weights.write_bytes(bytes(data))
    with pytest.raises(InputError, match="digest mismatch") as err:
        STMGAC.load(stmgac_folder)
    assert WEIGHTS_FILE in str(err.value)
    weights.unlink()
    with pytest.raises(FileNotFoundError, match=WEIGHTS_FILE):
        STMGAC.load(stmgac_folder)
    (stmgac_folder / CONFIG_FILE).write_text("{not json")
    with pytest.raises(InputError, match="not valid JSON"):
        STMGAC.load(stmgac_folder)


def test_weights_that_do_not_fit_are_named(stmgac_folder):
    from safetensors.torch import load_file, save_file

    from napari_hinge.persistence import file_sha256

    weights = stmgac_folder / WEIGHTS_FILE
    state = load_file(weights)
    state["unexpected.weight"] = torch.zeros(2)
    save_file(state, str(weights))
    _rewrite(stmgac_folder, lambda d: d.update(weights_sha256=file_sha256(weights)))
    with pytest.raises(InputError, match=r"unexpected \['unexpected.weight'\]"):
        STMGAC.load(stmgac_folder)


# -- format-1 folders ----------------------------------------------------------------------
def _as_format_1_hinge(model: HingeModel, folder):
    """The first-round layout, as it was written: config.json = the bare HingeConfig,
    the standardisation in feature_norm.safetensors, format_version in meta.json."""
    from safetensors.torch import save_file

    model.save(folder)
    envelope = json.loads((folder / CONFIG_FILE).read_text())
    (folder / CONFIG_FILE).write_text(json.dumps(envelope["config"]))
    state = {k: v.contiguous() for k, v in model.trainable_state_dict().items()}
    mean, std = state.pop("feature_mean"), state.pop("feature_std")
    save_file(state, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
    save_file({"mean": mean, "std": std}, str(folder / FEATURE_NORM_FILE))
    meta = json.loads((folder / "meta.json").read_text())
    (folder / "meta.json").write_text(json.dumps({"format_version": 1, **meta}))
    (folder / "TRAINING.md").write_text("kept")


def test_format_1_hinge_is_refused_then_upgraded_exactly(shipped_hinge, c3_features, tmp_path):
    sub, feats = c3_features
    folder = tmp_path / "old"
    _as_format_1_hinge(shipped_hinge, folder)
    with pytest.raises(InputError, match=f"python -m napari_hinge.upgrade {folder}"):
        load_model(folder)
    assert upgrade_folder(folder) == "hinge"
    assert upgrade_folder(folder) is None  # already current
    assert (folder / "TRAINING.md").read_text() == "kept"
    assert not (folder / FEATURE_NORM_FILE).exists()
    again = load_model(folder)
    _same_state(shipped_hinge, again)
    kw = {"features": feats, "n_samples": 2, "reveal_steps": 5, "seed": 0}
    np.testing.assert_array_equal(predict_spots(shipped_hinge, sub.copy(), **kw).X,
                                  predict_spots(again, sub.copy(), **kw).X)


def test_format_1_c2l_and_backbone_upgrade(tmp_path):
    from napari_hinge.upgrade import main

    central = CentralModel.load("shipped")
    folder = central.save(tmp_path / "c", half=True)
    # format 1: the bare config with its kind inside
    (folder / CONFIG_FILE).write_text(json.dumps({**central.config.to_dict(),
                                                  "kind": "c2l-central"}))
    bb = load_backbone("builtin")
    bfolder = bb.save(tmp_path / "b")
    envelope = json.loads((bfolder / CONFIG_FILE).read_text())
    (bfolder / CONFIG_FILE).write_text(json.dumps(envelope["config"]))
    for f in (folder, bfolder):
        with pytest.raises(InputError, match="model format 1"):
            (CentralModel.load if f is folder else load_backbone)(f)
    assert main([str(folder), str(bfolder)]) == 0
    _same_state(central, CentralModel.load(folder))
    _same_state(bb, load_backbone(bfolder))


def test_shipped_weights_are_current():
    from napari_hinge.c2l.central import shipped_central_dir
    from napari_hinge.hinge.pipeline import shipped_model_dir
    from napari_hinge.scfm import BUILTIN_DIR
    from napari_hinge.upgrade import detect_legacy_kind

    for folder in (shipped_model_dir(), shipped_central_dir(), BUILTIN_DIR):
        assert detect_legacy_kind(folder) is None, folder
        assert not (folder / FEATURE_NORM_FILE).exists()


def test_copy_of_a_folder_keeps_loading(shipped_hinge, tmp_path):
    """The digest covers the bytes, not the path: a copied folder loads."""
    folder = shipped_hinge.save(tmp_path / "a")
    shutil.copytree(folder, tmp_path / "b")
    _same_state(shipped_hinge, load_model(tmp_path / "b"))
