"""Synthetic (patch, expression) pairs: one file format, one encoding, one way into training.

``napari-hinge c2l fill`` and the fill widget write ``pairs.npz`` (:func:`save_pairs`);
``napari-hinge hinge train --extra-pairs``, the HINGE Train tab and
:func:`napari_hinge.tl.train_with_pairs` read it (:func:`load_pairs`, which checks every field
and names the file and the problem). :func:`encode_pairs` encodes the tiles exactly as a real
spot of the same slide is encoded (:func:`napari_hinge.features.encode_patches`), and
:func:`stack_training_rows` appends them to real training rows with a ``synthetic`` mark, a
position for the neighbour context and a section for the centring.
"""

from __future__ import annotations

import json
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from napari_hinge.errors import InputError

#: Fields of ``pairs.npz``; ``centers_xy`` are level-0 pixels of ``slide_path``.
PAIRS_FORMAT = 1


@dataclass
class SyntheticPairs:
    """Synthetic tiles with their conditioning expression.

    ``patches`` uint8 ``(n, S, S, 3)`` (each covers ``patch_um``), ``expression`` float32
    ``(n, G)`` (``log1p`` CP10k over ``genes``), ``centers_xy`` ``(n, 2)`` level-0 pixels of the
    slide they were generated on (NaN when unknown), ``microns_per_pixel`` of that slide.
    """

    patches: np.ndarray
    expression: np.ndarray
    genes: list[str]
    centers_xy: np.ndarray | None = None
    microns_per_pixel: float | None = None
    slide_path: str | None = None
    patch_um: float = 112.0
    params: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.patches)

    def coords_um(self) -> np.ndarray:
        """``(n, 2)`` positions in µm (NaN where the position or the pixel size is unknown)."""
        if self.centers_xy is None or not self.microns_per_pixel:
            return np.full((len(self), 2), np.nan)
        return np.asarray(self.centers_xy, float) * float(self.microns_per_pixel)


def pairs_from_fill(result, slide_path: str | None = None) -> SyntheticPairs:
    """A :class:`~napari_hinge.c2l.fill.FillResult` as pairs (``slide_path``: default the
    slide file the fill ran on)."""
    slide_path = slide_path or result.params.get("slide_path")
    return SyntheticPairs(np.asarray(result.patches), np.asarray(result.expression, np.float32),
                          list(result.genes), np.asarray(result.layout.centers_xy, float),
                          result.microns_per_pixel, slide_path,
                          float(result.params.get("patch_um", 112.0)), dict(result.params))


def save_pairs(pairs: SyntheticPairs, path: str | os.PathLike) -> Path:
    """Write ``pairs.npz`` atomically (no pickles: strings as unicode arrays, params as JSON)."""
    from napari_hinge._files import atomic_write

    centers = (np.full((len(pairs), 2), np.nan) if pairs.centers_xy is None
               else np.asarray(pairs.centers_xy, float))

    def write(tmp):
        with open(tmp, "wb") as f:
            np.savez(f, format=np.int64(PAIRS_FORMAT), patches=pairs.patches,
                     expression=np.asarray(pairs.expression, np.float32),
                     genes=np.array(pairs.genes, dtype=str), centers_xy=centers,
                     microns_per_pixel=np.float64(pairs.microns_per_pixel or np.nan),
                     slide_path=np.array(pairs.slide_path or ""),
                     patch_um=np.float64(pairs.patch_um),
                     params=np.array(json.dumps(pairs.params, default=str)))

    return atomic_write(path, write)


