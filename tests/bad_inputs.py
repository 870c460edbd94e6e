"""A corpus of bad inputs and faults, generated from the shared real data at run time.

Each :class:`Case` builds its files under a temporary folder (nothing binary is committed) and
returns the action a user would run on them. :func:`run_case` runs it and sorts the outcome:

- ``clear error``: the project's own error (:class:`~napari_hinge.errors.InputError`, or an
  ``OSError`` for missing files and full disks) whose message names the file;
- ``warning``: it worked, with the project's warning, and the result is right;
- ``ok``: it worked and the result is right (round-trip cases);
- ``unclear error``: any other exception, or one that does not name the file;
- ``silent wrong``: it worked but should not have, or the result is wrong;
- ``data loss``: a failed write left a partial file, a stray temporary file or lost the old one;
- ``code ran``: a crafted file executed code.

Used by ``tests/test_bad_inputs.py`` (one test per case) and ``benchmarks/bad_inputs.py``.
"""

from __future__ import annotations

import errno
import functools
import gzip
import json
import os
import shutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

SHARED = Path(os.environ.get("NAPARI_HINGE_SHARED",
                             Path(__file__).resolve().parents[2] / "shared")) / "data"
TINY_VISIUM = SHARED / "visium_tiny_fixture"
CYTASSIST = SHARED / "visium_cytassist_mouse_sample"
HER2ST = SHARED / "her2st_subset"
WSI = SHARED / "wsi_small"

OUTCOMES = ("clear error", "warning", "ok", "unclear error", "silent wrong", "data loss",
            "code ran")


@dataclass
class Action:
    """What to run, the file its error must name, and checks on the result / the disk."""

    run: Callable[[], object]
    names: Path
    check: Callable[[object], bool] | None = None  # result right? (for warning/ok cases)
    after: Callable[[], bool] | None = None  # nothing lost? (for writers)
    marker: Path | None = None  # exists when crafted code ran


@dataclass
class Case:
    name: str
    group: str  # 'code', 'spatial', 'slide', 'disk', 'round-trip'
    build: Callable[[Path], Action]
    expect: str = "clear error"  # or 'warning' / 'ok'
    tags: list[str] = field(default_factory=list)


@dataclass
class Outcome:
    case: str
    group: str
    outcome: str
    detail: str


def run_case(case: Case, tmp: Path) -> Outcome:
    """Build and run one case in ``tmp`` (an empty folder) and sort what happened."""
    InputError = _input_error()

    tmp.mkdir(parents=True, exist_ok=True)
    action = case.build(tmp)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            result = action.run()
            exc = None
        except Exception as err:  # noqa: BLE001 - sorting every outcome is the point
            exc = err
    if action.marker is not None and action.marker.exists():
        return Outcome(case.name, case.group, "code ran", str(action.marker))
    if action.after is not None and not action.after():
        return Outcome(case.name, case.group, "data loss", _short(exc))
    ours = [w for w in caught if _is_ours(w)]
    if exc is not None:
        own = isinstance(exc, (InputError, OSError))
        named = str(action.names) in str(exc) or action.names.name in str(exc)
        if own and named and case.expect == "clear error":
            return Outcome(case.name, case.group, "clear error", _short(exc))
        return Outcome(case.name, case.group, "unclear error",
                       f"{type(exc).__name__}: {_short(exc)}")
    if case.expect == "clear error":
        return Outcome(case.name, case.group, "silent wrong", "accepted without an error")
    if action.check is not None and not action.check(result):
        return Outcome(case.name, case.group, "silent wrong", "result is wrong")
    if case.expect == "warning":
        if ours:
            return Outcome(case.name, case.group, "warning", _short(ours[0].message))
        return Outcome(case.name, case.group, "silent wrong", "no warning")
    return Outcome(case.name, case.group, "ok", "")


def _is_ours(w) -> bool:
    return "napari_hinge" in (w.filename or "") or "SpatialDataWarning" in w.category.__name__ \
        or "tiles/strips" in str(w.message)


def _io(module: str, name: str):
    """``napari_hinge.io.<module>.<name>``; in a checkout from before the readers were split by
    format (``benchmarks/bad_inputs.py --src``), the same reader in ``napari_hinge.io.spatial``."""
    import importlib

    try:
        return getattr(importlib.import_module(f"napari_hinge.io.{module}"), name)
    except ImportError:
        old = {"read_10x_mtx": "_read_10x_mtx"}.get(name, name)
        return getattr(importlib.import_module("napari_hinge.io.spatial"), old)


def _open_c2_jpeg():
    """The real C2 H&E (92 Mpx: above PIL's warning size, which is not a bomb here)."""
    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        return Image.open(HER2ST / "images" / "C2_HE.jpg")


