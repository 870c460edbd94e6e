"""One contract for every saved model folder (HINGE, STMGAC, the C2L central and local models,
the gene-token backbones).

A model folder holds ``config.json``::

    {"kind": "hinge", "version": 2, "weights_sha256": "...", "config": {...the dataclass...}}

and ``model.safetensors`` (tensors only: loading never runs code), plus whatever files a model
adds (a vocabulary, a calibration, a sub-folder). A :class:`ModelFormat` names the kind, the
version and the config dataclass, and is the one place that

- writes the whole folder atomically (:func:`napari_hinge._files.atomic_write_dir`: a kill or a
  full disk leaves the old folder or none, never a mix of files from two saves);
- refuses, with an :class:`~napari_hinge.errors.InputError` naming the folder, a folder of
  another kind, of another version, a config with unknown or missing keys (a typo never
  passes silently), and weights whose bytes differ from the digest written with them (a
  truncated copy or a replaced file).

Folders written before this contract (format version 1: no ``version`` in ``config.json``)
are refused with the command that converts them in place: ``python -m napari_hinge.upgrade
FOLDER`` (:mod:`napari_hinge.upgrade`; the tensors are copied exactly).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from napari_hinge.errors import InputError

__all__ = ["CONFIG_FILE", "WEIGHTS_FILE", "ModelFormat", "config_from_dict", "file_sha256",
           "load_state_strict", "read_json", "upgrade_hint"]

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


def upgrade_hint(directory: str | os.PathLike) -> str:
    return f"convert it with `python -m napari_hinge.upgrade {os.fspath(directory)}`"


def read_json(path: str | os.PathLike):
    """A model folder's JSON file; :class:`InputError` naming it when it is not JSON text."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: not valid JSON ({exc})", path=path) from exc


def file_sha256(path: str | os.PathLike, *, chunk: int = 1 << 22) -> str:
    """SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _strip_optional(hint):
    """``X | None`` -> ``X`` (other hints unchanged)."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return hint


def config_from_dict(cls, data, *, where: str | os.PathLike):
    """Rebuild the dataclass ``cls`` from JSON ``data``, strictly: unknown keys and missing
    required ones raise :class:`InputError` naming ``where`` and the keys; nested dataclass
    fields are rebuilt the same way and JSON lists become tuples where the field is a tuple."""
    where = os.fspath(where)
    if not isinstance(data, dict):
        raise InputError(f"{where}: the config must be a JSON object, got "
                         f"{type(data).__name__}", path=where)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise InputError(f"{where}: unknown {cls.__name__} key(s) {unknown} (known: "
                         f"{sorted(fields)}); the folder was written by another version or "
                         "edited by hand", path=where, field=unknown[0])
    required = [n for n, f in fields.items() if f.default is dataclasses.MISSING
                and f.default_factory is dataclasses.MISSING]
    missing = [n for n in required if n not in data]
    if missing:
        raise InputError(f"{where}: {cls.__name__} key(s) {missing} are missing", path=where,
                         field=missing[0])
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in data.items():
        hint = _strip_optional(hints.get(name))
        if value is not None and dataclasses.is_dataclass(hint):
            value = config_from_dict(hint, value, where=f"{where}: {name}")
        elif isinstance(value, list) and typing.get_origin(hint) is tuple:
            value = tuple(value)
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise InputError(f"{where}: invalid {cls.__name__}: {exc}", path=where) from exc


