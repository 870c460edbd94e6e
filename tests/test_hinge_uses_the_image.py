"""HINGE learns from the H&E: real EfficientNet features of real her2st sections, a held-out
section, and two controls on the same split (a tuned ridge on the same inputs, HINGE trained on
features shuffled across spots). Ratios, not floors: the thresholds fail a model that ignores
the image or that falls well behind the linear baseline."""

from __future__ import annotations

import numpy as np
import pytest

from napari_hinge.baselines import TunedRidge
from napari_hinge.encoders import get_encoder
from napari_hinge.expression import load_her2st_sections, make_fold
from napari_hinge.hinge.pipeline import fit_hinge_arrays, model_inputs, standardized
from napari_hinge.hinge.sampler import sample
from napari_hinge.metrics import gene_pearson, interval_coverage
from napari_hinge.training import run_to_end


@pytest.fixture(scope="module")
def fold(shared_data):
    secs = load_her2st_sections(shared_data / "her2st_subset", ["C2", "C4", "C3"],
                                encoder=get_encoder("efficientnet-lite0"), side_px=160)
    return make_fold(secs[:2], secs[2:], n_genes=20)


def _train(fold, features, seed=0, **kwargs):
    gen = fit_hinge_arrays(features, fold.Y_train, fold.genes, coords_um=fold.coords_train,
                           groups=fold.groups_train, epochs=6, batch_size=32, seed=seed,
                           val_fraction=0.15, val_samples=0, **kwargs)
    model, _ = run_to_end(gen)
    inputs = model_inputs(model, fold.X_test, fold.coords_test, fold.groups_test)
    res = sample(model, inputs, n_samples=4, reveal_steps=5, seed=seed)
    return model, inputs, res


def test_hinge_needs_the_image_and_keeps_up_with_a_ridge(fold):
    model, inputs, res = _train(fold, fold.X_train)
    pcc = gene_pearson(res.mean.numpy(), fold.Y_test).mean()

    # the tuned ridge on exactly the inputs the network sees
    train_inputs = standardized(model, model_inputs(model, fold.X_train, fold.coords_train,
                                                    fold.groups_train))
    ridge = TunedRidge().fit(train_inputs, fold.Y_train, groups=fold.groups_train)
    ridge_pcc = gene_pearson(ridge.predict(standardized(model, inputs)), fold.Y_test).mean()

    # the same training with each spot's features given to another spot
    perm = np.random.default_rng(0).permutation(len(fold.X_train))
    _, _, shuffled = _train(fold, fold.X_train[perm])
    shuffled_pcc = gene_pearson(shuffled.mean.numpy(), fold.Y_test).mean()

    assert ridge_pcc > 0.2  # the split is informative at all
    assert pcc >= 0.9 * ridge_pcc, (pcc, ridge_pcc)
    assert shuffled_pcc < 0.5 * pcc, (shuffled_pcc, pcc)


def test_calibrated_intervals_cover_on_the_held_out_section(fold):
    model, _, res = _train(fold, fold.X_train, seed=1)
    assert model.calibration is not None and model.calibration.n_spots >= 10
    mean, raw = res.mean.numpy(), res.std.numpy()
    assert (raw > 0).mean() > 0.99  # the variance head makes the samples spread
    lo, hi = model.calibration.interval(mean, raw, 0.8)
    lo95, hi95 = model.calibration.interval(mean, raw, 0.95)
    cov80 = interval_coverage(lo, hi, fold.Y_test)
    cov95 = interval_coverage(lo95, hi95, fold.Y_test)
    assert 0.65 <= cov80 <= 0.92 and 0.85 <= cov95 <= 0.99, (cov80, cov95)
    raw80 = interval_coverage(mean - 1.28 * raw, mean + 1.28 * raw, fold.Y_test)
    assert abs(cov80 - 0.8) < abs(raw80 - 0.8) or abs(raw80 - 0.8) < 0.05


