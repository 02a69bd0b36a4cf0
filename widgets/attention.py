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
are read from their hook points in one more forward pass (`tinygpt.interp.read_routing`, drawn by
`Routing.figure(layer)`):

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
from typing import Any

import ipywidgets as W
import plotly.graph_objects as go
from torch import Tensor

from tinygpt.interp import AttentionResult, Routing, attention_patterns, read_routing
from tinygpt.interp.attention import moe_layers, routed_layers

from ._inputs import parse_tokens, prompt_box
from .base import Dashboard, dropdown_value, heading, layer_dropdown, show_figure

DEFAULT_PROMPT = "To be, or not to be, that is the question."


class AttentionViewer(Dashboard):
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
        super().__init__()
        self.model = model
        cfg = model.cfg
        self.result: AttentionResult | None = None
        self.routing = Routing()
        self.str_tokens: list[str] = []
        routed = routed_layers(model)

        self.prompt = prompt_box(model, prompt)
        self.layer = layer_dropdown(range(cfg.n_layers), label=lambda i: f"layer {i}" + (" (routed)" * (i in routed)))
        self.head = W.Dropdown(options=[(f"head {h}", h) for h in range(cfg.n_heads)], description="head")
        dropdown_value(self.layer, layer)
        dropdown_value(self.head, head)
        self.fig = go.FigureWidget()
        self.router_fig = go.FigureWidget() if routed or moe_layers(model) else None

        self._observe(self.update, self.prompt)
        self._observe(self.draw, self.layer, self.head)
        router = [heading("Routing"), self.router_fig] if self.router_fig else []
        controls = W.HBox([self.layer, self.head])
        self._layout("Attention patterns", self.prompt, controls, self.status, self.output, self.fig, *router)
        self._run(self.update)

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
        with self._reporting(ValueError):
            tokens = parse_tokens(self.model, self.prompt.value)
            self.result = attention_patterns(self.model, tokens)
            self.routing = read_routing(self.model, tokens)
            self.str_tokens = self.result.str_tokens
            self.draw()

    def draw(self) -> None:
        """Redraw the selected head's maps and the router view (no recomputation)."""
        if self.result is None:
            return
        layer, head = self.layer.value, self.head.value
        show_figure(self.fig, self.result.figure(layer, head, "all"))
        lam = self.result.lambdas.get(layer)
        note = f" · λ = {lam:.3f}" if lam is not None else ""
        if layer in self.result.routing_masks:
            mask = self.result.routing_masks[layer]
            note += f" · routed block: computes {int(mask.sum())} of {len(mask)} tokens (the others are blank)"
        self._say(
            f"{len(self.str_tokens)} tokens · maps: {', '.join(html.escape(m) for m in sorted(self.result.maps))}{note}"
        )
        if self.router_fig is not None:
            show_figure(self.router_fig, self.routing.figure(layer))

    def __repr__(self) -> str:
        return (
            f"AttentionViewer(layer {self.layer.value}, head {self.head.value}, {len(self.str_tokens)} tokens, "
            f"routing: {'yes' if self.routing else 'no'})"
        )


__all__ = ["AttentionViewer"]
