"""npe2 writers: image layers (predicted maps, slides' derived rasters) as OME-TIFF with
their µm pixel size, and spots layers as .h5ad (the AnnData they carry, with every
prediction column added in napari)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def write_image_ome_tiff(path: str, data, meta: dict) -> list[str]:
    """One image layer -> OME-TIFF; pixel size and origin from the layer's scale/translate."""
    import tifffile

    from napari_hinge.training import atomic_write

    path = Path(path)
    if not path.name.lower().endswith((".ome.tif", ".ome.tiff")):
        path = path.with_name(path.name.split(".")[0] + ".ome.tif")
    array = np.asarray(data[0] if meta.get("multiscale") else data)
    if meta.get("rgb"):
        raise ValueError(f"{path}: RGB slides are written by their scanner; save maps instead")
    scale = meta.get("scale", (1.0, 1.0))[-2:]
    translate = meta.get("translate", (0.0, 0.0))[-2:]
    metadata = {"axes": "YX" if array.ndim == 2 else "CYX",
                "PhysicalSizeY": float(scale[0]), "PhysicalSizeX": float(scale[1]),
                "PhysicalSizeYUnit": "µm", "PhysicalSizeXUnit": "µm",
                "Name": meta.get("name", path.stem),
                "Plane": {"PositionY": float(translate[0]), "PositionX": float(translate[1]),
                          "PositionYUnit": "µm", "PositionXUnit": "µm"}}
    atomic_write(path, lambda tmp: tifffile.imwrite(
        tmp, array.astype(np.float32), ome=True, metadata=metadata, compression="zlib"))
    return [str(path)]


def write_spots_h5ad(path: str, data, meta: dict) -> list[str]:
    """A spots layer -> .h5ad: its AnnData with the layer's feature columns added to obs."""
    from napari_hinge.training import atomic_write

    adata = meta.get("metadata", {}).get("adata")
    if adata is None:
        raise ValueError(f"{path}: this points layer carries no spatial data (open spots with "
                         "napari-hinge to save them as .h5ad)")
    adata = adata.copy()
    features = meta.get("features")
    if features is not None:
        for column in features.columns:
            if column not in ("barcode",) and column not in adata.obs:
                adata.obs[column] = np.asarray(features[column])
    path = Path(path)
    if path.suffix != ".h5ad":
        path = path.with_suffix(".h5ad")
    atomic_write(path, lambda tmp: adata.write_h5ad(tmp))
    return [str(path)]
