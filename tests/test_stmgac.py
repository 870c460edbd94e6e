"""STMGAC: graph, losses, training, clustering, rasterisation and the tl/CLI entry points,
on the real DLPFC and her2st data."""

from __future__ import annotations

import argparse
import json
import warnings

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from napari_hinge import tl
from napari_hinge.metrics import ari
from napari_hinge.stmgac.cluster import gmm_labels, leiden_labels, refine_labels
from napari_hinge.stmgac.graph import gcn_normalize, knn_adjacency, spatial_graph, to_torch
from napari_hinge.stmgac.labels import domain_table, domains_to_labels
from napari_hinge.stmgac.losses import latent_mse, positive_pairs, sce_loss
from napari_hinge.stmgac.model import STMGAC, STMGACConfig
from napari_hinge.stmgac.preprocess import preprocess
from napari_hinge.stmgac.presets import PRESETS, Preset, get_preset, load_preset
from napari_hinge.stmgac.train import train_stmgac
from napari_hinge.training import StopToken, run_to_end

torch.set_num_threads(1)


def _read_dlpfc(folder):
    from napari_hinge.io.spatial import read_spaceranger

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adata = read_spaceranger(folder)
    lab = pd.read_csv(folder / "layer_labels.tsv", sep="\t", index_col=0)["layer"]
    adata.obs["layer"] = lab.reindex(adata.obs_names).to_numpy()
    return adata[adata.obs["layer"].notna().to_numpy()].copy()


@pytest.fixture(scope="module")
def dlpfc(shared_data):
    return _read_dlpfc(shared_data / "dlpfc_visium_lowres" / "151673")


@pytest.fixture(scope="module")
def dlpfc_crop(dlpfc):
    """A contiguous quarter of the section (about 900 spots, several layers) for fast runs."""
    xy = dlpfc.obsm["spatial"]
    sel = (xy[:, 0] < np.quantile(xy[:, 0], 0.5)) & (xy[:, 1] < np.quantile(xy[:, 1], 0.5))
    return dlpfc[sel].copy()


@pytest.fixture(scope="module")
def fast_preset():
    # Real preprocessing, smaller PCA so that training is quick.
    return get_preset("dlpfc", n_pcs=30, n_top_genes=1000, t_step=5)


@pytest.fixture(scope="module")
def crop_input(dlpfc_crop, fast_preset):
    pre = preprocess(dlpfc_crop, fast_preset)
    adj = knn_adjacency(dlpfc_crop.obsm["spatial"], fast_preset.k)
    return pre, adj


# -- graph -------------------------------------------------------------------------------


def test_graph_on_real_coordinates(dlpfc):
    k = 12
    a, a_norm = spatial_graph(dlpfc.obsm["spatial"], k)
    n = dlpfc.n_obs
    assert a.shape == (n, n)
    assert (a != a.T).nnz == 0, "adjacency must be symmetric"
    assert a.diagonal().sum() == 0, "no self loops"
    assert set(np.unique(a.data)) == {1.0}
    deg = np.asarray(a.sum(axis=1)).ravel()
    assert deg.min() >= k
    # Visium is a hexagonal grid: the 12 nearest are 6 at one pitch and 6 at sqrt(3) pitches,
    # so most spots have exactly 12 mutual neighbours.
    assert np.median(deg) == k
    # Each spot's own k nearest are among its neighbours.
    xy = dlpfc.obsm["spatial"]
    d = np.linalg.norm(xy[:50, None] - xy[None], axis=-1)
    d[np.arange(50), np.arange(50)] = np.inf
    for i in range(50):
        assert set(np.argsort(d[i])[:k]) <= set(a[i].indices)
    # GCN normalisation against a dense computation.
    dense = a.toarray().astype(np.float64) + np.eye(n)
    dinv = 1.0 / np.sqrt(dense.sum(1))
    expect = dinv[:, None] * dense * dinv[None, :]
    np.testing.assert_allclose(a_norm.toarray(), expect, rtol=1e-6, atol=1e-7)
    # The torch sparse operator applies the same matrix.
    h = torch.randn(n, 3, generator=torch.Generator().manual_seed(0))
    np.testing.assert_allclose((to_torch(a_norm) @ h).numpy(), expect @ h.double().numpy(),
                               rtol=1e-4, atol=1e-5)


