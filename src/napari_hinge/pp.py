"""Preprocessing in scanpy's shape: library size, log1p CP10k, the gene-panel rule, HVGs.

The one home of these transforms: HINGE's targets, the evaluation protocol
(:mod:`napari_hinge.expression`), the backbones' value transform (:mod:`napari_hinge.scfm`),
C2L-ST's conditioning expression and STMGAC's gene selection all call the functions here.

- :func:`library_size`: each spot's UMI total over *all* measured genes;
- :func:`log1p_cp10k` / :func:`transform_counts`: counts -> model values, on numpy, scipy
  sparse or torch input; :func:`normalize_total`: the float64 scaling (sparse kept sparse),
  log1p optional, for STMGAC's presets;
- :func:`expression_values`: an AnnData's values over a gene list (the genes it lacks reported);
- :func:`gene_panel`: the panel rule (:func:`hvg_rule`) plus requested genes;
- :func:`highly_variable_genes`: scanpy's ``seurat_v3`` flavour (scikit-misc's LOESS) on raw
  counts.

Importing this module is light (numpy only); scanpy and torch are imported when used.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# The AnnData convention owns what the library size is (obs key or row sums); re-exported.
from ._convention import library_size

TARGET_SUM = 1e4
#: A gene enters a panel when it has count > 0 in at least this fraction of the spots of
#: every training section.
MIN_FRAC = 0.10
VALUE_TRANSFORMS = ("log1p_cp10k", "log2p1")
TARGET_RULE = "log1p(normalize_total(counts, target_sum=1e4)) over all genes"


def _dense(x) -> np.ndarray:
    return np.asarray(x.toarray() if hasattr(x, "toarray") else x, dtype=np.float64)


def _is_tensor(x) -> bool:
    return type(x).__module__.partition(".")[0] == "torch"


def log1p_cp10k(counts, library_size=None, *, target_sum: float = TARGET_SUM):
    """``log1p(counts / library_size * target_sum)``; a spot with library size 0 stays 0.

    ``library_size`` defaults to the row sums of ``counts``: pass the totals over *all* genes
    when ``counts`` is a panel subset. numpy / scipy sparse input is computed in float64 and
    returned as a float32 array; a torch tensor stays a float32 tensor on its device (the
    backbones' training path).
    """
    if _is_tensor(counts):
        import torch

        counts = torch.as_tensor(counts, dtype=torch.float32)
        lib = (counts.sum(-1, keepdim=True) if library_size is None else
               torch.as_tensor(library_size, dtype=torch.float32, device=counts.device)
               .reshape(*counts.shape[:-1], 1))
        return torch.log1p(counts / lib.clamp_min(1.0) * target_sum)
    x = _dense(counts)
    lib = (x.sum(axis=1) if library_size is None
           else np.asarray(library_size, dtype=np.float64).reshape(-1))[:, None]
    return np.log1p(np.divide(x * target_sum, lib, out=np.zeros_like(x), where=lib > 0)
                    ).astype(np.float32)


def normalize_total(counts, library_size=None, *, target_sum: float = TARGET_SUM,
                    log1p: bool = False):
    """scanpy's ``normalize_total`` (then ``log1p`` when asked) in float64: each row scaled
    to ``target_sum`` over ``library_size`` (default its own row sums; a spot with library
    size 0 stays 0). Sparse input stays sparse (CSR; log1p on the stored values), dense
    input is returned dense. :func:`log1p_cp10k` is the float32 model-value form; this one
    serves STMGAC's presets (their own target sum, log1p on or off) and marker tables."""
    import scipy.sparse as sp

    sparse = sp.issparse(counts)
    x = sp.csr_matrix(counts, dtype=np.float64) if sparse else _dense(counts)
    lib = np.asarray(x.sum(axis=1)).ravel() if library_size is None else \
        np.asarray(library_size, dtype=np.float64).reshape(-1)
    scale = np.divide(target_sum, lib, out=np.zeros_like(lib), where=lib > 0)
    if not sparse:
        out = x * scale[:, None]
        return np.log1p(out) if log1p else out
    out = (sp.diags(scale) @ x).tocsr()
    if log1p:
        out.data = np.log1p(out.data)
    return out


def transform_counts(counts, transform: str = "log1p_cp10k", *, library_size=None):
    """Raw counts -> the values a model works in: ``'log1p_cp10k'`` (:func:`log1p_cp10k`) or
    ``'log2p1'`` (``log2(count + 1)``, HINGE's released code). Same input types as
    :func:`log1p_cp10k`."""
    if transform == "log1p_cp10k":
        return log1p_cp10k(counts, library_size)
    if transform == "log2p1":
        if _is_tensor(counts):
            import torch

            return torch.log2(torch.as_tensor(counts, dtype=torch.float32) + 1.0)
        return np.log2(_dense(counts) + 1.0).astype(np.float32)
    raise ValueError(f"unknown value transform {transform!r}; use one of {VALUE_TRANSFORMS}")


def expression_values(adata, genes: Sequence[str] | None = None, *,
                      value_transform: str = "log1p_cp10k") -> tuple[np.ndarray, list[str]]:
    """Values ``(n_spots, n_genes)`` float32 of ``adata`` over ``genes`` (default all), the
    library size over all measured genes (:func:`library_size`), and the genes of the list
    that the data lacks (their column is 0: report them, never score them)."""
    if value_transform not in VALUE_TRANSFORMS:
        raise ValueError(f"unknown value transform {value_transform!r}; use one of "
                         f"{VALUE_TRANSFORMS}")
    genes = list(adata.var_names) if genes is None else list(genes)
    idx = adata.var_names.get_indexer(genes)
    missing = [g for g, i in zip(genes, idx, strict=True) if i < 0]
    present = idx >= 0
    lib = library_size(adata) if value_transform == "log1p_cp10k" else None
    out = np.zeros((adata.n_obs, len(genes)), dtype=np.float32)
    out[:, present] = transform_counts(adata.X[:, idx[present]], value_transform,
                                       library_size=lib)
    return out, missing


# ---------------------------------------------------------------------------------------------
# The gene-panel rule


def hvg_rule(n_genes: int, min_frac: float = MIN_FRAC) -> str:
    """The gene-panel rule in words (echoed into every result)."""
    return (
        f"genes with count>0 in >={min_frac:.0%} of spots of every training section, then "
        f"top {n_genes} by variance of {TARGET_RULE} over training spots"
    )


def select_gene_panel(train_adatas: Sequence, n: int, *, min_frac: float = MIN_FRAC,
                      targets: Sequence[np.ndarray] | None = None) -> list[str]:
    """The panel rule: expressed in >= ``min_frac`` of the spots of every training section,
    then the top ``n`` by variance of the targets over all training spots.

    Parameters
    ----------
    train_adatas
        Training sections (AnnData, ``X`` = raw counts, ``var_names`` = gene symbols).
    n
        Panel size.
    min_frac
        Minimum fraction of spots with count > 0, required in each section.
    targets
        Per-section targets over all genes (default: :func:`log1p_cp10k` of ``X``).

    Returns
    -------
    Gene names, highest variance first.
    """
    if not train_adatas:
        raise ValueError("select_gene_panel needs at least one training section")
    common = None
    for ad in train_adatas:
        names = list(ad.var_names)
        common = set(names) if common is None else common & set(names)
    keep = None
    for ad in train_adatas:
        frac = (_dense(ad.X) > 0).mean(axis=0)
        ok = {g for g, f in zip(ad.var_names, frac, strict=True) if f >= min_frac}
        keep = ok if keep is None else keep & ok
    genes = sorted(common & keep)
    if len(genes) < n:
        raise ValueError(
            f"only {len(genes)} genes pass the expression filter (>= {min_frac:.0%} of spots in "
            f"every training section); asked for {n}"
        )
    if targets is None:
        targets = [log1p_cp10k(ad.X) for ad in train_adatas]
    stacked = np.concatenate(
        [t[:, ad.var_names.get_indexer(genes)] for ad, t in zip(train_adatas, targets, strict=True)]
    )
    var = stacked.var(axis=0)
    order = np.argsort(-var, kind="stable")[:n]
    return [genes[i] for i in order]


def with_included(panel: Sequence[str], include: Sequence[str], train_adatas: Sequence
                  ) -> list[str]:
    """``panel`` followed by the genes of ``include`` it lacks (e.g. markers a pathologist asks
    for); each must be measured in every training section (KeyError naming those that are
    not)."""
    lacking = sorted({g for g in include for a in train_adatas if g not in a.var_names})
    if lacking:
        raise KeyError(f"{len(lacking)} requested genes are not measured in every training "
                       f"section: {', '.join(lacking[:20])}")
    return list(panel) + [g for g in dict.fromkeys(include) if g not in panel]


def gene_panel(train_adatas: Sequence, n_genes: int, *, include: Sequence[str] = (),
               min_frac: float = MIN_FRAC, value_transform: str = "log1p_cp10k") -> list[str]:
    """The panel rule (:func:`hvg_rule`) over the training sections and all their genes, the
    variance taken in ``value_transform`` (:func:`expression_values`, library size over all
    genes), then the genes of ``include`` (e.g. :data:`napari_hinge.expression.BREAST_MARKERS`)
    the rule left out and every section measures (:func:`with_included`)."""
    adatas = list(train_adatas)
    targets = [expression_values(a, value_transform=value_transform)[0] for a in adatas]
    panel = select_gene_panel(adatas, n_genes, min_frac=min_frac, targets=targets)
    return with_included(panel, include, adatas)


# ---------------------------------------------------------------------------------------------
# Highly variable genes


def highly_variable_genes(counts, n_top_genes: int, *, span: float = 0.3) -> np.ndarray:
    """Column indices (ascending) of the ``n_top_genes`` most variable genes of a raw-count
    matrix ``(spots, genes)``, by scanpy's ``seurat_v3`` flavour (variance-stabilised rank, the
    LOESS of log-variance on log-mean fitted by scikit-misc, ``span`` as in Seurat).

    Constant genes are never selected, so fewer than ``n_top_genes`` come back when fewer vary.
    On tables too small for LOESS at ``span`` the span is widened (0.5, then 1).
    """
    import anndata as ad
    import scanpy as sc
    import scipy.sparse as sp

    x = sp.csr_matrix(counts, dtype=np.float32) if sp.issparse(counts) else \
        np.asarray(counts, dtype=np.float32)
    varying = int((_dense(x.max(axis=0)) != _dense(x.min(axis=0))).sum())
    n = min(int(n_top_genes), varying)
    if n < 1:
        return np.zeros(0, dtype=np.int64)
    adata = ad.AnnData(x)
    # scikit-misc's LOESS is near-singular when a span holds too few genes (small tables):
    # widen the span until it fits, as Seurat users do by hand.
    for attempt in dict.fromkeys((span, 0.5, 1.0)):
        try:
            table = sc.pp.highly_variable_genes(adata, flavor="seurat_v3", n_top_genes=n,
                                                span=attempt, inplace=False)
        except ValueError as exc:
            if "singular" not in str(exc) or attempt == 1.0:
                raise
            continue
        return np.flatnonzero(table["highly_variable"].to_numpy())
    raise AssertionError("unreachable")
