"""Viewer-level touches shared by the dock widgets: docks as tabs, a µm scale bar, a title
for the colorbar of coloured spots. Qt and napari only; nothing here that the core needs."""

from __future__ import annotations

from qtpy.QtCore import QEvent, QObject, QTimer
from qtpy.QtWidgets import QDockWidget, QLabel, QMainWindow

PLUGIN_PACKAGE = "napari_hinge"


def show_scale_bar(viewer) -> None:
    """A scale bar; napari (>= 0.6) takes its unit from the layers, which this plugin puts in
    µm when the pixel size is known."""
    viewer.scale_bar.visible = True


def title_colorbar(viewer, text: str) -> None:
    """Name what the colorbar shows (napari's colorbar has no title of its own): a text
    overlay in the same corner."""
    overlay = viewer.text_overlay
    overlay.text = text
    overlay.position = "top_right"
    overlay.font_size = 10
    overlay.visible = bool(text)


def _dock_of(widget) -> QDockWidget | None:
    parent = widget.parent()
    while parent is not None and not isinstance(parent, QDockWidget):
        parent = parent.parent()
    return parent


def _inner(dock: QDockWidget):
    return dock.inner_widget() if hasattr(dock, "inner_widget") else dock.widget()


def _is_ours(dock: QDockWidget) -> bool:
    return type(_inner(dock)).__module__.startswith(PLUGIN_PACKAGE)


def tabify_plugin_docks(window: QMainWindow, show: QDockWidget | None = None) -> None:
    """Stack every napari-hinge dock of ``window`` as tabs of the first one, so four docks
    fit a 1080 px screen instead of making the window ~2,200 px tall, and bring ``show`` to
    the front. Each tab shows the widget's short ``tab_title`` (napari titles a dock "Menu
    name (napari-hinge)", and four of those side by side are cut to "Sl…", "Predict
    express…")."""
    docks = [d for d in window.findChildren(QDockWidget)
             if d.parent() is window and not d.isFloating() and _is_ours(d)]
    for dock in docks:
        # the tab shows the dock's window title; napari's own title bar keeps the full name
        title = getattr(_inner(dock), "tab_title", None)
        if title:
            title = title.replace("&", "&&")  # a tab reads '&' as a shortcut marker
            if dock.windowTitle() != title:
                dock.setWindowTitle(title)
    if len(docks) < 2:
        return
    first, area = docks[0], window.dockWidgetArea(docks[0])
    tabbed = set(window.tabifiedDockWidgets(first))
    for dock in docks[1:]:
        if dock not in tabbed and window.dockWidgetArea(dock) == area:
            window.tabifyDockWidget(first, dock)
    if show is not None:
        show.raise_()


class _DockWatcher(QObject):
    """Tabifies napari-hinge docks as they are added to the main window (also those whose
    widget does not call :func:`dock_as_tab`)."""

    def __init__(self, window: QMainWindow) -> None:
        super().__init__(window)
        self.window = window

    def eventFilter(self, obj, event) -> bool:
        if event.type() == QEvent.Type.ChildAdded and isinstance(event.child(), QDockWidget):
            # the dock is filled and shown after it is added: tabify once Qt is idle (a bound
            # slot, so a window closed meanwhile cancels it)
            QTimer.singleShot(0, self._tabify)
        return False

    def _tabify(self) -> None:
        tabify_plugin_docks(self.window)


def fit_title(dock: QDockWidget) -> None:
    """Widen ``dock`` until napari's title bar shows its name in full ("Spatial domains
    (STMGAC) (napari-hinge" lost its last characters in a 356 px dock)."""
    bar = dock.titleBarWidget()
    if bar is None:
        return
    short = max((label.sizeHint().width() - label.width() for label in bar.findChildren(QLabel)
                 if label.isVisible()), default=0)
    if short > 0:
        dock.setMinimumWidth(dock.width() + short)


def dock_as_tab(widget, viewer=None) -> None:
    """Call from a dock widget's first ``showEvent``: tabify it with the other napari-hinge
    docks and keep doing so for docks opened later; with ``viewer``, re-fit the view to the
    canvas the new dock left (else the tissue sits half under it)."""
    dock = _dock_of(widget)
    if dock is None or not isinstance(dock.parent(), QMainWindow):
        return
    window = dock.parent()
    if window.findChild(_DockWatcher) is None:
        window.installEventFilter(_DockWatcher(window))
    tabify_plugin_docks(window, show=dock)  # the dock just opened is the one shown
    QTimer.singleShot(0, lambda: fit_title(dock))  # once Qt has laid the title bar out
    if viewer is not None and len(viewer.layers):
        QTimer.singleShot(0, viewer.reset_view)  # once Qt has resized the canvas


class TabbedDock:
    """Mixin for the plugin's dock widgets (put it before the Qt base): on the widget's first
    show, :func:`dock_as_tab` with its ``self.viewer``; ``tab_title`` names its tab."""

    _docked = False
    tab_title: str | None = None

    def showEvent(self, event) -> None:
        super().showEvent(event)
        if not self._docked:
            self._docked = True
            dock_as_tab(self, self.viewer)
