"""Dense encoding against per-patch encoding, and the accuracy of each dense-map choice.

    python benchmarks/dense_features.py --threads 2            # C3 (held out), ~10 min idle
    python benchmarks/dense_features.py --sections --sample --no-map       # quick: sample C3
    python benchmarks/dense_features.py --sections C2 C3 C4 C5 C6 --sample

On the her2st sections with an H&E image (C3 is held out from the shipped HINGE; C2, C4-C6
trained it and the dense adapter) and, with ``--sample``, the shipped half-resolution C3:

1. Features at the measured spots: per patch (:func:`~napari_hinge.features.encode_spots`)
   and from the dense map (:func:`~napari_hinge.dense.encode_dense_at`), raw and through the
   shipped adapter: per-spot correlation of the 1280-d vectors, per-channel correlation.
2. The shipped HINGE fed either: mean PCC over genes (spots >= 100 UMI) of its prior (the
   tuned ridge on the same inputs), its one-step mean and its sampled mean (S, T below).
   Target: dense within 0.01 of per patch.
3. The dense slide map (:func:`~napari_hinge.hinge.slide_predict.predict_slide_dense_iter`,
   its own grid context and section centring) read at the spots: the prior map and the
   map with HINGE's residual sampled every ``--sample-strides`` µm.

Prints a table and writes JSON (``--out``); the device is printed with every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
HER2ST = REPO.parent / "shared" / "data" / "her2st_subset"
SAMPLE = REPO / "src" / "napari_hinge" / "sample_data" / "her2st_C3"


def feature_agreement(a: np.ndarray, b: np.ndarray) -> dict:
    per_spot = [np.corrcoef(x, y)[0, 1] for x, y in zip(a, b, strict=True)]
    ok = (a.std(0) > 1e-8) & (b.std(0) > 1e-8)
    per_channel = [np.corrcoef(a[:, k], b[:, k])[0, 1] for k in np.flatnonzero(ok)]
    return {"per_spot_r": round(float(np.mean(per_spot)), 4),
            "per_spot_r_min": round(float(np.min(per_spot)), 4),
            "per_channel_r_median": round(float(np.median(per_channel)), 4)}


def model_scores(model, feats, coords_um, y, keep, n_samples, reveal_steps, seed, *,
                 sampled: bool = True) -> dict:
    import torch

    from napari_hinge.hinge.pipeline import model_inputs
    from napari_hinge.hinge.sampler import sample
    from napari_hinge.metrics import gene_pearson

    inputs = model_inputs(model, feats, coords_um)
    with torch.no_grad():
        prior = model.prior_mean(torch.as_tensor(inputs)).numpy()
    one = sample(model, inputs, n_samples=1, reveal_steps=1, seed=seed).mean.numpy()
    full = sample(model, inputs, n_samples=n_samples, reveal_steps=reveal_steps,
                  seed=seed).mean.numpy() if sampled else None

    def pcc(p):
        return None if p is None else round(float(np.mean(gene_pearson(p[keep], y[keep]))), 4)

    return {"prior (tuned ridge)": pcc(prior), "one-step mean": pcc(one),
            f"sampled mean S={n_samples} T={reveal_steps}": pcc(full)}


def section(name, adata, model, encoder, args) -> dict:
    from napari_hinge._convention import library_size
    from napari_hinge.dense import encode_dense_at, load_adapter
    from napari_hinge.hinge.pipeline import coords_um_of, spot_features, transform_values
    from napari_hinge.hinge.slide_predict import predict_slide_dense_iter
    from napari_hinge.io.slides import open_slide
    from napari_hinge.metrics import gene_pearson
    from napari_hinge.training import run_to_end

    meta = adata.uns["napari_hinge"]
    mpp = float(meta["microns_per_pixel"])
    xy = np.asarray(adata.obsm["spatial"], dtype=float)
    y, _ = transform_values(adata, model.config.genes)
    keep = library_size(adata) >= 100
    coords_um = coords_um_of(adata)
    slide = open_slide(meta["slide_path"], mpp=mpp)
    row = {"section": name, "spots": int(keep.sum()), "mpp": round(mpp, 4)}
    t = time.perf_counter()
    patch = spot_features(adata, encoder=encoder)
    row["per_patch_seconds"] = round(time.perf_counter() - t, 1)
    t = time.perf_counter()
    cache = args.dense_cache / f"{name.split()[0]}_{mpp:.4f}_{len(xy)}.npy"
    if cache.is_file():  # the raw dense features of an earlier run (the adapter is applied below)
        raw = np.load(cache)
        row["dense_seconds"] = "cached"
    else:
        raw = encode_dense_at(slide, xy, encoder=encoder, microns_per_pixel=mpp, adapt=False)
        row["dense_seconds"] = round(time.perf_counter() - t, 1)
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.save(cache, raw)
    adapter = load_adapter(encoder)
    dense = raw if adapter is None else (raw @ adapter[0] + adapter[1]).astype(np.float32)
    row["features_raw"] = feature_agreement(patch, raw)
    row["features_adapted"] = feature_agreement(patch, dense) if adapter is not None else None
    args_s = (args.samples, args.reveal_steps, args.seed)
    row["pcc_per_patch"] = model_scores(model, patch, coords_um, y, keep, *args_s)
    row["pcc_dense"] = model_scores(model, dense, coords_um, y, keep, *args_s)
    row["pcc_dense_raw"] = model_scores(model, raw, coords_um, y, keep, *args_s, sampled=False)
    row["map"] = {}
    for stride in [] if args.no_map else args.sample_strides:
        t = time.perf_counter()
        pred, _ = run_to_end(predict_slide_dense_iter(
            model, slide, sample_stride_um=stride, n_samples=args.samples,
            reveal_steps=args.reveal_steps, seed=args.seed, previews=False))
        seconds = time.perf_counter() - t
        prior_at, mean_at = pred.at(xy, "prior"), pred.at(xy, "mean")
        ok = keep & np.isfinite(mean_at).all(1)
        row["map"][f"{stride:g}"] = {
            "seconds": round(seconds, 1), "positions": len(pred.grid),
            "spots_on_map": int(ok.sum()),
            "prior map": round(float(np.mean(gene_pearson(prior_at[ok], y[ok]))), 4),
            "prior + sampled residual": round(float(np.mean(gene_pearson(mean_at[ok], y[ok]))),
                                              4)}
    return row


def main() -> None:
    import torch

    from napari_hinge.device import default_device
    from napari_hinge.hinge.pipeline import load_model, resolve_encoder
    from napari_hinge.io.spatial import read_spatial

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sections", nargs="*", default=["C3"])
    parser.add_argument("--sample", action="store_true", help="also the shipped sample (C3)")
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--reveal-steps", type=int, default=10)
    parser.add_argument("--sample-strides", type=float, nargs="*", default=[448.0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dense-cache", type=Path, default=REPO / "bench_out" / "dense_cache",
                        help="raw dense features at the spots, reused by later runs")
    parser.add_argument("--no-map", action="store_true", help="skip the slide-map readout (3.)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=REPO / "bench_out" / "dense_features.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model("shipped")
    encoder = resolve_encoder(model.config.encoder)
    device = str(default_device())
    results = {"device": device, "threads": args.threads, "load_avg": os.getloadavg(),
               "samples": args.samples, "reveal_steps": args.reveal_steps, "seed": args.seed,
               "sections": []}
    todo = [(s, read_spatial(HER2ST, section=s)) for s in args.sections]
    if args.sample:
        todo.append(("C3 sample (half res)", read_spatial(SAMPLE)))
    for name, adata in todo:
        results["sections"].append(section(name, adata, model, encoder, args))
        print(json.dumps(results["sections"][-1]), flush=True)
    results["load_avg_end"] = os.getloadavg()
    print(f"\nDense vs per-patch features, shipped HINGE, device {device}, "
          f"{args.threads} threads, load {results['load_avg'][0]:.1f}")
    print(f"{'section':<22}{'features':<10}{'r/spot':>8}{'r/chan':>8}"
          f"{'prior':>8}{'1-step':>8}{'sampled':>8}")
    for row in results["sections"]:
        for label, feat, pcc in (("per-patch", None, row["pcc_per_patch"]),
                                 ("dense raw", row["features_raw"], row["pcc_dense_raw"]),
                                 ("dense", row["features_adapted"], row["pcc_dense"])):
            v = ["" if x is None else f"{x:.3f}" for x in pcc.values()]
            fr = f"{feat['per_spot_r']:>8.3f}{feat['per_channel_r_median']:>8.3f}" if feat \
                else f"{'':>8}{'':>8}"
            print(f"{row['section']:<22}{label:<10}{fr}{v[0]:>8}{v[1]:>8}{v[2]:>8}")
        for stride, m in row["map"].items():
            print(f"{row['section']:<22}map, samples every {stride} µm: prior map "
                  f"{m['prior map']:.3f}, + sampled residual {m['prior + sampled residual']:.3f}"
                  f" ({m['positions']} positions, {m['seconds']} s)")
        print(f"{'':<22}drop dense vs per-patch (target <= 0.01): "
              + ", ".join(f"{k} {row['pcc_per_patch'][k] - row['pcc_dense'][k]:+.3f}"
                          for k in row["pcc_per_patch"] if row["pcc_dense"][k] is not None))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
