"""Predicted maps the package writes (``hinge predict-slide``'s ``maps.ome.tif`` /
``maps.ome.zarr``, a map layer saved from napari): float rasters, genes x H x W, with their
µm pixel size and origin on the slide, as pyramidal OME-TIFF (QuPath) or multiscale OME-Zarr
(NGFF 0.4).

:func:`read_map` returns what napari needs to put them back where they were: the raster, one
name per channel, and the ``scale``/``translate`` in µm that place a raster pixel on the slide
(the slide layer is in µm too).
"""

from __future__ import annotations

import math
import os
import warnings
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from napari_hinge.errors import InputError

__all__ = ["MapImage", "is_map_tiff", "is_map_zarr", "map_pyramid", "read_map",
           "write_map_ome_tiff", "write_map_ome_zarr"]

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


def map_pyramid(data: np.ndarray, *, min_side: int = 256) -> list[np.ndarray]:
    """(C, H, W) and its 2x NaN-aware mean reductions down to ``min_side``: level k's pixel
    covers level 0's pixels ``2^k i .. 2^k i + 2^k - 1`` (its centre moves by half a pixel of
    the level below, which the writers' translations account for)."""
    levels = [np.asarray(data, np.float32)]
    while min(levels[-1].shape[-2:]) >= 2 * min_side:
        a = levels[-1]
        h, w = a.shape[-2] // 2 * 2, a.shape[-1] // 2 * 2
        blocks = a[:, :h, :w].reshape(a.shape[0], h // 2, 2, w // 2, 2)
        with np.errstate(invalid="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN blocks stay NaN
            levels.append(np.nanmean(blocks, axis=(2, 4)).astype(np.float32))
    return levels


def _level_placement(scale, translate, k: int) -> tuple[tuple[float, float], tuple[float, float]]:
    f = 2 ** k
    return ((scale[0] * f, scale[1] * f),
            (translate[0] + (f - 1) * scale[0] / 2, translate[1] + (f - 1) * scale[1] / 2))


def write_map_ome_tiff(data: np.ndarray, names, scale, translate, path) -> Path:
    """A pyramidal float OME-TIFF (levels as SubIFDs, tiled 256 px: QuPath opens it): µm
    pixel size, the origin as the plane position, one channel name per gene; atomic."""
    import tifffile

    from napari_hinge._files import atomic_write

    levels = map_pyramid(np.asarray(data, np.float32))
    names = list(names)
    n = len(names)
    metadata = {"axes": "CYX", "Channel": {"Name": names},
                "PhysicalSizeX": float(scale[1]), "PhysicalSizeXUnit": "µm",
                "PhysicalSizeY": float(scale[0]), "PhysicalSizeYUnit": "µm",
                "Plane": {"PositionX": [float(translate[1])] * n,
                          "PositionY": [float(translate[0])] * n,
                          "PositionXUnit": ["µm"] * n, "PositionYUnit": ["µm"] * n}}

    def write(tmp):
        tile = (256, 256) if min(levels[0].shape[-2:]) >= 256 else None
        with tifffile.TiffWriter(tmp, ome=True) as tif:
            tif.write(levels[0], subifds=len(levels) - 1, metadata=metadata, tile=tile,
                      compression="zlib", photometric="minisblack")
            for level in levels[1:]:
                tif.write(level, subfiletype=1, tile=tile, compression="zlib",
                          photometric="minisblack")

    return atomic_write(Path(path), write)


def write_map_ome_zarr(data: np.ndarray, names, scale, translate, path, *,
                       name: str = "hinge maps") -> Path:
    """A multiscale OME-Zarr (NGFF 0.4) of the (C, H, W) maps: axes c/y/x in micrometer,
    each level's scale and translation onto the slide, channel labels = genes (omero);
    written to a temporary folder and renamed into place."""
    import zarr
    from ome_zarr.format import FormatV04
    from ome_zarr.writer import write_multiscale

    from napari_hinge._files import atomic_write_dir

    levels = map_pyramid(np.asarray(data, np.float32))
    transforms = []
    for k in range(len(levels)):
        sc, tr = _level_placement(scale, translate, k)
        transforms.append([{"type": "scale", "scale": [1.0, float(sc[0]), float(sc[1])]},
                           {"type": "translation",
                            "translation": [0.0, float(tr[0]), float(tr[1])]}])
    axes = [{"name": "c", "type": "channel"},
            {"name": "y", "type": "space", "unit": "micrometer"},
            {"name": "x", "type": "space", "unit": "micrometer"}]

    def write(tmp: Path) -> None:
        root = zarr.open_group(str(tmp), mode="w", zarr_format=2)
        write_multiscale(levels, root, fmt=FormatV04(), axes=axes,
                         coordinate_transformations=transforms, name=name,
                         storage_options={"chunks": (1, 512, 512)})
        root.attrs["omero"] = {"channels": [{"label": str(g), "active": i == 0}
                                            for i, g in enumerate(names)]}
        root.attrs["napari_hinge"] = {"kind": "map", "unit": "log1p(counts per 10k)"}

    return atomic_write_dir(Path(path), write)


def is_map_zarr(path: str | os.PathLike) -> bool:
    """True for an OME-Zarr image group of float values (reads its metadata only)."""
    p = Path(path)
    if not p.is_dir() or not (p / ".zattrs").is_file() and not (p / "zarr.json").is_file():
        return False
    try:
        import zarr

        group = zarr.open_group(str(p), mode="r")
        multiscales = group.attrs.get("multiscales") or \
            group.attrs.get("ome", {}).get("multiscales")
        if not multiscales:
            return False
        first = group[multiscales[0]["datasets"][0]["path"]]
        return np.dtype(first.dtype).kind == "f"
    except Exception:  # noqa: BLE001 - a cheap probe
        return False


def _read_map_zarr(path: Path) -> MapImage:
    import zarr

    try:
        group = zarr.open_group(str(path), mode="r")
        attrs = dict(group.attrs)
        ms = (attrs.get("multiscales") or attrs.get("ome", {}).get("multiscales"))[0]
        level0 = ms["datasets"][0]
        data = np.asarray(group[level0["path"]][...], dtype=np.float32)
    except Exception as err:
        raise InputError(f"{path}: not a readable OME-Zarr map ({err})", path=path) from err
    scale, translate = [1.0] * data.ndim, [0.0] * data.ndim
    for t in list(ms.get("coordinateTransformations", [])) + \
            list(level0.get("coordinateTransformations", [])):
        if t.get("type") == "scale":
            scale = [a * b for a, b in zip(scale, t["scale"], strict=True)]
        elif t.get("type") == "translation":
            translate = [a + b for a, b in zip(translate, t["translation"], strict=True)]
    if data.ndim == 2:
        data, scale, translate = data[None], [1.0, *scale], [0.0, *translate]
    if data.ndim != 3:
        raise InputError(f"{path}: a map must be (c, y, x), got {data.ndim} axes", path=path)
    units = [a.get("unit") for a in ms.get("axes", [])[-2:]]
    factor = 1.0 if all(u in (None, "micrometer") for u in units) else \
        {"nanometer": 1e-3, "millimeter": 1e3}.get(units[-1], 1.0)
    channels = attrs.get("omero", {}).get("channels", [])
    names = [c.get("label") or f"{path.name} {i}" for i, c in enumerate(channels)]
    if len(names) != len(data):
        names = [f"{path.name.split('.')[0]} {i}" for i in range(len(data))]
    return MapImage(data=data, names=names,
                    scale=(scale[-2] * factor, scale[-1] * factor),
                    translate=(translate[-2] * factor, translate[-1] * factor))


def read_map(path: str | os.PathLike) -> MapImage:
    """Read a map (OME-TIFF, or an OME-Zarr image folder) with its placement.

    Raises
    ------
    InputError
        The file is not a readable float OME-TIFF, or its pixel size is not a positive number.
    """
    import tifffile

    path = Path(path)
    if path.is_dir():
        return _read_map_zarr(path)
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
