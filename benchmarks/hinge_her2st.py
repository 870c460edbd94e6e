"""HINGE vs the baselines on her2st patient C, leave-one-section-out (design.md section 6).

    python benchmarks/hinge_her2st.py                          # LOSO C2-C6, 50 genes
    python benchmarks/hinge_her2st.py --genes 250
    python benchmarks/hinge_her2st.py --train DIR:C2,C4,C5,C6 --test DIR:C3
    python benchmarks/hinge_her2st.py --methods hinge,hest_ridge --folds C2

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
from napari_hinge.hinge.pipeline import (
    fit_hinge_arrays,
    normalize_features,
    restrict_to_vocab,
)
from napari_hinge.hinge.sampler import sample
from napari_hinge.metrics import expression_scores
from napari_hinge.training import run_to_end

BASELINES = ("hest_ridge", "tuned_ridge", "mlp", "knn10")
HINGE_METHODS = {"hinge": "builtin", "hinge_random_backbone": "random"}
ALL = ("hinge", "hinge_random_backbone", "hest_ridge", "tuned_ridge", "mlp", "knn10")
DEFAULT_METHODS = ("hinge", "hinge_random_backbone", "hest_ridge", "tuned_ridge", "mlp")
KEYS = ("pcc_mean", "pcc_top10", "pcc_top50", "mse", "mae", "coexpression", "fit_s",
        "predict_s")


def hinge_fold(fold, *, backbone: str, args) -> dict:
    """Train HINGE on a fold's training spots (all 8 views when cached) and score the test."""
    X_tr = fold.X_train_aug if (fold.X_train_aug is not None and not args.no_augment) \
        else fold.X_train
    t0 = time.perf_counter()
    gen = fit_hinge_arrays(
        X_tr, fold.Y_train, fold.genes, backbone=backbone, encoder=args.encoder,
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
        ada_rank=args.ada_rank or None, standardize=not args.raw_features,
        warmup_epochs=args.warmup_epochs, val_fraction=args.val_fraction, seed=args.seed,
        val_samples=0, device=args.device,
    )
    model, last = run_to_end(gen)
    t1 = time.perf_counter()
    X_te = fold.X_test_aug if (args.tta and fold.X_test_aug is not None) else fold.X_test
    res = sample(model, normalize_features(model, X_te), n_samples=args.samples,
                 reveal_steps=args.reveal_steps, seed=args.seed, batch_size=args.sample_batch,
                 device=args.device)
    t2 = time.perf_counter()
    scores = expression_scores(res.mean.numpy(), fold.Y_test, genes=fold.genes)
    summary = last.metrics if last is not None else {}
    scores.update(test=fold.test, train=fold.train, fit_s=t1 - t0, predict_s=t2 - t1,
                  n_train=len(fold.Y_train), n_test=len(fold.Y_test),
                  mean_std=float(res.std.mean()), best_epoch=summary.get("best_epoch"),
                  best_val_loss=summary.get("best_val_loss"),
                  trainable_params=summary.get("trainable_params"),
                  frozen_params=summary.get("frozen_params"),
                  final_train_loss=last.loss if last is not None else None)
    return scores


def load_folds(*, encoder, n_genes, data, sections, train, test, augment, vocab):
    """LOSO folds (or one --train/--test fold) whose panel rule runs over the genes the
    backbone knows (``vocab``), so every method is scored on the same genes. Returns the folds
    and, per fold, the genes the rule over all genes would have added."""
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
    folds, skipped = [], []
    for tr, te in splits:
        full = make_fold(tr, te, n_genes=n_genes).genes
        tr_v, _ = restrict_to_vocab(tr, vocab)
        te_v, _ = restrict_to_vocab(te, vocab)
        fold = make_fold(tr_v, te_v, n_genes=n_genes)
        fold.X_test_aug = (np.concatenate([t.features for t in te_v], axis=1)
                           if all(t.features.ndim == 3 for t in te_v) else None)
        fold.hvg_rule += " (among the genes of the backbone's vocabulary)"
        folds.append(fold)
        skipped.append([g for g in full if g not in vocab])
    return folds, skipped


def _mean(rows: list[dict]) -> dict:
    return {k: float(np.mean([r[k] for r in rows])) for k in KEYS}


