"""C2L-ST benchmark on her2st patient C: realism, conditioning and downstream value of
synthetic (patch, expression) pairs.

Protocol (one run, one seed; every figure below comes from this script):

- Sections C2, C4, C5, C6 train; C3 is held out (never seen by the central model, the local
  model or any predictor). Spots with >= 100 UMI. Panel: design.md rule on the training
  sections (expressed in >= 10% of the spots of every section, top 50 by variance of log1p
  CP10k). Patches: 112 um of tissue at 64 px (the C2L scale) for *every* row of the table, real
  or synthetic, encoded with EfficientNet-Lite0 (ImageNet).
- Few-shot: a random ``--fraction`` (25%) of the spots of each training section is "measured"
  (kept); the local model is adapted on those pairs only, from the shipped central weights.
- Synthetic pairs: at the positions of the other 75% of the spots (tissue with no measurement
  in the few-shot setting), the expression is the inverse-distance mean of the 4 nearest kept
  spots of the same section (the fill's "neighbours" source); C2L generates one patch per
  position (DDIM, classifier-free guidance) from noise, and (``--edit-strength``) one edit of
  the retrieved real patch (below) toward the condition (SDEdit).
- Realism: Frechet distance (in a 64-d PCA of the features, fitted on the kept real patches)
  between the held-out real patches at those positions and (a) the C2L patches, (b) unconditional
  central samples, (c) nearest-real-patch retrieval (a copy of the kept patch whose expression is
  nearest to the condition), (d) the C2L edits of those copies, plus references: the central
  model's autoencoder reconstructions of the kept real patches (the floor of any latent
  sample), the kept real patches, real C3.
- Conditioning: a ridge (alpha by inner leave-one-section-out) on the kept real pairs, applied
  to each kind of patch, against the conditioning expression (per-gene PCC, mean over genes).
- Downstream: the same ridge trained on the kept 25% real, + synthetic pairs, + retrieval pairs
  (control: same expressions, real copied patches), and 100% real; scored on C3 (mean PCC over
  the 50 genes, top-10 mean), and the same training sets for HINGE (builtin backbone, the
  panel genes in its vocabulary, ``--hinge-epochs``; mean of S = 4 samples, 10 reveal steps).

    python benchmarks/c2l.py --data ../shared/data --out bench_out/c2l.json
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

TRAIN = ("C2", "C4", "C5", "C6")
TEST = "C3"


def frechet(a: np.ndarray, b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to two feature sets."""
    from scipy import linalg

    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = np.real(linalg.sqrtm(s1 @ s2))
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def fit_ridge(X, Y, groups, real, alphas=None):
    """Standardise + ridge; alpha by inner leave-one-section-out scored on *real* rows only
    (synthetic rows only ever train)."""
    from napari_hinge.baselines import ALPHA_GRID, _ridge_path, _Scaler
    from napari_hinge.metrics import gene_pearson

    alphas = tuple(alphas or ALPHA_GRID)
    scores = np.zeros(len(alphas))
    uniq = np.unique(groups)
    for g in uniq:
        tr, va = groups != g, (groups == g) & real
        sc = _Scaler().fit(X[tr])
        Xv = sc.transform(X[va])
        for i, (W, b) in enumerate(_ridge_path(sc.transform(X[tr]), Y[tr], alphas)):
            scores[i] += gene_pearson(Xv @ W + b, Y[va]).mean() / len(uniq)
    alpha = alphas[int(np.argmax(scores))]
    sc = _Scaler().fit(X)
    (W, b), = _ridge_path(sc.transform(X), Y, [alpha])
    return lambda Z: sc.transform(Z) @ W + b, float(alpha)


def scores(pred, true) -> dict:
    from napari_hinge.metrics import gene_pearson, top_k_mean

    r = gene_pearson(pred, true)
    return {"mean_pcc": float(np.mean(r)), "top10_pcc": float(top_k_mean(r, 10))}