def test_graph_bad_input(dlpfc):
    xy = dlpfc.obsm["spatial"]
    with pytest.raises(ValueError, match="needs more than 12 spots"):
        knn_adjacency(xy[:12], 12)
    bad = xy.copy()
    bad[3, 0] = np.nan
    with pytest.raises(ValueError, match="missing"):
        knn_adjacency(bad, 6)
    with pytest.raises(ValueError, match=r"\(n_spots, 2\)"):
        knn_adjacency(xy[:, 0], 6)


def test_duplicate_positions_never_self_neighbours():
    xy = np.array([[0, 0], [0, 0], [1, 0], [0, 1], [5, 5]], float)
    a = knn_adjacency(xy, 2)
    assert a.diagonal().sum() == 0
    assert a[0, 1] == 1 and a[1, 0] == 1


# -- preprocessing -----------------------------------------------------------------------


def test_preprocess_real_counts(dlpfc, fast_preset):
    pre = preprocess(dlpfc, fast_preset)
    assert pre.x.shape == (dlpfc.n_obs, 30)
    assert pre.x.dtype == np.float32 and np.isfinite(pre.x).all()
    assert pre.genes.size == 1000
    # Layer markers of the cortex are highly variable here.
    assert {"MBP", "PCP4"} <= set(pre.genes)
    # PCA space maps back to normalised expression of the HVGs (rank-30 approximation).
    back = pre.to_expression(pre.x)
    assert back.shape == (dlpfc.n_obs, 1000)
    x = np.asarray(dlpfc.X[:, pre.hvg_index].todense())
    assert np.corrcoef(back[:, list(pre.genes).index("MBP")],
                       x[:, list(pre.genes).index("MBP")])[0, 1] > 0.8


