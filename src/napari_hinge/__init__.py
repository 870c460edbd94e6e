"""napari-hinge: from an H&E slide to spatial gene expression.

The package import stays light (npe2 imports commands lazily); heavy modules
(torch, scanpy, napari) are imported by the submodules that need them.
"""

__version__ = "0.1.0"
