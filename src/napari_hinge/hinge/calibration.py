"""Calibrated uncertainty: turn the spread of HINGE's samples into intervals that cover.

The raw standard deviation of S samples says which spots and genes the model is unsure of,
but not by how much: trained on the spots it then scores, a generator is over-confident on
new ones. :func:`fit_calibration` fits, on spots the network did not train on (the training
run's validation spots, predicted with the out-of-fold prior), one scale per gene and two
split-conformal multipliers:

    sd_cal = scale_g * (std + floor_g)          the calibrated standard deviation
    mean +- q_p * sd_cal                         the central interval of level p

``floor_g`` (a tenth of the gene's error scale) keeps a spot whose samples agree from
getting a zero-width interval. ``scale_g`` makes the median normalised error that of a
Gaussian; ``q_p`` is the finite-sample conformal quantile of the normalised errors pooled
over genes (so it is estimated on spots x genes values, not on a few spots per gene).

Most of a held-out spot's error is sequencing noise, and that noise is larger where a spot
has fewer UMIs (on the shipped sample C3 the measured library size alone ranks the errors
with Spearman 0.32 per gene; the samples' spread, 0.17). A model trained with the spots'
library sizes therefore also carries a *depth* map: a linear map of its prior (the
expression it sees in the image) to the spot's log library size relative to its section,
fitted on the training spots' out-of-fold priors (a slide's depths are centred on its
spots). The spread is then scaled by ``exp(-beta * depth / 2)`` (Poisson: sd ~ 1 /
sqrt(UMIs) at ``beta = 1``), with ``beta`` chosen on the calibration spots (0 when it does
not help), before scale and multipliers:

    sd_cal = scale_g * (std + floor_g) * exp(-beta * depth / 2)

Depth's relation to the error is not the same on every section (on her2st patient C the
deepest third of a new section's spots was covered 0.61-0.75 by pooled "80%" intervals, the
shallowest 0.85-0.89), so depth-scaled multipliers are fitted on each calibration section's
spots alone and the largest kept: an interval that covers on the worst section the model
trained on, not on their average (LOSO C2-C6: 80% coverage on the worst held-out section
0.72 pooled, 0.76 so).

The result ships inside the model folder (``calibration.json``).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from napari_hinge.errors import InputError

CALIBRATION_FILE = "calibration.json"
LEVELS = (0.8, 0.95)
_GAUSS_MAD = 0.6744897501960817  # median |z| of a standard normal


@dataclass
class Calibration:
    """Per-gene scale and floor, and the interval multipliers per level."""

    genes: list[str]
    scale: list[float]
    floor: list[float]
    multipliers: dict[str, float]  # level (as a string, JSON keys) -> q
    n_spots: int
    # the depth map over the model's prior (all its genes, in model order): see module doc
    depth_weight: list[float] | None = None
    depth_limit: float = 0.0  # |depth| is clipped here (a few sd of the training spots')
    depth_power: float = 0.0  # beta; 0: the spread alone
    # how many calibration sections the multipliers are the worst of (1: pooled spots)
    multiplier_sections: int = 1

    @property
    def uses_depth(self) -> bool:
        return bool(self.depth_power) and self.depth_weight is not None

    def depth(self, prior) -> np.ndarray:
        """Predicted log library size (N,) of the spots of *one section or slide*, relative
        to their mean, from the model's prior (N, G_model) at them."""
        prior = np.asarray(prior, dtype=np.float64)
        w = np.asarray(self.depth_weight, np.float64)
        if prior.ndim != 2 or prior.shape[1] != w.size:
            raise ValueError(f"the depth map needs the prior of all {w.size} model genes, got "
                             f"shape {prior.shape}")
        return self.clip_depth(prior @ w)

    def clip_depth(self, linear, mean: float | None = None) -> np.ndarray:
        """The depth from ``prior @ depth_weight`` computed elsewhere (a dense map): centred
        on ``mean`` (default: the mean of ``linear``, the slide's spots) and clipped. Only
        depth within a slide is scored: a slide's overall sequencing depth is not in its
        pixels, and a left-out fit's offset was seen to make intervals too narrow."""
        linear = np.asarray(linear, np.float64)
        centre = float(linear.mean()) if mean is None else float(mean)
        return np.clip(linear - centre, -self.depth_limit, self.depth_limit)

    def sd(self, std, depth=None) -> np.ndarray:
        """Calibrated standard deviation (N, G) from the samples' raw one (and the spots'
        :meth:`depth` when the calibration uses it)."""
        std = np.asarray(std, dtype=np.float32)
        out = np.asarray(self.scale, np.float32) * (std + np.asarray(self.floor, np.float32))
        if self.uses_depth:
            if depth is None:
                raise ValueError("this calibration scales the spread by each spot's predicted "
                                 "depth: pass depth= (Calibration.depth of the model's prior)")
            out = out * depth_factor(depth, self.depth_power)[:, None]
        return out.astype(np.float32)

    def multiplier(self, level: float) -> float:
        key = _key(level)
        if key not in self.multipliers:
            raise KeyError(f"no calibrated interval at level {level}; "
                           f"have {sorted(self.multipliers)}")
        return float(self.multipliers[key])

    def interval(self, mean, std, level: float = 0.8, depth=None
                 ) -> tuple[np.ndarray, np.ndarray]:
        """Central interval ``(lower, upper)`` of ``level`` around ``mean``."""
        half = self.multiplier(level) * self.sd(std, depth)
        mean = np.asarray(mean, dtype=np.float32)
        return mean - half, mean + half

    def subset(self, genes) -> Calibration:
        """The calibration of some genes (the depth map still reads the full prior)."""
        idx = [self.genes.index(g) for g in genes]
        return replace(self, genes=[self.genes[i] for i in idx],
                       scale=[self.scale[i] for i in idx], floor=[self.floor[i] for i in idx],
                       multipliers=dict(self.multipliers))

    def save(self, directory: str | os.PathLike) -> Path:
        from napari_hinge.training import atomic_write

        path = Path(directory) / CALIBRATION_FILE
        text = json.dumps(asdict(self), indent=1)
        return atomic_write(path, lambda tmp: Path(tmp).write_text(text))

    @classmethod
    def load(cls, directory: str | os.PathLike) -> Calibration | None:
        """The calibration of a model folder, or None when it has none."""
        path = Path(directory) / CALIBRATION_FILE
        if not path.is_file():
            return None
        from napari_hinge.persistence import read_json

        try:
            cal = cls(**read_json(path))
        except TypeError as exc:
            raise InputError(f"{path} is not a valid calibration file: {exc}",
                             path=path) from exc
        n = len(cal.genes)
        values = [*cal.scale, *cal.floor, *cal.multipliers.values(), cal.depth_limit,
                  cal.depth_power]
        if len(cal.scale) != n or len(cal.floor) != n or not all(
                isinstance(v, (int, float)) and math.isfinite(v) and v >= 0 for v in values):
            raise ValueError(f"{path}: scale/floor must be {n} finite non-negative numbers")
        if cal.depth_weight is not None and not (
                all(isinstance(v, (int, float)) and math.isfinite(v)
                    for v in cal.depth_weight)):
            raise ValueError(f"{path}: depth_weight must be finite numbers")
        return cal