def _short(obj) -> str:
    return " ".join(str(obj).split())[:300]


# ---------------------------------------------------------------------------------------------
# Space Ranger


def _visium(tmp: Path) -> Path:
    """A writable copy of the tiny real Visium outs folder."""
    out = tmp / "outs"
    shutil.copytree(TINY_VISIUM, out, copy_function=shutil.copyfile)
    for p in out.rglob("*"):
        p.chmod(0o755 if p.is_dir() else 0o644)
    return out


def _edit_h5(edit: Callable[[h5py.Group], None]) -> Callable[[Path], Action]:
    def build(tmp: Path) -> Action:
        read_spaceranger = _io("spaceranger", "read_spaceranger")

        outs = _visium(tmp)
        h5 = outs / "filtered_feature_bc_matrix.h5"
        with h5py.File(h5, "r+") as f:
            edit(f["matrix"])
        return Action(lambda: read_spaceranger(outs).X.toarray().sum(), h5)

    return build


def _replace(group: h5py.Group, name: str, values) -> None:
    del group[name]
    group.create_dataset(name, data=np.asarray(values))


def _indices_out_of_range(g):
    idx = g["indices"][:]
    idx[len(idx) // 2] = int(g["shape"][0]) + 1000
    _replace(g, "indices", idx)


def _indptr_decreasing(g):
    ptr = g["indptr"][:]
    mid = len(ptr) // 2
    ptr[mid] = ptr[mid + 5] + 50
    _replace(g, "indptr", ptr)


def _indptr_short(g):
    _replace(g, "indptr", g["indptr"][:-3])


def _data_short(g):
    _replace(g, "data", g["data"][:-10])


def _scalefactors(key: str, value) -> Callable[[Path], Action]:
    def build(tmp: Path) -> Action:
        read_spaceranger = _io("spaceranger", "read_spaceranger")

        outs = _visium(tmp)
        sf_file = outs / "spatial" / "scalefactors_json.json"
        sf = json.loads(sf_file.read_text())
        if key == "*":
            sf = value
        else:
            sf[key] = value
        sf_file.write_text(json.dumps(sf))
        return Action(lambda: read_spaceranger(outs), sf_file)

    return build


def _positions(edit: Callable[[list[str]], list[str]]) -> Callable[[Path], Action]:
    def build(tmp: Path) -> Action:
        read_spaceranger = _io("spaceranger", "read_spaceranger")

        outs = _visium(tmp)
        pos = next((outs / "spatial").glob("tissue_positions*.csv"))
        lines = pos.read_text().splitlines()
        pos.write_text("\n".join(edit(lines)) + "\n")
        return Action(lambda: read_spaceranger(outs), pos)

    return build


def _set_field(lines: list[str], row: int, col: int, value: str) -> list[str]:
    lines = list(lines)
    parts = lines[row].split(",")
    parts[col] = value
    lines[row] = ",".join(parts)
    return lines


def _mtx(edit: Callable[[Path], Path]) -> Callable[[Path], Action]:
    """The real CytAssist Matrix Market folder with one file damaged."""

    def build(tmp: Path) -> Action:
        read_10x_mtx = _io("spaceranger", "read_10x_mtx")

        folder = tmp / "filtered_feature_bc_matrix"
        shutil.copytree(CYTASSIST / "filtered_feature_bc_matrix", folder,
                        copy_function=shutil.copyfile)
        named = edit(folder)
        return Action(lambda: read_10x_mtx(folder), named)

    return build


def _truncate_gz(name: str, keep: float = 0.5) -> Callable[[Path], Path]:
    def edit(folder: Path) -> Path:
        p = folder / name
        data = p.read_bytes()
        p.write_bytes(data[: int(len(data) * keep)])
        return p

    return edit


def _mtx_bad_entry(folder: Path) -> Path:
    p = folder / "matrix.mtx.gz"
    with gzip.open(p, "rt") as fh:
        lines = fh.read().splitlines()
    head = next(i for i, line in enumerate(lines) if not line.startswith("%"))
    n_feat = int(lines[head].split()[0])
    i, j, v = lines[head + 5].split()
    lines[head + 5] = f"{n_feat + 7} {j} {v}"
    with gzip.open(p, "wt") as fh:
        fh.write("\n".join(lines) + "\n")
    return p


def _mtx_stray_byte_at_end(folder: Path) -> Path:
    """The last entry's newline replaced by a stray byte (scipy 1.17's Matrix Market reader,
    the one scanpy.read_10x_mtx calls, crashes the process on this)."""
    p = folder / "matrix.mtx.gz"
    with gzip.open(p, "rb") as fh:
        data = fh.read().rstrip(b"\n")
    with gzip.open(p, "wb") as fh:
        fh.write(data + b"\x02")
    return p


def _features_short(folder: Path) -> Path:
    p = folder / "features.tsv.gz"
    with gzip.open(p, "rt") as fh:
        lines = fh.read().splitlines()
    with gzip.open(p, "wt") as fh:
        fh.write("\n".join(lines[:-20]) + "\n")
    return folder


# ---------------------------------------------------------------------------------------------
# legacy ST and h5ad


def _legacy(edit_spots=None, edit_counts=None) -> Callable[[Path], Action]:
    """her2st C2 (real counts and spots), one of the two files damaged."""

    def build(tmp: Path) -> Action:
        read_legacy_st = _io("legacy_st", "read_legacy_st")

        spots, counts = tmp / "C2_selection.tsv", tmp / "C2.tsv.gz"
        shutil.copyfile(HER2ST / "spots" / "C2_selection.tsv", spots)
        shutil.copyfile(HER2ST / "counts" / "C2.tsv.gz", counts)
        named = spots
        if edit_spots is not None:
            lines = spots.read_text().splitlines()
            spots.write_text("\n".join(edit_spots(lines)) + "\n")
        if edit_counts is not None:
            named = counts
            edit_counts(counts)
        return Action(lambda: read_legacy_st(counts, spots), named,
                      check=lambda ad: ad.n_obs > 100)

    return build


def _tsv_field(lines: list[str], row: int, column: str, value: str) -> list[str]:
    header = lines[0].split("\t")
    parts = lines[row].split("\t")
    parts[header.index(column)] = value
    return [*lines[:row], "\t".join(parts), *lines[row + 1:]]


def _counts_text_value(path: Path) -> None:
    with gzip.open(path, "rt") as fh:
        lines = fh.read().split("\n", 6)
    parts = lines[3].split("\t")
    parts[5] = "twelve"
    lines[3] = "\t".join(parts)
    with gzip.open(path, "wt") as fh:
        fh.write("\n".join(lines))


def _counts_truncated(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])


