"""Path patching (Wang et al. 2023, "Interpretability in the Wild"): patch a sender's output only along its
direct paths into chosen receivers.

With the default `direction="denoising"` (the convention of `tinygpt.interp.patching`: clean activations
patched into the corrupted run) it runs, for each sender:

1. the corrupted prompt with the sender's output taken from the clean run and every other head (`hook_z`) and
   MLP (`hook_mlp_out`) frozen at its corrupted value; the residual stream a receiver reads is then the
   corrupted one plus the sender's change and nothing else, and the receivers' activations are recorded:
   a head's query/key/value (`attn.hook_q` / `hook_k` / `hook_v`, which depend on that input only), an
   MLP's output (a function of its input only), the final `hook_resid_post` for "logits";
2. the corrupted prompt again with only the receivers' activations replaced by the recorded ones, everything
   downstream of them recomputed, and the metric read. The "logits" receiver is the whole final residual
   stream, so there the sender's direct change is added instead (replacing it would undo the other receivers'
   effects on the logits).

A receiver gets the sender's direct path only, not paths through other receivers (Wang et al.'s definition);
patching a last-layer head into "MLP{last}" and "logits" (all its paths) equals patching the head itself.

`direction="noising"` swaps the roles: the clean run with the sender taken from the corrupted run. Each
value is the metric of step 2; `normalized` is (value - base) / (source - base), the fraction of the way from
the base run's metric (corrupted when denoising) to the source run's that the paths alone carry.

    res = path_patch(model, clean, corrupted, sender="L0H1", receivers=["L1H0.k"])
    res.value, res.normalized["L0H1"]
    sweep = path_patch(model, clean, corrupted, receivers=["logits"])   # every sender; sweep.figure()

Senders and receivers are named as in `tinygpt.interp.circuits.graph`; a head receiver "L1H0" stands for its
q, k and v inputs. Only the hooks every model has are used (no split-input switches needed).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from tinygpt.inputs import eval_mode, progress_enabled
from tinygpt.interp.circuits.graph import CircuitError, EdgeGraph, edge_graph, parse_node
from tinygpt.interp.patching.api import _pair
from tinygpt.interp.patching.metrics import Metric, resolve_metric, scalar

__all__ = ["PathPatchingResult", "path_patch"]


@dataclass
class PathPatchingResult:
    """The metric after path patching each sender into `receivers`.

    Attributes:
        values: sender name -> metric of the path-patched run.
        receivers: the receiver inputs patched (a head receiver expanded to its q/k/v inputs).
        clean_metric, corrupted_metric: the metric on the unpatched runs.
        direction: "denoising" (base = corrupted, sender from clean) or "noising".
    """

    values: dict[str, float]
    receivers: list[str]
    clean_metric: float
    corrupted_metric: float
    direction: str = "denoising"
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def base_metric(self) -> float:
        return self.corrupted_metric if self.direction == "denoising" else self.clean_metric

    @property
    def source_metric(self) -> float:
        return self.clean_metric if self.direction == "denoising" else self.corrupted_metric

    @property
    def value(self) -> float:
        """The metric when one sender was patched."""
        if len(self.values) != 1:
            raise CircuitError(f"this result holds {len(self.values)} senders; read .values[sender] instead")
        return next(iter(self.values.values()))

    @property
    def normalized(self) -> dict[str, float]:
        """sender -> (value - base) / (source - base): 0 = no effect, 1 = the paths carry the whole change."""
        span = self.source_metric - self.base_metric
        if span == 0:
            raise CircuitError("clean and corrupted metrics are equal: nothing to normalise against")
        return {s: (v - self.base_metric) / span for s, v in self.values.items()}

    def top(self, k: int = 5) -> list[tuple[str, float]]:
        """The k senders whose paths move the metric most (by |normalized|)."""
        return sorted(self.normalized.items(), key=lambda x: -abs(x[1]))[:k]

    def __repr__(self) -> str:
        head = ", ".join(f"{s}: {v:.3f}" for s, v in self.top(3))
        return f"PathPatchingResult({len(self.values)} senders -> {self.receivers}; top normalised {head})"

    def figure(self, title: str | None = None):
        """Plotly bar chart: each sender's normalised effect through the receivers, in forward order."""
        import plotly.graph_objects as go

        norm = self.normalized
        fig = go.Figure(go.Bar(x=list(norm), y=list(norm.values()), marker_color="#3366cc"))
        recv = ", ".join(self.receivers) if len(self.receivers) <= 6 else f"{len(self.receivers)} receivers"
        fig.update_layout(
            title=title or f"Path patching ({self.direction}) into {recv}",
            xaxis=dict(title="sender", type="category", tickangle=-45),
            yaxis=dict(title="normalised metric"),
            template="plotly_white",
            height=380,
            width=min(1200, max(460, 220 + 28 * len(norm))),
        )
        return fig


