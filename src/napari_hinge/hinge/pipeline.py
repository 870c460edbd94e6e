"""HINGE end to end: spatial data -> features + targets -> trained model -> predictions.

The glue a user calls (and the command line, the widgets and the benchmark build on):

- :func:`prepare_dataset` reads a section (AnnData or any path ``read_spatial`` reads), cuts
  spot-centred patches of side ``max(spot diameter, 112 um)`` from its slide, encodes them once
  (features cached on disk) and computes the targets with the model's value transform.
- :func:`fit_hinge` picks the gene panel (design.md section 6 rule, restricted to genes the
  backbone knows; the others are reported by name), builds a :class:`HingeModel` and trains it;
  it is a generator of :class:`~napari_hinge.training.TrainEvent` whose return value is the model.
- :func:`predict_spots` samples S expression vectors per spot; mean = prediction, std =
  uncertainty, written scanpy-style under ``key_added``.
- :func:`evaluate` scores predictions against the measured spots with
  :mod:`napari_hinge.metrics`.

Image features are standardised with the training mean/std before they reach the network (the
raw EfficientNet features span two orders of magnitude per channel); the statistics are buffers
of the model (:meth:`HingeModel.set_feature_norm`), applied inside it and saved with its weights.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from napari_hinge._convention import META_KEY, SPATIAL_KEY
from napari_hinge.features import center_per_group, context_features
from napari_hinge.geometry import MIN_UMI

# One home for the transforms and the panel rule (napari_hinge.pp); the names used here stay
# importable from this module (transform_values, select_panel).
from napari_hinge.pp import VALUE_TRANSFORMS, library_size
from napari_hinge.pp import expression_values as transform_values
from napari_hinge.pp import gene_panel as select_panel
from napari_hinge.training import StopToken, TrainEvent

from .defaults import RECIPE, SAMPLER, TRAIN
from .model import HingeConfig, HingeModel

DEFAULT_ENCODER = "efficientnet-lite0"
DEFAULT_BACKBONE = "builtin"
SHIPPED_MODEL = "shipped"


# ---------------------------------------------------------------------------------------------
# data


def read_dataset(adata_or_path, *, section: str | None = None):
    """An AnnData from an AnnData or a path :func:`napari_hinge.io.spatial.read_spatial` reads.

    ``"folder:SECTION"`` is accepted for her2st-layout folders (same as ``section=``).
    """
    if hasattr(adata_or_path, "obsm") and hasattr(adata_or_path, "var_names"):
        return adata_or_path
    from napari_hinge.io.spatial import read_spatial

    path = str(adata_or_path)
    if section is None and not Path(path).exists() and ":" in path:
        path, section = path.rsplit(":", 1)
    kwargs = {"section": section} if section else {}
    return read_spatial(Path(path), **kwargs)


def _name(adata) -> str:
    meta = adata.uns.get(META_KEY, {})
    return str(meta.get("section") or meta.get("source") or "the dataset")


def _check_spatial(adata) -> dict:
    meta = adata.uns.get(META_KEY)
    if not isinstance(meta, dict):
        raise ValueError(f"{_name(adata)}: adata.uns['{META_KEY}'] is missing (read it with "
                         "napari_hinge.io.spatial.read_spatial)")
    if SPATIAL_KEY not in adata.obsm:
        raise ValueError(f"{_name(adata)}: adata.obsm['{SPATIAL_KEY}'] (spot x, y) is missing")
    slide = meta.get("slide_path")
    if not slide:
        raise FileNotFoundError(f"{_name(adata)}: no H&E image (uns['{META_KEY}']['slide_path'] "
                                "is not set); HINGE needs the slide the spots sit on")
    if not Path(slide).is_file():
        raise FileNotFoundError(f"{_name(adata)}: slide not found: {slide}")
    return meta


def resolve_encoder(encoder, weights=None):
    """An :class:`~napari_hinge.encoders.Encoder` from a name (or the encoder itself)."""
    if isinstance(encoder, torch.nn.Module):
        return encoder
    from napari_hinge.encoders import get_encoder

    return get_encoder(str(encoder), weights=weights)


def spot_features(adata, *, encoder=DEFAULT_ENCODER, encoder_weights=None, augment: bool = False,
                  side_px: int | None = None, batch_size: int = 8, cache: bool = True,
                  progress: Callable[[int, int], None] | None = None) -> np.ndarray:
    """Encoder features of every spot of ``adata`` (cached on disk); ``(N, F)``, or
    ``(8, N, F)`` with the dihedral views when ``augment``."""
    from napari_hinge.features import encode_spots
    from napari_hinge.patches import patch_side_px

    meta = _check_spatial(adata)
    enc = resolve_encoder(encoder, encoder_weights)
    side = int(side_px) if side_px else patch_side_px(adata)
    return encode_spots(meta["slide_path"], np.asarray(adata.obsm[SPATIAL_KEY], dtype=float),
                        encoder=enc, side_px=side, augment=augment, cache=cache,
                        batch_size=batch_size, progress=progress)


def prepare_dataset(adata_or_path, *, encoder=DEFAULT_ENCODER, genes: Sequence[str] | None = None,
                    augment: bool = False, section: str | None = None,
                    encoder_weights=None, value_transform: str = "log1p_cp10k",
                    min_umi: int = MIN_UMI, side_px: int | None = None, batch_size: int = 8,
                    cache: bool = True, progress: Callable[[int, int], None] | None = None,
                    ) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Features, targets and gene names of one section, ready for :func:`fit_hinge`.

    Parameters
    ----------
    adata_or_path
        AnnData (convention of ``napari_hinge._convention``) or a path
        :func:`~napari_hinge.io.spatial.read_spatial` reads (Space Ranger ``outs/``, .h5ad, a
        her2st folder with ``section=`` or ``"folder:SECTION"``).
    encoder, encoder_weights
        Patch encoder name (registry) or object; weights file for user-supplied encoders.
    genes
        Target genes (default: every gene of the table). A gene the table lacks raises KeyError.
    augment
        Also encode the 8 dihedral views (features become ``(8, N, F)``).
    value_transform
        ``'log1p_cp10k'`` (default; the builtin backbone's) or ``'log2p1'``.
    min_umi
        Spots with fewer UMI (over all genes) are dropped (design.md: 100).
    side_px
        Patch side in slide pixels (default ``max(spot diameter, 112 um)``).

    Returns
    -------
    features
        float32 ``(N, F)`` or ``(8, N, F)``.
    targets
        float32 ``(N, G)``.
    genes
        The G gene names of the target columns.
    """
    adata = read_dataset(adata_or_path, section=section)
    _check_spatial(adata)
    feats = spot_features(adata, encoder=encoder, encoder_weights=encoder_weights,
                          augment=augment, side_px=side_px, batch_size=batch_size, cache=cache,
                          progress=progress)
    targets, missing = transform_values(adata, genes, value_transform=value_transform)
    if missing:
        shown = ", ".join(missing[:20]) + (" ..." if len(missing) > 20 else "")
        raise KeyError(f"{_name(adata)}: {len(missing)} requested genes are not measured: {shown}")
    keep = library_size(adata) >= min_umi
    if not keep.any():
        raise ValueError(f"{_name(adata)}: no spot has >= {min_umi} UMI")
    genes = list(adata.var_names) if genes is None else list(genes)
    return feats[..., keep, :], targets[keep], genes