def print_method(name: str, rows: list[dict], base: dict) -> None:
    print(f"\n== {name}")
    head = (f"{'fold':8s} {'PCC':>6s} {'top10':>6s} {'top50':>6s} {'MSE':>7s} {'MAE':>6s} "
            f"{'coexp':>6s} {'train s':>8s} {'sample s':>8s} {'/hest':>6s} {'/tuned':>6s}")
    print(head)
    print("-" * len(head))
    for r in rows + [dict(_mean(rows), test=["mean"])]:
        fold = ",".join(r["test"])
        ratios = []
        for b in ("hest_ridge", "tuned_ridge"):
            ref = base.get(b, {}).get(fold)
            ratios.append(f"{r['pcc_mean'] / ref:6.2f}" if ref else f"{'':>6s}")
        print(f"{fold:8s} {r['pcc_mean']:6.3f} {r['pcc_top10']:6.3f} {r['pcc_top50']:6.3f} "
              f"{r['mse']:7.3f} {r['mae']:6.3f} {r['coexpression']:6.3f} {r['fit_s']:8.1f} "
              f"{r['predict_s']:8.1f} {ratios[0]} {ratios[1]}")


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
                   help="HINGE sample s of a test spot uses its dihedral view s % 8")
    p.add_argument("--reveal-steps", type=int, default=None, help="sampler steps (default T)")
    p.add_argument("--sample-batch", type=int, default=512)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--out", type=Path, default=None, help="JSON output")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    unknown = set(methods) - set(ALL)
    if unknown:
        raise SystemExit(f"unknown methods {sorted(unknown)}; choose from {ALL}")
    torch.manual_seed(a.seed)
    encoder = get_encoder(a.encoder)
    t0 = time.perf_counter()
    augment = any(m in HINGE_METHODS for m in methods) and not a.no_augment
    from napari_hinge.scfm import load_backbone

    vocab = load_backbone("builtin").vocab
    folds, skipped = load_folds(encoder=encoder, n_genes=a.genes, data=a.data,
                                sections=a.sections.split(","), train=a.train, test=a.test,
                                augment=augment, vocab=vocab)
    if a.folds:
        keep = set(a.folds.split(","))
        skipped = [s for f, s in zip(folds, skipped, strict=True) if set(f.test) & keep]
        folds = [f for f in folds if set(f.test) & keep]
    t_feat = time.perf_counter() - t0

    results: dict[str, list[dict]] = {}
    base = [m for m in methods if m in BASELINES]
    if base:
        results.update(run_folds(folds, lambda: {m: model for m, model in
                                                  default_baselines(seed=a.seed).items()
                                                  if m in base}))
    for m in methods:
        if m not in HINGE_METHODS:
            continue
        for fold in folds:
            r = hinge_fold(fold, backbone=HINGE_METHODS[m], args=a)
            results.setdefault(m, []).append(r)
            print(f"  fold {','.join(fold.test)} {m:22s} pcc {r['pcc_mean']:.3f}  train "
                  f"{r['fit_s']:.0f}s  sample {r['predict_s']:.0f}s", file=sys.stderr, flush=True)

    per_fold = {b: {",".join(r["test"]): r["pcc_mean"] for r in results.get(b, [])}
                for b in ("hest_ridge", "tuned_ridge")}
    per_fold["hest_ridge"]["mean"] = (np.mean(list(per_fold["hest_ridge"].values()))
                                      if per_fold["hest_ridge"] else None)
    per_fold["tuned_ridge"]["mean"] = (np.mean(list(per_fold["tuned_ridge"].values()))
                                       if per_fold["tuned_ridge"] else None)
    print(f"\nher2st expression from H&E: {len(folds)} fold(s), {a.genes} genes, encoder "
          f"{encoder.name}, patches {HER2ST_PATCH_PX} px, seed {a.seed}")
    print(f"gene panel: {folds[0].hvg_rule}")
    for f, sk in zip(folds, skipped, strict=True):
        print(f"  fold {','.join(f.test)}: the rule over all genes would also pick "
              f"{', '.join(sk) or 'nothing else'} (not in the backbone's vocabulary)")
    print(f"HINGE: epochs {a.epochs}, batch {a.batch_size}, lr {a.lr}, ada_rank "
          f"{a.ada_rank or 'full'}, S {a.samples}, reveal steps {a.reveal_steps or 'T=50'}, "
          f"augment {augment}, test-time views {a.tta}, standardised features "
          f"{not a.raw_features}")
    for m in methods:
        if m in results:
            print_method(m, results[m], per_fold)
    summary = []
    print(f"\n{'method':24s} {'PCC':>6s} {'top10':>6s} {'coexp':>6s} {'train s':>8s} "
          f"{'sample s':>8s} {'/hest':>6s} {'/tuned':>6s}")
    for m in methods:
        if m not in results:
            continue
        row = {"method": m, **_mean(results[m])}
        for b in ("hest_ridge", "tuned_ridge"):
            ref = per_fold[b].get("mean")
            row[f"ratio_to_{b}"] = row["pcc_mean"] / ref if ref else None
        summary.append(row)
        rh, rt = row["ratio_to_hest_ridge"], row["ratio_to_tuned_ridge"]
        print(f"{m:24s} {row['pcc_mean']:6.3f} {row['pcc_top10']:6.3f} {row['coexpression']:6.3f}"
              f" {row['fit_s']:8.1f} {row['predict_s']:8.1f} "
              f"{'' if rh is None else f'{rh:6.2f}'} {'' if rt is None else f'{rt:6.2f}'}")
    out = {
        "benchmark": "hinge_her2st",
        "encoder": encoder.name,
        "n_genes": a.genes,
        "hvg_rule": folds[0].hvg_rule,
        "target": TARGET_RULE,
        "patch_px": HER2ST_PATCH_PX,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()},
        "seed": a.seed,
        "folds": [{"test": f.test, "train": f.train, "genes": f.genes,
                   "rule_genes_not_in_vocab": sk} for f, sk in zip(folds, skipped, strict=True)],
        "feature_seconds": t_feat,
        "summary": summary,
        "per_fold": results,
        "machine": {"python": platform.python_version(), "torch": torch.__version__,
                    "threads": torch.get_num_threads(), "cpu": platform.processor(),
                    "device": a.device or ("cuda" if torch.cuda.is_available() else "cpu"),
                    "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
    }
    path = a.out or REPO / "bench_out" / f"hinge_her2st_{a.genes}genes.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1, default=str))
    print(f"wrote {path}")
    return out


if __name__ == "__main__":
    main()
