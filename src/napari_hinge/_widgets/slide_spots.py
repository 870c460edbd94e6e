"""The "Slide & spots" dock widget: pixel size, searchable genes, colour spots by a gene.

Thin by design: the numbers come from :mod:`napari_hinge._layers`; this file only wires
Qt controls to napari layers. Colouring a few thousand spots takes milliseconds, so it
runs on the GUI thread.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from qtpy.QtWidgets import (
    QComboBox,
    QDoubleSpinBox,
    QFormLayout,
    QLabel,
    QLineEdit,
    QListWidget,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from napari_hinge._layers import GENE_TRANSFORMS, gene_values, robust_limits
from napari_hinge._widgets._viewer import TabbedDock, title_colorbar

if TYPE_CHECKING:
    import napari

COLORMAPS = ("magma", "viridis", "inferno", "turbo", "plasma", "gray")
MAX_LISTED = 2000  # a longer list only slows typing; the search narrows it


def spot_layers(viewer) -> list:
    """Points layers that carry spatial AnnData (made by this plugin's readers)."""
    return [
        layer for layer in viewer.layers
        if layer._type_string == "points" and "adata" in layer.metadata
    ]


def slide_layers(viewer) -> list:
    """Image layers of slides opened by this plugin (they know their file)."""
    return [layer for layer in viewer.layers
            if layer._type_string == "image" and layer.metadata.get("slide_path")]


def refill_combo(box, names: list[str], visible: list[str] | None = None) -> None:
    """Replace a combo box's items, without firing change signals for the intermediate
    states. The current item stays while it exists and is visible or was chosen (by the
    user or by code, not by this function); otherwise the first of ``visible`` is taken: a
    folder of sections opens with all but one hidden, and napari adds the hidden ones first.
    """
    if not box.property("tracks_choice"):
        box.setProperty("tracks_choice", True)
        box.currentTextChanged.connect(lambda text: box.setProperty("chosen", text))
    current = box.currentText()
    visible = names if visible is None else visible
    keep = current if current in visible or current == box.property("chosen") else None
    box.blockSignals(True)
    box.clear()
    box.addItems(names)
    for choice in (keep, *visible[:1], current):
        if choice in names:
            box.setCurrentText(choice)
            break
    box.blockSignals(False)


def layer_names(layers: list) -> tuple[list[str], list[str]]:
    """The names of ``layers`` and of the visible ones (for :func:`refill_combo`)."""
    return [layer.name for layer in layers], [layer.name for layer in layers if layer.visible]


def color_spots_by_gene(layer, gene: str, *, transform: str = GENE_TRANSFORMS[0],
                        colormap: str = "magma") -> tuple[float, float]:
    """Colour a spots layer by one gene with a continuous colormap and show its colorbar."""
    values = gene_values(layer.metadata["adata"], gene, transform)
    features = layer.features.copy()
    features[gene] = values
    layer.features = features
    limits = robust_limits(values)
    layer.face_colormap = colormap
    layer.face_color = gene
    layer.face_contrast_limits = limits
    layer.face_colorbar.visible = True
    layer.metadata["colored_by"] = gene
    layer.metadata["colored_as"] = transform
    layer.refresh()
    return limits


class SlideSpotsWidget(TabbedDock, QWidget):
    tab_title = "Slide & spots"

    def __init__(self, napari_viewer: napari.Viewer) -> None:
        super().__init__()
        self.viewer = napari_viewer

        self.layer_box = QComboBox()
        self.info = QLabel("Open a slide with spots (File > Open, or a sample).")
        self.info.setWordWrap(True)
        # 0 stands for "not known" (a real slide's pixel size is never 0)
        self.mpp_box = QDoubleSpinBox(decimals=4, minimum=0.0, maximum=100.0, singleStep=0.05)
        self.mpp_box.setSpecialValueText("unknown")
        self.mpp_box.setSuffix(" µm/px")
        self.mpp_box.setToolTip("micrometres per level-0 pixel of the slide; 'unknown' when the "
                                "file does not record it (JPEG/PNG): type it, then Set")
        self.mpp_button = QPushButton("Set pixel size")
        self.mpp_button.setToolTip("apply this pixel size to the spots and the slide under them "
                                   "(layers are then drawn in µm)")
        self.layer_box.setToolTip("the spots layer to describe and colour")
        self.search = QLineEdit(placeholderText="search genes…")
        self.gene_list = QListWidget()
        self.search.setToolTip("type part of a gene name to narrow the list")
        self.gene_list.setToolTip("click a gene to colour the spots by it")
        self.transform_box = QComboBox()
        self.transform_box.addItems(GENE_TRANSFORMS)
        self.transform_box.setToolTip("log1p(counts per 10k): library-size normalised, the "
                                      "scale HINGE predicts on; raw counts: as measured")
        self.cmap_box = QComboBox()
        self.cmap_box.addItems(COLORMAPS)
        self.cmap_box.setToolTip("colormap of the spots (colour range: 1st-99th percentile)")
        self.status = QLabel("")
        self.status.setWordWrap(True)  # "<layer>: <gene> (<values>), colour range …" is long

        form = QFormLayout()
        form.addRow("Spots", self.layer_box)
        # the button on a row of its own: beside it the box showed "1.3748 µ" in a narrow dock
        form.addRow("Pixel size", self.mpp_box)
        form.addRow("", self.mpp_button)
        form.addRow("Values", self.transform_box)
        form.addRow("Colormap", self.cmap_box)
        layout = QVBoxLayout(self)
        layout.addWidget(self.info)
        layout.addLayout(form)
        layout.addWidget(self.search)
        layout.addWidget(self.gene_list)
        layout.addWidget(self.status)

        self.layer_box.currentIndexChanged.connect(self._on_layer)
        self.search.textChanged.connect(self._fill_genes)
        self.gene_list.currentTextChanged.connect(self._on_gene)
        self.transform_box.currentTextChanged.connect(lambda _: self._recolor())
        self.cmap_box.currentTextChanged.connect(lambda _: self._recolor())
        self.mpp_button.clicked.connect(self._apply_mpp)
        self.viewer.layers.events.inserted.connect(self._refresh_layers)
        self.viewer.layers.events.removed.connect(self._refresh_layers)
        self._refresh_layers()

    # -- state -------------------------------------------------------------------------
    @property
    def layer(self):
        name = self.layer_box.currentText()
        return self.viewer.layers[name] if name in self.viewer.layers else None  # noqa: SIM401

    @property
    def slide_layer(self):
        """The slide the pixel size applies to when no spots are open (the selected slide
        layer, else the first)."""
        slides = slide_layers(self.viewer)
        active = self.viewer.layers.selection.active
        return active if active in slides else (slides[0] if slides else None)

    def _refresh_layers(self, event=None) -> None:
        refill_combo(self.layer_box, *layer_names(spot_layers(self.viewer)))
        self._on_layer()

    def _on_layer(self, index: int | None = None) -> None:
        layer = self.layer
        if layer is None:
            self.gene_list.clear()
            self.status.setText("")
            self._show_slide_only()
            return
        self.mpp_button.setEnabled(True)
        adata = layer.metadata["adata"]
        mpp = layer.metadata.get("microns_per_pixel")
        diameter = layer.metadata.get("spot_diameter_px")
        self.mpp_box.setValue(mpp or 0.0)
        if mpp:
            size = f"{mpp:.4g} µm/px"
            spot = f"spot Ø {diameter:.1f} px = {diameter * mpp:.0f} µm" if diameter else ""
        else:
            size = "pixel size unknown: set it below"
            spot = f"spot Ø {diameter:.1f} px" if diameter else ""
        self.info.setText(
            f"{adata.n_obs} spots × {adata.n_vars} genes\n{size}\n{spot}".strip()
        )
        self._fill_genes()

    def _show_slide_only(self) -> None:
        """No spots: show the pixel size of the slide that is open (or that there is none)."""
        slide = self.slide_layer
        self.mpp_button.setEnabled(slide is not None)
        if slide is None:
            self.mpp_box.setValue(0.0)
            self.info.setText("Open a slide with spots (File > Open, or a sample).")
            return
        mpp = slide.metadata.get("microns_per_pixel")
        self.mpp_box.setValue(mpp or 0.0)
        size = f"{mpp:.4g} µm/px" if mpp else "pixel size unknown: set it below"
        self.info.setText(f"{slide.name}: no spots\n{size}")

    def _fill_genes(self, text: str | None = None) -> None:
        layer = self.layer
        self.gene_list.blockSignals(True)
        self.gene_list.clear()
        if layer is not None:
            query = (text if text is not None else self.search.text()).strip().upper()
            genes = layer.metadata["adata"].var_names
            matches = [g for g in genes if query in g.upper()] if query else list(genes)
            self.gene_list.addItems(sorted(matches)[:MAX_LISTED])
            shown = min(len(matches), MAX_LISTED)
            self.status.setText(f"{len(matches)} genes match" + (
                f" (first {shown} listed)" if len(matches) > shown else ""))
        self.gene_list.blockSignals(False)

    # -- actions -----------------------------------------------------------------------
    def select_gene(self, gene: str) -> None:
        """Colour the current spots layer by ``gene`` (also what a click in the list does)."""
        layer = self.layer
        if layer is None:
            raise RuntimeError("no spots layer to colour")
        lo, hi = color_spots_by_gene(
            layer, gene, transform=self.transform_box.currentText(),
            colormap=self.cmap_box.currentText(),
        )
        self.status.setText(f"{layer.name}: {gene} ({self.transform_box.currentText()}), "
                            f"colour range {lo:.3g}–{hi:.3g}")
        title_colorbar(self.viewer, f"{gene}: {self.transform_box.currentText()}")

    def _on_gene(self, gene: str) -> None:
        if gene:
            self.select_gene(gene)

    def _recolor(self) -> None:
        layer = self.layer
        if layer is not None and layer.metadata.get("colored_by"):
            self.select_gene(layer.metadata["colored_by"])

    def _apply_mpp(self) -> None:
        """Set the pixel size of the spots and of the slide they sit on (same pixels), or of
        the slide alone when no spots are open."""
        layer = self.layer if self.layer is not None else self.slide_layer
        mpp = float(self.mpp_box.value())
        if layer is None or mpp <= 0:
            self.status.setText("type a pixel size above 0 first")
            return
        slide_path = layer.metadata.get("slide_path")
        for other in self.viewer.layers:
            if other is layer or (slide_path and other.metadata.get("slide_path") == slide_path):
                other.scale = (mpp, mpp)
                other.units = ("µm", "µm")
                other.metadata["microns_per_pixel"] = mpp
        if "adata" in layer.metadata:
            layer.metadata["adata"].uns.setdefault("napari_hinge", {})["microns_per_pixel"] = mpp
        self._on_layer()
        self.viewer.reset_view()