def _h5ad(edit: Callable, *, expect_check=None) -> Callable[[Path], Action]:
    """The C2 section written as h5ad by the package, then edited."""

    def build(tmp: Path) -> Action:
        read_h5ad = _io("h5ad", "read_h5ad")
        read_her2st = _io("legacy_st", "read_her2st")

        adata = read_her2st(HER2ST, "C2", images=False)[:80, :50].copy()
        path = tmp / "c2.h5ad"
        adata = edit(adata, tmp) or adata
        adata.write_h5ad(path)
        return Action(lambda: read_h5ad(path), path, check=expect_check)

    return build


def _string_x(adata, tmp):
    import anndata as ad

    x = adata.X.toarray().astype(int).astype(str).astype(object)
    out = ad.AnnData(X=x, obs=adata.obs, var=adata.var, obsm=dict(adata.obsm))
    out.uns = dict(adata.uns)
    return out


def _mpp(value):
    def edit(adata, tmp):
        adata.uns["napari_hinge"] = {**adata.uns["napari_hinge"], "microns_per_pixel": value}

    return edit


def _xy_text(adata, tmp):
    xy = adata.obsm["spatial"].astype(str)
    xy[3, 0] = "left"
    adata.obsm["spatial"] = xy


def _relative_slide(adata, tmp):
    """A slide_path stored relative (older files): it must resolve from the h5ad's folder."""
    (tmp / "img").mkdir()
    shutil.copyfile(HER2ST / "images" / "C2_HE.jpg", tmp / "img" / "C2_HE.jpg")
    adata.uns["napari_hinge"] = {**adata.uns["napari_hinge"], "slide_path": "img/C2_HE.jpg"}


def _slide_resolved(adata) -> bool:
    p = Path(adata.uns["napari_hinge"]["slide_path"])
    return p.is_absolute() and p.is_file()


# ---------------------------------------------------------------------------------------------
# slides


def _slide_copy(name: str, edit: Callable[[bytes], bytes]) -> Callable[[Path], Action]:
    def build(tmp: Path) -> Action:
        from napari_hinge.io.slides import open_slide

        path = tmp / name
        path.write_bytes(edit((WSI / name).read_bytes()))
        return Action(lambda: open_slide(path).thumbnail(64).mean(), path)

    return build


def _patch(old: bytes, new: bytes) -> Callable[[bytes], bytes]:
    def edit(data: bytes) -> bytes:
        assert len(old) == len(new) and old in data, old
        return data.replace(old, new, 1)

    return edit


