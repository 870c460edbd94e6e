"""The docks start from the one table of defaults (napari_hinge.defaults), as the library and
the command line do (tests/test_defaults.py)."""

from __future__ import annotations

import inspect

from napari_hinge import defaults
from napari_hinge._widgets import c2l, domains, hinge


def test_docks_start_from_the_table(make_napari_viewer):
    viewer = make_napari_viewer()
    adapt = inspect.signature(c2l.adapt_job).parameters
    assert adapt["steps"].default == defaults.C2L_ADAPT["steps"]
    assert adapt["batch_size"].default == defaults.C2L_ADAPT["batch_size"]
    dock = c2l.C2LWidget(viewer)
    assert dock.adapt_steps.value() == defaults.C2L_ADAPT["steps"]
    assert dock.n_genes.value() == defaults.C2L_ADAPT["n_genes"]
    assert dock.steps.value() == defaults.C2L_FILL["steps"]
    assert dock.guidance.value() == defaults.C2L_FILL["guidance"]
    assert dock.strength.value() == defaults.C2L_FILL["strength"]
    assert dock.spacings.value() == defaults.C2L_FILL["n_spacings"]
    dom = domains.DomainsWidget(viewer)
    assert dom.seed_box.value() == defaults.STMGAC["seed"]
    assert dom.k_box.value() == defaults.STMGAC["n_domains"]
    predict = hinge.PredictWidget(viewer)
    assert predict.samples_box.value() == defaults.SAMPLER["slide_samples"]
    assert predict.steps_box.value() == defaults.SAMPLER["reveal_steps"]
    train = hinge.TrainWidget(viewer)
    assert train.epochs.value() == defaults.HINGE_TRAIN["epochs"]
    assert train.n_genes.value() == defaults.HINGE_TRAIN["n_genes"]
    assert train.context.value() == defaults.HINGE_RECIPE["context_um"]
