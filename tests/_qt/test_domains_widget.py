"""The Domains widget on a real DLPFC section: runs in a worker, paints Labels under the
spots, highlights and exports; cancelling leaves the user's data untouched."""

from __future__ import annotations

import numpy as np
import pytest

from napari_hinge._widgets.domains import DomainsWidget

PLUGIN = "napari-hinge"


@pytest.fixture
def dlpfc_viewer(make_napari_viewer, shared_data):
    viewer = make_napari_viewer(show=True)
    viewer.open(shared_data / "dlpfc_visium_lowres" / "151673", plugin=PLUGIN)
    return viewer


def test_domains_paint_labels_under_the_spots(dlpfc_viewer, qtbot, tmp_path):
    viewer = dlpfc_viewer
    widget = DomainsWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Domains")
    widget.k_box.setValue(7)
    widget.epochs_box.setValue(20)  # a short run: this test checks the plumbing, not the ARI
    with qtbot.waitSignal(widget.jobs.succeeded, timeout=900_000):
        widget.run()
    labels = widget.labels_layer
    assert labels is not None and labels.data.dtype == np.uint8
    spots = viewer.layers["151673 spots"]
    adata = spots.metadata["adata"]
    assert "domain" in adata.obs and adata.obsm["domain_latent"].shape == (adata.n_obs, 16)
    # Every spot's label lies under its centre, in world (µm) coordinates.
    codes = adata.obs["domain"].cat.codes.to_numpy() + 1
    world = spots.data * np.asarray(spots.scale)
    rc = np.floor(world / np.asarray(labels.scale) + 0.5).astype(int)
    rc = np.clip(rc, 0, np.asarray(labels.data.shape) - 1)
    under = labels.data[rc[:, 0], rc[:, 1]]
    assert (under == codes).mean() > 0.95
    assert widget.legend.count() == 7
    qtbot.wait(50)  # the dock lays the legend out
    # five markers per domain wrap in the dock: nothing runs out of it sideways
    assert widget.legend.horizontalScrollBar().maximum() == 0
    for row in range(7):
        assert widget.legend.visualItemRect(widget.legend.item(row)).right() <= \
            widget.legend.viewport().width()
    assert int(labels.features["n_spots"].sum()) == adata.n_obs

    widget.legend.setCurrentRow(2)
    assert labels.show_selected_label and labels.selected_label == 3
    widget._show_all()
    assert not labels.show_selected_label

    import anndata
    import tifffile

    widget.save(tmp_path / "domains.h5ad")
    widget.save(tmp_path / "domains.tif")
    assert (anndata.read_h5ad(tmp_path / "domains.h5ad").obs["domain"] ==
            adata.obs["domain"]).all()
    assert np.array_equal(tifffile.imread(tmp_path / "domains.tif"), labels.data)


def test_cancel_keeps_the_users_data(dlpfc_viewer, qtbot):
    viewer = dlpfc_viewer
    widget = DomainsWidget(viewer)
    widget.epochs_box.setValue(5000)
    adata = viewer.layers["151673 spots"].metadata["adata"]
    worker = widget.run()
    qtbot.waitUntil(lambda: widget.jobs.last_event is not None, timeout=120_000)
    with qtbot.waitSignal(worker.finished, timeout=120_000):
        widget.jobs.cancel_button.click()
    assert widget.labels_layer is None
    assert not any(layer._type_string == "labels" for layer in viewer.layers)
    assert viewer.layers["151673 spots"].metadata["adata"] is adata
    assert "domain" not in adata.obs
    assert "cancelled" in widget.jobs.status.text()
    assert widget.run_button.isEnabled()
