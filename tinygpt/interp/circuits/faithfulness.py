"""Faithfulness of a circuit: run the model with every edge outside it patched, and measure how much of the
clean-vs-corrupted metric gap the circuit alone keeps.

An edge u -> v is patched by rebuilding v's input in the running (clean) forward: the residual stream v reads
is the sum of its senders' outputs plus biases, so

    v_in  <-  v_in - Σ_{u outside the circuit} (u_live - u_replacement)

is exact, with u_live the sender's output in this very forward (it may itself have changed upstream) and
u_replacement its output in the corrupted run (`ablation="corrupted"`) or its mean over a reference batch
(`ablation="mean"`, per position; the reference defaults to the corrupted prompts). With no edge kept every
receiver reads the corrupted stream, so the run is the corrupted run; with every edge kept it is the clean run.

    recovered(circuit) = (metric(circuit) - metric(empty)) / (metric(clean) - metric(empty))

where "empty" keeps no edge (the corrupted run for `ablation="corrupted"`). A curve over circuit sizes takes the
circuit's edges in rank order (strongest first) and evaluates each prefix; the runs for several sizes are
batched into one forward (replicas of the prompts, each with its own edge mask).

    res = edge_attribution_patch(model, clean, corrupted, correct=y, incorrect=n)
    f = faithfulness(model, res.circuit(20), clean, corrupted, correct=y, incorrect=n)
    f.recovered, f.size_for(0.8), f.figure()
    whole = faithfulness(model, res, clean, corrupted, correct=y, incorrect=n)   # curve over the whole ranking
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from tinygpt.inputs import as_tokens, eval_mode
from tinygpt.interp.circuits._common import scalar_metric
from tinygpt.interp.circuits.edges import EdgeAttributionResult, _senders
from tinygpt.interp.circuits.graph import Circuit, CircuitError, EdgeGraph, edge_graph, edge_hooks
from tinygpt.interp.patching.api import _pair
from tinygpt.interp.patching.metrics import Metric, resolve_metric

__all__ = ["FaithfulnessResult", "faithfulness"]

ABLATIONS = ("corrupted", "mean")
_TOKEN_BUDGET = 8192  # replica tokens per batched forward


@dataclass
class FaithfulnessResult:
    """The metric with only a circuit's edges left clean, over circuit sizes.

    Attributes:
        sizes: circuit sizes evaluated (prefixes of the ranked circuit), ascending.
        values: the metric at each size.
        curve: the fraction of the gap recovered at each size.
        clean_metric, corrupted_metric: the metric on the two unpatched runs.
        empty_metric: the metric with no edge kept (equal to `corrupted_metric` for `ablation="corrupted"`).
        n_edges: edges in the model's graph.
        edges: the circuit, ranked (sender, receiver, score or None).
        ablation: "corrupted" or "mean".
    """

    sizes: list[int]
    values: list[float]
    curve: list[float]
    clean_metric: float
    corrupted_metric: float
    empty_metric: float
    n_edges: int
    edges: list[tuple[str, str, float | None]]
    ablation: str = "corrupted"
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def recovered(self) -> float:
        """The fraction of the gap the whole circuit recovers (the curve's last point)."""
        return self.curve[-1]

    def size_for(self, fraction: float) -> int | None:
        """The smallest evaluated size recovering at least `fraction` of the gap (None if none does)."""
        return next((n for n, f in zip(self.sizes, self.curve) if f >= fraction), None)

    def __repr__(self) -> str:
        return (
            f"FaithfulnessResult({len(self.edges)} of {self.n_edges} edges recover {self.recovered:.3f} of the gap "
            f"({self.ablation}); clean {self.clean_metric:.4f}, empty {self.empty_metric:.4f})"
        )

    def figure(self, title: str | None = None):
        """Plotly line: the fraction of the gap recovered against circuit size (log axis)."""
        import plotly.graph_objects as go

        x = [max(n, 0.5) for n in self.sizes]  # size 0 drawn at 0.5 on the log axis
        fig = go.Figure(
            go.Scatter(
                x=x,
                y=self.curve,
                mode="lines+markers",
                text=[f"{n} edges: {f:.3f}" for n, f in zip(self.sizes, self.curve)],
                hoverinfo="text",
            )
        )
        fig.add_hline(y=1.0, line_dash="dot", line_color="#888888")
        fig.update_layout(
            title=title or f"Faithfulness ({self.ablation} ablation outside the circuit)",
            xaxis=dict(title="edges in the circuit", type="log", tickvals=x, ticktext=[str(n) for n in self.sizes]),
            yaxis=dict(title="fraction of the clean - corrupted gap recovered"),
            template="plotly_white",
            height=380,
            width=640,
        )
        return fig


# ------------------------------------------------------------------------------------------ the engine
def patched_edges_run(
    model, graph: EdgeGraph, tokens: Tensor, replacement: Tensor, masks: Tensor, metric: Metric
) -> list[float]:
    """The metric of one run of `tokens` per mask, each with its masked edges patched to `replacement`.

    Args:
        model: the model, with `edge_hooks` on.
        tokens: the base prompts [batch, pos].
        replacement: every sender's replacement output [batch, pos, n_senders, d_model].
        masks: [k, n_senders, n_receivers] bool: the edges patched in each of k runs.
        metric: logits [batch, pos, d_vocab] -> scalar, applied to each run's rows.

    The k runs share one forward (k replicas of the batch), chunked to bound memory.
    """
    b, t = tokens.shape
    per = max(1, _TOKEN_BUDGET // (b * t))
    out: list[float] = []
    for i in range(0, len(masks), per):
        m = masks[i : i + per].to(replacement.device)
        logits = _run_chunk(model, graph, tokens, replacement, m)
        out += [float(scalar_metric(metric(logits[j * b : (j + 1) * b]))) for j in range(len(m))]
    return out


def _run_chunk(model, graph: EdgeGraph, tokens: Tensor, replacement: Tensor, masks: Tensor) -> Tensor:
    k, (b, t) = len(masks), tokens.shape
    deltas: list[tuple[int, Tensor]] = []  # (first sender index, live - replacement [k, b, pos, n, d_model])
    repl = replacement.to(torch.float32)
    masks_f = masks.to(torch.float32)

    first: dict[str, int] = {}
    for i, (name, _) in enumerate(graph.sender_slices()):
        first.setdefault(name, i)

    def capture(act: Tensor, hook) -> None:
        x = act if act.ndim == 4 else act[:, :, None]
        s0 = first[hook.name]
        live = x.reshape(k, b, *x.shape[1:]).float()
        deltas.append((s0, live - repl[None, :, :, s0 : s0 + x.shape[2]]))

    def rebuild(act: Tensor, hook) -> Tensor:
        cols = graph.receivers_at(hook.name)
        corr = sum(torch.einsum("kbpsd,ksr->kbprd", d, masks_f[:, s0 : s0 + d.shape[3], cols]) for s0, d in deltas)
        corr = corr.reshape(k * b, t, len(cols), -1).to(act.dtype)
        return act - (corr if act.ndim == 4 else corr[:, :, 0])

    hooks = [(name, capture) for name in graph.sender_hooks()]
    hooks += [(name, rebuild) for name in graph.receiver_hooks()]
    with torch.no_grad(), model.hooks(fwd_hooks=hooks):
        return model(tokens.repeat(k, 1))


# ------------------------------------------------------------------------------------------------- main
def _ranked_edges(circuit: Any) -> list[tuple[str, str, float | None]]:
    if isinstance(circuit, EdgeAttributionResult):
        return circuit.ranked()
    if isinstance(circuit, Circuit):
        return list(circuit.edges)
    try:
        edges = [tuple(e) for e in circuit]
    except TypeError:
        edges = None
    if edges is None or any(len(e) not in (2, 3) for e in edges):
        raise CircuitError(
            "circuit must be an EdgeAttributionResult, a Circuit (result.circuit(n)) or a list of (sender, "
            "receiver) or (sender, receiver, score) edges"
        )
    return [(str(e[0]), str(e[1]), e[2] if len(e) == 3 else None) for e in edges]


def _default_sizes(n: int) -> list[int]:
    steps = [0, 1, 2, 3, 5]
    scale = 10
    while scale < n:
        steps += [scale, 2 * scale, 5 * scale]
        scale *= 10
    return sorted({s for s in steps if s <= 0.8 * n or s <= 5} & set(range(n)) | {n})  # none crowding n


def faithfulness(
    model,
    circuit: Any,
    clean: Any,
    corrupted: Any,
    metric: Metric | None = None,
    *,
    ablation: str = "corrupted",
    sizes: Sequence[int] | None = None,
    reference: Any = None,
    correct: Any = None,
    incorrect: Any = None,
    progress: bool | None = None,
) -> FaithfulnessResult:
    """How much of the clean-vs-corrupted gap a circuit recovers with every other edge patched (see the
    module docstring).

    Args:
        model: a tinygpt model (eval mode and the edge hook switches for the runs, then restored).
        circuit: an `EdgeAttributionResult` (its whole ranking), a `Circuit` (`result.circuit(n)`), or a list of
            (sender, receiver[, score]) edges, strongest first.
        clean, corrupted: prompts of equal token length (text, texts, or tokens [batch, pos]).
        metric: logits -> scalar; default the logit difference of correct vs incorrect at the last position.
        ablation: "corrupted" (an edge outside the circuit carries its sender's corrupted output) or "mean"
            (its sender's mean output over `reference`, per position).
        sizes: circuit sizes to evaluate (prefixes of the ranking); default 0, 1, 2, 3, 5, 10, 20, 50, ... and
            the whole circuit.
        reference: prompts for `ablation="mean"` (same length as `clean`; default the corrupted prompts).
        correct, incorrect: answer tokens for the default metric.
        progress: unused (one batched forward per chunk of sizes); accepted for the shared signature.

    Returns:
        A `FaithfulnessResult`: `.recovered` (the whole circuit), `.curve` over `.sizes`, `.figure()`.
    """
    del progress  # one batched forward per chunk: no bar
    if ablation not in ABLATIONS:
        raise CircuitError(f"ablation must be 'corrupted' or 'mean', got {ablation!r}")
    graph = edge_graph(model)
    clean_t, corrupted_t = _pair(model, clean, corrupted)
    edges = _ranked_edges(circuit)
    graph.edge_mask(edges)  # every edge valid, or a CircuitError naming it
    n = len(edges)
    if sizes is None:
        size_list = _default_sizes(n)
    else:
        size_list = sorted({int(s) for s in sizes})
        if size_list and not 0 <= size_list[0] <= size_list[-1] <= n:
            raise CircuitError(f"sizes must lie in 0..{n} (the circuit's {n} edges), got {list(sizes)}")
        if not size_list:
            raise CircuitError("give at least one size")
    with eval_mode(model):
        with torch.no_grad():
            clean_logits = model(clean_t)
        corrupted_logits, replacement = _senders(model, graph, corrupted_t)
        fn = resolve_metric(model, metric, correct, incorrect, clean_logits, corrupted_logits)
        with torch.no_grad():
            clean_value = float(scalar_metric(fn(clean_logits)))
            corrupted_value = float(scalar_metric(fn(corrupted_logits)))
        if ablation == "mean":
            ref = corrupted_t
            if reference is not None:
                ref = as_tokens(model, reference, what="reference", error=CircuitError)
            if ref.shape[1] != clean_t.shape[1]:
                raise CircuitError(
                    f"reference prompts have {ref.shape[1]} tokens, the clean ones {clean_t.shape[1]}; mean ablation "
                    "is per position, so give reference prompts of the same length"
                )
            replacement = _senders(model, graph, ref)[1].mean(0, keepdim=True).expand(clean_t.shape[0], -1, -1, -1)
        idx = [(graph.sender_index[s], graph.receiver_index[r]) for s, r, _ in edges]
        real = graph.mask
        masks = []
        for size in [0, *size_list]:  # size 0 first: the empty circuit's metric
            keep = torch.zeros_like(real)
            for s, r in idx[:size]:
                keep[s, r] = True
            masks.append(real & ~keep)
        with edge_hooks(model):
            values = patched_edges_run(model, graph, clean_t, replacement, torch.stack(masks), fn)
    empty, values = values[0], values[1:]
    span = clean_value - empty
    if span == 0:
        raise CircuitError("the clean run and the empty circuit give the same metric: nothing to recover")
    curve = [(v - empty) / span for v in values]
    return FaithfulnessResult(
        size_list,
        values,
        curve,
        clean_value,
        corrupted_value,
        empty,
        graph.n_edges,
        edges,
        ablation,
        meta=dict(clean_tokens=clean_t, corrupted_tokens=corrupted_t),
    )
