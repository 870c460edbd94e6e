"""The trainer contract (napari_hinge.training): one device rule, epochs and steps counted
from 1 by every trainer, and the same resume rules: an interrupted run resumed from its
checkpoint folder ends with the parameters of an uninterrupted one; other settings, a
missing checkpoint or an existing one without ``resume`` are refused alike."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_hinge.device import default_device
from napari_hinge.errors import InputError
from napari_hinge.training import StopToken, run_to_end


# -- the device rule -----------------------------------------------------------------------
@pytest.mark.parametrize(("cuda", "mps", "expected"), [(True, True, "cuda"),
                                                      (False, True, "mps"),
                                                      (False, False, "cpu")])
def test_device_rule(monkeypatch, cuda, mps, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
    assert default_device().type == expected
    assert default_device(None).type == expected
    assert default_device("cpu").type == "cpu"  # an explicit choice wins


def test_device_rule_refuses_a_missing_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(ValueError, match="no CUDA GPU"):
        default_device("cuda")
    with pytest.raises(ValueError, match="MPS is not available"):
        default_device("mps")


def test_every_cli_has_a_device_option():
    from napari_hinge.cli import build_parser

    for command in ("hinge train", "hinge predict", "stmgac domains", "c2l pretrain",
                    "c2l adapt", "c2l fill"):
        parser = build_parser(command)
        sub = parser
        for word in command.split():  # down the group, then the command
            sub = sub._subparsers._group_actions[0].choices[word]
        assert "--device" in sub._option_string_actions, command


# -- real small data -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def c3():
    from napari_hinge.datasets import load_her2st_sample

    return load_her2st_sample()


@pytest.fixture(scope="module")
def stmgac_input(c3):
    from napari_hinge.stmgac.graph import knn_adjacency

    x = np.log1p(c3.X[:, :40].toarray()).astype(np.float32)
    return x, knn_adjacency(c3.obsm["spatial"], 6)


def _stop_after(gen, stop: StopToken, epoch: int):
    events = []
    for ev in gen:
        events.append(ev)
        if ev.kind == "epoch" and ev.epoch == epoch:
            stop.request()
    return events


@pytest.fixture
def one_thread():
    """STMGAC's sparse products reduce in a thread-dependent order on the CPU: two plain runs
    differ in the last bits with several threads (not a resume matter), agree with one."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_stmgac_resume_equals_an_uninterrupted_run(stmgac_input, tmp_path, one_thread):
    from napari_hinge.stmgac.train import train_stmgac

    x, adj = stmgac_input
    kw = {"n_domains": 3, "epochs": 6, "seed": 2, "device": "cpu", "checkpoint_every": 100}
    straight, _ = run_to_end(train_stmgac(x, adj, "legacy_st", **kw))
    stop = StopToken()
    events = _stop_after(train_stmgac(x, adj, "legacy_st", stop=stop,
                                      checkpoint_dir=tmp_path, **kw), stop, 3)
    assert [e.epoch for e in events if e.kind == "epoch"] == [1, 2, 3]
    assert [e.step for e in events if e.kind == "step"] == [1, 2, 3]
    assert events[-1].kind == "stopped"
    rest = []
    resumed, _ = run_to_end(train_stmgac(x, adj, "legacy_st", checkpoint_dir=tmp_path,
                                         resume=True, **kw), rest.append)
    assert [e.epoch for e in rest if e.kind == "epoch"] == [4, 5, 6]
    assert rest[-1].kind == "done" and rest[-1].epoch == 6
    a, b = straight.state_dict(), resumed.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_stmgac_resume_refuses_other_settings(stmgac_input, tmp_path):
    from napari_hinge.stmgac.train import train_stmgac

    x, adj = stmgac_input
    kw = {"n_domains": 3, "epochs": 2, "device": "cpu"}
    run_to_end(train_stmgac(x, adj, "legacy_st", seed=1, checkpoint_dir=tmp_path, **kw))
    with pytest.raises(InputError, match=r"other settings \(seed: checkpoint 1, now 2\)"):
        run_to_end(train_stmgac(x, adj, "legacy_st", seed=2, checkpoint_dir=tmp_path,
                                resume=True, **kw))
    with pytest.raises(FileExistsError, match="resume=True"):
        run_to_end(train_stmgac(x, adj, "legacy_st", seed=1, checkpoint_dir=tmp_path, **kw))
    with pytest.raises(FileNotFoundError, match="cannot resume"):
        run_to_end(train_stmgac(x, adj, "legacy_st", seed=1, checkpoint_dir=tmp_path / "none",
                                resume=True, **kw))


