"""npe2 readers. ``get_*_reader`` answer quickly and never raise: they return
``None`` for what they do not read. The returned functions read for real and
raise clear errors (napari shows them) for files that claim a format but are broken."""

from __future__ import annotations

import sys
from pathlib import Path

# Files that are only ever slides (the spatial reader's "*" pattern also sees them).
SLIDE_ONLY_SUFFIXES = (".svs", ".ndpi", ".tif", ".tiff", ".btf", ".jpg", ".jpeg", ".png")


def in_microns(layers: list) -> list:
    """Return ``layers``; when one is in µm, switch the current viewer's scale bar on (napari
    takes its unit from the layers' ``units``, µm here).

    npe2 readers are given no viewer, so this asks napari for the current one, and only when
    napari is already running (calling a reader from a script imports no napari).
    """
    napari = sys.modules.get("napari")
    if napari is not None and any(kw.get("units") for _, kw, _ in layers):
        viewer = napari.current_viewer()
        if viewer is not None:
            viewer.scale_bar.visible = True
    return layers


def select_slide_after_open(layers: list) -> list:
    """Return ``layers``; once napari has added them, select the visible slide among them.

    napari selects the layer it adds last, which is a spots layer here (spots are drawn over
    their slide), so the layer controls would show the spots' and the slide's contrast would
    be one click away. npe2 readers are given no viewer: this asks napari for the current one
    (only when napari is already running) and records the layers it adds until Qt is idle.
    """
    napari = sys.modules.get("napari")
    if napari is None or not any(kind == "image" and kw.get("visible", True)
                                 for _, kw, kind in layers):
        return layers
    viewer = napari.current_viewer()
    if viewer is None:
        return layers
    from qtpy.QtCore import QTimer

    added = []

    def record(event) -> None:
        added.append(event.value)

    def select() -> None:
        viewer.layers.events.inserted.disconnect(record)
        slides = [layer for layer in added if layer._type_string == "image"
                  and layer.visible and layer in viewer.layers]
        if slides:
            viewer.layers.selection.active = slides[0]

    viewer.layers.events.inserted.connect(record)
    QTimer.singleShot(0, select)  # after napari's add loop, which selects each layer it adds
    return layers


def _single_path(path) -> Path | None:
    if isinstance(path, (list, tuple)):
        if len(path) != 1:
            return None
        path = path[0]
    return Path(path)


def get_slide_reader(path):
    from napari_hinge.io.slides import is_slide_path

    p = _single_path(path)
    if p is None or not p.is_file() or not is_slide_path(p):
        return None
    return read_slide


def read_slide(path):
    from napari_hinge._layers import map_layer_data, slide_layer_data
    from napari_hinge.io.maps import is_map_tiff, read_map
    from napari_hinge.io.slides import open_slide

    p = _single_path(path)
    if is_map_tiff(p):  # a map the package wrote (float values, not colours)
        return in_microns([map_layer_data(read_map(p))])
    return in_microns([slide_layer_data(open_slide(p))])


def map_zarr_images(path: Path) -> list[Path]:
    """The float OME-Zarr images a folder holds: itself (``maps.ome.zarr``) or the
    ``images/*`` maps of a SpatialData-layout store."""
    from napari_hinge.io.maps import is_map_zarr

    if is_map_zarr(path):
        return [path]
    images = path / "images"
    if images.is_dir():
        return sorted(p for p in images.iterdir() if is_map_zarr(p))
    return []


def read_map_layers(path):
    from napari_hinge._layers import map_layer_data
    from napari_hinge.io.maps import read_map

    return in_microns([map_layer_data(read_map(p)) for p in map_zarr_images(_single_path(path))])


def get_spatial_reader(path):
    p = _single_path(path)
    if p is None or not p.exists():
        return None
    if p.is_dir() and p.name.lower().endswith(".zarr"):
        return read_map_layers if map_zarr_images(p) else None
    if p.is_file() and p.name.lower().endswith(SLIDE_ONLY_SUFFIXES):
        return None  # answer before importing anndata: slides are the other reader's
    from napari_hinge.io.spatial import detect_spatial_format

    try:
        fmt = detect_spatial_format(p)
    except OSError:
        return None
    return read_spatial_layers if fmt else None


def read_spatial_layers(path):
    from napari_hinge._layers import spatial_layer_data
    from napari_hinge.io.legacy_st import list_her2st_sections, read_her2st
    from napari_hinge.io.spatial import read_spatial

    p = _single_path(path)
    sections = list_her2st_sections(p) if p.is_dir() else []
    if len(sections) <= 1:
        return select_slide_after_open(in_microns(spatial_layer_data(read_spatial(p))))
    # A folder of legacy-ST sections: each section with an H&E under its spots (all in one
    # pixel frame would overlap, so only the first is visible); expression-only sections
    # have no image to sit on and are skipped before their counts are read (open their
    # count table to see one).
    shown = list_her2st_sections(p, with_image=True)
    if not shown:
        raise ValueError(f"{p}: none of its {len(sections)} sections has an H&E image; "
                         "open one section's count table instead")
    layers = []
    # Last section first: the visible first section lands on top of the layer list.
    for section in reversed(shown):
        visible = section == shown[0]
        for data, kwargs, kind in spatial_layer_data(read_her2st(p, section), name=section):
            layers.append((data, {**kwargs, "visible": visible}, kind))
    return select_slide_after_open(in_microns(layers))
