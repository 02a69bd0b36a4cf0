"""`HqqDashboard`: quantization error over bits × group size (RTN vs HQQ), loss vs bits, and error histograms.

    from tinygpt.widgets import HqqDashboard
    dash = HqqDashboard(model, bits=(2, 3, 4, 8), group_sizes=(32, 64, 128))
    dash                      # displays in a notebook
    dash.grid.table("hqq")    # the state lives in the pure result objects

A thin layer over `tinygpt.surgery.hqq_error_grid` (relative error of every matrix at every grid point,
computed once) and `hqq_loss_curve` (validation loss with the whole model quantized, per bit width). The
controls only pick which numbers of those results the figures show. The model is never modified.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import ipywidgets as W
import plotly.graph_objects as go

from tinygpt.surgery.common import LayerSpec, TargetSpec
from tinygpt.surgery.hqq import (
    HqqGridResult,
    HqqLossCurve,
    _group_label,
    _json_safe,
    _selection_label,
    hqq_error_grid,
    hqq_loss_curve,
)

from ._common import captured


class HqqDashboard:
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
        targets: TargetSpec = "all",
        layers: LayerSpec = None,
        *,
        loss_group_size: int | str | None = "auto",
        loss_curve: bool = True,
        p: float = 0.7,
        beta: float = 10.0,
        kappa: float = 1.01,
        iters: int = 20,
        ctx: int | None = None,
        n_windows: int = 16,
        batch_size: int = 8,
        progress: bool = True,
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
            p, beta, kappa, iters: HQQ hyperparameters.
            ctx, n_windows, batch_size: validation windows.
            progress: tqdm progress bars.
        """
        hq = {"p": p, "beta": beta, "kappa": kappa, "iters": iters}
        self.model = model
        self.output = W.Output()  # in a kernel: progress bars and tracebacks (of construction and callbacks)
        with captured(self.output):
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
                    ctx=ctx,
                    n_windows=n_windows,
                    batch_size=batch_size,
                    progress=progress,
                    **hq,
                )
        g = self.grid

        # --- heatmap over bits x group size
        self.method = W.ToggleButtons(options=[("RTN", "rtn"), ("HQQ", "hqq")], value="hqq", description="method")
        self.layer = W.Dropdown(
            options=[("all layers (mean)", None)] + [(f"layer {ly}", ly) for ly in g.layers], description="layer"
        )
        self.target = W.Dropdown(
            options=[("all targets (mean)", None)] + [(t, t) for t in g.targets], description="target"
        )
        cells = [r[k] for r in g.rows() for k in ("rtn_error", "hqq_error")]
        zmax = max((v for v in cells if v == v), default=1.0)  # one colour scale for every view; v == v drops NaN
        self.heatmap_fig = go.FigureWidget(
            go.Heatmap(
                z=_json_safe(g.table("hqq")),
                x=[_group_label(gs) for gs in g.group_sizes],
                y=[f"{b}-bit" for b in g.bits],
                zmin=0,
                zmax=zmax,
                colorscale="Viridis",
                texttemplate="%{z:.4f}",
                colorbar={"title": "rel. error"},
                hovertemplate="%{y}, group %{x}: %{z:.4f}<extra></extra>",
            )
        )
        self.heatmap_fig.update_xaxes(title_text="group size", type="category")
        self.heatmap_fig.update_yaxes(type="category")
        self.heatmap_fig.update_layout(template="plotly_white", height=360, margin={"t": 50, "b": 40})

        # --- loss vs bits
        self.loss_fig = go.FigureWidget(self.curve.figure() if self.curve is not None else None)

        # --- histogram of W - Ŵ for one matrix
        self.hist_layer = W.Dropdown(options=[(f"layer {ly}", ly) for ly in g.layers], description="layer")
        self.hist_target = W.Dropdown(options=g.targets, description="target")
        self.hist_bits = W.Dropdown(
            options=[(f"{b}-bit", b) for b in g.bits], value=4 if 4 in g.bits else g.bits[0], description="bits"
        )
        self.hist_group = W.Dropdown(options=[(_group_label(gs), gs) for gs in g.group_sizes], description="group")
        self.hist_status = W.HTML()
        self.hist_fig = go.FigureWidget([go.Bar(name="round-to-nearest", opacity=0.6), go.Bar(name="HQQ", opacity=0.6)])
        self.hist_fig.update_layout(
            barmode="overlay", bargap=0, xaxis_title="W − Ŵ", yaxis_title="weights", template="plotly_white", height=360
        )

        for w in (self.method, self.layer, self.target):
            w.observe(self._on_heatmap_control, names="value")
        for w in (self.hist_layer, self.hist_target, self.hist_bits, self.hist_group):
            w.observe(self._on_histogram_control, names="value")

        self.widget = W.VBox(
            [
                W.HTML("<h3 style='margin:4px 0'>Relative weight error ‖W − Ŵ‖ / ‖W‖ over bits × group size</h3>"),
                W.HBox([self.method, self.layer, self.target]),
                self.heatmap_fig,
                W.HTML("<h3 style='margin:4px 0'>Validation loss vs bits (every selected matrix quantized)</h3>"),
                self.loss_fig,
                W.HTML("<h3 style='margin:4px 0'>Error histogram of one matrix</h3>"),
                W.HBox([self.hist_layer, self.hist_target, self.hist_bits, self.hist_group]),
                self.hist_status,
                self.hist_fig,
                self.output,
            ]
        )
        self._update_heatmap()
        self._update_histogram()

    # ------------------------------------------------------------------ callbacks
    def _on_heatmap_control(self, _change: Any = None) -> None:
        with captured(self.output):
            self._update_heatmap()
            self._follow_selection()

    def _on_histogram_control(self, _change: Any = None) -> None:
        with captured(self.output):
            self._update_histogram()

    def _update_heatmap(self, _change: Any = None) -> None:
        m, layer, target = self.method.value, self.layer.value, self.target.value
        with self.heatmap_fig.batch_update():
            self.heatmap_fig.data[0].z = _json_safe(self.grid.table(m, layer, target))
            self.heatmap_fig.layout.title.text = f"{m.upper()}: {_selection_label(layer, target)}"

    def _follow_selection(self, _change: Any = None) -> None:
        """A specific layer / target chosen for the heatmap is also shown in the histogram."""
        if self.layer.value is not None:
            self.hist_layer.value = self.layer.value
        if self.target.value is not None:
            self.hist_target.value = self.target.value

    def _update_histogram(self, _change: Any = None) -> None:
        layer, target = self.hist_layer.value, self.hist_target.value
        bits, group = self.hist_bits.value, self.hist_group.value
        title = f"W − Ŵ, layer {layer} {target}, {bits}-bit, group {_group_label(group)}"
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
        h = self.grid.residual_histogram(layer, target, bits, group)
        with self.hist_fig.batch_update():
            for trace, m in zip(self.hist_fig.data, ("rtn", "hqq")):
                trace.x, trace.y = h["centers"], h[m]
            self.hist_fig.layout.title.text = title
        self.hist_status.value = (
            f"relative error: round-to-nearest <b>{h['rtn_error']:.4f}</b>, HQQ <b>{h['hqq_error']:.4f}</b>"
        )

    # ------------------------------------------------------------------ display
    def _repr_mimebundle_(self, **kwargs: Any):
        return self.widget._repr_mimebundle_(**kwargs)

    def __repr__(self) -> str:
        return f"HqqDashboard({self.grid!r}, loss curve: {self.curve!r})"


def _largest_common_group(grid: HqqGridResult) -> int | None:
    """The largest group size of the grid that divides every matrix's in_features (None = whole rows)."""
    widths = {w.shape[1] for w in grid.weights.values()}
    fits = [g for g in grid.group_sizes if g is not None and all(n % g == 0 for n in widths)]
    return max(fits) if fits else None


__all__ = ["HqqDashboard"]
