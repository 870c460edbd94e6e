"""Expression-from-H&E baselines on her2st patient C, leave-one-section-out (design.md section 6).

    python benchmarks/baselines_her2st.py                      # LOSO C2-C6, 50 genes
    python benchmarks/baselines_her2st.py --genes 250
    python benchmarks/baselines_her2st.py --train DIR:C2,C3,C4,C5 --test DIR:C6
    python benchmarks/baselines_her2st.py --augment            # also cache the 8 dihedral views

Prints a table (mean over folds) with the ratio of each method's mean PCC to HestRidge and
writes JSON (per fold and per gene). The harness functions (``load_folds``, ``run_folds``,
``summarise``, ``print_table``) are importable so that other benchmarks (HINGE) can add
their own models to the same folds and table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

from napari_hinge.baselines import default_baselines
from napari_hinge.encoders import get_encoder
from napari_hinge.expression import (
    HER2ST_PATCH_PX,
    HER2ST_PATIENT_C,
    TARGET_RULE,
    load_her2st_sections,
    make_fold,
)
from napari_hinge.metrics import expression_scores

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = (
    Path(os.environ.get("NAPARI_HINGE_SHARED", REPO.parent / "shared")) / "data" / "her2st_subset"
)
REFERENCE_PCC = {  # design.md section 6 (independent implementation, same protocol, 50 genes)
    "hest_ridge": 0.29,
    "tuned_ridge": 0.38,
    "knn10": 0.34,
    "shuffled_tuned_ridge": 0.01,
}
BASELINE = "hest_ridge"


def _parse_spec(spec: str) -> tuple[Path, list[str]]:
    path, _, secs = spec.rpartition(":")
    if not path or not secs:
        raise ValueError(f"expected PATH:SECTION[,SECTION...], got {spec!r}")
    return Path(path), [s.strip() for s in secs.split(",") if s.strip()]


def _progress(section, done, total):
    if done == total or done % 64 == 0:
        print(f"  features {section}: {done}/{total}", file=sys.stderr, flush=True)


def load_folds(
    *,
    encoder,
    n_genes: int = 50,
    data: Path = DEFAULT_DATA,
    sections=HER2ST_PATIENT_C,
    train: str | None = None,
    test: str | None = None,
    augment: bool = False,
    batch_size: int = 8,
):
    """LOSO folds over ``sections`` of ``data``, or one fold from ``PATH:SECTIONS`` specs."""
    kw = {"encoder": encoder, "side_px": HER2ST_PATCH_PX, "augment": augment,
          "batch_size": batch_size, "progress": _progress}
    if (train is None) != (test is None):
        raise ValueError("--train and --test go together")
    if train is not None:
        tr_path, tr_secs = _parse_spec(train)
        te_path, te_secs = _parse_spec(test)
        if tr_path.resolve() == te_path.resolve() and set(tr_secs) & set(te_secs):
            raise ValueError(f"sections {sorted(set(tr_secs) & set(te_secs))} in train and test")
        tr = load_her2st_sections(tr_path, tr_secs, **kw)
        te = load_her2st_sections(te_path, te_secs, **kw)
        return [make_fold(tr, te, n_genes=n_genes)]
    secs = load_her2st_sections(data, list(sections), **kw)
    return [
        make_fold([s for s in secs if s is not t], [t], n_genes=n_genes) for t in secs
    ]


def run_folds(
    folds,
    models: Callable[[], Mapping[str, object]] = default_baselines,
) -> dict:
    """Fit and score every model on every fold. ``models()`` returns fresh name -> model."""
    results: dict[str, list[dict]] = {}
    for fold in folds:
        for name, model in models().items():
            t0 = time.perf_counter()
            model.fit(fold.X_train, fold.Y_train, fold.groups_train)
            t1 = time.perf_counter()
            pred = model.predict(fold.X_test)
            t2 = time.perf_counter()
            scores = expression_scores(pred, fold.Y_test, genes=fold.genes)
            scores.update(
                test=fold.test, train=fold.train, fit_s=t1 - t0, predict_s=t2 - t1,
                n_train=len(fold.X_train), n_test=len(fold.X_test),
            )
            inner = getattr(model, "alpha_", None) or getattr(
                getattr(model, "model", None), "alpha_", None
            )
            if inner is not None:
                scores["alpha"] = float(inner)
            results.setdefault(name, []).append(scores)
            print(
                f"  fold {','.join(fold.test)} {name:22s} pcc {scores['pcc_mean']:.3f}"
                f"  fit {scores['fit_s']:.2f}s",
                file=sys.stderr, flush=True,
            )
    return results


def summarise(results: dict, baseline: str = BASELINE) -> list[dict]:
    """Mean over folds per method, with the ratio of mean PCC to the baseline's."""
    keys = ("pcc_mean", "pcc_top10", "pcc_top50", "mse", "mae", "coexpression",
            "fit_s", "predict_s")
    rows = []
    base = np.mean([r["pcc_mean"] for r in results[baseline]]) if baseline in results else None
    for name, folds in results.items():
        row = {"method": name}
        for k in keys:
            row[k] = float(np.mean([f[k] for f in folds]))
        row["pcc_mean_per_fold"] = {",".join(f["test"]): f["pcc_mean"] for f in folds}
        row["ratio_to_" + baseline] = (
            row["pcc_mean"] / base if base not in (None, 0) else float("nan")
        )
        rows.append(row)
    return rows


