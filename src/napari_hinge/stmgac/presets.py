"""Per-dataset STMGAC presets (methods.md §6.2), kept as data.

``PRESETS`` is plain data (what the authors' ``Config/*.yaml`` hold); ``get_preset``
turns one entry into a :class:`Preset` dataclass, with optional overrides. No code path
depends on a preset's name: a new tissue is a new dict entry (or a JSON file passed to
``load_preset``).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

# Common to every preset (methods.md §6.2 "Common"); entries below override.
COMMON = {
    "n_pcs": 200,
    "dropout": 0.2,
    "replace_rate": 0.1,
    "sce_t": 2.0,
    "margin": 1.0,
    "kmeans_iters": 20,
    "lr": 1e-3,
    "weight_decay": 1e-3,
    "clip": 5.0,
    "min_cells": 50,
    "min_counts": 10,
    "target_sum": 1e6,
    "log1p": False,
    "refine": False,
    "refine_k": 30,
}

PRESETS: dict[str, dict] = {
    "dlpfc": {
        "description": "10x Visium human DLPFC, clustering mode (PCA 200 input)",
        "input": "pca", "n_top_genes": 2000, "k": 12, "mask_rate": 0.7, "momentum": 0.998,
        "topk": 30, "t_step": 50, "epochs": 500,
        "w_recon": 0.5, "w_mean": 0.1, "w_tri": 0.1, "n_domains": 7, "refine": True,
    },
    # Not from the authors: the DLPFC clustering preset adapted to legacy ST sections of a few
    # hundred spots (square 200 um grid). PCA 200 of ~300 spots is mostly noise; with PCA 30 and
    # k = 6 the her2st pathologist-label ARI rose from 0.14 to 0.23 (benchmarks/domains.py).
    "legacy_st": {
        "description": "legacy ST sections of a few hundred spots, clustering mode (PCA 30 input;"
        " derived from the DLPFC preset, not an author preset)",
        "input": "pca", "n_top_genes": 2000, "k": 6, "mask_rate": 0.7, "momentum": 0.998,
        "topk": 30, "t_step": 50, "epochs": 500, "n_pcs": 30,
        "w_recon": 0.5, "w_mean": 0.1, "w_tri": 0.1, "n_domains": 5,
    },
    "brca": {
        "description": "10x Visium human breast cancer, imputation mode (scaled HVG input)",
        "input": "hvg", "n_top_genes": 3000, "k": 8, "mask_rate": 0.5, "momentum": 0.998,
        "topk": 50, "t_step": 50, "epochs": 1000,
        "w_recon": 1.0, "w_mean": 0.1, "w_tri": 1.0, "n_domains": 20,
    },
    "hm": {
        "description": "legacy ST human melanoma, imputation mode (scaled HVG input)",
        "input": "hvg", "n_top_genes": 3000, "k": 6, "mask_rate": 0.2, "momentum": 0.98,
        "topk": 50, "t_step": 50, "epochs": 500,
        "w_recon": 0.6, "w_mean": 0.08, "w_tri": 0.32, "n_domains": 4,
    },
    "mba": {
        "description": "10x Visium mouse brain anterior, clustering mode (PCA 200 input)",
        "input": "pca", "n_top_genes": 3000, "k": 6, "mask_rate": 0.5, "momentum": 0.97,
        "topk": 30, "t_step": 100, "epochs": 500,
        "w_recon": 0.8, "w_mean": 0.9, "w_tri": 0.1, "n_domains": 52, "refine": True,
    },
    "me95": {
        "description": "Stereo-seq mouse embryo E9.5, clustering mode (PCA 200 input)",
        "input": "pca", "n_top_genes": 3000, "k": 6, "mask_rate": 0.5, "momentum": 0.98,
        "topk": 50, "t_step": 50, "epochs": 1000,
        "w_recon": 0.6, "w_mean": 0.7, "w_tri": 0.3, "n_domains": 12,
    },
    "me95_imputation": {
        "description": "Stereo-seq mouse embryo E9.5, imputation mode (scaled HVG input)",
        "input": "hvg", "n_top_genes": 3000, "k": 6, "mask_rate": 0.5, "momentum": 0.98,
        "topk": 50, "t_step": 50, "epochs": 500,
        "w_recon": 0.3, "w_mean": 0.56, "w_tri": 0.14, "n_domains": 12,
    },
}


@dataclass(frozen=True)
class Preset:
    """Everything that varies between datasets: preprocessing, graph, model, training."""

    name: str
    description: str
    input: str  # 'pca' (clustering mode) or 'hvg' (imputation mode)
    n_top_genes: int
    k: int
    mask_rate: float
    momentum: float
    topk: int
    t_step: int
    epochs: int
    w_recon: float
    w_mean: float
    w_tri: float
    n_domains: int
    n_pcs: int
    dropout: float
    replace_rate: float
    sce_t: float
    margin: float
    kmeans_iters: int
    lr: float
    weight_decay: float
    clip: float
    min_cells: int
    min_counts: int
    target_sum: float
    log1p: bool
    refine: bool
    refine_k: int

    def __post_init__(self) -> None:
        if self.input not in ("pca", "hvg"):
            raise ValueError(
                f"preset {self.name!r}: input must be 'pca' or 'hvg', got {self.input!r}"
            )
        if not 0.0 < self.mask_rate < 1.0:
            raise ValueError(f"preset {self.name!r}: mask_rate must be in (0, 1)")
        if not 0.0 <= self.replace_rate < 1.0:
            raise ValueError(f"preset {self.name!r}: replace_rate must be in [0, 1)")
        for key in ("k", "topk", "t_step", "epochs", "n_top_genes", "n_pcs", "n_domains"):
            if int(getattr(self, key)) < 1:
                raise ValueError(f"preset {self.name!r}: {key} must be >= 1")

    def to_dict(self) -> dict:
        return asdict(self)


def _build(name: str, entry: dict, overrides: dict | None = None) -> Preset:
    data = {**COMMON, "description": "", **entry, **(overrides or {}), "name": name}
    known = {f.name for f in fields(Preset)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise KeyError(f"preset {name!r}: unknown field(s) {unknown}")
    missing = sorted(known - set(data))
    if missing:
        raise KeyError(f"preset {name!r}: missing field(s) {missing}")
    return Preset(**data)


# preset="auto" (the default of tl.domains, the CLI and the widget) picks from the data;
# DEFAULT_PRESET when the data say nothing (Visium-like).
AUTO_PRESET = "auto"
DEFAULT_PRESET = "dlpfc"


def available_presets() -> list[str]:
    return sorted(PRESETS)


def preset_for(adata) -> str:
    """The preset that fits the spots of ``adata``: 'legacy_st' for legacy ST (100 µm spots,
    a few hundred per section), 'dlpfc' for Visium and anything else.

    Read from ``uns['napari_hinge']``: the reader's format, else the spot diameter in µm.
    """
    from napari_hinge._convention import LEGACY_ST_SPOT_UM, META_KEY, VISIUM_SPOT_UM

    meta = adata.uns.get(META_KEY, {})
    if meta.get("format") == "legacy_st":
        return "legacy_st"
    mpp, diameter = meta.get("microns_per_pixel"), meta.get("spot_diameter_px")
    if mpp and diameter:
        spot_um = float(mpp) * float(diameter)
        # nearer to the legacy-ST spot than to the Visium one
        if abs(spot_um - LEGACY_ST_SPOT_UM) < abs(spot_um - VISIUM_SPOT_UM):
            return "legacy_st"
    return DEFAULT_PRESET


def resolve_preset(name: str | Preset, adata) -> str | Preset:
    """``name``, or :func:`preset_for` ``adata`` when it is 'auto'."""
    if isinstance(name, str) and name.lower() == AUTO_PRESET:
        return preset_for(adata)
    return name


def get_preset(name: str | Preset, **overrides) -> Preset:
    """The preset called ``name`` (case-insensitive), with ``overrides`` applied."""
    if isinstance(name, Preset):
        return replace(name, **overrides) if overrides else name
    key = str(name).lower()
    if key not in PRESETS:
        raise KeyError(f"unknown STMGAC preset {name!r}; known: {', '.join(available_presets())}")
    return _build(key, PRESETS[key], overrides)


def load_preset(path: str | Path, **overrides) -> Preset:
    """A preset from a JSON file holding one entry (missing fields come from ``COMMON``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"preset file {path} does not exist")
    try:
        entry = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"preset file {path} is not valid JSON: {exc}") from exc
    if not isinstance(entry, dict):
        raise ValueError(f"preset file {path} must hold one JSON object")
    name = str(entry.pop("name", path.stem))
    return _build(name, entry, overrides)
