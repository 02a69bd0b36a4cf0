"""Small helpers shared by the interpretability dashboards (not public API)."""

from __future__ import annotations

import contextlib
import html
from collections.abc import Iterator
from typing import Any

import ipywidgets as W
import plotly.graph_objects as go


def show_figure(target: go.FigureWidget, fig: go.Figure) -> None:
    """Make the FigureWidget `target` show `fig`: its traces and layout replace the current ones.

    Replacing (rather than updating traces in place) never leaves a stale property behind, e.g. a `zmax`
    that one metric sets and the next does not.
    """
    with target.batch_update():
        target.data = ()
        target.add_traces(fig.data)
        target.layout = fig.layout


def error_html(message: str) -> str:
    """A red message for a dashboard's status line."""
    return f"<span style='color:#b00020'>⚠ {html.escape(str(message))}</span>"


def status_html(message: str) -> str:
    """A grey message for a dashboard's status line (`message` is HTML)."""
    return f"<span style='color:#555'>{message}</span>"


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
