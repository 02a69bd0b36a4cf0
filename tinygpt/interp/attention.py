"""Attention views: per-head patterns of a prompt, and induction / previous-token scores.

    att = attention_patterns(model, "To be, or not to be")   # AttentionResult
    att.patterns                                             # [n_layers, n_heads, dest, src]
    att.figure(layer=1, head=3)                               # plotly heatmap with the prompt's tokens
    att.grid()                                                # every head of every layer
    induction_scores(model)                                   # [n_layers, n_heads]

Which maps are read is data, not code: `attention_maps(model, layer)` lists the hook points
`blocks.{layer}.attn.hook_pattern*` the model has, so an attention variant with more than one map
(differential attention's `hook_pattern1` / `hook_pattern2` beside its combined, signed `hook_pattern`)
shows up in `AttentionResult.maps` and in `figure(..., map="pattern1")` without changes here; signed maps
are drawn on a diverging scale, and differential attention's λ per layer (`attn.hook_lambda`) is kept in
`AttentionResult.lambdas`.

A mixture-of-depths block (`mod=True`) attends only among the tokens it routes: its `hook_pattern` is
[batch, head, routed, routed]. `attention_patterns` reads the block's `hook_routing_mask` in the same forward
and scatters the map back to token positions, NaN in the rows and columns of skipped tokens
(`AttentionResult.routing_masks` keeps the masks); induction and previous-token scores average over the
tokens the block computes (NaN if it computes none of them). The router's choices themselves (experts per
token, routing masks, scores) are read by `tinygpt.interp.routing.read_routing` (re-exported here) and drawn by
its `Routing.figure()` (and `tinygpt.widgets.AttentionViewer`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from tinygpt.inputs import as_tokens, eval_mode, model_device
from tinygpt.interp._common import color_range, nan_to_none, position_ticks, str_tokens
from tinygpt.interp.routing import (  # noqa: F401  (re-exported: widgets and patching read them here)
    Routing,
    as_mask,
    moe_layers,
    read_routing,
    routed_layers,
    routed_slots,
    scatter_routed,
)
from tinygpt.interp.toy import repeated_tokens

MAIN_MAP = "pattern"
MAP_TITLES = {"pattern1": "A1 (hook_pattern1)", "pattern2": "A2 (hook_pattern2)"}


def attention_maps(model, layer: int) -> dict[str, str]:
    """The attention maps a layer exposes: {map name: hook name}, e.g. {"pattern": "blocks.0.attn.hook_pattern"}.

    A map is any hook point `blocks.{layer}.attn.hook_pattern{suffix}` shaped [batch, head, dest, src];
    its name is "pattern" + suffix (without a leading underscore: "pattern_1" -> "pattern_1").
    """
    prefix = f"blocks.{layer}.attn.hook_"
    rx = re.compile(re.escape(prefix) + r"(pattern\w*)$")
    return {m[1]: name for name in model.hook_dict if (m := rx.match(name))}


@dataclass
class AttentionResult:
    """Attention maps of one prompt.

    Attributes:
        maps: {map name: [n_selected_layers, n_heads, dest, src]}; "pattern" is the softmax attention.
        layers: the model layers the first axis covers.
        tokens: [pos] the prompt's tokens; str_tokens their strings.
        lambdas: {layer: λ} for differential-attention layers (empty otherwise).
        routing_masks: {layer: [pos] bool} for mixture-of-depths blocks: the tokens the block computes (its map
            is NaN in the rows and columns of the others).
    """

    maps: dict[str, Tensor]
    layers: list[int]
    tokens: Tensor
    str_tokens: list[str]
    meta: dict[str, Any] = field(default_factory=dict)
    lambdas: dict[int, float] = field(default_factory=dict)
    routing_masks: dict[int, Tensor] = field(default_factory=dict)

    @property
    def patterns(self) -> Tensor:
        """[n_selected_layers, n_heads, dest, src]."""
        return self.maps[MAIN_MAP]

    def head(self, layer: int, head: int, map: str = MAIN_MAP) -> Tensor:
        """One head's map [dest, src]; `layer` is the model's layer index."""
        return self._map(map)[self._layer_index(layer), head]

    def _map(self, map: str) -> Tensor:
        if map not in self.maps:
            raise KeyError(f"no attention map {map!r}; this model has {sorted(self.maps)}")
        return self.maps[map]

    def _layer_index(self, layer: int) -> int:
        if layer not in self.layers:
            raise KeyError(f"layer {layer} was not collected; have layers {self.layers}")
        return self.layers.index(layer)

    def _signed(self, map: str) -> bool:
        """The combined map of differential attention (A1 - λ A2) is signed."""
        return map == MAIN_MAP and len(self.maps) > 1

    def __repr__(self) -> str:
        L, H, T, _ = self.patterns.shape
        return f"AttentionResult(layers={self.layers}, heads={H}, pos={T}, maps={sorted(self.maps)})"

    def figure(self, layer: int, head: int, map: str = MAIN_MAP):
        """Plotly heatmap of one head: rows = destination (query) tokens, columns = source (key) tokens.

        `map="all"` draws every map of the head side by side (differential attention: A1, A2, then the
        combined A1 - λ A2 with the layer's λ in its title).
        """
        import plotly.graph_objects as go

        if map == "all":
            return self._maps_figure(layer, head)
        z = self.head(layer, head, map).float().cpu()
        ticks = position_ticks(self.str_tokens)
        fig = go.Figure(
            go.Heatmap(
                z=nan_to_none(z),
                x=ticks,
                y=ticks,
                **color_range(z, signed=self._signed(map)),
                hovertemplate="dest %{y}<br>src %{x}<br>%{z:.3f}<extra></extra>",
            )
        )
        size = min(900, 220 + 18 * len(ticks))
        fig.update_layout(
            title=f"L{layer}H{head} {map}",
            width=size + 80,
            height=size,
            xaxis=dict(title="source", type="category", tickangle=-60),
            yaxis=dict(title="destination", type="category", autorange="reversed"),
        )
        return fig

    def _maps_figure(self, layer: int, head: int):
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots

        names = sorted(self.maps, key=lambda m: (m == MAIN_MAP, m))  # A1, A2, then the combined map
        lam = self.lambdas.get(layer)
        combined = "A1 − λ·A2 (hook_pattern)" + (f", λ = {lam:.3f}" if lam is not None else "")
        titles = [MAP_TITLES.get(m, combined if len(names) > 1 else "hook_pattern") for m in names]
        fig = make_subplots(rows=1, cols=len(names), subplot_titles=titles, horizontal_spacing=0.12)
        ticks = position_ticks(self.str_tokens)
        for c, name in enumerate(names, start=1):
            z = self.head(layer, head, name).float().cpu()
            dom = fig.layout[f"xaxis{c if c > 1 else ''}"].domain
            fig.add_trace(
                go.Heatmap(
                    z=nan_to_none(z),
                    x=ticks,
                    y=ticks,
                    name=name,
                    **color_range(z, signed=self._signed(name)),
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

    def grid(self, layers: list[int] | None = None, heads: list[int] | None = None, map: str = MAIN_MAP):
        """Plotly grid of small heatmaps: one row per layer, one column per head."""
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots

        layers = self.layers if layers is None else list(layers)
        heads = list(range(self.patterns.shape[1])) if heads is None else list(heads)
        fig = make_subplots(
            rows=len(layers),
            cols=len(heads),
            horizontal_spacing=0.01,
            vertical_spacing=0.03,
            subplot_titles=[f"L{layer}H{h}" for layer in layers for h in heads],
        )
        ticks = position_ticks(self.str_tokens)
        for r, layer in enumerate(layers, start=1):
            for c, h in enumerate(heads, start=1):
                z = self.head(layer, h, map).float().cpu()
                fig.add_trace(
                    go.Heatmap(
                        z=nan_to_none(z),
                        x=ticks,
                        y=ticks,
                        coloraxis="coloraxis",
                        hovertemplate=f"L{layer}H{h}<br>dest %{{y}}<br>src %{{x}}<br>%{{z:.3f}}<extra></extra>",
                    ),
                    row=r,
                    col=c,
                )
                fig.update_xaxes(showticklabels=False, type="category", row=r, col=c)
                fig.update_yaxes(showticklabels=False, type="category", autorange="reversed", row=r, col=c)
        color = color_range(self._map(map), signed=self._signed(map))
        fig.update_layout(
            title=f"Attention {map}: {len(layers)} layers x {len(heads)} heads",
            coloraxis=dict(colorscale=color["colorscale"], cmin=color["zmin"], cmax=color["zmax"]),
            height=170 * len(layers) + 80,
            width=170 * len(heads) + 120,
        )
        return fig


def _read_maps(model, tokens: Tensor, layers: list[int]) -> tuple[dict, Any]:
    """One forward: {layer: {map name: [batch, H, pos, pos]}} (routed blocks scattered to positions), and the
    cache, which also holds the routing masks of routed blocks and differential attention's λ."""
    n = model.cfg.n_layers
    for x in layers:
        if not -n <= x < n:
            raise ValueError(f"layer {x} is out of range; the model has {n} layers (0..{n - 1})")
    layers = [x % n for x in layers]
    hooks = {layer: attention_maps(model, layer) for layer in layers}
    names = [h for per in hooks.values() for h in per.values()]
    if not names:
        raise ValueError("this model exposes no attention-pattern hook points (blocks.{i}.attn.hook_pattern)")
    routed = [i for i in routed_layers(model) if i in hooks]
    names += [f"blocks.{i}.hook_routing_mask" for i in routed]
    names += [h for i in layers if (h := f"blocks.{i}.attn.hook_lambda") in model.hook_dict]
    with eval_mode(model):
        _, cache = model.run_with_cache(tokens, names_filter=names, return_type=None)
    b, t = tokens.shape
    maps: dict[int, dict[str, Tensor]] = {}
    for layer, per in hooks.items():
        maps[layer] = {}
        for m, h in per.items():
            if layer not in routed:
                maps[layer][m] = _full(cache[h], t, layer)
            elif h in cache.cache_dict:
                maps[layer][m] = scatter_routed(cache[h], cache[f"blocks.{layer}.hook_routing_mask"])
            else:  # the block routed no token at all: its attention never ran
                maps[layer][m] = torch.full((b, model.cfg.n_heads, t, t), float("nan"), device=tokens.device)
    return maps, cache


@torch.no_grad()
def attention_patterns(model, prompt: Any, *, layers: list[int] | None = None, batch_index: int = 0) -> AttentionResult:
    """Attention maps of a prompt for the given layers (default all), per head.

    Args:
        model: a tinygpt model.
        prompt: text, or tokens [pos] / [batch, pos] (row `batch_index` is kept).
        layers: model layer indices (negative counts from the end).
    Returns:
        An `AttentionResult`; `.patterns` is [n_layers, n_heads, dest, src]. A mixture-of-depths block's maps are
        scattered back to token positions, NaN where the block skipped the query or the key token.
    """
    layer_list = list(range(model.cfg.n_layers)) if layers is None else [int(x) for x in layers]
    tokens = as_tokens(model, prompt, what="the prompt")[batch_index : batch_index + 1]
    per_layer, cache = _read_maps(model, tokens, layer_list)
    layer_list = list(per_layer)
    map_names = sorted({m for per in per_layer.values() for m in per}, key=lambda m: (m != MAIN_MAP, m))
    maps = {
        m: torch.stack([per_layer[layer][m][0].float().cpu() for layer in layer_list])
        for m in map_names
        if all(m in per_layer[layer] for layer in layer_list)
    }
    lambdas = {
        layer: float(cache[f"blocks.{layer}.attn.hook_lambda"])
        for layer in layer_list
        if f"blocks.{layer}.attn.hook_lambda" in cache
    }
    masks = {
        layer: as_mask(cache[name][0].cpu())
        for layer in layer_list
        if (name := f"blocks.{layer}.hook_routing_mask") in cache
    }
    return AttentionResult(
        maps, layer_list, tokens[0].cpu(), str_tokens(model, tokens[0]), lambdas=lambdas, routing_masks=masks
    )


@torch.no_grad()
def _patterns_on(model, tokens: Tensor) -> Tensor:
    """[L, batch, H, T, T] main maps of every layer (NaN at tokens a routed block skipped)."""
    per_layer, _ = _read_maps(model, tokens.to(model_device(model)), list(range(model.cfg.n_layers)))
    return torch.stack([per_layer[i][MAIN_MAP].float() for i in range(model.cfg.n_layers)])


def _full(pattern: Tensor, t: int, layer: int) -> Tensor:
    """`pattern` if it covers every position, else a clear error."""
    if pattern.shape[-1] != t or pattern.shape[-2] != t:
        raise ValueError(
            f"layer {layer}'s attention map covers {pattern.shape[-2]} of {t} positions, and the block has no "
            "hook_routing_mask to place them; read its hook_pattern from run_with_cache directly"
        )
    return pattern


def induction_scores(model, *, seq_len: int = 20, batch: int = 8, seed: int = 0) -> Tensor:
    """Induction score per head: [n_layers, n_heads].

    On `batch` sequences of `seq_len` random tokens repeated twice, the mean attention from each token of the
    second copy to the token right after that token's first occurrence (position i - seq_len + 1).
    A perfect induction head scores 1. A mixture-of-depths block is scored on the tokens it computes (NaN for
    a block that computes none of the scored pairs).
    """
    if 2 * seq_len > model.cfg.n_ctx or seq_len < 2:
        raise ValueError(f"seq_len must be in [2, n_ctx // 2 = {model.cfg.n_ctx // 2}], got {seq_len}")
    tokens = repeated_tokens(batch, seq_len, model.cfg.d_vocab, seed=seed)
    pat = _patterns_on(model, tokens)
    dest = torch.arange(seq_len, 2 * seq_len)
    return pat[:, :, :, dest, dest - seq_len + 1].nanmean(dim=(1, 3)).float().cpu()


def previous_token_scores(model, *, seq_len: int = 40, batch: int = 8, seed: int = 0) -> Tensor:
    """Mean attention from each position (after the first) to the position before it, on random tokens:
    [n_layers, n_heads]."""
    if not 2 <= seq_len <= model.cfg.n_ctx:
        raise ValueError(f"seq_len must be in [2, n_ctx = {model.cfg.n_ctx}], got {seq_len}")
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, model.cfg.d_vocab, (batch, seq_len), generator=gen)
    pat = _patterns_on(model, tokens)
    dest = torch.arange(1, seq_len)
    return pat[:, :, :, dest, dest - 1].nanmean(dim=(1, 3)).float().cpu()


__all__ = [
    "MAIN_MAP",
    "AttentionResult",
    "Routing",
    "attention_maps",
    "attention_patterns",
    "induction_scores",
    "moe_layers",
    "previous_token_scores",
    "read_routing",
    "routed_layers",
    "routed_slots",
    "scatter_routed",
]