def _flat_tiff_edited_in_place(tmp: Path) -> Action:
    """A flat tiled TIFF (real pixels, > 4096 px: gets a cached pyramid), opened, then edited in
    the middle with the same size; the reopened coarse level must show the edit."""
    import tifffile

    from napari_hinge.io.slides import open_slide

    with _open_c2_jpeg() as img:
        base = np.asarray(img.convert("RGB").crop((0, 2000, 4352, 2512)))
    path = tmp / "flat.tif"
    tifffile.imwrite(path, base, tile=(256, 256), photometric="rgb")
    open_slide(path).close()  # builds and caches the pyramid
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        k = len(page.dataoffsets) // 2 + 3  # a tile in the middle of the file
        offset, count = page.dataoffsets[k], page.databytecounts[k]
    with open(path, "r+b") as fh:  # same size, new pixels
        fh.seek(offset)
        fh.write(b"\xff" * count)

    def reopen():
        slide = open_slide(path)
        return slide.levels[1].compute(), slide.levels[0].compute()

    def fresh(result) -> bool:
        coarse, full = result
        from napari_hinge.io.slides import _halve

        return np.array_equal(coarse, _halve(full))

    return Action(reopen, path, check=fresh)


def _jpeg_huge_header(tmp: Path) -> Action:
    """A real JPEG whose SOF header claims 60000 x 60000 px (10 GB decoded)."""

    from napari_hinge.io.slides import open_slide

    src = tmp / "small.jpg"
    with _open_c2_jpeg() as img:
        img.convert("RGB").crop((0, 0, 256, 256)).save(src, quality=80)
    data = bytearray(src.read_bytes())
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = (60000).to_bytes(2, "big") * 2
    path = tmp / "huge.jpg"
    path.write_bytes(bytes(data))
    return Action(lambda: open_slide(path), path)


def _tiff_huge_header(tmp: Path) -> Action:
    """A real tiled TIFF whose ImageWidth/ImageLength tags claim 2^31 px per side."""
    import tifffile

    from napari_hinge.io.slides import open_slide

    path = tmp / "huge.tif"
    with Image_open_crop(512) as crop:
        tifffile.imwrite(path, crop, tile=(256, 256), photometric="rgb")
    with tifffile.TiffFile(path) as tif:
        tags = tif.pages[0].tags
        spots = [tags["ImageWidth"].valueoffset, tags["ImageLength"].valueoffset]
        dtypes = [tags["ImageWidth"].dtype, tags["ImageLength"].dtype]
    with open(path, "r+b") as fh:
        for off, dt in zip(spots, dtypes, strict=True):
            fh.seek(off)
            fh.write((2**31).to_bytes(4, "little") if dt == 4 else (65535).to_bytes(2, "little"))
    return Action(lambda: open_slide(path), path)


class Image_open_crop:  # a tiny context manager used like a function
    def __init__(self, side: int) -> None:
        self.side = side

    def __enter__(self) -> np.ndarray:

        with _open_c2_jpeg() as img:
            return np.asarray(img.convert("RGB").crop((3000, 3000, 3000 + self.side,
                                                       3000 + self.side)))

    def __exit__(self, *exc) -> None:
        return None


# ---------------------------------------------------------------------------------------------
# crafted pickles


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _crafted_checkpoint(tmp: Path) -> Action:
    import torch

    from napari_hinge.training import load_checkpoint

    marker, path = tmp / "CODE_RAN", tmp / "last.pt"
    torch.save({"model": _Payload(marker)}, path)
    return Action(lambda: load_checkpoint(path), path, marker=marker)


def _crafted_weights(tmp: Path) -> Action:
    import torch

    from napari_hinge.scfm import BUILTIN_DIR, load_backbone

    marker = tmp / "CODE_RAN"
    folder = tmp / "backbone"
    shutil.copytree(BUILTIN_DIR, folder, copy_function=shutil.copyfile)
    path = folder / "model.safetensors"
    path.unlink()
    torch.save({"w": _Payload(marker)}, path)
    return Action(lambda: load_backbone(folder), path, marker=marker)


# ---------------------------------------------------------------------------------------------
# full disk and kills: writers must leave the old file or the new one, and no temporary files


def _disk_full_during(target: str, write_part: bool = True):
    """Patch ``module:attr`` (a write function) to write a few bytes, then fail with ENOSPC."""
    module_name, attr = target.rsplit(":", 1)

    def install():
        import importlib

        owner = importlib.import_module(module_name)
        parts = attr.split(".")
        for p in parts[:-1]:
            owner = getattr(owner, p)
        real = getattr(owner, parts[-1])

        def full(*args, **kwargs):
            dest = next((a for a in args if isinstance(a, (str, os.PathLike))),
                        kwargs.get("filename") or kwargs.get("filepath"))
            if write_part and dest is not None and not Path(dest).is_dir():
                Path(dest).write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")

        setattr(owner, parts[-1], full)
        return lambda: setattr(owner, parts[-1], real)

    return install


def _no_tmp(folder: Path) -> bool:
    return not [p for p in folder.rglob("*") if p.name.endswith(".tmp") or ".tmp-" in p.name
                or p.name.startswith(".") and p.name != ".napari-hinge"]