# ---------------------------------------------------------------------------------------------
# backbone and model


def load_backbone_spec(backbone, *, seed: int = 0):
    """A backbone from an object, a registry name/path, or ``'random'`` / ``'random:<ref>'``
    (the same architecture and vocabulary as ``<ref>`` (default builtin), randomly initialised:
    the "does pre-training help?" ablation). Returns ``(backbone, ref)``; ``ref`` is what a saved
    model records (``None`` when the weights must be saved with it)."""
    if isinstance(backbone, torch.nn.Module):
        return backbone, None
    spec = str(backbone)
    from napari_hinge import scfm

    if spec == "random" or spec.startswith("random:"):
        like = scfm.load_backbone(spec.partition(":")[2] or DEFAULT_BACKBONE)
        return scfm.random_backbone(like, seed=seed).eval(), None
    return scfm.load_backbone(spec), spec


def build_model(genes: Sequence[str], feature_dim: int, *, backbone=DEFAULT_BACKBONE,
                encoder: str | None = DEFAULT_ENCODER, ada_rank: int | None = 32,
                seed: int = 42, backbone_ref: str | None = None, **config) -> HingeModel:
    """A fresh :class:`HingeModel` over ``genes`` (those outside the backbone's vocabulary
    get learned tokens).

    ``backbone_ref`` records the registry name of a backbone passed as an object (so a saved
    model refers to the shipped weights instead of copying them)."""
    bb, ref = load_backbone_spec(backbone, seed=seed)
    ref = backbone_ref or ref
    torch.manual_seed(seed)
    cfg = HingeConfig(genes=list(genes), feature_dim=int(feature_dim), encoder=encoder,
                      backbone_ref=ref, ada_rank=ada_rank, **config)
    return HingeModel(bb, cfg)


