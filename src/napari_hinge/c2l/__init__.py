"""C2L-ST: gene-conditioned histology synthesis.

A *central* diffusion model learns H&E morphology from unpaired patches
(:mod:`~napari_hinge.c2l.central`, weights shipped in ``napari_hinge/weights/c2l_central``); a
*local* model freezes it and adds zero-initialised gene-conditioned FiLM, trained on a few paired
spots of one slide (:mod:`~napari_hinge.c2l.local`). :mod:`~napari_hinge.c2l.fill` generates tiles
over sparse regions and turns them into training pairs; :mod:`~napari_hinge.c2l.train` holds the
trainers (generators of TrainEvents); :mod:`~napari_hinge.c2l.schedule` the noise schedule and
the DDIM sampler with classifier-free guidance.
"""

from __future__ import annotations

from .central import CentralConfig, CentralModel
from .fill import FillResult, as_training_pairs, fill_region, fill_region_iter
from .local import LocalConfig, LocalModel, build_local
from .train import train_autoencoder, train_central, train_local

__all__ = [
    "CentralConfig",
    "CentralModel",
    "FillResult",
    "LocalConfig",
    "LocalModel",
    "as_training_pairs",
    "build_local",
    "fill_region",
    "fill_region_iter",
    "train_autoencoder",
    "train_central",
    "train_local",
]
