"""The logit lens: what does each layer of the residual stream already predict?

    res = logit_lens(model, "ROMEO: But soft, what light", 5)    # a LensResult, top-5 per layer and position
    res.figure("entropy")                                         # layer x position heatmap
    logit_lens(model, "ROMEO: But soft", lens=lens).figure("kl")  # through a trained TunedLens

Layers are read where the tuned-lens paper reads them: `hidden_states[i]` = `blocks.{i}.hook_resid_pre`
(entry 0 is the embeddings) plus the final residual (`blocks.{L-1}.hook_resid_post`), so a result has
`n_layers + 1` entries labelled like TransformerLens' `accumulated_resid` ("0_pre" ... "final_post").
An entry's logits are `unembed(ln_final(h))`: the final LayerNorm is recomputed on the intermediate residual,
as TransformerLens' `logit_lens` does; the last entry therefore reproduces the model's own logits.
"""

from __future__ import annotations

import contextlib
import html
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from tinygpt.inputs import as_tokens, eval_mode
from tinygpt.interp._common import show_token, str_tokens

if TYPE_CHECKING:
    from tinygpt.interp.lens.tuned import TunedLens
    from tinygpt.model import GPT

METRICS = ("entropy", "kl", "prob", "rank")
_show = show_token  # the name the tests and dashboards import


# ------------------------------------------------------------------------------------ the residual stack
def stack_labels(n_layers: int) -> list[str]:
    """TransformerLens' `accumulated_resid` labels: "0_pre" ... "{L-1}_pre", "final_post"."""
    return [f"{i}_pre" for i in range(n_layers)] + ["final_post"]


def residual_stack(model: GPT, tokens: Tensor) -> tuple[Tensor, Tensor]:
    """One forward pass: (logits [b, p, d_vocab], stack [n_layers + 1, b, p, d_model]).

    `stack[i]` is `blocks.{i}.hook_resid_pre` for i < n_layers and the last block's `hook_resid_post` for
    i = n_layers. Runs under the caller's grad mode.
    """
    L = model.cfg.n_layers
    names = [f"blocks.{i}.hook_resid_pre" for i in range(L)] + [f"blocks.{L - 1}.hook_resid_post"]
    acts: dict[str, Tensor] = {}

    def save(t: Tensor, hook) -> None:
        acts[hook.name] = t

    logits = model.run_with_hooks(tokens, fwd_hooks=[(n, save) for n in names])
    return logits, torch.stack([acts[n] for n in names])


def layer_logits(model: GPT, h: Tensor, layer: int, lens: TunedLens | None = None) -> Tensor:
    """`unembed(ln_final(h))` of stack entry `layer`, through `lens` first when given: [..., d_vocab]."""
    if lens is not None:
        h = lens(h, layer)
    return model.unembed(model.ln_final(h))


def check_lens(model: GPT, lens: TunedLens | None) -> None:
    """Raise unless `lens` is None (the logit lens) or a tuned lens that fits `model` (`TunedLens.check_model`)."""
    if lens is None:
        return
    if not callable(getattr(lens, "check_model", None)):
        raise TypeError(f"lens must be a TunedLens (or None for the logit lens), got {type(lens).__name__}")
    lens.check_model(model)


@contextlib.contextmanager
def lens_eval(model: GPT, lens: TunedLens | None):
    """No grad, and the model and the lens in eval mode (each module's mode restored afterwards)."""
    with torch.no_grad(), eval_mode(model), eval_mode(lens) if lens is not None else contextlib.nullcontext():
        yield


def _resolve_targets(model: GPT, tokens: Tensor, target: Any) -> Tensor:
    """Per-position target ids [pos]; -1 where there is none."""
    p = tokens.shape[1]
    if target is None:
        out = torch.full((p,), -1, dtype=torch.long)
        out[:-1] = tokens[0, 1:].cpu()
        return out
    if isinstance(target, str):
        target = model.to_single_token(target)
    if isinstance(target, (int, np.integer)) or (isinstance(target, Tensor) and target.ndim == 0):
        out = torch.full((p,), int(target), dtype=torch.long)
    else:
        out = torch.as_tensor(target, dtype=torch.long).reshape(-1).cpu()
        if out.numel() != p:
            raise ValueError(
                f"target has {out.numel()} entries but the sequence has {p} positions "
                "(pass one id, one single-token string, or one id per position with -1 for none)"
            )
    bad = (out < -1) | (out >= model.cfg.d_vocab)
    if bad.any():
        raise ValueError(f"target ids must be in [0, {model.cfg.d_vocab}) (or -1 for none), got {out[bad].tolist()}")
    return out


