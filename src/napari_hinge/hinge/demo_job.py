"""HINGE's main job on the shipped sample, headless: predict, write an .h5ad and a picture.

``run_hinge_demo(out_dir)`` predicts the shipped her2st section C3 (held out from the shipped
weights, which were trained on C2, C4, C5 and C6) and writes

- ``hinge_C3.h5ad``: predicted mean (``X``), ``layers['std']`` and ``layers['measured']``
  (log1p CP10k), ``obsm['spatial']`` and ``uns['spatial']`` kept so scanpy's spatial plots work;
- ``hinge_C3.png``: the H&E thumbnail, then measured vs predicted for 3 genes;
- ``hinge_C3_summary.json``: the scores on the measured spots.

:func:`plot_prediction` draws the same picture for any prediction (the CLI uses it).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np


def _thumbnail(pred, max_size: int = 900):
    """(RGB thumbnail, scale from slide pixels to thumbnail pixels) or (None, 1)."""
    slide = pred.uns.get("napari_hinge", {}).get("slide_path")
    if not slide or not Path(slide).is_file():
        return None, 1.0
    from napari_hinge.io.slides import open_slide

    s = open_slide(slide)
    try:
        thumb = s.thumbnail(max_size)
        scale = thumb.shape[1] / s.shape[1]
    finally:
        s.close()
    return thumb, scale


def pick_genes(pred, n: int = 3) -> list[str]:
    """The ``n`` genes to show: best predicted (Pearson r) where measured, else most variable."""
    from napari_hinge.metrics import gene_pearson

    measured = pred.var["measured"].to_numpy(bool) if "measured" in pred.var else None
    X = np.asarray(pred.X)
    if measured is not None and measured.sum() >= 1 and "measured" in pred.layers:
        r = gene_pearson(X, np.asarray(pred.layers["measured"]))
        r = np.where(measured, r, -np.inf)
        order = np.argsort(-r)
    else:
        order = np.argsort(-X.var(0))
    return [str(pred.var_names[i]) for i in order[:n]]


def plot_prediction(pred, path, *, genes: list[str] | None = None, n_genes: int = 3,
                    title: str | None = None) -> Path:
    """Save a PNG: H&E thumbnail + one row per gene (measured | predicted | uncertainty).

    ``pred`` is the AnnData returned by :func:`napari_hinge.hinge.pipeline.predict_spots`.
    Measured panels are drawn only for genes the data has.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from napari_hinge.metrics import gene_pearson

    genes = genes or pick_genes(pred, n_genes)
    unknown = [g for g in genes if g not in pred.var_names]
    if unknown:
        raise KeyError(f"genes not predicted by the model: {', '.join(unknown)}")
    thumb, scale = _thumbnail(pred)
    xy = np.asarray(pred.obsm["spatial"], dtype=float) * scale
    has_measured = "measured" in pred.layers
    ncol = 3
    fig, axes = plt.subplots(len(genes) + 1, ncol, figsize=(3.4 * ncol, 3.2 * (len(genes) + 1)),
                             squeeze=False)
    for ax in axes.ravel():
        ax.set_axis_off()
    if thumb is not None:
        axes[0, 0].imshow(thumb)
        axes[0, 0].set_title("H&E")
    axes[0, 1].text(0, 0.5, title or "HINGE: measured vs predicted\n(log1p CP10k)",
                    fontsize=11, va="center")
    for row, g in enumerate(genes, start=1):
        j = list(pred.var_names).index(g)
        p = np.asarray(pred.X)[:, j]
        panels = []
        if has_measured and bool(pred.var["measured"].iloc[j]):
            m = np.asarray(pred.layers["measured"])[:, j]
            r = float(gene_pearson(p[:, None], m[:, None])[0])
            panels.append((m, f"{g} measured"))
            panels.append((p, f"{g} predicted (r = {r:.2f})"))
        else:
            panels.append((p, f"{g} predicted"))
        panels.append((np.asarray(pred.layers["std"])[:, j], f"{g} uncertainty (std)"))
        lo = min(float(v.min()) for v, _ in panels[:-1])
        hi = max(float(v.max()) for v, _ in panels[:-1])
        for col, (values, label) in enumerate(panels):
            ax = axes[row, col]
            if thumb is not None:
                ax.imshow(thumb, alpha=0.35)
            is_std = label.endswith("(std)")
            sc = ax.scatter(xy[:, 0], xy[:, 1], c=values, s=14,
                            cmap="magma" if is_std else "viridis",
                            vmin=None if is_std else lo, vmax=None if is_std else hi)
            if thumb is None:
                ax.invert_yaxis()
                ax.set_aspect("equal")
            ax.set_title(label, fontsize=9)
            fig.colorbar(sc, ax=ax, fraction=0.046, pad=0.02)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def run_hinge_demo(out_dir, *, n_samples: int | None = None, reveal_steps: int | None = None,
                   seed: int = 0, model=None) -> dict:
    """Predict the shipped sample with the shipped weights; write h5ad, PNG and summary.

    Parameters
    ----------
    out_dir
        Output folder (created).
    n_samples, reveal_steps, seed
        Sampler settings (S samples per spot, reverse steps, seed); ``None`` takes
        :data:`~napari_hinge.hinge.pipeline.SAMPLER` (10 reveal steps: 5x faster than T = 50
        and as accurate, ``weights/hinge/TRAINING.md``).
    model
        A model or model folder instead of the shipped weights.

    Returns
    -------
    dict
        Paths written, spot/gene counts, mean/top-10 Pearson r over the measured spots, timings.
    """
    from napari_hinge.datasets import load_her2st_sample

    from .defaults import SAMPLER
    from .pipeline import evaluate, load_model, predict_spots

    n_samples = SAMPLER["n_samples"] if n_samples is None else n_samples
    reveal_steps = SAMPLER["reveal_steps"] if reveal_steps is None else reveal_steps

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if model is None or isinstance(model, (str, Path)):
        model = load_model(model or "shipped")
    adata = load_her2st_sample()
    t1 = time.perf_counter()
    pred = predict_spots(model, adata, n_samples=n_samples, reveal_steps=reveal_steps, seed=seed)
    t2 = time.perf_counter()
    scores = evaluate(pred, adata)
    h5ad = out / "hinge_C3.h5ad"
    pred.write_h5ad(h5ad)
    genes = pick_genes(pred, 3)
    png = plot_prediction(pred, out / "hinge_C3.png", genes=genes,
                          title=f"HINGE on her2st C3 (held out)\nmean r = "
                                f"{scores['pcc_mean']:.2f} over {scores['genes_scored']} genes")
    summary = {
        "sample": "her2st C3 (shipped, held out from training)",
        "model": str(getattr(model, "source", "shipped")),
        "h5ad": str(h5ad),
        "png": str(png),
        "spots": int(pred.n_obs),
        "genes": int(pred.n_vars),
        "genes_scored": scores["genes_scored"],
        "genes_missing_in_data": scores["genes_missing_in_data"],
        "pcc_mean": scores["pcc_mean"],
        "pcc_top10": scores["pcc_top10"],
        "coexpression": scores["coexpression"],
        "genes_shown": genes,
        "n_samples": n_samples,
        "reveal_steps": reveal_steps,
        "seed": seed,
        "seconds_load": round(t1 - t0, 2),
        "seconds_predict": round(t2 - t1, 2),
    }
    (out / "hinge_C3_summary.json").write_text(json.dumps(summary, indent=2))
    return summary
