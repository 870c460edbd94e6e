"""What every trainer in the package shares: progress events, stop requests,
seeding, RNG capture and atomic checkpoints.

Trainers are generators: they ``yield`` a :class:`TrainEvent` after every
optimisation step and at the end of every epoch, and check ``stop.requested``
between steps. The command line prints the events with a progress bar; the
napari widgets run the generator in a ``thread_worker`` and forward them to a
progress bar and a loss plot. Cancelling never leaves a half-written file: the
last good checkpoint stays on disk.
"""

from __future__ import annotations

import os
import random
import re
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from napari_hinge._files import atomic_write  # the one implementation; kept importable here
from napari_hinge.errors import InputError


@dataclass
class TrainEvent:
    """One progress record.

    ``kind`` is 'step' (after an optimiser step), 'epoch' (end of epoch, with
    validation figures when computed), 'stopped' (a stop request was honoured)
    or 'done' (the run finished; ``metrics`` holds the final summary).
    """

    kind: str
    epoch: int
    step: int
    total_steps: int
    loss: float | None = None
    val_loss: float | None = None
    metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def fraction(self) -> float:
        return min(1.0, self.step / max(1, self.total_steps))

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


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
