"""Predicted maps the package writes (``hinge predict-slide``'s ``maps.ome.tif``, a map layer saved
from napari): float OME-TIFFs, genes x H x W, with their µm pixel size and origin on the slide.

:func:`read_map` returns what napari needs to put them back where they were: the raster, one
name per channel, and the ``scale``/``translate`` in µm that place a raster pixel on the slide
(the slide layer is in µm too).
"""

from __future__ import annotations

import math
import os
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from napari_hinge.errors import InputError

__all__ = ["MapImage", "is_map_tiff", "read_map"]

_UM = {"µm": 1.0, "μm": 1.0, "um": 1.0, "nm": 1e-3, "mm": 1e3}


@dataclass
class MapImage:
    """A raster of values (not colours) placed on a slide.

    Attributes
    ----------
    data
        ``(C, H, W)`` float32 (C = 1 for a single map); NaN off tissue.
    names
        One name per channel (gene symbols for HINGE maps).
    scale, translate
        µm per raster pixel and the µm position of pixel (0, 0), as (row, col).
    """

    data: np.ndarray
    names: list[str]
    scale: tuple[float, float]
    translate: tuple[float, float]


def is_map_tiff(path: str | os.PathLike) -> bool:
    """True for an OME-TIFF of floating-point values (a map, not a slide); reads the header."""
    name = str(path).lower()
    if not name.endswith((".ome.tif", ".ome.tiff")):
        return False
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            return bool(tif.is_ome and tif.series and tif.series[0].dtype.kind == "f")
    except Exception:  # noqa: BLE001 - a cheap probe; the slide reader reports bad files
        return False


def read_map(path: str | os.PathLike) -> MapImage:
    """Read a map OME-TIFF with its placement.

    Raises
    ------
    InputError
        The file is not a readable float OME-TIFF, or its pixel size is not a positive number.
    """
    import tifffile

    path = Path(path)
    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            axes, data = series.axes, series.asarray()
            xml = tif.ome_metadata or ""
    except Exception as err:
        raise InputError(f"{path}: not a readable map OME-TIFF ({err})", path=path) from err
    if axes not in ("YX", "CYX", "QYX", "IYX"):
        raise InputError(f"{path}: a map must be YX or CYX, got axes {axes!r}", path=path)
    data = np.asarray(data, dtype=np.float32)
    if data.ndim == 2:
        data = data[None]
    meta = _ome_placement(xml, path)
    names = meta["names"] or [path.name.split(".")[0]] * len(data)
    if len(names) != len(data):
        names = [f"{path.name.split('.')[0]} {i}" for i in range(len(data))]
    return MapImage(data=data, names=names, scale=meta["scale"], translate=meta["translate"])


def _ome_placement(xml: str, path: Path) -> dict:
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as err:
        raise InputError(f"{path}: unreadable OME metadata ({err})", path=path) from err

    def local(el):
        return el.tag.rsplit("}", 1)[-1]

    pixels = next((el for el in root.iter() if local(el) == "Pixels"), None)
    if pixels is None:
        raise InputError(f"{path}: OME metadata without Pixels", path=path)
    scale = []
    for ax in ("Y", "X"):
        raw, unit = pixels.get(f"PhysicalSize{ax}"), pixels.get(f"PhysicalSize{ax}Unit", "µm")
        try:
            v = float(raw) * _UM[unit]
        except (TypeError, ValueError, KeyError):
            v = math.nan
        if not (math.isfinite(v) and v > 0):
            raise InputError.at(path, f"must be a positive length in µm, got {raw!r} {unit}",
                                field=f"PhysicalSize{ax}")
        scale.append(v)
    plane = next((el for el in pixels if local(el) == "Plane"), None)
    translate = []
    for ax in ("Y", "X"):
        raw = plane.get(f"Position{ax}") if plane is not None else None
        unit = plane.get(f"Position{ax}Unit", "µm") if plane is not None else "µm"
        try:
            v = float(raw) * _UM[unit] if raw is not None else 0.0
        except (ValueError, KeyError):
            v = math.nan
        if not math.isfinite(v):
            raise InputError.at(path, f"must be a position in µm, got {raw!r}",
                                field=f"Position{ax}")
        translate.append(v)
    names = [el.get("Name") or "" for el in pixels if local(el) == "Channel"]
    if not names or not all(names):
        image = next((el for el in root.iter() if local(el) == "Image"), None)
        names = [image.get("Name")] if image is not None and image.get("Name") else []
    return {"scale": tuple(scale), "translate": tuple(translate), "names": names}
