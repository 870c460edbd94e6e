"""napari_hinge.pl draws spots over their H&E at the right place and scale: checked on the
rendered pixels of the shipped sample (the slide shows where there is no spot; each spot's
centre has its value's colour), not only "it does not crash"."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pytest
from PIL import Image

from napari_hinge import pl, pp, tl
from napari_hinge.datasets import load_her2st_sample
from napari_hinge.io.slides import open_slide


@pytest.fixture(scope="module")
def sample():
    return load_her2st_sample()


def _render(fig, path):
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return np.asarray(Image.open(path).convert("RGB")).astype(np.float64)


def _display_px(ax, fig, xy_data):
    """Data coordinates -> (row, col) of the saved PNG (matplotlib's origin is bottom-left)."""
    disp = ax.transData.transform(xy_data)
    height = fig.get_size_inches()[1] * 100
    return np.c_[height - disp[:, 1], disp[:, 0]].round().astype(int)


def test_background_is_the_slide_window_at_the_convention(sample):
    rgb, extent = pl.slide_background(sample, max_side=1000)
    meta = sample.uns["napari_hinge"]
    with open_slide(meta["slide_path"]) as slide:
        h0, w0 = slide.shape
        d = (extent[1] - extent[0]) / rgb.shape[1]  # level-0 pixels per drawn pixel
        level = min(range(slide.n_levels), key=lambda i: abs(w0 / slide.levels[i].shape[1] - d))
        assert abs(h0 / slide.levels[level].shape[0] - d) < 0.01
        left, top = extent[0] + 0.5, extent[3] + 0.5  # level-0 edge of the window
        r0, c0 = round(top / d), round(left / d)
        np.testing.assert_array_equal(
            rgb, np.asarray(slide.levels[level][r0:r0 + rgb.shape[0], c0:c0 + rgb.shape[1]]))
    assert 1000 <= max(rgb.shape[:2]) < 2 * 1000 + 2  # the smallest level at least that long
    # the window covers every spot with a margin
    xy = sample.obsm["spatial"]
    assert extent[0] <= xy[:, 0].min() and extent[1] >= xy[:, 0].max()
    assert extent[3] <= xy[:, 1].min() and extent[2] >= xy[:, 1].max()


def test_genes_colours_each_spot_over_the_slide(sample, tmp_path):
    gene = "ERBB2"
    fig = pl.genes(sample, gene, alpha=1.0)
    ax = fig.axes[0]
    assert len(ax.images) == 1 and len(ax.collections) == 1
    spots = ax.collections[0]
    assert len(spots.get_offsets()) == sample.n_obs
    mpp = sample.uns["napari_hinge"]["microns_per_pixel"]
    np.testing.assert_allclose(spots.get_offsets(), sample.obsm["spatial"] * mpp)
    values = pp.expression_values(sample, [gene])[0][:, 0]
    np.testing.assert_array_equal(spots.get_array(), values)
    expected = spots.to_rgba(values)[:, :3] * 255
    # the spot discs: in µm, one spot diameter wide
    diameter_um = sample.uns["napari_hinge"]["spot_diameter_px"] * mpp
    np.testing.assert_allclose(spots._widths * 2, diameter_um, rtol=1e-6)

    png = _render(fig, tmp_path / "genes.png")
    centres = _display_px(ax, fig, sample.obsm["spatial"] * mpp)
    seen = png[centres[:, 0], centres[:, 1]]
    err = np.abs(seen - expected).mean(axis=1)
    assert np.median(err) < 6 and (err < 20).mean() > 0.95, np.percentile(err, [50, 95])

    # away from every spot, inside the window: the H&E itself
    rgb, extent = pl.slide_background(sample)
    xy = sample.obsm["spatial"]
    step = sample.uns["napari_hinge"]["spot_diameter_px"]
    grid = np.stack(np.meshgrid(np.arange(xy[:, 0].min(), xy[:, 0].max(), step / 3),
                                np.arange(xy[:, 1].min(), xy[:, 1].max(), step / 3)), -1)
    grid = grid.reshape(-1, 2)
    far = grid[np.min(np.hypot(*(grid[:, None, :] - xy[None, :2000]).transpose(2, 0, 1)),
                      axis=1) > 1.5 * step]
    assert len(far) > 20
    d = (extent[1] - extent[0]) / rgb.shape[1]
    cols = ((far[:, 0] - extent[0]) / d).astype(int)
    rows = ((far[:, 1] - extent[3]) / d).astype(int)
    slide_px = rgb[rows, cols].astype(np.float64)
    shown = png[tuple(_display_px(ax, fig, far * mpp).T)]
    # resampling blurs single pixels: compare with the slide, and with the slide shifted
    # by half a spot (a misplaced image would match that as well as the right one)
    right = np.abs(shown - slide_px).mean()
    shifted = rgb[np.clip(rows + int(step / 2 / d), 0, rgb.shape[0] - 1), cols].astype(float)
    assert right < 25 and right < np.abs(shown - shifted).mean()


def _panels(fig):
    return [a for a in fig.axes if a.get_label() != "<colorbar>"]


def test_predictions_and_domains_read_what_tl_wrote(sample, tmp_path):
    spots = sample[:60].copy()
    tl.predict(spots, n_samples=2, reveal_steps=2, progress=False)
    fig = pl.predictions(spots, ["ERBB2", "CD74"])
    axes = _panels(fig)
    assert len(axes) == 4 and all(len(a.images) == 1 for a in axes)
    assert [a.get_title() for a in axes] == [
        "ERBB2: predicted mean", "ERBB2: predicted sd", "CD74: predicted mean",
        "CD74: predicted sd"]
    j = spots.uns["hinge"]["genes"].index("CD74")
    np.testing.assert_array_equal(axes[2].collections[0].get_array(),
                                  spots.obsm["hinge_mean"][:, j])
    np.testing.assert_array_equal(axes[3].collections[0].get_array(),
                                  spots.obsm["hinge_std"][:, j])
    _render(fig, tmp_path / "pred.png")
    with pytest.raises(KeyError, match="not predicted"):
        pl.predictions(spots, ["NOT_A_GENE"])

    spots.obs["domain"] = np.where(spots.obsm["spatial"][:, 0] > np.median(
        spots.obsm["spatial"][:, 0]), "1", "0")
    ax = pl.domains(spots)
    assert len(ax.images) == 1
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == ["0", "1"]
    colours = ax.collections[0].get_facecolors()
    left = spots.obs["domain"].to_numpy() == "0"
    assert len({tuple(c) for c in colours[left]}) == 1 and \
        not np.allclose(colours[left][0], colours[~left][0])
    plt.close(ax.figure)
    with pytest.raises(KeyError, match="tl.domains"):
        pl.domains(spots, key="nope")
