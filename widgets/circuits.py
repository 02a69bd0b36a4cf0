"""`CircuitDashboard`: a circuit between a clean and a corrupted prompt, found by edge attribution and checked by
faithfulness.

    from tinygpt.widgets import CircuitDashboard
    dash = CircuitDashboard(model, "abcdefgh abcdefg", "abcdefXh abcdefg", correct="h", incorrect="X")
    dash                          # displays in a notebook
    dash.result.top(5)            # the state lives in the pure result objects
    dash.circuit, dash.faith      # the circuit of `size` edges and its faithfulness curve

A thin layer over `tinygpt.interp` (edge attribution, path patching, faithfulness): the metric is the logit
difference correct − incorrect at the last position (as `PatchingDashboard`'s). The method scores every edge of
the model's graph (`tinygpt.interp.circuits.graph`):

- "EAP" / "EAP-IG": `edge_attribution_patch(method="eap" / "eap-ig")`, the first-order estimate (EAP-IG's
  gradient averaged over `steps` points of the corrupted → clean path);
- "exact": `edge_attribution_patch(method="exact")`, every edge patched alone, clean into the corrupted run
  (one pair of forwards per edge, so for small models);
- "AtP": the node view; the node table's score is `node_attribution`'s (attribution patching of each node), and
  the edges drawn and checked are AtP applied to every edge, i.e. EAP (whose scores out of a node add up to that
  node's AtP).

The circuit is the `size` strongest edges (`result.circuit(size)`), drawn by `Circuit.figure()` (layers as
columns, edge width |score|, colour its sign); the faithfulness curve is `faithfulness(model, circuit, ...)`
over its prefixes (every edge outside the circuit patched to the corrupted run). Changing the prompts, answers
or method recomputes the scores; the size slider only re-cuts the circuit and reruns faithfulness.
"""

from __future__ import annotations

import html
from typing import Any

import ipywidgets as W
import plotly.graph_objects as go

from tinygpt.inputs import progress_enabled
from tinygpt.interp import (
    CircuitError,
    EdgeAttributionResult,
    edge_attribution_patch,
    edge_graph,
    faithfulness,
    node_attribution,
)

from ._inputs import parse_answer, parse_tokens, prompt_box
from .base import Dashboard, show_figure

METHODS = {"AtP": "atp", "EAP": "eap", "EAP-IG": "eap-ig", "exact": "exact"}
MAX_EDGES = 100  # the size slider's default upper end


