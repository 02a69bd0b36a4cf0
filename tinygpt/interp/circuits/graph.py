"""The computational graph edge methods score: senders (what writes into the residual stream) and receivers
(what reads it), their names, hook points and which pairs are real edges.

Senders, in forward order: `"embed"` (the embeddings entering layer 0, `blocks.0.hook_resid_pre`), each head
`"L{layer}H{head}"` (its output `blocks.{layer}.attn.hook_result[:, :, head]`) and each feed-forward
`"MLP{layer}"` (`blocks.{layer}.hook_mlp_out`). Receivers: each head's query, key and value input
`"L{layer}H{head}.q"` / `".k"` / `".v"` (`blocks.{layer}.hook_q_input[:, :, head]`, ...), each feed-forward's
input `"MLP{layer}"` (`blocks.{layer}.hook_mlp_in`) and `"logits"` (the final `hook_resid_post`, before
`ln_final`). With grouped-query attention the keys and values are shared by a group of query heads, so their
receivers are the key/value heads: `"L{layer}KV{group}.k"` / `".v"`.

Because the residual stream is a plain sum, a receiver's input is the sum of every upstream sender's output
(plus biases, the same in every run): sender s feeds receiver r when s is computed before r reads the stream.
A head reads the stream entering its block, so it receives from the embeddings and from every earlier
layer's heads and MLPs; an MLP also receives from its own layer's heads (not in a parallel attention/MLP
block, where both read the block's input); the logits receive from everything.

    g = edge_graph(model)
    g.senders[:3], g.receivers[-2:]            # ['embed', 'L0H0', 'L0H1'], ['MLP1', 'logits']
    g.is_edge("L0H1", "L1H0.k")                # True
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cached_property

import torch
from torch import Tensor

from tinygpt.errors import TinyGPTError
from tinygpt.interp.patching.metrics import PatchingError

__all__ = ["Circuit", "CircuitError", "EdgeGraph", "Node", "edge_graph", "edge_hooks", "parse_node"]


class CircuitError(PatchingError):
    """Inputs, nodes, edges, circuits or options a circuit analysis cannot run with (also a `PatchingError` and
    a `ValueError`); the one error class of `tinygpt.interp.circuits`."""


_NODE = re.compile(r"^(?:L(\d+)(H|KV)(\d+)(?:\.([qkv]))?|MLP(\d+)|embed|logits)$")


@dataclass(frozen=True)
class Node:
    """A parsed node name: kind "embed" | "head" | "mlp" | "logits", its layer and head (or key/value head),
    and for a head receiver its input "q" | "k" | "v" (None for a head as a sender)."""

    kind: str
    layer: int = -1
    head: int = -1
    part: str | None = None
    kv: bool = False

    def __str__(self) -> str:
        if self.kind in ("embed", "logits"):
            return self.kind
        if self.kind == "mlp":
            return f"MLP{self.layer}"
        name = f"L{self.layer}{'KV' if self.kv else 'H'}{self.head}"
        return f"{name}.{self.part}" if self.part else name


def parse_node(name: str) -> Node:
    """`"L1H0.k"` -> Node("head", 1, 0, "k"); `"MLP2"`, `"embed"`, `"logits"`, `"L3KV1.v"` likewise."""
    m = _NODE.match(str(name).strip())
    if m is None:
        raise CircuitError(
            f"cannot read the node name {name!r}; nodes are named 'embed', 'L{{layer}}H{{head}}', 'MLP{{layer}}', "
            "'logits', and head inputs 'L{layer}H{head}.q' / '.k' / '.v' (e.g. 'L1H0.k')"
        )
    if name == "embed" or name == "logits":
        return Node(name)
    if m.group(5) is not None:
        return Node("mlp", int(m.group(5)))
    return Node("head", int(m.group(1)), int(m.group(3)), m.group(4), m.group(2) == "KV")


@dataclass(frozen=True)
class EdgeGraph:
    """Senders, receivers and the [n_senders, n_receivers] mask of real edges of a model's graph.

    Attributes:
        n_layers, n_heads, n_kv_heads: the model's shape (n_kv_heads < n_heads: grouped-query attention).
        parallel: parallel attention/MLP blocks (an MLP does not receive from its own layer's heads).
    """

    n_layers: int
    n_heads: int
    n_kv_heads: int
    parallel: bool = False
    _cache: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def gqa(self) -> bool:
        return self.n_kv_heads != self.n_heads

    @cached_property
    def senders(self) -> list[str]:
        """Sender names in forward order: embed, then per layer its heads and its MLP."""
        out = ["embed"]
        for layer in range(self.n_layers):
            out += [f"L{layer}H{h}" for h in range(self.n_heads)] + [f"MLP{layer}"]
        return out

    @cached_property
    def receivers(self) -> list[str]:
        """Receiver names in forward order: per layer the heads' q, k, v inputs and the MLP input; then logits."""
        kv = "KV" if self.gqa else "H"
        out = []
        for layer in range(self.n_layers):
            out += [f"L{layer}H{h}.q" for h in range(self.n_heads)]
            out += [f"L{layer}{kv}{h}.k" for h in range(self.n_kv_heads)]
            out += [f"L{layer}{kv}{h}.v" for h in range(self.n_kv_heads)]
            out.append(f"MLP{layer}")
        return out + ["logits"]

    @cached_property
    def sender_index(self) -> dict[str, int]:
        return {s: i for i, s in enumerate(self.senders)}

    @cached_property
    def receiver_index(self) -> dict[str, int]:
        return {r: i for i, r in enumerate(self.receivers)}

    def sender_layer(self, name: str) -> tuple[int, int]:
        """(layer, stage) of a sender: embed (-1, 2), a head (layer, 0), an MLP (layer, 1)."""
        n = parse_node(name)
        return {"embed": (-1, 2), "head": (n.layer, 0), "mlp": (n.layer, 1)}[n.kind]

    @cached_property
    def mask(self) -> Tensor:
        """[n_senders, n_receivers] bool: True where the sender feeds the receiver (a real edge)."""
        s_layer = torch.tensor([self.sender_layer(s)[0] for s in self.senders])
        s_head = torch.tensor([self.sender_layer(s)[1] == 0 for s in self.senders])
        out = torch.zeros(len(self.senders), len(self.receivers), dtype=torch.bool)
        for j, r in enumerate(self.receivers):
            n = parse_node(r)
            if n.kind == "logits":
                out[:, j] = True
            elif n.kind == "head":
                out[:, j] = s_layer < n.layer
            else:  # an MLP reads its own layer's heads unless the block is parallel
                same = (s_layer == n.layer) & s_head & (not self.parallel)
                out[:, j] = (s_layer < n.layer) | same
        return out

    @cached_property
    def n_edges(self) -> int:
        return int(self.mask.sum())

    def edges(self) -> list[tuple[str, str]]:
        """Every real edge as (sender, receiver), receivers in forward order, then senders."""
        idx = self.mask.T.nonzero().tolist()
        return [(self.senders[s], self.receivers[r]) for r, s in idx]

    def check_sender(self, name: str) -> str:
        name = str(parse_node(name))
        if name not in self.sender_index:
            raise CircuitError(
                f"{name!r} is not a sender of this {self.n_layers}-layer, {self.n_heads}-head model; senders are "
                f"'embed', 'L{{layer}}H{{head}}' and 'MLP{{layer}}' (e.g. {self.senders[1]!r})"
            )
        return name

    def check_receiver(self, name: str) -> list[str]:
        """A receiver name as the receivers it stands for: a head "L1H0" means its q, k and v inputs."""
        n = parse_node(name)
        if n.kind == "head" and n.part is None:
            names = [f"L{n.layer}H{n.head}.q"] + [self._kv_name(n.layer, n.head, p) for p in "kv"]
        elif n.kind == "head" and n.part in "kv" and not n.kv and self.gqa:
            names = [self._kv_name(n.layer, n.head, n.part)]
        else:
            names = [str(n)]
        for r in names:
            if r not in self.receiver_index:
                raise CircuitError(
                    f"{r!r} is not a receiver of this {self.n_layers}-layer, {self.n_heads}-head model; receivers "
                    "are 'L{layer}H{head}.q' / '.k' / '.v' (key/value heads 'L{layer}KV{group}.k' with grouped-"
                    "query attention), 'MLP{layer}' and 'logits'"
                )
        return names

    def _kv_name(self, layer: int, head: int, part: str) -> str:
        if not self.gqa:
            return f"L{layer}H{head}.{part}"
        return f"L{layer}KV{head // (self.n_heads // self.n_kv_heads)}.{part}"

    def is_edge(self, sender: str, receiver: str) -> bool:
        s, r = self.sender_index.get(sender), self.receiver_index.get(receiver)
        return s is not None and r is not None and bool(self.mask[s, r])

    def edge_mask(self, edges) -> Tensor:
        """[n_senders, n_receivers] bool of the given (sender, receiver[, score]) edges; unknown names or
        pairs that are not edges raise a `CircuitError`."""
        out = torch.zeros_like(self.mask)
        for e in edges:
            s, r = e[0], e[1]
            if not self.is_edge(s, r):
                self.check_sender(s)
                self.check_receiver(r)
                raise CircuitError(f"({s!r}, {r!r}) is not an edge: {s} is computed after {r} reads the stream")
            out[self.sender_index[s], self.receiver_index[r]] = True
        return out

    # ----------------------------------------------------------------------------------- hook points
    def sender_hooks(self) -> list[str]:
        """The hook points holding the senders' outputs, in forward order."""
        names = ["blocks.0.hook_resid_pre"]
        for layer in range(self.n_layers):
            names += [f"blocks.{layer}.attn.hook_result", f"blocks.{layer}.hook_mlp_out"]
        return names

    def receiver_hooks(self) -> list[str]:
        """The hook points holding the receivers' inputs, in forward order."""
        names = []
        for layer in range(self.n_layers):
            names += [f"blocks.{layer}.hook_{p}_input" for p in "qkv"] + [f"blocks.{layer}.hook_mlp_in"]
        return names + [f"blocks.{self.n_layers - 1}.hook_resid_post"]

    def sender_slices(self) -> list[tuple[str, int | None]]:
        """Per sender (in order): its hook point and the head index into it (None: the whole tensor)."""
        out: list[tuple[str, int | None]] = [("blocks.0.hook_resid_pre", None)]
        for layer in range(self.n_layers):
            out += [(f"blocks.{layer}.attn.hook_result", h) for h in range(self.n_heads)]
            out.append((f"blocks.{layer}.hook_mlp_out", None))
        return out

    def receiver_slices(self) -> list[tuple[str, int | None]]:
        """Per receiver (in order): its hook point and the head index into it (None: the whole tensor)."""
        out: list[tuple[str, int | None]] = []
        for layer in range(self.n_layers):
            out += [(f"blocks.{layer}.hook_q_input", h) for h in range(self.n_heads)]
            out += [(f"blocks.{layer}.hook_k_input", h) for h in range(self.n_kv_heads)]
            out += [(f"blocks.{layer}.hook_v_input", h) for h in range(self.n_kv_heads)]
            out.append((f"blocks.{layer}.hook_mlp_in", None))
        return out + [(f"blocks.{self.n_layers - 1}.hook_resid_post", None)]

    def receivers_at(self, hook: str) -> list[int]:
        """Receiver indices read at one hook point (several for a per-head hook), in head order."""
        table = self._cache.get("at")
        if table is None:
            table = {}
            for j, (name, _) in enumerate(self.receiver_slices()):
                table.setdefault(name, []).append(j)
            self._cache["at"] = table
        return table[hook]

    def column(self, name: str) -> tuple[int, int]:
        """(column, row) of a node in the circuit figure: layers as columns (heads, then the MLP), embed first,
        logits last; a head receiver sits on its head."""
        n = parse_node(name)
        if n.kind == "embed":
            return 0, 0
        if n.kind == "logits":
            return 2 * self.n_layers + 1, 0
        if n.kind == "mlp":
            return 2 * n.layer + 2, 0
        head = n.head * (self.n_heads // self.n_kv_heads) if n.kv else n.head
        return 2 * n.layer + 1, head


_UNSPLIT = {
    "yoco": "YOCO's cross-decoder layers share one key/value cache computed once, so their key and value inputs "
    "are not per-layer receivers",
    "mod": "mixture-of-depths blocks compute only the tokens they route, so a block's inputs are not the "
    "residual stream at every position",
}


def edge_graph(model) -> EdgeGraph:
    """The edge graph of a tinygpt model (see the module docstring); a `CircuitError` for a variant whose
    computation is not a sum of heads and MLPs into per-head query/key/value inputs (YOCO, mixture-of-depths),
    naming why and what to use instead. Grouped-query attention, rotary, gated or mixture-of-experts MLPs,
    RMSNorm, parallel attention/MLP blocks and differential attention are fine."""
    cfg = model.cfg
    for variant in getattr(cfg, "variants", []):
        if variant in _UNSPLIT:
            raise CircuitError(
                f"edge methods cannot split this model ({variant}=True): {_UNSPLIT[variant]}; use node-level "
                "patching (patch_heads, attribution_patch) on it, or a model without that variant"
            )
    n_kv = getattr(cfg, "n_key_value_heads", None) or cfg.n_heads
    return EdgeGraph(cfg.n_layers, cfg.n_heads, n_kv, bool(getattr(cfg, "parallel_attn_mlp", False)))


_SWITCHES = ("use_attn_result", "use_split_qkv_input", "use_hook_mlp_in")


@contextlib.contextmanager
def edge_hooks(model, switches: tuple[str, ...] = _SWITCHES) -> Iterator[None]:
    """The hook switches edge methods need on inside (`set_use_attn_result`, `set_use_split_qkv_input`,
    `set_use_hook_mlp_in`, or those named), each restored afterwards; a `CircuitError` naming the fix where the
    model cannot."""
    cfg = model.cfg
    old = {name: bool(getattr(cfg, name, False)) for name in switches}
    try:
        for name in switches:
            setter = getattr(model, f"set_{name}", None)
            if setter is None:
                raise CircuitError(
                    f"this model has no set_{name}() switch, which edge methods need (each head's output and "
                    "query/key/value input as its own hook point); use a tinygpt GPT"
                )
            try:
                setter(True)
            except TinyGPTError as e:
                raise CircuitError(
                    f"{e}; edge methods need each head's output and input as separate hook points, so use "
                    "node-level methods (attribution_patch, patch_heads) on this model"
                ) from e
        yield
    finally:
        for name, value in old.items():
            setattr(cfg, name, value)


@dataclass
class Circuit:
    """A set of edges, ranked: `(sender, receiver, score)` triples, strongest first.

    Iterating gives the triples; `(sender, receiver) in circuit` tests membership; `.figure()` draws it.
    """

    edges: list[tuple[str, str, float]]
    graph: EdgeGraph

    def __len__(self) -> int:
        return len(self.edges)

    def __iter__(self):
        return iter(self.edges)

    def __getitem__(self, i):
        return self.edges[i]

    def __contains__(self, edge) -> bool:
        return (edge[0], edge[1]) in {(s, r) for s, r, _ in self.edges}

    @property
    def nodes(self) -> list[str]:
        """The components the circuit touches ("L1H0" for any of its inputs), in forward order."""
        seen = {s for s, _, _ in self.edges} | {r.split(".")[0] for _, r, _ in self.edges}
        order = [*self.graph.senders, "logits"]
        kv = [n for n in seen if n not in order]  # key/value heads of grouped-query attention
        return [n for n in order if n in seen] + sorted(kv)

    def __repr__(self) -> str:
        top = ", ".join(f"{s}->{r} {v:+.3f}" for s, r, v in self.edges[:3])
        return f"Circuit({len(self.edges)} edges, {len(self.nodes)} nodes; {top}{', ...' if len(self) > 3 else ''})"

    def figure(self, title: str | None = None):
        """Plotly graph: layers as columns (heads, then the MLP), embed left, logits right; an edge's width is
        its |score|, its colour the sign (blue +, red -), its dash the head input (q solid, k dash, v dot)."""
        import plotly.graph_objects as go

        g = self.graph
        mid = (g.n_heads - 1) / 2

        def xy(name: str, part: str | None = None) -> tuple[float, float]:
            col, row = g.column(name)
            n = parse_node(name)
            y = float(row) if n.kind == "head" else mid
            if n.kind == "mlp":
                y = mid
            return float(col), -(y + {"q": -0.18, "k": 0.0, "v": 0.18}.get(part or "", 0.0))

        fig = go.Figure()
        top = max((abs(v) for _, _, v in self.edges), default=1.0) or 1.0
        for s, r, v in reversed(self.edges):  # strongest drawn last (on top)
            part = parse_node(r).part
            (x0, y0), (x1, y1) = xy(s), xy(r, part)
            fig.add_trace(
                go.Scatter(
                    x=[x0, x1],
                    y=[y0, y1],
                    mode="lines",
                    line=dict(
                        width=1 + 7 * abs(v) / top,
                        color="#2166ac" if v >= 0 else "#b2182b",
                        dash={"k": "dash", "v": "dot"}.get(part or "", "solid"),
                    ),
                    opacity=0.35 + 0.65 * abs(v) / top,
                    hoverinfo="text",
                    text=f"{s} -> {r}: {v:+.4f}",
                    showlegend=False,
                )
            )
        used = set(self.nodes)
        names = ["embed"] + [s for s in g.senders if s != "embed"] + ["logits"]
        pts = [xy(n) for n in names]
        fig.add_trace(
            go.Scatter(
                x=[p[0] for p in pts],
                y=[p[1] for p in pts],
                mode="markers+text",
                text=names,
                textposition="top center",
                marker=dict(
                    size=[16 if n in used else 8 for n in names],
                    color=["#333333" if n in used else "#cccccc" for n in names],
                ),
                hoverinfo="text",
                showlegend=False,
            )
        )
        ticks = ["embed"] + [f"{k}{layer}" for layer in range(g.n_layers) for k in ("attn ", "MLP ")] + ["logits"]
        fig.add_annotation(
            text="width |score|; blue +, red -; into a head: q solid, k dashed, v dotted",
            xref="paper",
            yref="paper",
            x=0,
            y=-0.16,
            showarrow=False,
            font=dict(size=11, color="#555555"),
        )
        fig.update_layout(
            title=title or f"Circuit: {len(self.edges)} edges",
            xaxis=dict(tickvals=list(range(len(ticks))), ticktext=ticks, showgrid=False, zeroline=False),
            yaxis=dict(visible=False, range=[-(g.n_heads - 1) - 0.6, 0.6]),
            template="plotly_white",
            height=max(320, 70 * g.n_heads + 120),
            width=min(1400, 200 + 120 * len(ticks)),
        )
        return fig
