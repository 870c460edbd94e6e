"""HINGE vs the baselines on her2st patient C, leave-one-section-out (design.md section 6).

    python benchmarks/hinge_her2st.py                          # LOSO C2-C6, 50 genes
    python benchmarks/hinge_her2st.py --genes 250
    python benchmarks/hinge_her2st.py --train DIR:C2,C4,C5,C6 --test DIR:C3
    python benchmarks/hinge_her2st.py --methods hinge,hest_ridge --folds C2
    python benchmarks/hinge_her2st.py --seeds 0,1,2 --context-um 0 --prior none  # ablation row
    python benchmarks/hinge_her2st.py --merge A.json B.json --out ALL.json  # parallel parts

Every method sees the same inputs: with ``--context-um R`` (default: the shipped recipe's)
each spot's features are followed by its neighbours' mean within R µm, for HINGE *and* the
ridges/MLP; with ``--tta`` HINGE's samples cycle the 8 dihedral views of a test spot and the
baselines get the mean of the 8 views (train and test). HINGE's recipe flags (``--prior``,
``--variance``) ablate the rest. Uncertainty: coverage of the calibrated 80% / 95% intervals
on the held-out section (and of the raw mean +- z sd), Spearman of spread vs |error|.

Same folds, panel and features (efficientnet-lite0, 160 px crops, cached) for every method:
HINGE on the shipped pre-trained builtin backbone, HINGE on a randomly initialised backbone of
the same shape (does pre-training help?), the HEST ridge, the tuned ridge (inner LOSO alpha) and
the MLP (``napari_hinge.baselines``, the harness of ``benchmarks/baselines_her2st.py``).
Metrics: mean gene Pearson r, top-10/top-50, MSE/MAE (log1p CP10k), co-expression consistency,
train and sample seconds. One table per method (per fold + mean) and a summary with each
method's mean-PCC ratio to the HEST ridge and to the tuned ridge; JSON with seeds and settings.
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from baselines_her2st import DEFAULT_DATA, REPO, _parse_spec, _progress, run_folds
from napari_hinge.baselines import default_baselines
from napari_hinge.encoders import get_encoder
from napari_hinge.expression import (
    HER2ST_PATCH_PX,
    HER2ST_PATIENT_C,
    TARGET_RULE,
    load_her2st_sections,
    make_fold,
)
from napari_hinge.features import center_per_group, context_features
from napari_hinge.hinge.calibration import DEPTH_POWERS, depth_factor
from napari_hinge.hinge.pipeline import (
    RECIPE,
    calibrated_uncertainty,
    fit_hinge_arrays,
    model_inputs,
    standardized,
)
from napari_hinge.hinge.sampler import sample
from napari_hinge.metrics import expression_scores, interval_coverage, spread_error_spearman
from napari_hinge.training import run_to_end

BASELINES = ("hest_ridge", "tuned_ridge", "mlp", "knn10")
HINGE_METHODS = {"hinge": "builtin", "hinge_random_backbone": "random"}
ALL = ("hinge", "hinge_random_backbone", "hest_ridge", "tuned_ridge", "mlp", "knn10")
DEFAULT_METHODS = ("hinge", "hinge_random_backbone", "hest_ridge", "tuned_ridge", "mlp")
KEYS = ("pcc_mean", "pcc_top10", "pcc_top50", "mse", "mae", "coexpression", "fit_s",
        "predict_s")
RELIABILITY_LEVELS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)
UNCERTAINTY_KEYS = ("coverage_80", "coverage_95", "raw_coverage_80", "raw_coverage_95",
                    "spearman_pooled", "spearman_per_gene", "spearman_measured_depth")


def hinge_fold(fold, *, backbone: str, args, seed: int) -> dict:
    """Train HINGE on a fold's training spots (all 8 views when cached) and score the test."""
    X_tr = fold.X_train_aug if (fold.X_train_aug is not None and not args.no_augment) \
        else fold.X_train
    t0 = time.perf_counter()
    gen = fit_hinge_arrays(
        X_tr, fold.Y_train, fold.genes, backbone=backbone, encoder=args.encoder,
        coords_um=fold.coords_train, groups=fold.groups_train,
        context_um=args.context_um or None, prior=args.prior, predict_variance=args.variance,
        center_sections=args.center, residual_scale=args.residual_scale,
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
        ada_rank=args.ada_rank or None, standardize=not args.raw_features,
        warmup_epochs=args.warmup_epochs, val_fraction=args.val_fraction, seed=seed,
        val_samples=0, device=args.device, library_size=fold.library_train,
        depth_calibration=args.depth_calibration, depth_power=args.depth_power,
    )
    model, last = run_to_end(gen)
    t1 = time.perf_counter()
    X_te = fold.X_test_aug if (args.tta and fold.X_test_aug is not None) else fold.X_test
    res = sample(model, model_inputs(model, X_te, fold.coords_test, fold.groups_test),
                 n_samples=args.samples, reveal_steps=args.reveal_steps, seed=seed,
                 batch_size=args.sample_batch, device=args.device)
    t2 = time.perf_counter()
    mean, raw = res.mean.numpy(), res.std.numpy()
    scores = expression_scores(mean, fold.Y_test, genes=fold.genes)
    if model.config.prior is not None:  # the same model with its residual shrunk
        z = standardized(model, model_inputs(model, X_te, fold.coords_test, fold.groups_test))
        z = z if z.ndim == 2 else z.mean(0)  # the mean of the standardised views
        with torch.no_grad():
            prior = model.prior_mean(torch.as_tensor(z), standardized=True).numpy()
        residual = (mean - prior) / model.config.residual_scale
        scores["pcc_by_residual_scale"] = {
            f"{lam:g}": expression_scores(prior + lam * residual, fold.Y_test)["pcc_mean"]
            for lam in (0.0, 0.25, 0.5, 0.75, 1.0, 1.5)}
    unc = calibrated_uncertainty(model, mean, raw, prior=res.prior.numpy())
    cal = model.calibration
    scores["depth_power"] = None if cal is None else cal.depth_power  # 0: spread alone
    if cal is not None and cal.depth_weight is not None:
        # how each depth power would rank this section's errors (a per-gene scale does not
        # change ranks): the power is a recipe choice, made by the mean over held-out folds
        depth = cal.depth(res.prior.numpy())
        spread = raw + np.asarray(cal.floor, np.float32)
        scores["spearman_by_depth_power"] = {
            f"{b:g}": spread_error_spearman(spread * depth_factor(depth, b)[:, None], mean,
                                            fold.Y_test)["per_gene"] for b in DEPTH_POWERS}
    for level, z in ((80, 1.2816), (95, 1.96)):
        scores[f"raw_coverage_{level}"] = interval_coverage(mean - z * raw, mean + z * raw,
                                                            fold.Y_test)
        scores[f"coverage_{level}"] = (interval_coverage(unc[f"lower_{level}"],
                                                         unc[f"upper_{level}"], fold.Y_test)
                                       if f"lower_{level}" in unc else None)
    # reliability diagram: coverage of mean +- z_p sd, calibrated and raw, for many levels
    from scipy.stats import norm

    scores["reliability"] = {
        f"{p:g}": [interval_coverage(mean - z * sd, mean + z * sd, fold.Y_test)
                   for sd in (unc["std"], raw)]
        for p in RELIABILITY_LEVELS for z in [float(norm.ppf(0.5 + p / 2))]}
    rho = spread_error_spearman(unc["std"], mean, fold.Y_test)
    scores.update(spearman_pooled=rho["pooled"], spearman_per_gene=rho["per_gene"])
    if fold.library_test is not None:
        # reference, not a method: how well the spot's *measured* depth (which a new slide
        # does not have) ranks the errors, the Poisson share of them (sd ~ 1 / sqrt(UMIs))
        measured = center_per_group(np.log(fold.library_test)[:, None], fold.groups_test,
                                    dtype=np.float64)  # within each section, as depth is
        oracle = np.repeat(depth_factor(measured[:, 0], 1.0)[:, None], mean.shape[1], axis=1)
        scores["spearman_measured_depth"] = spread_error_spearman(oracle, mean,
                                                                  fold.Y_test)["per_gene"]
    summary = last.metrics if last is not None else {}
    scores.update(test=fold.test, train=fold.train, fit_s=t1 - t0, predict_s=t2 - t1, seed=seed,
                  n_train=len(fold.Y_train), n_test=len(fold.Y_test),
                  mean_std=float(raw.mean()), best_epoch=summary.get("best_epoch"),
                  best_val_loss=summary.get("best_val_loss"),
                  trainable_params=summary.get("trainable_params"),
                  frozen_params=summary.get("frozen_params"),
                  genes_outside_vocab=list(model.config.extra_genes),
                  final_train_loss=last.loss if last is not None else None)
    return scores