class CircuitDashboard(Dashboard):
    """Clean / corrupted prompts, answer tokens, a method and a circuit size; the circuit graph, its
    faithfulness curve and the node table.

    Attributes:
        result (EdgeAttributionResult): every edge's score under the current method ("exact": the exact
            single-edge patching effects, in the same layout; "AtP": EAP's).
        circuit (Circuit): the `size` strongest edges of `result`.
        faith (FaithfulnessResult): the circuit's faithfulness curve.
        node_scores (dict[str, float]): node -> its score (the scores out of it; "AtP": `attribution_patch`'s).
        rows (list[dict]): the node table (one row per node of the circuit).
        Controls: `clean`, `corrupted`, `correct`, `incorrect` (Text; apply on Enter; a blank answer means the
        clean / corrupted run's top prediction), `method` (Dropdown), `size` (IntSlider, edges in the circuit),
        `run_button`; outputs: `graph_fig`, `faith_fig` (plotly FigureWidgets), `table` (HTML), `status`,
        `output`.
    """

    def __init__(
        self,
        model,
        clean: Any,
        corrupted: Any,
        correct: str | int | None = None,
        incorrect: str | int | None = None,
        *,
        method: str = "EAP",
        size: int = 20,
        steps: int = 5,
        max_edges: int = MAX_EDGES,
        progress: bool | None = None,
    ):
        """
        Args:
            model: a `tinygpt.GPT` (without a tokenizer, prompts and answers are token ids).
            clean, corrupted: prompts with the same number of tokens: text, or token ids (a model without a
                tokenizer takes ids typed as "5 17 3").
            correct, incorrect: single-token answers for the logit difference, as text or a token id (None: the
                clean and corrupted runs' top predictions at the last position).
            method: "AtP", "EAP", "EAP-IG" or "exact" (see the module docstring).
            size: edges in the circuit at the start.
            steps: EAP-IG's gradient evaluations.
            max_edges: the size slider's upper end (at most the graph's number of edges).
            progress: tqdm progress bars (None: the package default).
        """
        super().__init__()
        names = {k.lower(): k for k in METHODS} | {v: k for k, v in METHODS.items()}
        if str(method).lower() not in names:
            raise CircuitError(f"method must be one of {list(METHODS)}, got {method!r}")
        self.model = model
        self.steps = steps
        self.progress = progress_enabled(progress)
        self.result: EdgeAttributionResult | None = None
        self.circuit = None
        self.faith = None
        self.node_scores: dict[str, float] = {}
        self.rows: list[dict[str, Any]] = []
        try:
            n_edges = edge_graph(model).n_edges
        except CircuitError as e:  # YOCO, mixture-of-depths: say why, keep the controls
            n_edges = max(1, size)
            self._warn(e)
            self._unsplit = True
        else:
            self._unsplit = False

        self.clean = prompt_box(model, clean, "clean", "48%")
        self.corrupted = prompt_box(model, corrupted, "corrupted", "48%")
        answer = dict(placeholder="top prediction", width="24%")
        self.correct = prompt_box(model, _answer_text(correct), "correct", **answer)
        self.incorrect = prompt_box(model, _answer_text(incorrect), "incorrect", **answer)
        self.method = W.Dropdown(options=list(METHODS), value=names[str(method).lower()], description="method")
        top = max(1, min(max_edges, n_edges))
        self.size = W.IntSlider(
            value=max(1, min(size, top)), min=1, max=top, description="edges", continuous_update=False
        )
        self.run_button = W.Button(description="find circuit", icon="play", tooltip="recompute the edge scores")
        self.graph_fig = go.FigureWidget()
        self.faith_fig = go.FigureWidget()
        self.table = W.HTML()

        self._observe(self.run, self.clean, self.corrupted, self.correct, self.incorrect, self.method)
        self._observe(self.cut, self.size)
        self._on_click(self.run_button, self.run)
        self._layout(
            "Circuit discovery: clean → corrupted",
            W.HBox([self.clean, self.corrupted]),
            W.HBox([self.correct, self.incorrect]),
            W.HBox([self.method, self.size, self.run_button]),
            self.status,
            self.output,
            self.graph_fig,
            W.HBox([self.faith_fig, self.table]),
        )
        if not self._unsplit:
            self._run(self.run)

    # ------------------------------------------------------------------ actions
    def _inputs(self):
        for name, w in (("clean", self.clean), ("corrupted", self.corrupted)):
            if not w.value:
                raise CircuitError(f"type a {name} prompt")
        clean = parse_tokens(self.model, self.clean.value)
        corrupted = parse_tokens(self.model, self.corrupted.value)
        if clean.shape != corrupted.shape:
            raise CircuitError(
                f"clean and corrupted prompts must have the same number of tokens, got {clean.shape[1]} and "
                f"{corrupted.shape[1]}; change the corrupted prompt without changing its length"
            )
        c, k = self.correct.value, self.incorrect.value
        answers = dict(
            correct=parse_answer(self.model, c) if c else None,
            incorrect=parse_answer(self.model, k) if k else None,
        )
        return clean, corrupted, answers

    def run(self) -> EdgeAttributionResult | None:
        """Score every edge with the current method for the current prompts and answers, and redraw."""
        with self._reporting(ValueError):
            clean, corrupted, answers = self._inputs()
            method = METHODS[self.method.value]
            self._say(f"<i>scoring edges ({html.escape(self.method.value)})…</i>")
            result = edge_attribution_patch(
                self.model,
                clean,
                corrupted,
                method="eap" if method == "atp" else method,
                steps=self.steps,
                progress=self.progress,
                **answers,
            )
            if method == "atp":
                nodes = node_attribution(self.model, clean, corrupted, **answers)
            else:
                nodes = dict(result.sender_scores())
            nodes["logits"] = result.receiver_scores()["logits"]
            self.result, self.node_scores, self._pair = result, nodes, (clean, corrupted, answers)
            self.cut()
        return self.result

    def cut(self) -> None:
        """Take the `size` strongest edges of `result`, rerun faithfulness and redraw (no rescoring)."""
        if self.result is None:
            return
        with self._reporting(ValueError):
            clean, corrupted, answers = self._pair
            self.circuit = self.result.circuit(self.size.value)
            self.faith = faithfulness(self.model, self.circuit, clean, corrupted, **answers)
            self.draw()

    def draw(self) -> None:
        """Redraw the graph, the curve and the table from `result`, `circuit` and `faith`."""
        r, c, f = self.result, self.circuit, self.faith
        name = self.method.value
        title = f"{name}: top {len(c)} of {r.graph.n_edges} edges"
        show_figure(self.graph_fig, c.figure(title=title))
        show_figure(self.faith_fig, f.figure(title=f"Faithfulness of the {name} ranking"))
        self.rows = node_rows(c, self.node_scores)
        self.table.value = _table_html(self.rows, name)
        s, rcv, v = c.edges[0] if len(c) else ("-", "-", 0.0)
        self._say(
            f"metric: logit difference at the last position · clean <b>{r.clean_metric:.3f}</b>, corrupted "
            f"<b>{r.corrupted_metric:.3f}</b> · {len(c)} edges recover <b>{f.recovered:.0%}</b> of the gap · "
            f"strongest edge {html.escape(s)} → {html.escape(rcv)} ({v:+.3f})"
        )

    def __repr__(self) -> str:
        n = len(self.circuit) if self.circuit is not None else 0
        rec = f", recovered={self.faith.recovered:.3f}" if self.faith is not None else ""
        return f"CircuitDashboard(method={self.method.value!r}, edges={n}{rec})"


