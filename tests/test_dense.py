"""Dense whole-slide maps on real H&E (a 1.4 mm crop of the shipped her2st C3 sample, the
shipped HINGE): the encoder frame is the per-patch input, the projected dense map is the
model's own prior on the same features, the maps stream previews and stop cleanly, and
every written format reopens on its slide."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_hinge.training import StopToken, run_to_end

SAMPLE = "src/napari_hinge/sample_data/her2st_C3"
GENES = ["ERBB2", "SCGB2A2", "CD74"]


@pytest.fixture(scope="module")
def section():
    from napari_hinge.io.spatial import read_spatial

    return read_spatial(SAMPLE)


@pytest.fixture(scope="module")
def model():
    from napari_hinge.hinge.pipeline import load_model

    return load_model("shipped")


@pytest.fixture(scope="module")
def crop(section, tmp_path_factory):
    """A real 1000 x 1000 px crop (1.4 mm) of the C3 H&E around its spots' centre, as a file
    with its pixel size, and the spots inside it (crop pixel coordinates)."""
    from PIL import Image

    meta = section.uns["napari_hinge"]
    image = np.asarray(Image.open(meta["slide_path"]).convert("RGB"))
    xy = np.asarray(section.obsm["spatial"], float)
    cx, cy = np.median(xy, 0).astype(int)
    x0, y0 = cx - 500, cy - 500
    path = tmp_path_factory.mktemp("crop") / "c3_crop.png"
    Image.fromarray(image[y0:y0 + 1000, x0:x0 + 1000]).save(path)
    inside = (xy[:, 0] > x0 + 60) & (xy[:, 0] < x0 + 940) & (xy[:, 1] > y0 + 60) & \
        (xy[:, 1] < y0 + 940)
    return path, float(meta["microns_per_pixel"]), xy[inside] - [x0, y0]


@pytest.fixture(scope="module")
def crop_prediction(model, crop):
    """The crop's dense map, coarse sampling (the writers' input)."""
    from napari_hinge.hinge.slide_predict import predict_slide_dense_iter

    path, mpp, _ = crop
    prediction, _ = drain(predict_slide_dense_iter(
        model, path, mpp=mpp, genes=GENES, sample_stride_um=1000, n_samples=1,
        reveal_steps=1, previews=False))
    return prediction


def drain(gen):
    events = []
    value, _ = run_to_end(gen, events.append)
    return value, events


def test_encoder_frame_is_the_per_patch_input(section):
    """The dense reader resamples the slide exactly as a per-patch crop + resize does."""
    from napari_hinge.dense import cell_geometry, read_encoder_frame
    from napari_hinge.encoders import get_encoder
    from napari_hinge.encoders.base import images_to_tensor
    from napari_hinge.io.slides import open_slide
    from napari_hinge.patches import spot_patches

    meta = section.uns["napari_hinge"]
    mpp = meta["microns_per_pixel"]
    encoder = get_encoder("efficientnet-lite0")
    slide = open_slide(meta["slide_path"], mpp=mpp)
    geom = cell_geometry(encoder, slide.shape[:2], mpp)
    side = int(round(112 / mpp))
    for x, y in np.asarray(section.obsm["spatial"])[:5]:
        patch = images_to_tensor(spot_patches(slide, [[x, y]], side_px=side), 224)[0]
        x0, y0 = np.floor(x - side / 2 + 0.5), np.floor(y - side / 2 + 0.5)
        frame = read_encoder_frame(slide, geom, int(round(x0 * geom.scale)),
                                   int(round(y0 * geom.scale)), 224)
        # same pixels up to the sub-pixel rounding of the crop's corner
        assert (frame - patch).abs().mean() < 4.0
        with torch.inference_mode():
            a = encoder(((frame - 127) / 128)[None])[0]
            b = encoder(((patch - 127) / 128)[None])[0]
        assert np.corrcoef(a, b)[0, 1] > 0.98


def test_dense_map_is_the_models_prior_on_dense_features(model, crop):
    """The projected map (context, section centring, standardisation folded into the first
    affine maps) equals the model's prior computed the ordinary way from the same dense
    features at every map position."""
    from napari_hinge.dense import encode_dense_at
    from napari_hinge.hinge.pipeline import model_inputs, resolve_encoder
    from napari_hinge.hinge.slide_predict import predict_slide_dense_iter

    path, mpp, _ = crop
    prediction, events = drain(predict_slide_dense_iter(
        model, path, mpp=mpp, genes=GENES, sample_stride_um=1000, n_samples=1,
        reveal_steps=1, previews=True))
    assert prediction.params["mode"] == "dense" and prediction.params["final"]
    assert prediction.params["stride_um"] <= 25
    previews = [e.metrics["preview"] for e in events if "preview" in e.metrics]
    assert previews and all(p.mean.shape == prediction.mean.shape for p in previews)
    xy = prediction.grid.centers_xy
    feats = encode_dense_at(path, xy, encoder=resolve_encoder(model.config.encoder),
                            microns_per_pixel=mpp)
    inputs = model_inputs(model, feats, xy * mpp)
    with torch.no_grad():
        prior = model.prior_mean(torch.as_tensor(inputs)).numpy()
    idx = [model.config.genes.index(g) for g in GENES]
    for k, i in enumerate(idx):
        r = np.corrcoef(prior[:, i], prediction.prior[:, k])[0, 1]
        assert r > 0.995, (GENES[k], r)
        assert np.abs(prior[:, i] - prediction.prior[:, k]).mean() < 0.05
    # the sampled residual moves the mean off the prior; the uncertainty is positive
    assert not np.allclose(prediction.mean, prediction.prior)
    assert (prediction.std > 0).all()


def test_dense_map_stops_with_what_it_has(model, crop):
    from napari_hinge.hinge.slide_predict import predict_slide_dense_iter

    path, mpp, _ = crop
    stop = StopToken()
    gen = predict_slide_dense_iter(model, path, mpp=mpp, genes=GENES[:1], stop=stop)
    events = []
    while True:
        try:
            event = next(gen)
        except StopIteration as done:
            value = done.value
            break
        events.append(event)
        if "preview" in event.metrics:
            stop.request()
    assert events[-1].kind == "stopped"
    assert value is not None and not value.params["final"]  # the painted preview stays


def test_written_maps_reopen_on_their_slide(crop_prediction, tmp_path):
    from napari_hinge._reader import get_slide_reader, get_spatial_reader
    from napari_hinge.hinge.slide_predict import write_ome_tiff, write_ome_zarr
    from napari_hinge.io.maps import read_map

    prediction = crop_prediction
    place = prediction.placement
    raster = prediction.raster("mean")
    written = [write_ome_tiff(prediction, tmp_path / "maps.ome.tif"),
               write_ome_zarr(prediction, tmp_path / "maps.ome.zarr")]
    for out in written:
        m = read_map(out)
        assert m.names == GENES
        np.testing.assert_allclose(m.scale, place["scale"], rtol=1e-6)
        np.testing.assert_allclose(m.translate, place["translate"], rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(np.isnan(m.data), np.isnan(raster))
        np.testing.assert_allclose(m.data[np.isfinite(m.data)], raster[np.isfinite(raster)])
        reader = get_slide_reader(out) if out.is_file() else get_spatial_reader(out)
        (data, kwargs, kind), = reader(out)
        assert kind == "image" and kwargs["name"] == GENES
        np.testing.assert_allclose(kwargs["translate"], place["translate"], atol=1e-6)
    # the pyramid's coarser levels stay on the slide: level 1 pixel (0, 0) is centred at the
    # mean of level 0's first 2 x 2 pixels
    import zarr

    group = zarr.open_group(str(written[1]), mode="r")
    ts = group.attrs["multiscales"][0]["datasets"]
    if len(ts) > 1:
        t1 = ts[1]["coordinateTransformations"][1]["translation"]
        assert t1[1] == pytest.approx(place["translate"][0] + place["scale"][0] / 2)


def test_predict_slide_command_writes_dense_maps(crop, tmp_path):
    """The CLI's default: the dense map, as pyramidal OME-TIFF and OME-Zarr, same values."""
    from napari_hinge.cli import main
    from napari_hinge.io.maps import read_map

    path, mpp, _ = crop
    rc = main(["hinge", "predict-slide", str(path), "--mpp", f"{mpp}", "--genes", "ERBB2,CD74",
               "--sample-stride", "1000", "--samples", "1", "--reveal-steps", "1",
               "--spatialdata", "--out", str(tmp_path / "out")])
    assert rc == 0
    tif, zarr_map = read_map(tmp_path / "out" / "maps.ome.tif"), \
        read_map(tmp_path / "out" / "maps.ome.zarr")
    assert tif.names == zarr_map.names == ["ERBB2", "CD74"]
    assert tif.scale[0] <= 25 and tif.scale == zarr_map.scale
    np.testing.assert_allclose(tif.translate, zarr_map.translate, atol=1e-6)
    np.testing.assert_array_equal(tif.data, zarr_map.data)
    assert (tmp_path / "out" / "uncertainty.ome.zarr").is_dir()
    # the SpatialData store's map: the same values in the same place
    sdata_map = read_map(tmp_path / "out" / "maps.sdata.zarr" / "images" / "hinge_mean")
    assert sdata_map.names == ["ERBB2", "CD74"]
    np.testing.assert_allclose(sdata_map.scale, tif.scale, rtol=1e-6)
    np.testing.assert_allclose(sdata_map.translate, tif.translate, atol=1e-4)
    np.testing.assert_array_equal(sdata_map.data, tif.data)


