"""`lens_report`: the logit lens against a tuned lens on held-out text, layer by layer.

print(lens_report(model, lens).table())   # held-out KL(final || layer) and cross-entropy per layer
lens_report(model, "tiny.lenses").figure()
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from tinygpt.inputs import model_device
from tinygpt.interp.lens.logit import check_lens, layer_logits, lens_eval, residual_stack, stack_labels
from tinygpt.interp.lens.tuned import TunedLens, token_source

if TYPE_CHECKING:
    from tinygpt.model import GPT


@dataclass
class LensReport:
    """Per-layer mean KL(final || layer) and next-token cross-entropy, logit lens vs tuned lens.

    Attributes:
        labels: layer labels, n_layers + 1 ("final_post" is the model itself: KL 0).
        logit_kl, tuned_kl: mean KL in nats [n_layers + 1].
        logit_ce, tuned_ce: mean next-token cross-entropy in nats [n_layers + 1].
        n_tokens: tokens averaged over.
    """

    labels: list[str]
    logit_kl: Tensor
    tuned_kl: Tensor
    logit_ce: Tensor
    tuned_ce: Tensor
    n_tokens: int

    def table(self) -> str:
        """A Markdown table: one row per layer."""
        rows = [
            "| layer | logit lens KL | tuned lens KL | logit lens CE | tuned lens CE |",
            "|---|---:|---:|---:|---:|",
        ]
        for i, lab in enumerate(self.labels):
            rows.append(
                f"| {lab} | {float(self.logit_kl[i]):.3f} | {float(self.tuned_kl[i]):.3f} | "
                f"{float(self.logit_ce[i]):.3f} | {float(self.tuned_ce[i]):.3f} |"
            )
        rows.append(
            f"\nKL(final || layer) and next-token cross-entropy in nats, mean over {self.n_tokens:,} held-out tokens."
        )
        return "\n".join(rows)

    def __str__(self) -> str:
        return self.table()

    def _repr_markdown_(self) -> str:
        return self.table()

    def figure(self):
        """Plotly line chart: mean KL(final || layer) per layer for both lenses."""
        import plotly.graph_objects as go

        fig = go.Figure()
        fig.add_trace(go.Scatter(x=self.labels, y=self.logit_kl.tolist(), name="logit lens", mode="lines+markers"))
        fig.add_trace(go.Scatter(x=self.labels, y=self.tuned_kl.tolist(), name="tuned lens", mode="lines+markers"))
        fig.update_layout(
            title=f"KL(final || layer) on {self.n_tokens:,} held-out tokens",
            xaxis_title="layer",
            yaxis_title="KL (nats)",
            template="plotly_white",
        )
        return fig


def _held_out_sequences(
    model: GPT, corpus: Any, n_windows: int, ctx: int, val_split: float, cache_dir, progress: bool | None
) -> Tensor:
    """[n, ctx + 1] sequences to score: token rows [b, p] as given, else windows of a held-out token array."""
    from tinygpt.data import val_starts, windows

    if isinstance(corpus, (Tensor, np.ndarray, list)):
        arr = np.asarray(corpus.cpu() if isinstance(corpus, Tensor) else corpus)
        if arr.ndim == 2:
            return torch.as_tensor(arr).long()
        held = arr.reshape(-1)
    else:
        _, held = token_source(model, corpus, val_split, cache_dir, progress)
    x, y = windows(held, val_starts(len(held), ctx, n_windows), ctx)
    return torch.cat([x, y[:, -1:]], dim=1)  # inputs plus the last target


def lens_report(
    model: GPT,
    lens: TunedLens | str | os.PathLike,
    corpus: Any = None,
    *,
    n_windows: int = 16,
    batch_size: int = 8,
    ctx: int | None = None,
    val_split: float = 0.01,
    progress: bool | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> LensReport:
    """Compare the logit lens and a tuned lens on held-out text.

    Args:
        model: the base model.
        lens: a `TunedLens` or a `.lenses` path (checked against `model`).
        corpus: a corpus (path, `Corpus`, None = built-in Shakespeare), whose held-out last `val_split` is read
            in `n_windows` evenly spaced windows of `ctx` tokens; or tokens: [b, p] sequences used as given,
            or a 1-D array cut into windows of `ctx`.
        n_windows, batch_size, ctx: how much held-out text, in what batches (ctx default: the model's n_ctx).
        progress: a progress bar while tokenizing a corpus (None: the package default).
    Returns:
        A `LensReport` (`.table()`, `.figure()`).
    """
    if not isinstance(lens, TunedLens):
        lens = TunedLens.load(lens, model)
    check_lens(model, lens)
    ctx = int(ctx or model.cfg.n_ctx)
    seqs = _held_out_sequences(model, corpus, n_windows, ctx, val_split, cache_dir, progress)
    if seqs.shape[1] < 2:
        raise ValueError("lens_report needs sequences of at least 2 tokens")
    if seqs.shape[1] - 1 > model.cfg.n_ctx:
        raise ValueError(f"sequences of {seqs.shape[1] - 1} tokens exceed the model's n_ctx={model.cfg.n_ctx}")
    L = model.cfg.n_layers
    sums = torch.zeros(4, L + 1, dtype=torch.float64)
    n_tok = 0
    with lens_eval(model, lens):
        for b in range(0, len(seqs), batch_size):
            chunk = seqs[b : b + batch_size].to(model_device(model))
            x, y = chunk[:, :-1], chunk[:, 1:]
            _, stack = residual_stack(model, x)
            lp_final = layer_logits(model, stack[L], L).float().log_softmax(-1)
            p_final = lp_final.exp()
            for i in range(L + 1):
                for j, ln in enumerate((None, lens)):
                    lp = layer_logits(model, stack[i], i, ln).float().log_softmax(-1)
                    kl = (p_final * (lp_final - lp)).sum(-1).clamp(min=0) if i < L else torch.zeros_like(lp[..., 0])
                    ce = -lp.gather(-1, y[..., None])[..., 0]
                    sums[j, i] += kl.double().sum().cpu()
                    sums[2 + j, i] += ce.double().sum().cpu()
            n_tok += y.numel()
    mean = (sums / n_tok).float()
    return LensReport(
        labels=stack_labels(L), logit_kl=mean[0], tuned_kl=mean[1], logit_ce=mean[2], tuned_ce=mean[3], n_tokens=n_tok
    )
