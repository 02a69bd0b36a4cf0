"""Router readouts: which tokens a mixture-of-depths block computes, which experts a mixture-of-experts layer picks.

    r = read_routing(model, "To be, or not to be")   # a Routing, one forward pass
    r.mod[1]                                          # (mask [pos] bool, router scores [pos]) of routed block 1
    r.experts[0]                                      # (expert indices [pos, k], weights [pos, k]) of MoE layer 0
    r.load()                                          # [n_moe_layers, n_experts] expert load
    r.figure(layer=0)                                 # experts per token, expert load, MoD routing

The hook points read (see `tinygpt.arch.mod` / `tinygpt.arch.moe`): `blocks.{i}.hook_routing_mask`,
`blocks.{i}.hook_router_scores`, `blocks.{i}.moe.hook_expert_indices` / `hook_expert_weights` /
`hook_router_logits`.

A routed block computes a sub-sequence: its routed tokens in causal order, padded at the end. The layout
helpers here (`routed_slots`, `at_positions`, `scatter_routed`) are the one place that maps a sub-sequence
back to token positions; attention views, ablations and activation patching all use them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from tinygpt.inputs import as_tokens, eval_mode
from tinygpt.interp._common import nan_to_none, position_ticks, str_tokens


# ------------------------------------------------------------------------------------- layout
def routed_layers(model) -> list[int]:
    """Layers whose block computes only some tokens (mixture-of-depths): they have `hook_routing_mask`."""
    return [i for i in range(model.cfg.n_layers) if f"blocks.{i}.hook_routing_mask" in model.hook_dict]


def moe_layers(model) -> list[int]:
    """Layers with a mixture-of-experts feed-forward: they have `moe.hook_expert_indices`."""
    return [i for i in range(model.cfg.n_layers) if f"blocks.{i}.moe.hook_expert_indices" in model.hook_dict]


def as_mask(mask: Tensor) -> Tensor:
    """A routing mask as bool (a hook may return floats: > 0.5 = routed)."""
    return mask if mask.dtype == torch.bool else mask > 0.5


def routed_slots(mask: Tensor) -> tuple[Tensor, Tensor]:
    """A routed block's sub-sequence layout for its routing mask [batch, pos] (bool, or float > 0.5 = routed).

    Returns:
        (positions [batch, routed] int64: the token position each slot of the block's sub-sequence holds --
        routed tokens in causal order, then skipped ones as padding, as `MoDBlock` gathers them;
        valid [batch, routed] bool: the slot holds a routed token).
    """
    mask = as_mask(mask)
    counts = mask.sum(1)
    kmax = int(counts.max()) if mask.numel() else 0
    idx = torch.sort((~mask).to(torch.uint8), dim=1, stable=True).indices[:, :kmax]
    valid = torch.arange(kmax, device=mask.device)[None] < counts[:, None]
    return idx, valid


def at_positions(x: Tensor, mask: Tensor, fill: float = 0.0) -> Tensor:
    """A routed block's per-slot values back at token positions.

    Args:
        x: [batch, slots, ...] values of the block's sub-sequence (slot j = j-th routed token; extra slots are
            padding and ignored).
        mask: [batch, pos] the block's `hook_routing_mask`.
        fill: the value at the positions of tokens the block skipped.
    Returns:
        [batch, pos, ...] with `x`'s dtype and device.
    """
    idx, valid = routed_slots(mask)
    out = torch.full((*mask.shape, *x.shape[2:]), fill, dtype=x.dtype, device=x.device)
    rows = torch.arange(mask.shape[0], device=idx.device)[:, None].expand_as(idx)
    out[rows[valid], idx[valid]] = x[:, : idx.shape[1]][valid]
    return out


def scatter_routed(pattern: Tensor, mask: Tensor) -> Tensor:
    """A routed block's attention map back at token positions.

    Args:
        pattern: [batch, heads, routed, routed] the block's `attn.hook_pattern*` (routed tokens in causal order;
            rows shorter than `routed` are padded at the end, as the block pads them).
        mask: [batch, pos] the block's `hook_routing_mask` (bool, or float > 0.5 = routed).
    Returns:
        [batch, heads, pos, pos] float32, NaN in the rows and columns of tokens the block skipped.
    """
    mask = as_mask(mask)
    b, t = mask.shape
    out = torch.full((b, pattern.shape[1], t, t), float("nan"), device=pattern.device)
    for row in range(b):
        idx = mask[row].nonzero()[:, 0]  # routed positions, in causal order (the block's sub-sequence)
        k = len(idx)
        if k:
            out[row][:, idx[:, None], idx[None, :]] = pattern[row, :, :k, :k].float()
    return out


# ------------------------------------------------------------------------------------- readout
@dataclass
class Routing:
    """Router decisions for one prompt (`read_routing`).

    Attributes:
        experts: {layer: (indices [pos, k] int64, weights [pos, k] fp32)} of mixture-of-experts layers; a token
            the layer does not compute (skipped by a mixture-of-depths block) has indices -1 and weights 0.
        probs: {layer: [pos, n_experts]} the router's softmax over every expert (NaN rows for skipped tokens).
        n_experts: experts per MoE layer (0 without MoE).
        mod: {layer: (mask [pos] bool, scores [pos] fp32)} of mixture-of-depths (routed) blocks.
        str_tokens: the prompt's readable tokens (the figure's axis).
    """

    experts: dict[int, tuple[Tensor, Tensor]] = field(default_factory=dict)
    probs: dict[int, Tensor] = field(default_factory=dict)
    n_experts: int = 0
    mod: dict[int, tuple[Tensor, Tensor]] = field(default_factory=dict)
    str_tokens: list[str] = field(default_factory=list)

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

    def figure(self, layer: int = 0, str_tokens: list[str] | None = None):
        """The router view (plotly): experts chosen per token at `layer` and the expert load of every layer
        (MoE), and which tokens each routed block computes, with the router's scores (MoD)."""
        return _routing_figure(self, self.str_tokens if str_tokens is None else str_tokens, layer)


