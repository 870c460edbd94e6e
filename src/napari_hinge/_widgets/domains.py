"""The "Domains" dock widget: STMGAC spatial domains painted as a Labels layer.

Training, clustering and rasterising run in a worker (:class:`JobPanel`); the user's
AnnData is only replaced once the run has finished, so Cancel leaves it as it was.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from qtpy.QtCore import Qt
from qtpy.QtGui import QColor, QIcon, QPixmap
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QListView,
    QListWidget,
    QListWidgetItem,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from napari_hinge._layers import UNITS
from napari_hinge._widgets._jobs import JobPanel
from napari_hinge._widgets._viewer import TabbedDock
from napari_hinge._widgets.slide_spots import layer_names, refill_combo, spot_layers
from napari_hinge.defaults import STMGAC

if TYPE_CHECKING:
    import napari

DOMAIN_KEY = "domain"


def slide_shape_for(viewer, spots_layer) -> tuple[int, int]:
    """Level-0 (rows, cols) of the slide under the spots, else the spots' own extent."""
    slide_path = spots_layer.metadata.get("slide_path")
    for layer in viewer.layers:
        if slide_path and layer._type_string == "image" and \
                layer.metadata.get("slide_path") == slide_path:
            level0 = layer.data[0] if layer.multiscale else layer.data
            return int(level0.shape[0]), int(level0.shape[1])
    adata = spots_layer.metadata["adata"]
    xy = np.asarray(adata.obsm["spatial"])
    pad = float(spots_layer.metadata.get("spot_diameter_px", 10))
    return int(xy[:, 1].max() + pad) + 1, int(xy[:, 0].max() + pad) + 1


def domain_job(adata, shape, *, n_domains, preset, epochs, seed, refine, mode, stop):
    """Train + cluster (events from :func:`napari_hinge.tl.domains_iter`), then rasterise.

    Returns (annotated copy of ``adata``, label raster, per-domain table, raster scale).
    """
    from napari_hinge import tl
    from napari_hinge.stmgac.labels import domain_table, slide_labels

    result = None
    for event in tl.domains_iter(adata, n_domains=n_domains, preset=preset, epochs=epochs,
                                 seed=seed, refine=refine, stop=stop, copy=True):
        if event.kind == "done":
            result = event.metrics["result"]
        yield event
    if result is None:  # stopped
        return None
    labels, scale = slide_labels(result, shape, key=DOMAIN_KEY, mode=mode)
    return result, labels, domain_table(result, DOMAIN_KEY), scale


