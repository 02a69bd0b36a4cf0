"""`AttentionViewer`: attention patterns per layer and head, both maps of differential attention, and the router's
choices per token for mixture-of-experts and mixture-of-depths models.

    from tinygpt.widgets import AttentionViewer
    view = AttentionViewer(model, "To be, or not to be, that is the question")
    view                              # displays in a notebook
    view.layer.value, view.head.value = 1, 3
    view.result.head(1, 3)            # the [dest, src] map the heatmap shows

A thin layer over `tinygpt.interp.attention_patterns` (every `blocks.{i}.attn.hook_pattern*` map of the prompt,
one forward pass per prompt; the layer and head controls only choose what to show). Differential attention
(`diff_attn=True`) exposes `hook_pattern1` (A1), `hook_pattern2` (A2) and the signed `hook_pattern` (A1 − λ A2):
all three are drawn side by side, with the layer's λ (`attn.hook_lambda`) in the combined map's title. Routers
are read from their hook points in one more forward pass (`read_routing`):

- mixture-of-experts: `blocks.{i}.moe.hook_expert_indices` / `hook_expert_weights` (the experts each token is
  sent to, drawn for the selected layer) and `hook_router_logits` (the router's probabilities, in the hover);
  the expert load of every layer (the fraction of the prompt's token-to-expert assignments each expert
  receives) is a second heatmap;
- mixture-of-depths: `blocks.{i}.hook_routing_mask` / `hook_router_scores` (which tokens each routed block
  computes, and the router's score of every token, written in the cells).

A routed block's attention covers only the tokens it computes; skipped tokens are blank rows and columns of
its map. A MoE feed-forward inside a routed block only sees the routed tokens: skipped tokens have no expert.
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass, field
from typing import Any

import ipywidgets as W
import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots
from torch import Tensor

from tinygpt.interp.attention import MAIN_MAP, AttentionResult, attention_patterns, routed_layers

from ._common import (
    captured,
    dropdown_value,
    parse_tokens,
    prompt_text,
    show_figure,
    status_html,
    token_strs,
    user_errors,
)

DEFAULT_PROMPT = "To be, or not to be, that is the question."
MAP_TITLES = {"pattern1": "A1 (hook_pattern1)", "pattern2": "A2 (hook_pattern2)"}


# ------------------------------------------------------------------------------------------- routing
@dataclass
class Routing:
    """Router decisions for one prompt (batch row 0).

    Attributes:
        experts: {layer: (indices [pos, k] int64, weights [pos, k] fp32)} of mixture-of-experts layers; a token
            the layer does not compute (skipped by a mixture-of-depths block) has indices -1 and weights 0.
        probs: {layer: [pos, n_experts]} the router's softmax over every expert (NaN rows for skipped tokens).
        n_experts: experts per MoE layer (0 without MoE).
        mod: {layer: (mask [pos] bool, scores [pos] fp32)} of mixture-of-depths (routed) blocks.
    """

    experts: dict[int, tuple[Tensor, Tensor]] = field(default_factory=dict)
    probs: dict[int, Tensor] = field(default_factory=dict)
    n_experts: int = 0
    mod: dict[int, tuple[Tensor, Tensor]] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.experts or self.mod)

    def load(self) -> Tensor:
        """[n_moe_layers, n_experts] expert load: the fraction of each MoE layer's (token, choice) assignments
        that went to each expert, over the tokens the layer computes (rows in `sorted(experts)` order; a row
        sums to 1, or is NaN if the layer computed no token)."""
        rows = []
        for layer in sorted(self.experts):
            idx = self.experts[layer][0]
            chosen = idx[idx >= 0]
            counts = torch.bincount(chosen, minlength=self.n_experts).float()
            rows.append(counts / chosen.numel() if chosen.numel() else torch.full((self.n_experts,), float("nan")))
        return torch.stack(rows) if rows else torch.zeros(0, self.n_experts)


def moe_layers(model) -> list[int]:
    return [i for i in range(model.cfg.n_layers) if f"blocks.{i}.moe.hook_expert_indices" in model.hook_dict]


def _at_positions(x: Tensor, mask: Tensor | None, fill: float) -> Tensor:
    """Rows of a routed block's sub-sequence [routed, ...] back at token positions [pos, ...] (`fill` where the
    block skipped the token); `x` as is when the block computes every token (mask None)."""
    if mask is None:
        return x
    idx = mask.nonzero()[:, 0]
    out = torch.full((mask.shape[0], *x.shape[1:]), fill, dtype=x.dtype)
    out[idx] = x[: len(idx)]
    return out


@torch.no_grad()
def read_routing(model, tokens: Tensor) -> Routing:
    """The router hook points of `tokens` [1, pos] in one forward pass (nothing for a model without routers)."""
    moe, mod = moe_layers(model), routed_layers(model)
    if not moe and not mod:
        return Routing()
    names = [f"blocks.{i}.moe.hook_{w}" for i in moe for w in ("expert_indices", "expert_weights", "router_logits")]
    names += [f"blocks.{i}.hook_{w}" for i in mod for w in ("routing_mask", "router_scores")]
    was_training = model.training
    model.eval()
    try:
        _, cache = model.run_with_cache(tokens, names_filter=names, return_type=None)
    finally:
        model.train(was_training)
    out = Routing(n_experts=int(getattr(model.cfg, "moe_experts", 0) or 0))
    for i in mod:
        mask = cache[f"blocks.{i}.hook_routing_mask"][0].cpu()
        mask = mask if mask.dtype == torch.bool else mask > 0.5
        out.mod[i] = (mask, cache[f"blocks.{i}.hook_router_scores"][0].float().cpu())
    for i in moe:
        mask = out.mod[i][0] if i in out.mod else None  # a MoE inside a routed block sees the routed tokens only
        block = f"blocks.{i}.moe"
        out.experts[i] = (
            _at_positions(cache[f"{block}.hook_expert_indices"][0].cpu(), mask, -1),
            _at_positions(cache[f"{block}.hook_expert_weights"][0].float().cpu(), mask, 0.0),
        )
        out.probs[i] = _at_positions(cache[f"{block}.hook_router_logits"][0].float().softmax(-1).cpu(), mask, math.nan)
    return out


def _ticks(str_tokens: list[str]) -> list[str]:
    return [f"{i} {s!r}" for i, s in enumerate(str_tokens)]


def _color(z: Tensor, signed: bool = False) -> dict[str, Any]:
    """Blues on [0, max] for probabilities; a diverging scale around 0 for signed maps (A1 − λ A2), which may
    happen to be non-negative for a prompt but are still drawn on the signed scale."""
    finite = z[torch.isfinite(z)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.numel() else (0.0, 1.0)
    if lo >= 0 and not signed:
        return dict(colorscale="Blues", zmin=0.0, zmax=max(hi, 1e-9))
    lim = max(abs(lo), abs(hi), 1e-9)
    return dict(colorscale="RdBu_r", zmin=-lim, zmax=lim)


def _rows(z: Tensor) -> list[list[float | None]]:
    return [[None if v != v else v for v in row] for row in z.tolist()]


def attention_figure(
    maps: dict[str, Tensor], str_tokens: list[str], layer: int, head: int, lam: float | None = None
) -> go.Figure:
    """One heatmap per map ({name: [dest, src]}), rows = destination tokens, columns = source tokens; `lam` is
    differential attention's λ of the layer (shown in the combined map's title)."""
    names = sorted(maps, key=lambda m: (m == MAIN_MAP, m))  # A1, A2, then the combined map
    combined = "A1 − λ·A2 (hook_pattern)" + (f", λ = {lam:.3f}" if lam is not None else "")
    titles = [MAP_TITLES.get(m, combined if len(maps) > 1 else "hook_pattern") for m in names]
    fig = make_subplots(rows=1, cols=len(names), subplot_titles=titles, horizontal_spacing=0.12)
    ticks = _ticks(str_tokens)
    for c, name in enumerate(names, start=1):
        z = maps[name].float()
        dom = fig.layout[f"xaxis{c if c > 1 else ''}"].domain
        fig.add_trace(
            go.Heatmap(
                z=_rows(z),
                x=ticks,
                y=ticks,
                name=name,
                **_color(z, signed=name == MAIN_MAP and len(maps) > 1),
                colorbar={"x": dom[1] + 0.01, "thickness": 12, "len": 0.9},
                hovertemplate="dest %{y}<br>src %{x}<br>%{z:.3f}<extra>" + name + "</extra>",
            ),
            row=1,
            col=c,
        )
        fig.update_xaxes(title_text="source", type="category", tickangle=-60, row=1, col=c)
        fig.update_yaxes(type="category", autorange="reversed", row=1, col=c)
    fig.update_yaxes(title_text="destination", row=1, col=1)
    # square-ish panels that fit a notebook's output area (~1100 px) side by side
    side = min(620 if len(names) == 1 else 950 // len(names) - 100, 220 + 16 * len(ticks))
    fig.update_layout(
        title=f"layer {layer}, head {head}",
        template="plotly_white",
        height=side + 130,
        width=len(names) * (side + 100) + 60,
        margin={"t": 70, "b": 40, "l": 90, "r": 60},
    )
    return fig


def router_figure(routing: Routing, str_tokens: list[str], layer: int) -> go.Figure:
    """The router view: experts chosen per token at `layer` and the expert load of every layer (MoE), and which
    tokens each routed block computes, with the router's scores (MoD)."""
    panels = []
    if layer in routing.experts:
        panels.append("moe")
    if routing.experts:
        panels.append("load")
    if routing.mod:
        panels.append("mod")
    titles = {
        "moe": f"layer {layer}: experts chosen per token (weight; number = choice rank)",
        "load": "expert load per layer: share of the prompt's token → expert assignments",
        "mod": "mixture-of-depths: tokens each routed block computes (1) or skips (0); cells: router score",
    }
    heights = {
        "moe": routing.n_experts,
        "load": len(routing.experts),
        "mod": len(routing.mod),
    }
    fig = make_subplots(
        rows=len(panels) or 1,
        cols=1,
        subplot_titles=[titles[p] for p in panels],
        vertical_spacing=0.3 / max(len(panels), 1),
        row_heights=[heights[p] + 2 for p in panels] or None,
    )
    ticks = _ticks(str_tokens)
    t = len(str_tokens)
    for r, panel in enumerate(panels, start=1):
        dom = fig.layout[f"yaxis{r if r > 1 else ''}"].domain
        bar = {"y": (dom[0] + dom[1]) / 2, "len": (dom[1] - dom[0]) * 1.05, "thickness": 12}
        if panel == "moe":
            idx, w = routing.experts[layer]
            probs = routing.probs.get(layer)
            z = torch.zeros(routing.n_experts, t)
            rank = [[""] * t for _ in range(routing.n_experts)]
            for pos in range(t):
                for j in range(idx.shape[1]):
                    e = int(idx[pos, j])
                    if e >= 0:  # -1: a token the (routed) block skipped
                        z[e, pos] = w[pos, j]
                        rank[e][pos] = str(j + 1)
            prob = [[None] * t for _ in range(routing.n_experts)] if probs is None else _rows(probs.T)
            fig.add_trace(
                go.Heatmap(
                    z=z.tolist(),
                    x=ticks,
                    y=[f"expert {e}" for e in range(routing.n_experts)],
                    text=rank,
                    texttemplate="%{text}",
                    customdata=prob,
                    name="experts",
                    colorscale="Purples",
                    zmin=0,
                    zmax=1,
                    colorbar={**bar, "title": "weight"},
                    hovertemplate="%{x} → %{y}: weight %{z:.3f} (choice %{text}); "
                    "router probability %{customdata:.3f}<extra></extra>",
                ),
                row=r,
                col=1,
            )
        elif panel == "load":
            layers = sorted(routing.experts)
            load = routing.load()
            n_tok = [int((routing.experts[i][0][:, 0] >= 0).sum()) for i in layers]
            fig.add_trace(
                go.Heatmap(
                    z=_rows(load),
                    x=[f"expert {e}" for e in range(routing.n_experts)],
                    y=[f"layer {i}" for i in layers],
                    text=[[f"{v:.0%}" if v == v else "" for v in row] for row in load.tolist()],
                    texttemplate="%{text}",
                    customdata=[[n] * routing.n_experts for n in n_tok],
                    name="load",
                    colorscale="Greens",
                    zmin=0,
                    zmax=max(float(load.nan_to_num(0).max()) if load.numel() else 1.0, 1e-9),
                    colorbar={**bar, "title": "load"},
                    hovertemplate="%{y}, %{x}: %{z:.1%} of the assignments of %{customdata} tokens<extra></extra>",
                ),
                row=r,
                col=1,
            )
        else:
            layers = sorted(routing.mod)
            z = [routing.mod[i][0].float().tolist() for i in layers]
            scores = [[f"{v:+.2f}" for v in routing.mod[i][1].tolist()] for i in layers]
            fig.add_trace(
                go.Heatmap(
                    z=z,
                    x=ticks,
                    y=[f"block {i}" for i in layers],
                    text=scores,
                    texttemplate="%{text}" if t <= 48 else "",
                    name="routing",
                    colorscale=[[0, "#eeeeee"], [1, "#ff7f0e"]],
                    zmin=0,
                    zmax=1,
                    colorbar={**bar, "title": "routed", "tickvals": [0, 1]},
                    hovertemplate="%{y}, %{x}: routed %{z} (router score %{text}; routed iff > 0 in eval mode)"
                    "<extra></extra>",
                ),
                row=r,
                col=1,
            )
        if panel != "load":
            fig.update_xaxes(type="category", tickangle=-60, row=r, col=1)
        fig.update_yaxes(type="category", autorange="reversed", row=r, col=1)
    n_rows = sum(heights[p] for p in panels)
    fig.update_layout(
        template="plotly_white",
        height=160 + 26 * n_rows + 130 * len(panels),
        width=min(1800, 300 + 22 * t),
        margin={"t": 60, "b": 40},
    )
    return fig


