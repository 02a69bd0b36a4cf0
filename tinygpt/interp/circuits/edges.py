"""Edge attribution patching: EAP (Syed et al. 2023) and EAP-IG (Hanna et al. 2024, "Have Faith in
Faithfulness"), a first-order estimate of patching every edge of the graph at once.

An edge carries a sender's output u into a receiver's input v (the graph and names: `graph.py`). Patching it
alone from the clean run into the corrupted one changes v's input by `u_clean - u_corrupted` and nothing else,
so to first order the metric moves by

    score(u -> v) = Σ_{batch, pos} (u_clean - u_corrupted) · ∂metric/∂v_in

with the gradient taken on the corrupted run (the denoising convention of `attribution_patch` and
TransformerLens 4.3; a positive score means the clean edge raises the metric). One corrupted forward and
backward gives every receiver's gradient, one clean forward every sender's output: each score is a dot
product. Because a receiver's input is the sum of its senders' outputs (plus biases equal in both runs), the
scores into a receiver add up to its own attribution `(v_clean - v_corrupted) · ∂metric/∂v_in`, and the scores
out of a sender to the sender's attribution (its output feeds the metric through those receivers only).

EAP-IG replaces the gradient by its average along the straight path of the input embeddings from corrupted to
clean, at the midpoints `(k + 1/2) / steps` of `steps` equal intervals (Hanna et al. use the left ends
`k / steps`; the midpoint rule is more accurate for the same number of forwards). With enough steps the scores
out of "embed" add up to the whole metric change (the integrated-gradients completeness property).

    res = edge_attribution_patch(model, clean, corrupted, correct=" Mary", incorrect=" John")
    res.edges[:3]                      # [("embed", "L0H0.q", 0.01), ...] in graph order
    res.circuit(20)                    # the 20 strongest edges (by |score|): a Circuit, .figure()
    res.circuit(threshold=0.05)        # every edge with |score| >= 0.05
    ig = edge_attribution_patch(model, clean, corrupted, method="eap-ig", steps=5)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from tinygpt.inputs import eval_mode, progress_enabled
from tinygpt.interp.circuits._common import add_zero, grad_enabled, scalar_metric
from tinygpt.interp.circuits.graph import Circuit, CircuitError, EdgeGraph, edge_graph, edge_hooks
from tinygpt.interp.patching.api import _pair
from tinygpt.interp.patching.metrics import Metric, resolve_metric

__all__ = ["Circuit", "EdgeAttributionResult", "EdgeGraph", "edge_attribution_patch", "edge_graph"]

METHODS = ("eap", "eap-ig", "exact")


@dataclass
class EdgeAttributionResult:
    """Every edge's attribution score.

    Attributes:
        scores: [n_senders, n_receivers] (rows `graph.senders`, columns `graph.receivers`); 0 where there is no
            edge (`graph.mask`).
        graph: the model's `EdgeGraph`.
        method: "eap", "eap-ig" (with `steps`) or "exact".
        clean_metric, corrupted_metric: the metric on the two runs.
    """

    scores: Tensor
    graph: EdgeGraph
    method: str
    clean_metric: float
    corrupted_metric: float
    steps: int = 1
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def edges(self) -> list[tuple[str, str, float]]:
        """Every edge as (sender, receiver, score), receivers in forward order."""
        g, s = self.graph, self.scores
        return [(a, b, float(s[g.sender_index[a], g.receiver_index[b]])) for a, b in g.edges()]

    def ranked(self) -> list[tuple[str, str, float]]:
        """Every edge, strongest |score| first (ties keep graph order)."""
        return sorted(self.edges, key=lambda e: -abs(e[2]))

    def score(self, sender: str, receiver: str) -> float:
        """The score of one edge (a `CircuitError` if the pair is not an edge)."""
        self.graph.edge_mask([(sender, receiver)])
        return float(self.scores[self.graph.sender_index[sender], self.graph.receiver_index[receiver]])

    def circuit(self, n: int | None = None, *, threshold: float | None = None) -> Circuit:
        """The top-`n` edges by |score|, or every edge with |score| >= `threshold` (both: the top n of those).

        Args:
            n: how many edges (default: all that pass `threshold`).
            threshold: the smallest |score| kept.
        """
        if n is None and threshold is None:
            raise CircuitError("give n= (the top-n edges by |score|) or threshold= (every edge with |score| >= it)")
        if n is not None and n < 0:
            raise CircuitError(f"n must be >= 0, got {n}")
        edges = self.ranked()
        if threshold is not None:
            edges = [e for e in edges if abs(e[2]) >= threshold]
        return Circuit(edges[:n] if n is not None else edges, self.graph)

    def receiver_scores(self) -> dict[str, float]:
        """receiver -> the sum of the scores into it (its own attribution score)."""
        return dict(zip(self.graph.receivers, self.scores.sum(0).tolist()))

    def sender_scores(self) -> dict[str, float]:
        """sender -> the sum of the scores out of it (its own attribution score)."""
        return dict(zip(self.graph.senders, self.scores.sum(1).tolist()))

    def top(self, k: int = 10) -> list[tuple[str, str, float]]:
        """The k strongest edges (by |score|)."""
        return self.ranked()[:k]

    def __repr__(self) -> str:
        top = ", ".join(f"{s}->{r} {v:+.3f}" for s, r, v in self.top(3))
        steps = f", steps={self.steps}" if self.method == "eap-ig" else ""
        return (
            f"EdgeAttributionResult({self.method}{steps}: {self.graph.n_edges} edges; top {top}; clean "
            f"{self.clean_metric:.4f}, corrupted {self.corrupted_metric:.4f})"
        )

    def figure(self, n: int = 30, *, threshold: float | None = None, title: str | None = None):
        """The top-`n` circuit drawn as a graph (`Circuit.figure`: layers as columns, edges weighted)."""
        c = self.circuit(n, threshold=threshold)
        return c.figure(title=title or f"{self.method.upper()}: top {len(c)} of {self.graph.n_edges} edges")


# ---------------------------------------------------------------------------------------- the stacks
def sender_stack(graph: EdgeGraph, acts: dict[str, Tensor]) -> Tensor:
    """Every sender's output [batch, pos, n_senders, d_model] (in `graph.senders` order) from the hook
    activations of `graph.sender_hooks()`."""
    parts = [acts["blocks.0.hook_resid_pre"][:, :, None]]
    for layer in range(graph.n_layers):
        parts += [acts[f"blocks.{layer}.attn.hook_result"], acts[f"blocks.{layer}.hook_mlp_out"][:, :, None]]
    return torch.cat(parts, dim=2)


def _receiver_scores(graph: EdgeGraph, delta: Tensor, grads: dict[str, Tensor]) -> Tensor:
    """[n_senders, n_receivers] = Σ_{batch, pos} delta[:, :, s] · grad at receiver r (one matrix product per
    receiver hook; non-edges zeroed)."""
    dtype = torch.promote_types(delta.dtype, torch.float32)  # float64 models keep float64
    n_s = delta.shape[2]
    d = delta.to(dtype).permute(2, 0, 1, 3).reshape(n_s, -1)  # [senders, batch * pos * d_model]
    out = torch.zeros(n_s, len(graph.receivers), dtype=dtype, device=delta.device)
    for name in graph.receiver_hooks():
        g = grads[name].to(dtype)
        g = g[:, :, None] if g.ndim == 3 else g
        out[:, graph.receivers_at(name)] = d @ g.permute(0, 1, 3, 2).reshape(-1, g.shape[2])
    return out * graph.mask.to(out.device)


def _senders(model, graph: EdgeGraph, tokens: Tensor) -> tuple[Tensor, Tensor]:
    """(logits, every sender's output [batch, pos, n_senders, d_model]) of a no-grad forward; only the
    head-output switch is needed for it (the per-head inputs cost a copy of the stream per head)."""
    with edge_hooks(model, ("use_attn_result",)), torch.no_grad():
        logits, cache = model.run_with_cache(tokens, names_filter=graph.sender_hooks())
    return logits, sender_stack(graph, cache)


def _gradients(model, graph: EdgeGraph, tokens: Tensor, fn, embed: Tensor | None):
    """One forward + backward of `tokens` with every edge switch on (the embeddings, `blocks.0.hook_resid_pre`,
    replaced by `embed` if given): d metric / d each receiver hook [batch, pos, (heads,) d_model], the senders'
    outputs [batch, pos, n_senders, d_model], the logits (detached) and the metric. `fn(logits)` returns the
    metric function (resolved from the logits of this run, for the default answers)."""
    zeros: dict[str, Tensor] = {}
    acts: dict[str, Tensor] = {}

    def keep(x: Tensor, hook) -> None:
        acts[hook.name] = x.detach()

    hooks = [(name, add_zero(zeros)) for name in graph.receiver_hooks()]
    hooks += [(name, keep) for name in graph.sender_hooks()]
    if embed is not None:
        hooks.insert(0, ("blocks.0.hook_resid_pre", lambda x, hook: embed))
    with edge_hooks(model), grad_enabled(), model.hooks(fwd_hooks=hooks):
        logits = model(tokens)
        value = scalar_metric(fn(logits.detach())(logits))
        names = list(zeros)
        grads = torch.autograd.grad(value, [zeros[n] for n in names], allow_unused=True)
    out = {n: (g if g is not None else torch.zeros_like(zeros[n])) for n, g in zip(names, grads)}
    return out, sender_stack(graph, acts), logits.detach(), float(value.detach())


# ----------------------------------------------------------------------------------------------- main
def edge_attribution_patch(
    model,
    clean: Any,
    corrupted: Any,
    metric: Metric | None = None,
    method: str = "eap",
    *,
    steps: int = 5,
    correct: Any = None,
    incorrect: Any = None,
    progress: bool | None = None,
) -> EdgeAttributionResult:
    """Score every edge of the model's graph (see the module docstring).

    Args:
        model: a tinygpt model (eval mode and the edge hook switches for the runs, then restored).
        clean, corrupted: prompts of equal token length: text, texts, or tokens [batch, pos].
        metric: logits [batch, pos, d_vocab] -> a scalar tensor (differentiable); default the logit difference
            of correct vs incorrect at the last position (the runs' top predictions when not given).
        method: "eap" (the gradient at the corrupted run), "eap-ig" (averaged along corrupted -> clean), or
            "exact" (each edge patched alone from the clean run: `path_patch` of every sender into one receiver
            at a time; two forwards per edge, for small models and for checking the estimates).
        steps: EAP-IG's number of gradient evaluations (forward + backward each); ignored by "eap".
        correct, incorrect: answer tokens for the default metric (ids or single-token strings).
        progress: a tqdm bar over EAP-IG's steps (None: the package default).

    Returns:
        An `EdgeAttributionResult`: `.edges`, `.circuit(n)`, `.figure()`, `.receiver_scores()`, ...

    Raises:
        CircuitError: unequal prompt lengths, a metric that is not a scalar tensor, an unknown method, or a
            model whose heads' inputs and outputs cannot be split (YOCO, mixture-of-depths).

    Cost: EAP is one clean forward (no gradient) and one corrupted forward + backward with the per-head inputs
    split; EAP-IG adds a corrupted forward and `steps` forwards + backwards.
    """
    method = str(method).lower().replace("_", "-")
    if method not in METHODS:
        raise CircuitError(f"unknown method {method!r}; choose 'eap', 'eap-ig' (with steps=) or 'exact'")
    if method == "eap-ig" and (not isinstance(steps, int) or steps < 1):
        raise CircuitError(f"steps must be a positive integer (EAP-IG's gradient evaluations), got {steps!r}")
    if method == "exact":
        return _exact_edges(model, clean, corrupted, metric, correct, incorrect, progress)
    graph = edge_graph(model)
    clean_t, corrupted_t = _pair(model, clean, corrupted)
    resolved: dict[str, Metric] = {}
    with eval_mode(model):
        clean_logits, u_clean = _senders(model, graph, clean_t)

        def fn(corrupted_logits: Tensor) -> Metric:  # the metric, resolved once from the first corrupted run
            if "fn" not in resolved:
                resolved["fn"] = resolve_metric(model, metric, correct, incorrect, clean_logits, corrupted_logits)
            return resolved["fn"]

        if method == "eap":
            grads, u_corrupted, corrupted_logits, _ = _gradients(model, graph, corrupted_t, fn, None)
            n_steps = 1
        else:
            from tqdm.auto import tqdm

            corrupted_logits, u_corrupted = _senders(model, graph, corrupted_t)
            fn(corrupted_logits)
            e_clean, e_corrupted = u_clean[:, :, 0], u_corrupted[:, :, 0]
            grads = {}
            for k in tqdm(range(steps), desc="EAP-IG", disable=not progress_enabled(progress), leave=False):
                embed = e_corrupted + (k + 0.5) / steps * (e_clean - e_corrupted)
                g = _gradients(model, graph, corrupted_t, fn, embed)[0]
                for name, v in g.items():
                    grads[name] = grads[name] + v if name in grads else v
            grads = {name: v / steps for name, v in grads.items()}
            n_steps = steps
        with torch.no_grad():
            clean_value = float(scalar_metric(resolved["fn"](clean_logits)))
            corrupted_value = float(scalar_metric(resolved["fn"](corrupted_logits)))
        scores = _receiver_scores(graph, u_clean - u_corrupted, grads)
    return EdgeAttributionResult(
        scores.cpu(),
        graph,
        method,
        clean_value,
        corrupted_value,
        n_steps,
        meta=dict(clean_tokens=clean_t, corrupted_tokens=corrupted_t),
    )


def _exact_edges(model, clean, corrupted, metric, correct, incorrect, progress) -> EdgeAttributionResult:
    """Every edge's exact effect: the metric change when that edge alone carries the clean sender's output
    (`path_patch` of each sender into one receiver at a time)."""
    from tqdm.auto import tqdm

    from tinygpt.interp.circuits.path import path_patch

    graph = edge_graph(model)
    scores = torch.zeros(len(graph.senders), len(graph.receivers), dtype=torch.float64)
    res = None
    bar = tqdm(graph.receivers, desc="exact edges", disable=not progress_enabled(progress), leave=False)
    for j, receiver in enumerate(bar):
        res = path_patch(
            model,
            clean,
            corrupted,
            receivers=[receiver],
            metric=metric,
            correct=correct,
            incorrect=incorrect,
            progress=False,
        )
        for sender, value in res.values.items():
            scores[graph.sender_index[sender], j] = value - res.corrupted_metric
    return EdgeAttributionResult(scores, graph, "exact", res.clean_metric, res.corrupted_metric, meta=dict(res.meta))