def _writer_case(make_old: Callable[[Path], Path], write: Callable[[Path], object],
                 patch) -> Callable[[Path], Action]:
    def build(tmp: Path) -> Action:
        target = make_old(tmp)
        before = _snapshot(target)

        def run():
            undo = patch()
            try:
                return write(target)
            finally:
                undo()

        return Action(run, target,
                      after=lambda: _snapshot(target) == before and _no_tmp(target.parent))

    return build


def _snapshot(path: Path) -> dict:
    if path.is_dir():
        return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*"))
                if p.is_file()}
    return {"": path.read_bytes()} if path.exists() else {}


def _old_h5ad(tmp: Path) -> Path:
    read_her2st = _io("legacy_st", "read_her2st")

    path = tmp / "out" / "spots.h5ad"
    path.parent.mkdir()
    read_her2st(HER2ST, "C2", images=False)[:20, :20].copy().write_h5ad(path)
    return path


def _save_spots(path: Path):
    from napari_hinge._writer import write_spots_h5ad
    read_her2st = _io("legacy_st", "read_her2st")

    adata = read_her2st(HER2ST, "C2", images=False)[:30, :20].copy()
    return write_spots_h5ad(str(path), None, {"metadata": {"adata": adata}})


def _old_map(tmp: Path) -> Path:
    from napari_hinge._writer import write_image_ome_tiff

    (tmp / "out").mkdir()
    return Path(write_image_ome_tiff(str(tmp / "out" / "map.ome.tif"),
                                     np.ones((8, 8), np.float32), {"scale": (2.0, 2.0)})[0])


def _save_map(path: Path):
    from napari_hinge._writer import write_image_ome_tiff

    return write_image_ome_tiff(str(path), np.zeros((9, 9), np.float32), {"scale": (3.0, 3.0)})


def _old_checkpoint(tmp: Path) -> Path:
    import torch

    from napari_hinge.training import save_checkpoint

    (tmp / "ck").mkdir()
    return save_checkpoint(tmp / "ck" / "last.pt", {"epoch": 1, "w": torch.ones(3)})


def _save_checkpoint(path: Path):
    import torch

    from napari_hinge.training import save_checkpoint

    return save_checkpoint(path, {"epoch": 2, "w": torch.zeros(3)})


def _tiny_central():
    from napari_hinge.c2l.central import CentralConfig, CentralModel
    from napari_hinge.c2l.unet import UNetConfig

    return CentralModel(CentralConfig(unet=UNetConfig(
        stem=4, channels=(8, 16), attention_levels=(), time_dim=16, groups=8), timesteps=10))


def _old_model(tmp: Path) -> Path:
    return _tiny_central().save(tmp / "models" / "central")


def _save_model(path: Path):
    return _tiny_central().save(path)


def _kill_during_model_save(tmp: Path) -> Action:
    """A kill (KeyboardInterrupt) while the new weights are written: the old model must still
    load from the path."""
    import safetensors.torch

    from napari_hinge.c2l.central import CentralModel

    folder = _old_model(tmp)
    real = safetensors.torch.save_file

    def killed(*args, **kwargs):
        real(*args, **kwargs)
        raise KeyboardInterrupt

    def run():
        safetensors.torch.save_file = killed
        try:
            _save_model(folder)
        except KeyboardInterrupt:
            pass
        finally:
            safetensors.torch.save_file = real
        return CentralModel.load(folder)

    return Action(run, folder, check=lambda m: m is not None,
                  after=lambda: _no_tmp(folder.parent))


def _pyramid_disk_full(tmp: Path) -> Action:
    from napari_hinge.io import slides

    path = tmp / "flat.tif"
    import tifffile

    with Image_open_crop(512) as crop:
        tifffile.imwrite(path, np.tile(crop, (1, 9, 1)), tile=(256, 256), photometric="rgb")
    cache = Path(os.environ.get("NAPARI_HINGE_CACHE", tmp / "cache")) / "pyramids"

    def run():
        real = slides._build_pyramid

        def full(folder, *args, **kwargs):
            Path(folder).mkdir(parents=True, exist_ok=True)
            (Path(folder) / "0").write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")

        slides._build_pyramid = full
        try:
            return slides.open_slide(path)
        finally:
            slides._build_pyramid = real

    return Action(run, cache, after=lambda: not cache.exists() or _no_tmp(cache))


# ---------------------------------------------------------------------------------------------
# round trips


