"""Expression targets, the gene-panel rule and the her2st leave-one-section-out data.

The protocol (design.md section 6) is fixed here so that every model is scored the same way:

- targets: ``log1p(normalize_total(counts, 1e4))`` computed over **all** genes of a section;
- spots with fewer than 100 UMI are dropped;
- panel: genes expressed (count > 0) in at least 10% of the spots of **every** training
  section, then the top N by variance of the targets over the training spots
  (:data:`HVG_RULE`; report it with every number, it moves scores more than models do);
  the transform and the rule are :func:`napari_hinge.pp.log1p_cp10k` and
  :func:`napari_hinge.pp.select_gene_panel`;
- inputs: spot-centred 160 px crops (about 112 um on these images), encoded once and cached.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ._convention import META_KEY, SPATIAL_KEY
from .geometry import MIN_UMI

# The transform and the panel rule live in napari_hinge.pp; these names stay importable here.
from .pp import (  # noqa: F401
    MIN_FRAC,
    TARGET_RULE,
    TARGET_SUM,
    hvg_rule,
    library_size,
    select_gene_panel,
    with_included,
)
from .pp import log1p_cp10k as expression_targets

HER2ST_PATCH_PX = 160
HER2ST_PATIENT_C = ("C2", "C3", "C4", "C5", "C6")
# Markers a breast pathologist asks for, measured in every her2st patient C table (PGR,
# KRT5 and KRT14 are not: some tables lack them). HER2 pathway, hormone receptors,
# proliferation, luminal/basal epithelium, stroma, vessels, immune cells.
BREAST_MARKERS = (
    "ERBB2", "GRB7", "ESR1", "AR", "GATA3", "FOXA1", "TFF1", "MKI67", "TOP2A", "CEACAM6",
    "KRT8", "KRT17", "KRT18", "KRT19", "EPCAM", "CDH1", "MUC1", "VIM", "ACTA2", "COL1A1",
    "COL3A1", "FN1", "PECAM1", "VWF", "PTPRC", "CD3E", "CD4", "CD8A", "CD68", "CD163",
    "MS4A1", "CD19", "CD74", "HLA-DRA", "FOXP3", "MZB1", "JCHAIN",
)
HVG_RULE = hvg_rule(50)


def panel_targets(adata, genes: Sequence[str], targets: np.ndarray | None = None) -> np.ndarray:
    """Targets ``(n_spots, len(genes))``; a gene absent from the section's table counts 0."""
    if targets is None:
        targets = expression_targets(adata.X)
    idx = adata.var_names.get_indexer(list(genes))
    out = np.zeros((adata.n_obs, len(genes)), dtype=np.float32)
    present = idx >= 0
    out[:, present] = targets[:, idx[present]]
    return out


# --------------------------------------------------------------------------------------------
# her2st sections


def read_her2st_section(folder: str | Path, section: str):
    """One her2st section as AnnData."""
    from .io.legacy_st import read_her2st

    return read_her2st(Path(folder), section)


@dataclass
class Section:
    """One section ready for the protocol: spots kept, targets over all genes, features."""

    name: str
    adata: object
    targets: np.ndarray  # (n_spots, n_genes_all) log1p CP10k
    features: np.ndarray  # (n_spots, dim) or (8, n_spots, dim) with augmentations
    meta: dict = field(default_factory=dict)


def load_her2st_sections(
    folder: str | Path,
    sections: Sequence[str],
    *,
    encoder,
    side_px: int = HER2ST_PATCH_PX,
    augment: bool = False,
    min_umi: int = MIN_UMI,
    batch_size: int = 8,
    cache: bool = True,
    progress: Callable[[str, int, int], None] | None = None,
) -> list[Section]:
    """Read sections, drop spots under ``min_umi``, compute targets and (cached) features.

    Features are computed for all spots of a section (a stable cache key whatever the UMI
    filter) and then subset.
    """
    from .features import encode_spots

    out = []
    for s in sections:
        adata = read_her2st_section(folder, s)
        meta = adata.uns.get(META_KEY, {})
        if "slide_path" not in meta:
            raise FileNotFoundError(f"her2st section {s!r} in {folder} has no H&E image")
        tick = None if progress is None else (lambda d, t, s=s: progress(s, d, t))
        feats = encode_spots(
            meta["slide_path"],
            adata.obsm[SPATIAL_KEY],
            encoder=encoder,
            side_px=side_px,
            augment=augment,
            batch_size=batch_size,
            cache=cache,
            progress=tick,
        )
        umi = np.asarray(adata.X.sum(axis=1)).ravel()
        keep = umi >= min_umi
        adata = adata[keep].copy()
        feats = feats[..., keep, :]
        out.append(
            Section(
                s,
                adata,
                expression_targets(adata.X),
                feats,
                meta={"n_spots": int(keep.sum()), "n_dropped_low_umi": int((~keep).sum())},
            )
        )
    return out


