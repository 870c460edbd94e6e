"""Expression preprocessing for STMGAC (methods.md §2.2), on raw counts.

filter genes (min_cells, min_counts) → seurat_v3 highly variable genes on the raw counts
→ normalise each spot to ``target_sum`` (optionally log1p; the authors' code does not) →
z-score per gene → PCA (clustering mode) or the scaled HVG matrix itself (imputation mode).

The HVGs are scanpy's own ``seurat_v3`` flavour (:func:`napari_hinge.pp.highly_variable_genes`,
scikit-misc's LOESS, as the authors' code runs it).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
from sklearn.decomposition import PCA

from ..pp import highly_variable_genes, normalize_total


@dataclass
class Preprocessed:
    """The model input and what is needed to map it back to genes."""

    x: np.ndarray  # (n_spots, n_features) float32 model input
    genes: np.ndarray  # names of the HVGs (the columns of the scaled matrix)
    hvg_index: np.ndarray  # their column indices in the AnnData
    input: str  # 'pca' or 'hvg'
    scale_mean: np.ndarray  # per-HVG mean of the normalised expression
    scale_std: np.ndarray  # per-HVG std used for the z-score
    components: np.ndarray | None  # (n_pcs, n_hvg) PCA loadings, None for 'hvg'
    pca_mean: np.ndarray | None
    log1p: bool
    target_sum: float

    def to_expression(self, z: np.ndarray) -> np.ndarray:
        """Map model-space rows back to normalised expression of the HVGs
        (counts per ``target_sum``, log1p'd when the preset does)."""
        scaled = z @ self.components + self.pca_mean if self.input == "pca" else z
        return (scaled * self.scale_std + self.scale_mean).astype(np.float32)


def counts_matrix(adata, layer: str | None = None):
    """Raw counts as float CSR, with clear errors for NaN, negative or non-integer values."""
    x = adata.layers[layer] if layer is not None else adata.X
    where = f"layers['{layer}']" if layer is not None else "X"
    x = sp.csr_matrix(x, dtype=np.float64) if sp.issparse(x) else np.asarray(x, dtype=np.float64)
    data = x.data if sp.issparse(x) else x
    if not np.isfinite(data).all():
        raise ValueError(f"AnnData.{where} holds NaN or infinite values; STMGAC needs raw counts")
    if (data < 0).any():
        raise ValueError(f"AnnData.{where} holds negative values; STMGAC needs raw counts")
    if not np.allclose(data, np.round(data)):
        raise ValueError(
            f"AnnData.{where} holds non-integer values (normalised data?); STMGAC needs raw "
            "counts: pass layer= naming a counts layer"
        )
    return sp.csr_matrix(x)


def preprocess(adata, preset, *, layer: str | None = None, seed: int = 42) -> Preprocessed:
    """Run the preset's preprocessing on ``adata`` (not modified) and return the model input."""
    counts = counts_matrix(adata, layer)
    n_spots, n_genes = counts.shape
    if n_spots < 3 or n_genes < 2:
        raise ValueError(f"too little data for STMGAC: {n_spots} spots x {n_genes} genes")
    binary = counts.copy()
    binary.data = (binary.data > 0).astype(np.float64)
    n_cells = np.asarray(binary.sum(axis=0)).ravel()
    total = np.asarray(counts.sum(axis=0)).ravel()
    # Keep the authors' thresholds, but never let them empty a small data set.
    min_cells = min(preset.min_cells, max(1, n_spots // 10))
    keep = np.flatnonzero((n_cells >= min_cells) & (total >= preset.min_counts))
    if keep.size < 2:
        raise ValueError(
            f"only {keep.size} gene(s) pass min_cells={min_cells}, min_counts={preset.min_counts}"
        )
    sub = counts[:, keep]
    hvg_local = highly_variable_genes(sub, preset.n_top_genes)
    hvg_index = keep[hvg_local]
    # normalize_total on all kept genes (as scanpy does before subsetting), then subset.
    x = normalize_total(sub[:, hvg_local].toarray(), np.asarray(sub.sum(axis=1)).ravel(),
                        target_sum=preset.target_sum, log1p=preset.log1p)
    mu = x.mean(axis=0)
    sd = x.std(axis=0, ddof=1)
    sd[sd == 0] = 1.0
    z = (x - mu) / sd
    components = pca_mean = None
    if preset.input == "pca":
        n_pcs = int(min(preset.n_pcs, n_spots - 1, z.shape[1]))
        # Exact PCA through the (n_hvg x n_hvg) covariance: fast for <= a few thousand HVGs.
        pca = PCA(n_components=n_pcs, svd_solver="covariance_eigh", random_state=seed)
        model_x = pca.fit_transform(z)
        components, pca_mean = pca.components_.astype(np.float64), pca.mean_.astype(np.float64)
    else:
        model_x = z
    return Preprocessed(
        x=np.ascontiguousarray(model_x, dtype=np.float32),
        genes=np.asarray(adata.var_names[hvg_index]),
        hvg_index=hvg_index,
        input=preset.input,
        scale_mean=mu,
        scale_std=sd,
        components=components,
        pca_mean=pca_mean,
        log1p=bool(preset.log1p),
        target_sum=float(preset.target_sum),
    )
