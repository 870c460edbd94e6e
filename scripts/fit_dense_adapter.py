"""Fit the linear adapter from dense (in-context) features to per-patch features.

    python scripts/fit_dense_adapter.py --threads 1

A patch encoded on its own sees zero padding at its border: every cell of its 7 x 7 map is
shaped by it. The same window pooled from the dense map sees the real tissue around the
patch instead, so the two feature vectors correlate only ~0.75 and a model trained on
per-patch features loses ~0.05 mean PCC on dense ones (benchmarks/dense_features.py). The
adapter is a ridge map ``per_patch ~ dense @ W + b`` fitted on positions of the HINGE
training sections only (her2st C2, C4, C6: the spots and jittered positions around
them; no labels are used, and C3, the held-out section, is never seen). It ships in
``src/napari_hinge/weights/dense_adapter/`` and :mod:`napari_hinge.dense` applies it.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
HER2ST = REPO.parent / "shared" / "data" / "her2st_subset"
OUT = REPO / "src" / "napari_hinge" / "weights" / "dense_adapter"
SECTIONS = ("C2", "C4", "C6")


def pairs(section: str, encoder, n_jitter: int, seed: int):
    from napari_hinge.dense import encode_dense_at
    from napari_hinge.features import encode_spots
    from napari_hinge.io.slides import open_slide
    from napari_hinge.io.spatial import read_spatial
    from napari_hinge.patches import patch_side_px

    adata = read_spatial(HER2ST, section=section)
    meta = adata.uns["napari_hinge"]
    mpp = float(meta["microns_per_pixel"])
    xy = np.asarray(adata.obsm["spatial"], dtype=float)
    rng = np.random.default_rng(seed)
    jitter = xy[rng.integers(0, len(xy), n_jitter)] + rng.uniform(-100, 100, (n_jitter, 2)) / mpp
    coords = np.concatenate([xy, jitter])
    slide = open_slide(meta["slide_path"], mpp=mpp)
    patch = encode_spots(meta["slide_path"], coords, encoder=encoder,
                         side_px=patch_side_px(adata))
    dense = encode_dense_at(slide, coords, encoder=encoder, microns_per_pixel=mpp)
    return dense, patch


def main() -> None:
    import torch
    from safetensors.torch import save_file

    from napari_hinge.encoders import get_encoder

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--jitter", type=int, default=600, help="extra positions per section")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    encoder = get_encoder("efficientnet-lite0")
    start = time.perf_counter()
    data = {s: pairs(s, encoder, args.jitter, args.seed) for s in SECTIONS}
    X = np.concatenate([d for d, _ in data.values()]).astype(np.float64)
    Y = np.concatenate([p for _, p in data.values()]).astype(np.float64)
    groups = np.concatenate([np.full(len(d), i) for i, (d, _) in enumerate(data.values())])
    mu, sd = X.mean(0), X.std(0) + 1e-6
    Z = (X - mu) / sd
    ym = Y.mean(0)

    def fit(idx, alpha):
        z, y = Z[idx], Y[idx] - ym
        return np.linalg.solve(z.T @ z + alpha * len(idx) * np.eye(z.shape[1]), z.T @ y)

    scores = {}
    for alpha in (1e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0):
        r = []
        for g in np.unique(groups):  # leave one section out
            w = fit(groups != g, alpha)
            pred = Z[groups == g] @ w + ym
            r.append(np.mean([np.corrcoef(a, b)[0, 1] for a, b in zip(pred, Y[groups == g],
                                                                       strict=True)]))
        scores[alpha] = float(np.mean(r))
        print(f"alpha {alpha:g}: per-position r (leave one section out) {scores[alpha]:.4f}")
    best = max(scores, key=scores.get)
    w = fit(np.arange(len(Z)), best)
    weight = w / sd[:, None]  # raw dense features in
    bias = ym - mu @ weight
    raw_r = float(np.mean([np.corrcoef(a, b)[0, 1] for a, b in zip(X, Y, strict=True)]))
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"encoder": encoder.name, "weights_digest": encoder.weights_digest,
            "sections": list(SECTIONS), "positions": int(len(X)), "alpha": best,
            "cv_per_position_r": scores[best], "raw_per_position_r": raw_r,
            "seed": args.seed, "jitter_per_section": args.jitter,
            "seconds": round(time.perf_counter() - start, 1),
            "command": "python scripts/fit_dense_adapter.py --threads 1"}
    save_file({"weight": torch.as_tensor(weight, dtype=torch.float32).half(),
               "bias": torch.as_tensor(bias, dtype=torch.float32)},
              str(args.out / f"{encoder.name}.safetensors"), metadata={"format": "pt"})
    (args.out / f"{encoder.name}.json").write_text(json.dumps(meta, indent=2))
    print(json.dumps(meta, indent=2))


if __name__ == "__main__":
    main()
