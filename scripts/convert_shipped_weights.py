"""Convert the shipped weights (``src/napari_hinge/weights/{hinge,backbone,c2l_central}``) from
model format 1 to the current :mod:`napari_hinge.persistence` format, without retraining.

    python scripts/convert_shipped_weights.py

Each folder goes through :func:`napari_hinge.upgrade.upgrade_folder` (atomic, in place); the
script then checks that every tensor of the converted folder equals, bit for bit, the tensor
of the old files (HINGE's ``feature_norm.safetensors`` mean/std are now the model's
``feature_mean``/``feature_std``). Run it once; a current folder is left as it is.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

import torch

from napari_hinge.training import load_safetensors
from napari_hinge.upgrade import FEATURE_NORM_FILE, upgrade_folder

WEIGHTS = Path(__file__).resolve().parents[1] / "src" / "napari_hinge" / "weights"
FOLDERS = ("backbone", "hinge", "c2l_central")
RENAMED = {"mean": "feature_mean", "std": "feature_std"}


def old_tensors(folder: Path) -> dict[str, torch.Tensor]:
    state = load_safetensors(folder / "model.safetensors")
    if (folder / FEATURE_NORM_FILE).is_file():
        norm = load_safetensors(folder / FEATURE_NORM_FILE)
        state.update({RENAMED[k]: v for k, v in norm.items()})
    return state


def main() -> int:
    ok = True
    for name in FOLDERS:
        folder = WEIGHTS / name
        with tempfile.TemporaryDirectory() as tmp:
            before = Path(tmp) / name
            shutil.copytree(folder, before)
            kind = upgrade_folder(folder)
            if kind is None:
                print(f"{folder}: already current")
                continue
            old, new = old_tensors(before), load_safetensors(folder / "model.safetensors")
            same = old.keys() == new.keys() and all(
                old[k].dtype == new[k].dtype and torch.equal(old[k], new[k]) for k in old)
            kept = sorted(p.name for p in before.iterdir() if p.name != FEATURE_NORM_FILE)
            now = sorted(p.name for p in folder.iterdir())
            print(f"{folder}: {kind}, {len(new)} tensors, "
                  f"{'bit-identical' if same else 'DIFFERENT'}; files {now}")
            ok &= same and kept == now
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
