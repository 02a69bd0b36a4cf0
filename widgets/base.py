"""`Dashboard`: what every dashboard shares (status line, output area, error reporting, figure updates, display).

A dashboard is a thin ipywidgets layer over library functions that return results: it builds its controls,
connects each one to an action (`self._observe(action, *controls)`, `self._on_click(button, action)`), and the
action calls a library function and draws the result's `.figure()` into a plotly `FigureWidget`
(`show_figure`; `update_figure` keeps the traces and updates them in place). The base class gives every action
the same frame:

- it runs inside the dashboard's `output` area (`captured`): progress bars and tracebacks appear under the
  controls in a kernel, instead of in JupyterLab's log console;
- errors of the kinds it names (bad input typed into a control) become a red message in a status line
  (`user_errors`) instead of a traceback; anything else propagates, so outside a kernel (tests) a broken
  callback fails the code that set the control.
"""

from __future__ import annotations

import contextlib
import html
from collections.abc import Callable, Iterator
from typing import Any

import ipywidgets as W
import plotly.graph_objects as go

Errors = tuple[type[BaseException], ...]


def show_figure(target: go.FigureWidget, fig: go.Figure) -> None:
    """Make the FigureWidget `target` show `fig`: its traces and layout replace the current ones.

    Replacing (rather than updating traces in place) never leaves a stale property behind, e.g. a `zmax`
    that one metric sets and the next does not.
    """
    with target.batch_update():
        target.data = ()
        target.add_traces(fig.data)
        target.layout = fig.layout


def update_figure(target: go.FigureWidget, fig: go.Figure) -> None:
    """Make the FigureWidget `target` show `fig` in place: when both have the same traces (type and name, in
    order) every property `fig` sets is copied into `target`'s traces and layout, so references to those
    traces stay valid and the browser keeps its zoom; otherwise the traces are replaced (`show_figure`).

    A property `fig` leaves unset keeps its old value: use it for figures drawn by one function (which sets
    the same properties every time), e.g. a result's `.figure(...)` for another selection.
    """
    if [(t.type, t.name) for t in target.data] != [(t.type, t.name) for t in fig.data]:
        show_figure(target, fig)
        return
    with target.batch_update():
        for old, new in zip(target.data, fig.data):
            old.update(new.to_plotly_json())
        target.layout.update(fig.layout.to_plotly_json())


def error_html(message: Any) -> str:
    """A red message for a dashboard's status line (`message` is text, escaped)."""
    return f"<span style='color:#b00020'>⚠ {html.escape(str(message))}</span>"


def status_html(message: str) -> str:
    """A grey message for a dashboard's status line (`message` is HTML)."""
    return f"<span style='color:#555'>{message}</span>"


def heading(text: str) -> W.HTML:
    """A section title of a dashboard."""
    return W.HTML(f"<h3 style='margin:4px 0'>{text}</h3>")


@contextlib.contextmanager
def user_errors(status: W.HTML, *kinds: type[BaseException]) -> Iterator[None]:
    """Show errors of the given kinds (bad input typed into a control) in `status` instead of raising.

    Anything else propagates: outside a kernel (tests) it fails the caller; in a kernel the dashboard's
    `Output` area (see `captured`) shows the traceback.
    """
    try:
        yield
    except kinds as e:
        status.value = error_html(e)


@contextlib.contextmanager
def captured(out: W.Output, *, clear: bool = True) -> Iterator[None]:
    """Run a callback inside the dashboard's `Output` area: progress bars (tqdm) and tracebacks appear there,
    under the controls, instead of in JupyterLab's log console. Outside a kernel `Output` captures nothing
    and exceptions propagate unchanged."""
    if clear and _in_kernel():
        out.clear_output()
    with out:
        yield


def _in_kernel() -> bool:
    try:
        from IPython import get_ipython
    except ImportError:  # pragma: no cover - IPython comes with ipywidgets
        return False
    ip = get_ipython()
    return ip is not None and getattr(ip, "kernel", None) is not None


