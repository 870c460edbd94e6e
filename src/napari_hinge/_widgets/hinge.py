"""HINGE dock widgets: paint predicted expression over a slide, and train a model.

Both run the core's generators (:func:`~napari_hinge.hinge.slide_predict.predict_slide_iter`,
:func:`~napari_hinge.hinge.pipeline.fit_hinge`) in a worker through :class:`JobPanel`. A dense
map is painted as soon as the worker's first preview arrives and refined in place (the same
layers' data replaced); Cancel keeps what is painted. Per-tile maps appear when they end.
All genes of a run share two layers (predicted, uncertainty), the gene on a viewer slider.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from qtpy.QtCore import Qt, QTimer, Signal
from qtpy.QtWidgets import (
    QAbstractItemView,
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QListWidget,
    QPushButton,
    QSlider,
    QSpinBox,
    QTabWidget,
    QVBoxLayout,
    QWidget,
)

from napari_hinge._layers import robust_limits
from napari_hinge._widgets._jobs import JobPanel
from napari_hinge._widgets._viewer import TabbedDock, show_scale_bar, title_colorbar
from napari_hinge._widgets.slide_spots import (
    layer_names,
    refill_combo,
    slide_layers,
    spot_layers,
)
from napari_hinge.geometry import spot_pitch_um
from napari_hinge.hinge.defaults import RECIPE, SAMPLER, SLIDE, TRAIN

if TYPE_CHECKING:
    import napari

SHIPPED = "shipped"


def compare_with_spots(prediction, spots_layer) -> dict[str, float]:
    """Put the predicted map at the measured spots into ``pred_<gene>`` columns of the spots'
    features; returns the per-gene Pearson r (:func:`~napari_hinge.hinge.slide_predict.
    compare_with_spots`)."""
    from napari_hinge.hinge.slide_predict import compare_with_spots as compare

    values, scores = compare(prediction, spots_layer.metadata["adata"])
    features = spots_layer.features.copy()
    for gene, predicted in values.items():
        features[f"pred_{gene}"] = predicted
    spots_layer.features = features
    return scores


class GenePicker(QWidget):
    """Searchable multi-select over a gene list, plus 'top N' when nothing is selected."""

    def __init__(self) -> None:
        super().__init__()
        self.search = QLineEdit(placeholderText="search genes…")
        self.list = QListWidget()
        self.list.setSelectionMode(QAbstractItemView.SelectionMode.MultiSelection)
        self.top_n = QSpinBox(minimum=1, maximum=5000, value=6)
        self.search.setToolTip("type part of a gene name to narrow the list")
        self.list.setToolTip("the model's genes: click to select the ones to map (several "
                             "allowed); none selected: the first N below")
        self.top_n.setToolTip("with no gene selected, map the model's first N genes")
        row = QHBoxLayout()
        row.addWidget(QLabel("or the first"))
        row.addWidget(self.top_n)
        row.addWidget(QLabel("genes"))
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.search)
        layout.addWidget(self.list)
        layout.addLayout(row)
        self.search.textChanged.connect(self._filter)
        self.genes: list[str] = []

    def set_genes(self, genes) -> None:
        self.genes = list(genes)
        self.list.clear()
        self.list.addItems(self.genes)

    def _filter(self, text: str) -> None:
        query = text.strip().upper()
        for i in range(self.list.count()):
            item = self.list.item(i)
            item.setHidden(bool(query) and query not in item.text().upper())

    def chosen(self) -> list[str]:
        picked = [item.text() for item in self.list.selectedItems()]
        return picked or self.genes[: self.top_n.value()]


class PredictWidget(QWidget):
    """Choose a model, genes, stride and samples; paint one map per gene over the slide."""

    #: emitted with the list of layers added by a finished run
    layers_added = Signal(list)

    def __init__(self, napari_viewer: napari.Viewer) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.model = None
        self.model_path: str = SHIPPED
        self.model_label = QLabel("")
        self.model_label.setWordWrap(True)
        self.choose_model = QPushButton("Model folder…")
        self.choose_model.setToolTip("a model folder written by napari-hinge hinge train")
        self.use_shipped = QPushButton("Shipped model")
        self.use_shipped.setToolTip("the weights that ship with the plugin (her2st patient C, "
                                    "275 genes, calibrated uncertainty)")
        self.slide_box = QComboBox()
        self.slide_box.setToolTip("the slide to paint maps over (slides opened by napari-hinge)")
        self.genes = GenePicker()
        self.mode_box = QComboBox()
        self.mode_box.addItems(["dense", "tiles"])
        self.mode_box.setCurrentText(SLIDE["mode"])
        self.mode_box.setToolTip("dense: the encoder runs once over the tissue, a value every "
                                 "16 µm, painted at once and refined; tiles: every position "
                                 "encoded and sampled on its own (slow below the spot pitch)")
        self.stride_box = QDoubleSpinBox(decimals=1, minimum=5.0, maximum=5000.0,
                                         value=SLIDE["stride_um"])
        self.stride_box.setSuffix(" µm")
        self.stride_box.setToolTip("distance between map positions (dense: multiples of the "
                                   "encoder's 16 µm cells; tiles: default the measured spots' "
                                   "pitch, halving it quadruples the work)")
        self.sample_stride_box = QDoubleSpinBox(decimals=0, minimum=16.0, maximum=5000.0,
                                                value=SLIDE["sample_stride_um"])
        self.sample_stride_box.setSuffix(" µm")
        self.sample_stride_box.setToolTip("dense: HINGE's samples (residual over the prior and "
                                          "the uncertainty) are drawn this far apart and "
                                          "interpolated; halving it quadruples their cost")
        self.opacity = QSlider(Qt.Orientation.Horizontal)
        self.opacity.setRange(0, 100)
        self.opacity.setValue(70)
        self.opacity.setToolTip("opacity of the predicted maps over the slide")
        self.samples_box = QSpinBox(minimum=1, maximum=64, value=SAMPLER["slide_samples"])
        self.samples_box.setToolTip("samples per tile: their mean is the map, their spread the "
                                    "uncertainty; more samples, smoother uncertainty, slower")
        self.steps_box = QSpinBox(minimum=1, maximum=50, value=SAMPLER["reveal_steps"])
        self.steps_box.setToolTip("reverse diffusion steps (of T = 50): 10 score as 50 on "
                                  "held-out spots at a fifth of the time")
        self.run_button = QPushButton("Predict")
        self.run_button.setToolTip("paint one predicted map and one uncertainty map per gene "
                                   "(runs in the background; Cancel keeps what is painted)")
        self.jobs = JobPanel()
        self.scores = QLabel("")
        self.scores.setWordWrap(True)
        self.gene_label = QLabel("")  # which gene of a multi-gene map is on view
        self.gene_label.setWordWrap(True)
        self.save_button = QPushButton("Save maps…")
        self.save_button.setToolTip("write the maps as OME-TIFF in µm (with their uncertainty), "
                                    "or per tile as .h5ad")
        self.save_button.setEnabled(False)  # until there are maps to save
        self.last_prediction = None

        models = QHBoxLayout()
        models.addWidget(self.use_shipped)
        models.addWidget(self.choose_model)
        form = QFormLayout()
        form.addRow("Slide", self.slide_box)
        form.addRow("Mode", self.mode_box)
        form.addRow("Stride", self.stride_box)
        form.addRow("Samples every", self.sample_stride_box)
        form.addRow("Samples", self.samples_box)
        form.addRow("Reveal steps", self.steps_box)
        layout = QVBoxLayout(self)
        layout.addLayout(models)
        layout.addWidget(self.model_label)
        layout.addLayout(form)
        layout.addWidget(self.genes)
        layout.addWidget(self.run_button)
        layout.addWidget(self.jobs)
        layout.addWidget(self.gene_label)
        layout.addWidget(self.scores)
        opacity_row = QHBoxLayout()
        opacity_row.addWidget(QLabel("Map opacity"))
        opacity_row.addWidget(self.opacity)
        layout.addLayout(opacity_row)
        layout.addWidget(self.save_button)
        self.map_layers: dict[str, object] = {}  # 'mean'/'std' -> layer of the current run
        self._pending: dict[str, object] = {}  # a hidden layer's newest prediction
        self._to_add: dict[str, str] = {}  # hidden maps added at the next event-loop turn
        self._finish_when_added = None

        self.save_button.clicked.connect(self._ask_save)
        self.use_shipped.clicked.connect(lambda: self.set_model(SHIPPED))
        self.choose_model.clicked.connect(self._ask_model)
        self.run_button.clicked.connect(self.run)
        self.jobs.succeeded.connect(self._on_result)
        self.jobs.partial.connect(self._paint)
        self.opacity.valueChanged.connect(self._set_opacity)
        self.mode_box.currentTextChanged.connect(self._on_mode)
        self.jobs.ended.connect(self._enable_run)
        self.slide_box.currentTextChanged.connect(self._on_slide)
        self.viewer.dims.events.point.connect(self._show_gene)
        self.viewer.layers.events.inserted.connect(self._refresh_layers)
        self.viewer.layers.events.removed.connect(self._refresh_layers)
        self._refresh_layers()
        # the gene list is there from the start: the shipped model is the default
        self.set_model(SHIPPED)

    # -- model ------------------------------------------------------------------------------
    def set_model(self, path_or_model) -> None:
        """Use a model: 'shipped', a saved folder, or a HingeModel object (e.g. just trained)."""
        from napari_hinge.hinge.pipeline import load_model

        if isinstance(path_or_model, (str, Path)):
            self.model = load_model(path_or_model)
            self.model_path = str(path_or_model)
        else:
            self.model, self.model_path = path_or_model, "trained in this session"
        cfg = self.model.config
        calibrated = getattr(self.model, "calibration", None) is not None
        self.model_label.setText(
            f"{self.model_path}: {len(cfg.genes)} genes, encoder {cfg.encoder}, backbone "
            f"{cfg.backbone_ref or 'saved'}, context {cfg.context_um or 0:g} µm; uncertainty: "
            + ("calibrated sd" if calibrated else "raw sample spread (not calibrated)"))
        self.genes.set_genes(cfg.genes)

    def _ask_model(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "HINGE model folder")
        if folder:
            self.set_model(folder)

    # -- layers -----------------------------------------------------------------------------
    def _refresh_layers(self, event=None) -> None:
        refill_combo(self.slide_box, *layer_names(slide_layers(self.viewer)))
        self._on_slide(self.slide_box.currentText())
        self._enable_run()

    def _enable_run(self) -> None:
        """Predict needs a slide, and one run at a time."""
        self.run_button.setEnabled(self.slide_box.count() > 0 and not self.jobs.running)

    def spots_for(self, slide_layer):
        path = slide_layer.metadata.get("slide_path")
        for layer in spot_layers(self.viewer):
            if layer.metadata.get("slide_path") == path:
                return layer
        return None

    def _on_mode(self, mode: str) -> None:
        self.sample_stride_box.setEnabled(mode == "dense")
        if mode == "dense":
            self.stride_box.setValue(SLIDE["stride_um"])
        else:
            self._on_slide(self.slide_box.currentText())

    def _on_slide(self, name: str) -> None:
        """Default stride of per-tile maps: the measured spots' pitch when the slide has
        spots (dense maps keep their 16 µm)."""
        if name not in self.viewer.layers or self.mode_box.currentText() == "dense":
            return
        spots = self.spots_for(self.viewer.layers[name])
        pitch = spot_pitch_um(spots.metadata["adata"]) if spots is not None else None
        if pitch:
            self.stride_box.setValue(pitch)

    # -- run --------------------------------------------------------------------------------
    def run(self):
        from napari_hinge.hinge.slide_predict import predict_slide_dense_iter, predict_slide_iter
        from napari_hinge.io.slides import open_slide

        if self.model is None:
            self.set_model(self.model_path)
        name = self.slide_box.currentText()
        if name not in self.viewer.layers:
            raise RuntimeError("no slide: open a slide first")
        layer = self.viewer.layers[name]
        slide = open_slide(layer.metadata["slide_path"],
                           mpp=layer.metadata.get("microns_per_pixel"))
        model, genes = self.model, self.genes.chosen()
        options = {"stride_um": self.stride_box.value(), "genes": genes,
                   "n_samples": self.samples_box.value(),
                   "reveal_steps": self.steps_box.value()}
        dense = self.mode_box.currentText() == "dense"
        if dense:
            options["sample_stride_um"] = self.sample_stride_box.value()
        predict = predict_slide_dense_iter if dense else predict_slide_iter
        self._slide_layer = layer
        self.map_layers, self._pending, self._to_add = {}, {}, {}
        self._finish_when_added = None
        self.first_paint_s = None
        self._run_started = time.perf_counter()
        self.run_button.setEnabled(False)
        return self.jobs.run(lambda stop: predict(model, slide, stop=stop, **options),
                             description=f"predicting {len(genes)} genes on {name}")

    def _set_opacity(self, value: int) -> None:
        for layer in self.map_layers.values():
            layer.opacity = value / 100

    def _paint(self, prediction) -> None:
        """Put ``prediction``'s maps on the viewer: two layers, all genes stacked along a
        slider axis (the mean, and the uncertainty hidden), added at the first call of a
        run and refined in place after it (the visible one now, the hidden one when shown):
        a refinement costs one texture upload, and fifty genes add two layers, not a
        hundred (each napari layer costs its controls, list row and visual to build)."""
        slide = self._slide_layer.name
        label = prediction.genes[0] if len(prediction.genes) == 1 else \
            f"{len(prediction.genes)} genes"
        for which, kind, visible in (("mean", "predicted", True),
                                     ("std", "uncertainty", False)):
            name = f"{label} {kind} ({slide})"
            layer = self.map_layers.get(which)
            if layer is None or layer not in self.viewer.layers:
                if visible:
                    self._add_map(prediction, which, name, visible)
                elif which not in self._to_add:  # the next event-loop turn: one layer's
                    # visual (~0.1-0.5 s in napari) per turn, not both in one stall
                    self._to_add[which] = name
                    QTimer.singleShot(0, self._add_hidden)
                else:
                    self._pending[which] = prediction
            elif layer.visible:
                self._set_map(layer, prediction)
            else:
                self._pending[which] = prediction
        if self.first_paint_s is None:
            self.first_paint_s = time.perf_counter() - self._run_started
            show_scale_bar(self.viewer)
            self._show_gene()
        self.last_prediction = prediction
        self.save_button.setEnabled(True)

    def _add_hidden(self) -> None:
        for which, name in list(self._to_add.items()):
            del self._to_add[which]
            prediction = self._pending.pop(which, self.last_prediction)
            self._add_map(prediction, which, name, False)
            self._show_gene()
        if self._finish_when_added is not None:
            prediction, self._finish_when_added = self._finish_when_added, None
            self._finish(prediction)

    @staticmethod
    def _stack(prediction, which: str) -> np.ndarray:
        """(G, H, W) maps of every gene, (H, W) for one (no slider then)."""
        raster = prediction.raster(which)
        return raster[0] if len(raster) == 1 else raster

    def _gene_index(self, layer) -> int:
        """The gene the slider shows on ``layer`` (its first axis)."""
        if layer.data.ndim == 2:
            return 0
        axis = self.viewer.dims.ndim - layer.data.ndim  # napari aligns layers' last axes
        step = int(round(self.viewer.dims.point[axis]))  # unit scale, no offset: the index
        return min(max(step, 0), layer.data.shape[0] - 1)

    def _set_map(self, layer, prediction) -> None:
        layer.data = self._stack(prediction, layer.metadata["kind"])
        layer.metadata["hinge"] = prediction.params
        layer.metadata["genes"] = list(prediction.genes)
        self._fit_contrast(layer)

    def _fit_contrast(self, layer) -> None:
        """Contrast from the quantiles of the gene on view (genes differ in range)."""
        data = layer.data if layer.data.ndim == 2 else layer.data[self._gene_index(layer)]
        layer.contrast_limits = robust_limits(data)

    def _add_map(self, prediction, which: str, name: str, visible: bool):
        from napari_hinge._layers import map_layer_kwargs

        if name in self.viewer.layers:  # an earlier run's map of the same name
            self.viewer.layers.remove(name)
        data = self._stack(prediction, which)
        kwargs = map_layer_kwargs(prediction, prediction.genes[0], which, name=name,
                                  visible=visible, opacity=self.opacity.value() / 100)
        if data.ndim == 3:  # the gene axis: unit steps, no offset
            kwargs["scale"] = (1.0, *kwargs["scale"])
            kwargs["translate"] = (0.0, *kwargs["translate"])
            kwargs["units"] = ("pixel", *([kwargs["units"]] * 2)) if isinstance(
                kwargs["units"], str) else ("pixel", *kwargs["units"])
        kwargs["metadata"]["genes"] = list(prediction.genes)
        layer = self.viewer.add_image(data, **kwargs)
        layer.colorbar.visible = visible
        layer.events.visible.connect(lambda event, w=which: self._flush_pending(w))
        self.map_layers[which] = layer
        return layer

    def _show_gene(self, event=None) -> None:
        """The slider moved (or a map was shown): every map names the gene on view, the
        visible ones fit their contrast to it, the colorbar's title says it."""
        layers = [la for la in self.map_layers.values() if la in self.viewer.layers]
        if not layers:
            return
        for layer in layers:
            genes = layer.metadata.get("genes") or [layer.metadata.get("gene")]
            layer.metadata["gene"] = genes[self._gene_index(layer)]
            if layer.visible:
                self._fit_contrast(layer)
        shown = next((la for la in layers if la.visible and la.colorbar.visible), layers[0])
        gene, genes = shown.metadata["gene"], shown.metadata.get("genes") or []
        kind = " uncertainty (sd)" if shown.metadata.get("kind") == "std" else ""
        title_colorbar(self.viewer, f"{gene}{kind}: log1p(counts per 10k)")
        if len(genes) > 1:
            self.gene_label.setText(f"On view: {gene} ({genes.index(gene) + 1} of "
                                    f"{len(genes)}; the viewer's slider picks the gene)")

    def _flush_pending(self, which: str) -> None:
        """A map made visible: its newest data, its colorbar, the colorbar's title."""
        layer = self.map_layers.get(which)
        if layer is None or not layer.visible:
            return
        if which in self._pending:
            self._set_map(layer, self._pending.pop(which))
        for other in self.map_layers.values():
            other.colorbar.visible = other is layer
        self._show_gene()

    def _on_result(self, prediction) -> None:
        if prediction is None:
            return
        self._paint(prediction)
        if self._to_add:  # finish once the hidden map is on the viewer too
            self._finish_when_added = prediction
        else:
            self._finish(prediction)

    def _finish(self, prediction) -> None:
        added = list(self.map_layers.values())
        spots = self.spots_for(self._slide_layer)
        if spots is not None:
            scores = compare_with_spots(prediction, spots)
            if scores:
                text = ", ".join(f"{g} {r:.2f}" for g, r in scores.items())
                self.scores.setText(f"Pearson r at the {spots.metadata['adata'].n_obs} measured "
                                    f"spots: {text} (mean {np.mean(list(scores.values())):.2f})")
        self.layers_added.emit(added)

    def save(self, path: str | Path) -> list[Path]:
        """``*.ome.tif``: the maps (and ``*_uncertainty.ome.tif``) in µm; ``*.h5ad``: per tile."""
        from napari_hinge.hinge.slide_predict import write_ome_tiff
        from napari_hinge.training import atomic_write

        if self.last_prediction is None:
            raise RuntimeError("nothing to save: run Predict first")
        path = Path(path)
        if path.suffix == ".h5ad":
            adata = self.last_prediction.to_adata()
            return [atomic_write(path, lambda tmp: adata.write_h5ad(tmp))]
        if not path.name.endswith((".ome.tif", ".ome.tiff")):
            raise ValueError(f"{path}: save maps as .ome.tif or tiles as .h5ad")
        stem = path.name.split(".ome.")[0]
        return [write_ome_tiff(self.last_prediction, path),
                write_ome_tiff(self.last_prediction,
                               path.with_name(f"{stem}_uncertainty.ome.tif"), which="std")]

    def _ask_save(self) -> None:
        path, _ = QFileDialog.getSaveFileName(self, "Save predicted maps", "hinge_maps.ome.tif",
                                              "OME-TIFF (*.ome.tif);;AnnData per tile (*.h5ad)")
        if path:
            written = self.save(path)
            self.scores.setText(f"saved {', '.join(str(p) for p in written)}")