def _key(level: float) -> str:
    return f"{float(level):g}"


#: fewest calibration spots of a section for its own multipliers (worst-section rule)
MIN_SECTION_SPOTS = 10

#: the depth powers tried on the calibration spots (0: the spread alone)
DEPTH_POWERS = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0)


@dataclass
class DepthMap:
    """A linear map of a model's prior (G_model,) to a spot's log library size relative to
    its section (:meth:`Calibration.depth` centres it on the slide's spots)."""

    weight: np.ndarray
    limit: float


def fit_depth_map(prior, library_size, groups=None) -> tuple[DepthMap, np.ndarray]:
    """Fit the depth map on training spots: ``prior`` (N, G_model) their out-of-fold priors,
    ``library_size`` (N,) their UMI totals over all genes, ``groups`` their sections (the
    log library size is centred per section: a section's sequencing depth is not a spot's).
    A tuned ridge (alpha by leave-one-group-out); ``limit`` = 3 sd of the fitted depths.
    Also returns each spot's out-of-fold depth (from the fit without its section): what the
    calibration is fitted on, as a new section's spots get a map that never saw them."""
    from napari_hinge.baselines import TunedRidge
    from napari_hinge.features import center_per_group

    lib = np.asarray(library_size, np.float64).ravel()
    if lib.shape != (len(prior),) or not np.all(np.isfinite(lib)) or (lib <= 0).any():
        raise ValueError(f"library sizes must be {len(prior)} positive finite numbers")
    y = center_per_group(np.log(lib)[:, None], groups, dtype=np.float64)[:, 0]
    ridge = TunedRidge().fit(np.asarray(prior, np.float64), y[:, None], groups=groups)
    w = np.asarray(ridge.linear_map()[0], np.float64)[:, 0]
    limit = float(3 * (np.asarray(prior, np.float64) @ w).std() + 1e-6)
    # only depth within a section is scored (a new slide's depths are centred on its spots):
    # the out-of-fold ones are centred per section too. Uncentred, each left-out fit's own
    # intercept offset its section as a block, and the intervals fitted on them came out too
    # narrow on new sections (C3 fold: 80% coverage 0.71; centred 0.77; no depth 0.76)
    oof = center_per_group(np.asarray(ridge.oof_predictions_, np.float64)[:, :1], groups,
                           dtype=np.float64)[:, 0]
    return DepthMap(w, limit), np.clip(oof, -limit, limit)


