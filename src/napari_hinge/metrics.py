"""Evaluation metrics as pure numpy functions.

Expression (spots x genes, predicted vs measured, same transform on both):
gene-wise Pearson r (a constant gene scores 0), its mean and top-k means, MSE, MAE, and
co-expression consistency (agreement of the gene-gene correlation structure).
Clustering scores (ARI/NMI) belong here too, as thin wrappers.
"""

from __future__ import annotations

import numpy as np

_EPS = 1e-12


def _check_pair(pred, true) -> tuple[np.ndarray, np.ndarray]:
    pred = np.asarray(pred, dtype=np.float64)
    true = np.asarray(true, dtype=np.float64)
    if pred.shape != true.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from measurement {true.shape}")
    if pred.ndim != 2:
        raise ValueError(f"expected (spots, genes) arrays, got shape {pred.shape}")
    if len(pred) < 2:
        raise ValueError("need at least 2 spots to compute correlations")
    return pred, true


def _column_pearson(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson r of matching columns; 0 where either column is constant."""
    a = a - a.mean(axis=0)
    b = b - b.mean(axis=0)
    na = np.sqrt((a * a).sum(axis=0))
    nb = np.sqrt((b * b).sum(axis=0))
    num = (a * b).sum(axis=0)
    ok = (na > _EPS * np.sqrt(len(a))) & (nb > _EPS * np.sqrt(len(b)))
    r = np.zeros(a.shape[1])
    r[ok] = num[ok] / (na[ok] * nb[ok])
    return np.clip(r, -1.0, 1.0)


def gene_pearson(pred, true) -> np.ndarray:
    """Pearson r per gene over spots, ``(n_genes,)``; a constant gene (either side) is 0."""
    pred, true = _check_pair(pred, true)
    return _column_pearson(pred, true)


def top_k_mean(values, k: int) -> float:
    """Mean of the ``k`` largest values (all of them when fewer)."""
    v = np.sort(np.asarray(values, dtype=np.float64))[::-1]
    return float(v[: max(1, min(k, len(v)))].mean())


def mse(pred, true) -> float:
    pred, true = _check_pair(pred, true)
    return float(np.mean((pred - true) ** 2))


def mae(pred, true) -> float:
    pred, true = _check_pair(pred, true)
    return float(np.mean(np.abs(pred - true)))


def _corr_matrix(x: np.ndarray) -> np.ndarray:
    x = x - x.mean(axis=0)
    n = np.sqrt((x * x).sum(axis=0))
    ok = n > _EPS * np.sqrt(len(x))
    x = np.where(ok, x / np.where(ok, n, 1.0), 0.0)
    return x.T @ x


def coexpression_consistency(pred, true) -> float:
    """Pearson r between the upper triangles (i < j) of the gene-gene correlation matrices
    of the prediction and of the measurement. Constant genes have zero correlations."""
    pred, true = _check_pair(pred, true)
    if pred.shape[1] < 3:
        raise ValueError("co-expression consistency needs at least 3 genes")
    iu = np.triu_indices(pred.shape[1], k=1)
    a = _corr_matrix(pred)[iu][:, None]
    b = _corr_matrix(true)[iu][:, None]
    return float(_column_pearson(a, b)[0])


def interval_coverage(lower, upper, true) -> float:
    """Fraction of measured values inside their predicted interval ``[lower, upper]``."""
    lower, true = _check_pair(lower, true)
    upper, _ = _check_pair(upper, true)
    return float(((true >= lower) & (true <= upper)).mean())


def spread_error_spearman(spread, pred, true) -> dict:
    """How well a predicted spread ranks the absolute error: Spearman rho between ``spread``
    and ``|pred - true|``, ``pooled`` over every spot and gene and ``per_gene`` (mean over
    genes of the rho over spots; the stricter figure: a gene's typical error size does not
    help it)."""
    from scipy.stats import rankdata

    spread, true = _check_pair(spread, true)
    pred, _ = _check_pair(pred, true)
    err = np.abs(pred - true)

    def rho(a, b):
        return _column_pearson(rankdata(a, axis=0), rankdata(b, axis=0))

    pooled = float(rho(spread.reshape(-1, 1), err.reshape(-1, 1))[0])
    return {"pooled": pooled, "per_gene": float(np.mean(rho(spread, err)))}


def expression_scores(pred, true, *, genes=None, top=(10, 50)) -> dict:
    """All expression metrics in one dict (JSON-ready).

    Keys: ``pcc_mean``, ``pcc_top10``, ``pcc_top50`` (for each k in ``top``), ``mse``,
    ``mae``, ``coexpression``, ``pcc_per_gene`` (dict gene -> r when ``genes`` is given,
    else a list).
    """
    r = gene_pearson(pred, true)
    out = {"pcc_mean": float(r.mean())}
    for k in top:
        out[f"pcc_top{k}"] = top_k_mean(r, k)
    out["mse"] = mse(pred, true)
    out["mae"] = mae(pred, true)
    out["coexpression"] = coexpression_consistency(pred, true) if r.size >= 3 else float("nan")
    if genes is not None:
        out["pcc_per_gene"] = {str(g): float(v) for g, v in zip(genes, r, strict=True)}
    else:
        out["pcc_per_gene"] = [float(v) for v in r]
    return out


def ari(truth, pred) -> float:
    """Adjusted Rand index of two labelings (scikit-learn)."""
    from sklearn.metrics import adjusted_rand_score

    return float(adjusted_rand_score(np.asarray(truth), np.asarray(pred)))


def nmi(truth, pred) -> float:
    """Normalised mutual information of two labelings (scikit-learn, arithmetic mean)."""
    from sklearn.metrics import normalized_mutual_info_score

    return float(normalized_mutual_info_score(np.asarray(truth), np.asarray(pred)))
