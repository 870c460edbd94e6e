"""The spatial graph STMGAC convolves over: k nearest spatial neighbours, symmetric,
GCN-normalised, sparse.

We use ``torch.sparse`` rather than torch_geometric: the model needs one operation,
``Â @ H`` with a fixed Â, which a CSR matrix product does deterministically on CPU
and CUDA, and it spares the package a heavy dependency with compiled extensions.
"""

from __future__ import annotations

import warnings

import numpy as np
import scipy.sparse as sp
import torch
from sklearn.neighbors import NearestNeighbors


def _check_coords(coords, k: int) -> np.ndarray:
    coords = np.asarray(coords, dtype=np.float64)
    if coords.ndim != 2 or coords.shape[1] < 2:
        raise ValueError(
            f"spot coordinates must be an (n_spots, 2) array, got shape {coords.shape}"
        )
    if not np.isfinite(coords).all():
        bad = int((~np.isfinite(coords).all(axis=1)).sum())
        raise ValueError(f"{bad} spot(s) have missing (NaN/inf) coordinates")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if coords.shape[0] <= k:
        raise ValueError(
            f"a {k}-nearest-neighbour graph needs more than {k} spots, got {coords.shape[0]}"
        )
    return coords


def knn_indices(coords, k: int) -> np.ndarray:
    """Indices (n_spots, k) of each spot's k nearest spatial neighbours, self excluded.

    Spots at identical positions are neighbours of each other, never of themselves.
    """
    coords = _check_coords(coords, k)
    n = coords.shape[0]
    nn = NearestNeighbors(n_neighbors=k + 1).fit(coords)
    _, idx = nn.kneighbors(coords)
    rows = np.arange(n)[:, None]
    is_self = idx == rows
    # Drop self where it was returned, else the farthest of the k + 1 (duplicate positions).
    drop = np.where(is_self.any(axis=1), is_self.argmax(axis=1), k)
    keep = np.ones_like(idx, dtype=bool)
    keep[np.arange(n), drop] = False
    return idx[keep].reshape(n, k)


def knn_adjacency(coords, k: int) -> sp.csr_matrix:
    """Binary symmetric adjacency A ∨ Aᵀ of the k-NN graph, without self loops (float32 CSR)."""
    idx = knn_indices(coords, k)
    n = idx.shape[0]
    rows = np.repeat(np.arange(n), idx.shape[1])
    a = sp.csr_matrix((np.ones(rows.size, np.float32), (rows, idx.ravel())), shape=(n, n))
    a = ((a + a.T) > 0).astype(np.float32)
    a.setdiag(0)
    a.eliminate_zeros()
    a.sort_indices()
    return a.tocsr()


def gcn_normalize(adj: sp.spmatrix) -> sp.csr_matrix:
    """Â = D^{-1/2} (A + I) D^{-1/2}, D the degree of A + I (Kipf & Welling)."""
    a = sp.csr_matrix(adj, dtype=np.float64) + sp.identity(adj.shape[0], format="csr")
    deg = np.asarray(a.sum(axis=1)).ravel()
    d = sp.diags(1.0 / np.sqrt(deg))
    out = (d @ a @ d).astype(np.float32).tocsr()
    out.sort_indices()
    return out


def to_torch(m: sp.spmatrix, device: torch.device | str | None = None) -> torch.Tensor:
    """A scipy sparse matrix as a torch sparse CSR tensor."""
    m = sp.csr_matrix(m)
    with warnings.catch_warnings():
        # "CSR support is in beta": the product we use (CSR @ dense, with autograd) is stable.
        warnings.simplefilter("ignore", UserWarning)
        t = torch.sparse_csr_tensor(
            torch.from_numpy(m.indptr.astype(np.int64)),
            torch.from_numpy(m.indices.astype(np.int64)),
            torch.from_numpy(m.data.astype(np.float32)),
            size=m.shape,
            check_invariants=False,
        )
    return t.to(device) if device is not None else t


def spatial_graph(coords, k: int) -> tuple[sp.csr_matrix, sp.csr_matrix]:
    """The binary adjacency A and its GCN normalisation Â (both scipy CSR)."""
    a = knn_adjacency(coords, k)
    return a, gcn_normalize(a)