def depth_factor(depth, power: float) -> np.ndarray:
    """The spread's scaling ``exp(-power * depth / 2)`` (N,) at the spots' depths."""
    return np.exp(-0.5 * float(power) * np.asarray(depth, np.float64)).astype(np.float32)


def conformal_quantile(scores, level: float) -> float:
    """Split-conformal: the ceil((m + 1) p)-th smallest of m scores covers with prob >= p."""
    z = np.asarray(scores, np.float64).ravel()
    k = min(len(z) - 1, math.ceil((len(z) + 1) * level) - 1)
    return float(np.partition(z, k)[k])


def fit_calibration(mean, std, targets, genes, *, levels=LEVELS, depth=None,
                    depth_map: DepthMap | None = None,
                    depth_power: float | None = None, groups=None) -> Calibration:
    """Fit the calibration on held-out predictions.

    Parameters
    ----------
    mean, std
        (N, G) predicted mean and the samples' raw standard deviation.
    targets
        (N, G) measured values (the model's value transform).
    genes
        The G gene names.
    levels
        Interval levels to calibrate (central intervals).
    depth, depth_map
        The spots' depth (N,) (out-of-fold: :func:`fit_depth_map`) and the model's
        :class:`DepthMap`: the depth power is then chosen among :data:`DEPTH_POWERS` by how
        well the scaled spread ranks the errors (Spearman per gene, mean over genes) on these
        spots, and the scale and multipliers are fitted on the scaled spread.
    depth_power
        Use this power instead of choosing it on these spots (a recipe's fixed choice).
    groups
        (N,) the spots' sections: with a depth power above 0, each section of at least
        :data:`MIN_SECTION_SPOTS` spots gets its own multipliers and the largest are kept
        (see the module doc); otherwise the spots are pooled.
    """
    from napari_hinge.metrics import spread_error_spearman

    mean, std, y = (np.asarray(a, dtype=np.float64) for a in (mean, std, targets))
    if mean.shape != y.shape or std.shape != y.shape or y.ndim != 2:
        raise ValueError(f"mean, std and targets must share one (N, G) shape, got "
                         f"{mean.shape}, {std.shape}, {y.shape}")
    n = len(y)
    if n < 10:
        raise ValueError(f"calibration needs at least 10 held-out spots, got {n}")
    err = np.abs(y - mean)
    floor = 0.1 * np.median(err, axis=0) + 1e-6
    depth_fields = {}
    factor = np.ones(n)
    if depth_map is not None and depth is not None:
        depth = np.asarray(depth, np.float64).ravel()
        if depth_power is None:
            ranked = {b: spread_error_spearman((std + floor) * depth_factor(depth, b)[:, None],
                                               mean, y)["per_gene"] for b in DEPTH_POWERS}
            power = max(DEPTH_POWERS, key=lambda b: (round(ranked[b], 4), -b))
        elif not (math.isfinite(depth_power) and depth_power >= 0):
            raise ValueError(f"depth_power must be a finite number >= 0, got {depth_power}")
        else:
            power = float(depth_power)
        factor = depth_factor(depth, power).astype(np.float64)
        depth_fields = {"depth_weight": depth_map.weight.astype(float).tolist(),
                        "depth_limit": float(depth_map.limit), "depth_power": float(power)}
    spread = (std + floor) * factor[:, None]
    scale = np.median(err / spread, axis=0) / _GAUSS_MAD
    scale = np.where(np.isfinite(scale) & (scale > 0), scale, 1.0)
    z = err / (scale * spread)
    parts = [z]
    if groups is not None and depth_fields.get("depth_power"):
        groups = np.asarray(groups)
        if groups.shape != (n,):
            raise ValueError(f"groups must hold one section per spot ({n}), got "
                             f"{groups.shape}")
        names, counts = np.unique(groups, return_counts=True)
        sections = [z[groups == g] for g, c in zip(names, counts, strict=True)
                    if c >= MIN_SECTION_SPOTS]
        parts = sections if len(sections) > 1 else parts
    multipliers = {_key(p): max(conformal_quantile(part, p) for part in parts) for p in levels}
    return Calibration(list(genes), scale.astype(float).tolist(), floor.astype(float).tolist(),
                       multipliers, n, **depth_fields, multiplier_sections=len(parts))