def _maps_round_trip(tmp: Path) -> Action:
    from types import SimpleNamespace

    from napari_hinge._reader import get_slide_reader
    from napari_hinge.hinge.slide_predict import write_ome_tiff

    raster = np.random.default_rng(0).random((3, 6, 5), dtype=np.float32)
    pred = SimpleNamespace(genes=["GRB7", "ERBB2", "CD74"], raster=lambda which="mean": raster,
                           placement={"scale": (800.0, 800.0), "translate": (400.0, 400.0)})
    path = write_ome_tiff(pred, tmp / "maps.ome.tif")

    def run():
        reader = get_slide_reader(str(path))
        return reader(str(path)) if reader else None

    def right(layers) -> bool:
        if not layers:
            return False
        data, kw, _ = layers[0]
        return (np.array_equal(data, raster) and kw.get("scale") == (800.0, 800.0)
                and kw.get("translate") == (400.0, 400.0))

    return Action(run, path, check=right)


def _h5ad_from_other_folder(tmp: Path) -> Action:
    """spatial-info --output with a relative slide path, reopened from another folder."""
    from napari_hinge.cli import main
    read_h5ad = _io("h5ad", "read_h5ad")

    work = tmp / "work"
    shutil.copytree(HER2ST, work / "her2st", copy_function=shutil.copyfile,
                    ignore=shutil.ignore_patterns("[ABDEFGH]*"))
    cwd = os.getcwd()
    try:
        os.chdir(work)
        main(["spatial-info", "her2st", "--section", "C2", "-o", "c2.h5ad"])
    finally:
        os.chdir(cwd)
    path = work / "c2.h5ad"
    return Action(lambda: read_h5ad(path), path, check=_slide_resolved)


# ---------------------------------------------------------------------------------------------