class TrainWidget(QWidget):
    """Train HINGE on the spots layers in the viewer (or folders), with a live loss curve."""

    #: emitted with the trained model when the user clicks "Use this model"
    model_ready = Signal(object)

    def __init__(self, napari_viewer: napari.Viewer) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.datasets = QListWidget()
        self.datasets.setSelectionMode(QAbstractItemView.SelectionMode.MultiSelection)
        self.datasets.setToolTip("spots layers with a slide, and added folders: the selected "
                                 "ones are trained on")
        self.add_folder = QPushButton("Add folder…")
        self.add_folder.setToolTip("a Space Ranger outs/ or legacy-ST folder to train on "
                                   "without opening it")
        self.n_genes = QSpinBox(minimum=2, maximum=2000, value=TRAIN["n_genes"])
        self.n_genes.setToolTip("genes predicted: the N most variable among those expressed in "
                                "at least 10% of the spots of every dataset")
        self.include = QLineEdit()
        self.include.setPlaceholderText("ERBB2, MKI67 … or 'breast'")
        self.include.setToolTip("genes added to the top-N panel (each must be measured in "
                                "every dataset); 'breast' adds the built-in breast markers")
        self.context = QDoubleSpinBox(decimals=0, minimum=0.0, maximum=2000.0,
                                      value=RECIPE["context_um"] or 0.0)
        self.context.setSuffix(" µm")
        self.context.setToolTip("neighbour context: the mean features of spots within this "
                                "radius join each spot's own (0 = the spot alone)")
        self.epochs = QSpinBox(minimum=1, maximum=1000, value=TRAIN["epochs"])
        self.epochs.setToolTip("passes over the training spots (the loss curve below shows "
                               "when more stop helping)")
        self.encoder = QComboBox()
        self.encoder.setToolTip("the image encoder that turns each spot's patch into features "
                                "(UNI and CONCH need your own weights: use the CLI)")
        self.backbone = QComboBox()
        self.backbone.addItems(["builtin", "random"])
        self.backbone.setToolTip("builtin: the shipped pre-trained gene-token transformer; "
                                 "random: the same network untrained (an ablation)")
        self.augment = QCheckBox("8 flips/rotations")
        self.augment.setChecked(True)
        self.augment.setToolTip("train on the 8 flips and rotations of every patch")
        # A fresh folder per widget: a new run never overwrites an earlier run's checkpoints.
        stamp = time.strftime("%Y%m%d-%H%M%S")
        self.checkpoints = QLineEdit(str(Path.home() / "napari-hinge-runs" / f"hinge-{stamp}"))
        self.checkpoints.setToolTip("folder of this run's checkpoints (a fresh one per widget: "
                                    "an earlier run is never overwritten)")
        self.resume = QCheckBox("resume from the checkpoint folder")
        self.resume.setToolTip("continue from the last checkpoint in that folder")
        # synthetic C2L pairs: from the fill widget (pairs_hub) or a saved pairs.npz
        self.pairs_list = QListWidget()
        self.pairs_list.setSelectionMode(QAbstractItemView.SelectionMode.MultiSelection)
        self.pairs_list.setToolTip("synthetic C2L pairs trained on next to the real spots "
                                   "(selected ones); from 'Use as training pairs' or a file")
        self.add_pairs_file = QPushButton("Add pairs file…")
        self.add_pairs_file.setToolTip("a pairs.npz saved by the C2L fill dock")
        self.pairs_weight = QDoubleSpinBox(decimals=2, minimum=0.0, maximum=10.0,
                                           singleStep=0.1, value=1.0)
        self.pairs_weight.setToolTip("weight of each synthetic pair in the loss and the ridge "
                                     "prior (real spots weigh 1)")
        self.start = QPushButton("Start training")
        self.start.setToolTip("train on the selected datasets (runs in the background; Cancel "
                              "keeps the last checkpoint)")
        self.use_button = QPushButton("Use this model")
        self.use_button.setToolTip("predict with the model just trained (in the Predict tab)")
        self.use_button.setEnabled(False)  # until a run has finished
        self.jobs = JobPanel(plot=True)
        from napari_hinge.encoders import list_encoders

        self.encoder.addItems([name for name in list_encoders()
                               if name not in ("uni", "conch")])  # those need user weights

        form = QFormLayout()
        form.addRow("Genes (top N)", self.n_genes)
        form.addRow("Also predict", self.include)
        form.addRow("Context", self.context)
        form.addRow("Epochs", self.epochs)
        form.addRow("Encoder", self.encoder)
        form.addRow("Backbone", self.backbone)
        form.addRow("Augment", self.augment)
        form.addRow("Checkpoints", self.checkpoints)
        layout = QVBoxLayout(self)
        layout.addWidget(QLabel("Training data (spots layers with a slide; select several):"))
        layout.addWidget(self.datasets)
        layout.addWidget(self.add_folder)
        layout.addLayout(form)
        layout.addWidget(QLabel("Synthetic pairs (C2L-ST; select to use):"))
        layout.addWidget(self.pairs_list)
        pairs_row = QFormLayout()
        pairs_row.addRow(self.add_pairs_file)
        pairs_row.addRow("Pair weight", self.pairs_weight)
        layout.addLayout(pairs_row)
        layout.addWidget(self.resume)
        layout.addWidget(self.start)
        layout.addWidget(self.jobs)
        layout.addWidget(self.use_button)

        self.folders: list[str] = []
        self.pairs: dict[str, object] = {}  # list label -> SyntheticPairs
        self.model = None
        self.add_folder.clicked.connect(self._ask_folder)
        self.add_pairs_file.clicked.connect(self._ask_pairs_file)
        from napari_hinge._widgets.c2l import pairs_hub

        pairs_hub().pairs_ready.connect(self.add_pairs)
        self.start.clicked.connect(self.run)
        self.use_button.clicked.connect(lambda: self.model_ready.emit(self.model))
        self.jobs.succeeded.connect(self._on_result)
        self.jobs.ended.connect(self._enable_start)
        self.datasets.itemSelectionChanged.connect(self._enable_start)
        self.viewer.layers.events.inserted.connect(self._refresh)
        self.viewer.layers.events.removed.connect(self._refresh)
        self._refresh()

    def _refresh(self, event=None) -> None:
        selected = {item.text() for item in self.datasets.selectedItems()}
        self.datasets.clear()
        names = [layer.name for layer in spot_layers(self.viewer)
                 if layer.metadata.get("slide_path")] + self.folders
        self.datasets.addItems(names)
        for i in range(self.datasets.count()):
            item = self.datasets.item(i)
            item.setSelected(item.text() in selected)
        self._enable_start()

    def _enable_start(self) -> None:
        """Training needs at least one selected dataset, and one run at a time."""
        self.start.setEnabled(bool(self.datasets.selectedItems()) and not self.jobs.running)

    def _ask_folder(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Spatial data folder")
        if folder:
            self.folders.append(folder)
            self._refresh()

    def add_pairs(self, pairs, label: str | None = None) -> str:
        """List synthetic pairs (a SyntheticPairs or a pairs.npz path, checked now) and select
        them; returns their label."""
        from napari_hinge.c2l.pairs import SyntheticPairs, load_pairs

        if not isinstance(pairs, SyntheticPairs):
            label = label or str(pairs)
            pairs = load_pairs(pairs)
        where = Path(pairs.slide_path).name if pairs.slide_path else "unknown slide"
        label = label or f"C2L fill {len(self.pairs) + 1} ({len(pairs)} tiles, {where})"
        self.pairs[label] = pairs
        self.pairs_list.addItem(label)
        self.pairs_list.item(self.pairs_list.count() - 1).setSelected(True)
        return label

    def _ask_pairs_file(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Synthetic pairs", "", "pairs (*.npz)")
        if path:
            self.add_pairs(path)

    def chosen_pairs(self) -> list:
        return [self.pairs[item.text()] for item in self.pairs_list.selectedItems()]

    def chosen_datasets(self) -> list:
        out = []
        for item in self.datasets.selectedItems():
            name = item.text()
            out.append(self.viewer.layers[name].metadata["adata"]
                       if name in self.viewer.layers else name)
        return out

    def run(self):
        from napari_hinge.hinge.pipeline import fit_hinge

        datasets = self.chosen_datasets()
        if not datasets:
            raise RuntimeError("select at least one dataset to train on")
        include = [g.strip() for g in self.include.text().split(",") if g.strip()]
        if [g.lower() for g in include] == ["breast"]:
            from napari_hinge.expression import BREAST_MARKERS

            include = list(BREAST_MARKERS)
        options = {"n_genes": self.n_genes.value(), "epochs": self.epochs.value(),
                   "include": include, "context_um": self.context.value() or None,
                   "encoder": self.encoder.currentText(), "backbone": self.backbone.currentText(),
                   "augment": self.augment.isChecked(),
                   "checkpoint_dir": self.checkpoints.text() or None,
                   "resume": self.resume.isChecked(),
                   "extra_pairs": self.chosen_pairs(),
                   "extra_weight": self.pairs_weight.value()}
        self.start.setEnabled(False)
        self.use_button.setEnabled(False)
        return self.jobs.run(lambda stop: fit_hinge(datasets, stop=stop, **options),
                             description=f"training HINGE on {len(datasets)} dataset(s)")

    def _on_result(self, model) -> None:
        if model is None:
            return
        self.model = model
        self.use_button.setEnabled(True)


class HingeWidget(TabbedDock, QTabWidget):
    """Predict and Train in one dock: a model trained here can be used at once."""

    tab_title = "HINGE"

    def __init__(self, napari_viewer: napari.Viewer) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.predict = PredictWidget(napari_viewer)
        self.train = TrainWidget(napari_viewer)
        self.addTab(self.predict, "Predict")
        self.addTab(self.train, "Train")
        self.setTabToolTip(0, "paint predicted expression and its uncertainty over a slide")
        self.setTabToolTip(1, "train a HINGE model on your own slides")
        self.train.model_ready.connect(self._use_model)

    def _use_model(self, model) -> None:
        self.predict.set_model(model)
        self.setCurrentWidget(self.predict)