# ------------------------------------------------------------------------------------------ the result
@dataclass
class LensResult:
    """What every layer predicts at every position (`logit_lens`'s result). Entry i of the layer axis is
    `labels[i]`; the last entry is the model's own output.

    Attributes:
        tokens: the input ids [pos].
        str_tokens: readable input tokens (len pos).
        labels: layer labels ("0_pre" ... "final_post"), n_layers + 1 of them.
        top_ids, top_probs: the k most likely tokens and their probabilities [n_layers + 1, pos, k].
        top_strs: readable `top_ids` (nested lists [layer][pos][k]).
        entropy: entropy of each layer's distribution, nats [n_layers + 1, pos].
        kl: KL(final || layer) in nats [n_layers + 1, pos] (0 for the last entry).
        target_ids: the token whose rank/probability is tracked at each position [pos] (-1: none).
        target_rank: 0-based rank of the target among all tokens (0 = top-1; ties count only strictly
            larger logits) [n_layers + 1, pos]; -1 where there is no target.
        target_prob: probability of the target [n_layers + 1, pos]; NaN where there is no target.
        lens: "logit" or "tuned".
        target_strs: readable `target_ids` ("" where there is none).
    """

    tokens: Tensor
    str_tokens: list[str]
    labels: list[str]
    top_ids: Tensor
    top_probs: Tensor
    top_strs: list[list[list[str]]]
    entropy: Tensor
    kl: Tensor
    target_ids: Tensor
    target_rank: Tensor
    target_prob: Tensor
    lens: str = "logit"
    target_strs: list[str] = field(default_factory=list)

    @property
    def n_layers(self) -> int:
        return len(self.labels) - 1

    def top(self, layer: int, pos: int) -> list[tuple[str, float]]:
        """(token, probability) pairs of the top-k at one layer and position."""
        return [(s, float(p)) for s, p in zip(self.top_strs[layer][pos], self.top_probs[layer, pos])]

    def __repr__(self) -> str:
        return (
            f"LensResult({self.lens} lens, {len(self.labels)} layers x {len(self.str_tokens)} positions, "
            f"top-{self.top_ids.shape[-1]})"
        )

    def _hover(self, li: int, p: int) -> str:
        lines = [
            f"<b>{html.escape(self.labels[li])}</b> · pos {p} {html.escape(repr(self.str_tokens[p]))}",
            f"entropy {float(self.entropy[li, p]):.3f} · KL {float(self.kl[li, p]):.3f}",
        ]
        if self.target_ids[p] >= 0:
            tgt = self.target_strs[p] if self.target_strs else str(int(self.target_ids[p]))
            lines.append(
                f"target {html.escape(repr(tgt))}: rank {int(self.target_rank[li, p])}, "
                f"p={float(self.target_prob[li, p]):.3f}"
            )
        k = min(5, self.top_ids.shape[-1])
        lines += [
            f"{html.escape(repr(self.top_strs[li][p][j]))} {float(self.top_probs[li, p, j]):.3f}" for j in range(k)
        ]
        return "<br>".join(lines)

    def figure(self, metric: str = "entropy"):
        """Plotly heatmap (layer x position) of `metric`: "entropy", "kl", "prob" or "rank" (of the target).

        Cells show the layer's top-1 token; the hover shows the top-5 with probabilities and the target.
        """
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
        import plotly.graph_objects as go

        n_l, n_p = len(self.labels), len(self.str_tokens)
        if metric == "entropy":
            z, title, scale = self.entropy, "entropy (nats)", "Viridis"
        elif metric == "kl":
            z, title, scale = self.kl, "KL(final || layer), nats", "Reds"
        elif metric == "prob":
            z, title, scale = self.target_prob, "P(target)", "Blues"
        else:
            r = self.target_rank.float()
            z = torch.where(r >= 0, torch.log10(r + 1), torch.full_like(r, float("nan")))
            title, scale = "target rank", "Viridis_r"
        colorbar: dict[str, Any] = dict(title=title)
        if metric == "rank":
            ticks = [r for r in (0, 1, 10, 100, 1000, 10000, 100000) if r <= 10 * max(1, self.top_ids.numel())]
            colorbar.update(tickvals=[math.log10(r + 1) for r in ticks], ticktext=[str(r) for r in ticks])
        heat = go.Heatmap(
            z=[[None if not math.isfinite(v) else v for v in row] for row in z.float().tolist()],
            x=list(range(n_p)),
            y=list(range(n_l)),
            text=[[show_token(self.top_strs[li][p][0]) for p in range(n_p)] for li in range(n_l)],
            texttemplate="%{text}",
            customdata=[[self._hover(li, p) for p in range(n_p)] for li in range(n_l)],
            hovertemplate="%{customdata}<extra></extra>",
            colorscale=scale,
            zmin=0.0,
            zmax=1.0 if metric == "prob" else None,
            colorbar=colorbar,
        )
        fig = go.Figure(heat)
        fig.update_layout(
            title=f"{self.lens} lens: {title}",
            template="plotly_white",
            xaxis_title="input token (position)",
            yaxis_title="layer",
            height=max(300, 40 * n_l + 150),
            width=max(500, 60 * n_p + 200),
        )
        fig.update_xaxes(tickvals=list(range(n_p)), ticktext=[show_token(s) for s in self.str_tokens], tickangle=0)
        fig.update_yaxes(tickvals=list(range(n_l)), ticktext=self.labels)
        return fig