@pytest.fixture(scope="module")
def hinge_arrays(c3):
    from napari_hinge.hinge.pipeline import spot_features, transform_values

    sub = c3[:48].copy()
    feats = spot_features(sub, encoder="efficientnet-lite0", cache=False)
    genes = ["ERBB2", "CD74", "B2M", "KRT19", "FN1", "TMSB4X"]
    y, _ = transform_values(sub, genes)
    return feats, y, genes


def _hinge_model(genes, feats):
    from napari_hinge.hinge.pipeline import build_model, feature_stats

    model = build_model(genes, feats.shape[-1], ada_rank=4, seed=0)
    model.set_feature_norm(*feature_stats(feats))
    return model


def test_hinge_resume_refuses_other_settings(hinge_arrays, tmp_path):
    from napari_hinge.hinge.train import train_hinge

    feats, y, genes = hinge_arrays
    kw = {"epochs": 1, "batch_size": 16, "val_samples": 0, "checkpoint_dir": tmp_path,
          "device": "cpu"}
    run_to_end(train_hinge(_hinge_model(genes, feats), feats, y, lr=1e-3, **kw))
    with pytest.raises(InputError, match=r"lr: checkpoint 0.001, now 0.01"):
        run_to_end(train_hinge(_hinge_model(genes, feats), feats, y, lr=1e-2, resume=True,
                               **kw))
    with pytest.raises(InputError, match="data: checkpoint"):  # other data, same shape
        run_to_end(train_hinge(_hinge_model(genes, feats), feats, y + 1, lr=1e-3,
                               resume=True, **kw))


def test_hinge_events_count_from_one(hinge_arrays):
    from napari_hinge.hinge.train import train_hinge

    feats, y, genes = hinge_arrays
    events = []
    run_to_end(train_hinge(_hinge_model(genes, feats), feats, y, epochs=2, batch_size=32,
                           val_samples=0, device="cpu"), events.append)
    steps = [e for e in events if e.kind == "step"]
    assert [e.step for e in steps] == list(range(1, len(steps) + 1))
    assert [e.epoch for e in events if e.kind == "epoch"] == [1, 2]
    assert events[-1].kind == "done" and events[-1].epoch == 2


def test_c2l_resume_rules(c3, tmp_path):
    from napari_hinge.c2l.central import CentralConfig, CentralModel
    from napari_hinge.c2l.data import slide_patches
    from napari_hinge.c2l.train import train_central
    from napari_hinge.c2l.unet import UNetConfig

    patches, _ = slide_patches(c3.uns["napari_hinge"]["slide_path"],
                               mpp=c3.uns["napari_hinge"]["microns_per_pixel"],
                               max_patches=12, seed=0)

    def tiny():
        torch.manual_seed(0)
        return CentralModel(CentralConfig(unet=UNetConfig(stem=4, channels=(8, 16),
                                                          attention_levels=(), time_dim=16,
                                                          groups=8), timesteps=20))

    kw = {"val_count": 2, "eval_every": 2, "seed": 0, "checkpoint_dir": tmp_path,
          "device": "cpu", "batch_size": 4}
    events = []
    run_to_end(train_central(tiny(), patches, steps=4, **kw), events.append)
    assert [e.epoch for e in events if e.kind == "epoch"] == [1, 2]
    assert [e.step for e in events if e.kind == "step"] == [1, 2, 3, 4]
    with pytest.raises(InputError, match=r"batch_size: checkpoint 4, now 2"):
        run_to_end(train_central(tiny(), patches, steps=4, resume=True,
                                 **{**kw, "batch_size": 2}))
    with pytest.raises(FileExistsError):
        run_to_end(train_central(tiny(), patches, steps=4, **kw))
    # a longer run may resume a shorter one: it goes on along the same trajectory
    events = []
    longer, _ = run_to_end(train_central(tiny(), patches, steps=6, resume=True, **kw),
                           events.append)
    assert [e.step for e in events if e.kind == "step"] == [5, 6]
    assert [e.epoch for e in events if e.kind == "epoch"] == [3]
    straight, _ = run_to_end(train_central(tiny(), patches, steps=6,
                                           **{**kw, "checkpoint_dir": None}))
    a, b = straight.state_dict(), longer.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