def baseline_inputs(fold, *, context_um: float | None, tta: bool, center: bool):
    """The fold as the baselines see it: the same context, centring (and views) HINGE gets."""
    from dataclasses import replace

    def inputs(X, X_aug, coords, groups):
        f = X_aug.mean(0) if (tta and X_aug is not None) else X
        if context_um:
            f = context_features(f, coords, radius_um=context_um, groups=groups)
        return center_per_group(f, groups) if center else f

    return replace(fold, X_train=inputs(fold.X_train, fold.X_train_aug, fold.coords_train,
                                        fold.groups_train),
                   X_test=inputs(fold.X_test, fold.X_test_aug, fold.coords_test,
                                 fold.groups_test))


def load_folds(*, encoder, n_genes, data, sections, train, test, augment):
    """LOSO folds (or one --train/--test fold); the panel rule runs over all genes."""
    kw = {"encoder": encoder, "side_px": HER2ST_PATCH_PX, "augment": augment,
          "progress": _progress}
    if (train is None) != (test is None):
        raise SystemExit("--train and --test go together")
    if train is not None:
        (tr_path, tr_secs), (te_path, te_secs) = _parse_spec(train), _parse_spec(test)
        splits = [(load_her2st_sections(tr_path, tr_secs, **kw),
                   load_her2st_sections(te_path, te_secs, **kw))]
    else:
        secs = load_her2st_sections(data, list(sections), **kw)
        splits = [([s for s in secs if s is not t], [t]) for t in secs]
    folds = []
    for tr, te in splits:
        fold = make_fold(tr, te, n_genes=n_genes)
        fold.X_test_aug = (np.concatenate([t.features for t in te], axis=1)
                           if all(t.features.ndim == 3 for t in te) else None)
        folds.append(fold)
    return folds