# ------------------------------------------------------------------------------------------ logit lens
def logit_lens(
    model: GPT,
    prompt: str | Tensor | Sequence[int],
    k: int = 5,
    *,
    target: int | str | Tensor | Sequence[int] | None = None,
    lens: TunedLens | None = None,
) -> LensResult:
    """Read every layer's residual stream through the final LayerNorm and unembedding.

    Args:
        model: a `tinygpt.GPT` (run in eval mode; its mode is restored afterwards).
        prompt: text, or one sequence of token ids [pos] / [1, pos].
        k: how many top tokens to keep per layer and position.
        target: the token to track per position: None = the actual next token (none at the last position),
            an id or single-token string for every position, or ids [pos] (-1 = none).
        lens: a `TunedLens` to translate each layer first (None = the plain logit lens).
    Returns:
        A `LensResult` with tensors [n_layers + 1, pos, ...] on the CPU.
    """
    check_lens(model, lens)
    tokens = as_tokens(model, prompt, what="the prompt", single=True, max_len=model.cfg.n_ctx)
    targets = _resolve_targets(model, tokens, target)
    V = model.cfg.d_vocab
    if not 1 <= k <= V:
        raise ValueError(f"k must be in [1, {V}], got {k}")
    L = model.cfg.n_layers
    tops_i, tops_p, ents, kls, ranks, probs = [], [], [], [], [], []
    with lens_eval(model, lens):
        _, stack = residual_stack(model, tokens)
        lp_final = layer_logits(model, stack[L], L).float().log_softmax(-1)[0]  # [p, V]
        p_final = lp_final.exp()
        tgt = targets.to(lp_final.device)
        has = tgt >= 0
        safe = tgt.clamp(min=0)[:, None]
        for i in range(L + 1):
            logits = layer_logits(model, stack[i], i, lens).float()[0]  # [p, V]
            lp = logits.log_softmax(-1)
            top = lp.topk(k, dim=-1)
            tops_i.append(top.indices)
            tops_p.append(top.values.exp())
            ents.append(-(lp.exp() * lp).sum(-1))
            kls.append((p_final * (lp_final - lp)).sum(-1).clamp(min=0) if i < L else torch.zeros_like(lp[:, 0]))
            t_logit = logits.gather(-1, safe)
            ranks.append(torch.where(has, (logits > t_logit).sum(-1), -1))
            probs.append(torch.where(has, lp.gather(-1, safe)[:, 0].exp(), float("nan")))
    top_ids = torch.stack(tops_i).cpu()
    n_pos = tokens.shape[1]
    flat = iter(str_tokens(model, top_ids.reshape(-1).tolist()))
    return LensResult(
        tokens=tokens[0].cpu(),
        str_tokens=str_tokens(model, tokens[0].tolist()),
        labels=stack_labels(L),
        top_ids=top_ids,
        top_probs=torch.stack(tops_p).cpu(),
        top_strs=[[[next(flat) for _ in range(k)] for _ in range(n_pos)] for _ in range(L + 1)],
        entropy=torch.stack(ents).cpu(),
        kl=torch.stack(kls).cpu(),
        target_ids=targets,
        target_rank=torch.stack(ranks).cpu(),
        target_prob=torch.stack(probs).cpu(),
        lens="logit" if lens is None else "tuned",
        target_strs=[s if i >= 0 else "" for i, s in zip(targets.tolist(), str_tokens(model, targets.clamp(min=0)))],
    )