def feature_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std over all spots (and views) of training features."""
    f = np.asarray(features, dtype=np.float64).reshape(-1, features.shape[-1])
    std = f.std(0)
    return f.mean(0).astype(np.float32), np.where(std > 1e-6, std, 1.0).astype(np.float32)


def unknown_genes_message(unknown: Sequence[str], panel: Sequence[str]) -> str:
    """'N genes are not predicted by this model: ... (did you mean ...); it predicts: ...'."""
    import difflib

    upper = {g.upper(): g for g in panel}
    hints = []
    for g in unknown:
        close = upper.get(g.upper()) or next(iter(difflib.get_close_matches(g, panel, 1)), None)
        if close:
            hints.append(f"{g} -> {close}?")
    shown = ", ".join(sorted(panel)[:60]) + (" ..." if len(panel) > 60 else "")
    return (f"{len(unknown)} gene(s) not predicted by this model: {', '.join(unknown[:20])}"
            + (f" ({'; '.join(hints)})" if hints else "")
            + f". It predicts {len(panel)} genes: {shown}")


def model_inputs(model: HingeModel, features, coords_um=None, groups=None,
                 synthetic=None) -> np.ndarray:
    """Encoder features ``(N, F)`` / ``(K, N, F)`` -> what the network takes: with the
    neighbour context the model was trained with (``coords_um`` (N, 2) in µm needed then),
    centred per section when the model was (the network standardises them itself).

    ``synthetic`` (bool, N) marks synthetic C2L pairs among training rows. Their context is
    the mean of the *real* spots around their position in the same group (NaN coordinates:
    their own features, as for a spot without neighbours), and they are nobody's neighbour,
    so real spots get the inputs they get at prediction; they are centred on the mean of the
    synthetic rows of their group (the generator's style offset is not a section's), real rows
    on the real rows' mean."""
    f = np.asarray(features, dtype=np.float32)
    real = None if synthetic is None else ~np.asarray(synthetic, bool)
    radius = model.config.context_um
    if radius:
        if coords_um is None:
            raise ValueError(f"this model uses {radius:g} µm of neighbour context: pass the "
                             "spots' coordinates (coords_um)")
        f = context_features(f, coords_um, radius_um=float(radius), groups=groups,
                             reference=real)
    if model.config.center_sections:
        f = center_per_group(f, centring_groups(groups, synthetic, f.shape[-2]))
    return f


def standardized(model: HingeModel, inputs) -> np.ndarray:
    """:func:`model_inputs` as the network sees them (its feature standardisation applied), for
    fitting or scoring a baseline on exactly the network's inputs."""
    with torch.no_grad():
        return model.standardize(torch.as_tensor(np.asarray(inputs, np.float32))).cpu().numpy()


def centring_groups(groups, synthetic, n: int):
    """Per-section centring labels with the synthetic rows of each section on their own."""
    if synthetic is None:
        return groups
    labels = np.zeros(n, np.int64) if groups is None else \
        np.unique(np.asarray(groups), return_inverse=True)[1].ravel()
    return labels * 2 + np.asarray(synthetic, bool)


def coords_um_of(adata) -> np.ndarray:
    """Spot centres in µm (``obsm['spatial']`` times the slide's pixel size)."""
    mpp = adata.uns.get(META_KEY, {}).get("microns_per_pixel")
    if not mpp:
        raise ValueError(f"{_name(adata)}: the pixel size (uns['{META_KEY}']"
                         "['microns_per_pixel']) is unknown; set it to place the spots in µm")
    return np.asarray(adata.obsm[SPATIAL_KEY], dtype=np.float64) * float(mpp)


def calibrated_uncertainty(model: HingeModel, mean, raw_std, genes=None, *,
                           depth=None, prior=None) -> dict:
    """``{'std': (N, G), 'lower_80', 'upper_80', 'lower_95', 'upper_95'}`` from the samples'
    raw spread, through the model's calibration (its intervals cover on held-out spots);
    without one, ``std`` is the raw spread and no intervals are given. A calibration with a
    depth map needs the spots' ``depth`` (N,), or their ``prior`` over all the model's genes
    (``SampleResult.prior``) to compute it from."""
    cal = getattr(model, "calibration", None)
    if cal is None:
        return {"std": np.asarray(raw_std, np.float32)}
    if cal.uses_depth and depth is None and prior is not None:
        depth = cal.depth(prior)
    if genes is not None:
        cal = cal.subset(genes)
    out = {"std": cal.sd(raw_std, depth)}
    for level in (0.8, 0.95):
        pct = round(level * 100)
        out[f"lower_{pct}"], out[f"upper_{pct}"] = cal.interval(mean, raw_std, level, depth)
    return out


def save_model(model: HingeModel, directory: str | os.PathLike) -> Path:
    """Write a model folder (:meth:`HingeModel.save`: weights, feature standardisation and
    calibration, atomically), and ``training_data.json`` (real vs synthetic rows)."""
    from napari_hinge._files import atomic_write

    directory = model.save(directory)
    mix = getattr(model, "training_data", None)
    if mix is not None:  # for the record (never read back as code)
        atomic_write(directory / "training_data.json",
                     lambda tmp: Path(tmp).write_text(json.dumps(mix, indent=2)))
    return directory


def shipped_model_dir() -> Path:
    """Folder of the shipped HINGE weights (trained on her2st C2, C4, C5, C6)."""
    return Path(__file__).resolve().parents[1] / "weights" / "hinge"


def load_model(path_or_name: str | os.PathLike = SHIPPED_MODEL, *,
               map_location: str | torch.device = "cpu") -> HingeModel:
    """Load a model folder (or ``'shipped'``) with its feature standardisation and
    calibration (:meth:`HingeModel.load`)."""
    path = shipped_model_dir() if str(path_or_name) == SHIPPED_MODEL else Path(path_or_name)
    if not path.is_dir():
        raise FileNotFoundError(f"HINGE model folder not found: {path}")
    return HingeModel.load(path, map_location=map_location).eval()


