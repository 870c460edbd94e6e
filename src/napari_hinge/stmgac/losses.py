"""STMGAC losses and the triplet anchors (methods.md §2.5-2.6).

- ``sce_loss``: scaled-cosine reconstruction, mean of −log(((1 + cos)/2)^t), t = 2.
- ``latent_mse``: projector output vs momentum-encoder latent at masked nodes.
- ``TripletSampler``: positive pairs are the top-k latent neighbours (cosine between the
  online and the momentum latents) that are also spatial neighbours (local) or that share
  a cluster in any of 5 k-means runs (global); negatives are uniformly random nodes. The
  pairs are refreshed every ``t_step`` epochs and reused in between.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from sklearn.cluster import KMeans

KMEANS_SEEDS = (1234, 1235, 1236, 1237, 1238)


def sce_loss(x_hat: torch.Tensor, x: torch.Tensor, t: float = 2.0) -> torch.Tensor:
    """Scaled-cosine error: mean over rows of −t·log((1 + cos(x̂, x)) / 2).

    Zero for identical directions, grows without bound as they become opposite; the
    clamp only keeps an exactly opposite pair finite.
    """
    cos = (F.normalize(x_hat, p=2, dim=-1) * F.normalize(x, p=2, dim=-1)).sum(-1)
    return (-t * torch.log(((1.0 + cos) / 2.0).clamp_min(1e-12))).mean()


def latent_mse(h_hat: torch.Tensor, h_t: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(h_hat, h_t)


def _latent_knn(hs: np.ndarray, ht: np.ndarray, topk: int, chunk: int = 2048) -> np.ndarray:
    """Top-k columns of norm(hs)·norm(ht)ᵀ + 10·I per row (so self comes first), chunked."""
    n = hs.shape[0]
    k = min(topk, n)
    hs = hs / np.maximum(np.linalg.norm(hs, axis=1, keepdims=True), 1e-12)
    ht = ht / np.maximum(np.linalg.norm(ht, axis=1, keepdims=True), 1e-12)
    out = np.empty((n, k), dtype=np.int64)
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        s = hs[start:stop] @ ht.T
        s[np.arange(stop - start), np.arange(start, stop)] += 10.0
        part = np.argpartition(-s, k - 1, axis=1)[:, :k]
        # Sort each row's k winners by similarity (then index) so results are reproducible.
        vals = np.take_along_axis(s, part, axis=1)
        order = np.lexsort((part, -vals), axis=1)
        out[start:stop] = np.take_along_axis(part, order, axis=1)
    return out


def kmeans_labels(
    h: np.ndarray, n_clusters: int, seeds=KMEANS_SEEDS, n_iter: int = 20
) -> np.ndarray:
    """Labels of ``h`` from one k-means run per seed (scikit-learn, ``n_iter`` iterations)."""
    n_clusters = int(min(n_clusters, h.shape[0]))
    runs = []
    for seed in seeds:
        km = KMeans(n_clusters=n_clusters, n_init=1, max_iter=n_iter, random_state=seed)
        runs.append(km.fit_predict(h.astype(np.float64)))
    return np.stack(runs)


def positive_pairs(
    h_s: np.ndarray,
    h_t: np.ndarray,
    adjacency: sp.spmatrix,
    *,
    topk: int,
    n_clusters: int,
    seeds=KMEANS_SEEDS,
    n_iter: int = 20,
) -> tuple[np.ndarray, np.ndarray, dict]:
    """Anchor and positive indices (both int64, sorted by anchor then positive).

    A latent-kNN pair (i, j) is positive when j is a spatial neighbour of i or i itself
    (local) or when i and j share a k-means cluster in any run (global).
    """
    n = h_s.shape[0]
    nbrs = _latent_knn(h_s, h_t, topk)
    rows = np.repeat(np.arange(n), nbrs.shape[1])
    cols = nbrs.ravel()
    adj = sp.csr_matrix(adjacency) + sp.identity(n, format="csr")
    local = np.asarray(adj[rows, cols]).ravel() > 0
    labels = kmeans_labels(h_t, n_clusters, seeds, n_iter)
    glob = (labels[:, rows] == labels[:, cols]).any(axis=0)
    keep = local | glob
    info = {"n_local": int(local.sum()), "n_global": int(glob.sum()), "n_pairs": int(keep.sum())}
    return rows[keep], cols[keep], info


class TripletSampler:
    """Holds the current (anchor, positive, negative) triplets; refreshed on schedule."""

    def __init__(
        self,
        adjacency: sp.spmatrix,
        *,
        topk: int,
        n_clusters: int,
        t_step: int,
        margin: float = 1.0,
        n_iter: int = 20,
    ) -> None:
        self.adjacency = sp.csr_matrix(adjacency)
        self.topk, self.n_clusters, self.t_step, self.n_iter = topk, n_clusters, t_step, n_iter
        self.loss_fn = torch.nn.TripletMarginLoss(margin=margin, p=2, reduction="mean")
        self.anchor = self.positive = self.negative = None
        self.info: dict = {}

    def due(self, epoch: int) -> bool:
        return self.anchor is None or epoch % self.t_step == 0

    def refresh(self, h_s: torch.Tensor, h_t: torch.Tensor, generator: torch.Generator) -> dict:
        a, p, info = positive_pairs(
            h_s.detach().float().cpu().numpy(),
            h_t.detach().float().cpu().numpy(),
            self.adjacency,
            topk=self.topk,
            n_clusters=self.n_clusters,
            n_iter=self.n_iter,
        )
        dev = h_s.device
        n = h_s.shape[0]
        self.anchor = torch.from_numpy(a).to(dev)
        self.positive = torch.from_numpy(p).to(dev)
        self.negative = torch.randint(0, n, (a.size,), generator=generator).to(dev)
        self.info = info
        return info

    def loss(self, h_s: torch.Tensor) -> torch.Tensor:
        return self.loss_fn(h_s[self.anchor], h_s[self.positive], h_s[self.negative])
