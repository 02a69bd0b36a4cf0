"""Ablation sweeps: every (layer, component) -- and every head -- ablated one at a time, and the loss increase.

sweep = ablation_sweep(model, val, modes=("zero", "mean"), heads=True)
sweep.top(5); sweep.delta("head", "mean"); sweep.figure()
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor

from tinygpt.inputs import as_tokens, eval_mode, progress_enabled
from tinygpt.interp.ablation.context import AblationContext, _Reference
from tinygpt.interp.ablation.specs import MODES, Ablation, AblationError

BAR_COLORS = {"layer": "#7f7f7f", "attn": "#1f77b4", "mlp": "#2ca02c", "head": "#9467bd"}  # per component
HIGHLIGHT_COLOR = "#d62728"  # the selected ablation's bar


# ------------------------------------------------------------------------------------------------ sweeps
@dataclass
class AblationSweepResult:
    """Loss increase of every ablation in a sweep.

    Attributes:
        baseline_loss: the unablated loss.
        ablations: the ablations, in sweep order.
        losses: [n] the loss under each ablation; `deltas` = losses - baseline_loss.
        n_layers, n_heads: the model's shape (for `delta` tables).
    """

    baseline_loss: float
    ablations: list[Ablation]
    losses: Tensor
    n_layers: int
    n_heads: int
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def deltas(self) -> Tensor:
        return self.losses - self.baseline_loss

    def delta(self, component: str = "attn", mode: str = "zero") -> Tensor:
        """Loss increase table: [n_layers] for layer/attn/mlp, [n_layers, n_heads] for "head" (NaN where the
        sweep did not run)."""
        shape = (self.n_layers, self.n_heads) if component == "head" else (self.n_layers,)
        out = torch.full(shape, float("nan"))
        found = False
        for a, d in zip(self.ablations, self.deltas.tolist()):
            if a.component == component and a.mode == mode:
                out[(a.layer, a.head) if component == "head" else a.layer] = d
                found = True
        if not found:
            have = sorted({(a.component, a.mode) for a in self.ablations})
            raise KeyError(f"the sweep has no ({component!r}, {mode!r}) ablations; it has {have}")
        return out

    def top(self, k: int = 5) -> list[tuple[Ablation, float]]:
        """The k ablations that increase the loss most, with their increase."""
        order = torch.argsort(self.deltas, descending=True)[:k].tolist()
        return [(self.ablations[i], float(self.deltas[i])) for i in order]

    def to_dataframe(self):
        import pandas as pd

        return pd.DataFrame(
            [
                dict(
                    layer=a.layer,
                    component=a.component,
                    head=a.head,
                    mode=a.mode,
                    loss=float(loss),
                    delta=float(loss) - self.baseline_loss,
                )
                for a, loss in zip(self.ablations, self.losses)
            ]
        )

    def __repr__(self) -> str:
        top = ", ".join(f"{a} +{d:.3f}" for a, d in self.top(3))
        return (
            f"AblationSweepResult({len(self.ablations)} ablations, baseline loss {self.baseline_loss:.4f}; "
            f"largest increases: {top})"
        )

    def figure(self, mode: str | None = None, highlight: Any = None):
        """Plotly figure of one mode's loss increases (default: the first mode swept, or `highlight`'s).

        Without `highlight`: grouped bars of the loss increase per layer for layer/attn/mlp ablations, and a
        (layer x head) heatmap for head ablations. With `highlight` (an `Ablation` or a spec such as
        "1.head0:mean", one of the sweep's): `bars(mode, highlight)`, one bar per ablation with that one in red.
        """
        if highlight is not None:
            return self.bars(mode, highlight)
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots

        mode = mode or self.ablations[0].mode
        comps = [
            c for c in ("layer", "attn", "mlp") if any(a.component == c and a.mode == mode for a in self.ablations)
        ]
        has_heads = any(a.component == "head" and a.mode == mode for a in self.ablations)
        cols = int(bool(comps)) + int(has_heads)
        titles = ([f"{mode} ablation: loss increase by layer"] if comps else []) + (
            [f"{mode} ablation: loss increase by head"] if has_heads else []
        )
        fig = make_subplots(rows=1, cols=max(cols, 1), subplot_titles=titles)
        layers = [str(i) for i in range(self.n_layers)]
        if comps:
            for c in comps:
                fig.add_trace(go.Bar(x=layers, y=self.delta(c, mode).tolist(), name=c), row=1, col=1)
            fig.update_xaxes(title_text="layer", type="category", row=1, col=1)
            fig.update_yaxes(title_text="loss increase", row=1, col=1)
        if has_heads:
            z = self.delta("head", mode)
            lim = float(z.nan_to_num(0).abs().max()) or 1.0
            fig.add_trace(
                go.Heatmap(
                    z=z.tolist(),
                    x=[f"H{h}" for h in range(self.n_heads)],
                    y=[f"L{i}" for i in layers],
                    colorscale="RdBu",
                    reversescale=True,
                    zmid=0,
                    zmin=-lim,
                    zmax=lim,
                    colorbar=dict(title="Δ loss"),
                    hovertemplate="%{y}%{x}: %{z:.4f}<extra></extra>",
                ),
                row=1,
                col=cols,
            )
            fig.update_yaxes(autorange="reversed", row=1, col=cols)
        fig.update_layout(
            title=f"Ablation sweep (baseline loss {self.baseline_loss:.4f})",
            barmode="group",
            height=380,
            width=420 * max(cols, 1) + 100,
        )
        return fig

    def bars(self, mode: str | None = None, highlight: Any = None):
        """Plotly bar chart: one bar per ablation of `mode` (in sweep order, labelled "1.attn", "0.head1", ...)
        with its loss increase, coloured by component (`BAR_COLORS`); `highlight` (an `Ablation` or a spec of
        the sweep) in red (`HIGHLIGHT_COLOR`).

        Args:
            mode: the mode shown (default: `highlight`'s mode, else the first mode swept).
            highlight: the selected ablation, or None.
        Raises:
            AblationError: `mode` was not swept, or `highlight` is not one of this sweep's ablations of `mode`.
        """
        import plotly.graph_objects as go

        shape = SimpleNamespace(n_layers=self.n_layers, n_heads=self.n_heads)  # what `resolve` checks against
        chosen = None if highlight is None else Ablation.parse(highlight, mode).resolve(shape)
        mode = mode or (chosen.mode if chosen is not None else self.ablations[0].mode)
        picked = [(a, float(d)) for a, d in zip(self.ablations, self.deltas.tolist()) if a.mode == mode]
        if not picked:
            swept = sorted({a.mode for a in self.ablations})
            raise AblationError(f"the sweep has no {mode!r} ablations; it swept {swept}")
        if chosen is not None and chosen not in {a for a, _ in picked}:
            raise AblationError(f"{chosen} is not one of this sweep's {mode} ablations; highlight one of them")
        fig = go.Figure(
            go.Bar(
                x=[a.label for a, _ in picked],
                y=[d for _, d in picked],
                marker={"color": [HIGHLIGHT_COLOR if a == chosen else BAR_COLORS[a.component] for a, _ in picked]},
                name="loss increase",
                hovertemplate="%{x}: %{y:+.4f}<extra></extra>",
            )
        )
        selected = "; red = selected" if chosen is not None else ""
        fig.update_layout(
            title=f"{mode} ablation: loss increase (baseline {self.baseline_loss:.4f}){selected}",
            template="plotly_white",
            height=360,
            margin={"t": 50, "b": 60},
            xaxis={"title": "ablation", "type": "category", "tickangle": -60},
            yaxis={"title": "loss increase"},
            showlegend=False,
        )
        return fig


@torch.no_grad()
def ablation_sweep(
    model,
    tokens: Any,
    *,
    modes: Sequence[str] = ("zero",),
    components: Sequence[str] = ("attn", "mlp"),
    heads: bool = False,
    reference_tokens: Any = None,
    seed: int = 0,
    targets: Tensor | None = None,
    layers: Iterable[int] | None = None,
    progress: bool | None = None,
) -> AblationSweepResult:
    """Ablate every (layer, component) -- and every head if `heads` -- one at a time; report the loss increase.

    Args:
        tokens: a validation batch [batch, pos] (or text).
        modes: any of "zero", "mean", "resample".
        components: any of "layer", "attn", "mlp" ("head" is the same as heads=True).
        heads: also ablate each head of each layer.
        reference_tokens: for mean / resample (default: `tokens` themselves).
        seed: seeds resample draws.
        targets: optional [batch, pos] targets (-100 ignored) to score only some positions.
        layers: restrict to these layers (default all).
        progress: show a tqdm bar (None: the package default, `tinygpt.inputs.DEFAULT_PROGRESS`).
    """
    from tqdm.auto import tqdm

    tokens = as_tokens(model, tokens, what="tokens", error=AblationError)
    comps = list(components)
    if "head" in comps:
        comps.remove("head")
        heads = True
    for c in comps:
        if c not in ("layer", "attn", "mlp"):
            raise AblationError(f"unknown component {c!r}; choose from 'layer', 'attn', 'mlp' (and heads=True)")
    for m in modes:
        if m not in MODES:
            raise AblationError(f"unknown ablation mode {m!r}; choose from {MODES}")
    layer_list = list(range(model.cfg.n_layers)) if layers is None else list(layers)
    specs = []
    for m in modes:
        for layer in layer_list:
            specs += [Ablation(layer, c, None, m).resolve(model.cfg) for c in comps]
            if heads:
                specs += [Ablation(layer, "head", h, m).resolve(model.cfg) for h in range(model.cfg.n_heads)]
    if not specs:
        raise AblationError("nothing to sweep: give at least one component or heads=True, and one mode")
    with eval_mode(model):
        reference = _Reference(model, tokens if reference_tokens is None else reference_tokens)
        reference.prepare(specs)
        baseline = float(model(tokens, return_type="loss", targets=targets))
        losses = []
        for spec in tqdm(specs, desc="ablation sweep", disable=not progress_enabled(progress), leave=False):
            with AblationContext(model, [spec], seed=seed, _reference=reference):
                losses.append(float(model(tokens, return_type="loss", targets=targets)))
    return AblationSweepResult(
        baseline,
        specs,
        torch.tensor(losses),
        model.cfg.n_layers,
        model.cfg.n_heads,
        meta=dict(modes=tuple(modes), components=tuple(comps), heads=heads),
    )