# ---------------------------------------------------------------------------------------------
# training


def fit_hinge_arrays(features, targets, genes: Sequence[str], *, encoder: str = DEFAULT_ENCODER,
                     backbone=DEFAULT_BACKBONE, model: HingeModel | None = None,
                     coords_um=None, groups=None,
                     context_um: float | None = RECIPE["context_um"],
                     prior: str | None = RECIPE["prior"],
                     predict_variance: bool = RECIPE["predict_variance"],
                     center_sections: bool = RECIPE["center_sections"],
                     residual_scale: float = RECIPE["residual_scale"],
                     calibrate: bool = True,
                     ada_rank: int | None = TRAIN["ada_rank"], standardize: bool = True,
                     epochs: int = TRAIN["epochs"], batch_size: int = TRAIN["batch_size"],
                     lr: float = TRAIN["lr"], milestones: Sequence[int] | None = None,
                     warmup_epochs: int = TRAIN["warmup_epochs"],
                     val_fraction: float = TRAIN["val_fraction"], aug_ratio: int = 1,
                     seed: int = TRAIN["seed"],
                     checkpoint_dir: str | os.PathLike | None = None, resume: bool = False,
                     stop: StopToken | None = None, device=None, val_samples: int = 2,
                     backbone_ref: str | None = None, synthetic=None,
                     synthetic_weight: float = 1.0, library_size=None,
                     depth_calibration: bool = RECIPE["depth_calibration"],
                     depth_power: float | None = RECIPE["depth_power"],
                     **config) -> Iterator[TrainEvent]:
    """Train HINGE on prepared arrays; a generator of TrainEvents that returns the model.

    ``features`` ``(N, F)`` or ``(K, N, F)`` encoder features, ``targets`` ``(N, G)`` over
    ``genes``. The milestones default to HINGE's (20, 35) of 40 epochs, scaled to ``epochs``.

    The recipe (:data:`RECIPE`, chosen by the leave-one-section-out ablation in
    ``benchmarks/hinge_her2st.py``): ``context_um`` appends the mean features of each spot's
    neighbours within that radius (needs ``coords_um`` (N, 2) in µm; ``groups`` (N,), e.g. the
    section, keeps neighbours and the prior's inner folds within a section); ``prior='ridge'``
    fits a ridge (alpha by inner leave-one-group-out) as a deterministic prior and trains the
    diffusion on the residual of its out-of-fold predictions; ``predict_variance`` adds the
    variance head that makes samples spread. ``calibrate`` then fits the interval calibration
    (:mod:`napari_hinge.hinge.calibration`) on the validation spots; it ships with the model.

    Defaults that differ from the released HINGE code (methods.md 6.1), measured on her2st:
    ``lr=1e-3`` (1e-4 left the validation loss at 1.50 after 10 epochs on ~700 spots, 1e-3
    reached 0.62), ``ada_rank=32`` (low-rank SoftAdaLN heads; ``None`` = the paper's full
    heads) and standardised image features (``standardize``). With
    ``checkpoint_dir`` the final model is saved to ``checkpoint_dir/final`` (with
    :func:`save_model`); ``best/`` holds the best-validation weights. A resumed run keeps the
    milestones of its checkpoint unless ``milestones`` is given (so ``epochs`` may grow).

    ``synthetic`` (bool, N) marks synthetic pairs (C2L tiles, :func:`napari_hinge.c2l.
    load_pairs`): their inputs follow :func:`model_inputs`; they weigh ``synthetic_weight`` in
    the diffusion loss and in the ridge prior, never validate, and the prior's alpha is scored on
    real spots only. The model records the mix (``model.training_data``, saved by
    :func:`save_model` as ``training_data.json``).

    ``library_size`` (N,) the spots' UMI totals over all genes (NaN for synthetic rows) and
    ``depth_calibration``: with a ridge prior, the calibration then also scales each spot's
    spread by its depth predicted from the image (:mod:`napari_hinge.hinge.calibration`),
    fitted on the training spots' out-of-fold priors (off by default: see the defaults table);
    ``depth_power`` the power of that scaling (None: chosen on the calibration spots).
    """
    from napari_hinge import ddp

    from .calibration import fit_depth_map
    from .train import checkpoint_milestones, split_groups, train_hinge

    features = np.asarray(features, dtype=np.float32)
    targets = np.asarray(targets, np.float32)
    if features.ndim == 2:
        features = features[None]
    n_rows = targets.shape[0]
    synthetic = np.zeros(n_rows, bool) if synthetic is None else \
        np.asarray(synthetic, bool).ravel()
    if synthetic.shape != (n_rows,):
        raise ValueError(f"synthetic must mark each of the {n_rows} rows, got {synthetic.shape}")
    if not np.isfinite(synthetic_weight) or synthetic_weight < 0:
        raise ValueError(f"synthetic_weight must be >= 0, got {synthetic_weight}")
    if synthetic.all():
        raise ValueError("training needs real spots next to the synthetic pairs")
    real = ~synthetic
    mark = synthetic if synthetic.any() else None
    weights = None if mark is None else np.where(synthetic, synthetic_weight, 1.0)
    if model is None:
        if context_um and coords_um is None:
            raise ValueError(f"context_um={context_um} needs the spots' coords_um (N, 2) in µm")
        width = features.shape[-1] * (2 if context_um else 1)
        model = build_model(genes, width, backbone=backbone, encoder=encoder,
                            ada_rank=ada_rank, seed=seed, backbone_ref=backbone_ref,
                            context_um=context_um, prior=prior,
                            predict_variance=predict_variance, center_sections=center_sections,
                            residual_scale=residual_scale, **config)
        if standardize:  # statistics of the features as the network takes them (real rows)
            model.set_feature_norm(*feature_stats(model_inputs(model, features, coords_um,
                                                               groups, mark)[:, real]))
        model.init_extra_genes(targets[real])
    inputs = model_inputs(model, features, coords_um, groups, mark)
    prior_values = None
    if model.config.prior == "ridge":
        ridge = fit_ridge_prior(model, inputs, targets, groups, sample_weight=weights,
                                score_rows=real)
        oof = ridge.oof_predictions_
        # residuals centred per section: a section's mean level is not what a map shows
        prior_values = oof.copy()
        labels = centring_groups(np.zeros(len(targets)) if groups is None else groups, mark,
                                 len(targets))
        for g in np.unique(labels):
            sel = labels == g
            prior_values[sel] += (targets[sel] - oof[sel]).mean(0)
    if milestones is None and resume and checkpoint_dir is not None:
        # a resumed run keeps its schedule, also when it is made longer (--epochs)
        milestones = checkpoint_milestones(checkpoint_dir)
    if milestones is None:
        milestones = tuple(sorted({max(1, round(epochs * f)) for f in (20 / 40, 35 / 40)}))
    gen = train_hinge(model, inputs, targets,
                      val_fraction=val_fraction, epochs=epochs, batch_size=batch_size, lr=lr,
                      milestones=tuple(milestones), warmup_epochs=warmup_epochs, seed=seed,
                      checkpoint_dir=checkpoint_dir, resume=resume, stop=stop, device=device,
                      aug_ratio=aug_ratio, val_samples=val_samples, prior_values=prior_values,
                      sample_weights=weights, val_eligible=None if mark is None else real)
    model.training_data = {"n_real": int(real.sum()), "n_synthetic": int(synthetic.sum()),
                           "synthetic_weight": float(synthetic_weight) if mark is not None
                           else None}
    done = None
    for event in gen:
        if event.kind == "done":
            done = event
            done.metrics["training_data"] = dict(model.training_data)
            _, val_idx = split_groups(targets.shape[0], val_fraction, seed,
                                      None if mark is None else real)
            if calibrate and len(val_idx) >= 10:
                depth_map = val_depth = None
                if depth_calibration and library_size is not None \
                        and prior_values is not None:
                    lib = np.asarray(library_size, np.float64).ravel()
                    rows = real & np.isfinite(lib)
                    if rows[val_idx].all():
                        depth_map, oof_depth = fit_depth_map(
                            oof[rows], lib[rows], None if groups is None
                            else np.asarray(groups)[rows])
                        val_depth = oof_depth[np.searchsorted(np.flatnonzero(rows), val_idx)]
                # with the plain out-of-fold prior and depth: a new section's are not known
                model.calibration = calibrate_on(model, inputs[:, val_idx], targets[val_idx],
                                                 None if prior_values is None
                                                 else oof[val_idx], seed=seed,
                                                 depth=val_depth, depth_map=depth_map,
                                                 depth_power=depth_power,
                                                 groups=None if groups is None
                                                 else np.asarray(groups)[val_idx])
                done.metrics["calibration_spots"] = int(len(val_idx))
            if checkpoint_dir is not None and ddp.is_main():  # under torchrun: rank 0 writes
                save_model(model.cpu(), Path(checkpoint_dir) / "final")
        yield event
    model.train_summary = done.metrics if done is not None else None
    return model.cpu().eval()