class DomainsWidget(TabbedDock, QWidget):
    tab_title = "Domains"

    def __init__(self, napari_viewer: napari.Viewer) -> None:
        super().__init__()
        from napari_hinge.stmgac.presets import (
            DEFAULT_PRESET,
            available_presets,
            get_preset,
            preset_for,
        )

        self.viewer = napari_viewer
        self._get_preset = get_preset
        self._preset_for = preset_for
        self.layer_box = QComboBox()
        self.k_box = QSpinBox(minimum=2, maximum=250, value=STMGAC["n_domains"])
        self.preset_box = QComboBox()
        self.preset_box.addItems(available_presets())
        self.preset_box.setCurrentText(DEFAULT_PRESET)
        self.epochs_box = QSpinBox(minimum=1, maximum=5000)
        self.seed_box = QSpinBox(minimum=0, maximum=2**31 - 1, value=STMGAC["seed"])
        self.refine_box = QCheckBox("spatial majority vote")
        self.mode_box = QComboBox()
        self.mode_box.addItems(["disc", "voronoi"])
        self.run_button = QPushButton("Find domains")
        self.jobs = JobPanel(plot=True)
        self.legend = QListWidget()
        # long marker lists wrap inside the dock instead of scrolling sideways out of it
        self.legend.setWordWrap(True)
        self.legend.setResizeMode(QListView.ResizeMode.Adjust)
        self.legend.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        self.show_all_button = QPushButton("Show all domains")
        self.save_h5ad_button = QPushButton("Save .h5ad…")
        self.save_tiff_button = QPushButton("Save labels .tif…")
        for button in (self.show_all_button, self.save_h5ad_button, self.save_tiff_button):
            button.setEnabled(False)  # until there are domains to show or save
        self.layer_box.setToolTip("the spots to cluster (layers opened by napari-hinge)")
        self.k_box.setToolTip("number of domains K the latent is clustered into")
        self.preset_box.setToolTip(
            "STMGAC settings per kind of data; chosen from the spots when they change: "
            "legacy_st for legacy ST (100 µm spots), dlpfc for Visium")
        self.epochs_box.setToolTip("training epochs (the preset's by default; fewer is faster "
                                   "and coarser)")
        self.seed_box.setToolTip("random seed: the same seed gives the same domains")
        self.refine_box.setToolTip("relabel each spot by the majority of its 30 nearest spots "
                                   "(smoother domains)")
        self.mode_box.setToolTip("disc: each spot painted at its true diameter; voronoi: "
                                 "every pixel takes its nearest spot's domain")
        self.run_button.setToolTip("train STMGAC and cluster (runs in the background; Cancel "
                                   "keeps your data as it was)")
        self.legend.setToolTip("click a domain to show it alone")
        self.show_all_button.setToolTip("show every domain again (after a click in the list)")
        self.save_h5ad_button.setToolTip("the spots with obs['domain'], the latent and the "
                                         "denoised expression")
        self.save_tiff_button.setToolTip("the label raster in µm: pixel value = domain + 1, "
                                         "0 = background")
        self.summary = QLabel("")
        self.summary.setWordWrap(True)

        form = QFormLayout()
        form.addRow("Spots", self.layer_box)
        form.addRow("Domains (K)", self.k_box)
        form.addRow("Preset", self.preset_box)
        form.addRow("Epochs", self.epochs_box)
        form.addRow("Seed", self.seed_box)
        form.addRow("Refine", self.refine_box)
        form.addRow("Paint spots as", self.mode_box)
        saves = QHBoxLayout()
        saves.addWidget(self.save_h5ad_button)
        saves.addWidget(self.save_tiff_button)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addWidget(self.run_button)
        layout.addWidget(self.jobs)
        layout.addWidget(self.summary)
        layout.addWidget(self.legend)
        layout.addWidget(self.show_all_button)
        layout.addLayout(saves)

        self.preset_box.currentTextChanged.connect(self._on_preset)
        self.run_button.clicked.connect(self.run)
        self.jobs.succeeded.connect(self._on_result)
        self.jobs.ended.connect(self._refresh_layers)  # Find domains again, if spots remain
        self.legend.currentItemChanged.connect(self._on_legend)
        self.show_all_button.clicked.connect(self._show_all)
        self.save_h5ad_button.clicked.connect(lambda: self._ask_and_save("h5ad"))
        self.save_tiff_button.clicked.connect(lambda: self._ask_and_save("tif"))
        self.viewer.layers.events.inserted.connect(self._refresh_layers)
        self.viewer.layers.events.removed.connect(self._refresh_layers)
        self.layer_box.currentTextChanged.connect(self._on_layer)
        self.labels_layer = None
        self._spots_layer = None
        self._on_preset(self.preset_box.currentText())
        self._refresh_layers()

    def _refresh_layers(self, event=None) -> None:
        before = self.layer_box.currentText()
        refill_combo(self.layer_box, *layer_names(spot_layers(self.viewer)))
        self.run_button.setEnabled(self.layer_box.count() > 0 and not self.jobs.running)
        if self.layer_box.currentText() != before:
            self._on_layer(self.layer_box.currentText())

    def _on_layer(self, name: str) -> None:
        """New spots: the preset that fits them (legacy ST or Visium)."""
        if name in self.viewer.layers:
            self.preset_box.setCurrentText(
                self._preset_for(self.viewer.layers[name].metadata["adata"]))

    def _on_preset(self, name: str) -> None:
        preset = self._get_preset(name)
        self.epochs_box.setValue(preset.epochs)
        self.refine_box.setChecked(preset.refine)
        if preset.n_domains:
            self.k_box.setValue(preset.n_domains)

    # -- run ---------------------------------------------------------------------------------
    def run(self):
        """Start STMGAC on the chosen spots; returns the worker."""
        name = self.layer_box.currentText()
        if name not in self.viewer.layers:
            raise RuntimeError("no spots layer: open spatial data first")
        spots = self.viewer.layers[name]
        adata = spots.metadata["adata"]
        shape = slide_shape_for(self.viewer, spots)
        options = {
            "n_domains": self.k_box.value(), "preset": self.preset_box.currentText(),
            "epochs": self.epochs_box.value(), "seed": self.seed_box.value(),
            "refine": self.refine_box.isChecked(), "mode": self.mode_box.currentText(),
        }
        self._spots_layer = spots
        self.run_button.setEnabled(False)
        return self.jobs.run(lambda stop: domain_job(adata, shape, stop=stop, **options),
                             description=f"STMGAC on {spots.name}")

    def _on_result(self, result) -> None:
        if result is None:
            return
        adata, labels, table, scale = result
        spots = self._spots_layer
        spots.metadata["adata"] = adata  # the finished, annotated copy replaces the input
        mpp = spots.metadata.get("microns_per_pixel")
        unit = (mpp or 1.0) / scale
        features = table.reset_index().rename(columns={"label": "index"})
        features = features.set_index(features["index"].to_numpy())
        name = f"{spots.name} domains"
        if name in self.viewer.layers:
            self.viewer.layers.remove(name)
        kwargs = {"scale": (unit, unit), "name": name, "opacity": 0.55, "features": features,
                  "metadata": {"adata": adata, "raster_scale": scale}}
        if mpp:
            kwargs["units"] = UNITS
        self.labels_layer = self.viewer.add_labels(labels, **kwargs)
        for button in (self.show_all_button, self.save_h5ad_button, self.save_tiff_button):
            button.setEnabled(True)
        self._fill_legend(table)
        params = adata.uns[DOMAIN_KEY]["params"]
        self.summary.setText(
            f"{len(table)} domains on {adata.n_obs} spots · {params['epochs']} epochs · "
            f"seed {params['seed']}" + (" · refined" if params["refine"] else ""))

    def _fill_legend(self, table) -> None:
        self.legend.clear()
        for domain, row in table.iterrows():
            color = self.labels_layer.get_color(int(row["label"]))
            pixmap = QPixmap(14, 14)
            pixmap.fill(QColor.fromRgbF(*[float(c) for c in color]))
            text = f"{domain}: {row['n_spots']} spots · {row['top_markers']}"
            item = QListWidgetItem(QIcon(pixmap), text)
            item.setToolTip(f"{text}\nclick to show this domain alone")
            item.setData(256, int(row["label"]))  # Qt.UserRole
            self.legend.addItem(item)

    def _on_legend(self, item, previous=None) -> None:
        """Selecting a domain highlights it (only that label is shown)."""
        if item is None or self.labels_layer is None:
            return
        self.labels_layer.selected_label = int(item.data(256))
        self.labels_layer.show_selected_label = True

    def _show_all(self) -> None:
        if self.labels_layer is not None:
            self.labels_layer.show_selected_label = False

    # -- export ------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write the annotated AnnData (.h5ad) or the label raster (.tif, with µm scale)."""
        from napari_hinge.training import atomic_write

        if self.labels_layer is None:
            raise RuntimeError("no domains yet: run Find domains first")
        path = Path(path)
        if path.suffix == ".h5ad":
            adata = self.labels_layer.metadata["adata"]
            return atomic_write(path, lambda tmp: adata.write_h5ad(tmp))
        if path.suffix in (".tif", ".tiff"):
            import tifffile

            um = float(self.labels_layer.scale[0])
            data = np.asarray(self.labels_layer.data)
            return atomic_write(path, lambda tmp: tifffile.imwrite(
                tmp, data, compression="zlib", resolutionunit="CENTIMETER",
                resolution=(1e4 / um, 1e4 / um), metadata=None))
        raise ValueError(f"{path}: save as .h5ad or .tif")

    def _ask_and_save(self, kind: str) -> None:
        filters = {"h5ad": "AnnData (*.h5ad)", "tif": "TIFF (*.tif *.tiff)"}
        path, _ = QFileDialog.getSaveFileName(self, "Save domains", f"domains.{kind}",
                                              filters[kind])
        if path:
            self.save(path)
            self.summary.setText(f"saved {path}")