# ------------------------------------------------------------------------------------------------ hooks
_QKV = {"q": "attn.hook_q", "k": "attn.hook_k", "v": "attn.hook_v"}


def _receiver_hook(graph: EdgeGraph, name: str) -> tuple[str, int | None]:
    """The activation recorded / patched for a receiver: (hook point, head index or None)."""
    n = parse_node(name)
    if n.kind == "logits":
        return f"blocks.{graph.n_layers - 1}.hook_resid_post", None
    if n.kind == "mlp":
        return f"blocks.{n.layer}.hook_mlp_out", None
    return f"blocks.{n.layer}.{_QKV[n.part]}", n.head


def _freeze_hooks(graph: EdgeGraph, sender: str, base: dict[str, Tensor], source: dict[str, Tensor]):
    """Forward hooks holding every head and MLP at the base run, the sender at the source run."""
    s = parse_node(sender)
    hooks = []

    def fixed(value: Tensor):
        return lambda act, hook: value

    for layer in range(graph.n_layers):
        z = base[f"blocks.{layer}.attn.hook_z"]
        if s.kind == "head" and s.layer == layer:
            z = z.clone()
            z[:, :, s.head] = source[f"blocks.{layer}.attn.hook_z"][:, :, s.head]
        hooks.append((f"blocks.{layer}.attn.hook_z", fixed(z)))
        mlp = f"blocks.{layer}.hook_mlp_out"
        hooks.append((mlp, fixed(source[mlp] if s.kind == "mlp" and s.layer == layer else base[mlp])))
    if s.kind == "embed":
        hooks.insert(0, ("blocks.0.hook_resid_pre", fixed(source["blocks.0.hook_resid_pre"])))
    return hooks


def _record_hooks(graph: EdgeGraph, receivers: Sequence[str], store: dict[str, Tensor]):
    hooks = []
    for r in receivers:
        name, head = _receiver_hook(graph, r)

        def record(act: Tensor, hook, r=r, head=head) -> None:
            store[r] = (act[:, :, head] if head is not None else act).detach().clone()

        hooks.append((name, record))
    return hooks


def _patch_hooks(graph: EdgeGraph, recorded: dict[str, Tensor], base: Tensor):
    """Step 2's hooks: each receiver's activation replaced by the recorded one; the final residual stream
    ("logits") gets the sender's direct change added (`base` is the base run's final `hook_resid_post`), so the
    other receivers' changes still reach the logits."""
    by_hook: dict[str, list[tuple[int | None, Tensor]]] = {}
    for r, value in recorded.items():
        name, head = _receiver_hook(graph, r)
        if r == "logits":
            by_hook.setdefault(name, []).append((-1, value - base))
            continue
        by_hook.setdefault(name, []).append((head, value))

    def make(items):
        def patch(act: Tensor, hook) -> Tensor:
            act = act.clone()
            for head, value in items:
                if head == -1:
                    act += value
                elif head is None:
                    act[...] = value
                else:
                    act[:, :, head] = value
            return act

        return patch

    return [(name, make(items)) for name, items in by_hook.items()]


