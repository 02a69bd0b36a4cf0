"""`HqqDashboard`: quantization error over bits × group size (RTN vs HQQ), loss vs bits, and error histograms.

    from tinygpt.widgets import HqqDashboard
    dash = HqqDashboard(model, bits=(2, 3, 4, 8), group_sizes=(32, 64, 128))
    dash                      # displays in a notebook
    dash.grid.table("hqq")    # the state lives in the pure result objects

A thin layer over `tinygpt.surgery.hqq_error_grid` (relative error of every matrix at every grid point,
computed once) and `hqq_loss_curve` (validation loss with the whole model quantized, per bit width). The
controls only pick which of those results' figures are shown: the heatmap is `grid.figure(layer, target,
method=..., zmax=grid.max_error())` (one colour scale over every view), the curve `curve.figure()` and the
histogram `grid.histogram(...)`. The model is never modified.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import ipywidgets as W
import plotly.graph_objects as go

from tinygpt.inputs import progress_enabled
from tinygpt.surgery import HqqGridResult, HqqLossCurve, hqq_error_grid, hqq_loss_curve
from tinygpt.surgery.hqq import group_label

from .base import Dashboard, captured, heading, layer_dropdown, show_figure, update_figure

WINDOW_OPTIONS = ("ctx", "n_windows", "batch_size")  # options of the loss curve only (not of the error grid)


class HqqDashboard(Dashboard):
    """Heatmap of relative weight error (bits × group size) per matrix, RTN/HQQ toggle, loss vs bits, histogram.

    Attributes:
        grid (HqqGridResult): errors of every selected matrix over the grid.
        curve (HqqLossCurve | None): validation loss vs bits (None with `loss_curve=False`).
        widget (ipywidgets.VBox): the container; displaying the dashboard displays it.
        Controls: `method` (RTN/HQQ), `layer`, `target` (None = mean) for the heatmap; `hist_layer`,
        `hist_target`, `hist_bits`, `hist_group` for the histogram. Figures: `heatmap_fig`, `loss_fig`,
        `hist_fig` (plotly FigureWidgets); `output` (ipywidgets.Output) shows callback errors in a kernel.
    """

    def __init__(
        self,
        model,
        tokens_or_corpus: Any = None,
        bits: Sequence[int] = (2, 3, 4, 8),
        group_sizes: Sequence[int | None] = (32, 64, 128),
        targets: str | Sequence[str] = "all",
        layers: int | str | Sequence[int] | None = None,
        *,
        loss_group_size: int | str | None = "auto",
        loss_curve: bool = True,
        progress: bool | None = None,
        **options: Any,
    ):
        """
        Args:
            model: a `tinygpt.GPT`.
            tokens_or_corpus: validation data for the loss curve (see `tinygpt.surgery.hqq_loss_curve`).
            bits, group_sizes: the grid (group sizes that do not divide a matrix leave its cells empty).
            targets, layers: the matrices (see `tinygpt.surgery.hqq_`).
            loss_group_size: the group size of the loss-vs-bits curve (must divide every selected matrix;
                "auto": the largest of `group_sizes` that does, else whole rows).
            loss_curve: compute the loss curve (a forward pass per bit width and method).
            progress: tqdm progress bars (None: the package default).
            **options: HQQ's hyperparameters `p`, `beta`, `kappa`, `iters` (for the grid and the curve) and the
                validation windows `ctx`, `n_windows`, `batch_size` (for the curve); the library's defaults (see
                `tinygpt.surgery.hqq_error_grid` / `hqq_loss_curve`).
        """
        super().__init__()
        hq = {k: v for k, v in options.items() if k not in WINDOW_OPTIONS}
        progress = progress_enabled(progress)
        self.model = model
        with captured(self.output):  # in a kernel: progress bars and tracebacks of the construction
            self.grid: HqqGridResult = hqq_error_grid(
                model, bits, group_sizes, targets, layers, progress=progress, **hq
            )
            self.curve: HqqLossCurve | None = None
            if loss_curve:
                if loss_group_size == "auto":
                    loss_group_size = _largest_common_group(self.grid)
                self.curve = hqq_loss_curve(
                    model,
                    tokens_or_corpus,
                    self.grid.bits,
                    loss_group_size,
                    self.grid.targets,
                    self.grid.layers,
                    progress=progress,
                    **options,
                )
        g = self.grid

        # --- heatmap over bits x group size
        self.method = W.ToggleButtons(options=[("RTN", "rtn"), ("HQQ", "hqq")], value="hqq", description="method")
        self.layer = layer_dropdown(g.layers, extra=[("all layers (mean)", None)])
        self.target = W.Dropdown(
            options=[("all targets (mean)", None)] + [(t, t) for t in g.targets], description="target"
        )
        self.heatmap_fig = go.FigureWidget(self._heatmap())

        # --- loss vs bits
        self.loss_fig = go.FigureWidget(self.curve.figure() if self.curve is not None else None)

        # --- histogram of W - Ŵ for one matrix
        self.hist_layer = layer_dropdown(g.layers)
        self.hist_target = W.Dropdown(options=g.targets, description="target")
        self.hist_bits = W.Dropdown(
            options=[(f"{b}-bit", b) for b in g.bits], value=4 if 4 in g.bits else g.bits[0], description="bits"
        )
        self.hist_group = W.Dropdown(options=[(group_label(gs), gs) for gs in g.group_sizes], description="group")
        self.hist_status = self.status  # the dashboard's status line: the histogram's errors, or why it is empty
        self.hist_fig = go.FigureWidget([go.Bar(name="round-to-nearest"), go.Bar(name="HQQ")])  # until drawn

        self._observe(self._on_heatmap_control, self.method, self.layer, self.target)
        self._observe(self._update_histogram, self.hist_layer, self.hist_target, self.hist_bits, self.hist_group)
        self._layout(
            "Relative weight error ‖W − Ŵ‖ / ‖W‖ over bits × group size",
            W.HBox([self.method, self.layer, self.target]),
            self.heatmap_fig,
            heading("Validation loss vs bits (every selected matrix quantized)"),
            self.loss_fig,
            heading("Error histogram of one matrix"),
            W.HBox([self.hist_layer, self.hist_target, self.hist_bits, self.hist_group]),
            self.hist_status,
            self.hist_fig,
            self.output,
        )
        self._update_heatmap()
        self._update_histogram()

    # ------------------------------------------------------------------ views
    def _on_heatmap_control(self) -> None:
        self._update_heatmap()
        self._follow_selection()

    def _heatmap(self) -> go.Figure:
        """The grid's figure of the selected method, layer and target, on the grid's one colour scale."""
        return self.grid.figure(
            self.layer.value, self.target.value, method=self.method.value, zmax=self.grid.max_error()
        )

    def _update_heatmap(self) -> None:
        update_figure(self.heatmap_fig, self._heatmap())

    def _follow_selection(self) -> None:
        """A specific layer / target chosen for the heatmap is also shown in the histogram."""
        if self.layer.value is not None:
            self.hist_layer.value = self.layer.value
        if self.target.value is not None:
            self.hist_target.value = self.target.value

    def _update_histogram(self) -> None:
        layer, target = self.hist_layer.value, self.hist_target.value
        bits, group = self.hist_bits.value, self.hist_group.value
        title = f"W − Ŵ, layer {layer} {target}, {bits}-bit, group {group_label(group)}"
        weight = self.grid.weights.get((layer, target))
        problem = None
        if weight is None:  # e.g. attn.k_proj of a YOCO cross-decoder block
            problem = f"block {layer} has no {target}"
        elif group is not None and weight.shape[1] % group:
            problem = f"group size {group} does not divide in_features = {weight.shape[1]} of this matrix"
        if problem is not None:
            with self.hist_fig.batch_update():
                for trace in self.hist_fig.data:
                    trace.x, trace.y = [], []
                self.hist_fig.layout.title.text = title
            self.hist_status.value = problem
            return
        show_figure(self.hist_fig, self.grid.histogram(layer, target, bits, group))
        rtn, hqq = (self.grid.error(m, layer, target, bits, group) for m in ("rtn", "hqq"))
        self._say(f"relative error: round-to-nearest <b>{rtn:.4f}</b>, HQQ <b>{hqq:.4f}</b>", self.hist_status)

    def __repr__(self) -> str:
        return f"HqqDashboard({self.grid!r}, loss curve: {self.curve!r})"


def _largest_common_group(grid: HqqGridResult) -> int | None:
    """The largest group size of the grid that divides every matrix's in_features (None = whole rows)."""
    widths = {w.shape[1] for w in grid.weights.values()}
    fits = [g for g in grid.group_sizes if g is not None and all(n % g == 0 for n in widths)]
    return max(fits) if fits else None


__all__ = ["HqqDashboard"]