def cases() -> list[Case]:
    """The corpus: one case per kind of bad input or fault."""
    ok_mpp = lambda ad: ad.uns["napari_hinge"]["microns_per_pixel"] > 0  # noqa: E731
    return [
        Case("crafted last.pt (pickle runs code)", "code", _crafted_checkpoint),
        Case("crafted backbone model.safetensors", "code", _crafted_weights),
        Case("10x h5: CSR index beyond the gene count", "spatial",
             _edit_h5(_indices_out_of_range)),
        Case("10x h5: indptr decreasing", "spatial", _edit_h5(_indptr_decreasing)),
        Case("10x h5: indptr shorter than barcodes + 1", "spatial", _edit_h5(_indptr_short)),
        Case("10x h5: data shorter than indices", "spatial", _edit_h5(_data_short)),
        Case("Matrix Market: entry beyond the header's size", "spatial", _mtx(_mtx_bad_entry)),
        Case("Matrix Market: matrix.mtx.gz truncated", "spatial",
             _mtx(_truncate_gz("matrix.mtx.gz"))),
        Case("Matrix Market: a stray byte after the last entry", "spatial",
             _mtx(_mtx_stray_byte_at_end)),
        Case("barcodes.tsv.gz truncated", "spatial", _mtx(_truncate_gz("barcodes.tsv.gz", 0.3))),
        Case("features.tsv.gz 20 rows short", "spatial", _mtx(_features_short)),
        Case("scalefactors: spot diameter a string", "spatial",
             _scalefactors("spot_diameter_fullres", "89.4")),
        Case("scalefactors: spot diameter 0", "spatial", _scalefactors("spot_diameter_fullres", 0)),
        Case("scalefactors: hires scale factor negative", "spatial",
             _scalefactors("tissue_hires_scalef", -0.15)),
        Case("scalefactors: lowres scale factor a list", "spatial",
             _scalefactors("tissue_lowres_scalef", [0.04])),
        Case("scalefactors: microns_per_pixel = -2", "spatial",
             _scalefactors("microns_per_pixel", -2)),
        Case("scalefactors: microns_per_pixel = 1e30", "spatial",
             _scalefactors("microns_per_pixel", 1e30)),
        Case("scalefactors: a JSON list", "spatial", _scalefactors("*", [1, 2])),
        Case("positions: pixel coordinate not a number", "spatial",
             _positions(lambda ls: _set_field(ls, 40, 4, "abc"))),
        Case("positions: in_tissue not a number", "spatial",
             _positions(lambda ls: _set_field(ls, 7, 1, "yes"))),
        Case("positions: a column missing", "spatial",
             _positions(lambda ls: [",".join(line.split(",")[:5]) for line in ls])),
        Case("legacy ST spots: x not a number", "spatial",
             _legacy(edit_spots=lambda ls: _tsv_field(ls, 5, "x", "ten"))),
        Case("legacy ST spots: pixel_y not a number", "spatial",
             _legacy(edit_spots=lambda ls: _tsv_field(ls, 9, "pixel_y", "1e3px"))),
        Case("legacy ST spots: pixel column missing", "spatial",
             _legacy(edit_spots=lambda ls: [line.rsplit("\t", 3)[0] for line in ls])),
        Case("legacy ST spots: 3 spots removed (counts without position)", "spatial",
             _legacy(edit_spots=lambda ls: ls[:1] + ls[4:]), expect="warning"),
        Case("legacy ST counts: a count is text", "spatial",
             _legacy(edit_counts=_counts_text_value)),
        Case("legacy ST counts: .tsv.gz truncated", "spatial",
             _legacy(edit_counts=_counts_truncated)),
        Case("h5ad: X of strings", "spatial", _h5ad(_string_x)),
        Case("h5ad: microns_per_pixel = -2", "spatial", _h5ad(_mpp(-2.0))),
        Case("h5ad: microns_per_pixel = 1e30", "spatial", _h5ad(_mpp(1e30))),
        Case("h5ad: a coordinate is text", "spatial", _h5ad(_xy_text)),
        Case("h5ad: relative slide_path", "round-trip",
             _h5ad(_relative_slide, expect_check=_slide_resolved), expect="ok"),
        Case("pyramidal TIFF cut at 1 KB", "slide",
             _slide_copy("her2st_C2_HE_pyramid.tif", lambda d: d[:1024])),
        Case("pyramidal TIFF cut at 60%", "slide",
             _slide_copy("her2st_C2_HE_pyramid.tif", lambda d: d[: int(len(d) * 0.6)])),
        Case("OME-TIFF pyramid cut at 40%", "slide",
             _slide_copy("her2st_C2_HE_pyramid.ome.tif", lambda d: d[: int(len(d) * 0.4)])),
        Case("SVS: Aperio MPP = 1e30", "slide",
             _slide_copy("CMU-1-Small-Region.svs", _patch(b"MPP = 0.4990", b"MPP = 1.0e30"))),
        Case("OME-TIFF: PhysicalSizeX = -2", "slide",
             _slide_copy("her2st_C2_HE_pyramid.ome.tif",
                         _patch(b'PhysicalSizeX="0.69"', b'PhysicalSizeX="-2.0"'))),
        Case("flat TIFF edited in the middle (cached pyramid)", "slide",
             _flat_tiff_edited_in_place, expect="ok"),
        Case("JPEG header claims 60000 x 60000 px", "slide", _jpeg_huge_header),
        Case("tiled TIFF header claims 2^31 x 2^31 px", "slide", _tiff_huge_header),
        Case("full disk: spots layer saved as .h5ad", "disk",
             _writer_case(_old_h5ad, _save_spots,
                          _disk_full_during("anndata:AnnData.write_h5ad"))),
        Case("full disk: map layer saved as OME-TIFF", "disk",
             _writer_case(_old_map, _save_map, _disk_full_during("tifffile:imwrite"))),
        Case("full disk: checkpoint", "disk",
             _writer_case(_old_checkpoint, _save_checkpoint, _disk_full_during("torch:save"))),
        Case("full disk: C2L model folder", "disk",
             _writer_case(_old_model, _save_model,
                          _disk_full_during("safetensors.torch:save_file"))),
        Case("full disk: pyramid cache", "disk", _pyramid_disk_full),
        Case("kill while a model folder is replaced", "disk", _kill_during_model_save,
             expect="ok"),
        Case("predict-slide maps.ome.tif in the plugin's reader", "round-trip",
             _maps_round_trip, expect="ok"),
        Case("spatial-info h5ad reopened from another folder", "round-trip",
             _h5ad_from_other_folder, expect="ok"),
        Case("scalefactors: plausible microns_per_pixel kept", "round-trip",
             _scalefactors_ok(ok_mpp), expect="ok"),
    ]


def _scalefactors_ok(check):
    def build(tmp: Path) -> Action:
        action = _scalefactors("microns_per_pixel", 0.5)(tmp)
        action.check = check
        return action

    return build


# ---------------------------------------------------------------------------------------------
# mutation fuzzing of the text parsers (the property test and benchmarks/bad_inputs.py)

#: Tokens that break parsers: empty, signs, exponents, NaN/inf, separators, quotes, bad bytes.
TOKENS = (b"", b"-", b"-1", b"0", b"1e400", b"nan", b"inf", b"-inf", b"abc", b"1,5", b"\t",
          b",", b"\n", b'"', b"\xff\xfe", b"\x00", b"9" * 40, b"x", b"1x1", b" ", b"\r\n")
OPS = ("flip", "delete", "insert", "token", "dup_line", "drop_line", "swap_lines", "truncate")


