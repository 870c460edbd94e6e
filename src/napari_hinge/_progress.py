"""Progress events and the tqdm bar fed with them, shared by the command line, the widgets
and the ``tl.*`` functions (``progress=True``). Torch-free."""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class ProgressEvent:
    """One progress record of a long job: a trainer (where it is also called ``TrainEvent``)
    or an inference job (prediction over a slide, tile synthesis).

    ``kind`` is 'step' (after a unit of work: an optimiser step, a batch), 'epoch' (training
    only: the end of an epoch, with validation figures when computed), 'stopped' (a stop
    request was honoured) or 'done' (the job finished; ``metrics`` holds its summary).
    ``step`` counts the units done (1 after the first), of ``total_steps``. ``epoch`` counts
    from 1 in training and is None for inference jobs (see :mod:`napari_hinge.training`).
    """

    kind: str
    epoch: int | None
    step: int
    total_steps: int
    loss: float | None = None
    val_loss: float | None = None
    metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def fraction(self) -> float:
        return min(1.0, self.step / max(1, self.total_steps))

    @property
    def is_training(self) -> bool:
        return self.epoch is not None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class EventBar:
    """A progress bar on stderr that advances with each event's ``step`` of ``total_steps``
    and shows the loss (and validation loss) as its postfix.

    Call it with every event (it is a valid ``on_event`` / ``progress`` callback); the bar
    opens on the first event and closes on :meth:`close` or at the end of a ``with`` block.
    """

    def __init__(self, desc: str, *, unit: str = "step") -> None:
        self.desc, self.unit = desc, unit
        self._bar = None

    def __call__(self, event) -> None:
        from tqdm.auto import tqdm

        if self._bar is None:
            self._bar = tqdm(total=event.total_steps, desc=self.desc, unit=self.unit,
                             file=sys.stderr, dynamic_ncols=True)
        self._bar.n = min(event.step, event.total_steps)
        postfix = {}
        if event.epoch is not None:  # training
            postfix["epoch"] = event.epoch
        if event.loss is not None:
            postfix["loss"] = f"{event.loss:.4f}"
        if event.val_loss is not None:
            postfix["val"] = f"{event.val_loss:.4f}"
        self._bar.set_postfix(postfix, refresh=False)
        self._bar.refresh()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> EventBar:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
