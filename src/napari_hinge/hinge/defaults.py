"""HINGE's defaults: the HINGE part of the one table, :mod:`napari_hinge.defaults`.

Kept as an import path (``RECIPE``, ``SAMPLER``, ``SLIDE``, ``TRAIN``); torch-free, so
``napari-hinge ... --help`` stays instant.
"""

from napari_hinge.defaults import HINGE_RECIPE as RECIPE
from napari_hinge.defaults import HINGE_TRAIN as TRAIN
from napari_hinge.defaults import SAMPLER, SLIDE

__all__ = ["RECIPE", "SAMPLER", "SLIDE", "TRAIN"]
