"""Scanpy-style tools on AnnData: spatial domains (STMGAC), expression prediction, synthesis.

Each tool takes the AnnData first, keyword-only options, writes under ``key_added`` and
echoes its parameters into ``uns``. The ``*_iter`` variants are generators of
:class:`~napari_hinge.training.TrainEvent` for GUI workers and progress bars.
"""

from __future__ import annotations

from collections.abc import Callable, Generator

import numpy as np
import pandas as pd

from ._progress import ProgressEvent
from .training import StopToken, TrainEvent

# ----------------------------------------------------------------------------------------
# Spatial domains (STMGAC)
# ----------------------------------------------------------------------------------------

DOMAIN_LATENT_KEY = "X_stmgac"
DOMAIN_DENOISED_KEY = "stmgac_denoised"


def domains_iter(
    adata,
    *,
    n_domains: int,
    preset="auto",
    epochs: int | None = None,
    seed: int = 3407,
    refine: bool | None = None,
    method: str = "gmm",
    covariance_type: str = "tied",
    key_added: str = "domain",
    layer: str | None = None,
    denoised: bool = True,
    stop: StopToken | None = None,
    device=None,
    copy: bool = False,
) -> Generator[TrainEvent, None, object]:
    """:func:`domains` as a generator of training events (for GUI workers).

    Yields the trainer's 'step'/'epoch' events, then one 'done' event whose
    ``metrics['result']`` is the AnnData written to (``adata`` itself, or a copy when
    ``copy=True``). On a stop request it yields 'stopped' and writes nothing.
    """
    import torch

    from .device import default_device
    from .stmgac.cluster import cluster_latent
    from .stmgac.graph import gcn_normalize, knn_adjacency, to_torch
    from .stmgac.labels import _coords
    from .stmgac.preprocess import preprocess
    from .stmgac.presets import get_preset, resolve_preset
    from .stmgac.train import train_stmgac

    p = get_preset(resolve_preset(preset, adata))
    refine = p.refine if refine is None else bool(refine)
    n_domains = int(n_domains)
    if n_domains < 1:
        raise ValueError(f"n_domains must be >= 1, got {n_domains}")
    if n_domains > adata.n_obs:
        raise ValueError(
            f"n_domains = {n_domains} is larger than the number of spots ({adata.n_obs})"
        )
    if method not in ("gmm", "leiden"):
        raise ValueError(f"unknown clustering method {method!r}; use 'gmm' or 'leiden'")
    coords = _coords(adata, 1.0)
    adjacency = knn_adjacency(coords, p.k)
    pre = preprocess(adata, p, layer=layer)
    dev = default_device(device)

    trainer = train_stmgac(pre.x, adjacency, p, n_domains=n_domains, epochs=epochs, seed=seed,
                           stop=stop, device=dev)
    summary: dict = {}
    final_loss = None
    while True:
        try:
            ev = next(trainer)
        except StopIteration as fin:
            model = fin.value
            break
        if ev.kind == "stopped":
            yield ev
            return None
        if ev.kind == "done":  # ours comes after clustering
            summary = {k: v for k, v in ev.metrics.items() if k != "model"}
            final_loss = ev.loss
            continue
        yield ev

    xt = torch.from_numpy(pre.x).to(dev)
    adj = to_torch(gcn_normalize(adjacency), dev)
    latent = model.embed(xt, adj).float().cpu().numpy()
    labels, info = cluster_latent(latent, n_domains, method=method, coords=coords, refine=refine,
                                  refine_k=p.refine_k, covariance_type=covariance_type)

    target = adata.copy() if copy else adata
    cats = [str(i) for i in range(n_domains)]
    target.obs[key_added] = pd.Categorical([str(v) for v in labels], categories=cats)
    target.obsm[DOMAIN_LATENT_KEY] = latent
    if denoised:
        # Only the model's genes (spots x HVGs, a DataFrame named by gene): a spots x all-genes
        # layer would be NaN almost everywhere and make the h5ad ~10x larger.
        values = pre.to_expression(model.denoise(xt, adj).float().cpu().numpy())
        target.obsm[DOMAIN_DENOISED_KEY] = pd.DataFrame(
            values.astype(np.float32, copy=False), index=target.obs_names,
            columns=target.var_names[pre.hvg_index].astype(str))
        target.var[f"{DOMAIN_DENOISED_KEY}_gene"] = np.isin(
            np.arange(target.n_vars), pre.hvg_index
        )
    unit = f"counts per {pre.target_sum:g}"
    if pre.log1p:
        unit = f"log1p({unit})"
    target.uns[key_added] = {
        "method": "STMGAC",
        "params": {
            "n_domains": n_domains, "preset": p.name, "epochs": int(summary.get("epochs", 0)),
            "seed": int(seed), "refine": bool(refine), "clustering": method,
            "covariance_type": covariance_type, "layer": layer or "X",
        },
        "preset": p.to_dict(),
        "clustering": info,
        "training": {k: v for k, v in summary.items() if isinstance(v, (int, float))},
        "latent_key": DOMAIN_LATENT_KEY,
        "denoised_key": DOMAIN_DENOISED_KEY if denoised else "",
        "denoised_space": (
            f"obsm['{DOMAIN_DENOISED_KEY}']: {unit} of the {pre.genes.size} seurat_v3 HVGs "
            f"(its columns; var['{DOMAIN_DENOISED_KEY}_gene']), decoded from the model's "
            f"{pre.input} input and mapped back through the PCA loadings and the z-score"
        ),
    }
    counts = np.bincount(labels, minlength=n_domains)
    yield TrainEvent(
        "done", summary.get("epochs", 1), summary.get("epochs", 1), summary.get("epochs", 1),
        final_loss, metrics={**summary, "domain_sizes": counts.tolist(), "result": target},
    )
    return target


