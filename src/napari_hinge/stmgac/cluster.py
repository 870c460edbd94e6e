"""Domains from a latent: Gaussian mixture or Leiden, then optional spatial smoothing.

The authors cluster with R's mclust model "EEE" (ellipsoidal, equal volume, shape and
orientation: one covariance matrix shared by all components). scikit-learn's
``GaussianMixture(covariance_type='tied')`` is the same model family, so it is the
default here; initialisation differs (mclust starts from model-based hierarchical
clustering, scikit-learn from k-means), so labels can differ slightly.
"""

from __future__ import annotations

import warnings

import numpy as np
from sklearn.mixture import GaussianMixture

from .graph import knn_indices


def _check_k(x: np.ndarray, n_clusters: int) -> None:
    if n_clusters < 1:
        raise ValueError(f"the number of domains must be >= 1, got {n_clusters}")
    if n_clusters > x.shape[0]:
        raise ValueError(
            f"cannot find {n_clusters} domains among {x.shape[0]} spots: K is larger than the "
            "number of spots"
        )


def gmm_labels(
    x: np.ndarray,
    n_clusters: int,
    *,
    covariance_type: str = "tied",
    seed: int = 666,
    n_init: int = 1,
) -> np.ndarray:
    """Labels 0..K-1 of a Gaussian mixture with K components (tied covariance ≈ mclust EEE)."""
    x = np.asarray(x, dtype=np.float64)
    _check_k(x, n_clusters)
    gmm = GaussianMixture(
        n_components=n_clusters,
        covariance_type=covariance_type,
        random_state=seed,
        n_init=n_init,
        reg_covar=1e-6,
    )
    return gmm.fit_predict(x).astype(np.int64)


def leiden_labels(
    x: np.ndarray,
    n_clusters: int,
    *,
    n_neighbors: int = 15,
    seed: int = 0,
    max_iter: int = 40,
) -> tuple[np.ndarray, float]:
    """Leiden (modularity, leidenalg) on the symmetric kNN graph of ``x``, bisecting the
    resolution until K clusters appear.

    The graph is the plain symmetrised kNN graph (Euclidean, ``n_neighbors``), not scanpy's
    UMAP connectivities: it needs no numba compilation, which costs ~20 s on first use.
    Returns (labels, resolution); when no resolution gives exactly K, the closest count.
    """
    import igraph as ig
    import leidenalg

    x = np.asarray(x, dtype=np.float64)
    _check_k(x, n_clusters)
    k = min(n_neighbors, x.shape[0] - 1)
    idx = knn_indices(x, k)
    rows = np.repeat(np.arange(x.shape[0]), k)
    edges = {(int(min(a, b)), int(max(a, b))) for a, b in zip(rows, idx.ravel(), strict=True)}
    graph = ig.Graph(n=x.shape[0], edges=sorted(edges))

    def run(res: float) -> np.ndarray:
        part = leidenalg.find_partition(
            graph, leidenalg.RBConfigurationVertexPartition, resolution_parameter=res,
            seed=int(seed), n_iterations=-1,
        )
        return np.asarray(part.membership, dtype=np.int64)

    lo, hi = 0.0, 4.0
    best = None
    for _ in range(max_iter):
        mid = (lo + hi) / 2
        labels = run(mid)
        found = int(labels.max() + 1)
        if best is None or abs(found - n_clusters) < abs(best[0] - n_clusters):
            best = (found, labels, mid)
        if found == n_clusters:
            break
        if found < n_clusters:
            lo = mid
        else:
            hi = mid
    return best[1], float(best[2])


def refine_labels(coords: np.ndarray, labels, n_neighbors: int = 30) -> np.ndarray:
    """Spatial majority vote: each spot takes the most common label of its ``n_neighbors``
    nearest spots (self excluded); ties go to the label seen first among the nearest."""
    labels = np.asarray(labels)
    uniq, codes = np.unique(labels, return_inverse=True)
    n = codes.size
    k = min(n_neighbors, n - 1)
    if k < 1:
        return labels.copy()
    idx = knn_indices(coords, k)
    nb = codes[idx]
    # Integer votes plus a tie-break weight < 1 in total that favours nearer neighbours.
    weights = 1.0 + (k - np.arange(k)) / (2.0 * k * k)
    score = np.zeros((n, uniq.size))
    np.add.at(score, (np.repeat(np.arange(n), k), nb.ravel()), np.tile(weights, n))
    return uniq[score.argmax(axis=1)]



def cluster_latent(
    latent: np.ndarray,
    n_clusters: int,
    *,
    method: str = "gmm",
    coords: np.ndarray | None = None,
    refine: bool = False,
    refine_k: int = 30,
    seed: int = 666,
    covariance_type: str = "tied",
) -> tuple[np.ndarray, dict]:
    """Cluster ``latent`` into ``n_clusters`` domains, optionally refined spatially.

    Returns (labels 0..K-1, info dict with what was done).
    """
    info: dict = {"method": method, "refine": bool(refine), "seed": int(seed)}
    if method == "gmm":
        labels = gmm_labels(latent, n_clusters, covariance_type=covariance_type, seed=seed)
        info["covariance_type"] = covariance_type
    elif method == "leiden":
        labels, res = leiden_labels(latent, n_clusters, seed=seed)
        info["resolution"] = res
        info["n_found"] = int(labels.max() + 1)
    else:
        raise ValueError(f"unknown clustering method {method!r}; use 'gmm' or 'leiden'")
    if refine:
        if coords is None:
            raise ValueError("spatial refinement needs spot coordinates")
        labels = refine_labels(coords, labels, refine_k)
        info["refine_k"] = int(refine_k)
    found = int(np.unique(labels).size)
    info["n_found"] = found
    if found < n_clusters:
        # a mixture component (or a refined-away domain) can end up with no spot: say so
        # instead of handing back fewer domains than asked as if all were there
        warnings.warn(f"{n_clusters} domains asked, {found} found on {len(labels)} spots "
                      f"({n_clusters - found} came out empty); try a smaller K", stacklevel=2)
    return labels, info