def test_preprocess_rejects_nan_and_normalised(dlpfc_crop, fast_preset):
    bad = dlpfc_crop.copy()
    bad.X = bad.X.toarray()
    bad.X[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        preprocess(bad, fast_preset)
    bad.X = np.log1p(np.nan_to_num(bad.X) + 0.5)
    with pytest.raises(ValueError, match="non-integer"):
        preprocess(bad, fast_preset)


# -- model, losses, training -------------------------------------------------------------


def test_losses_finite_and_total_falls(crop_input, fast_preset):
    pre, adj = crop_input
    events = list(train_stmgac(pre.x, adj, fast_preset, n_domains=5, epochs=60, seed=1))
    epochs = [e for e in events if e.kind == "epoch"]
    assert len(epochs) == 60 and events[-1].kind == "done"
    for e in epochs:
        assert np.isfinite(e.loss)
        for term in ("recon", "latent", "triplet"):
            assert np.isfinite(e.metrics[term]) and e.metrics[term] >= 0
        assert e.metrics["n_pairs"] >= e.metrics["n_local"] > 0
    losses = np.array([e.loss for e in epochs])
    assert losses[-10:].mean() < 0.8 * losses[:5].mean()
    recon = np.array([e.metrics["recon"] for e in epochs])
    assert recon[-10:].mean() < recon[:5].mean()


def test_loss_terms_direct():
    x = torch.randn(20, 7, generator=torch.Generator().manual_seed(0))
    assert sce_loss(x, x).item() == pytest.approx(0.0, abs=1e-6)
    assert sce_loss(-x, x).item() > 20  # opposite directions: large but finite
    assert np.isfinite(sce_loss(-x, x).item())
    assert latent_mse(x, x).item() == 0.0


def test_positive_pairs_local_and_global(crop_input):
    pre, adj = crop_input
    rng = np.random.default_rng(0)
    h = rng.normal(size=(pre.x.shape[0], 16))
    a, p, info = positive_pairs(h, h, adj, topk=30, n_clusters=5)
    n = pre.x.shape[0]
    # Self is always the top latent neighbour and always a local positive.
    assert np.all(np.isin(np.arange(n), a[a == p]))
    assert info["n_pairs"] == a.size <= n * 30
    assert info["n_local"] >= n


def test_determinism_with_seed(crop_input, fast_preset):
    pre, adj = crop_input

    def latent(seed):
        model, _ = run_to_end(train_stmgac(pre.x, adj, fast_preset, n_domains=5, epochs=12,
                                        seed=seed))
        return model.embed(torch.from_numpy(pre.x), to_torch(gcn_normalize(adj)))

    z1, z2, z3 = latent(7), latent(7), latent(8)
    assert torch.equal(z1, z2)
    assert not torch.equal(z1, z3)


def test_mask_views_rates(crop_input):
    pre, _ = crop_input
    cfg = STMGACConfig(in_dim=pre.x.shape[1])
    model = STMGAC(cfg)
    with torch.no_grad():
        model.enc_mask_token.fill_(0.5)
    x = torch.from_numpy(pre.x)
    x_m, x_v, mask, keep = model.mask_views(x, torch.Generator().manual_seed(0))
    n = x.shape[0]
    assert mask.numel() == int(0.7 * n) and mask.numel() + keep.numel() == n
    token = (x_m[mask] == 0.5).all(dim=1)
    assert token.sum().item() == mask.numel() - int(0.1 * mask.numel())
    assert torch.equal(x_m[keep], x[keep]) and torch.equal(x_v[mask], x[mask])
    assert (x_v[keep] == 0.5).all()


def test_save_load_roundtrip(tmp_path, crop_input, fast_preset):
    pre, adj = crop_input
    model, _ = run_to_end(train_stmgac(pre.x, adj, fast_preset, n_domains=5, epochs=3, seed=0))
    model.save(tmp_path / "m")
    again = STMGAC.load(tmp_path / "m")
    for (k1, v1), (k2, v2) in zip(model.state_dict().items(), again.state_dict().items(),
                                  strict=True):
        assert k1 == k2 and torch.equal(v1, v2)
    with pytest.raises(FileNotFoundError, match="config.json"):
        STMGAC.load(tmp_path)


def test_stop_request_honoured(crop_input, fast_preset, tmp_path):
    pre, adj = crop_input
    stop = StopToken()
    seen = []
    gen = train_stmgac(pre.x, adj, fast_preset, n_domains=5, epochs=5, seed=0, stop=stop,
                       checkpoint_dir=tmp_path)
    for ev in gen:
        seen.append(ev.kind)
        if ev.kind == "epoch" and ev.epoch == 3:  # epochs count from 1
            stop.request()
    assert seen[-1] == "stopped" and seen.count("epoch") == 3
    assert (tmp_path / "last.pt").is_file()
    # Resuming from the checkpoint continues to the end.
    rest = list(train_stmgac(pre.x, adj, fast_preset, n_domains=5, epochs=5, seed=0,
                             checkpoint_dir=tmp_path, resume=True))
    assert [e.epoch for e in rest if e.kind == "epoch"] == [4, 5]


def test_domains_stop_writes_nothing(dlpfc_crop, fast_preset):
    ad = dlpfc_crop.copy()
    stop = StopToken()
    kinds = []
    for ev in tl.domains_iter(ad, n_domains=5, preset=fast_preset, epochs=30, stop=stop):
        kinds.append(ev.kind)
        if ev.kind == "epoch":
            stop.request()
    assert kinds[-1] == "stopped" and "done" not in kinds
    assert "domain" not in ad.obs and "X_stmgac" not in ad.obsm


# -- presets -------------------------------------------------------------------------------


def test_presets_are_data(tmp_path):
    p = get_preset("DLPFC")
    assert isinstance(p, Preset)
    assert (p.n_top_genes, p.k, p.mask_rate, p.momentum, p.topk, p.t_step, p.epochs) == (
        2000, 12, 0.7, 0.998, 30, 50, 500)
    assert (p.w_recon, p.w_mean, p.w_tri, p.n_pcs, p.input) == (0.5, 0.1, 0.1, 200, "pca")
    assert get_preset("mba").momentum == 0.97 and get_preset("brca").input == "hvg"
    for name in PRESETS:
        assert get_preset(name).name == name
    assert get_preset("dlpfc", epochs=10).epochs == 10
    path = tmp_path / "tissue.json"
    path.write_text(json.dumps({**PRESETS["hm"], "name": "tissue", "k": 9}))
    q = load_preset(path)
    assert q.name == "tissue" and q.k == 9 and q.lr == 1e-3
    with pytest.raises(KeyError, match="unknown STMGAC preset"):
        get_preset("nope")
    with pytest.raises(KeyError, match="unknown field"):
        get_preset("dlpfc", bogus=1)
    path.write_text("{not json")
    with pytest.raises(ValueError, match="tissue.json"):
        load_preset(path)


# -- clustering ----------------------------------------------------------------------------


def test_clustering_and_refinement_on_real_layers(dlpfc):
    pre = preprocess(dlpfc, get_preset("dlpfc", n_pcs=30))
    truth = dlpfc.obs["layer"].to_numpy()
    lab = gmm_labels(pre.x, 7, seed=0)
    assert set(np.unique(lab)) == set(range(7))
    refined = refine_labels(dlpfc.obsm["spatial"], lab, 30)
    # Spatial smoothing of expression clusters helps on cortical layers (design.md §6).
    assert ari(truth, refined) > ari(truth, lab)
    # Refining the truth itself keeps most spots (layers are spatially contiguous).
    assert (refine_labels(dlpfc.obsm["spatial"], truth, 30) == truth).mean() > 0.9


def test_leiden_resolution_search_reaches_k(crop_input):
    pre, _ = crop_input
    lab, res = leiden_labels(pre.x, 5, seed=0)
    assert lab.max() + 1 == 5 and res > 0
    with pytest.raises(ValueError, match="larger than the number of spots"):
        gmm_labels(pre.x[:5], 7)


# -- rasterisation -------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["disc", "voronoi"])
def test_spot_label_lands_under_spot(dlpfc, mode):
    ad = dlpfc.copy()
    ad.obs["domain"] = pd.Categorical(ad.obs["layer"])
    cats = list(ad.obs["domain"].cat.categories)
    scale = 4.0  # a raster 4x finer than the lowres frame, so discs are ~17 px wide
    xy = ad.obsm["spatial"] * scale
    shape = (int(xy[:, 1].max()) + 20, int(xy[:, 0].max()) + 20)
    lab = domains_to_labels(ad, shape, scale=scale, mode=mode)
    assert lab.dtype == np.uint8 and lab.shape == shape
    r, c = np.floor(xy[:, 1] + 0.5).astype(int), np.floor(xy[:, 0] + 0.5).astype(int)
    expect = np.array([cats.index(v) + 1 for v in ad.obs["domain"]])
    np.testing.assert_array_equal(lab[r, c], expect)
    if mode == "disc":
        # Discs have the spot's true diameter: area ~ pi (d/2)^2 per spot.
        d = ad.uns["napari_hinge"]["spot_diameter_px"] * scale
        area = (lab > 0).sum() / ad.n_obs
        assert 0.8 * np.pi * d**2 / 4 < area < 1.2 * np.pi * d**2 / 4
        assert lab[0, 0] == 0
    else:
        mask = np.zeros(shape, bool)
        mask[:, : shape[1] // 2] = True
        clipped = domains_to_labels(ad, shape, scale=scale, mode=mode, tissue_mask=mask)
        assert (clipped[:, shape[1] // 2 :] == 0).all()
        np.testing.assert_array_equal(clipped[mask], lab[mask])


def test_labels_bad_input_and_table(dlpfc):
    ad = dlpfc.copy()
    with pytest.raises(KeyError, match="obs\\['domain'\\]"):
        domains_to_labels(ad, (100, 100))
    ad.obs["domain"] = pd.Categorical(ad.obs["layer"])
    with pytest.raises(ValueError, match="tissue_mask"):
        domains_to_labels(ad, (100, 100), tissue_mask=np.ones((5, 5), bool))
    with pytest.raises(ValueError, match="unknown mode"):
        domains_to_labels(ad, (100, 100), mode="square")
    table = domain_table(ad, "domain", n_markers=5)
    assert list(table.index) == list(ad.obs["domain"].cat.categories)
    assert table["n_spots"].sum() == ad.n_obs
    # White matter is marked by myelin genes.
    assert "MBP" in table.loc["WM", "top_markers"] or "PLP1" in table.loc["WM", "top_markers"]


# -- tl.domains and the CLI ----------------------------------------------------------------


def test_tl_domains_end_to_end(dlpfc_crop, fast_preset):
    ad = dlpfc_crop.copy()
    events = []
    out = tl.domains(ad, n_domains=4, preset=fast_preset, epochs=15, seed=3, refine=True,
                     copy=True, progress=events.append)
    assert "domain" not in ad.obs  # copy=True leaves the input alone
    assert list(out.obs["domain"].cat.categories) == ["0", "1", "2", "3"]
    assert out.obsm["X_stmgac"].shape == (ad.n_obs, 16)
    # denoised expression only for the model's genes, named by gene (no NaN spots x all genes)
    assert "stmgac_denoised" not in out.layers
    den = out.obsm["stmgac_denoised"]
    hv = out.var["stmgac_denoised_gene"].to_numpy()
    assert den.shape == (ad.n_obs, 1000) and hv.sum() == 1000
    assert set(den.columns) == set(out.var_names[hv]) and (den.index == out.obs_names).all()
    assert np.isfinite(den.to_numpy()).all() and den.to_numpy().dtype == np.float32
    params = out.uns["domain"]["params"]
    assert params["seed"] == 3 and params["epochs"] == 15 and params["refine"] is True
    assert events[-1].kind == "done" and events[-1].metrics["result"] is out
    assert sum(e.kind == "epoch" for e in events) == 15


def test_tl_domains_progress_bar(dlpfc_crop, fast_preset, capsys):
    ad = dlpfc_crop[:200].copy()
    tl.domains(ad, n_domains=3, preset=fast_preset, epochs=4, seed=0)
    err = capsys.readouterr().err
    assert "STMGAC" in err and "4/4" in err and "loss=" in err
    tl.domains(ad, n_domains=3, preset=fast_preset, epochs=4, seed=0, progress=False)
    assert capsys.readouterr().err == ""


def test_preset_follows_the_data(dlpfc, shared_data):
    from napari_hinge.io.spatial import read_her2st
    from napari_hinge.stmgac.presets import preset_for, resolve_preset

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        her2st = read_her2st(shared_data / "her2st_subset", "A1", images=False)
    assert preset_for(dlpfc) == "dlpfc" and preset_for(her2st) == "legacy_st"
    # an h5ad without the reader's format: the spot diameter in µm decides
    moved = her2st.copy()
    moved.uns["napari_hinge"] = {**moved.uns["napari_hinge"], "format": "h5ad",
                                 "microns_per_pixel": 0.5, "spot_diameter_px": 200.0}
    assert preset_for(moved) == "legacy_st"
    assert resolve_preset("auto", dlpfc) == "dlpfc" and resolve_preset("hm", dlpfc) == "hm"


def test_ground_truth_found_and_scored(dlpfc, shared_data):
    from napari_hinge.stmgac.labels import domain_scores, ground_truth

    folder = shared_data / "dlpfc_visium_lowres" / "151673"
    bare = dlpfc.copy()
    del bare.obs["layer"]
    truth, source = ground_truth(bare, folder)
    assert source.endswith("layer_labels.tsv") and truth.notna().all()
    assert (truth == dlpfc.obs["layer"].astype(str)).all()
    assert ground_truth(bare) == (None, "")
    with pytest.raises(KeyError, match="neither an obs column"):
        ground_truth(bare, folder, "nope")
    ad = bare.copy()
    ad.obs["domain"] = pd.Categorical(dlpfc.obs["layer"].astype(str))
    perfect = domain_scores(ad, truth)
    assert perfect["ari"] == pytest.approx(1.0) and perfect["n_truth_classes"] == 7
    ad.obs["domain"] = pd.Categorical(np.random.default_rng(0).integers(0, 7, ad.n_obs))
    assert abs(domain_scores(ad, truth)["ari"]) < 0.02


def test_tl_domains_bad_input(dlpfc_crop, fast_preset):
    ad = dlpfc_crop.copy()
    with pytest.raises(ValueError, match="larger than the number of spots"):
        tl.domains(ad, n_domains=ad.n_obs + 1, preset=fast_preset, epochs=1)
    small = ad[:10].copy()
    with pytest.raises(ValueError, match="needs more than 12 spots"):
        tl.domains(small, n_domains=2, preset=fast_preset, epochs=1)
    nocoord = ad.copy()
    del nocoord.obsm["spatial"]
    with pytest.raises(KeyError, match="spatial"):
        tl.domains(nocoord, n_domains=3, preset=fast_preset, epochs=1)
    nan = ad.copy()
    nan.obsm["spatial"] = nan.obsm["spatial"].copy()
    nan.obsm["spatial"][5] = np.nan
    with pytest.raises(ValueError, match="missing"):
        tl.domains(nan, n_domains=3, preset=fast_preset, epochs=1)
    nanx = ad.copy()
    nanx.X = sp.csr_matrix(nanx.X)
    nanx.X.data[0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        tl.domains(nanx, n_domains=3, preset=fast_preset, epochs=1)


def test_cli_domains(shared_data, tmp_path, capsys, monkeypatch):
    import anndata as ad_mod
    import tifffile

    from napari_hinge.stmgac import cli

    parser = argparse.ArgumentParser(prog="napari-hinge")
    cli.register(parser.add_subparsers(dest="command"))
    counts = shared_data / "her2st_subset" / "counts" / "A1.tsv.gz"
    out, tif = tmp_path / "a1.h5ad", tmp_path / "a1.tif"
    # the default preset is 'auto': legacy_st on this legacy-ST section
    args = parser.parse_args(["domains", str(counts), "--k", "4", "--out", str(out),
                              "--epochs", "5", "--labels-tif", str(tif), "--scale", "0.05"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert args.func(args) == 0
    printed = capsys.readouterr().out
    res = ad_mod.read_h5ad(out)
    assert res.obs["domain"].nunique() <= 4 and "X_stmgac" in res.obsm
    assert res.uns["domain"]["params"]["preset"] == "legacy_st" and "preset legacy_st" in printed
    # A1 carries pathologist labels: the CLI scores against them and records the scores
    scores = res.uns["domain"]["scores"]
    assert scores["truth"] == "obs['pathology_label']" and -1 <= scores["ari"] <= 1
    assert f"ARI {scores['ari']:.3f}  NMI {scores['nmi']:.3f}" in printed
    assert not res.layers and res.obsm["stmgac_denoised"].shape[1] < res.n_vars
    labels = tifffile.imread(tif)
    assert labels.dtype == np.uint8 and labels.max() <= 4 and labels.max() > 0
    assert "0 = background" in printed
    bad = parser.parse_args(["domains", str(tmp_path / "none"), "--k", "4", "--out", str(out)])
    with pytest.raises(FileNotFoundError):
        bad.func(bad)
    # without --out: a named results folder, not the working folder
    monkeypatch.chdir(tmp_path)
    args = parser.parse_args(["domains", str(counts), "--k", "3", "--epochs", "2"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert args.func(args) == 0
    assert ad_mod.read_h5ad(tmp_path / "domains_out" / "A1.h5ad").n_obs == res.n_obs
    assert "wrote domains_out/A1.h5ad" in capsys.readouterr().out


def test_an_empty_domain_is_reported_not_silent():
    """Two tight groups of spots, three domains asked: the answer says one came out empty."""
    from napari_hinge.stmgac.cluster import cluster_latent

    rng = np.random.default_rng(0)
    latent = np.r_[rng.normal(0, 0.01, (10, 4)), rng.normal(5, 0.01, (10, 4))]
    with pytest.warns(UserWarning, match="3 domains asked, 2 found"):
        labels, info = cluster_latent(latent, 3, coords=rng.random((20, 2)), refine=True,
                                      refine_k=10)
    assert info["n_found"] == len(np.unique(labels)) == 2