def test_spread_scaled_by_the_predicted_depth_ranks_errors_better(fold, shared_data):
    """With the spots' library sizes the calibration learns each spot's depth from the image
    (through the prior); on the held-out section the predicted depth follows the measured
    one, the scaled spread ranks the errors better than the spread alone, and the intervals
    still cover."""
    from napari_hinge import pp
    from napari_hinge.expression import load_her2st_sections
    from napari_hinge.hinge.pipeline import calibrated_uncertainty
    from napari_hinge.metrics import spread_error_spearman

    model, _, res = _train(fold, fold.X_train, seed=1, library_size=fold.library_train,
                           depth_calibration=True)
    cal = model.calibration
    assert cal.uses_depth and cal.depth_power > 0
    mean, raw, prior = res.mean.numpy(), res.std.numpy(), res.prior.numpy()
    depth = cal.depth(prior)
    test = load_her2st_sections(shared_data / "her2st_subset", ["C3"],
                                encoder=get_encoder("efficientnet-lite0"), side_px=160)[0]
    measured = np.log(pp.library_size(test.adata))
    assert np.corrcoef(depth, measured)[0, 1] > 0.3
    unc = calibrated_uncertainty(model, mean, raw, prior=prior)
    scaled = spread_error_spearman(unc["std"], mean, fold.Y_test)["per_gene"]
    alone = spread_error_spearman(raw, mean, fold.Y_test)["per_gene"]
    assert scaled > alone + 0.03, (scaled, alone)
    cov80 = interval_coverage(unc["lower_80"], unc["upper_80"], fold.Y_test)
    assert 0.65 <= cov80 <= 0.92, cov80
    with pytest.raises(ValueError, match="depth"):
        cal.sd(raw)  # a caller that forgets the depth is told, not given wrong intervals

    # a recipe's fixed power: fitted on half the held-out spots, it covers the other half
    from napari_hinge.hinge.calibration import DepthMap, fit_calibration

    depth_map = DepthMap(np.asarray(cal.depth_weight), cal.depth_limit)
    half = np.arange(len(mean)) % 2 == 0
    fixed = fit_calibration(mean[half], raw[half], fold.Y_test[half], cal.genes,
                            depth=depth[half], depth_map=depth_map, depth_power=1.5)
    assert fixed.depth_power == 1.5
    lo, hi = fixed.interval(mean[~half], raw[~half], 0.8, depth=depth[~half])
    assert 0.7 <= interval_coverage(lo, hi, fold.Y_test[~half]) <= 0.9
    with pytest.raises(ValueError, match="depth_power"):
        fit_calibration(mean, raw, fold.Y_test, cal.genes, depth=depth, depth_map=depth_map,
                        depth_power=-1.0)

    # depth-scaled multipliers are the worst section's: trained on C2 and C4, the model's
    # are the larger of the two; fitted on two halves of C3 (shallow / deep), the largest
    assert cal.multiplier_sections == 2
    shallow = np.where(depth < np.median(depth), "shallow", "deep")
    worst = fit_calibration(mean, raw, fold.Y_test, cal.genes, depth=depth,
                            depth_map=depth_map, depth_power=1.0, groups=shallow)
    pooled = fit_calibration(mean, raw, fold.Y_test, cal.genes, depth=depth,
                             depth_map=depth_map, depth_power=1.0)
    each = [fit_calibration(mean[shallow == g], raw[shallow == g], fold.Y_test[shallow == g],
                            cal.genes, depth=depth[shallow == g], depth_map=depth_map,
                            depth_power=1.0) for g in ("shallow", "deep")]
    assert worst.multiplier_sections == 2 and pooled.multiplier_sections == 1
    for level in (0.8, 0.95):  # the same per-gene scale (pooled), the larger multiplier
        assert worst.multiplier(level) >= pooled.multiplier(level)
        assert worst.multiplier(level) >= min(c.multiplier(level) for c in each)
    plain = fit_calibration(mean, raw, fold.Y_test, cal.genes, groups=shallow)
    assert plain.multiplier_sections == 1  # without depth the spots stay pooled
