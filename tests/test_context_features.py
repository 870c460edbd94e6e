"""Neighbour context and per-section centring: the inputs every HINGE and baseline run sees."""

from __future__ import annotations

import numpy as np
import pytest

from napari_hinge.features import center_per_group, context_features


def test_context_is_the_mean_of_neighbours_within_the_radius_and_section():
    f = np.arange(15, dtype=np.float32).reshape(5, 3)
    xy = np.array([[0, 0], [100, 0], [0, 100], [1000, 1000], [50, 0.0]])
    groups = ["a", "a", "a", "a", "b"]
    out = context_features(f, xy, radius_um=150, groups=groups)
    assert out.shape == (5, 6)
    np.testing.assert_array_equal(out[:, :3], f)
    np.testing.assert_allclose(out[0, 3:], (f[1] + f[2]) / 2)  # spot 4 is in another section
    np.testing.assert_allclose(out[3, 3:], f[3])  # no neighbour: its own features
    views = context_features(np.stack([f, 2 * f]), xy, radius_um=150, groups=groups)
    np.testing.assert_allclose(views[1, 0, 3:], 2 * out[0, 3:])  # each view with its own
    with pytest.raises(ValueError, match="coords_um"):
        context_features(f, xy[:4], radius_um=150)


def test_centring_removes_each_sections_mean_per_view():
    rng = np.random.default_rng(0)
    f = rng.standard_normal((2, 6, 4)).astype(np.float32) + np.array([[[5.0]], [[-3.0]]])
    groups = np.array([0, 0, 0, 1, 1, 1])
    out = center_per_group(f, groups)
    for v in range(2):
        for g in (0, 1):
            np.testing.assert_allclose(out[v, groups == g].mean(0), 0, atol=1e-5)
    # a spot's centred view-0 features do not depend on the other views
    np.testing.assert_allclose(center_per_group(f[0], groups), out[0], atol=1e-6)