def load_state_strict(module, state: dict, path: str | os.PathLike) -> None:
    """``module.load_state_dict(state)`` with every tensor accounted for; an
    :class:`InputError` naming ``path`` and the missing / unexpected / misshapen tensors."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = [f"{k} {tuple(state[k].shape)} (expected {tuple(own[k].shape)})"
             for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        parts = [f"{label} {items[:5]}" + (" ..." if len(items) > 5 else "")
                 for label, items in (("missing", missing), ("unexpected", unexpected),
                                      ("wrong shapes", wrong)) if items]
        raise InputError(f"{os.fspath(path)}: the weights do not fit the configured network: "
                         + "; ".join(parts), path=path)
    module.load_state_dict(state, strict=True)


@dataclass(frozen=True)
class ModelFormat:
    """The kind, version and config dataclass of one model's folders.

    Parameters
    ----------
    kind
        Written to and checked in ``config.json`` (``'hinge'``, ``'stmgac'``, ...).
    version
        The layout version this code writes and reads (version 1 = the folders written before
        this contract, converted by :mod:`napari_hinge.upgrade`).
    config
        The dataclass serialised under ``"config"``.
    title
        How messages name the model (default: ``kind``).
    """

    kind: str
    version: int
    config: type
    title: str = ""

    @property
    def name(self) -> str:
        return self.title or self.kind

    # -- writing ---------------------------------------------------------------------------
    def save(self, directory: str | os.PathLike, config, tensors: dict, *,
             write_extra: Callable[[Path], None] | None = None,
             metadata: dict[str, str] | None = None) -> Path:
        """Write ``config.json`` + ``model.safetensors`` (+ what ``write_extra(tmp)`` adds to
        the temporary folder) and swap the folder in atomically."""
        from napari_hinge._files import atomic_write_dir

        def write(tmp: Path) -> None:
            if write_extra is not None:
                write_extra(tmp)
            self.write_into(tmp, config, tensors, metadata=metadata)

        return atomic_write_dir(directory, write)

    def write_into(self, folder: Path, config, tensors: dict, *,
                   metadata: dict[str, str] | None = None) -> None:
        """Write ``model.safetensors`` and then ``config.json`` into an existing (temporary)
        folder; :meth:`save` is the atomic way."""
        from safetensors.torch import save_file

        if not isinstance(config, self.config):
            raise TypeError(f"a {self.kind} folder stores a {self.config.__name__}, got "
                            f"{type(config).__name__}")
        # safetensors refuses shared or non-contiguous storage: independent CPU copies
        state = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
        save_file(state, str(folder / WEIGHTS_FILE), metadata={"kind": self.kind,
                                                               **(metadata or {})})
        envelope = {"kind": self.kind, "version": self.version,
                    "weights_sha256": file_sha256(folder / WEIGHTS_FILE),
                    "config": dataclasses.asdict(config)}
        (folder / CONFIG_FILE).write_text(json.dumps(envelope, indent=2))

    # -- reading ---------------------------------------------------------------------------
    def read_envelope(self, directory: str | os.PathLike) -> dict:
        """The checked ``config.json`` of a folder of this kind and version."""
        directory = Path(directory)
        if not directory.is_dir():
            raise FileNotFoundError(f"{self.name} model folder not found: {directory}")
        path = directory / CONFIG_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: {directory} is not a saved "
                                    f"{self.name} model")
        envelope = read_json(path)
        if not isinstance(envelope, dict) or "version" not in envelope:
            raise InputError(f"{directory} was saved by an earlier napari-hinge (model format "
                             f"1); {upgrade_hint(directory)}", path=directory)
        kind, version = envelope.get("kind"), envelope.get("version")
        if kind != self.kind:
            raise InputError(f"{directory} holds a {kind!r} model, not a {self.kind!r} model",
                             path=directory, field="kind")
        if version != self.version:
            later = isinstance(version, int) and version > self.version
            raise InputError(
                f"{directory}: {self.name} model format {version!r}; this napari-hinge reads "
                f"format {self.version}" + (" (the folder is from a newer release: update "
                                            "napari-hinge)" if later else
                                            f"; {upgrade_hint(directory)}"),
                path=directory, field="version")
        extra = sorted(set(envelope) - {"kind", "version", "weights_sha256", "config"})
        if extra:
            raise InputError(f"{path}: unknown key(s) {extra}", path=path, field=extra[0])
        return envelope

    def load(self, directory: str | os.PathLike, *, device: str = "cpu"):
        """``(config, tensors)`` of a saved folder, every check done (see the module doc)."""
        from napari_hinge.training import load_safetensors

        directory = Path(directory)
        envelope = self.read_envelope(directory)
        config = config_from_dict(self.config, envelope.get("config"),
                                  where=directory / CONFIG_FILE)
        weights = directory / WEIGHTS_FILE
        if not weights.is_file():
            raise FileNotFoundError(f"{weights} is missing: {directory} is not a saved "
                                    f"{self.name} model")
        recorded = envelope.get("weights_sha256")
        if recorded is not None and file_sha256(weights) != recorded:
            raise InputError(f"{weights} differs from the file saved with {directory}'s "
                             "config.json (digest mismatch: a truncated copy or a replaced "
                             "file); copy the whole folder again", path=weights)
        return config, load_safetensors(weights, device=str(device))