def mutate(data: bytes, ops: list[tuple[str, float, float, int]]) -> bytes:
    """Apply ``ops`` (kind, position in [0, 1), length/second position in [0, 1), token index)
    to ``data``: deterministic, so hypothesis can shrink a failing list of operations."""
    buf = bytearray(data)
    for kind, a, b, t in ops:
        n = len(buf)
        i = int(a * n) if n else 0
        token = TOKENS[t % len(TOKENS)]
        if kind == "flip" and n:
            buf[min(i, n - 1)] ^= 1 << (t % 8)
        elif kind == "delete":
            del buf[i:i + 1 + int(b * 64)]
        elif kind == "insert":
            buf[i:i] = token
        elif kind == "token":  # replace one field (between separators) by a token
            j = i
            while j < n and buf[j:j + 1] not in (b"\t", b",", b"\n"):
                j += 1
            k = i
            while k > 0 and buf[k - 1:k] not in (b"\t", b",", b"\n"):
                k -= 1
            buf[k:j] = token
        elif kind in ("dup_line", "drop_line", "swap_lines"):
            lines = bytes(buf).split(b"\n")
            p, q = int(a * len(lines)) % len(lines), int(b * len(lines)) % len(lines)
            if kind == "dup_line":
                lines.insert(p, lines[p])
            elif kind == "drop_line":
                del lines[p]
            else:
                lines[p], lines[q] = lines[q], lines[p]
            buf = bytearray(b"\n".join(lines))
        elif kind == "truncate":
            del buf[i:]
    return bytes(buf)


def _seed_spots() -> bytes:
    return b"\n".join((HER2ST / "spots" / "C2_selection.tsv").read_bytes().split(b"\n")[:60])


def _seed_positions() -> bytes:
    src = next((TINY_VISIUM / "spatial").glob("tissue_positions*.csv"))
    return b"\n".join(src.read_bytes().split(b"\n")[:60])


def _seed_counts() -> bytes:
    import pandas as pd

    tab = pd.read_csv(HER2ST / "counts" / "C2.tsv.gz", sep="\t", index_col=0, nrows=30)
    return tab.iloc[:, :40].to_csv(sep="\t").encode()


def _parse_spots(path: Path):
    _read_st_spots = _io("legacy_st", "_read_st_spots")

    return _read_st_spots(path)


def _parse_positions(path: Path):
    _read_positions = _io("spaceranger", "_read_positions")

    return _read_positions(path.parent)


def _parse_counts(path: Path):
    _read_st_counts = _io("legacy_st", "_read_st_counts")

    return _read_st_counts(path)


@functools.cache
def _mtx_subset():
    """The first 30 barcodes x 40 features of the real CytAssist matrix (the mtx is features x
    barcodes), with its feature and barcode rows."""
    import pandas as pd
    import scipy.io
    import scipy.sparse as sp

    folder = CYTASSIST / "filtered_feature_bc_matrix"
    full = sp.csc_matrix(scipy.io.mmread(folder / "matrix.mtx.gz"))
    feats = pd.read_csv(folder / "features.tsv.gz", sep="\t", header=None).iloc[:40]
    bcs = pd.read_csv(folder / "barcodes.tsv.gz", header=None).iloc[:30]
    return sp.coo_matrix(full[:40, :30]), feats, bcs


def _seed_mtx() -> bytes:
    import io

    import scipy.io

    buf = io.BytesIO()
    scipy.io.mmwrite(buf, _mtx_subset()[0].astype(int), field="integer")
    return buf.getvalue()


def _parse_mtx(path: Path):
    folder = path.parent
    if not (folder / "barcodes.tsv").exists():  # the two tables the matrix indexes, unmutated
        _, feats, bcs = _mtx_subset()
        feats.to_csv(folder / "features.tsv", sep="\t", header=False, index=False)
        bcs.to_csv(folder / "barcodes.tsv", sep="\t", header=False, index=False)
    return _io("spaceranger", "read_10x_mtx")(folder)


#: name -> (seed bytes from the real data, file name, parser(path))
PARSERS = {
    "legacy-ST spot file": (_seed_spots, "C2_selection.tsv", _parse_spots),
    "Space Ranger positions": (_seed_positions, "tissue_positions_list.csv", _parse_positions),
    "legacy-ST count table": (_seed_counts, "C2.tsv", _parse_counts),
    "10x Matrix Market": (_seed_mtx, "matrix.mtx", _parse_mtx),
}


def own_errors() -> tuple[type[BaseException], ...]:
    """What a parser may raise on bad input: the project's error, or a missing file."""
    return (_input_error(), FileNotFoundError)


def _input_error() -> type[Exception]:
    try:
        from napari_hinge.errors import InputError
    except ImportError:  # a checkout from before napari_hinge.errors (benchmark --src)
        from napari_hinge.io.spatial import SpatialDataError as InputError
    return InputError


def parse_mutated(parser: str, data: bytes, folder: Path):
    """Write ``data`` as the parser's file in ``folder`` and parse it (raises what it raises)."""
    _, name, parse = PARSERS[parser]
    path = folder / name
    path.write_bytes(data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return parse(path)