def test_spatialdata_store_holds_slide_maps_and_spots_aligned(crop_prediction, section, crop,
                                                              tmp_path):
    """Slide, maps, uncertainty and spots as one SpatialData store: spatialdata reads it
    back with the maps' values and channel names, and one 'global' µm frame in which a map
    pixel, the slide pixel and the spot at the same place coincide; the plugin reopens the
    maps on their slide."""
    pytest.importorskip("spatialdata")
    import spatialdata as sd
    from spatialdata.transformations import get_transformation

    from napari_hinge._reader import get_spatial_reader
    from napari_hinge.hinge.slide_predict import compare_with_spots, write_spatialdata

    prediction = crop_prediction
    mpp = crop[1]
    # the spots inside the crop, in its pixels (the crop fixture's offsets)
    xy = np.asarray(section.obsm["spatial"], float)
    x0, y0 = np.median(xy, 0).astype(int) - 500
    inside = ((xy > [x0 + 60, y0 + 60]) & (xy < [x0 + 940, y0 + 940])).all(1)
    spots = section[inside].copy()
    spots.obsm["spatial"] = xy[inside] - [x0, y0]
    store = write_spatialdata(prediction, tmp_path / "maps.sdata.zarr", spots=spots)

    back = sd.read_zarr(store)
    assert {"he", "hinge_mean", "hinge_std"} <= set(back.images)
    place = prediction.placement
    for key, which in (("hinge_mean", "mean"), ("hinge_std", "std")):
        image = back.images[key]
        level0 = image["scale0"]["image"] if hasattr(image, "children") else image
        assert list(level0.coords["c"].values) == GENES
        expected = prediction.raster(which)
        values = np.asarray(level0.values)
        np.testing.assert_array_equal(np.isnan(values), np.isnan(expected))
        np.testing.assert_allclose(values[np.isfinite(values)], expected[np.isfinite(expected)])
    # where things are in 'global' µm: a map pixel's centre (intrinsic +0.5), a slide pixel's
    # centre and a spot's centre, each against the package's own placement (pixel centres at
    # integers, napari's convention) shifted by half a slide pixel
    to_um = get_transformation(back.images["hinge_mean"], "global").to_affine_matrix(
        input_axes=("x", "y"), output_axes=("x", "y"))
    r, c = 7, 11
    centre = to_um @ [c + 0.5, r + 0.5, 1.0]
    (ty, tx), (sy, sx) = place["translate"], place["scale"]
    np.testing.assert_allclose(centre[:2], [tx + c * sx + mpp / 2, ty + r * sy + mpp / 2])
    he = get_transformation(back.images["he"], "global").to_affine_matrix(
        input_axes=("x", "y"), output_axes=("x", "y"))
    np.testing.assert_allclose(np.diag(he)[:2], [mpp, mpp])
    circles = back.shapes["spots"]
    np.testing.assert_allclose(np.c_[circles.geometry.x, circles.geometry.y],
                               (spots.obsm["spatial"] + 0.5) * mpp)
    table = back.tables["table"]
    assert table.n_obs == spots.n_obs and list(table.obs["spot_id"]) == list(circles.index)
    values, _ = compare_with_spots(prediction, spots)
    np.testing.assert_allclose(table.obs["pred_ERBB2"], values["ERBB2"], equal_nan=True)
    # the plugin opens the store's maps on their slide (the slide itself: its own file)
    layers = get_spatial_reader(store)(store)
    assert len(layers) == 2
    for _, kwargs, kind in layers:
        assert kind == "image" and kwargs["name"] == GENES
        np.testing.assert_allclose(kwargs["scale"], place["scale"], rtol=1e-6)
        np.testing.assert_allclose(kwargs["translate"], place["translate"], atol=1e-4)


def test_a_cohort_maps_each_slide_as_predict_slide_does(crop, crop_prediction, tmp_path):
    """predict-cohort's default is predict-slide's dense path: the same maps, same place."""
    import torch

    from napari_hinge.hinge.cohort import CohortSlide, cohort_settings, completed, predict_one
    from napari_hinge.io.maps import read_map

    path, mpp, _ = crop
    settings = cohort_settings("shipped", genes=GENES, sample_stride_um=1000, n_samples=1,
                               reveal_steps=1)
    assert settings["mode"] == "dense" and "batch_tiles" not in settings
    record = predict_one(CohortSlide(str(path), "crop", mpp), "shipped", tmp_path, settings,
                         torch_threads=torch.get_num_threads())
    assert record["status"] == "done", record
    assert completed(tmp_path / "crop")["params"]["mode"] == "dense"
    cohort_map = read_map(tmp_path / "crop" / "maps.ome.tif")
    assert cohort_map.names == GENES
    np.testing.assert_allclose(cohort_map.data, crop_prediction.raster("mean"), rtol=1e-5,
                               atol=1e-5)
