"""The training curves every `TrainResult` draws (and the live `TrainingDashboard` with it): losses above, the
learning rate below.

    fig = result.figure(smoothing=0.9, log_y=True)        # = training_figure(result.history, ...)

Plotly is imported when a figure is drawn.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from tinygpt.errors import TinyGPTValueError

TRACES = ("train loss", "train loss (smoothed)", "val loss", "lr")  # the figure's traces, in order


def ema(values: Iterable[float], smoothing: float) -> list[float]:
    """Bias-corrected exponential moving average (TensorBoard's smoothing): `smoothing` in [0, 1), 0 = raw."""
    if not 0.0 <= smoothing < 1.0:
        raise TinyGPTValueError(f"smoothing must be in [0, 1), got {smoothing}")
    out, acc, weight = [], 0.0, 0.0
    for v in values:
        acc = smoothing * acc + (1 - smoothing) * v
        weight = smoothing * weight + (1 - smoothing)
        out.append(acc / weight)
    return out


def training_figure(
    history: Sequence[dict[str, Any]], *, smoothing: float = 0.6, log_y: bool = False, title: str | None = None
):
    """Two rows over the step: the losses (train loss raw and smoothed, validation loss) above, the learning
    rate below. The four traces (`TRACES`) are always there, empty when the history has no such values.

    Args:
        history: one metrics dict per step (`step`, `loss`, `lr`, and `val_loss` on validation steps).
        smoothing: the smoothed train-loss line's EMA factor (`ema`; 0 = the raw loss).
        log_y: a log-scale loss axis.
        title: the figure's title (default "training").
    """
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    trained = [h for h in history if "loss" in h]
    steps, loss = [h["step"] for h in trained], [h["loss"] for h in trained]
    val = [(h["step"], h["val_loss"]) for h in history if h.get("val_loss") is not None]
    with_lr = [h for h in history if h.get("lr") is not None]
    series = {
        "train loss": (steps, loss, "lines", {"color": "rgba(31,119,180,0.3)", "width": 1}, 1),
        "train loss (smoothed)": (steps, ema(loss, smoothing), "lines", {"color": "#1f77b4", "width": 2}, 1),
        "val loss": ([s for s, _ in val], [v for _, v in val], "lines+markers", {"color": "#d62728", "width": 2}, 1),
        "lr": ([h["step"] for h in with_lr], [h["lr"] for h in with_lr], "lines", {"color": "#2ca02c"}, 2),
    }
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, row_heights=[0.72, 0.28], vertical_spacing=0.06)
    for name in TRACES:
        x, y, mode, line, row = series[name]
        fig.add_trace(go.Scatter(x=x, y=y, name=name, mode=mode, line=line, showlegend=bool(x)), row=row, col=1)
    fig.update_yaxes(title_text="loss", type="log" if log_y else "linear", row=1, col=1)
    fig.update_yaxes(title_text="learning rate", exponentformat="e", row=2, col=1)
    fig.update_xaxes(title_text="step", row=2, col=1)
    fig.update_layout(
        title=title or "training", template="plotly_white", height=460, margin={"t": 50, "b": 40}, hovermode="x"
    )
    return fig


__all__ = ["TRACES", "ema", "training_figure"]
