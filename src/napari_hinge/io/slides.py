"""Whole-slide images as lazy multiscale RGB pyramids with their pixel size.

``open_slide`` reads Aperio SVS, Hamamatsu NDPI, generic tiled pyramidal TIFF (levels in the
main IFD chain), OME-TIFF (SubIFD pyramids), single-level TIFF and plain JPEG/PNG sections, and
returns a :class:`Slide`: a list of dask arrays (largest first, ``(Y, X, 3)`` uint8, square
chunks) that napari can show with ``multiscale=True``, plus microns per pixel and the source path.

Every level is an independent lazy read of that level on disk (tifffile ``aszarr``), never a
strided view of the base: napari asks coarse levels for the first frame and a strided level would
decode full-resolution tiles for it. A flat image (one level, longer side above
``PYRAMID_MIN_SIDE``) gets a pyramid built once, chunk by chunk, and cached as zarr under
``cache_dir('pyramids')`` keyed by the file's content, so the second open is instant.

No OpenSlide: tifffile + imagecodecs decode every tile format we meet (JPEG, JPEG 2000, LZW, ...).
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import shutil
import uuid
import warnings
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np

from napari_hinge._cache import cache_dir, file_digest
from napari_hinge._convention import MPP_PLAUSIBLE, check_mpp
from napari_hinge.errors import InputError, disk_full_error, is_disk_full
from napari_hinge.geometry import image_pixel_limit

__all__ = [
    "PYRAMID_MIN_SIDE",
    "SLIDE_SUFFIXES",
    "Slide",
    "is_slide_path",
    "needs_pyramid_build",
    "open_slide",
]

#: Lower-case file suffixes ``open_slide`` reads (``.ome.tif`` also ends in ``.tif``).
SLIDE_SUFFIXES: tuple[str, ...] = (
    ".svs",
    ".ndpi",
    ".tif",
    ".tiff",
    ".ome.tif",
    ".ome.tiff",
    ".btf",
    ".jpg",
    ".jpeg",
    ".png",
)
_TIFF_SUFFIXES = (".svs", ".ndpi", ".tif", ".tiff", ".btf")
_PIL_SUFFIXES = (".jpg", ".jpeg", ".png")

#: A flat image whose longer side exceeds this gets a cached pyramid.
PYRAMID_MIN_SIDE = 4096
#: Pyramid levels halve until the longer side is at most this.
PYRAMID_MAX_TOP = 512
# Bump when the cached pyramid layout changes, so old entries are never trusted.
_CACHE_VERSION = 1

# Pixel sizes outside this range (µm/px) are not a real slide resolution: TIFF writers put
# 72 or 96 dpi (~350 µm/px) or 1 px/cm defaults in files that have no physical calibration.
_MPP_PLAUSIBLE = MPP_PLAUSIBLE
# A JPEG stores at least about a byte per 8x8 block (64 px) even where the image is blank; a
# header claiming 1000 px per byte of file describes data that is not there.
_JPEG_MAX_PX_PER_BYTE = 1000
# Share of the available memory one decoded chunk (a tile, a strip, a whole JPEG) may take.
_MAX_MEMORY_SHARE = 0.5


@dataclass(repr=False)
class Slide:
    """A whole-slide image opened lazily.

    Attributes
    ----------
    path
        The source file.
    levels
        Pyramid levels, largest first; each a lazy ``(Y, X, 3)`` uint8 RGB dask array in square
        ``tile x tile`` chunks. Pass the list to napari with ``multiscale=True, rgb=True``.
    microns_per_pixel
        Pixel size of level 0 in µm, or None when the file does not say (ask the user).
    downsamples
        Level-0 pixels per level pixel, per level (``[1.0, 2.0, 4.0, ...]`` for a dyadic pyramid).
    format
        ``'svs'``, ``'ndpi'``, ``'ome-tiff'``, ``'tiff'``, ``'jpeg'`` or ``'png'``.
    mpp_source
        Where ``microns_per_pixel`` came from: ``'argument'``, ``'aperio'``, ``'ome'``,
        ``'tiff-resolution'`` or None.
    pyramid_cache
        The zarr folder holding a pyramid built for a flat image, else None.
    """

    path: Path
    levels: list[da.Array]
    microns_per_pixel: float | None
    downsamples: list[float]
    format: str = "tiff"
    mpp_source: str | None = None
    pyramid_cache: Path | None = None
    _handles: list[Any] = field(default_factory=list, compare=False)

    @property
    def shape(self) -> tuple[int, int]:
        """Level-0 ``(height, width)`` in pixels."""
        h, w = self.levels[0].shape[:2]
        return int(h), int(w)

    @property
    def n_levels(self) -> int:
        return len(self.levels)

    def __repr__(self) -> str:
        mpp = "unknown" if self.microns_per_pixel is None else f"{self.microns_per_pixel:.4g}"
        sizes = ", ".join(f"{lv.shape[1]}x{lv.shape[0]}" for lv in self.levels)
        return f"Slide('{self.path.name}', {self.format}, levels=[{sizes}], mpp={mpp})"

    def read_region(self, x: int, y: int, w: int, h: int, *, level: int = 0) -> np.ndarray:
        """Read a ``(h, w, 3)`` uint8 RGB region.

        Parameters
        ----------
        x, y
            Top-left corner in **level-0** pixels (OpenSlide's convention), so the same
            coordinates address the same tissue at every level.
        w, h
            Size of the region in pixels **of the requested level**.
        level
            Pyramid level (0 = full resolution).

        Returns
        -------
        The region; parts outside the image are white (255), like glass.
        """
        if not (-len(self.levels) <= level < len(self.levels)):
            raise ValueError(
                f"{self.path}: level {level} does not exist (the slide has {len(self.levels)})"
            )
        w, h = int(w), int(h)
        if w <= 0 or h <= 0:
            raise ValueError(f"{self.path}: region size must be positive, got w={w}, h={h}")
        arr = self.levels[level]
        ds = self.downsamples[level]
        # nearest pixel: level sizes are rounded, so true downsamples are 4.001, not 4
        x0 = round(x / ds)
        y0 = round(y / ds)
        out = np.full((h, w, 3), 255, dtype=np.uint8)
        H, W = arr.shape[:2]
        ys, ye = max(y0, 0), min(y0 + h, H)
        xs, xe = max(x0, 0), min(x0 + w, W)
        if ys < ye and xs < xe:
            out[ys - y0 : ye - y0, xs - x0 : xe - x0] = np.asarray(arr[ys:ye, xs:xe].compute())
        return out

    def thumbnail(self, max_size: int = 1024) -> np.ndarray:
        """An RGB overview whose longer side is at most ``max_size``.

        Read from the smallest level whose longer side is ``>= max_size`` (then shrunk to
        fit), or from level 0 when the whole slide is smaller than ``max_size``.
        """
        from PIL import Image

        if max_size <= 0:
            raise ValueError(f"{self.path}: max_size must be positive, got {max_size}")
        idx = 0
        for i, lv in enumerate(self.levels):
            if max(lv.shape[:2]) >= max_size:
                idx = i  # levels are sorted largest first: keep the last that is big enough
        arr = np.asarray(self.levels[idx].compute())
        if max(arr.shape[:2]) <= max_size:
            return arr
        img = Image.fromarray(arr)
        scale = max_size / max(arr.shape[:2])
        size = (max(1, round(arr.shape[1] * scale)), max(1, round(arr.shape[0] * scale)))
        return np.asarray(img.resize(size, Image.Resampling.BOX))

    def close(self) -> None:
        """Close the file handles behind the lazy levels (they can no longer be read)."""
        for handle in self._handles:
            with contextlib.suppress(Exception):
                handle.close()
        self._handles.clear()

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def is_slide_path(path: str | os.PathLike) -> bool:
    """True when the file name has a suffix ``open_slide`` reads (cheap: looks at the name only)."""
    return str(path).lower().endswith(SLIDE_SUFFIXES)


def needs_pyramid_build(path: str | os.PathLike, *, tile: int = 512) -> bool:
    """True when ``open_slide(path)`` would first build and cache a pyramid (seconds to a minute).

    Cheap (reads headers only), so a GUI can open such files in a worker with a progress
    message. False for files that open lazily, already-cached ones and unreadable ones
    (``open_slide`` then raises its own error).
    """
    path = Path(path)
    name = path.name.lower()
    if not path.is_file() or not is_slide_path(name):
        return False
    try:
        if name.endswith(_PIL_SUFFIXES):
            from PIL import Image

            with image_pixel_limit(), Image.open(path) as img:
                big = max(img.size) > PYRAMID_MIN_SIDE
        else:
            import tifffile

            with tifffile.TiffFile(path) as tif:
                levels = tif.series[0].levels
                big = len(levels) == 1 and max(levels[0].shape) > PYRAMID_MIN_SIDE
    except Exception:  # noqa: BLE001 - a cheap probe; open_slide reports the real problem
        return False
    return big and not _cache_valid(cache_dir("pyramids") / _cache_key(path, tile))


def open_slide(path: str | os.PathLike, *, mpp: float | None = None, tile: int = 512) -> Slide:
    """Open a whole-slide image as a lazy multiscale RGB pyramid.

    Parameters
    ----------
    path
        An SVS, NDPI, (OME-)TIFF, BigTIFF, JPEG or PNG file.
    mpp
        Microns per pixel of level 0; overrides whatever the file says.
    tile
        Edge of the square dask chunks (and of the cached pyramid's zarr chunks).

    Returns
    -------
    The opened :class:`Slide`. Pixels are read only when a chunk is computed, except for
    a flat image above ``PYRAMID_MIN_SIDE`` px, whose pyramid is built (once) here.

    Raises
    ------
    FileNotFoundError
        The file does not exist.
    ValueError
        Unsupported file type, or a file that cannot be parsed or decoded (truncated, corrupt).
    """
    # absolute: every output that records this slide must find it from any folder
    path = Path(os.path.abspath(Path(path).expanduser()))
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such slide file")
    if path.is_dir():
        raise ValueError(f"{path}: not a readable slide (a folder, not a file)")
    name = path.name.lower()
    if not is_slide_path(name):
        raise ValueError(
            f"{path}: not a readable slide (unsupported file type {path.suffix!r}; "
            f"expected one of {', '.join(SLIDE_SUFFIXES)})"
        )
    if tile < 16:
        raise ValueError(f"tile must be at least 16 px, got {tile}")
    if mpp is not None and not (math.isfinite(mpp) and mpp > 0):
        raise ValueError(f"{path}: mpp must be a positive number of µm per pixel, got {mpp}")

    if name.endswith(_PIL_SUFFIXES):
        slide = _open_pil(path, tile)
    else:
        slide = _open_tiff(path, tile, mpp_given=mpp is not None)
    if mpp is not None:
        slide.microns_per_pixel, slide.mpp_source = float(mpp), "argument"
    return slide


# --------------------------------------------------------------------------------------------
# TIFF family


def _open_tiff(path: Path, tile: int, *, mpp_given: bool = False) -> Slide:
    import tifffile
    import zarr

    try:
        tif = tifffile.TiffFile(path)
    except Exception as err:  # tifffile raises many types for garbage input
        raise ValueError(f"{path}: not a readable slide ({_reason(err)})") from err
    try:
        if not tif.series:
            raise ValueError("no image series in the file")
        series = tif.series[0]  # SVS: Baseline (Thumbnail/Label/Macro are later series)
        fmt = "svs" if tif.is_svs else "ndpi" if tif.is_ndpi else "tiff"
        fmt = "ome-tiff" if tif.is_ome else fmt
        _check_tiles(path, series)
        levels = []
        for i, lv in enumerate(series.levels):
            z = zarr.open_array(series.aszarr(level=i), mode="r")
            src, chunks = z, z.chunks
            if not _memmappable(lv):
                _check_memory(path, math.prod(z.chunks) * z.dtype.itemsize,
                              f"one tile/strip of level {i} ({'x'.join(map(str, z.chunks))})")
            if math.prod(z.chunks) > 16 * tile * tile * 3 and _memmappable(lv):
                # Uncompressed single-strip TIFF: the one "chunk" is the whole image, so map
                # the file instead and read any window directly.
                src = tifffile.memmap(path, series=0, level=i, mode="r")
                axes_sizes = zip(lv.axes, src.shape, strict=True)
                chunks = tuple(tile if a in "YX" else n for a, n in axes_sizes)
            arr = da.from_array(src, chunks=chunks, fancy=False, name=_token(path, i, tile))
            levels.append(_to_rgb(arr, lv.axes, path))
        order = sorted(range(len(levels)), key=lambda i: -levels[i].shape[0] * levels[i].shape[1])
        levels = [levels[i] for i in order]
        mpp, mpp_source = (None, None) if mpp_given else _tiff_mpp(path, tif, series)
        cache = None
        if len(levels) == 1 and max(levels[0].shape[:2]) > PYRAMID_MIN_SIDE:
            base = levels[0]
            cache = _cached_pyramid(path, tile, base.shape[:2], _band_reader(base), keep_base=False)
            levels = [base, *_open_cached_levels(cache, tile, path)]
        levels = [_rechunk(lv, tile) for lv in levels]
        # Fail now, not inside napari: decode a corner tile of the largest and smallest level.
        _probe(path, levels[0])
        _probe(path, levels[-1])
    except ValueError as err:
        tif.close()
        msg = str(err)
        raise InputError(
            msg if msg.startswith(str(path)) else f"{path}: not a readable slide ({msg})",
            path=path) from err
    except Exception as err:  # decoders raise anything on corrupt data
        tif.close()
        if is_disk_full(err):  # the pyramid cache could not be written: not the slide's fault
            raise
        raise InputError(f"{path}: not a readable slide ({_reason(err)})", path=path) from err
    return Slide(
        path=path,
        levels=levels,
        microns_per_pixel=mpp,
        downsamples=_downsamples(levels),
        format=fmt,
        mpp_source=mpp_source,
        pyramid_cache=cache,
        _handles=[tif],
    )


def _check_tiles(path: Path, series: Any) -> None:
    """Every tile/strip each level declares must exist and lie inside the file.

    A truncated file (data beyond its end, or image-data tags lost with the cut) is an error:
    tifffile would decode the missing tiles as black. Tiles stored empty on purpose (byte
    count 0, some writers' sparse tiles) only warn, with the missing fraction.
    """
    size = path.stat().st_size
    for i, lv in enumerate(series.levels):
        for page in lv.pages:
            if page is None or not hasattr(page, "dataoffsets"):
                continue
            offsets = np.asarray(page.dataoffsets, dtype=np.int64)
            counts = np.asarray(page.databytecounts, dtype=np.int64)
            expected = math.prod(getattr(page, "chunked", ()) or (offsets.size,))
            if offsets.size == 0 or offsets.size != counts.size or offsets.size < expected:
                raise ValueError(
                    f"{path}: not a readable slide (truncated or corrupt: level {i} declares "
                    f"{expected} tiles/strips but the file locates {min(offsets.size, counts.size)}"
                    ")")
            end = int((offsets + counts).max())
            if end > size:
                raise ValueError(
                    f"{path}: not a readable slide (truncated: level {i} image data ends at "
                    f"byte {end} but the file has {size} bytes)"
                )
            empty = int((counts == 0).sum())
            if empty == counts.size:
                raise ValueError(f"{path}: not a readable slide (level {i} has no image data: "
                                 f"all {empty} tiles/strips are empty)")
            if empty:
                warnings.warn(f"{path}: {empty} of {counts.size} tiles/strips of level {i} "
                              f"({100 * empty / counts.size:.1f}%) hold no data and show as "
                              "black", UserWarning, stacklevel=4)


def _available_memory() -> int | None:
    """Bytes of memory available now (Linux MemAvailable, else free pages), None if unknown."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _check_memory(path: Path, nbytes: int, what: str) -> None:
    """Refuse at once what would need more memory than there is (a header can claim any
    size; decoding it would take minutes and end in a MemoryError)."""
    avail = _available_memory()
    if avail is not None and nbytes > _MAX_MEMORY_SHARE * avail:
        raise InputError(
            f"{path}: not a readable slide ({what} claims {nbytes / 2**30:.1f} GiB decoded, "
            f"more than the {avail / 2**30:.1f} GiB of memory available)", path=path)


def _memmappable(level: Any) -> bool:
    try:
        return len(level.pages) == 1 and bool(level.keyframe.is_memmappable)
    except Exception:  # noqa: BLE001 - a feature probe; the zarr path still works
        return False


def _probe(path: Path, level: da.Array) -> None:
    h, w = level.shape[:2]
    n = min(level.chunksize[0], level.chunksize[1], h, w)
    corner = np.asarray(level[h - n :, w - n :].compute())
    if corner.shape != (n, n, 3):
        raise ValueError(f"{path}: not a readable slide (tile decoded to shape {corner.shape})")


def _tiff_mpp(path: Path, tif: Any, series: Any) -> tuple[float | None, str | None]:
    """The pixel size a TIFF declares. A scanner's (Aperio, OME) value outside
    ``MPP_PLAUSIBLE`` is refused (the user can override it); a TIFF resolution tag outside
    it is a writer's default (72 dpi) and means "unknown"."""
    page = series.levels[0].keyframe
    desc = tif.pages[0].description or ""
    if tif.is_svs or desc.startswith("Aperio"):
        m = re.search(r"\bMPP\s*=\s*([^|\s]+)", desc)
        if m:
            try:
                v = float(m.group(1))
            except ValueError:
                v = m.group(1)
            return check_mpp(v, path, "Aperio MPP"), "aperio"
    if tif.is_ome and tif.ome_metadata:
        v = _ome_mpp(tif.ome_metadata)
        if v is not None:
            return check_mpp(v, path, "OME PhysicalSizeX"), "ome"
    v = _resolution_mpp(page)
    if v is not None:
        return v, "tiff-resolution"
    return None, None


_UNIT_TO_UM = {
    "µm": 1.0, "μm": 1.0, "um": 1.0, "micron": 1.0, "micrometer": 1.0,
    "nm": 1e-3, "pm": 1e-6, "Å": 1e-4, "mm": 1e3, "cm": 1e4, "m": 1e6,
}  # fmt: skip


def _ome_mpp(xml: str) -> float | None:
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return None
    for el in root.iter():
        if el.tag.rsplit("}", 1)[-1] == "Pixels":
            size = el.get("PhysicalSizeX")
            unit = el.get("PhysicalSizeXUnit", "µm")
            if size is None or unit not in _UNIT_TO_UM:
                return None
            try:
                return float(size) * _UNIT_TO_UM[unit]
            except ValueError:
                return None
    return None


def _resolution_mpp(page: Any) -> float | None:
    tags = page.tags
    xres = tags.get("XResolution")
    unit = tags.get("ResolutionUnit")
    if xres is None or unit is None:
        return None
    num, den = xres.value if isinstance(xres.value, tuple) else (xres.value, 1)
    if not num or not den:
        return None
    px_per_unit = num / den
    um_per_unit = {2: 25400.0, 3: 10000.0}.get(int(unit.value))  # inch, centimetre
    if um_per_unit is None:
        return None
    v = um_per_unit / px_per_unit
    return v if _MPP_PLAUSIBLE[0] <= v <= _MPP_PLAUSIBLE[1] else None


# --------------------------------------------------------------------------------------------
# JPEG / PNG


def _open_pil(path: Path, tile: int) -> Slide:
    from PIL import Image

    fmt = "png" if path.name.lower().endswith(".png") else "jpeg"
    try:
        with image_pixel_limit(), Image.open(path) as img:
            w, h = img.size
            if img.format == "JPEG" and w * h > _JPEG_MAX_PX_PER_BYTE * path.stat().st_size:
                raise InputError(
                    f"{path}: not a readable slide (the header claims {w}x{h} px, more than a "
                    f"{path.stat().st_size}-byte JPEG can hold: truncated or forged)", path=path)
            _check_memory(path, w * h * max(3, len(img.getbands())), f"a {w}x{h} px image")
            if max(w, h) > PYRAMID_MIN_SIDE:
                cache = cache_dir("pyramids") / _cache_key(path, tile)
                if not _cache_valid(cache):
                    # Decode once (one full copy in memory); read bands out of it.
                    img.load()
                    cache = _cached_pyramid(
                        path, tile, (h, w), _pil_band_reader(img), keep_base=True
                    )
                levels = _open_cached_levels(cache, tile, path)
            else:
                arr = _pil_to_rgb(img)
                cache = None
                levels = [da.from_array(arr, chunks=(tile, tile, 3), name=_token(path, 0, tile))]
    except ValueError:
        raise
    except Exception as err:  # PIL raises OSError, SyntaxError, ... on bad files
        if is_disk_full(err):
            raise
        raise InputError(f"{path}: not a readable slide ({_reason(err)})", path=path) from err
    levels = [_rechunk(lv, tile) for lv in levels]
    return Slide(
        path=path,
        levels=levels,
        microns_per_pixel=None,  # JPEG/PNG dpi (72, 96) is display metadata, not a pixel size
        downsamples=_downsamples(levels),
        format=fmt,
        pyramid_cache=cache,
    )


def _pil_to_rgb(img: Any) -> np.ndarray:
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        return _np_to_rgb(np.asarray(img))
    if img.mode != "RGB":
        img = img.convert("RGB")  # L, LA, P, RGBA (alpha dropped), CMYK, YCbCr
    return np.asarray(img)


def _pil_band_reader(img: Any):
    def read(y0: int, y1: int) -> np.ndarray:
        return _pil_to_rgb(img.crop((0, y0, img.size[0], y1)))

    return read


# --------------------------------------------------------------------------------------------
# pyramid cache for flat images


def _cache_key(path: Path, tile: int) -> str:
    return f"{file_digest(path)}-t{tile}-v{_CACHE_VERSION}"


def _cache_valid(folder: Path) -> bool:
    # A finished build is renamed into place, so an existing folder with our marker is complete.
    return (folder / "zarr.json").is_file() and (folder / "COMPLETE").is_file()


def _band_reader(base: da.Array):
    def read(y0: int, y1: int) -> np.ndarray:
        return np.asarray(base[y0:y1].compute())

    return read


def _pyramid_shapes(h: int, w: int) -> list[tuple[int, int]]:
    shapes = [(h, w)]
    while max(shapes[-1]) > PYRAMID_MAX_TOP:
        ph, pw = shapes[-1]
        shapes.append(((ph + 1) // 2, (pw + 1) // 2))
    return shapes


def _halve(band: np.ndarray) -> np.ndarray:
    """2x2 box mean of an (h, w, 3) uint8 band; odd edges repeat the last row/column."""
    h, w = band.shape[:2]
    if h % 2 or w % 2:
        band = np.pad(band, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    # Four strided adds: ~10x faster than reshape(...).sum(axis=(1, 3)) in numpy.
    s = band[0::2, 0::2].astype(np.uint16)
    s += band[1::2, 0::2]
    s += band[0::2, 1::2]
    s += band[1::2, 1::2]
    s += 2
    s >>= 2
    return s.astype(np.uint8)


def _build_pyramid(
    folder: Path, tile: int, shape: tuple[int, int], read_band, *, keep_base: bool
) -> None:
    """Write the pyramid of a flat image into ``folder`` as a zarr group, band by band.

    Level k+1 is made from bands of ``2 * tile`` rows of level k, so memory holds one band,
    never a second full-size copy. Arrays are named by level; level 0 is written only when
    ``keep_base`` (JPEG/PNG cannot be read lazily; a TIFF can, so its base is not copied).
    """
    import zarr
    from zarr.codecs import BloscCodec

    # lz4 + byte shuffle: fast to write and read, ~2x smaller than raw on H&E.
    comp = BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")
    group = zarr.open_group(folder, mode="w")
    shapes = _pyramid_shapes(*shape)
    group.attrs.update(
        {"napari_hinge_pyramid": _CACHE_VERSION, "shapes": [list(s) for s in shapes],
         "base_in_cache": keep_base, "tile": tile}
    )  # fmt: skip
    arrays = {}
    for k, (h, w) in enumerate(shapes):
        if k == 0 and not keep_base:
            continue
        arrays[k] = group.create_array(
            str(k), shape=(h, w, 3), chunks=(tile, tile, 3), dtype="uint8", compressors=comp
        )
    h0 = shape[0]
    for y0 in range(0, h0, 2 * tile):
        band = read_band(y0, min(y0 + 2 * tile, h0))
        if keep_base:
            arrays[0][y0 : y0 + band.shape[0]] = band
        half = _halve(band)
        arrays[1][y0 // 2 : y0 // 2 + half.shape[0]] = half
    for k in range(1, len(shapes) - 1):
        src, dst = arrays[k], arrays[k + 1]
        for y0 in range(0, shapes[k][0], 2 * tile):
            half = _halve(src[y0 : y0 + 2 * tile])
            dst[y0 // 2 : y0 // 2 + half.shape[0]] = half


def _cached_pyramid(
    path: Path, tile: int, shape: tuple[int, int], read_band, *, keep_base: bool
) -> Path:
    """Return the cache folder of ``path``'s pyramid, building it atomically when missing."""
    root = cache_dir("pyramids")
    final = root / _cache_key(path, tile)
    if _cache_valid(final):
        return final
    if final.exists():  # stale or foreign: never trust a folder we did not complete
        shutil.rmtree(final, ignore_errors=True)
    tmp = root / f".tmp-{final.name}-{uuid.uuid4().hex[:8]}"
    try:
        _build_pyramid(tmp, tile, shape, read_band, keep_base=keep_base)
        (tmp / "COMPLETE").write_text(str(path))
        try:
            os.replace(tmp, final)
        except OSError:
            if not _cache_valid(final):  # someone else finished first -> use theirs
                raise
    except Exception as exc:
        if is_disk_full(exc):
            raise disk_full_error(root) from exc
        raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def _open_cached_levels(folder: Path, tile: int, path: Path) -> list[da.Array]:
    """The cached levels (all of them, or all but the base when the base stays in the source)."""
    import zarr

    group = zarr.open_group(folder, mode="r")
    n = len(group.attrs["shapes"])
    first = 0 if group.attrs.get("base_in_cache") else 1
    levels = []
    for k in range(first, n):
        z = group[str(k)]
        levels.append(da.from_array(z, chunks=z.chunks, fancy=False, name=f"pyr-{folder.name}-{k}"))
    return levels


# --------------------------------------------------------------------------------------------
# helpers


def _to_rgb(arr: da.Array, axes: str, path: Path) -> da.Array:
    """Any tifffile level (YX, YXS, SYX, CYX, TZCYXS, ...) -> (Y, X, 3) uint8."""
    axes = axes.upper()
    if "Y" not in axes or "X" not in axes:
        raise ValueError(f"{path}: not a readable slide (no Y/X axes in {axes!r})")
    chan = next((a for a in "SC" if a in axes and arr.shape[axes.index(a)] > 1), None)
    # Drop every other axis (T, Z, extra samples) by taking its first index.
    index = tuple(slice(None) if a in ("Y", "X", chan) else 0 for a in axes)
    arr = arr[index]
    kept = [a for a in axes if a in ("Y", "X", chan)]
    order = [kept.index("Y"), kept.index("X")] + ([kept.index(chan)] if chan else [])
    arr = arr.transpose(order)
    if arr.ndim == 2:
        arr = arr[..., None]
    return _channels_to_rgb(_dtype_to_uint8(arr, path))


def _channels_to_rgb(arr: Any) -> Any:
    c = arr.shape[-1]
    if c >= 3:
        return arr[..., :3]  # RGBA: drop alpha; more channels: first three
    grey = arr[..., :1]  # grey, or grey + alpha
    if isinstance(grey, da.Array):
        return da.concatenate([grey] * 3, axis=-1)
    return np.repeat(grey, 3, axis=-1)


def _dtype_to_uint8(arr: Any, path: Path) -> Any:
    dt = np.dtype(arr.dtype)
    if dt == np.uint8:
        return arr
    if dt == np.bool_:
        return arr.astype(np.uint8) * 255
    if dt.kind == "u" and dt.itemsize == 2:
        return (arr >> 8).astype(np.uint8)
    raise ValueError(f"{path}: not a readable slide (pixel type {dt} is not an RGB/grey image)")


def _np_to_rgb(arr: np.ndarray) -> np.ndarray:
    if arr.dtype == np.int32 or arr.dtype.kind == "f":
        lo, hi = float(arr.min()), float(arr.max())
        arr = ((arr - lo) * (255.0 / (hi - lo or 1.0))).astype(np.uint8)
    elif arr.dtype != np.uint8:
        arr = (arr.astype(np.uint16) >> 8).astype(np.uint8)
    if arr.ndim == 2:
        arr = arr[..., None]
    return np.ascontiguousarray(_channels_to_rgb(arr))


def _rechunk(arr: da.Array, tile: int) -> da.Array:
    chunks = (tile, tile, 3)
    if arr.chunksize == tuple(min(c, s) for c, s in zip(chunks, arr.shape, strict=True)):
        return arr
    return arr.rechunk(chunks)


def _downsamples(levels: list[da.Array]) -> list[float]:
    h0, w0 = levels[0].shape[:2]
    return [float((h0 / lv.shape[0] + w0 / lv.shape[1]) / 2) for lv in levels]


def _token(path: Path, level: int, tile: int) -> str:
    st = path.stat()
    return f"slide-{abs(hash((str(path.resolve()), st.st_size, st.st_mtime_ns)))}-{level}-t{tile}"


def _reason(err: BaseException) -> str:
    msg = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return f"{type(err).__name__}: {msg}" if msg else type(err).__name__