def fit_ridge_prior(model: HingeModel, inputs, targets, groups=None, *, sample_weight=None,
                    score_rows=None):
    """Fit the ridge prior on the network's inputs and install it in ``model``; returns the
    fitted :class:`~napari_hinge.baselines.TunedRidge` (its ``oof_predictions_`` hold each
    spot's prior from the fit without its group).

    The ridge sees view 0 (the patch as it is), the view a spot is predicted from: fitted on
    the mean of the 8 dihedral views instead, it scored 0.417 instead of 0.427 on her2st LOSO
    (smoother training features than the test's)."""
    from napari_hinge.baselines import TunedRidge

    ridge = TunedRidge().fit(standardized(model, np.asarray(inputs)[0]), targets, groups=groups,
                             sample_weight=sample_weight, score_rows=score_rows)
    model.set_prior(*ridge.linear_map())
    return ridge


def calibrate_on(model: HingeModel, inputs, targets, prior_values=None, *,
                 n_samples: int = SAMPLER["n_samples"],
                 reveal_steps: int = SAMPLER["reveal_steps"], seed: int = 0,
                 depth=None, depth_map=None, depth_power=None, groups=None):
    """Fit :func:`~napari_hinge.hinge.calibration.fit_calibration` on held-out spots:
    ``inputs`` (K, n, F) network features (view 0 is sampled), ``targets`` (n, G);
    ``prior_values`` (n, G) replaces the model's own prior (out-of-fold, as for a spot of an
    unseen section); ``depth`` (n,) their out-of-fold depth and ``depth_map`` the model's
    (:func:`~napari_hinge.hinge.calibration.fit_depth_map`), to scale the spread by depth
    (``depth_power``: fixed, or None to choose it on these spots); ``groups`` (n,) their
    sections (depth-scaled multipliers are then the worst section's)."""
    from .calibration import fit_calibration
    from .sampler import sample

    view = np.asarray(inputs)[:1]  # predicted as a user's spot is: from the patch as it is
    res = sample(model, view, n_samples=n_samples, reveal_steps=reveal_steps, seed=seed)
    mean = res.mean.numpy()
    if prior_values is not None:
        mean = mean - res.prior.numpy() + prior_values
    return fit_calibration(mean, res.std.numpy(), targets, model.config.genes, depth=depth,
                           depth_map=depth_map, depth_power=depth_power, groups=groups)