def downstream_hinge(setups: dict, test_x, test_y, genes: list[str], args):
    """HINGE trained on each downstream training set, scored on the test spots over the panel
    genes the builtin backbone knows (the others are reported, not modelled)."""
    from napari_hinge.hinge.pipeline import fit_hinge_arrays
    from napari_hinge.hinge.sampler import sample
    from napari_hinge.scfm import load_backbone
    from napari_hinge.training import run_to_end

    vocab = load_backbone("builtin").vocab
    keep = [i for i, g in enumerate(genes) if g in vocab]
    missing = [g for g in genes if g not in vocab]
    if missing:
        print(f"HINGE: {len(missing)} panel genes not in the backbone's vocabulary: "
              f"{', '.join(missing)}", flush=True)
    names = [genes[i] for i in keep]
    runs = {}
    for name, (X, Y, _G, real) in setups.items():
        # synthetic tiles have no spot neighbours: the first-round HINGE (no context, no prior)
        # that the README's C2L figures were measured with
        model, _ = run_to_end(fit_hinge_arrays(X, Y[:, keep], names, epochs=args.hinge_epochs,
                                               seed=args.seed, val_samples=0, context_um=None,
                                               center_sections=False, prior=None,
                                               predict_variance=False, calibrate=False))
        res = sample(model, test_x, n_samples=4, reveal_steps=10,
                     seed=args.seed)
        runs[name] = {**scores(res.mean.numpy(), test_y[:, keep]), "n_train": int(len(Y)),
                      "n_real": int(real.sum())}
        print(f"  HINGE {name}: mean PCC {runs[name]['mean_pcc']:.3f}", flush=True)
    return names, runs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="C2L-ST benchmark (her2st patient C)")
    p.add_argument("--data", type=Path, default=Path("../shared/data"))
    p.add_argument("--central", default="shipped")
    p.add_argument("--out", type=Path, default=Path("bench_out/c2l.json"))
    p.add_argument("--fraction", type=float, default=0.25)
    p.add_argument("--n-genes", type=int, default=50)
    p.add_argument("--adapt-steps", type=int, default=200)
    p.add_argument("--adapt-batch", type=int, default=16)
    p.add_argument("--ddim-steps", type=int, default=10)
    p.add_argument("--guidance", type=float, default=2.0)
    p.add_argument("--max-synthetic", type=int, default=400)
    p.add_argument("--n-uncond", type=int, default=200)
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--edit-strength", type=float, default=0.5,
                   help="also edit the retrieved real patch toward the condition (SDEdit) at "
                        "this strength (0: skip)")
    p.add_argument("--hinge-epochs", type=int, default=30,
                   help="HINGE as the downstream predictor too (0: ridge only)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--pcs", type=int, default=64)
    p.add_argument("--save-local", type=Path, default=None,
                   help="also save the adapted local model here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    timings = {}

    from napari_hinge.c2l.data import paired_spots
    from napari_hinge.c2l.fill import expression_from_neighbours
    from napari_hinge.c2l.local import build_local
    from napari_hinge.c2l.train import train_local
    from napari_hinge.encoders import get_encoder
    from napari_hinge.expression import select_gene_panel
    from napari_hinge.hinge.pipeline import library_size, transform_values
    from napari_hinge.io.spatial import read_her2st
    from napari_hinge.training import run_to_end, seed_everything

    seed_everything(args.seed)
    rng = np.random.default_rng(args.seed)
    folder = args.data / "her2st_subset"
    adatas = {}
    for s in (*TRAIN, TEST):
        a = read_her2st(folder, s)
        adatas[s] = a[library_size(a) >= 100].copy()
    train_ads = [adatas[s] for s in TRAIN]
    genes = select_gene_panel(train_ads, args.n_genes,
                              targets=[transform_values(a)[0] for a in train_ads])
    data = {s: paired_spots(adatas[s], genes) for s in (*TRAIN, TEST)}

    # few-shot split per training section
    kept, held = {}, {}
    for s in TRAIN:
        n = len(data[s][0])
        order = rng.permutation(n)
        m = max(2, int(round(args.fraction * n)))
        kept[s], held[s] = np.sort(order[:m]), np.sort(order[m:])
    K_patch = np.concatenate([data[s][0][kept[s]] for s in TRAIN])
    K_expr = np.concatenate([data[s][1][kept[s]] for s in TRAIN])
    K_group = np.concatenate([np.full(len(kept[s]), i) for i, s in enumerate(TRAIN)])
    print(f"panel {len(genes)} genes; kept {len(K_patch)} real pairs "
          f"({args.fraction:.0%} of {sum(len(data[s][0]) for s in TRAIN)})", flush=True)

    # conditions at the held positions: IDW over the kept spots of the same section
    H_patch, H_expr, C_expr, H_group, H_index = [], [], [], [], []
    for i, s in enumerate(TRAIN):
        a = adatas[s]
        kept_ad = a[data[s][3][kept[s]]]
        xy = np.asarray(a.obsm["spatial"], float)[data[s][3][held[s]]]
        C_expr.append(expression_from_neighbours(kept_ad, genes, xy, k=args.k))
        H_patch.append(data[s][0][held[s]])
        H_expr.append(data[s][1][held[s]])
        H_group.append(np.full(len(held[s]), i))
        H_index.append(held[s])
    H_patch, H_expr, C_expr, H_group, H_index = (np.concatenate(x) for x in
                                                 (H_patch, H_expr, C_expr, H_group, H_index))
    if len(C_expr) > args.max_synthetic:
        pick = np.sort(rng.choice(len(C_expr), args.max_synthetic, replace=False))
        H_patch, H_expr, C_expr, H_group, H_index = (x[pick] for x in (
            H_patch, H_expr, C_expr, H_group, H_index))

    # local adaptation on the kept pairs
    t = time.perf_counter()
    local = build_local(args.central, genes, seed=args.seed)
    local, last = run_to_end(train_local(local, K_patch, K_expr, steps=args.adapt_steps,
                                         batch_size=args.adapt_batch, seed=args.seed,
                                         eval_every=max(10, args.adapt_steps // 5)),
                             lambda e: e.kind == "epoch" and print(
                                 f"  adapt step {e.step}: loss {e.loss:.4f} val "
                                 f"{e.val_loss:.4f}", flush=True))
    timings["adapt_s"] = time.perf_counter() - t
    adapt_summary = {"final_loss": last.loss, "final_val_loss": last.val_loss,
                     "history": last.metrics.get("history")}
    if args.save_local:
        local.save(args.save_local)

    t = time.perf_counter()
    S_patch = local.sample(C_expr, guidance=args.guidance, steps=args.ddim_steps,
                           seed=args.seed)
    timings["sample_conditional_s"] = time.perf_counter() - t
    t = time.perf_counter()
    U_patch = local.central.sample(args.n_uncond, steps=args.ddim_steps, seed=args.seed + 1)
    timings["sample_unconditional_s"] = time.perf_counter() - t
    # retrieval: the kept real patch whose (standardised) expression is nearest the condition
    mu, sd = K_expr.mean(0), K_expr.std(0) + 1e-6
    dist = (((C_expr - mu) / sd)[:, None, :] - ((K_expr - mu) / sd)[None]) ** 2
    R_index = dist.sum(-1).argmin(1)
    E_patch = None
    if args.edit_strength:
        t = time.perf_counter()
        E_patch = local.sample(C_expr, guidance=args.guidance, steps=args.ddim_steps,
                               seed=args.seed, init=K_patch[R_index],
                               strength=args.edit_strength)
        timings["sample_edit_s"] = time.perf_counter() - t

    # the autoencoder's floor: no latent sample can look more real than a reconstruction
    A_patch = (local.central.reconstruct(K_patch) if local.central.autoencoder is not None
               else None)

    t = time.perf_counter()
    enc = get_encoder("efficientnet-lite0")
    enc_kw = {"batch_size": 8}
    all_feats = {s: enc.encode(data[s][0], **enc_kw) for s in TRAIN}
    F = {name: enc.encode(x, **enc_kw) for name, x in (
        ("synthetic", S_patch), ("unconditional", U_patch), ("test", data[TEST][0]))}
    F["kept"] = np.concatenate([all_feats[s][kept[s]] for s in TRAIN])
    F["held"] = np.concatenate([all_feats[TRAIN[g]][i] for g, i in zip(H_group, H_index,
                                                                      strict=True)]
                               ).reshape(len(H_index), -1)
    F["retrieval"] = F["kept"][R_index]
    if E_patch is not None:
        F["edit"] = enc.encode(E_patch, **enc_kw)
    if A_patch is not None:
        F["reconstruction"] = enc.encode(A_patch, **enc_kw)
    timings["encode_s"] = time.perf_counter() - t

    # realism: Frechet distance to the held-out real patches, in a PCA of the kept features
    from sklearn.decomposition import PCA

    pca = PCA(args.pcs, random_state=args.seed).fit(F["kept"])
    Z = {k: pca.transform(v) for k, v in F.items()}
    fd = {k: frechet(Z["held"], Z[k]) for k in ("synthetic", "edit", "unconditional",
                                                "retrieval", "reconstruction", "kept", "test")
          if k in Z}

    # conditioning: ridge on kept real pairs, applied to each kind of patch
    predict, alpha = fit_ridge(F["kept"], K_expr, K_group, np.ones(len(K_expr), bool))
    n_u = min(len(U_patch), len(C_expr))
    cond = {
        "synthetic (C2L, conditioned)": scores(predict(F["synthetic"]), C_expr),
        "unconditional samples (random pairing)": scores(predict(F["unconditional"][:n_u]),
                                                         C_expr[:n_u]),
        "nearest-real retrieval": scores(predict(F["retrieval"]), C_expr),
        **({f"C2L edit of the retrieved patch (strength {args.edit_strength})":
            scores(predict(F["edit"]), C_expr)} if "edit" in F else {}),
        "real patch at the position (vs its condition)": scores(predict(F["held"]), C_expr),
        "real patch at the position (vs its measurement)": scores(predict(F["held"]), H_expr),
    }

    # downstream on C3
    test_y = data[TEST][1]
    runs = {}
    ones = lambda n: np.ones(n, bool)  # noqa: E731
    zeros = lambda n: np.zeros(n, bool)  # noqa: E731
    setups = {
        f"real {args.fraction:.0%}": (F["kept"], K_expr, K_group, ones(len(K_expr))),
        f"real {args.fraction:.0%} + C2L synthetic": (
            np.concatenate([F["kept"], F["synthetic"]]), np.concatenate([K_expr, C_expr]),
            np.concatenate([K_group, H_group]),
            np.concatenate([ones(len(K_expr)), zeros(len(C_expr))])),
        f"real {args.fraction:.0%} + retrieval copies": (
            np.concatenate([F["kept"], F["retrieval"]]), np.concatenate([K_expr, C_expr]),
            np.concatenate([K_group, H_group]),
            np.concatenate([ones(len(K_expr)), zeros(len(C_expr))])),
        f"real {args.fraction:.0%} + unconditional samples (random expression)": (
            np.concatenate([F["kept"], F["unconditional"][:n_u]]),
            np.concatenate([K_expr, C_expr[:n_u]]), np.concatenate([K_group, H_group[:n_u]]),
            np.concatenate([ones(len(K_expr)), zeros(n_u)])),
    }
    if "edit" in F:
        setups[f"real {args.fraction:.0%} + C2L edits of retrieved patches"] = (
            np.concatenate([F["kept"], F["edit"]]), np.concatenate([K_expr, C_expr]),
            np.concatenate([K_group, H_group]),
            np.concatenate([ones(len(K_expr)), zeros(len(C_expr))]))
    all_X = np.concatenate([all_feats[s] for s in TRAIN])
    all_Y = np.concatenate([data[s][1] for s in TRAIN])
    all_G = np.concatenate([np.full(len(data[s][1]), i) for i, s in enumerate(TRAIN)])
    setups["real 100%"] = (all_X, all_Y, all_G, ones(len(all_Y)))
    for name, (X, Y, G, real) in setups.items():
        f, a = fit_ridge(X, Y, G, real)
        runs[name] = {**scores(f(F["test"]), test_y), "n_train": int(len(Y)),
                      "n_real": int(real.sum()), "alpha": a}
    hinge_runs, hinge_genes = {}, []
    if args.hinge_epochs:
        t = time.perf_counter()
        hinge_genes, hinge_runs = downstream_hinge(setups, F["test"], test_y, genes, args)
        timings["hinge_downstream_s"] = time.perf_counter() - t

    for table in (runs, hinge_runs):
        base = table.get(f"real {args.fraction:.0%}", {}).get("mean_pcc")
        for r in table.values():
            r["ratio_vs_real_fraction"] = r["mean_pcc"] / base if base else None
    ref_fd = fd["unconditional"]
    result = {
        "protocol": __doc__.split("\n\n")[1].strip(),
        "genes": genes, "panel_rule": "design.md: >=10% of spots of every training section, "
                                      "top 50 by variance of log1p CP10k",
        "params": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "n": {"kept": len(K_expr), "synthetic": len(C_expr), "unconditional": len(U_patch),
              "test": len(test_y), "real_100": int(len(all_Y))},
        "frechet_distance_to_held_real": fd,
        "frechet_ratio_vs_unconditional": {k: v / ref_fd for k, v in fd.items()},
        "conditioning_ridge_alpha": alpha, "conditioning": cond,
        "downstream_C3": runs, "downstream_C3_hinge": hinge_runs,
        "hinge_genes": hinge_genes, "adapt": adapt_summary, "timings_s": timings,
        "seconds": time.perf_counter() - t_start,
        "machine": {"processor": platform.processor() or platform.machine(),
                    "threads": args.threads, "torch": torch.__version__},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=float))

    print("\nRealism: Frechet distance to held-out real patches (64-d PCA of EfficientNet-Lite0"
          " features; lower is better)")
    print(f"{'patches':<40} {'FD':>8} {'ratio vs uncond':>16}")
    for k, v in fd.items():
        print(f"{k:<40} {v:8.2f} {v / ref_fd:16.2f}")
    print("\nConditioning: ridge (trained on kept real pairs) applied to the patches, "
          "PCC with the conditioning expression")
    print(f"{'patches':<50} {'mean PCC':>9} {'top-10':>8}")
    for k, v in cond.items():
        print(f"{k:<50} {v['mean_pcc']:9.3f} {v['top10_pcc']:8.3f}")
    print(f"\nDownstream: tuned ridge, scored on held-out C3 ({len(test_y)} spots, "
          f"{len(genes)} genes, 64 px patches)")
    print(f"{'training set':<58} {'n':>5} {'mean PCC':>9} {'top-10':>8} {'ratio':>6}")
    for k, v in runs.items():
        print(f"{k:<58} {v['n_train']:5d} {v['mean_pcc']:9.3f} {v['top10_pcc']:8.3f} "
              f"{v['ratio_vs_real_fraction']:6.2f}")
    if hinge_runs:
        print(f"\nDownstream: HINGE ({args.hinge_epochs} epochs, builtin backbone, "
              f"{len(hinge_genes)} genes of the panel in its vocabulary), scored on C3")
        print(f"{'training set':<58} {'n':>5} {'mean PCC':>9} {'top-10':>8} {'ratio':>6}")
        for k, v in hinge_runs.items():
            print(f"{k:<58} {v['n_train']:5d} {v['mean_pcc']:9.3f} {v['top10_pcc']:8.3f} "
                  f"{v['ratio_vs_real_fraction']:6.2f}")
    print(f"\ntimings: {json.dumps({k: round(v, 1) for k, v in timings.items()})}; "
          f"total {result['seconds']:.0f} s; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
