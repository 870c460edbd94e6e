"""One background-job panel shared by every widget that trains or predicts.

The core yields :class:`~napari_hinge._progress.ProgressEvent` records (trainers and
inference jobs alike) from a generator and
returns its result; this panel runs that generator in a napari ``thread_worker``, shows a
determinate progress bar, a status line and (optionally) a live loss / validation curve,
and cancels through a :class:`~napari_hinge.training.StopToken`: the core stops at its next
step, keeps its last good checkpoint, and no half-made result reaches the viewer.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from typing import Any

from qtpy.QtCore import Signal
from qtpy.QtWidgets import QHBoxLayout, QLabel, QProgressBar, QPushButton, QVBoxLayout, QWidget

from napari_hinge._progress import ProgressEvent
from napari_hinge.training import StopToken

Job = Callable[[StopToken], Generator[ProgressEvent, None, Any]]


def _drive(job: Job, stop: StopToken):
    """A generator *function* around ``job``: napari picks a GeneratorWorker (with
    ``yielded``) only for those, and ``job`` is often a lambda returning a generator."""
    return (yield from job(stop))


class LossPlot(QWidget):
    """Training loss per step and validation loss per epoch, redrawn at most per epoch."""

    def __init__(self) -> None:
        super().__init__()
        from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
        from matplotlib.figure import Figure

        self.figure = Figure(figsize=(3.2, 2.0), tight_layout=True)
        self.canvas = FigureCanvasQTAgg(self.figure)
        self.axes = self.figure.add_subplot(111)
        QVBoxLayout(self).addWidget(self.canvas)
        self.setMinimumHeight(160)
        self._stale = False
        self.clear()

    def clear(self) -> None:
        self.steps: list[tuple[float, float]] = []
        self.epochs: list[tuple[float, float]] = []
        self._draw()

    def add(self, event: ProgressEvent) -> None:
        x = event.step
        if event.kind == "step" and event.loss is not None:
            self.steps.append((x, event.loss))
        if event.kind == "epoch":
            if event.val_loss is not None:
                self.epochs.append((x, event.val_loss))
            self._draw()

    def _draw(self) -> None:
        ax = self.axes
        ax.clear()
        if self.steps:
            ax.plot(*zip(*self.steps, strict=True), lw=0.8, label="train")
        if self.epochs:
            ax.plot(*zip(*self.epochs, strict=True), "o-", ms=3, label="validation")
        if self.steps or self.epochs:
            ax.legend(fontsize=7)
        ax.set_xlabel("step", fontsize=7)
        ax.set_ylabel("loss", fontsize=7)
        ax.tick_params(labelsize=7)
        if self.isVisible():
            self.canvas.draw_idle()
        else:
            # drawn when shown: a draw queued for a widget that is never shown can run after
            # Python has collected it ("FigureCanvasQTAgg has been deleted")
            self._stale = True

    def showEvent(self, event) -> None:
        super().showEvent(event)
        if self._stale:
            self._stale = False
            self.canvas.draw_idle()


class JobPanel(QWidget):
    """Progress bar + status + Cancel (+ loss plot) for one job at a time."""

    #: emitted with the job's return value when it finishes without being cancelled
    succeeded = Signal(object)
    #: emitted with the exception when the job fails
    failed = Signal(object)
    #: emitted when the job has ended, whichever way (done, cancelled or failed)
    ended = Signal()
    #: emitted with ``event.metrics['preview']`` when an event carries a partial result
    #: (a map to paint in place while the job refines it)
    partial = Signal(object)

    def __init__(self, *, plot: bool = False) -> None:
        super().__init__()
        self.progress = QProgressBar()
        self.progress.setRange(0, 1000)
        self.status = QLabel("")
        self.status.setWordWrap(True)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setToolTip("stop at the next step (a training keeps its last "
                                      "checkpoint; your data stay as they were)")
        self.cancel_button.setEnabled(False)  # until a job runs
        self.cancel_button.clicked.connect(self.cancel)
        self.plot = LossPlot() if plot else None
        row = QHBoxLayout()
        row.addWidget(self.progress)
        row.addWidget(self.cancel_button)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addLayout(row)
        layout.addWidget(self.status)
        if self.plot is not None:
            layout.addWidget(self.plot)
        self.worker = None
        self.stop: StopToken | None = None
        self.last_event: ProgressEvent | None = None
        self.shown_partial = False

    @property
    def running(self) -> bool:
        return self.worker is not None

    def run(self, job: Job, *, description: str = "working"):
        """Start ``job(stop_token)`` in a worker thread; returns the worker."""
        from napari.qt.threading import create_worker

        if self.running:
            raise RuntimeError("a job is already running in this panel")
        self.stop = StopToken()
        self.last_event = None
        self.shown_partial = False
        self.progress.setValue(0)
        self.status.setText(f"{description}…")
        if self.plot is not None:
            self.plot.clear()
        worker = create_worker(_drive, job, self.stop, _start_thread=False)
        worker.yielded.connect(self._on_event)
        worker.returned.connect(self._on_returned)
        worker.errored.connect(self._on_error)
        worker.finished.connect(self._on_finished)
        self.worker = worker
        self.cancel_button.setEnabled(True)
        worker.start()
        return worker

    def cancel(self) -> None:
        if self.stop is not None:
            self.stop.request()
            self.status.setText("cancelling at the next step…")
            self.cancel_button.setEnabled(False)

    # -- slots (GUI thread) ---------------------------------------------------------------
    def _on_event(self, event) -> None:
        if not isinstance(event, ProgressEvent):
            return
        self.last_event = event
        self.progress.setValue(int(1000 * event.fraction))
        if event.metrics.get("preview") is not None:
            self.shown_partial = True
            self.partial.emit(event.metrics["preview"])
        parts = [f"step {event.step}/{event.total_steps}"]
        if event.is_training:
            parts.insert(0, f"epoch {event.epoch}")
        if event.loss is not None:
            parts.append(f"loss {event.loss:.4g}")
        if event.val_loss is not None:
            parts.append(f"val {event.val_loss:.4g}")
        parts += [f"{v:,.0f} s" if k == "seconds" else f"{k} {v:.3g}"  # not "1.12e+03"
                  for k, v in event.metrics.items() if isinstance(v, float)]
        if event.kind == "stopped":
            parts = ["cancelled; last checkpoint kept"]
        self.status.setText(" · ".join(parts))
        if self.plot is not None:
            self.plot.add(event)

    def _on_returned(self, result) -> None:
        if self.stop is not None and self.stop.requested:
            self.status.setText("cancelled: what is painted so far is kept"
                                if self.shown_partial else "cancelled: nothing was added")
            return
        self.progress.setValue(1000)
        self.succeeded.emit(result)

    def _on_error(self, exc) -> None:
        self.status.setText(f"failed: {exc}")
        self.failed.emit(exc)

    def _on_finished(self) -> None:
        self.worker = None
        self.cancel_button.setEnabled(False)
        self.ended.emit()
