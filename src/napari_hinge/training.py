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
import tempfile
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch


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


def atomic_write(path: str | os.PathLike, write) -> Path:
    """Call ``write(tmp_path)`` then rename onto ``path``: a crash or a cancel
    never leaves a truncated file where a good one was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def save_checkpoint(path: str | os.PathLike, payload: dict[str, Any]) -> Path:
    """Atomically ``torch.save`` a checkpoint dict (model, optimiser, epoch, RNG...)."""
    return atomic_write(path, lambda tmp: torch.save(payload, tmp))


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        # RNG states hold numpy arrays and tuples, so full unpickling is needed;
        # checkpoints are the user's own files written by save_checkpoint.
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # re-raised with the file name
        raise ValueError(f"checkpoint {path} is unreadable or corrupt: {exc}") from exc
