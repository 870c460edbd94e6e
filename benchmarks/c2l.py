"""C2L-ST benchmark: does few-shot + synthetic pairs come close to measuring every spot?

Protocol (no leakage; every figure of the README's C2L tables comes from this script):

- Section her2st C3 only: the shipped central model was pre-trained on tiles of C2/C4/C5/C6,
  CMU-1 and DLPFC (weights/c2l_central/TRAINING.md), so it has seen no pixel of C3 and no
  expression at all. The gene panel comes from C2/C4/C5/C6 expression (design.md rule, top
  ``--n-genes``), so no C3 expression chooses it. Spots with >= 100 UMI.
- Per seed, C3's spots are split at random into a test set (``--test-fraction``, 30%) and the
  trainable rest R. "100% real" trains on every spot of R; a measured fraction f (10%, 25%) keeps
  a random f of R (the 10% set inside the 25% set). Nothing the test spots measured is used
  before scoring.
- Per (seed, f): a local model is adapted from the shipped central weights on the measured
  pairs only (``--adapt-steps``). At every unmeasured position of R (tissue with an H&E but no
  measurement) the condition is the inverse-distance mean of the 4 nearest measured spots; C2L
  generates one tile there from noise ("generated") and one edit (SDEdit, ``--edit-strength``)
  of the nearest-expression measured patch ("edited"). Controls with the same expressions: the
  retrieved measured patch itself ("retrieved") and an unconditional central sample
  ("unconditional").
- Encoding, one rule for real and synthetic (:func:`napari_hinge.features.encode_patches`):
  real spots are encoded as the user path does (native resolution, 112 um, EfficientNet-Lite0,
  cached); 64 px tiles are upsampled to the real patch's pixel size with the same resampler,
  then encoded. ``--old-64px`` also scores the ridge with real patches cut at 64 px (the earlier
  benchmark's encoding) to show the effect.
- Inputs (HINGE's recipe): each row's features plus the mean features of the real spots within
  300 um in the whole H&E (every C3 spot's image is there, measured or not; a synthetic tile
  takes the context of its position), centred per source (real rows on the measured rows'
  mean, synthetic rows on their own, test spots on the section's). Synthetic rows weigh
  ``--synthetic-weight`` in the loss and the ridge, never validate, and alpha is scored on real
  rows only.
- Predictors: the tuned ridge (alpha by inner folds) and HINGE (builtin backbone, ridge prior,
  ``--hinge-epochs``, one feature view, no validation split: every measured spot trains; mean
  of 4 samples, 10 reveal steps) on the panel genes the backbone knows. Score: mean PCC over
  genes on the test spots; ratio to 100% real of the same seed.
- Realism: Frechet distance (``--pcs``-d PCA of the features, fitted on the measured real
  patches) between the held-out real patches at the unmeasured positions and each kind of tile,
  the central autoencoder's reconstructions of the measured patches (the floor of any latent
  sample), and other real C3 patches. Conditioning: a ridge on the measured real pairs reads the
  condition back from each kind of tile (mean PCC).

    python benchmarks/c2l.py --data ../shared/data --seeds 0 1 2 --out docs/results/c2l.json

or one seed per process (``--seeds N --out docs/results/c2l_seedN.json``), then
``--merge docs/results/c2l_seed*.json --out docs/results/c2l.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

PANEL_SECTIONS = ("C2", "C4", "C5", "C6")
SECTION = "C3"
KINDS = ("generated", "edited", "retrieved", "unconditional")


def frechet(a: np.ndarray, b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to two feature sets."""
    from scipy import linalg

    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = np.real(linalg.sqrtm(s1 @ s2))
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def pcc(pred, true) -> float:
    from napari_hinge.metrics import gene_pearson

    return float(np.nanmean(gene_pearson(pred, true)))


def with_context(feats: np.ndarray, spot_feats: np.ndarray, coords_um: np.ndarray,
                 query_um: np.ndarray, radius_um: float) -> np.ndarray:
    """``feats`` of query rows followed by the mean ``spot_feats`` of the section's real spots
    (at ``coords_um``) within ``radius_um`` of each query position (itself excluded; none: its
    own features)."""
    from scipy.spatial import cKDTree

    tree = cKDTree(coords_um)
    own = np.asarray(feats, np.float32)
    ctx = np.empty_like(own)
    for i, nb in enumerate(tree.query_ball_point(query_um, radius_um)):
        nb = [j for j in nb if np.linalg.norm(coords_um[j] - query_um[i]) > 1e-6]
        ctx[i] = own[i] if not nb else spot_feats[nb].mean(0)
    return np.concatenate([own, ctx], 1)