# ------------------------------------------------------------------------------------------- viewer
class AttentionViewer:
    """Prompt, layer and head controls over the attention maps of a prompt, plus a router view when there is one.

    Attributes:
        result (AttentionResult | None): the maps of every layer (a routed block's scattered to token positions,
            NaN at skipped tokens); None until a prompt could be read.
        routing (Routing): router decisions (empty for a model without routers).
        widget (ipywidgets.VBox): the container; displaying the viewer displays it.
        Controls: `prompt` (Text; applies on Enter), `layer`, `head`; outputs: `fig` (attention maps of the
        selected head), `router_fig` (only for MoE / MoD models, else None), `status` (HTML), `output`.
    """

    def __init__(self, model, prompt: Any = DEFAULT_PROMPT, *, layer: int = 0, head: int = 0):
        """
        Args:
            model: a `tinygpt.GPT`.
            prompt: the initial prompt: text, or token ids (a model without a tokenizer takes ids typed as
                "5 17 3").
            layer, head: the initial selection.
        """
        self.model = model
        cfg = model.cfg
        self.result: AttentionResult | None = None
        self.routing = Routing()
        self.str_tokens: list[str] = []
        self._routed = routed_layers(model)
        self._has_router = bool(self._routed or moe_layers(model))

        self.prompt = W.Text(
            value=prompt_text(model, prompt),
            description="prompt",
            continuous_update=False,
            layout=W.Layout(width="70%"),
        )
        kind = lambda i: " (routed)" if i in self._routed else ""  # noqa: E731
        self.layer = W.Dropdown(options=[(f"layer {i}{kind(i)}", i) for i in range(cfg.n_layers)], description="layer")
        self.head = W.Dropdown(options=[(f"head {h}", h) for h in range(cfg.n_heads)], description="head")
        dropdown_value(self.layer, layer)
        dropdown_value(self.head, head)
        self.status = W.HTML()
        self.output = W.Output()
        self.fig = go.FigureWidget()
        self.router_fig = go.FigureWidget() if self._has_router else None

        self.prompt.observe(self._on_prompt, names="value")
        self.layer.observe(self._on_select, names="value")
        self.head.observe(self._on_select, names="value")

        children: list[Any] = [
            W.HTML("<h3 style='margin:4px 0'>Attention patterns</h3>"),
            self.prompt,
            W.HBox([self.layer, self.head]),
            self.status,
            self.output,
            self.fig,
        ]
        if self.router_fig is not None:
            children += [W.HTML("<h3 style='margin:4px 0'>Routing</h3>"), self.router_fig]
        self.widget = W.VBox(children)
        with captured(self.output):
            self.update()

    # ------------------------------------------------------------------ state
    def maps(self, layer: int | None = None, head: int | None = None) -> dict[str, Tensor]:
        """{map name: [dest, src]} of one head (default: the selected one), as drawn (NaN rows and columns for
        tokens a routed block skipped)."""
        if self.result is None:
            raise ValueError("no attention maps yet: the prompt could not be read (see .status); type one in .prompt")
        layer = self.layer.value if layer is None else layer
        head = self.head.value if head is None else head
        return {m: self.result.head(layer, head, m) for m in self.result.maps}

    def update(self) -> None:
        """Recompute the maps (and routing) of the prompt and redraw."""
        with user_errors(self.status, ValueError):
            tokens = parse_tokens(self.model, self.prompt.value)
            self.result = attention_patterns(self.model, tokens)
            self.routing = read_routing(self.model, tokens)
            self.str_tokens = token_strs(self.model, tokens[0].tolist())
            self.draw()

    def draw(self) -> None:
        """Redraw the selected head's maps and the router view (no recomputation)."""
        if self.result is None:
            return
        layer, head = self.layer.value, self.head.value
        maps = self.maps(layer, head)
        lam = self.result.lambdas.get(layer)
        show_figure(self.fig, attention_figure(maps, self.str_tokens, layer, head, lam))
        note = ""
        if lam is not None:
            note += f" · λ = {lam:.3f}"
        if layer in self.result.routing_masks:
            mask = self.result.routing_masks[layer]
            note += f" · routed block: computes {int(mask.sum())} of {len(mask)} tokens (the others are blank)"
        self.status.value = status_html(
            f"{len(self.str_tokens)} tokens · maps: {', '.join(html.escape(m) for m in sorted(maps))}{note}"
        )
        if self.router_fig is not None:
            show_figure(self.router_fig, router_figure(self.routing, self.str_tokens, layer))

    # ------------------------------------------------------------------ callbacks
    def _on_prompt(self, _change: Any = None) -> None:
        with captured(self.output):
            self.update()

    def _on_select(self, _change: Any = None) -> None:
        with captured(self.output):
            self.draw()

    # ------------------------------------------------------------------ display
    def _repr_mimebundle_(self, **kwargs: Any):
        return self.widget._repr_mimebundle_(**kwargs)

    def __repr__(self) -> str:
        return (
            f"AttentionViewer(layer {self.layer.value}, head {self.head.value}, {len(self.str_tokens)} tokens, "
            f"routing: {'yes' if self.routing else 'no'})"
        )


__all__ = ["AttentionViewer", "Routing", "read_routing", "attention_figure", "router_figure"]