def _mean(rows: list[dict], keys=KEYS) -> dict:
    return {k: float(np.mean([r[k] for r in rows if r.get(k) is not None]))
            for k in keys if any(r.get(k) is not None for r in rows)}


def _fold_name(r: dict) -> str:
    return ",".join(r["test"])


def print_method(name: str, rows: list[dict], base: dict) -> None:
    """Per fold (mean over seeds) with the ratios to the ridges on the same fold."""
    print(f"\n== {name}")
    head = (f"{'fold':8s} {'PCC':>6s} {'top10':>6s} {'top50':>6s} {'MSE':>7s} {'MAE':>6s} "
            f"{'coexp':>6s} {'train s':>8s} {'sample s':>8s} {'/hest':>6s} {'/tuned':>6s}")
    print(head)
    print("-" * len(head))
    folds = list(dict.fromkeys(_fold_name(r) for r in rows))
    table = [dict(_mean([r for r in rows if _fold_name(r) == f]), test=[f]) for f in folds]
    for r in table + [dict(_mean(table), test=["mean"])]:
        fold = _fold_name(r)
        ratios = []
        for b in ("hest_ridge", "tuned_ridge"):
            ref = base.get(b, {}).get(fold)
            ratios.append(f"{r['pcc_mean'] / ref:6.2f}" if ref else f"{'':>6s}")
        print(f"{fold:8s} {r['pcc_mean']:6.3f} {r['pcc_top10']:6.3f} {r['pcc_top50']:6.3f} "
              f"{r['mse']:7.3f} {r['mae']:6.3f} {r['coexpression']:6.3f} {r['fit_s']:8.1f} "
              f"{r['predict_s']:8.1f} {ratios[0]} {ratios[1]}")