# ------------------------------------------------------------------ library calls the dashboard composes
def node_rows(circuit, node_scores: dict[str, float]) -> list[dict[str, Any]]:
    """The node table: one row per node of `circuit` (forward order) with its edges in / out of the circuit,
    the sum of those edges' scores, and the node's own score."""
    rows = []
    for node in circuit.nodes:
        out = [v for s, _, v in circuit if s == node]
        inn = [v for _, r, v in circuit if r.split(".")[0] == node]
        rows.append(
            dict(
                node=node,
                edges_in=len(inn),
                edges_out=len(out),
                circuit_score=sum(out) if node != "logits" else sum(inn),
                score=node_scores.get(node, float("nan")),
            )
        )
    return rows


def _table_html(rows: list[dict[str, Any]], method: str) -> str:
    head = (
        "<tr><th>node</th><th>edges in</th><th>edges out</th><th>circuit score</th>"
        f"<th>{html.escape(method)} node score</th></tr>"
    )
    body = "".join(
        f"<tr><td>{html.escape(r['node'])}</td><td>{r['edges_in']}</td><td>{r['edges_out']}</td>"
        f"<td>{r['circuit_score']:+.4f}</td><td>{r['score']:+.4f}</td></tr>"
        for r in rows
    )
    return (
        "<div style='max-height:380px;overflow-y:auto'><style>.tg-circuit td,.tg-circuit th{padding:1px 8px;"
        "text-align:right}</style><table class='tg-circuit' style='font-family:monospace;font-size:12px'>"
        f"{head}{body}</table><div style='color:#555;font-size:11px'>circuit score: the scores of the node's "
        "edges out of it in the circuit (into it, for logits); node score: every edge out of it (AtP: "
        "attribution_patch's)</div></div>"
    )


def _answer_text(answer: str | int | None) -> str:
    if answer is None:
        return ""
    return answer if isinstance(answer, str) else str(int(answer))


__all__ = ["CircuitDashboard", "node_rows"]