@torch.no_grad()
def read_routing(model, prompt: Any) -> Routing:
    """The router hook points of one prompt in one forward pass (an empty `Routing` for a model without routers).

    Args:
        model: a tinygpt model (run in eval mode; every module's mode is restored afterwards).
        prompt: text, or one sequence of token ids [pos] / [1, pos].
    """
    moe, mod = moe_layers(model), routed_layers(model)
    tokens = as_tokens(model, prompt, what="the prompt", single=True)
    out = Routing(n_experts=int(getattr(model.cfg, "moe_experts", 0) or 0), str_tokens=str_tokens(model, tokens[0]))
    if not moe and not mod:
        return out
    names = [f"blocks.{i}.moe.hook_{w}" for i in moe for w in ("expert_indices", "expert_weights", "router_logits")]
    names += [f"blocks.{i}.hook_{w}" for i in mod for w in ("routing_mask", "router_scores")]
    with eval_mode(model):
        _, cache = model.run_with_cache(tokens, names_filter=names, return_type=None)
    masks = {i: as_mask(cache[f"blocks.{i}.hook_routing_mask"]) for i in mod}
    for i in mod:
        out.mod[i] = (masks[i][0].cpu(), cache[f"blocks.{i}.hook_router_scores"][0].float().cpu())

    def placed(x: Tensor, i: int, fill: float) -> Tensor:  # a MoE inside a routed block sees its routed tokens only
        return (at_positions(x, masks[i], fill) if i in masks else x)[0].cpu()

    for i in moe:
        block = f"blocks.{i}.moe"
        out.experts[i] = (
            placed(cache[f"{block}.hook_expert_indices"], i, -1),
            placed(cache[f"{block}.hook_expert_weights"].float(), i, 0.0),
        )
        out.probs[i] = placed(cache[f"{block}.hook_router_logits"].float().softmax(-1), i, math.nan)
    return out


def _routing_figure(routing: Routing, tokens: list[str], layer: int):
    """See `Routing.figure`: one panel per view, stacked (experts at `layer`, expert load, MoD routing)."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    panels = [p for p, on in (("moe", layer in routing.experts), ("load", routing.experts), ("mod", routing.mod)) if on]
    titles = {
        "moe": f"layer {layer}: experts chosen per token (weight; number = choice rank)",
        "load": "expert load per layer: share of the prompt's token → expert assignments",
        "mod": "mixture-of-depths: tokens each routed block computes (1) or skips (0); cells: router score",
    }
    heights = {"moe": routing.n_experts, "load": len(routing.experts), "mod": len(routing.mod)}
    fig = make_subplots(
        rows=len(panels) or 1,
        cols=1,
        subplot_titles=[titles[p] for p in panels],
        vertical_spacing=0.3 / max(len(panels), 1),
        row_heights=[heights[p] + 2 for p in panels] or None,
    )
    ticks, t = position_ticks(tokens), len(tokens)
    experts = [f"expert {e}" for e in range(routing.n_experts)]
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
            trace = go.Heatmap(
                z=z.tolist(),
                x=ticks,
                y=experts,
                text=rank,
                texttemplate="%{text}",
                customdata=[[None] * t for _ in experts] if probs is None else nan_to_none(probs.T),
                name="experts",
                colorscale="Purples",
                zmin=0,
                zmax=1,
                colorbar={**bar, "title": "weight"},
                hovertemplate="%{x} → %{y}: weight %{z:.3f} (choice %{text}); "
                "router probability %{customdata:.3f}<extra></extra>",
            )
        elif panel == "load":
            layers = sorted(routing.experts)
            load = routing.load()
            n_tok = [int((routing.experts[i][0][:, 0] >= 0).sum()) for i in layers]
            trace = go.Heatmap(
                z=nan_to_none(load),
                x=experts,
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
            )
        else:
            layers = sorted(routing.mod)
            trace = go.Heatmap(
                z=[routing.mod[i][0].float().tolist() for i in layers],
                x=ticks,
                y=[f"block {i}" for i in layers],
                text=[[f"{v:+.2f}" for v in routing.mod[i][1].tolist()] for i in layers],
                texttemplate="%{text}" if t <= 48 else "",
                name="routing",
                colorscale=[[0, "#eeeeee"], [1, "#ff7f0e"]],
                zmin=0,
                zmax=1,
                colorbar={**bar, "title": "routed", "tickvals": [0, 1]},
                hovertemplate="%{y}, %{x}: routed %{z} (router score %{text}; routed iff > 0 in eval mode)"
                "<extra></extra>",
            )
        fig.add_trace(trace, row=r, col=1)
        if panel != "load":
            fig.update_xaxes(type="category", tickangle=-60, row=r, col=1)
        fig.update_yaxes(type="category", autorange="reversed", row=r, col=1)
    fig.update_layout(
        template="plotly_white",
        height=160 + 26 * sum(heights[p] for p in panels) + 130 * len(panels),
        width=min(1800, 300 + 22 * t),
        margin={"t": 60, "b": 40},
    )
    return fig


__all__ = [
    "Routing",
    "as_mask",
    "at_positions",
    "moe_layers",
    "read_routing",
    "routed_layers",
    "routed_slots",
    "scatter_routed",
]
