"""Scanpy-style tools on AnnData: spatial domains (STMGAC), expression prediction, synthesis.

One contract for every tool, as in scanpy: the AnnData first, then keyword-only options;
every key it writes is named from ``key_added`` (``obs[key_added]``, ``obsm[f'{key_added}_...']``,
``uns[key_added]``); ``copy=False`` writes into the AnnData and returns None, ``copy=True``
leaves it alone and returns an annotated copy; ``uns[key_added]['params']`` echoes the options.
The ``*_iter`` variants are generators of :class:`~napari_hinge.training.TrainEvent` for GUI
workers and progress bars.
"""

from __future__ import annotations

from collections.abc import Callable, Generator

import numpy as np
import pandas as pd

from ._progress import ProgressEvent
from .defaults import SAMPLER, STMGAC
from .training import StopToken, TrainEvent

# ----------------------------------------------------------------------------------------
# Spatial domains (STMGAC)
# ----------------------------------------------------------------------------------------


def domains_iter(
    adata,
    *,
    n_domains: int,
    preset=STMGAC["preset"],
    epochs: int | None = None,
    seed: int = STMGAC["seed"],
    refine: bool | None = None,
    method: str = STMGAC["method"],
    covariance_type: str = STMGAC["covariance_type"],
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
    latent_key, denoised_key = f"{key_added}_latent", f"{key_added}_denoised"
    target.obs[key_added] = pd.Categorical([str(v) for v in labels], categories=cats)
    target.obsm[latent_key] = latent
    if denoised:
        # Only the model's genes (spots x HVGs, a DataFrame named by gene): a spots x all-genes
        # layer would be NaN almost everywhere and make the h5ad ~10x larger.
        values = pre.to_expression(model.denoise(xt, adj).float().cpu().numpy())
        target.obsm[denoised_key] = pd.DataFrame(
            values.astype(np.float32, copy=False), index=target.obs_names,
            columns=target.var_names[pre.hvg_index].astype(str))
        target.var[f"{denoised_key}_gene"] = np.isin(np.arange(target.n_vars), pre.hvg_index)
    unit = f"counts per {pre.target_sum:g}"
    if pre.log1p:
        unit = f"log1p({unit})"
    target.uns[key_added] = {
        "method": "STMGAC",
        "params": {
            "n_domains": n_domains, "preset": p.name, "epochs": int(summary.get("epochs", 0)),
            "seed": int(seed), "refine": bool(refine), "clustering": method,
            "covariance_type": covariance_type, "layer": layer or "X", "denoised": bool(denoised),
        },
        "preset": p.to_dict(),
        "clustering": info,
        "training": {k: v for k, v in summary.items() if isinstance(v, (int, float))},
        "latent_key": latent_key,
        "denoised_key": denoised_key if denoised else "",
        "denoised_space": (
            f"obsm['{denoised_key}']: {unit} of the {pre.genes.size} seurat_v3 HVGs "
            f"(its columns; var['{denoised_key}_gene']), decoded from the model's "
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
    preset=STMGAC["preset"],
    epochs: int | None = None,
    seed: int = STMGAC["seed"],
    refine: bool | None = None,
    method: str = STMGAC["method"],
    covariance_type: str = STMGAC["covariance_type"],
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
        parameters. The 16-d latent goes to ``obsm[f'{key_added}_latent']``, the denoised
        expression of the genes the model was trained on to ``obsm[f'{key_added}_denoised']``
        (a DataFrame, one column per gene; ``var[f'{key_added}_denoised_gene']`` marks them;
        see ``uns[key_added]['denoised_space']``).
    layer
        Layer holding the raw counts (default ``X``).
    denoised
        Write ``obsm[f'{key_added}_denoised']`` (spots x the model's genes, float32).
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


def predict(
    adata,
    *,
    model="shipped",
    key_added: str = "hinge",
    n_samples: int = SAMPLER["n_samples"],
    reveal_steps: int | None = SAMPLER["reveal_steps"],
    seed: int = 0,
    augment: bool = False,
    features=None,
    batch_size: int = 256,
    device=None,
    progress: bool = True,
    copy: bool = False,
):
    """Predict a HINGE model's genes on every spot of ``adata`` from its H&E.

    Parameters
    ----------
    adata
        Spots on a slide (the AnnData convention of :mod:`napari_hinge.io`).
    model
        A :class:`~napari_hinge.hinge.model.HingeModel`, a model folder or ``'shipped'``.
    key_added
        Writes, for the G genes of ``uns[key_added]['genes']`` (the model's, in its value
        transform): ``obsm[f'{key_added}_mean']`` and ``[f'{key_added}_std']`` (N, G) (the
        calibrated standard deviation when the model ships a calibration, with
        ``[f'{key_added}_lower_80']`` / ``_upper_80`` / ``_lower_95`` / ``_upper_95``:
        central intervals that cover on held-out spots) and ``uns[key_added]`` (genes,
        parameters, the keys written).
    n_samples, reveal_steps, seed
        Sampler settings (defaults: :data:`napari_hinge.hinge.defaults.SAMPLER`).
    augment
        Sample over the 8 dihedral views of each spot's patch.
    features
        Precomputed ``(N, F)`` image features (default: encoded with the model's encoder,
        cached on disk).
    progress
        A progress bar over the spots on stderr (tqdm); False: silent.
    copy
        Work on and return a copy instead of writing into ``adata``.

    Returns
    -------
    The annotated copy when ``copy=True``, else None. The per-gene AnnData of
    :func:`napari_hinge.hinge.pipeline.predict_spots` (with the measured values beside the
    prediction) is what the command line and the widgets use.
    """
    from ._progress import EventBar
    from .hinge.model import HingeModel
    from .hinge.pipeline import load_model, predict_spots

    source = model if isinstance(model, str) else (
        "HingeModel" if isinstance(model, HingeModel) else str(model))
    if not isinstance(model, HingeModel):
        model = load_model(model)
    target = adata.copy() if copy else adata
    options = {"n_samples": n_samples, "reveal_steps": reveal_steps, "seed": seed,
               "augment": augment, "features": features, "batch_size": batch_size,
               "device": device, "key_added": key_added}
    if progress:
        with EventBar("HINGE", unit="spot") as bar:
            pred = predict_spots(model, target, **options, progress=lambda done, total: bar(
                ProgressEvent("step", None, done, total)))
    else:
        pred = predict_spots(model, target, **options)
    written = [f"{key_added}_mean", f"{key_added}_std"]
    for name, values in pred.layers.items():
        if name.startswith(("lower_", "upper_")):
            target.obsm[f"{key_added}_{name}"] = np.asarray(values)
            written.append(f"{key_added}_{name}")
    params = dict(target.uns[key_added])
    target.uns[key_added] = {
        "method": "HINGE", "genes": params.pop("genes"),
        "params": {"model": source, **params, "batch_size": int(batch_size),
                   "features": "given" if features is not None else "encoded"},
        "obsm_keys": written,
    }
    return target if copy else None


def synthesize(
    adata,
    *,
    model,
    slide=None,
    region=None,
    key_added: str = "c2l",
    progress: bool = True,
    copy: bool = False,
    **options,
):
    """Generate H&E tiles conditioned on expression over a region of ``adata``'s slide.

    The tiles' expression comes from the measured spots around them (``source='neighbours'``)
    or from HINGE (``source='hinge'``); the slide itself is never modified.

    Parameters
    ----------
    adata
        The measured spots, conditioning the tiles (the AnnData convention of
        :mod:`napari_hinge.io`).
    model
        An adapted :class:`~napari_hinge.c2l.local.LocalModel` or its folder.
    slide
        The slide (default: the one ``adata`` points to, ``uns['napari_hinge']['slide_path']``).
    region
        An ``(V, 2)`` (x, y) level-0 polygon, or None for tissue far from the measured spots.
    key_added
        ``uns[key_added]`` gets ``params`` (the run's settings), ``mosaic`` (RGBA tiles, alpha
        0 outside) with its ``placement`` over the slide (napari ``scale`` / ``translate``),
        ``patches`` (n, S, S, 3), ``expression`` (n, G, the conditioning of each tile),
        ``genes`` and ``tiles`` (a table of tile positions and expression).
    progress
        A progress bar over the sampling steps on stderr (tqdm); False: silent.
    copy
        Work on and return a copy instead of writing into ``adata``.
    options
        Keyword-only settings of :func:`napari_hinge.c2l.fill.fill_region_iter` (``steps``,
        ``guidance``, ``strength``, ``source``, ``seed``, ...).

    Returns
    -------
    The annotated copy when ``copy=True``, else None. The
    :class:`~napari_hinge.c2l.fill.FillResult` itself comes from
    :func:`napari_hinge.c2l.fill.fill_region`.
    """
    from ._convention import META_KEY
    from ._progress import EventBar
    from .c2l.fill import fill_region_iter
    from .c2l.local import LocalModel
    from .io.slides import open_slide
    from .training import run_to_end

    source = model if isinstance(model, str) else (
        "LocalModel" if isinstance(model, LocalModel) else str(model))
    if not isinstance(model, LocalModel):
        model = LocalModel.load(model)
    if slide is None:
        meta = adata.uns.get(META_KEY, {})
        if not meta.get("slide_path"):
            raise ValueError("the AnnData names no slide (uns['napari_hinge']['slide_path']); "
                             "pass slide=")
        slide = open_slide(meta["slide_path"], mpp=meta.get("microns_per_pixel"))
    with EventBar("C2L-ST fill", unit="step") as bar:
        result, _ = run_to_end(fill_region_iter(model, slide, adata, region=region, **options),
                               bar if progress else None)
    target = adata.copy() if copy else adata
    target.uns[key_added] = {
        "method": "C2L-ST",
        "params": {"model": source, **dict(result.params)},
        "mosaic": result.mosaic,
        "placement": {k: [float(v) for v in vals] for k, vals in result.placement().items()},
        "patches": result.patches, "expression": result.expression,
        "genes": list(result.genes), "tiles": result.table(),
    }
    return target if copy else None


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