# ------------------------------------------------------------------------------------------------- main
def path_patch(
    model,
    clean: Any,
    corrupted: Any,
    sender: str | Sequence[str] | None = None,
    receivers: str | Sequence[str] = ("logits",),
    metric: Metric | None = None,
    *,
    correct: Any = None,
    incorrect: Any = None,
    direction: str = "denoising",
    progress: bool | None = None,
) -> PathPatchingResult:
    """Patch each sender's output along its direct paths into `receivers` only (see the module docstring).

    Args:
        model: a tinygpt model (eval mode for the runs, then restored).
        clean, corrupted: prompts of equal token length: text, texts, or tokens [batch, pos].
        sender: "embed", "L{layer}H{head}" or "MLP{layer}", a list of them, or None: every sender upstream of
            some receiver.
        receivers: "L{layer}H{head}.q" / ".k" / ".v", a head "L{layer}H{head}" (its q, k and v), "MLP{layer}",
            "logits", or a list of them; patched together. A receiver not downstream of a named sender is an
            error (in a sweep it is skipped for that sender).
        metric: logits [batch, pos, d_vocab] -> scalar; default the logit difference of correct vs incorrect at
            the last position (the runs' own top predictions when not given), as in `patch_heads`.
        correct, incorrect: answer tokens for the default metric.
        direction: "denoising" (base = corrupted, sender from clean) or "noising" (the reverse).
        progress: a tqdm bar over senders (None: the package default).

    Returns:
        A `PathPatchingResult` (`.values[sender]`, `.normalized`, `.value` for one sender, `.figure()`).
    """
    if direction not in ("denoising", "noising"):
        raise CircuitError(f"direction must be 'denoising' or 'noising', got {direction!r}")
    graph = edge_graph(model)
    clean_t, corrupted_t = _pair(model, clean, corrupted)
    recv_names = [receivers] if isinstance(receivers, str) else list(receivers)
    if not recv_names:
        raise CircuitError("give at least one receiver, e.g. receivers=['logits'] or ['L1H0.k']")
    recv = list(dict.fromkeys(r for name in recv_names for r in graph.check_receiver(name)))
    named = sender is not None
    if sender is None:
        senders = [s for s in graph.senders if any(graph.is_edge(s, r) for r in recv)]
    else:
        senders = [graph.check_sender(s) for s in ([sender] if isinstance(sender, str) else sender)]
    if named:
        for s in senders:
            late = [r for r in recv if not graph.is_edge(s, r)]
            if late:
                raise CircuitError(
                    f"{late[0]!r} is not downstream of the sender {s!r} (it reads the residual stream before {s} "
                    "writes to it); choose receivers in later layers (or an MLP of the same layer for a head)"
                )
    final = f"blocks.{graph.n_layers - 1}.hook_resid_post"
    names = ["blocks.0.hook_resid_pre", final] + [
        f"blocks.{layer}.{x}" for layer in range(graph.n_layers) for x in ("attn.hook_z", "hook_mlp_out")
    ]
    with eval_mode(model), torch.no_grad():
        clean_logits, clean_cache = model.run_with_cache(clean_t, names_filter=names)
        corrupted_logits, corrupted_cache = model.run_with_cache(corrupted_t, names_filter=names)
        fn = resolve_metric(model, metric, correct, incorrect, clean_logits, corrupted_logits)
        clean_value, corrupted_value = scalar(fn(clean_logits)), scalar(fn(corrupted_logits))
        if direction == "denoising":
            base_t, base, source = corrupted_t, corrupted_cache, clean_cache
        else:
            base_t, base, source = clean_t, clean_cache, corrupted_cache
        from tqdm.auto import tqdm

        values = {}
        bar = progress_enabled(progress) and len(senders) > 1
        for s in tqdm(senders, desc="path patching", disable=not bar, leave=False):
            mine = [r for r in recv if graph.is_edge(s, r)]
            recorded: dict[str, Tensor] = {}
            hooks = _record_hooks(graph, mine, recorded) + _freeze_hooks(graph, s, base, source)
            with model.hooks(fwd_hooks=hooks):  # step 1: the receivers' activations, the sender's paths only
                model(base_t, return_type=None)
            with model.hooks(
                fwd_hooks=_patch_hooks(graph, recorded, base[final])
            ):  # step 2: only the receivers patched
                values[s] = scalar(fn(model(base_t)))
    return PathPatchingResult(
        values,
        recv,
        clean_value,
        corrupted_value,
        direction,
        meta=dict(clean_tokens=clean_t, corrupted_tokens=corrupted_t),
    )