def _per_seed_means(rows: list[dict]) -> list[float]:
    seeds = sorted({r.get("seed", 0) for r in rows})
    return [float(np.mean([r["pcc_mean"] for r in rows if r.get("seed", 0) == s]))
            for s in seeds]


def _uses_views(methods, a) -> bool:
    """Whether the run encodes all 8 dihedral views (HINGE trains on them; --tta tests on them)."""
    return (any(m in HINGE_METHODS for m in methods) and not a.no_augment) or a.tta


def report(results: dict[str, list[dict]], *, methods, seeds, settings: dict, n_genes: int,
           encoder_name: str, hvg_rule: str, folds: list[dict], feature_seconds: float,
           machine: dict | None = None, merged_from=None) -> dict:
    """Print the per-method tables and the summary of ``results`` (method -> rows, one per
    fold and seed) and return the JSON record (also what ``--merge`` rebuilds)."""
    a = argparse.Namespace(**settings)
    augment = _uses_views(methods, a)
    per_fold = {}
    for b in ("hest_ridge", "tuned_ridge"):
        rows = results.get(b, [])
        per_fold[b] = {_fold_name(r): r["pcc_mean"] for r in rows}
        per_fold[b]["mean"] = float(np.mean([r["pcc_mean"] for r in rows])) if rows else None
    print(f"\nher2st expression from H&E: {len(folds)} fold(s), {n_genes} genes, encoder "
          f"{encoder_name}, patches {HER2ST_PATCH_PX} px, seeds {seeds}")
    print(f"gene panel: {hvg_rule}")
    print(f"inputs of every method: context {a.context_um or 'none'} µm, centred per section "
          f"{a.center}, test-time views {a.tta}")
    print(f"HINGE: epochs {a.epochs}, batch {a.batch_size}, lr {a.lr}, ada_rank "
          f"{a.ada_rank or 'full'}, S {a.samples}, reveal steps {a.reveal_steps}, "
          f"prior {a.prior}, variance head {a.variance}, augment {augment}")
    for m in methods:
        if m in results:
            print_method(m, results[m], per_fold)
    summary = []
    print(f"\n{'method':24s} {'PCC':>6s} {'+-sd':>6s} {'top10':>6s} {'coexp':>6s} "
          f"{'train s':>8s} {'sample s':>8s} {'/hest':>6s} {'/tuned':>6s} {'cov80':>6s} "
          f"{'cov95':>6s} {'rho':>6s}")
    for m in methods:
        if m not in results:
            continue
        seed_means = _per_seed_means(results[m])
        row = {"method": m, **_mean(results[m], KEYS + UNCERTAINTY_KEYS),
               "pcc_seed_means": seed_means, "pcc_sd_over_seeds": float(np.std(seed_means))}
        for b in ("hest_ridge", "tuned_ridge"):
            ref = per_fold[b].get("mean")
            row[f"ratio_to_{b}"] = row["pcc_mean"] / ref if ref else None
        summary.append(row)
        rh, rt = row["ratio_to_hest_ridge"], row["ratio_to_tuned_ridge"]

        def f6(v):
            return f"{v:6.2f}" if v is not None else f"{'':>6s}"
        print(f"{m:24s} {row['pcc_mean']:6.3f} {row['pcc_sd_over_seeds']:6.3f} "
              f"{row['pcc_top10']:6.3f} {row['coexpression']:6.3f} {row['fit_s']:8.1f} "
              f"{row['predict_s']:8.1f} {f6(rh)} {f6(rt)} {f6(row.get('coverage_80'))} "
              f"{f6(row.get('coverage_95'))} {f6(row.get('spearman_per_gene'))}")
    out = {
        "benchmark": "hinge_her2st",
        "encoder": encoder_name,
        "n_genes": n_genes,
        "hvg_rule": hvg_rule,
        "target": TARGET_RULE,
        "patch_px": HER2ST_PATCH_PX,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in settings.items()},
        "seeds": seeds,
        "folds": folds,
        "feature_seconds": feature_seconds,
        "summary": summary,
        "per_fold": results,
        "machine": machine or {
            "python": platform.python_version(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "cpu": platform.processor(),
            "device": a.device or ("cuda" if torch.cuda.is_available() else "cpu"),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
    }
    if merged_from:
        out["merged_from"] = merged_from
    return out


def merge(paths: list[Path]) -> dict:
    """One record from result files of the same protocol run in parallel (e.g. one seed or
    some folds each): their rows pooled; a (method, fold, seed) row present twice is an
    error, as are files with different gene counts, encoders or recipes."""
    parts = [json.loads(Path(f).read_text()) for f in paths]
    recipe_keys = ("genes", "encoder", "context_um", "prior", "variance", "center",
                   "residual_scale", "epochs", "batch_size", "lr", "ada_rank", "samples",
                   "reveal_steps", "tta", "depth_calibration", "depth_power", "no_augment",
                   "val_fraction")
    first = parts[0]
    for f, part in zip(paths[1:], parts[1:], strict=True):
        diff = [k for k in recipe_keys
                if part["settings"].get(k) != first["settings"].get(k)]
        if diff:
            raise SystemExit(f"{f}: settings {diff} differ from {paths[0]}'s; not merged")
    results: dict[str, list[dict]] = {}
    seen = set()
    for f, part in zip(paths, parts, strict=True):
        for m, rows in part["per_fold"].items():
            for r in rows:
                key = (m, _fold_name(r), r.get("seed"))
                if key in seen:
                    raise SystemExit(f"{f}: {key} is already in an earlier file; not merged")
                seen.add(key)
                results.setdefault(m, []).append(r)
    methods = list(dict.fromkeys(m for part in parts for m in part["per_fold"]))
    seeds = sorted({s for part in parts for s in part.get("seeds", [])})
    folds = list({",".join(f["test"]): f for part in parts for f in part["folds"]}.values())
    return report(results, methods=methods, seeds=seeds, settings=first["settings"],
                  n_genes=first["n_genes"], encoder_name=first["encoder"],
                  hvg_rule=first["hvg_rule"], folds=folds,
                  feature_seconds=max(p["feature_seconds"] for p in parts),
                  machine=first["machine"], merged_from=[str(f) for f in paths])


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="her2st folder")
    p.add_argument("--sections", default=",".join(HER2ST_PATIENT_C))
    p.add_argument("--train", help="PATH:SECTIONS (with --test) instead of LOSO")
    p.add_argument("--test", help="PATH:SECTIONS")
    p.add_argument("--folds", default=None, help="only these held-out sections (LOSO)")
    p.add_argument("--genes", type=int, default=50)
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS))
    p.add_argument("--encoder", default="efficientnet-lite0")
    p.add_argument("--context-um", type=float, default=RECIPE["context_um"] or 0.0,
                   help="neighbour context radius for every method (0 = the spot alone)")
    p.add_argument("--prior", default=RECIPE["prior"] or "none", choices=("ridge", "none"),
                   help="HINGE's deterministic prior (the diffusion models the residual)")
    p.add_argument("--variance", action=argparse.BooleanOptionalAction,
                   default=RECIPE["predict_variance"], help="HINGE's variance head")
    p.add_argument("--depth-calibration", action=argparse.BooleanOptionalAction,
                   default=RECIPE["depth_calibration"],
                   help="HINGE's spread scaled by each spot's depth predicted from the image")
    p.add_argument("--depth-power", type=float, default=RECIPE["depth_power"],
                   help="the depth scaling's power (default: the recipe's; negative: chosen "
                        "on the validation spots)")
    p.add_argument("--center", action=argparse.BooleanOptionalAction,
                   default=RECIPE["center_sections"],
                   help="features centred per section, for every method")
    p.add_argument("--residual-scale", type=float, default=RECIPE["residual_scale"],
                   help="HINGE: prior + this x the sampled residual")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--ada-rank", type=int, default=32, help="0 = full Ada6Head (paper)")
    p.add_argument("--warmup-epochs", type=int, default=5)
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--raw-features", action="store_true", help="no feature standardisation")
    p.add_argument("--no-augment", action="store_true", help="train on the identity view only")
    p.add_argument("--samples", type=int, default=8, help="S samples per spot")
    p.add_argument("--tta", action="store_true",
                   help="HINGE sample s of a test spot uses its dihedral view s %% 8; the "
                        "baselines get the mean of the 8 views")
    p.add_argument("--reveal-steps", type=int, default=10, help="sampler steps (T = 50)")
    p.add_argument("--sample-batch", type=int, default=512)
    p.add_argument("--seeds", default="42", help="comma-separated seeds (HINGE, MLP)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--out", type=Path, default=None, help="JSON output")
    p.add_argument("--merge", type=Path, nargs="+", default=None, metavar="JSON",
                   help="combine result files of the same recipe run in parallel (some seeds "
                        "or folds each) into --out and print the tables; nothing is computed")
    a = p.parse_args(argv)
    if a.merge:
        if a.out is None:
            raise SystemExit("--merge needs --out")
        out = merge(a.merge)
        a.out.write_text(json.dumps(out, indent=1, default=str))
        print(f"wrote {a.out}")
        return out
    a.prior = None if a.prior == "none" else a.prior
    if a.depth_power is not None and a.depth_power < 0:
        a.depth_power = None  # fit_calibration then picks it on the validation spots
    if a.threads:
        torch.set_num_threads(a.threads)
    methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    unknown = set(methods) - set(ALL)
    if unknown:
        raise SystemExit(f"unknown methods {sorted(unknown)}; choose from {ALL}")
    seeds = [int(x) for x in a.seeds.split(",")]
    encoder = get_encoder(a.encoder)
    t0 = time.perf_counter()
    augment = _uses_views(methods, a)
    folds = load_folds(encoder=encoder, n_genes=a.genes, data=a.data,
                       sections=a.sections.split(","), train=a.train, test=a.test,
                       augment=augment)
    if a.folds:
        keep = set(a.folds.split(","))
        folds = [f for f in folds if set(f.test) & keep]
    t_feat = time.perf_counter() - t0

    results: dict[str, list[dict]] = {}
    path = a.out or REPO / "bench_out" / f"hinge_her2st_{a.genes}genes.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    # a long run (250 genes x 3 seeds: hours on 2 cores) keeps each finished fold here
    partial = path.with_name(path.stem + ".partial.json")
    base = [m for m in methods if m in BASELINES]
    if base:
        base_folds = [baseline_inputs(f, context_um=a.context_um or None, tta=a.tta,
                                      center=a.center) for f in folds]
        for seed in seeds if "mlp" in base else seeds[:1]:
            run = run_folds(base_folds, lambda seed=seed: {
                m: model for m, model in default_baselines(seed=seed).items()
                if m in base and (m == "mlp" or seed == seeds[0])})
            for m, rows in run.items():
                results.setdefault(m, []).extend(dict(r, seed=seed) for r in rows)
    for m in methods:
        if m not in HINGE_METHODS:
            continue
        for seed in seeds:
            for fold in folds:
                r = hinge_fold(fold, backbone=HINGE_METHODS[m], args=a, seed=seed)
                results.setdefault(m, []).append(r)
                print(f"  fold {','.join(fold.test)} seed {seed} {m:22s} pcc "
                      f"{r['pcc_mean']:.3f}  cov80 {r['coverage_80'] or float('nan'):.2f}  "
                      f"train {r['fit_s']:.0f}s  sample {r['predict_s']:.0f}s",
                      file=sys.stderr, flush=True)
                partial.write_text(json.dumps({"settings": vars(a), "partial": True,
                                               "per_fold": results}, indent=1, default=str))

    out = report(results, methods=methods, seeds=seeds, settings=vars(a), n_genes=a.genes,
                 encoder_name=encoder.name, hvg_rule=folds[0].hvg_rule,
                 folds=[{"test": f.test, "train": f.train, "genes": f.genes} for f in folds],
                 feature_seconds=t_feat)
    path.write_text(json.dumps(out, indent=1, default=str))
    partial.unlink(missing_ok=True)
    print(f"wrote {path}")
    return out


if __name__ == "__main__":
    main()