@dataclass
class Fold:
    """Train/test arrays of one split, with the gene panel chosen on the training sections."""

    test: list[str]
    train: list[str]
    genes: list[str]
    X_train: np.ndarray
    Y_train: np.ndarray
    groups_train: np.ndarray  # section name per training spot (for inner LOSO)
    X_test: np.ndarray
    Y_test: np.ndarray
    groups_test: np.ndarray
    hvg_rule: str
    X_train_aug: np.ndarray | None = None  # (8, n_train, dim) when augmented features exist
    coords_train: np.ndarray | None = None  # (n_train, 2) spot centres in µm
    coords_test: np.ndarray | None = None
    library_train: np.ndarray | None = None  # (n_train,) UMIs per training spot (all genes)
    library_test: np.ndarray | None = None  # (n_test,) (scores only: a new slide has none)


def make_fold(
    train: Sequence[Section], test: Sequence[Section], *, n_genes: int = 50,
    min_frac: float = MIN_FRAC, include: Sequence[str] = (),
) -> Fold:
    """Assemble one split; the panel uses the training sections only (the rule, then the
    genes of ``include`` it left out, each measured in every training section)."""
    genes = select_gene_panel(
        [s.adata for s in train], n_genes, min_frac=min_frac, targets=[s.targets for s in train]
    )
    genes = with_included(genes, include, [s.adata for s in train])

    def stack(secs):
        feats = [s.features if s.features.ndim == 2 else s.features[0] for s in secs]
        Y = [panel_targets(s.adata, genes, s.targets) for s in secs]
        groups = np.concatenate([np.full(s.adata.n_obs, s.name) for s in secs])
        return np.concatenate(feats).astype(np.float32), np.concatenate(Y), groups

    def coords(secs):
        return np.concatenate([np.asarray(s.adata.obsm[SPATIAL_KEY], dtype=np.float64)
                               * float(s.adata.uns[META_KEY]["microns_per_pixel"])
                               for s in secs])

    X_tr, Y_tr, g_tr = stack(train)
    X_te, Y_te, g_te = stack(test)
    aug = None
    if all(s.features.ndim == 3 for s in train):
        aug = np.concatenate([s.features for s in train], axis=1)
    return Fold(
        test=[s.name for s in test],
        train=[s.name for s in train],
        genes=genes,
        X_train=X_tr,
        Y_train=Y_tr,
        groups_train=g_tr,
        X_test=X_te,
        Y_test=Y_te,
        groups_test=g_te,
        hvg_rule=hvg_rule(n_genes, min_frac),
        X_train_aug=aug,
        coords_train=coords(train),
        coords_test=coords(test),
        library_train=np.concatenate([library_size(s.adata) for s in train]),
        library_test=np.concatenate([library_size(s.adata) for s in test]),
    )


def her2st_fold_data(
    folder: str | Path,
    sections: Sequence[str] = HER2ST_PATIENT_C,
    *,
    encoder,
    n_genes: int = 50,
    test: Sequence[str] | None = None,
    side_px: int = HER2ST_PATCH_PX,
    augment: bool = False,
    batch_size: int = 8,
    progress: Callable[[str, int, int], None] | None = None,
) -> list[Fold]:
    """Leave-one-section-out folds over ``sections`` of a her2st folder.

    Parameters
    ----------
    folder
        The her2st folder (``counts/``, ``spots/``, ``images/``).
    sections
        Sections taking part (default patient C: C2-C6).
    encoder
        Patch encoder (features cached per section).
    n_genes
        Panel size (50 or 250 in the protocol).
    test
        Held-out sections: one fold per entry (default: every section in turn).

    Returns
    -------
    One :class:`Fold` per held-out section.
    """
    secs = load_her2st_sections(
        folder, sections, encoder=encoder, side_px=side_px, augment=augment,
        batch_size=batch_size, progress=progress,
    )
    by_name = {s.name: s for s in secs}
    folds = []
    for t in test if test is not None else sections:
        if t not in by_name:
            raise KeyError(f"test section {t!r} is not among {list(sections)}")
        train = [s for s in secs if s.name != t]
        folds.append(make_fold(train, [by_name[t]], n_genes=n_genes))
    return folds
