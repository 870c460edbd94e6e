"""Small image helpers for the spatial readers: an image's size from its header, a PNG in
memory, placeholder detection, and a small overview of a large image for ``uns['spatial']``.

(Whole slides, read lazily, are :mod:`napari_hinge.io.slides`.)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from napari_hinge.geometry import image_pixel_limit

from .validate import SpatialDataError

#: Longest side of the overview image stored in uns['spatial'] for legacy-ST slides.
OVERVIEW_MAX_SIDE = 2000
SLIDE_TIFF_SUFFIXES = (".tif", ".tiff", ".svs", ".ndpi", ".btf", ".scn", ".qptiff")


def read_image_shape(path: Path) -> tuple[int, int]:
    """(height, width) of level 0 of an image or slide, from its header only."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    if path.suffix.lower() in SLIDE_TIFF_SUFFIXES:
        import tifffile

        try:
            with tifffile.TiffFile(path) as tif:
                shape = tif.series[0].levels[0].shape
                axes = tif.series[0].levels[0].axes
        except Exception as err:
            raise SpatialDataError(f"{path}: cannot read the slide header ({err})") from err
        return int(shape[axes.index("Y")]), int(shape[axes.index("X")])
    with image_pixel_limit() as Image:
        try:
            with Image.open(path) as img:
                w, h = img.size
        except Exception as err:
            raise SpatialDataError(f"{path}: cannot read the image ({err})") from err
    return int(h), int(w)


def load_image(path: Path) -> np.ndarray:
    with image_pixel_limit() as Image:
        try:
            with Image.open(path) as img:
                arr = np.asarray(img)
        except Exception as err:
            raise SpatialDataError(f"{path}: cannot read the image ({err})") from err
    if arr.ndim == 3 and arr.shape[2] == 4:
        arr = arr[..., :3]
    return np.ascontiguousarray(arr)


def is_blank(img: np.ndarray) -> bool:
    """True for placeholder images (a single value everywhere, e.g. all zeros)."""
    return img.size == 0 or bool(img.min() == img.max())


def overview(path: Path, max_side: int = OVERVIEW_MAX_SIDE) -> tuple[np.ndarray, float]:
    """A small RGB copy of a large image and its scale (overview px per image px)."""
    if Path(path).suffix.lower() in SLIDE_TIFF_SUFFIXES:
        return _tiff_overview(Path(path), max_side)
    with image_pixel_limit() as Image, Image.open(path) as img:
        w, h = img.size
        factor = 1
        while max(w, h) / factor > max_side and factor < 64:
            factor *= 2
        if img.format == "JPEG":
            # JPEG decodes at 1/2, 1/4, 1/8 directly (DCT scaling): fast and light.
            img.draft("RGB", (int(np.ceil(w / factor)), int(np.ceil(h / factor))))
        img = img.convert("RGB")
        if max(img.size) > max_side:
            target = (max(1, round(w / factor)), max(1, round(h / factor)))
            img = img.resize(target, Image.Resampling.LANCZOS)
        arr = np.asarray(img)
    return np.ascontiguousarray(arr), arr.shape[1] / w


def _tiff_overview(path: Path, max_side: int) -> tuple[np.ndarray, float]:
    """Overview from the smallest pyramid level that is still >= ``max_side / 2``."""
    import tifffile
    from PIL import Image

    with tifffile.TiffFile(path) as tif:
        levels = tif.series[0].levels
        axes = levels[0].axes
        sizes = [(lv.shape[axes.index("Y")], lv.shape[axes.index("X")]) for lv in levels]
        ok = [i for i, (h, w) in enumerate(sizes) if max(h, w) >= max_side // 2] or [0]
        i = ok[-1]
        if sizes[i][0] * sizes[i][1] > 2e8:
            raise ValueError(f"no pyramid level small enough ({sizes[i][1]}x{sizes[i][0]} px)")
        arr = levels[i].asarray()
    if axes.index("Y") != 0:  # e.g. 'SYX' planar: move samples last
        arr = np.moveaxis(arr, axes.index("S") if "S" in axes else 0, -1)
    img = Image.fromarray(np.ascontiguousarray(arr[..., :3]) if arr.ndim == 3 else arr)
    h0, w0 = sizes[0]
    if max(img.size) > max_side:
        f = max_side / max(img.size)
        img = img.resize(
            (max(1, round(img.width * f)), max(1, round(img.height * f))), Image.Resampling.LANCZOS
        )
    out = np.asarray(img.convert("RGB"))
    return np.ascontiguousarray(out), out.shape[1] / w0
