"""One table of defaults (napari_hinge.defaults): the library's keyword defaults, the command
line's option defaults and the widgets' initial values are the table's."""

from __future__ import annotations

import argparse
import importlib
import inspect

import pytest

from napari_hinge import cli, defaults


def _kw(func, name):
    return inspect.signature(func).parameters[name].default


def _options(command: str) -> dict:
    module, registered, _ = cli.COMMANDS[command]
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    importlib.import_module(module).register(sub)
    return {a.dest: a.default for a in sub.choices[registered]._actions}


def test_hinge_training_defaults_agree():
    from napari_hinge.hinge import defaults as hinge_defaults
    from napari_hinge.hinge.pipeline import fit_hinge, fit_hinge_arrays
    from napari_hinge.hinge.train import train_hinge

    table = defaults.HINGE_TRAIN
    assert hinge_defaults.TRAIN is table and hinge_defaults.SAMPLER is defaults.SAMPLER
    cli_train = _options("hinge train")
    for name in ("epochs", "batch_size", "lr", "seed"):
        assert _kw(train_hinge, name) == _kw(fit_hinge_arrays, name) == table[name] == \
            cli_train[name], name
    for name in ("ada_rank", "val_fraction"):
        assert _kw(fit_hinge_arrays, name) == cli_train[name] == table[name], name
    assert _kw(fit_hinge, "n_genes") == cli_train["n_genes"] == table["n_genes"]
    assert _kw(fit_hinge, "epochs") == table["epochs"]
    assert cli_train["context_um"] == defaults.HINGE_RECIPE["context_um"]
    assert cli_train["depth_calibration"] == _kw(fit_hinge_arrays, "depth_calibration") == \
        defaults.HINGE_RECIPE["depth_calibration"]


def test_sampler_defaults_agree():
    from napari_hinge import tl
    from napari_hinge.c2l.fill import expression_from_hinge
    from napari_hinge.hinge.pipeline import calibrate_on, predict_spots
    from napari_hinge.hinge.sampler import sample

    table = defaults.SAMPLER
    for func in (sample, predict_spots, tl.predict, calibrate_on):
        assert _kw(func, "n_samples") == table["n_samples"], func.__name__
        assert _kw(func, "reveal_steps") == table["reveal_steps"], func.__name__
    predict = _options("hinge predict")
    assert predict["samples"] == table["n_samples"]
    assert predict["reveal_steps"] == table["reveal_steps"]
    assert _options("hinge predict-slide")["samples"] == table["slide_samples"]
    # a C2L-ST region conditioned on HINGE is a map of many positions, like a slide
    assert _kw(expression_from_hinge, "n_samples") == table["slide_samples"]
    assert _kw(expression_from_hinge, "reveal_steps") == table["reveal_steps"]


def test_stmgac_defaults_agree():
    from napari_hinge import tl

    table = defaults.STMGAC
    options = _options("stmgac domains")
    for func in (tl.domains, tl.domains_iter):
        assert _kw(func, "seed") == options["seed"] == table["seed"]
        assert _kw(func, "method") == options["method"] == table["method"]
        assert _kw(func, "preset") == options["preset"] == table["preset"]
        assert _kw(func, "covariance_type") == table["covariance_type"]


@pytest.mark.parametrize(("command", "row", "trainer"), [
    ("c2l pretrain", "C2L_PRETRAIN", "train_central"),
    ("c2l adapt", "C2L_ADAPT", "train_local"),
])
def test_c2l_training_defaults_agree(command, row, trainer):
    from napari_hinge.c2l import train

    table, options = getattr(defaults, row), _options(command)
    func = getattr(train, trainer)
    for name in ("steps", "batch_size", "lr"):
        assert _kw(func, name) == options[name] == table[name], name
    assert _kw(func, "ema_decay") == options["ema"] == table["ema_decay"]
    assert options["seed"] == table["seed"]


def test_c2l_fill_defaults_agree():
    from napari_hinge.c2l.fill import fill_region_iter

    table, options = defaults.C2L_FILL, _options("c2l fill")
    for name in ("n_spacings", "source", "k", "guidance", "steps", "strength", "max_tiles",
                 "seed"):
        assert _kw(fill_region_iter, name) == options[name] == table[name], name
