"""What every trainer in the package shares: progress events, stop requests,
seeding, RNG capture, the device rule and atomic checkpoints that resume exactly.

The trainer contract (HINGE, STMGAC, the C2L models):

- Trainers are generators: they ``yield`` a :class:`ProgressEvent` (``TrainEvent``) after
  every optimisation step ('step') and at the end of every epoch ('epoch'; for the
  step-based C2L trainers an epoch is one ``eval_every`` round), check ``stop.requested``
  between steps ('stopped') and end with 'done'; the generator's return value is the model.
- Numbering: ``epoch`` counts from 1 (the epoch being run, or just finished), ``step`` is
  the number of optimiser steps done so far (the first 'step' event has ``step == 1``),
  ``total_steps`` their total.
- Checkpoints: ``checkpoint_dir/last.pt`` (:data:`CHECKPOINT_FILE`), written atomically.
  ``resume=True`` continues it exactly (the same weights as an uninterrupted run); it needs
  the file (FileNotFoundError), and a checkpoint written with other settings (another model,
  data, split, seed or optimiser setting) is refused with an InputError naming them. Only the
  run's length (:data:`EXTENDABLE`: ``epochs``/``steps``) may grow on a resume: the run goes
  on to the new length along the same trajectory. Without ``resume`` an existing checkpoint is
  never overwritten (FileExistsError).
  :func:`open_checkpoint` is the one implementation.
- Device: ``device=None`` takes CUDA, then Apple MPS, then the CPU
  (:func:`napari_hinge.device.default_device`); every CLI has ``--device``.

The command line prints the events with a progress bar; the napari widgets run the generator
in a ``thread_worker`` and forward them to a progress bar and a loss plot. Cancelling never
leaves a half-written file: the last good checkpoint stays on disk.
"""

from __future__ import annotations

import os
import random
import re
import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch

from napari_hinge._files import atomic_write  # the one implementation; kept importable here
from napari_hinge._progress import ProgressEvent
from napari_hinge.errors import InputError

#: the name trainers give the event (the same type inference jobs yield)
TrainEvent = ProgressEvent
CHECKPOINT_FILE = "last.pt"
#: settings a resume may change: the run's length (a longer run starts the same way)
EXTENDABLE = ("epochs", "steps")


