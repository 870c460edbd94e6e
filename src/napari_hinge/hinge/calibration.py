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
The result ships inside the model folder (``calibration.json``).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
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

    def sd(self, std) -> np.ndarray:
        """Calibrated standard deviation (N, G) from the samples' raw one."""
        std = np.asarray(std, dtype=np.float32)
        return (np.asarray(self.scale, np.float32) * (std + np.asarray(self.floor, np.float32))
                ).astype(np.float32)

    def multiplier(self, level: float) -> float:
        key = _key(level)
        if key not in self.multipliers:
            raise KeyError(f"no calibrated interval at level {level}; "
                           f"have {sorted(self.multipliers)}")
        return float(self.multipliers[key])

    def interval(self, mean, std, level: float = 0.8) -> tuple[np.ndarray, np.ndarray]:
        """Central interval ``(lower, upper)`` of ``level`` around ``mean``."""
        half = self.multiplier(level) * self.sd(std)
        mean = np.asarray(mean, dtype=np.float32)
        return mean - half, mean + half

    def subset(self, genes) -> Calibration:
        idx = [self.genes.index(g) for g in genes]
        return Calibration([self.genes[i] for i in idx], [self.scale[i] for i in idx],
                           [self.floor[i] for i in idx], dict(self.multipliers), self.n_spots)

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
        values = [*cal.scale, *cal.floor, *cal.multipliers.values()]
        if len(cal.scale) != n or len(cal.floor) != n or not all(
                isinstance(v, (int, float)) and math.isfinite(v) and v >= 0 for v in values):
            raise ValueError(f"{path}: scale/floor must be {n} finite non-negative numbers")
        return cal


def _key(level: float) -> str:
    return f"{float(level):g}"


def fit_calibration(mean, std, targets, genes, *, levels=LEVELS) -> Calibration:
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
    """
    mean, std, y = (np.asarray(a, dtype=np.float64) for a in (mean, std, targets))
    if mean.shape != y.shape or std.shape != y.shape or y.ndim != 2:
        raise ValueError(f"mean, std and targets must share one (N, G) shape, got "
                         f"{mean.shape}, {std.shape}, {y.shape}")
    n = len(y)
    if n < 10:
        raise ValueError(f"calibration needs at least 10 held-out spots, got {n}")
    err = np.abs(y - mean)
    floor = 0.1 * np.median(err, axis=0) + 1e-6
    scale = np.median(err / (std + floor), axis=0) / _GAUSS_MAD
    scale = np.where(np.isfinite(scale) & (scale > 0), scale, 1.0)
    z = (err / (scale * (std + floor))).ravel()
    multipliers = {}
    for p in levels:
        # split-conformal: the ceil((m + 1) p)-th smallest of m scores covers with prob >= p
        k = min(len(z) - 1, math.ceil((len(z) + 1) * p) - 1)
        multipliers[_key(p)] = float(np.partition(z, k)[k])
    return Calibration(list(genes), scale.astype(float).tolist(), floor.astype(float).tolist(),
                       multipliers, n)