def dropdown_value(widget: W.Dropdown, value: Any) -> None:
    """Set a Dropdown to `value` if it is one of its options' values (otherwise leave it)."""
    values = [o[1] if isinstance(o, tuple) else o for o in widget.options]
    if value in values:
        widget.value = value


def layer_dropdown(layers, description: str = "layer", *, label: Callable[[int], str] | None = None, extra=()):
    """A Dropdown over model layers: options "layer i" (or `label(i)`), after the (label, value) pairs `extra`."""
    label = label or (lambda i: f"layer {i}")
    return W.Dropdown(options=[*extra, *((label(i), i) for i in layers)], description=description)


class Dashboard:
    """The base of every dashboard.

    Attributes:
        status (ipywidgets.HTML): the status line (what was computed, or what is wrong with an input).
        output (ipywidgets.Output): progress bars and tracebacks of the callbacks, in a kernel.
        widget (ipywidgets.VBox): the container (`_layout` builds it); displaying the dashboard displays it.
    """

    def __init__(self) -> None:
        self.status = W.HTML()
        self.output = W.Output()
        self.widget = W.VBox()

    # ------------------------------------------------------------------ building
    def _layout(self, title: str | None, *children: W.Widget | None) -> W.VBox:
        """Set `widget` to a VBox of a heading (`title`, if any) and the children (None entries are left out)."""
        head = [heading(title)] if title else []
        self.widget = W.VBox(head + [c for c in children if c is not None])
        return self.widget

    def _observe(
        self, action: Callable[[], Any], *controls: W.Widget, errors: Errors = (), status: W.HTML | None = None
    ) -> None:
        """Run `action()` (see `_run`) whenever the value of one of `controls` changes."""
        handler = self._callback(action, errors=errors, status=status)
        for c in controls:
            c.observe(handler, names="value")

    def _on_click(
        self, button: W.Button, action: Callable[[], Any], *, errors: Errors = (), status: W.HTML | None = None
    ) -> None:
        """Run `action()` (see `_run`) when `button` is clicked."""
        button.on_click(self._callback(action, errors=errors, status=status))

    def _callback(
        self, action: Callable[[], Any], *, errors: Errors = (), status: W.HTML | None = None
    ) -> Callable[[Any], None]:
        """A widget callback (it ignores its argument) that runs `action()` (see `_run`)."""

        def handler(_change: Any = None) -> None:
            self._run(action, errors=errors, status=status)

        return handler

    def _run(self, action: Callable[[], Any], *, errors: Errors = (), status: W.HTML | None = None) -> Any:
        """`action()` inside the output area; errors of the kinds `errors` go to `status` (default the status
        line) instead of propagating. Returns what `action` returns (None after a reported error)."""
        with captured(self.output), self._reporting(*errors, status=status):
            return action()

    def _reporting(self, *errors: type[BaseException], status: W.HTML | None = None):
        """A context in which errors of the kinds `errors` go to `status` (default the status line) instead
        of propagating (for public methods that report bad input themselves, also when called from code)."""
        return user_errors(self.status if status is None else status, *errors)

    # ------------------------------------------------------------------ status line
    def _say(self, message: str, status: W.HTML | None = None) -> None:
        """A grey message (HTML) in the status line (or in `status`)."""
        (self.status if status is None else status).value = status_html(message)

    def _warn(self, message: Any, status: W.HTML | None = None) -> None:
        """A red message (text) in the status line (or in `status`)."""
        (self.status if status is None else status).value = error_html(message)

    # ------------------------------------------------------------------ display
    def _repr_mimebundle_(self, **kwargs: Any):
        return self.widget._repr_mimebundle_(**kwargs)


__all__ = [
    "Dashboard",
    "captured",
    "dropdown_value",
    "error_html",
    "heading",
    "layer_dropdown",
    "show_figure",
    "status_html",
    "update_figure",
    "user_errors",
]