def domains(
    adata,
    *,
    n_domains: int,
    preset="auto",
    epochs: int | None = None,
    seed: int = 3407,
    refine: bool | None = None,
    method: str = "gmm",
    covariance_type: str = "tied",
    key_added: str = "domain",
    layer: str | None = None,
    denoised: bool = True,
    stop: StopToken | None = None,
    progress: bool | Callable[[TrainEvent], None] = True,
    device=None,
    copy: bool = False,
):
    """Spatial domains with STMGAC (Fang et al. 2024): train, embed, cluster, smooth.

    Parameters
    ----------
    adata
        Spots: raw counts in ``X`` (or ``layer``), coordinates in ``obsm['spatial']``.
    n_domains
        K, the number of domains.
    preset
        A name from :func:`napari_hinge.stmgac.presets.available_presets`, a ``Preset``, or
        'auto': 'legacy_st' on legacy-ST data, 'dlpfc' otherwise
        (:func:`~napari_hinge.stmgac.presets.preset_for`).
    epochs
        Training epochs (default: the preset's, 500 for 'dlpfc' and 'legacy_st').
    seed
        Seeds initialisation, masking, triplets and the mixture; recorded in ``uns``.
    refine
        30-NN spatial majority vote after clustering (default: the preset's).
    method
        'gmm' (Gaussian mixture, ``covariance_type`` 'tied' ≈ mclust EEE) or 'leiden'
        (resolution searched until K clusters).
    key_added
        ``obs[key_added]`` gets the domains (categorical '0'..'K-1'), ``uns[key_added]`` the
        parameters. The latent goes to ``obsm['X_stmgac']``, the denoised expression of the
        genes the model was trained on to ``obsm['stmgac_denoised']`` (a DataFrame, one column
        per gene; see ``uns[key_added]['denoised_space']``).
    layer
        Layer holding the raw counts (default ``X``).
    denoised
        Write ``obsm['stmgac_denoised']`` (spots x the model's genes, float32).
    stop
        A :class:`~napari_hinge.training.StopToken`; when requested, nothing is written and
        None is returned.
    progress
        True: a progress bar over the epochs on stderr (tqdm, with the loss); False: silent;
        a callable: called with every :class:`~napari_hinge.training.TrainEvent` instead.
    copy
        Work on and return a copy instead of writing into ``adata``.

    Returns
    -------
    The AnnData copy when ``copy=True``, else None.
    """
    from ._progress import EventBar

    result = None
    bar = EventBar("STMGAC", unit="epoch") if progress is True else None
    on_event = bar if bar is not None else (progress or None)
    try:
        for ev in domains_iter(
            adata, n_domains=n_domains, preset=preset, epochs=epochs, seed=seed, refine=refine,
            method=method, covariance_type=covariance_type, key_added=key_added, layer=layer,
            denoised=denoised, stop=stop, device=device, copy=copy,
        ):
            if on_event is not None and (bar is None or ev.kind == "epoch"):
                on_event(ev)
            if ev.kind == "done":
                result = ev.metrics["result"]
    finally:
        if bar is not None:
            bar.close()
    return result if copy else None


# ----------------------------------------------------------------------------------------
# Expression from histology (HINGE) and synthetic histology (C2L-ST)
# ----------------------------------------------------------------------------------------


