"""One ablation previewed: the same seeded continuation of a prompt without and with it (and the loss, if asked).

    cmp = ablation_compare(model, "1.attn", "ROMEO:", max_new_tokens=50, tokens=val)
    cmp.sample_clean, cmp.sample_ablated, cmp.diverges_at     # the two continuations, where they part
    cmp.loss_clean, cmp.loss_ablated                          # on `tokens` (None without them)
    cmp.figure(); cmp.to_html()                               # loss bars; the samples side by side

The model is never modified: the ablation is a set of forward hooks, removed after each call.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from tinygpt.inputs import as_tokens, eval_mode
from tinygpt.interp.ablation.context import ablate
from tinygpt.interp.ablation.specs import Ablation, AblationError, parse_ablations
from tinygpt.sampling import generate

DIVERGED_COLOR = "#d62728"  # the ablated continuation from where it differs from the clean one


def _decode(model, ids: list[int]) -> str:
    """Token ids as text, or as space-separated ids for a model without a tokenizer."""
    tok = getattr(model, "tokenizer", None)
    return tok.decode(ids) if tok is not None else " ".join(str(int(i)) for i in ids)


@dataclass
class AblationComparison:
    """A prompt continued without and with one ablation (the same seed), and optionally the loss of both.

    Attributes:
        ablation: the ablation (resolved against the model: non-negative layer).
        prompt: the prompt as text (decoded; ids separated by spaces for a model without a tokenizer).
        prompt_tokens: [1, pos] the prompt's tokens.
        clean_tokens, ablated_tokens: the new token ids of each continuation (the prompt left out).
        sample_clean, sample_ablated: those continuations as text (decoded like `prompt`).
        loss_clean, loss_ablated: the loss of the evaluation `tokens` without / with the ablation (None
            when `ablation_compare` got no tokens).
        n_tokens: the number of tokens those losses score (0 without tokens).
        decoded: the texts are decoded by the model's tokenizer (False: they list token ids).
    """

    ablation: Ablation
    prompt: str
    prompt_tokens: Tensor
    clean_tokens: list[int]
    ablated_tokens: list[int]
    sample_clean: str
    sample_ablated: str
    loss_clean: float | None = None
    loss_ablated: float | None = None
    n_tokens: int = 0
    decoded: bool = True

    @property
    def delta(self) -> float | None:
        """loss_ablated − loss_clean (None without losses)."""
        if self.loss_clean is None or self.loss_ablated is None:
            return None
        return self.loss_ablated - self.loss_clean

    @property
    def diverges_at(self) -> int | None:
        """The index of the first new token where the two continuations differ (None: identical)."""
        a, b = self.clean_tokens, self.ablated_tokens
        same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        return None if a == b else same

    def to_html(self) -> str:
        """Two columns, the prompt in bold then each continuation; the ablated one is red from the first
        character where it differs."""
        a, b = self.sample_clean, self.sample_ablated
        same = 0
        while same < min(len(a), len(b)) and a[same] == b[same]:
            same += 1
        label = str(self.ablation)
        gap = "" if self.decoded else " "  # token ids: a space between the prompt's and the continuation's

        def col(title: str, text: str, split: int | None) -> str:
            body = html.escape(text)
            if split is not None:
                rest = f"<span style='color:{DIVERGED_COLOR}'>{html.escape(text[split:])}</span>"
                body = html.escape(text[:split]) + rest
            return (
                "<div style='flex:1;min-width:0'>"
                f"<div style='font-weight:600;margin-bottom:2px'>{html.escape(title)}</div>"
                "<pre style='white-space:pre-wrap;margin:0;padding:6px;background:#f6f6f6;border-radius:4px'>"
                f"<b>{html.escape(self.prompt)}</b>{gap}{body}</pre></div>"
            )

        note = "identical" if a == b else f"diverges after {same} characters"
        return (
            "<div style='display:flex;gap:12px'>"
            + col("without ablation", a, None)
            + col(f"with {label} ({note})", b, same if a != b else None)
            + "</div>"
        )

    def _repr_html_(self) -> str:
        return self.to_html()

    def figure(self):
        """Plotly bar chart of the evaluation loss without and with the ablation.

        Raises:
            AblationError: the comparison has no losses (`ablation_compare` was called without `tokens`).
        """
        import plotly.graph_objects as go

        if self.delta is None:
            raise AblationError("this comparison has no losses: pass tokens= (an evaluation batch) to ablation_compare")
        fig = go.Figure(
            go.Bar(
                x=["without ablation", f"with {self.ablation}"],
                y=[self.loss_clean, self.loss_ablated],
                text=[f"{self.loss_clean:.4f}", f"{self.loss_ablated:.4f}"],
                marker={"color": ["#7f7f7f", DIVERGED_COLOR]},
            )
        )
        fig.update_layout(
            title=f"{self.ablation}: loss {self.loss_clean:.4f} → {self.loss_ablated:.4f} (Δ {self.delta:+.4f}, "
            f"{self.n_tokens:,} tokens)",
            yaxis_title="loss",
            template="plotly_white",
            height=340,
        )
        return fig

    def __repr__(self) -> str:
        loss = "" if self.delta is None else f", loss {self.loss_clean:.4f} → {self.loss_ablated:.4f}"
        where = "identical" if self.diverges_at is None else f"diverge at new token {self.diverges_at}"
        return f"AblationComparison({self.ablation}: continuations {where}{loss})"


@torch.no_grad()
def ablation_compare(
    model,
    ablation: Any,
    prompt: Any = "\n",
    *,
    max_new_tokens: int = 80,
    temperature: float = 0.0,
    seed: int = 0,
    tokens: Any = None,
    targets: Tensor | None = None,
    reference_tokens: Any = None,
) -> AblationComparison:
    """Continue `prompt` without and with one ablation (the same seed), and score `tokens` both ways if given.

    Args:
        model: a tinygpt model (without a tokenizer, prompts are token ids and continuations show as ids).
        ablation: one ablation: an `Ablation` or a spec ("1.attn", "0.head1:mean", ...).
        prompt: text, or tokens [pos] / [1, pos].
        max_new_tokens, temperature, seed: the two generations (temperature 0 = greedy; `seed` also seeds the
            resample draws).
        tokens: an optional evaluation batch [batch, pos] (or text): `loss_clean` / `loss_ablated` are its loss.
        targets: optional [batch, pos] targets of `tokens` (-100 ignored) to score only some positions.
        reference_tokens: the reference batch of mean / resample ablations (default: `tokens`).
    Returns:
        An `AblationComparison` (`.to_html()` the samples side by side, `.figure()` the losses).
    """
    specs = parse_ablations(ablation)
    if len(specs) != 1:
        raise AblationError(f"ablation_compare takes one ablation, got {len(specs)}: {', '.join(map(str, specs))}")
    prompt_t = as_tokens(model, prompt, what="the prompt", single=True, error=AblationError)
    batch = None if tokens is None else as_tokens(model, tokens, what="tokens", error=AblationError)
    ctx = ablate(model, specs, reference_tokens=batch if reference_tokens is None else reference_tokens, seed=seed)
    opts = {"temperature": temperature, "seed": seed}
    n = prompt_t.shape[1]
    clean = generate(model, prompt_t, max_new_tokens, **opts)[0, n:].tolist()
    ablated = generate(model, prompt_t, max_new_tokens, ablate=ctx, **opts)[0, n:].tolist()
    losses: dict[str, Any] = {}
    if batch is not None:
        with eval_mode(model):
            losses["loss_clean"] = float(model(batch, return_type="loss", targets=targets))
            with ctx:
                losses["loss_ablated"] = float(model(batch, return_type="loss", targets=targets))
        scored = batch.shape[0] * (batch.shape[1] - 1) if targets is None else int((targets != -100).sum())
        losses["n_tokens"] = scored
    return AblationComparison(
        ctx.specs[0],
        _decode(model, prompt_t[0].tolist()),
        prompt_t,
        clean,
        ablated,
        _decode(model, clean),
        _decode(model, ablated),
        **losses,
        decoded=getattr(model, "tokenizer", None) is not None,
    )


__all__ = ["AblationComparison", "ablation_compare"]
