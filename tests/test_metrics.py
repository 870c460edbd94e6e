"""Expression metrics against scipy, on real her2st expression."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import pearsonr

from napari_hinge.expression import expression_targets, select_gene_panel
from napari_hinge.io.legacy_st import read_her2st
from napari_hinge.metrics import (
    coexpression_consistency,
    expression_scores,
    gene_pearson,
    mae,
    mse,
    top_k_mean,
)


@pytest.fixture(scope="module")
def Y(shared_data):
    """C2 targets (log1p CP10k) of its 30 most variable well-expressed genes."""
    ad = read_her2st(shared_data / "her2st_subset", "C2", images=False)
    genes = select_gene_panel([ad], 30)
    return expression_targets(ad.X)[:, ad.var_names.get_indexer(genes)].astype(np.float64)


def test_gene_pearson_matches_scipy(Y):
    rng = np.random.default_rng(0)
    pred = Y + rng.normal(0, 1.0, Y.shape)
    r = gene_pearson(pred, Y)
    ref = [pearsonr(pred[:, g], Y[:, g])[0] for g in range(Y.shape[1])]
    np.testing.assert_allclose(r, ref, atol=1e-10)
    assert 0 < r.mean() < 1


def test_constant_gene_scores_zero(Y):
    pred = Y.copy()
    pred[:, 0] = 3.0
    r = gene_pearson(pred, Y)
    assert r[0] == 0.0 and np.allclose(r[1:], 1.0)
    assert gene_pearson(Y, np.zeros_like(Y)).sum() == 0.0


def test_top_k_mse_mae(Y):
    assert top_k_mean([0.1, 0.5, 0.3], 2) == pytest.approx(0.4)
    assert top_k_mean([0.1, 0.5], 10) == pytest.approx(0.3)
    pred = Y + 0.5
    assert mse(pred, Y) == pytest.approx(0.25) and mae(pred, Y) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="shape"):
        mse(Y[:, :3], Y)


def test_coexpression_consistency(Y):
    rng = np.random.default_rng(1)
    assert coexpression_consistency(Y, Y) == pytest.approx(1.0)
    # per-gene affine changes keep the correlation structure
    assert coexpression_consistency(Y * rng.uniform(0.5, 2, Y.shape[1]) + 1, Y) == pytest.approx(1)
    # independent noise destroys it
    noise = rng.normal(size=Y.shape)
    assert abs(coexpression_consistency(noise, Y)) < 0.3
    # shuffling genes' spots independently keeps marginals, breaks co-expression
    shuffled = np.stack([rng.permutation(c) for c in Y.T], axis=1)
    assert coexpression_consistency(shuffled, Y) < 0.5 * coexpression_consistency(Y + noise, Y)


def test_expression_scores_dict(Y):
    s = expression_scores(Y + 0.1, Y, genes=[f"g{i}" for i in range(Y.shape[1])])
    assert s["pcc_mean"] == pytest.approx(1.0) and s["pcc_top10"] == pytest.approx(1.0)
    assert set(s) >= {"pcc_mean", "pcc_top10", "pcc_top50", "mse", "mae", "coexpression"}
    assert len(s["pcc_per_gene"]) == Y.shape[1]
