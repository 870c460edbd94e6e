"""napari_hinge.pp, the one home of library size, log1p CP10k, the panel rule and the HVGs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

from napari_hinge import pp
from napari_hinge.expression import BREAST_MARKERS
from napari_hinge.io.spatial import read_her2st, read_spatial

SHIPPED_CONFIG = (Path(pp.__file__).parent / "weights" / "hinge" / "config.json")


@pytest.fixture(scope="module")
def patient_c(shared_data):
    """her2st C2-C6 counts, spots under 100 UMI dropped (the protocol)."""
    out = {}
    for s in ("C2", "C3", "C4", "C5", "C6"):
        a = read_her2st(shared_data / "her2st_subset", s, images=False)
        out[s] = a[pp.library_size(a) >= 100].copy()
    return out


def test_normalize_total_keeps_sparse_and_matches_the_model_values(patient_c):
    """STMGAC's float64 scaling: sparse in, sparse out, equal to the dense path and, after
    log1p and the float32 cast, to the model values of log1p_cp10k (same library size)."""
    a = patient_c["C3"]
    lib = pp.library_size(a)
    counts = sp.csr_matrix(a.X, dtype=np.float64)
    sparse = pp.normalize_total(counts, lib, log1p=True)
    assert sp.issparse(sparse) and sparse.nnz == counts.nnz
    dense = pp.normalize_total(counts.toarray(), lib, log1p=True)
    np.testing.assert_array_equal(sparse.toarray(), dense)
    np.testing.assert_allclose(dense.astype(np.float32), pp.log1p_cp10k(counts, lib),
                               rtol=1e-6, atol=1e-6)
    scaled = pp.normalize_total(counts.toarray(), target_sum=1e6)
    np.testing.assert_allclose(scaled.sum(1), 1e6)
    empty = pp.normalize_total(np.zeros((2, 3)))
    assert not empty.any()  # a spot with no counts stays 0, no NaN


def test_log1p_cp10k_on_numpy_sparse_and_torch_agree(patient_c):
    import torch

    a = patient_c["C2"]
    counts = a.X.toarray().astype(np.float64)
    expected = np.log1p(counts / counts.sum(1, keepdims=True) * 1e4)
    dense = pp.log1p_cp10k(counts)
    assert dense.dtype == np.float32
    np.testing.assert_allclose(dense, expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(pp.log1p_cp10k(sp.csr_matrix(counts)), dense)
    tensor = pp.log1p_cp10k(torch.from_numpy(counts))
    assert isinstance(tensor, torch.Tensor) and tensor.dtype == torch.float32
    np.testing.assert_allclose(tensor.numpy(), expected, rtol=1e-5, atol=1e-5)
    # a panel subset keeps the library size of all genes; an empty spot stays 0
    np.testing.assert_allclose(pp.log1p_cp10k(counts[:, :10], counts.sum(1)), expected[:, :10],
                               rtol=1e-6, atol=1e-6)
    assert not pp.log1p_cp10k(np.zeros((2, 3))).any()
    with pytest.raises(ValueError, match="unknown value transform"):
        pp.transform_counts(counts, "zscore")


def test_expression_values_use_the_library_size_over_all_genes(sample):
    """The shipped sample holds 1,000 genes of ~15.8k: its obs carries the full library size."""
    genes = list(sample.var_names[:5]) + ["NOT_A_GENE"]
    values, missing = pp.expression_values(sample, genes)
    assert missing == ["NOT_A_GENE"] and not values[:, -1].any()
    lib = pp.library_size(sample)
    row_sums = np.asarray(sample.X.sum(axis=1)).ravel()
    assert (lib >= row_sums).all() and (lib > 2 * row_sums).mean() > 0.5
    x = sample[:, genes[:5]].X.toarray().astype(np.float64)
    np.testing.assert_allclose(values[:, :5], np.log1p(x / lib[:, None] * 1e4), rtol=1e-6)


@pytest.fixture(scope="module")
def sample():
    from napari_hinge.datasets import load_her2st_sample

    return load_her2st_sample()


def test_the_shipped_models_panel_is_the_rule_plus_the_markers(patient_c):
    """The 275 genes the shipped HINGE was trained on (C3 held out) come back exactly from
    pp.gene_panel: the rule's 250 over C2, C4, C5, C6, then the breast markers it left out."""
    shipped = json.loads(SHIPPED_CONFIG.read_text())["config"]["genes"]  # the model folder
    train = [patient_c[s] for s in ("C2", "C4", "C5", "C6")]
    panel = pp.gene_panel(train, 250, include=BREAST_MARKERS)
    assert len(panel) == len(shipped) == 275
    assert panel == shipped
    assert pp.select_gene_panel(train, 250) == shipped[:250]


def test_highly_variable_genes_are_scanpys_seurat_v3(patient_c):
    import anndata as ad
    import scanpy as sc

    a = patient_c["C3"]
    idx = pp.highly_variable_genes(a.X, 500)
    assert idx.size == 500 and (np.diff(idx) > 0).all()
    ref = sc.pp.highly_variable_genes(ad.AnnData(a.X.astype(np.float32)), flavor="seurat_v3",
                                      n_top_genes=500, inplace=False)
    np.testing.assert_array_equal(idx, np.flatnonzero(ref["highly_variable"].to_numpy()))
    # constant genes never come back, even when more are asked for than vary
    x = np.c_[a.X[:, :300].toarray(), np.ones((a.n_obs, 3))]
    varying = int((x.max(0) != x.min(0)).sum())
    got = pp.highly_variable_genes(x, 400)
    assert got.size == varying and (got < 300).all()
    # a table too small for LOESS at span 0.3 still gets its genes (the span is widened)
    assert pp.highly_variable_genes(a.X[:50, :20].toarray(), 5).size == 5


def test_stmgac_preprocessing_takes_its_genes_from_pp(shared_data):
    from napari_hinge.stmgac.preprocess import counts_matrix, preprocess
    from napari_hinge.stmgac.presets import get_preset

    a = read_spatial(shared_data / "her2st_subset", section="C3", images=False)
    p = get_preset("legacy_st")
    pre = preprocess(a, p)
    counts = counts_matrix(a)
    n_cells = np.asarray((counts > 0).sum(axis=0)).ravel()
    total = np.asarray(counts.sum(axis=0)).ravel()
    keep = np.flatnonzero((n_cells >= min(p.min_cells, max(1, a.n_obs // 10)))
                          & (total >= p.min_counts))
    expected = keep[pp.highly_variable_genes(counts[:, keep], p.n_top_genes)]
    np.testing.assert_array_equal(pre.hvg_index, expected)
