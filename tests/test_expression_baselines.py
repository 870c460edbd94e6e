"""The her2st protocol pieces (targets, gene-panel rule, folds) and the baselines."""

from __future__ import annotations

import numpy as np
import pytest

from napari_hinge.baselines import (
    HestRidge,
    KNNRegressor,
    MLPRegressor,
    ShuffledControl,
    TunedRidge,
)
from napari_hinge.expression import (
    Section,
    expression_targets,
    make_fold,
    panel_targets,
    select_gene_panel,
)
from napari_hinge.io.legacy_st import read_her2st
from napari_hinge.metrics import gene_pearson

SECTIONS = ("C2", "C3", "C4", "C5", "C6")


@pytest.fixture(scope="module")
def adatas(shared_data):
    out = {}
    for s in SECTIONS:
        ad = read_her2st(shared_data / "her2st_subset", s, images=False)
        umi = np.asarray(ad.X.sum(axis=1)).ravel()
        out[s] = ad[umi >= 100].copy()
    return out


def _planted_sections(adatas, dim=48, noise=1.0, seed=0):
    """Sections whose 'features' are a fixed random linear image of real expression + noise:
    a learnable, realistic signal (real gene-gene structure, real section shifts)."""
    rng = np.random.default_rng(seed)
    ref = select_gene_panel(list(adatas.values()), 100)
    R = rng.normal(size=(100, dim)) / 10
    secs = []
    for s, ad in adatas.items():
        t = expression_targets(ad.X)
        Y = panel_targets(ad, ref, t)
        feats = (Y - 2.0) @ R + rng.normal(0, noise, (ad.n_obs, dim))
        secs.append(Section(s, ad, t, feats.astype(np.float32)))
    return secs


def test_targets_are_log1p_cp10k(adatas):
    ad = adatas["C2"]
    t = expression_targets(ad.X)
    counts = ad.X.toarray().astype(np.float64)
    back = np.expm1(t.astype(np.float64))
    np.testing.assert_allclose(back.sum(axis=1), 1e4, rtol=1e-4)  # every spot sums to 1e4
    # proportional to the raw counts of the spot, over all genes
    np.testing.assert_allclose(back * counts.sum(1, keepdims=True) / 1e4, counts, atol=1e-2)


def test_gene_panel_rule(adatas):
    train = [adatas[s] for s in ("C3", "C4", "C5", "C6")]
    genes = select_gene_panel(train, 50)
    assert len(genes) == 50 == len(set(genes))
    for ad in train:
        frac = (ad[:, genes].X.toarray() > 0).mean(axis=0)
        assert (frac >= 0.10).all()
    stacked = np.concatenate(
        [expression_targets(ad.X)[:, ad.var_names.get_indexer(genes)] for ad in train]
    )
    var = stacked.var(axis=0)
    assert (np.diff(var) <= 1e-6).all()  # highest variance first
    # the filter is per section: silence the top gene in 95% of one section's spots
    top = genes[0]
    edited = train[0].copy()
    X = edited.X.toarray()
    j = edited.var_names.get_loc(top)
    X[: int(0.95 * len(X)), j] = 0
    edited.X = X
    assert top not in select_gene_panel([edited, *train[1:]], 50)
    with pytest.raises(ValueError, match="only .* genes pass"):
        select_gene_panel(train, 10**6)


def test_panel_targets_absent_gene_is_zero(adatas):
    ad = adatas["C2"]
    Y = panel_targets(ad, [ad.var_names[0], "NOT_A_GENE"])
    assert Y.shape == (ad.n_obs, 2) and (Y[:, 1] == 0).all()


def test_make_fold_uses_training_sections_only(adatas):
    secs = _planted_sections(adatas)
    fold = make_fold(secs[1:], secs[:1], n_genes=50)
    assert fold.test == ["C2"] and fold.train == ["C3", "C4", "C5", "C6"]
    assert fold.genes == select_gene_panel([s.adata for s in secs[1:]], 50)
    assert fold.X_train.shape == (sum(s.adata.n_obs for s in secs[1:]), 48)
    assert fold.Y_test.shape == (secs[0].adata.n_obs, 50)
    assert set(fold.groups_train) == {"C3", "C4", "C5", "C6"}
    assert "10%" in fold.hvg_rule and "top 50" in fold.hvg_rule
    assert fold.X_train_aug is None
    # augmented features: (8, n, d); the plain arrays use view 0
    aug = [Section(s.name, s.adata, s.targets, np.stack([s.features] * 8)) for s in secs]
    fold8 = make_fold(aug[1:], aug[:1], n_genes=50)
    assert fold8.X_train_aug.shape == (8, *fold.X_train.shape)
    np.testing.assert_array_equal(fold8.X_train, fold.X_train)


@pytest.fixture(scope="module")
def fold(adatas):
    secs = _planted_sections(adatas)
    return make_fold(secs[1:], secs[:1], n_genes=50)


def _pcc(model, fold):
    model.fit(fold.X_train, fold.Y_train, fold.groups_train)
    return float(gene_pearson(model.predict(fold.X_test), fold.Y_test).mean())


def test_tuned_ridge_learns_and_matches_sklearn(fold):
    from sklearn.linear_model import Ridge
    from sklearn.preprocessing import StandardScaler

    m = TunedRidge()
    pcc = _pcc(m, fold)
    assert pcc > 0.5
    assert m.alpha_ in m.alphas and len(m.cv_scores_) == len(m.alphas)
    sc = StandardScaler().fit(fold.X_train)
    ref = Ridge(alpha=m.alpha_).fit(sc.transform(fold.X_train), fold.Y_train)
    np.testing.assert_allclose(
        m.predict(fold.X_test), ref.predict(sc.transform(fold.X_test)), rtol=1e-3, atol=1e-3
    )


def test_tuned_ridge_prefers_strong_penalty_on_noise(fold):
    rng = np.random.default_rng(0)
    m = TunedRidge().fit(rng.normal(size=fold.X_train.shape), fold.Y_train, fold.groups_train)
    assert m.alpha_ >= 1e5


def test_hest_ridge(fold):
    m = HestRidge()
    pcc = _pcc(m, fold)
    n_pcs = min(256, *fold.X_train.shape)
    assert m.pca_.n_components_ == n_pcs
    assert m.alpha_ == pytest.approx(100 / (n_pcs * 50))
    assert pcc > 0.4


def test_knn_and_shuffled_control(fold):
    assert _pcc(KNNRegressor(k=10), fold) > 0.3
    one = KNNRegressor(k=1).fit(fold.X_train, fold.Y_train)
    np.testing.assert_allclose(one.predict(fold.X_train[:20]), fold.Y_train[:20], atol=1e-6)
    assert abs(_pcc(ShuffledControl(TunedRidge(), seed=0), fold)) < 0.1


def test_mlp_is_deterministic_and_learns(fold):
    a = MLPRegressor(seed=3, max_epochs=60, patience=10)
    pcc = _pcc(a, fold)
    b = MLPRegressor(seed=3, max_epochs=60, patience=10).fit(
        fold.X_train, fold.Y_train, fold.groups_train
    )
    np.testing.assert_array_equal(a.predict(fold.X_test), b.predict(fold.X_test))
    assert pcc > 0.4
    assert a.epochs_ <= 60 and a.best_val_ == min(a.history_)
