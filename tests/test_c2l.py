"""C2L-ST: schedule and sampler, central/local models, training, region filling, CLI.

Tiny networks on real patches of the shipped her2st C3 sample (64 px = 112 µm of tissue).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from napari_hinge.c2l.autoencoder import AutoencoderConfig, PatchAutoencoder, image_loss
from napari_hinge.c2l.canvas import canvas_windows, window_weight
from napari_hinge.c2l.central import CentralConfig, CentralModel
from napari_hinge.c2l.data import paired_spots, slide_patches
from napari_hinge.c2l.fill import (
    FillResult,
    as_training_pairs,
    expression_from_neighbours,
    fill_region,
    fill_region_iter,
    propose_sparse_tiles,
    spot_spacing_px,
    tiles_in_polygon,
)
from napari_hinge.c2l.local import LocalModel, build_local
from napari_hinge.c2l.schedule import NoiseSchedule, ddim_sample, from_uint8, to_uint8
from napari_hinge.c2l.train import refine_decoder, train_autoencoder, train_central, train_local
from napari_hinge.c2l.unet import UNetConfig
from napari_hinge.training import StopToken, run_to_end

GENES = ["ERBB2", "GRB7", "CD74", "MGP", "KRT19", "SCGB2A2"]


TINY_AE = AutoencoderConfig(channels=(8, 16, 32), groups=8)


def tiny_central(seed: int = 0, latent: bool = True) -> CentralModel:
    """A tiny central model; latent (like the shipped one) unless ``latent=False``."""
    torch.manual_seed(seed)
    unet = {"channels": (16, 32), "attention_levels": (1,), "time_dim": 32, "groups": 8}
    if latent:
        cfg = CentralConfig(unet=UNetConfig(image_size=16, in_channels=4, stem=1, **unet),
                            autoencoder=TINY_AE, timesteps=100)
    else:
        cfg = CentralConfig(unet=UNetConfig(stem=4, **unet), timesteps=100)
    return CentralModel(cfg)


@pytest.fixture(scope="module")
def sample():
    from napari_hinge.datasets import load_her2st_sample

    return load_her2st_sample()


@pytest.fixture(scope="module")
def slide(sample):
    from napari_hinge.io.slides import open_slide

    meta = sample.uns["napari_hinge"]
    return open_slide(meta["slide_path"], mpp=meta["microns_per_pixel"])


@pytest.fixture(scope="module")
def pairs(sample, slide):
    genes = [g for g in GENES if g in sample.var_names]
    assert len(genes) >= 4
    return paired_spots(sample, genes, slide=slide)


@pytest.fixture(scope="module")
def trained_local(pairs):
    patches, expr, genes, _ = pairs
    local = build_local(tiny_central(), genes, hidden=32, seed=0)
    model, last = run_to_end(train_local(local, patches, expr, steps=6, batch_size=8,
                                         eval_every=3, val_count=8))
    assert last.kind == "done"
    return model


# ---------------------------------------------------------------------------------------------
# schedule and sampler


def test_schedule_is_monotone_and_v_inverts():
    s = NoiseSchedule(1000)
    ab = s.alpha_bar
    assert ab[0] > 0.999 and ab[-1] < 1e-3 and torch.all(ab[1:] < ab[:-1])
    x0, noise = torch.rand(4, 3, 8, 8) * 2 - 1, torch.randn(4, 3, 8, 8)
    t = torch.tensor([0, 10, 500, 999])
    xt, v = s.add_noise(x0, noise, t), s.v_target(x0, noise, t)
    a, sg = s.coefficients(t)
    torch.testing.assert_close(a * xt - sg * v, x0, atol=1e-5, rtol=0)


def test_ddim_with_an_oracle_recovers_the_target_image():
    """A network that predicts the exact v for a known x0 must lead DDIM to that x0, at any
    number of steps and with guidance (both branches agree)."""
    s = NoiseSchedule(200)
    target = torch.rand(2, 3, 8, 8) * 1.6 - 0.8

    def oracle(x, t, cond):
        a, sg = s.coefficients(t)
        eps = (x - a * target) / sg
        return a * eps - sg * target

    for steps in (1, 5, 50):
        out = ddim_sample(oracle, s, target.shape, cond=torch.zeros(2, 1), guidance=3.0,
                          steps=steps, generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(out, target, atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="DDIM steps"):
        ddim_sample(oracle, s, target.shape, steps=0)


def test_sdedit_starts_from_the_init_at_its_strength():
    """Editing: x_init is noised to strength * (T - 1) and denoised from there, so a network
    that knows nothing (v = 0) returns a shrunken, noised copy at low strength and forgets the
    init at strength 1."""
    s = NoiseSchedule(200)
    init = torch.rand(4, 3, 8, 8) * 1.6 - 0.8
    zero = lambda x, t, cond: torch.zeros_like(x)  # noqa: E731
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    assert s.ddim_timesteps(5, strength=0.5) == [100, 75, 50, 25, 0]
    low = ddim_sample(zero, s, init.shape, x_init=init, strength=0.05, steps=5, generator=g())
    full = ddim_sample(zero, s, init.shape, x_init=init, strength=1.0, steps=5, generator=g())
    fresh = ddim_sample(zero, s, init.shape, steps=5, generator=g())
    assert torch.corrcoef(torch.stack([low.flatten(), init.flatten()]))[0, 1] > 0.95
    torch.testing.assert_close(full, fresh, atol=2e-2, rtol=0)  # alpha_bar(T-1) ~ 0
    with pytest.raises(ValueError, match="strength"):
        ddim_sample(zero, s, init.shape, x_init=init, strength=0.0, steps=5)
    with pytest.raises(ValueError, match="x_init has shape"):
        ddim_sample(zero, s, (1, 3, 8, 8), x_init=init, strength=0.5, steps=5)


def test_uint8_round_trip_and_bad_input():
    img = np.random.default_rng(0).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    np.testing.assert_array_equal(to_uint8(from_uint8(img)), img)
    with pytest.raises(ValueError, match="uint8"):
        from_uint8(img.astype(np.float32))


# ---------------------------------------------------------------------------------------------
# data


def test_slide_patches_are_tissue_at_the_physical_scale(slide):
    patches, centres = slide_patches(slide, max_patches=12, seed=0)
    assert patches.shape == (12, 64, 64, 3) and patches.dtype == np.uint8
    assert len(centres) == 12
    # tissue, not glass: H&E patches are clearly darker than white background on average
    assert patches.mean() < 225
    assert patches.std(axis=(1, 2, 3)).min() > 5


def test_paired_spots_on_the_sample(sample, pairs):
    patches, expr, genes, keep = pairs
    assert patches.shape == (len(keep), 64, 64, 3)
    assert expr.shape == (len(keep), len(genes))
    from napari_hinge.hinge.pipeline import transform_values

    full, _ = transform_values(sample, genes)
    np.testing.assert_allclose(expr, full[keep])
    with pytest.raises(KeyError, match="NOT_A_GENE"):
        paired_spots(sample, ["ERBB2", "NOT_A_GENE"])


# ---------------------------------------------------------------------------------------------
# models


@pytest.mark.parametrize("latent", [True, False])
def test_central_save_load_round_trip(tmp_path, latent):
    m = tiny_central(latent=latent)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    m.save(tmp_path / "c")
    m2 = CentralModel.load(tmp_path / "c")
    for (k, a), (k2, b) in zip(m.state_dict().items(), m2.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(a, b)
    x, t = torch.randn(2, *m.config.sample_shape), torch.tensor([3, 50])
    with torch.no_grad():
        assert torch.equal(m.eval()(x, t), m2(x, t))
    np.testing.assert_array_equal(m.sample(2, steps=2, seed=4), m2.sample(2, steps=2, seed=4))
    with pytest.raises(FileNotFoundError, match="not found"):
        CentralModel.load(tmp_path / "missing")
    cfg = json.loads((tmp_path / "c" / "config.json").read_text())
    cfg["kind"] = "something-else"
    (tmp_path / "c" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="not a 'c2l-central' model"):
        CentralModel.load(tmp_path / "c")


def test_half_precision_save_halves_the_file_and_reloads_identically(tmp_path):
    m = tiny_central()
    m.save(tmp_path / "f32")
    m.save(tmp_path / "f16", half=True)
    size = lambda d: (tmp_path / d / "model.safetensors").stat().st_size  # noqa: E731
    assert size("f16") < 0.6 * size("f32")
    a, b = CentralModel.load(tmp_path / "f16"), CentralModel.load(tmp_path / "f16")
    for (k, x), y in zip(a.state_dict().items(), m.state_dict().values(), strict=True):
        assert x.dtype == y.dtype, k  # back in float32 for computing
        if x.is_floating_point():
            assert torch.equal(x, y.half().float()), k
    np.testing.assert_array_equal(a.sample(2, steps=2, seed=1), b.sample(2, steps=2, seed=1))


def test_latent_config_must_fit_the_autoencoder_code():
    with pytest.raises(ValueError, match="latent UNet needs in_channels 4, image_size 16"):
        CentralConfig(unet=UNetConfig(stem=4), autoencoder=AutoencoderConfig())
    cfg = tiny_central().config
    assert cfg.image_size == 64 and cfg.sample_shape == (4, 16, 16)
    assert cfg.microns_per_pixel == pytest.approx(112 / 64)


def test_autoencoder_learns_real_patches_and_standardises_its_code(slide):
    patches, _ = slide_patches(slide, max_patches=48, seed=3)
    x = from_uint8(patches)
    torch.manual_seed(0)
    ae = PatchAutoencoder(TINY_AE)
    with torch.no_grad():
        untrained = float(image_loss(ae.decoder(ae.encoder(x)), x))
    events = []
    ae, last = run_to_end(train_autoencoder(ae, patches, steps=30, batch_size=8, lr=3e-3,
                                            val_count=8, eval_every=10, ema_decay=0.9),
                          events.append)
    vals = [e.val_loss for e in events if e.kind == "epoch"]
    assert last.kind == "done" and vals[-1] < 0.6 * untrained, (untrained, vals)
    with torch.no_grad():
        code = ae.encode(x)
        back = ae.decode(code)
    assert code.shape == (48, 4, 16, 16) and back.shape == x.shape
    assert back.abs().max() <= 1
    # statistics measured on the training patches: the code is ~standardised per channel
    np.testing.assert_allclose(code[:40].mean(dim=(0, 2, 3)), 0, atol=0.35)
    np.testing.assert_allclose(code[:40].std(dim=(0, 2, 3)), 1, atol=0.35)
    # the central model takes the trained autoencoder over, frozen
    central = tiny_central()
    central.set_autoencoder(ae)
    torch.testing.assert_close(central.encode(x[:2]), code[:2], atol=1e-5, rtol=1e-5)
    recon = central.reconstruct(patches[:5], batch_size=2)  # batches of 2, 2 and 1
    assert recon.dtype == np.uint8 and recon.shape == patches[:5].shape
    np.testing.assert_array_equal(recon, to_uint8(central.decode(central.encode(x[:5]))))
    assert not any(p.requires_grad for p in central.autoencoder.parameters())
    with pytest.raises(ValueError, match="no autoencoder"):
        tiny_central(latent=False).set_autoencoder(ae)


def test_decoder_refinement_keeps_the_code_and_resumes_exactly(slide, tmp_path):
    patches, _ = slide_patches(slide, max_patches=24, seed=4)
    torch.manual_seed(0)
    ae, _ = run_to_end(train_autoencoder(PatchAutoencoder(TINY_AE), patches, steps=4,
                                         batch_size=4, val_count=4, eval_every=2))
    before = {k: v.clone() for k, v in ae.state_dict().items()}
    # warm-up of 2 steps, then 3 steps with the critic's term in the decoder's loss
    kw = {"steps": 5, "batch_size": 4, "critic_warmup": 2, "val_count": 4, "eval_every": 2,
          "seed": 3}

    def fresh():
        model = PatchAutoencoder(TINY_AE)
        model.load_state_dict(before)
        return model

    ref, last = run_to_end(refine_decoder(fresh(), patches, **kw))
    assert last.kind == "done" and np.isfinite(last.val_loss)
    for k, v in ref.state_dict().items():  # encoder and code statistics untouched
        if not k.startswith("decoder."):
            torch.testing.assert_close(v, before[k], atol=0, rtol=0, msg=k)
    assert any(not torch.equal(v, before[k]) for k, v in ref.state_dict().items()
               if k.startswith("decoder."))
    stop = StopToken()

    def on_event(e):
        if e.kind == "step" and e.step == 3:
            stop.request()

    _, last = run_to_end(refine_decoder(fresh(), patches, checkpoint_dir=tmp_path, stop=stop,
                                        **kw), on_event)
    assert last.kind == "stopped"
    resumed, _ = run_to_end(refine_decoder(fresh(), patches, checkpoint_dir=tmp_path,
                                           resume=True, **kw))
    for (k, a), b in zip(ref.state_dict().items(), resumed.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=k)


def test_shipped_central_loads_and_samples():
    m = CentralModel.load("shipped")
    assert m.autoencoder is not None, "the shipped central model is a latent model"
    out = m.sample(2, steps=3, seed=0)
    assert out.shape == (2, 64, 64, 3) and out.dtype == np.uint8


def test_local_starts_as_the_central_model_and_trains_only_the_adapter(pairs):
    patches, expr, genes, _ = pairs
    central = tiny_central()
    with torch.no_grad():  # a non-trivial "pre-trained" central model
        central.unet.out.weight.normal_(0, 0.05)
    before = {k: v.clone() for k, v in central.state_dict().items()}
    local = build_local(central, genes, hidden=32)
    x, t = central.encode(from_uint8(patches[:4])), torch.tensor([5, 20, 50, 90])
    cond = torch.as_tensor(expr[:4])
    with torch.no_grad():
        torch.testing.assert_close(local(x, t, cond), central(x, t), atol=0, rtol=0)
    model, _ = run_to_end(train_local(local, patches, expr, steps=5, batch_size=8,
                                      eval_every=5, val_count=8, lr=5e-3))
    for k, v in central.state_dict().items():
        assert torch.equal(v, before[k]), f"central weight {k} changed"
    assert any(h.weight.abs().sum() > 0 for h in model.film)
    with torch.no_grad():
        a = model(x, t, cond)
        b = model(x, t, cond.flip(0))
        u = model(x, t, None)
    assert (a - b).abs().max() > 1e-6, "the output ignores the expression"
    assert (a - u).abs().max() > 1e-6


def test_local_save_load_round_trip(trained_local, tmp_path):
    trained_local.save(tmp_path / "local")
    back = LocalModel.load(tmp_path / "local")
    assert back.genes == trained_local.genes
    for (k, a), (k2, b) in zip(trained_local.state_dict().items(), back.state_dict().items(),
                               strict=True):
        assert k == k2 and torch.equal(a, b), k
    e = np.tile(trained_local.expr_mean.numpy(), (2, 1))
    np.testing.assert_array_equal(trained_local.sample(e, steps=2, seed=3),
                                  back.sample(e, steps=2, seed=3))
    with pytest.raises(ValueError, match="not a 'c2l-local' model"):
        LocalModel.load(tmp_path / "local" / "central")


def test_local_rejects_wrong_expression_width(trained_local):
    with pytest.raises(ValueError, match="expression must be"):
        trained_local.sample(np.zeros((2, 3)), steps=2)


# ---------------------------------------------------------------------------------------------
# training


@pytest.mark.parametrize("latent", [True, False])
def test_central_training_lowers_the_loss_on_real_patches(slide, latent):
    patches, _ = slide_patches(slide, max_patches=40, seed=1)
    model = tiny_central(latent=latent)
    events = []
    model, last = run_to_end(train_central(model, patches, steps=40, batch_size=8, lr=3e-3,
                                           val_count=8, eval_every=20, ema_decay=0.9),
                             events.append)
    vals = [e.val_loss for e in events if e.kind == "epoch"]
    # an untrained (zero-output) network scores E[v^2] ~ 1 on the fixed validation draw
    assert last.kind == "done" and vals[-1] < 0.6, vals
    assert [e.step for e in events if e.kind == "step"] == list(range(1, 41))


def test_training_resumes_exactly_after_a_stop(slide, tmp_path):
    patches, _ = slide_patches(slide, max_patches=24, seed=2)
    kw = {"steps": 6, "batch_size": 4, "lr": 1e-3, "val_count": 4, "eval_every": 3, "seed": 5}
    ref, _ = run_to_end(train_central(tiny_central(), patches, **kw))

    stop = StopToken()
    seen = []

    def on_event(e):
        seen.append(e.kind)
        if e.kind == "step" and e.step == 4:
            stop.request()

    _, last = run_to_end(train_central(tiny_central(), patches, checkpoint_dir=tmp_path,
                                       stop=stop, **kw), on_event)
    assert last.kind == "stopped" and (tmp_path / "last.pt").is_file()
    resumed, last = run_to_end(train_central(tiny_central(seed=9), patches,
                                             checkpoint_dir=tmp_path, resume=True, **kw))
    assert last.kind == "done"
    for (k, a), b in zip(ref.state_dict().items(), resumed.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=k)
    with pytest.raises(FileNotFoundError, match="cannot resume"):
        run_to_end(train_central(tiny_central(), patches, checkpoint_dir=tmp_path / "none",
                                 resume=True, **kw))


def test_train_rejects_bad_patches():
    with pytest.raises(ValueError, match="uint8"):
        run_to_end(train_central(tiny_central(), np.zeros((4, 32, 32, 3), np.uint8)))


# ---------------------------------------------------------------------------------------------
# filling


def test_neighbour_expression_is_exact_at_a_spot(sample):
    xy = np.asarray(sample.obsm["spatial"], float)
    from napari_hinge.hinge.pipeline import transform_values

    vals, _ = transform_values(sample, GENES)
    got = expression_from_neighbours(sample, GENES, xy[:5] + 1e-9, k=1)
    np.testing.assert_allclose(got, vals[:5], rtol=1e-5)
    mid = (xy[0] + xy[1]) / 2
    two = expression_from_neighbours(sample, GENES, mid[None], k=2)
    if np.allclose(np.linalg.norm(xy - mid, axis=1)[[0, 1]], np.sort(
            np.linalg.norm(xy - mid, axis=1))[:2]):
        np.testing.assert_allclose(two[0], vals[:2].mean(0), rtol=1e-4)
    with pytest.raises(KeyError, match="NOPE"):
        expression_from_neighbours(sample, ["NOPE"], xy[:1])


def test_proposed_sparse_tiles_are_tissue_far_from_spots(sample, slide):
    from scipy.spatial import cKDTree

    side = 112.0 / sample.uns["napari_hinge"]["microns_per_pixel"]
    layout = propose_sparse_tiles(slide, sample, side_px=side, n_spacings=0.6)
    assert len(layout) > 0
    d, _ = cKDTree(sample.obsm["spatial"]).query(layout.centers_xy)
    assert d.min() > 0.6 * spot_spacing_px(sample)
    assert layout.rows.min() == 0 and layout.cols.min() == 0
    with pytest.raises(ValueError, match="no tissue tile"):
        propose_sparse_tiles(slide, sample, side_px=side, n_spacings=1e6)


def test_polygon_tiles_and_placement():
    poly = np.array([[100, 200], [420, 200], [420, 390], [100, 390]], float)
    layout = tiles_in_polygon(poly, side_px=80.0)
    # 320 x 190 px: 4 columns; the third row's centres (y = 400) fall outside the polygon
    assert layout.shape == (2, 4) and len(layout) == 8
    patches = np.zeros((8, 64, 64, 3), np.uint8)
    res = FillResult(np.zeros((2 * 64, 4 * 64, 4), np.uint8), layout, patches,
                     np.zeros((8, 1), np.float32), ["G"], 0.5)
    place = res.placement()
    d = 80.0 / 64
    assert place["scale"] == pytest.approx((d * 0.5, d * 0.5))
    # the centre of tile (r, c) in the mosaic lands on its level-0 centre, in napari's pixel
    # convention (slide pixel i centred at world i * mpp)
    for i in (0, 5, 7):
        r, c = layout.rows[i], layout.cols[i]
        world = np.array(place["translate"]) + np.array(place["scale"]) * (
            np.array([r, c]) * 64 + 31.5)
        cx, cy = layout.centers_xy[i]
        np.testing.assert_allclose(world, [(cy - 0.5) * 0.5, (cx - 0.5) * 0.5], atol=1e-9)
    with pytest.raises(ValueError, match="no tile centre"):
        tiles_in_polygon(poly, side_px=5000.0)
    with pytest.raises(ValueError, match=">= 3"):
        tiles_in_polygon(poly[:2], side_px=10.0)


def test_fill_region_end_to_end(trained_local, sample, slide, capsys):
    xy = np.asarray(sample.obsm["spatial"], float)
    x0, y0 = xy.min(0)
    side = 112.0 / sample.uns["napari_hinge"]["microns_per_pixel"]
    poly = np.array([[x0, y0], [x0 + 2 * side, y0], [x0 + 2 * side, y0 + 2 * side],
                     [x0, y0 + 2 * side]])
    events = []
    gen = fill_region_iter(trained_local, slide, sample, region=poly, steps=3, guidance=2.0)
    res, last = run_to_end(gen, events.append)
    assert last.kind == "done" and isinstance(res, FillResult)
    n = len(res.layout)
    assert n == 4 and res.patches.shape == (4, 64, 64, 3)
    assert res.mosaic.shape == (128, 128, 4) and (res.mosaic[..., 3] == 255).all()
    assert res.expression.shape == (4, len(trained_local.genes))
    table = res.table()
    assert list(table.columns[:4]) == ["row", "col", "x", "y"]
    assert list(table.columns[4:]) == trained_local.genes
    # seamless by default: 9 windows on a 2 x 2 block (4 tiles, 2 + 2 pairs, 1 block),
    # guided (conditional + unconditional) at each of the 3 steps
    assert events[-2].step == events[-2].total_steps == 9 * 2 * 3
    assert res.params["seamless"] is True
    # the tiles handed out as training pairs are the mosaic's own pixels
    np.testing.assert_array_equal(res.mosaic[64:128, 0:64, :3],
                                  res.patches[res.tile_index_raster()[1, 0]])
    # deterministic for a seed
    again = fill_region(trained_local, slide, sample, region=poly, steps=3, guidance=2.0)
    np.testing.assert_array_equal(again.mosaic, res.mosaic)
    X, y, genes = as_training_pairs(res, features=False)
    assert X.shape == (4, 64, 64, 3) and y.shape == (4, len(genes))
    with pytest.raises(ValueError, match="max_tiles"):
        fill_region(trained_local, slide, sample, region=poly, steps=1, max_tiles=2)
    with pytest.raises(ValueError, match="unknown expression source"):
        fill_region(trained_local, slide, sample, region=poly, steps=1, source="magic")
    # the scanpy-style entry point opens the AnnData's own slide
    from napari_hinge import tl

    spots = sample.copy()
    capsys.readouterr()
    assert tl.synthesize(spots, model=trained_local, region=poly, steps=3, guidance=2.0) is None
    written = spots.uns["c2l"]
    np.testing.assert_array_equal(written["mosaic"], res.mosaic)
    np.testing.assert_array_equal(written["patches"], res.patches)
    assert written["placement"] == {k: list(v) for k, v in res.placement().items()}
    assert "C2L-ST fill" in capsys.readouterr().err  # a progress bar by default
    copied = tl.synthesize(spots, model=trained_local, region=poly, steps=1, progress=False,
                           key_added="c2l_quick", copy=True)
    assert capsys.readouterr().err == "" and "c2l_quick" not in spots.uns
    assert copied.uns["c2l_quick"]["params"]["steps"] == 1
    assert written["params"]["n_tiles"] == 4 and written["genes"] == trained_local.genes
    # editing the real H&E under the tiles instead of generating from noise
    edit = fill_region(trained_local, slide, sample, region=poly, steps=3, strength=0.3)
    assert edit.params["strength"] == 0.3 and edit.mosaic.shape == res.mosaic.shape
    assert not np.array_equal(edit.patches, res.patches)
    del spots.uns["napari_hinge"]["slide_path"]
    with pytest.raises(ValueError, match="names no slide"):
        tl.synthesize(spots, model=trained_local, region=poly, steps=1)


def test_canvas_windows_cover_pairs_and_blocks_of_present_tiles():
    # an L of three tiles: (0, 0), (0, 1), (1, 0)
    w = canvas_windows(np.array([0, 0, 1]), np.array([0, 1, 0]))
    got = sorted(zip(w.top.tolist(), w.left.tolist(), strict=True))
    assert got == [(0, 0), (0, 1), (0, 2), (1, 0), (2, 0)]  # 3 tiles, 2 pairs, no 2x2 block
    np.testing.assert_allclose(w.cond_weights.sum(1), 1)
    pair = w.cond_weights[list(zip(w.top, w.left, strict=True)).index((0, 1))]
    np.testing.assert_allclose(pair, [0.5, 0.5, 0])
    weight = window_weight(8)
    assert weight.min() > 0 and weight[3:5, 3:5].min() == weight.max()


def test_canvas_blends_window_predictions_in_place():
    from napari_hinge.c2l.canvas import _CanvasDenoiser, decode_canvas

    rows, cols = np.array([0, 0, 1]), np.array([0, 1, 0])
    w = canvas_windows(rows, cols)
    x = torch.randn(1, 3, 16, 16)
    cond = torch.as_tensor(w.cond_weights) @ torch.tensor([[1.0], [2.0], [3.0]])
    counted = []
    # a pointwise model: every window agrees, so the blend is the model on the whole canvas
    den = _CanvasDenoiser(lambda c, t, e: 2 * c + (0 if e is None else e[:, :, None, None]),
                          w, side=8, window_cond=cond, batch_size=2, on_windows=counted.append)
    tiles = np.zeros((16, 16), bool)
    tiles[:8, :] = tiles[8:, :8] = True
    out = den(x, torch.zeros(1, dtype=torch.long), None)
    torch.testing.assert_close(out[0][:, tiles], 2 * x[0][:, tiles])
    assert sum(counted) == len(w) == 5
    # conditioned: pixel (5, 5) lies in the windows of tile (0, 0) (1), of its pair with (0, 1)
    # (1.5) and of its pair with (1, 0) (2): a weighted mean strictly between
    out = den(x, torch.zeros(1, dtype=torch.long), cond)
    assert 1 < float(out[0, 0, 5, 5] - 2 * x[0, 0, 5, 5]) < 2
    # decoding a pixel-space canvas window by window gives the canvas back (0 off the tiles)
    pixel = tiny_central(latent=False)
    assert pixel.config.sample_shape == (3, 64, 64)
    canvas = torch.rand(1, 3, 128, 128) * 2 - 1
    img = decode_canvas(pixel, canvas, w, batch_size=2).astype(int)
    want = to_uint8(canvas)[0].astype(int)
    assert np.abs(img[:64] - want[:64]).max() <= 1
    assert np.abs(img[64:, :64] - want[64:, :64]).max() <= 1
    assert (img[64:, 64:] == 0).all()


def test_seamless_fill_removes_seams_and_matches_a_lone_tile(trained_local, sample, slide):
    xy = np.asarray(sample.obsm["spatial"], float)
    x0, y0 = xy.min(0)
    side = 112.0 / sample.uns["napari_hinge"]["microns_per_pixel"]
    # one tile alone: one window, so the canvas is the independent tile (up to rounding)
    e = side - 1  # a region just under one tile high (and wide): one row (one tile)
    lone = np.array([[x0, y0], [x0 + e, y0], [x0 + e, y0 + e], [x0, y0 + e]])
    a = fill_region(trained_local, slide, sample, region=lone, steps=3, seamless=True)
    b = fill_region(trained_local, slide, sample, region=lone, steps=3, seamless=False)
    assert np.abs(a.patches.astype(int) - b.patches.astype(int)).max() <= 1
    row = np.array([[x0, y0], [x0 + 3 * side - 1, y0], [x0 + 3 * side - 1, y0 + e],
                    [x0, y0 + e]])
    seamless = fill_region(trained_local, slide, sample, region=row, steps=3)
    assert seamless.mosaic.shape == (64, 192, 4) and seamless.params["n_tiles"] == 3
    # SDEdit through the canvas starts from the real H&E under the tiles
    edit = fill_region(trained_local, slide, sample, region=row, steps=3, strength=0.3)
    assert edit.mosaic.shape == seamless.mosaic.shape
    assert not np.array_equal(edit.patches, seamless.patches)


def test_fill_stops_without_a_result(trained_local, sample, slide):
    stop = StopToken()
    events = []

    def on_event(e):
        events.append(e)
        if e.kind == "step":
            stop.request()

    res, last = run_to_end(fill_region_iter(trained_local, slide, sample, n_spacings=0.6,
                                            steps=4, stop=stop), on_event)
    assert res is None and last.kind == "stopped"


def test_training_pairs_features(trained_local, sample, slide):
    xy = np.asarray(sample.obsm["spatial"], float)
    x0, y0 = xy.min(0)
    poly = np.array([[x0, y0], [x0 + 90, y0], [x0 + 90, y0 + 90], [x0, y0 + 90]])
    res = fill_region(trained_local, slide, sample, region=poly, steps=2)
    X, y, genes = as_training_pairs(res)
    assert X.shape == (len(res.layout), 1280) and np.isfinite(X).all()
    assert genes == trained_local.genes


# ---------------------------------------------------------------------------------------------
# command line


def test_cli_adapt_and_synthesize(trained_local, tmp_path, capsys):
    import argparse

    from napari_hinge.c2l.cli import register
    from napari_hinge.datasets import her2st_sample_paths

    parser = argparse.ArgumentParser(prog="napari-hinge")
    register(parser.add_subparsers(dest="command", required=True))
    model_dir = tmp_path / "local"
    trained_local.save(model_dir)
    folder = her2st_sample_paths()["folder"]
    out = tmp_path / "fill"
    args = parser.parse_args(["synthesize", f"{folder}:C3", "--model", str(model_dir),
                              "--out", str(out), "--steps", "2", "--n-spacings", "0.6",
                              "--independent-tiles"])
    assert args.func(args) == 0
    assert (out / "mosaic.png").is_file() and (out / "tiles.csv").is_file()
    meta = json.loads((out / "fill.json").read_text())
    assert meta["seamless"] is False
    assert meta["n_tiles"] > 0 and len(meta["placement"]["scale"]) == 2
    pairs = np.load(out / "pairs.npz")
    assert pairs["patches"].shape[0] == meta["n_tiles"]
    train_with_extra_pairs(f"{folder}:C3", out / "pairs.npz", meta["n_tiles"], tmp_path)
    args = parser.parse_args(["synthesize", f"{folder}:C3", "--model", str(tmp_path / "nope"),
                              "--out", str(tmp_path / "x")])
    with pytest.raises(FileNotFoundError, match="nope"):
        args.func(args)


def train_with_extra_pairs(data, pairs_file, n_tiles, tmp_path):
    """``napari-hinge train --extra-pairs`` reads what ``synthesize`` wrote, marks the pairs
    as synthetic in the saved model, and refuses broken pairs files with a clear InputError."""
    import argparse

    from napari_hinge.c2l.pairs import load_pairs
    from napari_hinge.errors import InputError
    from napari_hinge.hinge.cli import register

    pairs = load_pairs(pairs_file)
    assert len(pairs) == n_tiles and pairs.slide_path and pairs.microns_per_pixel
    parser = argparse.ArgumentParser(prog="napari-hinge")
    register(parser.add_subparsers(dest="command", required=True))
    out = tmp_path / "hinge"
    args = parser.parse_args(["train", data, "--extra-pairs", str(pairs_file),
                              "--extra-weight", "0.5", "--epochs", "1", "--no-augment",
                              "--out", str(out)])
    assert args.func(args) == 0
    mix = json.loads((out / "training_data.json").read_text())
    assert mix["n_synthetic"] == n_tiles and mix["synthetic_weight"] == 0.5
    assert mix["n_real"] > 0 and mix["synthetic_pairs"][0]["slide_path"] == pairs.slide_path
    from napari_hinge.hinge.pipeline import load_model

    assert list(load_model(out).config.genes) == pairs.genes

    bad = tmp_path / "bad.npz"
    with np.load(pairs_file) as z:
        good = {k: z[k] for k in z.files}
    for change, field in ((lambda d: d.pop("expression"), "expression"),
                          (lambda d: d.update(expression=d["expression"][:, :2]), "expression"),
                          (lambda d: d.update(patches=d["patches"].astype(np.float32)),
                           "patches"),
                          (lambda d: d.update(genes=np.array(["A"] * len(d["genes"]))), "genes"),
                          (lambda d: d.update(expression=d["expression"] * np.nan),
                           "expression")):
        d = dict(good)
        change(d)
        np.savez(bad, **d)
        with pytest.raises(InputError, match=f"bad.npz: {field}"):
            load_pairs(bad)
    bad.write_bytes(b"not a zip")
    args = parser.parse_args(["train", data, "--extra-pairs", str(bad), "--out",
                              str(tmp_path / "h2")])
    with pytest.raises(InputError, match="bad.npz: not a"):
        args.func(args)


def test_pairs_encoded_like_real_spots(sample, slide):
    """Real and synthetic patches share one encoding: a real spot patch cut at 64 px and
    passed through encode_patches gets the features of the same pixels upsampled to the real
    patch side, and a native-resolution patch goes through unchanged."""
    from napari_hinge.encoders import get_encoder
    from napari_hinge.features import encode_patches, encode_spots, read_size
    from napari_hinge.patches import _resize, patch_side_px, spot_patches

    enc = get_encoder("efficientnet-lite0")
    side = patch_side_px(sample)
    xy = np.asarray(sample.obsm["spatial"], float)[:4]
    native = spot_patches(slide, xy, side_px=side)
    small = spot_patches(slide, xy, side_px=side, out_size=64)
    direct = encode_spots(slide, xy, encoder=enc, side_px=side, cache=False)
    np.testing.assert_allclose(encode_patches(native, encoder=enc, side_px=side), direct,
                               rtol=1e-4, atol=1e-4)
    up = np.stack([_resize(p, read_size(side, enc)) for p in small])
    np.testing.assert_allclose(encode_patches(small, encoder=enc, side_px=side),
                               enc.encode(up), rtol=1e-4, atol=1e-4)


def test_synthetic_rows_context_and_weights(sample, slide):
    """Synthetic rows take the context of the real spots around them, are nobody's
    neighbour, are centred on their own mean and never validate; weight 0 equals no pairs for
    the ridge prior."""
    from napari_hinge.baselines import TunedRidge, _ridge_path
    from napari_hinge.features import context_features
    from napari_hinge.hinge.train import split_groups

    rng = np.random.default_rng(0)
    n_real, n_syn, f = 30, 10, 6
    feats = rng.normal(size=(n_real + n_syn, f)).astype(np.float32)
    xy = rng.uniform(0, 600, size=(n_real + n_syn, 2))
    xy[-2:] = np.nan  # pairs from another slide: no position
    real = np.r_[np.ones(n_real, bool), np.zeros(n_syn, bool)]
    out = context_features(feats, xy, radius_um=250.0, reference=real)
    alone = context_features(feats[:n_real], xy[:n_real], radius_um=250.0)
    np.testing.assert_allclose(out[:n_real], alone, rtol=1e-6)  # real rows unchanged
    np.testing.assert_allclose(out[-1, f:], feats[-1])  # no position: its own features
    _, val = split_groups(n_real + n_syn, 0.2, 0, real)
    assert len(val) == 6 and real[val].all()
    Y = rng.normal(size=(n_real + n_syn, 3))
    w = np.r_[np.ones(n_real), np.zeros(n_syn)]
    (Wa, ba), = _ridge_path(feats, Y, [10.0], w)
    (Wb, bb), = _ridge_path(feats[:n_real], Y[:n_real], [10.0])
    np.testing.assert_allclose(Wa, Wb, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ba, bb, rtol=1e-5, atol=1e-6)
    w2 = np.r_[np.full(n_real, 2.0), np.zeros(n_syn)]  # only relative weights matter
    np.testing.assert_allclose(_ridge_path(feats, Y, [20.0], w2)[0][0], Wa, rtol=1e-5,
                               atol=1e-6)
    # alpha is scored on real rows only: synthetic rows with garbage targets still train
    r = TunedRidge().fit(feats, Y, sample_weight=np.where(real, 1.0, 0.3), score_rows=real)
    assert np.isfinite(list(r.cv_scores_.values())).all()