def print_table(rows: list[dict], baseline: str = BASELINE, reference=REFERENCE_PCC) -> None:
    head = (f"{'method':24s} {'PCC':>6s} {'top10':>6s} {'MSE':>7s} {'MAE':>6s} {'coexp':>6s} "
            f"{'fit s':>7s} {'pred s':>7s} {'x' + baseline:>12s} {'ref':>5s}")
    print(head)
    print("-" * len(head))
    for r in rows:
        ref = reference.get(r["method"])
        print(
            f"{r['method']:24s} {r['pcc_mean']:6.3f} {r['pcc_top10']:6.3f} {r['mse']:7.3f} "
            f"{r['mae']:6.3f} {r['coexpression']:6.3f} {r['fit_s']:7.2f} {r['predict_s']:7.3f} "
            f"{r['ratio_to_' + baseline]:12.2f} {'' if ref is None else f'{ref:5.2f}'}"
        )


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="her2st folder")
    p.add_argument("--sections", default=",".join(HER2ST_PATIENT_C))
    p.add_argument("--train", help="PATH:SECTIONS (with --test) instead of LOSO")
    p.add_argument("--test", help="PATH:SECTIONS")
    p.add_argument("--genes", type=int, default=50)
    p.add_argument("--encoder", default="efficientnet-lite0")
    p.add_argument("--weights", help="encoder weights file (uni/conch)")
    p.add_argument("--augment", action="store_true", help="also encode/cache 8 dihedral views")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="JSON output")
    a = p.parse_args(argv)

    import torch

    torch.manual_seed(a.seed)
    encoder = get_encoder(a.encoder, weights=a.weights)
    t0 = time.perf_counter()
    folds = load_folds(
        encoder=encoder, n_genes=a.genes, data=a.data, sections=a.sections.split(","),
        train=a.train, test=a.test, augment=a.augment, batch_size=a.batch_size,
    )
    t_feat = time.perf_counter() - t0
    results = run_folds(folds, lambda: default_baselines(seed=a.seed))
    rows = summarise(results)
    print(f"\nher2st expression baselines, {len(folds)} fold(s), {a.genes} genes, "
          f"encoder {encoder.name}, patches {HER2ST_PATCH_PX} px")
    print(f"gene panel: {folds[0].hvg_rule}")
    print_table(rows, reference=REFERENCE_PCC if a.genes == 50 else {})
    out = {
        "benchmark": "baselines_her2st",
        "encoder": encoder.name,
        "encoder_weights_digest": encoder.weights_digest,
        "n_genes": a.genes,
        "hvg_rule": folds[0].hvg_rule,
        "target": TARGET_RULE,
        "patch_px": HER2ST_PATCH_PX,
        "min_umi": 100,
        "folds": [{"test": f.test, "train": f.train, "genes": f.genes} for f in folds],
        "feature_seconds": t_feat,
        "seed": a.seed,
        "summary": rows,
        "per_fold": results,
        "reference_pcc_design_md": REFERENCE_PCC if a.genes == 50 else {},
        "machine": {"python": platform.python_version(), "torch": torch.__version__,
                    "threads": torch.get_num_threads(), "cpu": platform.processor()},
    }
    path = a.out or REPO / "bench_out" / f"baselines_her2st_{a.genes}genes.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1))
    print(f"wrote {path}")
    return out


if __name__ == "__main__":
    main()