def _as_pairs(pairs):
    from napari_hinge.c2l.pairs import SyntheticPairs, load_pairs

    return pairs if isinstance(pairs, SyntheticPairs) else load_pairs(pairs)


def fit_hinge(datasets: Sequence, *, genes: Sequence[str] | None = None,
              n_genes: int = TRAIN["n_genes"],
              encoder=DEFAULT_ENCODER, encoder_weights=None, backbone=DEFAULT_BACKBONE,
              include: Sequence[str] = (),
              epochs: int = TRAIN["epochs"], augment: bool = True, min_umi: int = MIN_UMI,
              progress: Callable[[str, int, int], None] | None = None,
              stop: StopToken | None = None, extra_pairs: Sequence = (),
              extra_weight: float = 1.0, **train_kwargs) -> Iterator[TrainEvent]:
    """Train HINGE on spatial datasets; a generator of TrainEvents returning the HingeModel.

    Parameters
    ----------
    datasets
        AnnData objects or paths :func:`read_dataset` reads (``"her2st_folder:C2"`` works).
    genes
        The panel; default: the design.md rule (expressed in >= 10% of the spots of every
        section, top ``n_genes`` by variance of log1p CP10k) over all measured genes, plus
        ``include``. Genes outside the backbone's vocabulary get learned tokens (listed in the
        'done' event, ``metrics['genes_outside_vocab']``).
    include
        Genes added to the rule's panel (e.g. markers a pathologist asks for); each must be
        measured in every section.
    encoder, encoder_weights
        Patch encoder (features are cached per slide).
    backbone
        Registry name/path of the backbone (``'builtin'`` = the shipped pre-trained one), a
        backbone object, or ``'random'`` for a randomly initialised one.
    epochs, augment
        Training epochs; ``augment`` trains on the 8 dihedral feature views.
    stop
        A :class:`~napari_hinge.training.StopToken` checked between steps.
    extra_pairs, extra_weight
        Synthetic pairs (:class:`~napari_hinge.c2l.pairs.SyntheticPairs` or ``pairs.npz``
        paths, e.g. from ``napari-hinge c2l fill``) trained on next to the real spots, each
        weighing ``extra_weight`` (see :func:`fit_hinge_arrays`). Their tiles are encoded as the
        real spots of their slide; without ``genes`` the panel is the pairs' own.
    **train_kwargs
        Passed to :func:`fit_hinge_arrays` (``batch_size``, ``lr``, ``ada_rank``, ``seed``,
        ``checkpoint_dir``, ``resume``, ``device`` ...).

    Yields
    ------
    TrainEvent
        'step', 'epoch', 'stopped' or 'done'. The generator's return value (``StopIteration
        .value``, or ``model = yield from fit_hinge(...)``) is the trained model.
    """
    if not datasets:
        raise ValueError("fit_hinge needs at least one dataset")
    adatas = [read_dataset(d) for d in datasets]
    for a in adatas:
        _check_spatial(a)
    seed = train_kwargs.get("seed", 42)
    bb, ref = load_backbone_spec(backbone, seed=seed)
    kept = [a[library_size(a) >= min_umi] for a in adatas]
    pairs = [_as_pairs(p) for p in extra_pairs]
    if genes is None and pairs:
        genes = list(pairs[0].genes)  # the local model's panel: what the tiles carry
    elif genes is None:
        genes = select_panel(kept, n_genes, include=include)
    feats, targets, coords, groups, libs = [], [], [], [], []
    enc = resolve_encoder(encoder, encoder_weights)
    for a in adatas:
        name = _name(a)
        tick = None if progress is None else (lambda d, t, n=name: progress(n, d, t))
        f, y, _ = prepare_dataset(a, encoder=enc, genes=genes, augment=augment, min_umi=min_umi,
                                  progress=tick,
                                  value_transform=bb.config.value_transform
                                  if bb.config.value_transform in VALUE_TRANSFORMS
                                  else "log1p_cp10k")
        feats.append(f if f.ndim == 3 else f[None])
        targets.append(y)
        coords.append(coords_um_of(a)[library_size(a) >= min_umi])
        libs.append(library_size(a)[library_size(a) >= min_umi])
        groups.append(np.full(len(y), len(groups)))
    features = np.concatenate(feats, axis=1)
    targets, coords, groups, libs = (np.concatenate(x) for x in (targets, coords, groups, libs))
    synthetic = None
    if pairs:
        from napari_hinge.c2l.pairs import encode_pairs, stack_training_rows
        from napari_hinge.patches import patch_side_px

        slides = [_check_spatial(a).get("slide_path") for a in adatas]
        by_slide = {os.path.realpath(p): a for p, a in zip(slides, adatas, strict=True) if p}
        extra = []
        for i, pr in enumerate(pairs):
            # a tile is encoded as a real spot of its slide (same pixels into the encoder)
            home = by_slide.get(os.path.realpath(pr.slide_path)) if pr.slide_path else None
            side = patch_side_px(home) if home is not None else None
            tick = None if progress is None else \
                (lambda d, t, n=f"synthetic pairs {i + 1}": progress(n, d, t))
            extra.append((pr, encode_pairs(pr, encoder=enc, side_px=side, augment=augment,
                                           progress=tick)))
        n_real = len(libs)
        features, targets, coords, groups, synthetic = stack_training_rows(
            features, targets, coords, groups, extra, genes, slides)
        libs = np.r_[libs, np.full(len(targets) - n_real, np.nan)]  # tiles have no UMIs
    # the backbone object already loaded (the same random weights that chose the panel)
    model = yield from fit_hinge_arrays(features, targets, genes,
                                        encoder=enc.name, backbone=bb, backbone_ref=ref,
                                        coords_um=coords, groups=groups,
                                        synthetic=synthetic, synthetic_weight=extra_weight,
                                        library_size=libs, epochs=epochs, stop=stop,
                                        **train_kwargs)
    if model.train_summary is not None:
        model.train_summary["genes_outside_vocab"] = list(model.config.extra_genes)
    if pairs:  # where the synthetic rows came from, in the saved training_data.json
        model.training_data["synthetic_pairs"] = [
            {"slide_path": pr.slide_path, "n": len(pr),
             **{k: pr.params[k] for k in ("source", "strength", "guidance", "steps", "seed")
                if k in pr.params}} for pr in pairs]
    return model


