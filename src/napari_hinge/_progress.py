"""A tqdm bar fed with :class:`~napari_hinge.training.TrainEvent` records, shared by the
command line and the ``tl.*`` functions (``progress=True``). Torch-free."""

from __future__ import annotations

import sys


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