def load_pairs(path: str | os.PathLike) -> SyntheticPairs:
    """Read and check a ``pairs.npz`` (from :func:`save_pairs` or ``napari-hinge c2l fill``).

    Raises :class:`~napari_hinge.errors.InputError` naming the file and the field for anything
    that is not a well-formed pairs file; nothing in it runs code (``allow_pickle=False``).
    """
    path = Path(path)
    if not path.is_file():
        raise InputError.at(path, "pairs file not found")
    try:
        z = np.load(path, allow_pickle=False)
        if not hasattr(z, "files"):  # a bare .npy array
            raise ValueError("one array, not an .npz archive of named fields")
        data = {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as exc:
        # not a zip, a broken member, a pickled (object) array
        raise InputError.at(path, f"not a pairs .npz file ({exc})") from None
    for key in ("patches", "expression", "genes"):
        if key not in data:
            raise InputError.at(path, "missing (a pairs file holds patches, expression, genes)",
                                field=key)
    patches, expr, genes = data["patches"], data["expression"], data["genes"]
    if patches.dtype != np.uint8 or patches.ndim != 4 or patches.shape[-1] != 3 \
            or patches.shape[1] != patches.shape[2] or patches.shape[1] < 8:
        raise InputError.at(path, f"must be uint8 square RGB tiles (n, S, S, 3), got "
                                  f"{patches.dtype} {patches.shape}", field="patches")
    n = len(patches)
    if n == 0:
        raise InputError.at(path, "holds no pairs", field="patches")
    if genes.ndim != 1 or genes.dtype.kind != "U" or not len(genes):
        raise InputError.at(path, "must be a list of gene names", field="genes")
    genes = [str(g) for g in genes]
    if len(set(genes)) != len(genes) or any(not g.strip() for g in genes):
        raise InputError.at(path, "gene names must be unique and non-empty", field="genes")
    if expr.dtype.kind not in "fiu" or expr.shape != (n, len(genes)):
        raise InputError.at(path, f"must be numbers of shape ({n}, {len(genes)}) (tiles x genes), "
                                  f"got {expr.dtype} {expr.shape}", field="expression")
    expr = expr.astype(np.float32)
    if not np.isfinite(expr).all() or (expr < 0).any() or expr.max() > 20:
        raise InputError.at(path, "must be finite log1p CP10k values in [0, 20]",
                            field="expression")
    centers = data.get("centers_xy")
    if centers is not None:
        if centers.dtype.kind not in "fiu" or centers.shape != (n, 2) \
                or np.isinf(centers).any():
            raise InputError.at(path, f"must be ({n}, 2) x, y pixels", field="centers_xy")
        centers = centers.astype(float)
    mpp = _scalar(data, "microns_per_pixel", path)
    if mpp is not None and not (mpp > 0):
        raise InputError.at(path, f"must be positive, got {mpp}", field="microns_per_pixel")
    patch_um = _scalar(data, "patch_um", path) or 112.0
    slide = str(data["slide_path"]) if "slide_path" in data else ""
    try:
        params = json.loads(str(data["params"])) if "params" in data else {}
    except json.JSONDecodeError as exc:
        raise InputError.at(path, f"not JSON ({exc})", field="params") from None
    return SyntheticPairs(patches, expr, genes, centers, mpp, slide or None, float(patch_um),
                          params if isinstance(params, dict) else {})


def _scalar(data: dict, key: str, path) -> float | None:
    if key not in data:
        return None
    v = data[key]
    if v.shape != () or v.dtype.kind not in "fiu":
        raise InputError.at(path, f"must be one number, got {v.dtype} {v.shape}", field=key)
    v = float(v)
    return None if np.isnan(v) else v


def encode_pairs(pairs: SyntheticPairs, *, encoder="efficientnet-lite0", side_px=None,
                 augment: bool = False, batch_size: int = 8, progress=None) -> np.ndarray:
    """Features of the tiles, encoded as a real spot patch of ``side_px`` level-0 pixels is
    (:func:`~napari_hinge.features.encode_patches`; default: the tiles' ``patch_um`` at the
    pairs' pixel size). ``(n, F)``, or ``(8, n, F)`` with the dihedral views (``augment``)."""
    from napari_hinge.features import encode_patches
    from napari_hinge.hinge.pipeline import resolve_encoder
    from napari_hinge.patches import DIHEDRAL, dihedral

    enc = resolve_encoder(encoder)
    if side_px is None and pairs.microns_per_pixel:
        side_px = int(round(pairs.patch_um / pairs.microns_per_pixel))
    views = list(DIHEDRAL) if augment else [0]
    out = np.stack([encode_patches(dihedral(pairs.patches, k), encoder=enc, side_px=side_px,
                                   batch_size=batch_size, progress=progress) for k in views])
    return out if augment else out[0]


def check_genes(pairs: SyntheticPairs, genes, where: str = "pairs") -> np.ndarray:
    """Column index of each of ``genes`` in the pairs' expression (InputError naming the
    missing genes otherwise)."""
    have = {g: i for i, g in enumerate(pairs.genes)}
    missing = [g for g in genes if g not in have]
    if missing:
        raise InputError(f"{where}: the synthetic pairs lack {len(missing)} of the model's "
                         f"genes ({', '.join(missing[:10])}); generate them with a local model "
                         "of the same panel")
    return np.array([have[g] for g in genes], dtype=np.int64)


def stack_training_rows(features, targets, coords_um, groups, extra: list, genes,
                        slide_paths=()) -> tuple[np.ndarray, ...]:
    """Real training rows followed by synthetic ones.

    ``features`` ``(K, N, F)``, ``targets`` ``(N, G)`` over ``genes``, ``coords_um`` (N, 2) and
    ``groups`` (N,) of the real spots; ``extra`` a list of ``(SyntheticPairs, features (K, n,
    F))``; ``slide_paths[g]`` is the slide of real group ``g``. Pairs generated on the slide of a
    real group join that group (they take the context of its spots around their position and
    its per-section prior offset); others get a group of their own and no neighbours (NaN
    positions). Returns ``(features, targets, coords_um, groups, synthetic)``.
    """
    feats = [np.asarray(features, np.float32)]
    ys, xy, gs = [np.asarray(targets, np.float32)], [np.asarray(coords_um, float)], \
        [np.asarray(groups)]
    synthetic = [np.zeros(len(targets), bool)]
    where = {os.path.realpath(p): g for g, p in enumerate(slide_paths) if p}
    next_group = int(np.max(groups)) + 1 if len(groups) else 0
    for pairs, f in extra:
        f = np.asarray(f, np.float32)
        if f.ndim == 2:
            f = f[None]
        if f.shape[0] != feats[0].shape[0]:  # views: repeat the tiles' own view
            f = np.repeat(f[:1], feats[0].shape[0], axis=0)
        cols = check_genes(pairs, genes, pairs.slide_path or "pairs")
        group = where.get(os.path.realpath(pairs.slide_path)) if pairs.slide_path else None
        if group is None:
            group, next_group = next_group, next_group + 1
            pos = np.full((len(pairs), 2), np.nan)
        else:
            pos = pairs.coords_um()
        feats.append(f)
        ys.append(pairs.expression[:, cols])
        xy.append(pos)
        gs.append(np.full(len(pairs), group))
        synthetic.append(np.ones(len(pairs), bool))
    return (np.concatenate(feats, axis=1), np.concatenate(ys), np.concatenate(xy),
            np.concatenate(gs), np.concatenate(synthetic))
