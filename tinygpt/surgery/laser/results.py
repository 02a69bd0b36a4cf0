"""What the LASER analyses return: sweeps, the greedy composition, spectra, before/after comparisons.

Each result holds plain lists (JSON-friendly) and draws itself with `.figure()` (plotly, imported lazily).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from tinygpt.surgery.laser.apply import LaserReport, laser, laser_
from tinygpt.surgery.laser.decompose import kept_rank
from tinygpt.surgery.targets import SurgeryError


@dataclass(frozen=True)
class Intervention:
    """One LASER intervention (ℓ, τ, ρ)."""

    layer: int
    target: str
    rank_fraction: float


@dataclass
class LaserSweepResult:
    """Validation loss of every single intervention (target, layer, ρ), and of the unmodified model.

    `losses[target][i][j]` is the loss with layer `layers[i]` reduced to fraction `fractions[j]`; NaN where
    block `layers[i]` has no such matrix (e.g. `attn.k_proj` in a YOCO cross-decoder block). Targets are
    concrete block-relative paths: on MoE models one per expert matrix ("moe.experts.2.fc_out").
    With a task `metric`, `metrics[target][i][j]` holds its value for the same intervention and `base_metric`
    its value on the unmodified model (both None without one).
    """

    base_loss: float
    targets: list[str]
    layers: list[int]
    fractions: list[float]
    losses: dict[str, list[list[float]]]
    n_tokens: int
    base_metric: float | None = None
    metrics: dict[str, list[list[float]]] | None = None

    def loss(self, target: str, layer: int, rank_fraction: float) -> float:
        return self.losses[target][self.layers.index(layer)][self.fractions.index(rank_fraction)]

    def swept(self) -> list[tuple[str, int, list[float]]]:
        """(target, layer, losses over `fractions`) of every matrix that was swept (blocks lacking one are left out)."""
        return [
            (t, layer, row)
            for t in self.targets
            for layer, row in zip(self.layers, self.losses[t])
            if not all(math.isnan(v) for v in row)
        ]

    def rows(self) -> list[dict[str, Any]]:
        """One dict per intervention: target, layer, rank_fraction, loss, delta (loss − base), and `metric`
        when the sweep had one."""
        out = []
        for t, layer, row in self.swept():
            for j, (f, v) in enumerate(zip(self.fractions, row)):
                r = {"target": t, "layer": layer, "rank_fraction": f, "loss": v, "delta": v - self.base_loss}
                if self.metrics is not None:
                    r["metric"] = self.metrics[t][self.layers.index(layer)][j]
                out.append(r)
        return out

    def best(self, target: str | None = None, layer: int | None = None, by: str = "loss") -> tuple[Intervention, float]:
        """The best intervention (optionally for one target and/or layer) and its score.

        Args:
            by: "loss" (the lowest validation loss) or "metric" (the highest task metric).
        """
        if by not in ("loss", "metric") or (by == "metric" and self.metrics is None):
            raise SurgeryError(f"by must be 'loss' or (for a sweep run with metric=) 'metric', got {by!r}")
        rows = [
            r
            for r in self.rows()
            if (target is None or r["target"] == target) and (layer is None or r["layer"] == layer)
        ]
        if not rows:
            raise SurgeryError(f"no sweep results for target={target!r}, layer={layer!r}")
        r = min(rows, key=lambda r: r["loss"]) if by == "loss" else max(rows, key=lambda r: r["metric"])
        return Intervention(r["layer"], r["target"], r["rank_fraction"]), r[by]

    def figure(self):
        """Plotly figure: loss-vs-ρ curves (one per target and layer) and a heatmap of loss − base."""
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots

        fig = make_subplots(
            rows=1,
            cols=2,
            column_widths=[0.5, 0.5],
            horizontal_spacing=0.14,
            subplot_titles=("validation loss vs ρ (rank kept)", "loss − base"),
        )
        swept = self.swept()
        for t, layer, row in swept:
            fig.add_trace(
                go.Scatter(
                    x=self.fractions,
                    y=row,
                    mode="lines+markers",
                    name=f"L{layer} {t}",
                    legendgroup=t,
                    hovertemplate="ρ=%{x}<br>loss=%{y:.4f}",
                ),
                1,
                1,
            )
        fig.add_hline(y=self.base_loss, line_dash="dash", annotation_text="base", row=1, col=1)
        fig.update_xaxes(type="log", title_text="ρ (fraction of rank kept)", row=1, col=1)
        fig.update_yaxes(title_text="loss", row=1, col=1)
        labels = [f"L{layer} {t}" for t, layer, _ in swept]
        z = [[v - self.base_loss for v in row] for _, _, row in swept]
        big = max((abs(v) for row in z for v in row), default=1.0) or 1.0
        fig.add_trace(
            go.Heatmap(
                z=z,
                x=[str(f) for f in self.fractions],
                y=labels,
                colorscale="RdBu_r",
                zmid=0,
                zmin=-big,
                zmax=big,
                colorbar={  # horizontal, under the heatmap: a vertical one collides with the legend
                    "title": {"text": "Δloss", "side": "top"},
                    "orientation": "h",
                    "x": 0.785,
                    "xanchor": "center",
                    "y": -0.28,
                    "yanchor": "top",
                    "len": 0.4,
                    "thickness": 12,
                },
                hovertemplate="%{y} ρ=%{x}<br>Δloss=%{z:.4f}<extra></extra>",
            ),
            1,
            2,
        )
        fig.update_xaxes(title_text="ρ", type="category", row=1, col=2)
        fig.update_yaxes(autorange="reversed", row=1, col=2)
        fig.update_layout(
            title=f"LASER sweep (base loss {self.base_loss:.4f}, {self.n_tokens:,} tokens)",
            height=max(450, 18 * len(labels) + 200),
            margin={"b": 140},
        )
        return fig

    def __repr__(self) -> str:
        (iv, loss) = self.best()
        return (
            f"LaserSweepResult(base_loss={self.base_loss:.4f}, {len(self.targets)} targets x "
            f"{len(self.layers)} layers x {len(self.fractions)} fractions; best {iv} -> {loss:.4f})"
        )


@dataclass
class LaserGreedyResult:
    """Greedy composition: the interventions kept and the trace of every decision."""

    base_loss: float
    loss: float
    interventions: list[Intervention]
    steps: list[dict[str, Any]]

    def apply(self, model, *, factored: bool = False) -> list[LaserReport]:
        """Apply the kept interventions to `model` in place."""
        return [laser_(model, iv.target, [iv.layer], iv.rank_fraction, factored=factored) for iv in self.interventions]

    @contextlib.contextmanager
    def applied(self, model, *, factored: bool = False) -> Iterator[list[LaserReport]]:
        """Context manager version of `apply` (restores the model exactly)."""
        with contextlib.ExitStack() as stack:
            yield [
                stack.enter_context(laser(model, iv.target, [iv.layer], iv.rank_fraction, factored=factored))
                for iv in self.interventions
            ]

    def figure(self):
        """Plotly figure: the validation loss after each decision (kept ones marked), from the base loss."""
        import plotly.graph_objects as go

        labels = [f"L{st['layer']} {st['target']} ρ={st['rank_fraction']}" for st in self.steps]
        kept = [st["kept"] for st in self.steps]
        fig = go.Figure()
        fig.add_trace(
            go.Scatter(
                x=labels,
                y=[st["loss_after"] for st in self.steps],
                mode="markers",
                name="best ρ tried",
                marker={"color": ["seagreen" if k else "lightgray" for k in kept], "size": 10},
            )
        )
        current = [self.base_loss]
        for st in self.steps:
            current.append(st["loss_after"] if st["kept"] else current[-1])
        fig.add_trace(go.Scatter(x=labels, y=current[1:], mode="lines", name="loss kept", line={"shape": "hv"}))
        fig.add_hline(y=self.base_loss, line_dash="dash", annotation_text=f"base {self.base_loss:.4f}")
        fig.update_layout(
            title=f"LASER greedy: {self.base_loss:.4f} → {self.loss:.4f} ({len(self.interventions)} kept)",
            yaxis_title="validation loss",
            template="plotly_white",
            height=400,
        )
        return fig

    def __repr__(self) -> str:
        ivs = ", ".join(f"(L{i.layer} {i.target} ρ={i.rank_fraction})" for i in self.interventions) or "none"
        return f"LaserGreedyResult(base_loss={self.base_loss:.4f} -> loss={self.loss:.4f}; kept {ivs})"


@dataclass
class SpectrumResult:
    """Singular values of the selected matrices, largest first.

    `spectra[target][i]` holds the σ of `blocks.{layers[i]}.{target}` (min(out, in) values; an empty list
    where that block has no such matrix, e.g. `attn.k_proj` in a YOCO cross-decoder block); `shapes[target]`
    is that matrix's [out, in]. Targets are concrete block-relative paths: on MoE models one per expert
    matrix ("moe.experts.2.fc_in"). Keeping the first r = floor(ρ · min(out, in)) values is what LASER at
    fraction ρ does, so the figures put ρ-like x coordinates (i + 1) / min(out, in) on the x axis.
    """

    targets: list[str]
    layers: list[int]
    spectra: dict[str, list[list[float]]]
    shapes: dict[str, tuple[int, int]]

    def spectrum(self, target: str, layer: int) -> list[float]:
        """σ of one matrix, descending."""
        return self.spectra[target][self.layers.index(layer)]

    def layers_of(self, target: str) -> list[int]:
        """The layers whose block has `target`."""
        return [ly for ly, s in zip(self.layers, self.spectra[target]) if s]

    def rank_fractions(self, target: str) -> list[float]:
        """x coordinates of the spectrum of `target`: (i + 1) / min(out, in) for i = 0 .. min(out, in) − 1."""
        k = min(self.shapes[target])
        return [(i + 1) / k for i in range(k)]

    def energy_kept(self, target: str, layer: int, rank_fraction: float) -> float:
        """Σ_{i<r} σ_i² / Σ σ_i² at LASER fraction ρ (= 1 − relative Frobenius error²)."""
        values = self.spectrum(target, layer)
        if not values:
            raise SurgeryError(
                f"block {layer} has no {target} (the spectra hold it for layers {self.layers_of(target)})"
            )
        s = torch.tensor(values, dtype=torch.float64)
        total = float((s**2).sum())
        if total == 0.0:
            return 1.0
        r = kept_rank(self.shapes[target], rank_fraction)
        return float((s[:r] ** 2).sum()) / total

    def traces(self, layer: int | None = None, target: str | None = None, normalize: bool = False) -> list[dict]:
        """Line data for plotting: one dict (name, x, y) per target of `layer`, or per layer of `target`.

        A matrix the block does not have gives empty x and y (so the lines keep their positions).
        """
        if (layer is None) == (target is None):
            raise SurgeryError("give exactly one of layer (one line per target) and target (one line per layer)")
        pairs = [(t, layer) for t in self.targets] if layer is not None else [(target, ly) for ly in self.layers]
        out = []
        for t, ly in pairs:
            s = self.spectrum(t, ly)
            top = s[0] if s and s[0] > 0 else 1.0
            y = [v / top for v in s] if normalize else list(s)
            x = self.rank_fractions(t) if s else []
            out.append({"name": t if layer is not None else f"layer {ly}", "x": x, "y": y})
        return out

    def figure(self, layer: int | None = None, normalize: bool = False):
        """Plotly figure of the spectra (log–log).

        Args:
            layer: one panel with a line per target for this layer; None: one panel per target with a line
                per layer.
            normalize: divide each spectrum by its largest singular value.
        """
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots

        ylabel = "σ / σ_max" if normalize else "singular value σ"
        if layer is not None:
            fig = go.Figure()
            for tr in self.traces(layer=layer, normalize=normalize):
                fig.add_trace(go.Scatter(x=tr["x"], y=tr["y"], mode="lines", name=tr["name"]))
            fig.update_layout(title=f"singular values, layer {layer}")
            fig.update_xaxes(type="log", title_text="(i + 1) / min(out, in)  (ρ keeping σ_i)")
            fig.update_yaxes(type="log", title_text=ylabel)
        else:
            n = len(self.targets)
            cols = min(n, 3)
            rows = -(-n // cols)
            fig = make_subplots(rows=rows, cols=cols, subplot_titles=self.targets)
            for k, t in enumerate(self.targets):
                r, c = k // cols + 1, k % cols + 1
                for j, tr in enumerate(self.traces(target=t, normalize=normalize)):
                    fig.add_trace(
                        go.Scatter(
                            x=tr["x"],
                            y=tr["y"],
                            mode="lines",
                            name=tr["name"],
                            legendgroup=tr["name"],
                            showlegend=k == 0,
                            line={"color": _palette(j)},
                        ),
                        r,
                        c,
                    )
                fig.update_xaxes(type="log", row=r, col=c)
                fig.update_yaxes(type="log", row=r, col=c)
            fig.update_yaxes(title_text=ylabel, col=1)
            fig.update_layout(title="singular values per layer", height=320 * rows + 80)
        fig.update_layout(template="plotly_white", hovermode="x unified")
        return fig

    def __repr__(self) -> str:
        return f"SpectrumResult({len(self.targets)} targets x {len(self.layers)} layers: {self.targets})"


def _palette(i: int) -> str:
    import plotly.colors

    colors = plotly.colors.qualitative.Plotly
    return colors[i % len(colors)]


@dataclass
class LaserComparison:
    """One intervention previewed: validation loss and a seeded sample, before and after."""

    intervention: Intervention
    loss_before: float
    loss_after: float
    prompt: str
    sample_before: str
    sample_after: str
    report: LaserReport
    n_tokens: int

    @property
    def delta(self) -> float:
        """loss_after − loss_before (negative: the intervention helps)."""
        return self.loss_after - self.loss_before

    def to_html(self) -> str:
        """An HTML summary: the losses and the two samples side by side."""
        import html

        iv, entries = self.intervention, self.report.entries
        pre = "white-space:pre-wrap;font-family:monospace;font-size:12px;margin:0"
        if len(entries) == 1:
            e = entries[0]
            what = f"rank {e.rank_before} → {e.rank_kept}, relative error {e.rel_error:.4f}"
        else:  # e.g. mlp.fc_in of a MoE block: every expert's matrix
            err = sum(e.rel_error for e in entries) / len(entries)
            what = f"{len(entries)} matrices, rank kept {entries[0].rank_kept}, mean relative error {err:.4f}"

        def col(title: str, text: str) -> str:
            return f"<div style='flex:1;min-width:0'><b>{title}</b><pre style='{pre}'>{html.escape(text)}</pre></div>"

        return (
            f"<div><b>layer {iv.layer} {iv.target}, ρ = {iv.rank_fraction}</b> ({what})<br>validation loss "
            f"{self.loss_before:.4f} → "
            f"{self.loss_after:.4f} (Δ {self.delta:+.4f}, {self.n_tokens:,} tokens)</div>"
            f"<div style='display:flex;gap:16px'>{col('before', self.sample_before)}"
            f"{col('after', self.sample_after)}</div>"
        )

    def _repr_html_(self) -> str:
        return self.to_html()

    def figure(self):
        """Plotly bar chart of the validation loss before and after the intervention."""
        import plotly.graph_objects as go

        iv = self.intervention
        fig = go.Figure(
            go.Bar(
                x=["before", "after"],
                y=[self.loss_before, self.loss_after],
                text=[f"{self.loss_before:.4f}", f"{self.loss_after:.4f}"],
            )
        )
        fig.update_layout(
            title=f"layer {iv.layer} {iv.target}, ρ = {iv.rank_fraction}: Δ {self.delta:+.4f}",
            yaxis_title="validation loss",
            template="plotly_white",
            height=340,
        )
        return fig

    def __str__(self) -> str:
        iv = self.intervention
        return (
            f"LASER layer {iv.layer} {iv.target} ρ={iv.rank_fraction}: loss {self.loss_before:.4f} -> "
            f"{self.loss_after:.4f} ({self.delta:+.4f})\n"
            f"--- before\n{self.sample_before}\n--- after\n{self.sample_after}"
        )