def centre(X: np.ndarray, synthetic: np.ndarray) -> np.ndarray:
    from napari_hinge.features import center_per_group
    from napari_hinge.hinge.pipeline import centring_groups

    return center_per_group(X, centring_groups(None, synthetic, len(X)))


def ridge_score(X, Y, synthetic, weight, X_test, Y_test) -> tuple[float, float]:
    from napari_hinge.baselines import TunedRidge

    w = np.where(synthetic, weight, 1.0)
    r = TunedRidge().fit(centre(X, synthetic), Y, sample_weight=w, score_rows=~synthetic)
    return pcc(r.predict(centre(X_test, np.zeros(len(X_test), bool))), Y_test), r.alpha_


def hinge_score(X, Y, synthetic, args, X_test, Y_test, keep, names) -> tuple[float, dict]:
    from napari_hinge.hinge.pipeline import fit_hinge_arrays, model_inputs
    from napari_hinge.hinge.sampler import sample
    from napari_hinge.training import run_to_end

    model, last = run_to_end(fit_hinge_arrays(
        X, Y[:, keep], names, epochs=args.hinge_epochs, seed=args.seed_now, context_um=None,
        synthetic=synthetic, synthetic_weight=args.synthetic_weight, calibrate=False,
        val_fraction=args.val_fraction))
    inputs = model_inputs(model, X_test[None])
    res = sample(model, inputs, n_samples=4, reveal_steps=10, seed=args.seed_now)
    info = {k: last.metrics.get(k) for k in ("best_epoch", "n_train", "n_val", "training_data")}
    return pcc(res.mean.numpy(), Y_test[:, keep]), info


