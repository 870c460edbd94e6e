"""Convert model folders written before the :mod:`napari_hinge.persistence` contract (model
format 1) to the current format, in place and atomically; the tensors are copied exactly.

    python -m napari_hinge.upgrade FOLDER [FOLDER ...]

Format 1 had no ``kind``/``version`` envelope in ``config.json`` (the C2L models had a ``kind``
field inside the config), and a HINGE folder kept its feature standardisation in a side file
``feature_norm.safetensors`` that became the model's ``feature_mean``/``feature_std`` buffers.
Loading a format-1 folder raises an error that names this command. Every other file of the
folder (``TRAINING.md``, ``training_log.json``, pictures, ``calibration.json``) is kept.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

from napari_hinge.errors import InputError
from napari_hinge.persistence import CONFIG_FILE, WEIGHTS_FILE, config_from_dict, read_json

__all__ = ["detect_legacy_kind", "upgrade_folder"]

FEATURE_NORM_FILE = "feature_norm.safetensors"  # format 1 HINGE only
_BACKBONE_CLASSES = ("builtin", "scgpt", "cellfm")


def _formats() -> dict:
    from napari_hinge.c2l.central import FORMAT as CENTRAL
    from napari_hinge.c2l.local import FORMAT as LOCAL
    from napari_hinge.hinge.model import FORMAT as HINGE
    from napari_hinge.scfm.base import BACKBONE_FORMAT
    from napari_hinge.stmgac.model import FORMAT as STMGAC

    return {f.kind: f for f in (HINGE, STMGAC, CENTRAL, LOCAL, BACKBONE_FORMAT)}


def detect_legacy_kind(folder: str | os.PathLike) -> str | None:
    """The kind of a format-1 model folder, or None when it is already current."""
    folder = Path(folder)
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: {folder} is not a model folder")
    config = read_json(path)
    if not isinstance(config, dict):
        raise InputError(f"{path}: not a model config", path=path)
    if "version" in config:
        return None
    if config.get("kind") in ("c2l-central", "c2l-local"):
        return config["kind"]
    if config.get("kind") in _BACKBONE_CLASSES and (folder / "vocab.json").is_file():
        return "backbone"
    if "genes" in config and "feature_dim" in config:
        return "hinge"
    if "in_dim" in config and "gcn_dims" in config:
        return "stmgac"
    raise InputError(f"{path}: not a napari-hinge model config of any known kind", path=path)


def _convert_in_place(folder: Path, kind: str) -> None:
    """Rewrite a format-1 folder (a private copy) as the current format."""
    from napari_hinge.training import load_safetensors

    fmt = _formats()[kind]
    raw = read_json(folder / CONFIG_FILE)
    if kind in ("c2l-central", "c2l-local"):
        raw = {k: v for k, v in raw.items() if k != "kind"}  # now the envelope's
    config = config_from_dict(fmt.config, raw, where=folder / CONFIG_FILE)
    tensors = load_safetensors(folder / WEIGHTS_FILE)
    if kind == "hinge":
        import torch

        norm = folder / FEATURE_NORM_FILE
        if norm.is_file():
            stats = load_safetensors(norm)
            tensors["feature_mean"], tensors["feature_std"] = stats["mean"], stats["std"]
            norm.unlink()
        else:  # trained without standardisation: the identity
            tensors["feature_mean"] = torch.zeros(config.feature_dim)
            tensors["feature_std"] = torch.ones(config.feature_dim)
        meta = read_json(folder / "meta.json")
        meta.pop("format_version", None)  # the envelope's version says it now
        (folder / "meta.json").write_text(json.dumps(meta, indent=2))
    for sub in ("backbone", "central"):  # nested model folders (HINGE, C2L local)
        if (folder / sub / CONFIG_FILE).is_file():
            sub_kind = detect_legacy_kind(folder / sub)
            if sub_kind is not None:
                _convert_in_place(folder / sub, sub_kind)
    fmt.write_into(folder, config, tensors)


def upgrade_folder(folder: str | os.PathLike) -> str | None:
    """Convert one format-1 model folder in place (atomically: a copy is converted, then
    swapped in). Returns the kind converted, or None when the folder is already current."""
    from napari_hinge._files import atomic_write_dir

    folder = Path(folder)
    kind = detect_legacy_kind(folder)
    if kind is None:
        return None

    def write(tmp: Path) -> None:
        shutil.copytree(folder, tmp, dirs_exist_ok=True)
        _convert_in_place(tmp, kind)

    atomic_write_dir(folder, write)
    return kind


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m napari_hinge.upgrade",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="+", type=Path, help="model folders to convert")
    args = parser.parse_args(argv)
    for folder in args.folders:
        try:
            kind = upgrade_folder(folder)
        except (OSError, ValueError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        print(f"{folder}: " + (f"{kind} model converted to the current format" if kind
                               else "already in the current format"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
