"""`TrainingDashboard`: live train / validation loss and learning rate while `tinygpt.train` runs.

    from tinygpt.widgets import TrainingDashboard
    dash = TrainingDashboard()
    dash                                             # display it first (in its own cell or with display())
    result = tinygpt.train(model, steps=2000, callbacks=[dash.callback])

`dash.callback` receives each step's metrics dict (`step, loss, lr, ...`, plus `val_loss` on validation steps)
and appends it to `dash.history`. The figure is redrawn at most every `min_interval` seconds and on every
validation step (sending the whole history to the browser after every step would slow training down);
`dash.flush()` draws whatever is pending, and reading `dash.figure` flushes first, so its traces always equal
the history.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from typing import Any

import ipywidgets as W
import plotly.graph_objects as go
from plotly.subplots import make_subplots


def ema(values: Iterable[float], smoothing: float) -> list[float]:
    """Bias-corrected exponential moving average (TensorBoard's smoothing): `smoothing` in [0, 1), 0 = raw."""
    out, acc, weight = [], 0.0, 0.0
    for v in values:
        acc = smoothing * acc + (1 - smoothing) * v
        weight = smoothing * weight + (1 - smoothing)
        out.append(acc / weight)
    return out


class TrainingDashboard:
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
        self.status = W.HTML("<i>waiting for the first training step…</i>")

        fig = make_subplots(rows=2, cols=1, shared_xaxes=True, row_heights=[0.72, 0.28], vertical_spacing=0.06)
        fig.add_trace(
            go.Scatter(name="train loss", mode="lines", line={"color": "rgba(31,119,180,0.3)", "width": 1}),
            row=1,
            col=1,
        )
        fig.add_trace(
            go.Scatter(name="train loss (smoothed)", mode="lines", line={"color": "#1f77b4", "width": 2}), row=1, col=1
        )
        fig.add_trace(
            go.Scatter(name="val loss", mode="lines+markers", line={"color": "#d62728", "width": 2}), row=1, col=1
        )
        fig.add_trace(go.Scatter(name="learning rate", mode="lines", line={"color": "#2ca02c"}), row=2, col=1)
        fig.update_yaxes(title_text="loss", row=1, col=1)
        fig.update_yaxes(title_text="lr", exponentformat="e", row=2, col=1)
        fig.update_xaxes(title_text="step", row=2, col=1)
        fig.update_layout(
            title=title or "training", template="plotly_white", height=460, margin={"t": 50, "b": 40}, hovermode="x"
        )
        self.fig = go.FigureWidget(fig)

        self.smoothing.observe(self._on_view, names="value")
        self.log_y.observe(self._on_view, names="value")

        self.widget = W.VBox([W.HBox([self.progress, self.smoothing, self.log_y]), self.status, self.fig])

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
    def series(self) -> dict[str, tuple[list, list]]:
        """(x, y) of every trace, computed from `history` and the view controls."""
        h = self.history
        steps = [r["step"] for r in h]
        loss = [r["loss"] for r in h]
        val = [(r["step"], r["val_loss"]) for r in h if r.get("val_loss") is not None]
        return {
            "train loss": (steps, loss),
            "train loss (smoothed)": (steps, ema(loss, self.smoothing.value)),
            "val loss": ([s for s, _ in val], [v for _, v in val]),
            "learning rate": (steps, [r.get("lr") for r in h]),
        }

    def _draw(self) -> None:
        series = self.series()
        with self.fig.batch_update():
            for trace in self.fig.data:
                trace.x, trace.y = series[trace.name]
            self.fig.layout.yaxis.type = "log" if self.log_y.value else "linear"
        if not self.history:
            self.status.value = "<i>waiting for the first training step…</i>"
            return
        r = self.history[-1]
        if self.steps:
            self.progress.value = min(int(r["step"]), self.steps)
        vals = series["val loss"][1]
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

    def _on_view(self, _change: Any = None) -> None:
        self._drawn = len(self.history)
        self._draw()

    # ------------------------------------------------------------------ display
    def _repr_mimebundle_(self, **kwargs: Any):
        self.flush()
        return self.widget._repr_mimebundle_(**kwargs)

    def __repr__(self) -> str:
        last = f", last step {self.history[-1]['step']}" if self.history else ""
        return f"TrainingDashboard({len(self.history)} steps recorded{last})"


__all__ = ["TrainingDashboard", "ema"]