def predict(adata, model="shipped", *, key_added: str = "hinge", progress: bool = True,
            **kwargs):
    """Predict a HINGE model's genes on every spot of ``adata`` from its H&E.

    ``model`` is a :class:`~napari_hinge.hinge.model.HingeModel`, a model folder or
    ``'shipped'``. Writes ``obsm[f'{key_added}_mean']``/``[f'{key_added}_std']`` and
    ``uns[key_added]`` and returns an AnnData over the model's genes (mean in ``X``,
    ``layers['std']`` (calibrated), ``layers['lower_80']``/``['upper_80']`` (and 95),
    ``layers['measured']``); ``progress`` shows a bar over the spots on stderr (tqdm); the
    keywords (``n_samples``, ``reveal_steps``, ``seed``, ...; defaults in
    :data:`napari_hinge.hinge.defaults.SAMPLER`) go to
    :func:`napari_hinge.hinge.pipeline.predict_spots`.
    """
    from ._progress import EventBar
    from .hinge.model import HingeModel
    from .hinge.pipeline import load_model, predict_spots

    if not isinstance(model, HingeModel):
        model = load_model(model)
    if not progress:
        return predict_spots(model, adata, key_added=key_added, **kwargs)
    with EventBar("HINGE", unit="spot") as bar:
        return predict_spots(model, adata, key_added=key_added,
                             progress=lambda done, total: bar(
                                 ProgressEvent("step", None, done, total)),
                             **kwargs)


def synthesize(adata, local, *, slide=None, region=None, key_added: str = "c2l",
               progress: bool = True, **kwargs):
    """Generate H&E tiles conditioned on expression over a region of ``adata``'s slide.

    ``local`` is an adapted :class:`~napari_hinge.c2l.local.LocalModel` or its folder;
    ``slide`` defaults to the slide ``adata`` points to; ``region`` is an ``(V, 2)`` (x, y)
    level-0 polygon, or ``None`` for tissue far from the measured spots. Records the run's
    parameters in ``uns[key_added]`` and returns the
    :class:`~napari_hinge.c2l.fill.FillResult` (mosaic, per-tile patches and conditioning
    expression); ``progress`` shows a bar over the sampling steps on stderr (tqdm); the remaining
    keywords go to :func:`napari_hinge.c2l.fill.fill_region_iter`.
    """
    from ._convention import META_KEY
    from ._progress import EventBar
    from .c2l.fill import fill_region_iter
    from .c2l.local import LocalModel
    from .io.slides import open_slide
    from .training import run_to_end

    if not isinstance(local, LocalModel):
        local = LocalModel.load(local)
    if slide is None:
        meta = adata.uns.get(META_KEY, {})
        if not meta.get("slide_path"):
            raise ValueError("the AnnData names no slide (uns['napari_hinge']['slide_path']); "
                             "pass slide=")
        slide = open_slide(meta["slide_path"], mpp=meta.get("microns_per_pixel"))
    with EventBar("C2L-ST fill", unit="step") as bar:
        result, _ = run_to_end(fill_region_iter(local, slide, adata, region=region, **kwargs),
                               bar if progress else None)
    adata.uns[key_added] = dict(result.params)
    return result


def train_with_pairs(datasets, *, pairs, pairs_weight: float = 1.0, out=None,
                     progress: bool = True, **kwargs):
    """Train HINGE on measured spots plus synthetic C2L pairs; returns the HingeModel.

    ``datasets``: AnnData objects or paths (one or a list); ``pairs``: a
    :class:`~napari_hinge.c2l.fill.FillResult`, :class:`~napari_hinge.c2l.pairs.SyntheticPairs`
    or ``pairs.npz`` path (one or a list). Each synthetic pair weighs ``pairs_weight`` in the
    loss and in the ridge prior and is marked as synthetic in the model's ``training_data``
    (saved with it). ``out``: also save the model there. Other keywords go to
    :func:`napari_hinge.hinge.pipeline.fit_hinge` (``epochs``, ``genes``, ``seed``, ...).
    """
    from ._progress import EventBar
    from .c2l.fill import FillResult
    from .c2l.pairs import pairs_from_fill
    from .hinge.pipeline import fit_hinge, save_model
    from .training import run_to_end

    datasets = list(datasets) if isinstance(datasets, (list, tuple)) else [datasets]
    pairs = list(pairs) if isinstance(pairs, (list, tuple)) else [pairs]
    pairs = [pairs_from_fill(p) if isinstance(p, FillResult) else p for p in pairs]
    gen = fit_hinge(datasets, extra_pairs=pairs, extra_weight=pairs_weight, **kwargs)
    with EventBar("HINGE + C2L pairs", unit="step") as bar:
        model, _ = run_to_end(gen, bar if progress else None)
    if out is not None:
        save_model(model, out)
    return model
