"""What the HQQ analyses return: the error grid over bits × group size, and validation loss against bits.

Each result holds plain lists (JSON-friendly) and draws itself with `.figure()` (plotly, imported lazily).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from tinygpt.surgery.hqq.quantize import QuantizedTensor, hqq_quantize, quantize_rtn
from tinygpt.surgery.restore import one_thread
from tinygpt.surgery.targets import SurgeryError

METHODS = ("rtn", "hqq")  # the two quantizers every grid and curve compares


def _check_method(method: str) -> str:
    if method not in METHODS:
        raise SurgeryError(f"method must be 'rtn' or 'hqq', got {method!r}")
    return method


def _nanmean(values: list[float]) -> float:
    vals = [v for v in values if not math.isnan(v)]
    return sum(vals) / len(vals) if vals else math.nan


@dataclass
class HqqGridResult:
    """Relative Frobenius error ||W − Ŵ||_F / ||W||_F of every selected matrix, for RTN and HQQ, over a grid.

    `rtn[target][i][j][k]` (and `hqq[...]`) is the error of `blocks.{layers[i]}.{target}` at `bits[j]` and
    `group_sizes[k]`; NaN where that group size does not divide the matrix's in_features. The weights are
    kept (fp32 copies on the CPU, `weights[(layer, target)]`) so residuals can be recomputed for histograms.
    """

    targets: list[str]
    layers: list[int]
    bits: list[int]
    group_sizes: list[int | None]
    rtn: dict[str, list[list[list[float]]]]
    hqq: dict[str, list[list[list[float]]]]
    hqq_params: dict[str, Any] = field(default_factory=dict)
    weights: dict[tuple[int, str], Tensor] = field(default_factory=dict, repr=False)

    def _values(self, method: str) -> dict[str, list[list[list[float]]]]:
        return self.rtn if _check_method(method) == "rtn" else self.hqq

    def error(self, method: str, layer: int, target: str, bits: int, group_size: int | None) -> float:
        """The relative error of one matrix at one grid point."""
        return self._values(method)[target][self.layers.index(layer)][self.bits.index(bits)][
            self.group_sizes.index(group_size)
        ]

    def table(self, method: str = "hqq", layer: int | None = None, target: str | None = None) -> list[list[float]]:
        """[bits][group_size] errors of one matrix, or the mean over the matrices matching `layer` / `target`
        (None = all layers / all targets; NaN cells are left out of the mean)."""
        vals = self._values(method)
        tgts = self.targets if target is None else [target]
        lays = self.layers if layer is None else [layer]
        for t in tgts:
            if t not in self.targets:
                raise SurgeryError(f"target {t!r} is not in this grid ({', '.join(self.targets)})")
        for ly in lays:
            if ly not in self.layers:
                raise SurgeryError(f"layer {ly!r} is not in this grid ({self.layers})")
        return [
            [
                _nanmean([vals[t][self.layers.index(ly)][j][k] for t in tgts for ly in lays])
                for k in range(len(self.group_sizes))
            ]
            for j in range(len(self.bits))
        ]

    def rows(self) -> list[dict[str, Any]]:
        """One dict per (layer, target, bits, group_size): rtn_error, hqq_error."""
        return [
            {
                "layer": ly,
                "target": t,
                "bits": b,
                "group_size": g,
                "rtn_error": self.rtn[t][i][j][k],
                "hqq_error": self.hqq[t][i][j][k],
            }
            for t in self.targets
            for i, ly in enumerate(self.layers)
            for j, b in enumerate(self.bits)
            for k, g in enumerate(self.group_sizes)
        ]

    def quantized(
        self, layer: int, target: str, bits: int, group_size: int | None, method: str = "hqq"
    ) -> QuantizedTensor:
        """Quantize the stored copy of one matrix again (the same result as during the sweep)."""
        W = self._weight(layer, target)
        if _check_method(method) == "rtn":
            return quantize_rtn(W, bits, group_size)
        return hqq_quantize(W, bits, group_size, **self.hqq_params)

    def residual(self, layer: int, target: str, bits: int, group_size: int | None, method: str = "hqq") -> Tensor:
        """W − Ŵ [out, in] of one matrix."""
        return self._weight(layer, target) - self.quantized(layer, target, bits, group_size, method).dequantize()

    def residual_histogram(
        self, layer: int, target: str, bits: int, group_size: int | None, n_bins: int = 81
    ) -> dict[str, Any]:
        """Histogram counts of W − Ŵ for RTN and HQQ over shared bins.

        Returns:
            {"edges": [n_bins + 1], "centers": [n_bins], "rtn": counts [n_bins], "hqq": counts [n_bins],
             "rtn_error": float, "hqq_error": float}
        """
        with one_thread():
            res = {m: self.residual(layer, target, bits, group_size, m).flatten() for m in METHODS}
        big = max(float(r.abs().max()) for r in res.values()) or 1e-12
        edges = torch.linspace(-big, big, n_bins + 1, dtype=torch.float64)
        out: dict[str, Any] = {"edges": edges.tolist(), "centers": ((edges[1:] + edges[:-1]) / 2).tolist()}
        for m, r in res.items():
            out[m] = torch.histc(r.double(), bins=n_bins, min=-big, max=big).long().tolist()
            out[f"{m}_error"] = self.error(m, layer, target, bits, group_size)
        return out

    def _weight(self, layer: int, target: str) -> Tensor:
        if (layer, target) not in self.weights:
            raise SurgeryError(
                f"no stored weight for layer {layer} {target}; this grid holds layers {self.layers} and "
                f"targets {self.targets}"
            )
        return self.weights[(layer, target)]

    def max_error(self) -> float:
        """The largest error of the grid, over every matrix, grid point and method (1.0 if every cell is empty):
        a colour scale that stays fixed whatever `figure` shows."""
        return max((v for r in self.rows() for v in (r["rtn_error"], r["hqq_error"]) if not math.isnan(v)), default=1.0)

    def figure(
        self,
        layer: int | None = None,
        target: str | None = None,
        *,
        method: str | None = None,
        zmax: float | None = None,
    ):
        """Heatmaps of the error over bits × group size, for one matrix or the mean over a selection.

        Args:
            layer, target: one matrix, or None for the mean over every layer / target (see `table`).
            method: None = RTN and HQQ side by side; "rtn" or "hqq" = that method alone, titled
                "RTN: <selection>" / "HQQ: <selection>" (e.g. "HQQ: layer 1 mlp.fc_in").
            zmax: the top of the colour scale (default: the largest cell shown; `max_error()` keeps one scale
                over the whole grid).
        """
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots

        methods = METHODS if method is None else (_check_method(method),)
        tables = {m: self.table(m, layer, target) for m in methods}
        if zmax is None:
            zmax = max((v for t in tables.values() for row in t for v in row if not math.isnan(v)), default=1.0)
        selection = selection_label(layer, target)
        heat = {
            "x": [group_label(g) for g in self.group_sizes],
            "y": [f"{b}-bit" for b in self.bits],
            "zmin": 0,
            "zmax": zmax,
            "colorscale": "Viridis",
            "colorbar": {"title": "rel. error"},
        }
        if method is not None:
            fig = go.Figure(
                go.Heatmap(
                    z=_json_safe(tables[method]),
                    texttemplate="%{z:.4f}",
                    hovertemplate="%{y}, group %{x}: %{z:.4f}<extra></extra>",
                    **heat,
                )
            )
            fig.update_xaxes(title_text="group size", type="category")
            fig.update_yaxes(type="category")
            fig.update_layout(
                title=f"{method.upper()}: {selection}", template="plotly_white", height=360, margin={"t": 50, "b": 40}
            )
            return fig
        fig = make_subplots(rows=1, cols=2, subplot_titles=("round-to-nearest", "HQQ"), horizontal_spacing=0.08)
        for c, m in enumerate(METHODS, start=1):
            fig.add_trace(
                go.Heatmap(
                    z=_json_safe(tables[m]),
                    texttemplate="%{z:.3f}",
                    showscale=c == 2,
                    hovertemplate=f"{m.upper()} %{{y}}, group %{{x}}: %{{z:.4f}}<extra></extra>",
                    **heat,
                ),
                1,
                c,
            )
            fig.update_xaxes(title_text="group size", type="category", row=1, col=c)
            fig.update_yaxes(type="category", row=1, col=c)
        fig.update_layout(title=f"relative weight error ‖W − Ŵ‖/‖W‖: {selection}", template="plotly_white", height=380)
        return fig

    def layer_figure(self, bits: int, group_size: int | None, method: str = "hqq"):
        """Heatmap of the error of every matrix (layers × targets) at one (bits, group size)."""
        import plotly.graph_objects as go

        j, k = self.bits.index(bits), self.group_sizes.index(group_size)
        vals = self._values(method)
        z = [[vals[t][i][j][k] for t in self.targets] for i in range(len(self.layers))]
        fig = go.Figure(
            go.Heatmap(
                z=_json_safe(z),
                x=self.targets,
                y=[f"layer {ly}" for ly in self.layers],
                colorscale="Viridis",
                texttemplate="%{z:.3f}",
                colorbar={"title": "rel. error"},
            )
        )
        fig.update_yaxes(autorange="reversed", type="category")
        fig.update_layout(
            title=f"{method.upper()} {bits}-bit, group {group_label(group_size)}: relative error per matrix",
            template="plotly_white",
            height=max(300, 40 * len(self.layers) + 150),
        )
        return fig

    def histogram(self, layer: int, target: str, bits: int, group_size: int | None, n_bins: int = 81):
        """Histogram of W − Ŵ for RTN and HQQ of one matrix (shared bins, overlaid)."""
        import plotly.graph_objects as go

        h = self.residual_histogram(layer, target, bits, group_size, n_bins)
        fig = go.Figure()
        for m, name in (("rtn", "round-to-nearest"), ("hqq", "HQQ")):
            fig.add_trace(
                go.Bar(x=h["centers"], y=h[m], name=f"{name} (rel. error {h[f'{m}_error']:.4f})", opacity=0.6)
            )
        fig.update_layout(
            barmode="overlay",
            bargap=0,
            title=f"W − Ŵ, layer {layer} {target}, {bits}-bit, group {group_label(group_size)}",
            xaxis_title="W − Ŵ",
            yaxis_title="weights",
            template="plotly_white",
            height=380,
        )
        return fig

    def __repr__(self) -> str:
        return (
            f"HqqGridResult({len(self.layers)} layers x {len(self.targets)} targets, bits {self.bits}, "
            f"group sizes {self.group_sizes})"
        )


def group_label(g: int | None) -> str:
    """How figures and dashboards name a group size: its number, or "row" for None (one group per row)."""
    return "row" if g is None else str(g)


def selection_label(layer: int | None, target: str | None) -> str:
    """How figures name a selection of matrices: "layer 1 mlp.fc_in", "mean over all matrices", ..."""
    if layer is not None and target is not None:
        return f"layer {layer} {target}"
    if layer is None and target is None:
        return "mean over all matrices"
    return f"mean over {'all layers' if layer is None else f'layer {layer}'}, {target or 'all targets'}"


def _json_safe(table: list[list[float]]) -> list[list[float | None]]:
    """NaN -> None (JSON has no NaN; plotly leaves such cells empty)."""
    return [[None if math.isnan(v) else v for v in row] for row in table]


@dataclass
class HqqLossCurve:
    """Validation loss with every selected matrix quantized, per bit width, for RTN and HQQ.

    `rtn[j]` / `hqq[j]` is the loss at `bits[j]`; `rtn_error[j]` / `hqq_error[j]` the mean relative weight
    error over the quantized matrices.
    """

    base_loss: float
    bits: list[int]
    group_size: int | None
    rtn: list[float]
    hqq: list[float]
    rtn_error: list[float]
    hqq_error: list[float]
    targets: list[str]
    layers: list[int]
    n_tokens: int

    def rows(self) -> list[dict[str, Any]]:
        return [
            {"bits": b, "rtn_loss": r, "hqq_loss": h, "rtn_error": re, "hqq_error": he}
            for b, r, h, re, he in zip(self.bits, self.rtn, self.hqq, self.rtn_error, self.hqq_error)
        ]

    def figure(self):
        """Validation loss vs bits (RTN and HQQ) with the unquantized loss as a dashed line."""
        import plotly.graph_objects as go

        fig = go.Figure()
        for name, ys in (("round-to-nearest", self.rtn), ("HQQ", self.hqq)):
            fig.add_trace(go.Scatter(x=self.bits, y=ys, mode="lines+markers", name=name))
        fig.add_hline(y=self.base_loss, line_dash="dash", annotation_text=f"fp32 {self.base_loss:.4f}")
        fig.update_xaxes(title_text="bits", tickvals=self.bits)
        fig.update_yaxes(title_text="validation loss")
        fig.update_layout(
            title=f"validation loss vs bits (group {group_label(self.group_size)}, {self.n_tokens:,} tokens)",
            template="plotly_white",
            height=380,
        )
        return fig

    def __repr__(self) -> str:
        pts = ", ".join(f"{b}b {r:.3f}/{h:.3f}" for b, r, h in zip(self.bits, self.rtn, self.hqq))
        return f"HqqLossCurve(base {self.base_loss:.4f}; RTN/HQQ: {pts})"


__all__ = ["HqqGridResult", "HqqLossCurve", "group_label", "selection_label"]
