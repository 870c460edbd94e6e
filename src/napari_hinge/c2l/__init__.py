"""C2L-ST: gene-conditioned histology synthesis.

A *central* diffusion model learns H&E morphology from unpaired patches
(:mod:`~napari_hinge.c2l.central`, weights shipped in ``napari_hinge/weights/c2l_central``); a
*local* model freezes it and adds zero-initialised gene-conditioned FiLM, trained on a few paired
spots of one slide (:mod:`~napari_hinge.c2l.local`). :mod:`~napari_hinge.c2l.fill` generates tiles
over sparse regions; :mod:`~napari_hinge.c2l.pairs` holds them as training pairs (the
``pairs.npz`` format, their encoding, their rows next to real spots);
:mod:`~napari_hinge.c2l.train` holds the trainers (generators of TrainEvents);
:mod:`~napari_hinge.c2l.schedule` the noise schedule and the DDIM sampler with classifier-free
guidance.
"""

from __future__ import annotations

import importlib

# Public names -> the submodule that defines them, imported on first use (PEP 562) so that
# ``import napari_hinge.c2l.cli`` (the command line's --help) does not import torch.
_EXPORTS = {
    "CentralConfig": "central",
    "CentralModel": "central",
    "FillResult": "fill",
    "as_training_pairs": "fill",
    "fill_region": "fill",
    "fill_region_iter": "fill",
    "SyntheticPairs": "pairs",
    "encode_pairs": "pairs",
    "load_pairs": "pairs",
    "pairs_from_fill": "pairs",
    "save_pairs": "pairs",
    "LocalConfig": "local",
    "LocalModel": "local",
    "build_local": "local",
    "train_autoencoder": "train",
    "train_central": "train",
    "train_local": "train",
}


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)


__all__ = [
    "CentralConfig",
    "CentralModel",
    "FillResult",
    "LocalConfig",
    "LocalModel",
    "SyntheticPairs",
    "as_training_pairs",
    "build_local",
    "encode_pairs",
    "fill_region",
    "fill_region_iter",
    "load_pairs",
    "pairs_from_fill",
    "save_pairs",
    "train_autoencoder",
    "train_central",
    "train_local",
]