def run_seed(seed: int, args, ctx) -> dict:
    from napari_hinge.c2l.fill import expression_from_neighbours
    from napari_hinge.c2l.local import build_local
    from napari_hinge.c2l.train import train_local
    from napari_hinge.features import encode_patches
    from napari_hinge.training import run_to_end, seed_everything

    args.seed_now = seed
    seed_everything(seed)
    rng = np.random.default_rng(seed)
    P64, Y, xy_px, coords_um, F, F64 = (ctx[k] for k in ("P64", "Y", "xy_px", "coords_um",
                                                        "F", "F64"))
    n = len(Y)
    order = rng.permutation(n)
    n_test = int(round(args.test_fraction * n))
    test, pool = np.sort(order[:n_test]), order[n_test:]  # pool stays in random order
    out = {"seed": seed, "n_test": int(n_test), "n_pool": int(len(pool)), "fractions": {}}
    Xc = ctx["Xc"]  # (n, 2F): features + real context, every spot of the section
    Xc64 = ctx["Xc64"]
    enc, side = ctx["encoder"], ctx["side_px"]
    t0 = time.perf_counter()

    ridge, hinge = {}, {}
    none = np.zeros(len(pool), bool)
    ridge["real 100%"] = ridge_score(Xc[pool], Y[pool], none, 1, Xc[test], Y[test])[0]
    if args.old_64px:
        ridge["real 100% (64 px)"] = ridge_score(Xc64[pool], Y[pool], none, 1, Xc64[test],
                                                 Y[test])[0]
    if args.hinge_epochs:
        hinge["real 100%"], _ = hinge_score(Xc[pool], Y[pool], none, args, Xc[test], Y[test],
                                            ctx["keep"], ctx["hinge_genes"])
    print(f"seed {seed}: real 100% ({len(pool)} spots): ridge {ridge['real 100%']:.3f}"
          + (f", HINGE {hinge['real 100%']:.3f}" if hinge else ""), flush=True)

    for frac in args.fractions:
        m = max(3, int(round(frac * len(pool))))
        meas, unmeas = np.sort(pool[:m]), np.sort(pool[m:])
        tag = f"{frac:.0%}"
        rec = {"n_measured": int(m), "n_synthetic": int(len(unmeas))}
        # local adaptation on the measured pairs only
        t = time.perf_counter()
        local = build_local(args.central, ctx["genes"], seed=seed)
        local, last = run_to_end(train_local(local, P64[meas], Y[meas], steps=args.adapt_steps,
                                             batch_size=args.adapt_batch, seed=seed,
                                             val_count=min(16, m // 4),
                                             eval_every=max(10, args.adapt_steps // 4)))
        rec["adapt"] = {"seconds": time.perf_counter() - t, "final_loss": last.loss,
                        "final_val_loss": last.val_loss}
        if args.save_local and seed == args.seeds[0] and frac == max(args.fractions):
            local.save(args.save_local)
        sub = ctx["adata"][ctx["index"][meas]]
        cond = expression_from_neighbours(sub, ctx["genes"], xy_px[unmeas], k=args.k)
        # retrieval: the measured patch whose standardised expression is nearest the condition
        mu, sd = Y[meas].mean(0), Y[meas].std(0) + 1e-6
        d = (((cond - mu) / sd)[:, None] - ((Y[meas] - mu) / sd)[None]) ** 2
        nearest = meas[d.sum(-1).argmin(1)]
        t = time.perf_counter()
        tiles = {
            "generated": local.sample(cond, guidance=args.guidance, steps=args.ddim_steps,
                                      seed=seed),
            "edited": local.sample(cond, guidance=args.guidance, steps=args.ddim_steps,
                                   seed=seed, init=P64[nearest], strength=args.edit_strength),
            "unconditional": local.central.sample(len(cond), steps=args.ddim_steps,
                                                  seed=seed + 1),
        }
        rec["sample_seconds"] = time.perf_counter() - t
        feats = {k: encode_patches(v, encoder=enc, side_px=side) for k, v in tiles.items()}
        feats["retrieved"] = F[nearest]
        feats64 = {k: enc.encode(v, batch_size=8) for k, v in tiles.items()}
        feats64["retrieved"] = F64[nearest]
        recon = encode_patches(local.central.reconstruct(P64[meas]), encoder=enc, side_px=side)

        # realism and conditioning
        from sklearn.decomposition import PCA

        from napari_hinge.baselines import TunedRidge

        pcs = min(args.pcs, m - 1)
        pca = PCA(pcs, random_state=seed).fit(F[meas])
        held = pca.transform(F[unmeas])
        others = np.setdiff1d(np.arange(n), unmeas)
        rec["frechet_to_held_real"] = {
            **{k: frechet(held, pca.transform(v)) for k, v in feats.items()},
            "autoencoder reconstruction": frechet(held, pca.transform(recon)),
            "other real C3 spots": frechet(held, pca.transform(F[others])),
        }
        reader = TunedRidge().fit(F[meas], Y[meas])
        rec["condition_read_back_pcc"] = {
            **{k: pcc(reader.predict(v), cond) for k, v in feats.items()},
            "real patch at the position (vs its condition)": pcc(reader.predict(F[unmeas]),
                                                                 cond),
            "real patch at the position (vs its measurement)": pcc(reader.predict(F[unmeas]),
                                                                   Y[unmeas]),
        }

        # downstream: real only, + each kind of pairs
        r_rows, h_rows = {}, {}
        sets = {"real only": None, **{k: k for k in KINDS}}
        for name, kind in sets.items():
            if kind is None:
                X, XX, T = Xc[meas], Xc64[meas], Y[meas]
                syn = np.zeros(m, bool)
            else:
                ctx_syn = with_context(feats[kind], F, coords_um, coords_um[unmeas],
                                       args.context_um)
                X = np.concatenate([Xc[meas], ctx_syn])
                T = np.concatenate([Y[meas], cond])
                syn = np.r_[np.zeros(m, bool), np.ones(len(unmeas), bool)]
                if args.old_64px:
                    XX = np.concatenate([Xc64[meas], with_context(
                        feats64[kind], F64, coords_um, coords_um[unmeas], args.context_um)])
            r_rows[name] = ridge_score(X, T, syn, args.synthetic_weight, Xc[test], Y[test])[0]
            if args.old_64px:
                r_rows[name + " (64 px)"] = ridge_score(XX, T, syn, args.synthetic_weight,
                                                        Xc64[test], Y[test])[0]
            if args.hinge_epochs:
                h_rows[name], info = hinge_score(X, T, syn, args, Xc[test], Y[test],
                                                 ctx["keep"], ctx["hinge_genes"])
                rec.setdefault("hinge_runs", {})[name] = info
            print(f"seed {seed} {tag} {name}: ridge {r_rows[name]:.3f}"
                  + (f", HINGE {h_rows[name]:.3f}" if h_rows else ""), flush=True)
        rec["ridge"], rec["hinge"] = r_rows, h_rows
        out["fractions"][tag] = rec
    out["ridge_100"], out["hinge_100"] = ridge, hinge
    out["seconds"] = time.perf_counter() - t0
    return out


def _stats(vals, base=None) -> dict:
    vals = np.asarray(vals, float)
    sd = lambda x: float(x.std(ddof=1)) if len(x) > 1 else 0.0  # noqa: E731
    out = {"mean": float(vals.mean()), "sd": sd(vals), "values": vals.tolist(), "n": len(vals)}
    if base is not None:
        ratio = vals / np.asarray(base, float)
        out |= {"ratio_to_100": float(ratio.mean()), "ratio_sd": sd(ratio)}
    return out


def summarise(runs: list[dict]) -> dict:
    """Mean +- sd over seeds, and each row's ratio to 100% real of the same seed (rows that
    only some seeds ran, e.g. ``--old-64px``, over those seeds)."""
    table = {}
    for model in ("ridge", "hinge"):
        if any("real 100%" not in r[f"{model}_100"] for r in runs):
            continue
        rows = {}
        for key in dict.fromkeys(k for r in runs for k in r[f"{model}_100"]):
            rows[key] = _stats([r[f"{model}_100"][key] for r in runs if key in r[f"{model}_100"]])
        for tag in runs[0]["fractions"]:
            names = dict.fromkeys(k for r in runs for k in r["fractions"][tag][model])
            for name in names:
                base_key = "real 100% (64 px)" if name.endswith("(64 px)") else "real 100%"
                have = [r for r in runs if name in r["fractions"][tag][model]
                        and base_key in r[f"{model}_100"]]
                if not have:
                    continue
                label = f"real {tag}" + ("" if name.startswith("real only") else " + ") + \
                    name.replace("real only", "")
                rows[label] = _stats([r["fractions"][tag][model][name] for r in have],
                                     [r[f"{model}_100"][base_key] for r in have])
        table[model] = rows
    for part in ("frechet_to_held_real", "condition_read_back_pcc"):
        rows = {}
        for tag in runs[0]["fractions"]:
            for k in runs[0]["fractions"][tag][part]:
                rows[f"{tag}: {k}"] = _stats([r["fractions"][tag][part][k] for r in runs])
        table[part] = rows
    return table


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="C2L-ST few-shot benchmark on her2st C3")
    p.add_argument("--data", type=Path, default=Path("../shared/data"))
    p.add_argument("--central", default="shipped")
    p.add_argument("--out", type=Path, default=Path("bench_out/c2l.json"))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--fractions", type=float, nargs="+", default=[0.10, 0.25])
    p.add_argument("--test-fraction", type=float, default=0.3)
    p.add_argument("--n-genes", type=int, default=50)
    p.add_argument("--adapt-steps", type=int, default=300)
    p.add_argument("--adapt-batch", type=int, default=16)
    p.add_argument("--ddim-steps", type=int, default=15)
    p.add_argument("--guidance", type=float, default=2.0)
    p.add_argument("--edit-strength", type=float, default=0.5)
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--context-um", type=float, default=300.0)
    p.add_argument("--synthetic-weight", type=float, default=1.0)
    p.add_argument("--hinge-epochs", type=int, default=40, help="0: ridge only")
    p.add_argument("--val-fraction", type=float, default=0.0,
                   help="HINGE validation spots (default 0: at 10%% a 0.1 split holds out 1 of "
                        "12 measured spots, and the last epoch is what is scored anyway)")
    p.add_argument("--pcs", type=int, default=32)
    p.add_argument("--old-64px", action="store_true",
                   help="also score the ridge on real patches cut at 64 px")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--save-local", type=Path, default=None,
                   help="save the local model of the largest fraction of the first seed here "
                        "(for scripts/c2l_screenshot.py and benchmarks/c2l_seams.py)")
    p.add_argument("--merge", type=Path, nargs="+", default=None, metavar="JSON",
                   help="combine the runs of these result files (e.g. one seed each, run in "
                        "parallel) into --out and print the summary; nothing is computed")
    args = p.parse_args(argv)
    if args.merge:
        parts = [json.loads(f.read_text()) for f in args.merge]
        runs = [r for part in parts for r in part["runs"]]
        result = {**parts[0], "runs": runs, "seeds_completed": [r["seed"] for r in runs],
                  "summary": summarise(runs), "merged_from": [str(f) for f in args.merge],
                  "params_per_file": [part["params"] for part in parts]}
        args.out.write_text(json.dumps(result, indent=2, default=float))
        print_summary(result, args.out)
        return 0
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()

    from napari_hinge.c2l.data import paired_spots
    from napari_hinge.encoders import get_encoder
    from napari_hinge.expression import select_gene_panel
    from napari_hinge.hinge.pipeline import (
        coords_um_of,
        library_size,
        spot_features,
        transform_values,
    )
    from napari_hinge.io.legacy_st import read_her2st
    from napari_hinge.scfm import load_backbone

    folder = args.data / "her2st_subset"
    panel_ads = []
    for s in PANEL_SECTIONS:
        a = read_her2st(folder, s)
        panel_ads.append(a[library_size(a) >= 100].copy())
    genes = select_gene_panel(panel_ads, args.n_genes,
                              targets=[transform_values(a)[0] for a in panel_ads])
    adata = read_her2st(folder, SECTION)
    P64, Y, _, index = paired_spots(adata, genes)  # 64 px patches (C2L's input) + targets
    enc = get_encoder("efficientnet-lite0")
    from napari_hinge.patches import patch_side_px

    side = patch_side_px(adata)
    F = spot_features(adata, encoder=enc)[index]  # the user path: native resolution, cached
    F64 = enc.encode(P64, batch_size=8)
    coords_um = coords_um_of(adata)[index]
    Xc64 = with_context(F64, F64, coords_um, coords_um, args.context_um)
    Xc = with_context(F, F, coords_um, coords_um, args.context_um)
    vocab = load_backbone("builtin").vocab
    keep = [i for i, g in enumerate(genes) if g in vocab]
    ctx = {"P64": P64, "Y": Y, "xy_px": np.asarray(adata.obsm["spatial"], float)[index],
           "coords_um": coords_um, "F": F, "F64": F64, "Xc": Xc, "Xc64": Xc64,
           "encoder": enc, "side_px": side, "genes": genes, "adata": adata, "index": index,
           "keep": keep, "hinge_genes": [genes[i] for i in keep]}
    print(f"C3: {len(Y)} spots, panel {len(genes)} genes ({len(keep)} in HINGE's vocabulary), "
          f"real patch side {side} px", flush=True)

    runs = []
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for seed in args.seeds:
        runs.append(run_seed(seed, args, ctx))
        result = {
            "protocol": __doc__.split("\n\n")[1].strip(),
            "leakage": "central model: pre-trained on her2st C2/C4/C5/C6 + CMU-1 + DLPFC tiles, "
                       "no pixel of C3, no expression; local model: the measured C3 spots of "
                       "the run only; panel: C2/C4/C5/C6 expression; test spots: used only to "
                       "score",
            "genes": genes, "hinge_genes": ctx["hinge_genes"],
            "params": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                       if k != "seed_now"},
            "seeds_completed": [r["seed"] for r in runs],
            "summary": summarise(runs), "runs": runs,
            "seconds": time.perf_counter() - t_start,
            "machine": {"processor": platform.processor() or platform.machine(),
                        "threads": args.threads, "torch": torch.__version__},
        }
        tmp = args.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=2, default=float))
        tmp.replace(args.out)  # each completed seed is on disk

    print_summary(result, args.out)
    return 0


def print_summary(result: dict, out: Path) -> None:
    s = result["summary"]
    for model in ("ridge", "hinge"):
        if model not in s:
            continue
        print(f"\n{model}: mean PCC on the test spots (mean +- sd over seeds; ratio to 100% real)")
        for k, v in s[model].items():
            ratio = f"  x{v['ratio_to_100']:.2f} +- {v['ratio_sd']:.2f}" if "ratio_to_100" in v \
                else ""
            print(f"  {k:<48} {v['mean']:.3f} +- {v['sd']:.3f}{ratio}")
    for part in ("frechet_to_held_real", "condition_read_back_pcc"):
        print(f"\n{part}")
        for k, v in s[part].items():
            print(f"  {k:<60} {v['mean']:.3f} +- {v['sd']:.3f}")
    print(f"\nseeds {result['seeds_completed']}; wrote {out}")


if __name__ == "__main__":
    sys.exit(main())
