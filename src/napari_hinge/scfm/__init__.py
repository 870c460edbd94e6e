"""Single-cell foundation-model backbones and checkpoint loaders.

:func:`load_backbone` takes a name or a path and returns a
:class:`~napari_hinge.scfm.base.GeneTokenBackbone` in eval mode:

- ``'builtin'``: the small backbone shipped in ``napari_hinge/weights/backbone``;
- a folder with ``args.json``, ``best_model.pt`` and ``vocab.json``: an scGPT checkpoint;
- a converted CellFM file (``.pt``/``.pth``/``.safetensors`` with MindSpore key names) with its
  gene table csv beside it, or a folder holding both: CellFM;
- a folder with ``config.json``, ``vocab.json`` and ``model.safetensors`` (written by
  :func:`save_backbone` / ``BuiltinBackbone.save``): whatever ``config.kind`` says.

:func:`random_backbone` gives the same architecture, vocabulary and config with fresh random
weights (the "randomly initialised backbone" ablation).
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from napari_hinge.errors import InputError

from .base import (
    WEIGHTS_FILE,
    BackboneConfig,
    GeneTokenBackbone,
    MHABlock,
    PostNormBlock,
    load_saved_weights,
    map_panel,
    read_config,
    save_backbone,
    transform_counts,
)
from .builtin import BuiltinBackbone
from .cellfm import CellFMBackbone, find_gene_table, load_cellfm
from .scgpt import ScGPTBackbone, bin_values, is_scgpt_folder, load_scgpt

__all__ = [
    "BUILTIN_DIR",
    "BackboneConfig",
    "BuiltinBackbone",
    "CellFMBackbone",
    "GeneTokenBackbone",
    "MHABlock",
    "PostNormBlock",
    "ScGPTBackbone",
    "backbone_kind",
    "bin_values",
    "load_backbone",
    "load_cellfm",
    "load_saved",
    "load_scgpt",
    "map_panel",
    "random_backbone",
    "save_backbone",
    "transform_counts",
]

BUILTIN_DIR = Path(__file__).resolve().parents[1] / "weights" / "backbone"
CLASSES: dict[str, type[GeneTokenBackbone]] = {
    "builtin": BuiltinBackbone,
    "scgpt": ScGPTBackbone,
    "cellfm": CellFMBackbone,
}
CELLFM_SUFFIXES = (".pt", ".pth", ".safetensors")


def backbone_kind(path: str | Path) -> str:
    """What :func:`load_backbone` would load from ``path``: 'saved', 'scgpt' or 'cellfm'."""
    path = Path(path)
    if path.is_dir():
        if all((path / f).is_file() for f in ("config.json", "vocab.json", WEIGHTS_FILE)):
            return "saved"
        if is_scgpt_folder(path):
            return "scgpt"
        if _cellfm_file_in(path) is not None:
            return "cellfm"
        raise ValueError(
            f"{path} is not a backbone folder: expected config.json + vocab.json + "
            f"{WEIGHTS_FILE} (saved backbone), args.json + best_model.pt + vocab.json (scGPT), "
            "or a converted CellFM .pt/.safetensors with expand_gene_info.csv/gene_info.csv")
    if path.is_file():
        if path.suffix in CELLFM_SUFFIXES:
            return "cellfm"
        raise ValueError(f"{path}: a backbone file must be a converted CellFM "
                         f"{'/'.join(CELLFM_SUFFIXES)}; MindSpore .ckpt files need converting")
    raise FileNotFoundError(f"backbone {path} does not exist (and is not the name 'builtin')")


def _cellfm_file_in(folder: Path) -> Path | None:
    files = sorted(p for p in folder.iterdir() if p.suffix in CELLFM_SUFFIXES)
    for p in files:
        if find_gene_table(p) is not None:
            return p
    return None


def load_saved(directory: str | Path) -> GeneTokenBackbone:
    """Read a folder written by :func:`save_backbone` (any kind), bit-identically."""
    directory = Path(directory)
    config, vocab = read_config(directory)
    if config.kind not in CLASSES:
        raise InputError(f"{directory / 'config.json'}: unknown backbone kind {config.kind!r} "
                         f"(known: {sorted(CLASSES)})", path=directory, field="kind")
    return load_saved_weights(CLASSES[config.kind](config, vocab), directory)


def load_backbone(path_or_name: str | Path, **kwargs) -> GeneTokenBackbone:
    """Load a backbone by name (``'builtin'``) or from a path (kind detected from its files).

    ``kwargs`` go to the kind's loader (e.g. ``gene_table=``/``n_heads=`` for CellFM).
    """
    if str(path_or_name) == "builtin":
        if not (BUILTIN_DIR / WEIGHTS_FILE).is_file():
            raise FileNotFoundError(f"the shipped backbone weights are missing from {BUILTIN_DIR}"
                                    "; run scripts/pretrain_backbone.py (see TRAINING.md)")
        return load_saved(BUILTIN_DIR)
    path = Path(path_or_name).expanduser()
    kind = backbone_kind(path)
    if kind == "saved":
        return load_saved(path)
    if kind == "scgpt":
        return load_scgpt(path, **kwargs)
    return load_cellfm(path if path.is_file() else _cellfm_file_in(path), **kwargs)


def random_backbone(like: GeneTokenBackbone, seed: int = 0) -> GeneTokenBackbone:
    """Same class, config and vocabulary as ``like``, freshly initialised (seeded)."""
    devices = {p.device for p in like.parameters()}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = type(like)(copy.deepcopy(like.config), dict(like.vocab))
    model.config.extra = dict(model.config.extra, random_init_seed=seed)
    if devices:
        model = model.to(next(iter(devices)))
    return model.train(like.training)