# ---------------------------------------------------------------------------------------------
# prediction and evaluation


def predict_spots(model: HingeModel, adata, *, features=None,
                  n_samples: int = SAMPLER["n_samples"],
                  reveal_steps: int | None = SAMPLER["reveal_steps"], seed: int = 0,
                  key_added: str = "hinge",
                  augment: bool = False, batch_size: int = 256, device=None,
                  encoder_weights=None, progress: Callable[[int, int], None] | None = None):
    """Predict the model's genes on every spot of ``adata``.

    Parameters
    ----------
    model
        A trained :class:`HingeModel` (see :func:`load_model`).
    adata
        Spots with a slide (or pass ``features``). Not changed except for the keys below.
    features
        Precomputed ``(N, F)`` / ``(K, N, F)`` features (default: encoded with the model's
        encoder, cached).
    n_samples, reveal_steps, seed
        Sampler settings (:data:`SAMPLER`): S samples per spot; ``reveal_steps < T`` reveals
        several genes per step.
    key_added
        Writes ``adata.obsm[f'{key_added}_mean']``/``[f'{key_added}_std']`` (N, G) and
        ``adata.uns[key_added]`` (genes, parameters).
    augment
        Sample over the 8 dihedral views (test-time augmentation; sample s uses view s % 8).

    Returns
    -------
    AnnData
        A new AnnData over the model's genes: ``X`` = predicted mean (the model's value
        transform), ``layers['std']`` (the calibrated standard deviation when the model ships a
        calibration, with ``layers['lower_80'/'upper_80'/'lower_95'/'upper_95']``: central
        intervals that cover on held-out spots; else the raw spread), ``layers['measured']``
        (same transform; zeros and ``var['measured'] = False`` for genes the data lacks),
        ``obsm['spatial']`` and ``uns['napari_hinge']`` copied, ``uns[key_added]`` the
        parameters.
    """
    import anndata as ad
    import pandas as pd

    from .sampler import sample

    adata = read_dataset(adata)
    if features is None:
        if model.config.encoder is None:
            raise ValueError("the model records no encoder; pass features=")
        features = spot_features(adata, encoder=model.config.encoder,
                                 encoder_weights=encoder_weights, augment=augment)
    features = np.asarray(features, dtype=np.float32)
    if features.shape[-2] != adata.n_obs:
        raise ValueError(f"features have {features.shape[-2]} spots, the data {adata.n_obs}")
    coords = coords_um_of(adata) if model.config.context_um else None
    res = sample(model, model_inputs(model, features, coords), n_samples=n_samples,
                 reveal_steps=reveal_steps, seed=seed, batch_size=batch_size, device=device,
                 progress=progress)
    genes = list(model.config.genes)
    mean = res.mean.numpy()
    unc = calibrated_uncertainty(model, mean, res.std.numpy(), prior=res.prior.numpy())
    std = unc["std"]
    vt = model.config.value_transform if model.config.value_transform in VALUE_TRANSFORMS \
        else "log1p_cp10k"
    measured, missing = transform_values(adata, genes, value_transform=vt)
    warn_if_unlike_training(adata, genes, missing)
    params = {"genes": genes, "n_samples": int(n_samples),
              "reveal_steps": None if reveal_steps is None else int(reveal_steps),
              "seed": int(seed), "augment": bool(augment), "encoder": model.config.encoder,
              "value_transform": vt, "backbone_ref": model.config.backbone_ref,
              "genes_missing_in_data": missing,
              "uncertainty": "calibrated" if len(unc) > 1 else "raw sample spread"}
    adata.obsm[f"{key_added}_mean"] = mean
    adata.obsm[f"{key_added}_std"] = std
    adata.uns[key_added] = params
    out = ad.AnnData(X=mean, obs=adata.obs.copy(),
                     var=pd.DataFrame({"measured": [g not in missing for g in genes]},
                                      index=pd.Index(genes)))
    for name, values in unc.items():
        out.layers[name] = values
    out.layers["measured"] = measured
    out.obsm[SPATIAL_KEY] = np.asarray(adata.obsm[SPATIAL_KEY])
    if META_KEY in adata.uns:
        out.uns[META_KEY] = dict(adata.uns[META_KEY])
    if "spatial" in adata.uns:
        out.uns["spatial"] = adata.uns["spatial"]
    out.uns[key_added] = params
    return out


