"""`TrainingDashboard`: live train / validation loss and learning rate while `tinygpt.train` runs.

    from tinygpt.widgets import TrainingDashboard
    dash = TrainingDashboard()
    dash                                             # display it first (in its own cell or with display())
    result = tinygpt.train(model, steps=2000, callbacks=[dash.callback])

`dash.callback` receives each step's metrics dict (`step, loss, lr, ...`, plus `val_loss` on validation steps)
and appends it to `dash.history`. The figure is the one `TrainResult.figure(smoothing=, log_y=)` draws for that
history (what `result.figure()` shows once the run is over), updated in place. It is redrawn at most every
`min_interval` seconds and on every validation step (sending the whole history to the browser after every step
would slow training down); `dash.flush()` draws whatever is pending, and reading `dash.figure` flushes first, so
its traces always equal the history.
"""

from __future__ import annotations

import math
import time
from typing import Any

import ipywidgets as W
import plotly.graph_objects as go

from tinygpt.training import TrainResult
from tinygpt.training.curves import ema

from .base import Dashboard, update_figure

WAITING = "<i>waiting for the first training step…</i>"


class TrainingDashboard(Dashboard):
    """Train loss (raw and smoothed), validation loss and learning rate, updated live from `train()`'s callbacks.

    Attributes:
        history (list[dict]): every metrics dict received, in order.
        widget (ipywidgets.VBox): the container; displaying the dashboard displays it.
        Controls: `smoothing` (FloatSlider, EMA of the train loss), `log_y` (Checkbox, log-scale losses);
        outputs: `fig` (plotly FigureWidget: row 1 losses, row 2 learning rate), `status` (HTML).
    """

    def __init__(self, *, steps: int | None = None, min_interval: float = 0.5, smoothing: float = 0.6, title=None):
        """
        Args:
            steps: the run's total steps, if known (shows a progress bar and flushes at the last step).
            min_interval: seconds between figure updates (validation steps always update).
            smoothing: initial EMA smoothing of the train-loss line (0 = none).
            title: the figure title.
        """
        super().__init__()
        self.history: list[dict[str, Any]] = []
        self.steps = steps
        self.min_interval = float(min_interval)
        self._last_draw = -math.inf
        self._drawn = 0  # len(history) at the last draw
        self.n_draws = 0

        self.smoothing = W.FloatSlider(
            value=smoothing, min=0.0, max=0.99, step=0.01, description="smoothing", continuous_update=False
        )
        self.log_y = W.Checkbox(value=False, description="log-scale loss", indent=False)
        self.progress = W.IntProgress(value=0, min=0, max=steps or 1, description="step", layout={"width": "40%"})
        self.progress.layout.display = None if steps else "none"
        self.status.value = WAITING
        self.title = title
        self.fig = go.FigureWidget(self._figure())

        self._observe(self._redraw, self.smoothing, self.log_y)
        self._layout(None, W.HBox([self.progress, self.smoothing, self.log_y]), self.status, self.output, self.fig)

    # ------------------------------------------------------------------ feeding
    def callback(self, metrics: dict[str, Any]) -> None:
        """Record one step's metrics (pass as `train(..., callbacks=[dash.callback])`); redraws when due."""
        self.history.append(dict(metrics))
        now = time.monotonic()
        last = self.steps is not None and metrics.get("step") == self.steps
        if "val_loss" in metrics or last or now - self._last_draw >= self.min_interval:
            self.flush()

    __call__ = callback

    def reset(self) -> None:
        """Forget the history (e.g. before another run) and clear the figure."""
        self.history.clear()
        self._drawn = -1
        self.flush()

    def flush(self) -> None:
        """Draw every recorded step now."""
        self._last_draw = time.monotonic()
        if self._drawn == len(self.history):
            return
        self._drawn = len(self.history)
        self.n_draws += 1
        self._draw()

    @property
    def figure(self) -> go.FigureWidget:
        """The live figure, flushed: its traces equal `history`."""
        self.flush()
        return self.fig

    # ------------------------------------------------------------------ drawing
    def result(self) -> TrainResult:
        """The history so far as a `TrainResult` (no model): what the figure draws."""
        return TrainResult(model=None, config=None, history=list(self.history))

    def _figure(self) -> go.Figure:
        return self.result().figure(smoothing=self.smoothing.value, log_y=self.log_y.value, title=self.title)

    def series(self) -> dict[str, tuple[list, list]]:
        """(x, y) of every trace, by trace name, computed from `history` and the view controls."""
        return {t.name: (list(t.x), list(t.y)) for t in self._figure().data}

    def _draw(self) -> None:
        update_figure(self.fig, self._figure())
        if not self.history:
            self.status.value = WAITING
            return
        r = self.history[-1]
        if self.steps:
            self.progress.value = min(int(r["step"]), self.steps)
        vals = [h["val_loss"] for h in self.history if h.get("val_loss") is not None]
        parts = [f"step <b>{r['step']}</b>", f"loss <b>{r['loss']:.4f}</b>"]
        if vals:
            parts.append(f"val loss <b>{vals[-1]:.4f}</b> (best {min(vals):.4f})")
        if r.get("lr") is not None:
            parts.append(f"lr {r['lr']:.2e}")
        if r.get("tokens_per_sec"):
            parts.append(f"{r['tokens_per_sec']:,.0f} tok/s")
        if r.get("elapsed") is not None:
            parts.append(f"{r['elapsed']:.1f} s")
        self.status.value = " · ".join(parts)

    def _redraw(self) -> None:
        """A view control changed: redraw the history as it is."""
        self._drawn = len(self.history)
        self._draw()

    # ------------------------------------------------------------------ display
    def _repr_mimebundle_(self, **kwargs: Any):
        self.flush()
        return super()._repr_mimebundle_(**kwargs)

    def __repr__(self) -> str:
        last = f", last step {self.history[-1]['step']}" if self.history else ""
        return f"TrainingDashboard({len(self.history)} steps recorded{last})"


__all__ = ["TrainingDashboard", "ema"]