class StopToken:
    """A thread-safe stop request, shared by a caller and a running trainer."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def request(self) -> None:
        self._event.set()

    @property
    def requested(self) -> bool:
        return self._event.is_set()


def run_to_end(gen, on_event=None):
    """Drive a trainer (any TrainEvent generator) to its end, calling ``on_event(event)``
    for each event; return ``(the generator's return value, the last event)``."""
    last = None
    while True:
        try:
            last = next(gen)
        except StopIteration as done:
            return done.value, last
        if on_event is not None:
            on_event(last)


def seed_everything(seed: int) -> int:
    """Seed Python, NumPy and torch; return the seed so callers can record it."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    return seed


def rng_state() -> dict[str, Any]:
    """Capture every RNG the trainers use, for checkpoints that resume exactly."""
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


_NUMPY_TAG = "__numpy_array__"


def _to_plain(obj: Any) -> Any:
    """Rewrite ``obj`` into what ``torch.load(weights_only=True)`` accepts: tensors,
    containers, str and numbers. NumPy arrays become tagged tensors so that they
    come back as arrays of the same dtype; NumPy scalars and paths become Python ones."""
    if isinstance(obj, np.ndarray):
        data = torch.from_numpy(obj.astype(np.int64) if obj.dtype == np.uint32 else obj.copy())
        return {_NUMPY_TAG: data, "dtype": str(obj.dtype)}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, dict):
        return type(obj)((k, _to_plain(v)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_plain(v) for v in obj)
    return obj


def _from_plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        if _NUMPY_TAG in obj:
            return obj[_NUMPY_TAG].numpy().astype(obj["dtype"])
        return type(obj)((k, _from_plain(v)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(_from_plain(v) for v in obj)
    return obj


def open_checkpoint(checkpoint_dir: str | os.PathLike | None, *, resume: bool,
                    settings: dict[str, Any]) -> tuple[Path | None, dict[str, Any] | None]:
    """The trainer contract's checkpoint rules: ``(checkpoint path or None, the checkpoint
    to resume from or None)``.

    ``settings`` are what a run's trajectory depends on (model config, data split, seed,
    length, optimiser settings); :func:`save_checkpoint` callers store them under
    ``'settings'`` and a resume compares them key by key.
    """
    path = Path(checkpoint_dir) / CHECKPOINT_FILE if checkpoint_dir is not None else None
    if resume and path is None:
        raise ValueError("resume=True needs checkpoint_dir")
    if not resume:
        if path is not None and path.exists():
            raise FileExistsError(f"{path} exists; pass resume=True (--resume) to continue "
                                  "that run or choose another checkpoint folder")
        return path, None
    if not path.is_file():
        raise FileNotFoundError(f"cannot resume: {path} does not exist")
    state = load_checkpoint(path)
    saved = state.get("settings")
    if not isinstance(saved, dict):
        raise InputError(f"{path}: a checkpoint without its run settings (written by an "
                         "earlier napari-hinge); it cannot be resumed exactly", path=path)
    differ = [k for k in sorted(set(saved) | set(settings)) if k not in EXTENDABLE
              and _comparable(saved.get(k)) != _comparable(settings.get(k))]
    if differ:
        shown = "; ".join(f"{k}: checkpoint {_short(saved.get(k))}, now {_short(settings.get(k))}"
                          for k in differ[:6])
        raise InputError(f"{path} was written by a run with other settings ({shown}); resume "
                         "with the same ones or start a new checkpoint folder", path=path,
                         field=differ[0])
    return path, state


def data_fingerprint(*arrays) -> str:
    """SHA-256 over arrays' dtypes, shapes and bytes: a run's settings name its data by it,
    so a resume on other data is refused."""
    import hashlib

    h = hashlib.sha256()
    for a in arrays:
        t = a.detach().cpu().numpy() if torch.is_tensor(a) else np.asarray(a)
        t = np.ascontiguousarray(t)
        h.update(f"{t.dtype}:{t.shape};".encode())
        h.update(t.view(np.uint8).reshape(-1).data if t.size else b"")
    return h.hexdigest()


def _comparable(value: Any) -> Any:
    """Settings as plain nested lists/dicts (tuples and arrays compare as lists)."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if torch.is_tensor(value):
        return value.tolist()
    if isinstance(value, dict):
        return {k: _comparable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_comparable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def _short(value: Any) -> str:
    text = repr(_comparable(value))
    return text if len(text) <= 60 else text[:57] + "..."


def save_checkpoint(path: str | os.PathLike, payload: dict[str, Any]) -> Path:
    """Atomically ``torch.save`` a checkpoint dict (model, optimiser, epoch, RNG...),
    in a form that loads with ``weights_only=True``."""
    plain = _to_plain(payload)
    return atomic_write(path, lambda tmp: torch.save(plain, tmp))


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`. Only tensors, containers,
    strings and numbers are unpickled (``weights_only=True``): a crafted file cannot
    run code, it is refused with its name."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # re-raised with the file name
        raise InputError(
            f"checkpoint {path} is unreadable, corrupt or holds more than tensors and "
            f"plain values (refused without running it: {_unpickle_reason(exc)})",
            path=path) from exc
    return _from_plain(raw)


def _unpickle_reason(exc: BaseException) -> str:
    # torch's message spans lines and advises weights_only=False: keep only the cause
    text = str(exc)
    m = re.search(r"WeightsUnpickler error: (.*?)(?: was not an allowed| Please|\n|$)", text)
    if m:
        return m.group(1).strip()
    return text.strip().splitlines()[0] if text.strip() else type(exc).__name__


def load_safetensors(path: str | os.PathLike, *, device: str = "cpu") -> dict[str, torch.Tensor]:
    """``safetensors.torch.load_file`` with an error that names the file (safetensors never
    runs code; its own error says only what broke in the header)."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist")
    try:
        return load_file(str(path), device=device)
    except Exception as exc:  # SafetensorError, OSError, ...: not weights
        raise InputError(f"{path}: not a readable safetensors weights file ({exc})",
                         path=path) from exc