def warn_if_unlike_training(adata, genes: Sequence[str], missing: Sequence[str]) -> None:
    """Warn when the data looks unlike what a model was trained on: mouse-style gene symbols
    (``Erbb2``) for a model of human ones, or fewer than half of its genes measured (the
    prediction still runs: it comes from the image; only the scoring is partial)."""
    import re

    human = [g for g in genes if re.fullmatch(r"[A-Z0-9-]+", g)]
    names = [str(v) for v in adata.var_names[:2000]]
    mouse = [v for v in names if re.fullmatch(r"[A-Z][a-z0-9]+[a-z][a-z0-9-]*", v)]
    if len(human) > 0.8 * len(genes) and len(mouse) > 0.5 * max(1, len(names)):
        warnings.warn(f"{_name(adata)}: the data's genes look like mouse symbols ({mouse[0]}, "
                      f"...) and the model's like human ones ({human[0]}, ...): the model was "
                      "trained on human tissue", stacklevel=3)
    if genes and len(missing) > 0.5 * len(genes):
        warnings.warn(f"{_name(adata)}: only {len(genes) - len(missing)} of the model's "
                      f"{len(genes)} genes are measured here; comparisons with the measurement "
                      "cover those only", stacklevel=3)


def evaluate(pred, adata=None, *, min_umi: int = MIN_UMI, **predict_kwargs) -> dict:
    """Score predictions against the measured expression.

    ``pred`` is the AnnData returned by :func:`predict_spots`, or a model (then ``adata`` is
    predicted first with ``predict_kwargs``). Spots under ``min_umi`` UMI and genes the data
    lacks are left out (and named). Returns :func:`napari_hinge.metrics.expression_scores`
    plus ``genes_scored``, ``genes_missing_in_data``, ``n_spots``.
    """
    from napari_hinge.metrics import expression_scores

    if isinstance(pred, HingeModel):
        if adata is None:
            raise ValueError("evaluate(model, adata): the data to predict is missing")
        adata = read_dataset(adata)
        pred = predict_spots(pred, adata, **predict_kwargs)
    elif adata is not None:
        adata = read_dataset(adata)
    ok = pred.var["measured"].to_numpy(bool)
    if ok.sum() < 3:
        raise ValueError(f"only {int(ok.sum())} of the model's genes are measured in the data: "
                         "nothing to score")
    lib = library_size(adata) if adata is not None else None
    keep = np.ones(pred.n_obs, bool) if lib is None else lib >= min_umi
    genes = list(pred.var_names[ok])
    scores = expression_scores(np.asarray(pred.X)[keep][:, ok],
                               np.asarray(pred.layers["measured"])[keep][:, ok], genes=genes)
    scores.update(genes_scored=len(genes), n_spots=int(keep.sum()),
                  genes_missing_in_data=list(pred.var_names[~ok]),
                  params={k: v for k, v in pred.uns.get("hinge", {}).items() if k != "genes"})
    return scores


def model_summary(model: HingeModel) -> dict:
    """JSON-ready description of a model (config without the gene list, counts)."""
    cfg = asdict(model.config)
    cfg["n_genes"] = len(cfg.pop("genes"))
    return {"config": cfg, **model.param_counts()}
