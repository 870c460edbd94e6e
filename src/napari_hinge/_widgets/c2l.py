""""Fill sparse regions (C2L-ST)" dock widget.

Pick a slide and its spots, a region (a Shapes layer polygon, or "propose sparse tissue": tissue
farther than N spot spacings from any measured spot), the expression source (neighbouring spots or
the shipped HINGE model), guidance, DDIM steps, strength (1: generate each tile from noise; below
1: edit the real H&E under it toward its expression) and whether the region is sampled as one
seamless canvas (default) or tile by tile (faster, with seams). The job (adapting a local model on
the spots when none is loaded, then generating) runs in a worker through :class:`JobPanel`; the
result is a NEW RGBA Image layer over the region (the slide is never modified) whose metadata holds
the per-tile conditioning expression table. "Use as training pairs" emits
:attr:`C2LWidget.training_pairs` with a :class:`~napari_hinge.c2l.pairs.SyntheticPairs` (tiles,
conditioning expression, genes, positions on the slide); every HINGE Train tab receives it through
:func:`pairs_hub` and trains on it next to the real spots (the tiles are encoded there, exactly as
the slide's spots). The pairs also stay in the layer's metadata (``metadata['c2l_pairs']``);
"Save pairs…" writes them as the ``pairs.npz`` that ``napari-hinge hinge train --extra-pairs``
reads.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from qtpy.QtCore import QObject, Signal
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from napari_hinge._layers import UNITS
from napari_hinge._widgets._jobs import JobPanel
from napari_hinge._widgets._viewer import TabbedDock
from napari_hinge._widgets.slide_spots import (
    layer_names,
    refill_combo,
    slide_layers,
    spot_layers,
)
from napari_hinge.defaults import C2L_ADAPT, C2L_FILL

if TYPE_CHECKING:
    import napari

PROPOSE = "propose sparse tissue"
SOURCES = {"neighbouring spots": "neighbours", "HINGE (shipped model)": "hinge"}


def shapes_polygon_xy(layer, mpp: float | None) -> np.ndarray:
    """The first shape of a Shapes layer as (x, y) level-0 pixels of a slide of ``mpp``."""
    if not len(layer.data):
        raise ValueError(f"Shapes layer {layer.name!r} is empty: draw a region first")
    verts = np.asarray(layer.data[0], dtype=float)[:, -2:]
    world = np.array([layer.data_to_world(v) for v in verts])[:, -2:]
    return world[:, ::-1] / (mpp or 1.0)


def fill_job(stop, *, local, local_factory, slide, adata, region, options):
    """Adapt a local model first when ``local`` is None, then fill; returns
    ``(local_model, FillResult)`` or None when stopped."""
    from napari_hinge.c2l.fill import fill_region_iter

    if local is None:
        local = yield from local_factory(stop)
        if local is None or stop.requested:
            return None
    result = yield from fill_region_iter(local, slide, adata, region=region, stop=stop, **options)
    if result is None:
        return None
    return local, result


def adapt_job(stop, adata, *, central="shipped", n_genes: int = C2L_ADAPT["n_genes"],
              steps: int = C2L_ADAPT["steps"], batch_size: int = C2L_ADAPT["batch_size"],
              seed: int = C2L_ADAPT["seed"]):
    """Adapt a local model on all spots of ``adata``; a generator returning the model."""
    from napari_hinge.c2l.data import paired_spots
    from napari_hinge.c2l.local import build_local
    from napari_hinge.c2l.train import train_local

    patches, expr, genes, _ = paired_spots(adata, n_genes=n_genes)
    local = build_local(central, genes, seed=seed)
    model = yield from train_local(local, patches, expr, steps=steps, batch_size=batch_size,
                                   seed=seed, stop=stop, eval_every=max(10, steps // 10))
    return None if stop.requested else model


class _PairsHub(QObject):
    """Relays synthetic pairs from any fill widget to every HINGE Train tab (separate docks)."""

    pairs_ready = Signal(object)


_HUB: _PairsHub | None = None


def pairs_hub() -> _PairsHub:
    """The one hub of this session (created on first use, when Qt is up)."""
    global _HUB
    if _HUB is None:
        _HUB = _PairsHub()
    return _HUB


class C2LWidget(TabbedDock, QWidget):
    """Fill sparse regions of a slide with gene-conditioned synthetic H&E."""

    tab_title = "C2L fill"

    #: emitted with the new mosaic layer when a fill finished
    layer_added = Signal(object)
    #: emitted with a :class:`~napari_hinge.c2l.pairs.SyntheticPairs` by "Use as training pairs"
    training_pairs = Signal(object)

    def __init__(self, napari_viewer: napari.Viewer) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.local = None
        self.local_label = QLabel("no local model: one is adapted on the spots when you fill")
        self.local_label.setWordWrap(True)
        self.load_local = QPushButton("Local model folder…")
        self.adapt_steps = QSpinBox(minimum=1, maximum=100_000, value=C2L_ADAPT["steps"])
        self.n_genes = QSpinBox(minimum=2, maximum=2000, value=C2L_ADAPT["n_genes"])
        self.slide_box = QComboBox()
        self.spots_box = QComboBox()
        self.region_box = QComboBox()
        self.spacings = QDoubleSpinBox(decimals=2, minimum=0.05, maximum=100.0,
                                       value=C2L_FILL["n_spacings"])
        self.spacings.setToolTip("propose tissue tiles farther than this many spot spacings "
                                 "from every measured spot")
        self.source_box = QComboBox()
        self.source_box.addItems(list(SOURCES))
        self.guidance = QDoubleSpinBox(decimals=1, minimum=0.0, maximum=20.0,
                                       value=C2L_FILL["guidance"])
        self.steps = QSpinBox(minimum=1, maximum=1000, value=C2L_FILL["steps"])
        self.strength = QDoubleSpinBox(decimals=2, minimum=0.05, maximum=1.0, singleStep=0.05,
                                       value=C2L_FILL["strength"])
        self.strength.setToolTip("1: generate every tile from noise; below 1: edit the real "
                                 "H&E under each tile toward its expression (lower keeps more "
                                 "of the slide)")
        self.seamless = QCheckBox("one canvas, no seams")
        self.seamless.setChecked(True)
        self.seamless.setToolTip("sample the region as one canvas of overlapping windows so "
                                 "tissue runs on across tile borders (about 3x the time); "
                                 "unticked: each tile on its own")
        self.seed = QSpinBox(minimum=0, maximum=2**31 - 1, value=C2L_FILL["seed"])
        self.run_button = QPushButton("Fill region")
        self.pairs_button = QPushButton("Use as training pairs")
        self.pairs_button.setEnabled(False)
        self.save_pairs_button = QPushButton("Save pairs…")
        self.save_pairs_button.setEnabled(False)
        self.save_pairs_button.setToolTip("write the tiles and their expression as pairs.npz "
                                          "(napari-hinge hinge train --extra-pairs reads it)")
        self.load_local.setToolTip("use a local model folder written by napari-hinge "
                                   "c2l adapt (else one is adapted on the spots)")
        self.adapt_steps.setToolTip("training steps when a local model is adapted on the spots")
        self.n_genes.setToolTip("genes that condition the local model (the top N by variance)")
        self.slide_box.setToolTip("the slide the tiles are drawn on")
        self.spots_box.setToolTip("the measured spots (their expression conditions the tiles)")
        self.region_box.setToolTip("a Shapes layer with the region to fill, or tissue far "
                                   "from the spots")
        self.source_box.setToolTip("expression of the new tiles: interpolated from the "
                                   "neighbouring spots, or predicted by HINGE from the H&E")
        self.guidance.setToolTip("classifier-free guidance: higher follows the expression "
                                 "more closely, 0 ignores it")
        self.steps.setToolTip("DDIM sampling steps (fewer is faster and coarser)")
        self.seed.setToolTip("random seed: the same seed gives the same tiles")
        self.run_button.setToolTip("generate the tiles (in the background; Cancel keeps what "
                                   "you had)")
        self.pairs_button.setToolTip("hand the generated tiles and their expression on as "
                                     "synthetic training pairs (after a fill)")
        self.jobs = JobPanel()
        self.info = QLabel("")
        self.info.setWordWrap(True)

        row = QHBoxLayout()
        row.addWidget(self.load_local)
        form = QFormLayout()
        form.addRow("Adapt steps", self.adapt_steps)
        form.addRow("Genes (top N)", self.n_genes)
        form.addRow("Slide", self.slide_box)
        form.addRow("Spots", self.spots_box)
        form.addRow("Region", self.region_box)
        form.addRow("Spot spacings", self.spacings)
        form.addRow("Expression", self.source_box)
        form.addRow("Guidance", self.guidance)
        form.addRow("DDIM steps", self.steps)
        form.addRow("Strength", self.strength)
        form.addRow("Seamless", self.seamless)
        form.addRow("Seed", self.seed)
        layout = QVBoxLayout(self)
        layout.addLayout(row)
        layout.addWidget(self.local_label)
        layout.addLayout(form)
        layout.addWidget(self.run_button)
        layout.addWidget(self.jobs)
        pairs_row = QHBoxLayout()
        pairs_row.addWidget(self.pairs_button)
        pairs_row.addWidget(self.save_pairs_button)
        layout.addLayout(pairs_row)
        layout.addWidget(self.info)

        self.last_result = None
        self.last_layer = None
        self.load_local.clicked.connect(self._ask_local)
        self.run_button.clicked.connect(self.run)
        self.pairs_button.clicked.connect(self.use_as_training_pairs)
        self.save_pairs_button.clicked.connect(self._ask_save_pairs)
        self.training_pairs.connect(pairs_hub().pairs_ready.emit)
        self.jobs.succeeded.connect(self._on_result)
        self.jobs.ended.connect(self._on_ended)
        self.slide_box.currentTextChanged.connect(self._match_spots)
        self.viewer.layers.events.inserted.connect(self._refresh)
        self.viewer.layers.events.removed.connect(self._refresh)
        self._refresh()

    def _on_ended(self) -> None:
        self._enable_run()
        self.pairs_button.setEnabled(self.last_result is not None)
        self.save_pairs_button.setEnabled(self.last_result is not None)

    # -- model ----------------------------------------------------------------------------------
    def set_local(self, path_or_model) -> None:
        """Use a local model: a folder written by ``napari-hinge c2l adapt``, or a LocalModel."""
        from napari_hinge.c2l.local import LocalModel

        if isinstance(path_or_model, (str, Path)):
            self.local = LocalModel.load(path_or_model)
            where = str(path_or_model)
        else:
            self.local, where = path_or_model, "adapted in this session"
        self.local_label.setText(f"local model ({where}): {len(self.local.genes)} genes")

    def _ask_local(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "C2L local model folder")
        if folder:
            self.set_local(folder)

    # -- layers ---------------------------------------------------------------------------------
    def _refresh(self, event=None) -> None:
        refill_combo(self.slide_box, *layer_names(slide_layers(self.viewer)))
        refill_combo(self.spots_box, *layer_names(spot_layers(self.viewer)))
        refill_combo(self.region_box, [PROPOSE] + [lyr.name for lyr in self.viewer.layers
                                                   if lyr._type_string == "shapes"])
        self._match_spots(self.slide_box.currentText())
        self._enable_run()

    def _enable_run(self) -> None:
        """A fill needs a slide and its spots, and one run at a time."""
        self.run_button.setEnabled(self.slide_box.count() > 0 and self.spots_box.count() > 0
                                   and not self.jobs.running)

    def _match_spots(self, name: str) -> None:
        if name not in self.viewer.layers:
            return
        path = self.viewer.layers[name].metadata.get("slide_path")
        for layer in spot_layers(self.viewer):
            if layer.metadata.get("slide_path") == path:
                self.spots_box.setCurrentText(layer.name)
                return

    # -- run ------------------------------------------------------------------------------------
    def run(self):
        from napari_hinge.io.slides import open_slide

        name, spots_name = self.slide_box.currentText(), self.spots_box.currentText()
        if name not in self.viewer.layers:
            raise RuntimeError("no slide: open a slide first")
        if spots_name not in self.viewer.layers:
            raise RuntimeError("no spots layer for this slide")
        slide_layer = self.viewer.layers[name]
        adata = self.viewer.layers[spots_name].metadata["adata"]
        mpp = slide_layer.metadata.get("microns_per_pixel")
        slide = open_slide(slide_layer.metadata["slide_path"], mpp=mpp)
        region = None
        if self.region_box.currentText() != PROPOSE:
            region = shapes_polygon_xy(self.viewer.layers[self.region_box.currentText()], mpp)
        options = {"n_spacings": self.spacings.value(),
                   "source": SOURCES[self.source_box.currentText()],
                   "guidance": self.guidance.value(), "steps": self.steps.value(),
                   "strength": self.strength.value(), "seed": self.seed.value(),
                   "seamless": self.seamless.isChecked()}
        steps, n_genes, seed = self.adapt_steps.value(), self.n_genes.value(), self.seed.value()

        def factory(stop):
            return adapt_job(stop, adata, n_genes=n_genes, steps=steps, seed=seed)

        self._slide_layer = slide_layer
        self.run_button.setEnabled(False)
        self.pairs_button.setEnabled(False)
        what = "adapting and filling" if self.local is None else "filling"
        return self.jobs.run(lambda stop: fill_job(stop, local=self.local, local_factory=factory,
                                                   slide=slide, adata=adata, region=region,
                                                   options=options),
                             description=f"{what} on {name}")

    def _on_result(self, value) -> None:
        if value is None:
            return
        local, result = value
        if self.local is None:
            self.set_local(local)
        slide = self._slide_layer
        name = f"C2L synthetic ({slide.name})"
        n = 1
        while name in self.viewer.layers:  # never replace an earlier fill
            n += 1
            name = f"C2L synthetic {n} ({slide.name})"
        place = result.placement()
        units = {"units": UNITS} if result.microns_per_pixel else {}
        layer = self.viewer.add_image(
            result.mosaic, name=name, rgb=True, contrast_limits=(0, 255), **place, **units,
            # no 'slide_path' key: other widgets list layers with one as slides
            metadata={"c2l": result.params, "c2l_tiles": result.table(),
                      "c2l_genes": list(result.genes),
                      "source_slide": slide.metadata.get("slide_path")})
        self.last_result, self.last_layer = result, layer
        self.pairs_button.setEnabled(True)
        source = {"neighbours": "the neighbouring spots'", "hinge": "HINGE's predicted"}
        self.info.setText(f"{len(result.layout)} synthetic tiles of "
                          f"{result.params['patch_um']:.0f} µm, conditioned on "
                          f"{source[result.params['source']]} expression of "
                          f"{len(result.genes)} genes")
        self.layer_added.emit(layer)

    def _pairs(self):
        from napari_hinge.c2l.pairs import pairs_from_fill

        if self.last_result is None:
            raise RuntimeError("fill a region first")
        return pairs_from_fill(self.last_result,
                               self._slide_layer.metadata.get("slide_path"))

    def use_as_training_pairs(self):
        """Emit :attr:`training_pairs` with the last fill as
        :class:`~napari_hinge.c2l.pairs.SyntheticPairs` (every HINGE Train tab lists them) and
        keep them in the layer's metadata."""
        pairs = self._pairs()
        if self.last_layer is not None:
            self.last_layer.metadata["c2l_pairs"] = pairs
        self.info.setText(f"{len(pairs)} synthetic training pairs ({len(pairs.genes)} genes) "
                          "sent to HINGE's Train tab")
        self.training_pairs.emit(pairs)
        return pairs

    def save_pairs(self, path: str | Path) -> Path:
        """Write the last fill's pairs as ``pairs.npz`` (atomic)."""
        from napari_hinge.c2l.pairs import save_pairs

        out = save_pairs(self._pairs(), path)
        self.info.setText(f"wrote {out}")
        return out

    def _ask_save_pairs(self) -> None:
        path, _ = QFileDialog.getSaveFileName(self, "Save synthetic pairs", "pairs.npz",
                                              "pairs (*.npz)")
        if path:
            self.save_pairs(path)
