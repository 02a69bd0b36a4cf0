"""Direct logit attribution: the logit difference split into every component's direct contribution.

The final residual stream is a sum (see docs/architecture.md): the token and position embeddings, each head's
output `z_h @ W_O[h]`, each attention bias `b_O`, each neuron's output `post_n * W_out[n]` and each MLP bias
`b_out`. With the final LayerNorm's scale frozen at the run's value (its statistics are what make it nonlinear),
`LN(x) = (x - mean x) / scale * w + b` is linear in x, so with `d = W_U[:, good] - W_U[:, bad]`

    logit_diff = Σ_c ((c - mean c) / scale * w) · d  +  b · d  (+ b_U[good] - b_U[bad], zero in tinygpt)

exactly: `DLAResult.total()` sums every term and equals the logit difference (the tests check 1e-4). An RMSNorm
has no centring and no bias. On the same model, the per-head and per-layer values equal TransformerLens'
`ActivationCache.logit_attrs` once the final norm's weight is folded into `W_U` (TransformerLens' convention).

    dla = direct_logit_attribution(model, "When Mary and John went, John gave it to", " Mary", " John")
    dla.heads            # [n_layers, n_heads]
    dla.neurons          # [n_layers, d_mlp]
    dla.total()          # == the logit difference at the last position
    dla.figure()
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from tinygpt.inputs import as_tokens, eval_mode
from tinygpt.interp.circuits._common import CircuitError

__all__ = ["DLAResult", "direct_logit_attribution", "logit_readout"]


@dataclass
class DLAResult:
    """Direct contributions to the logit difference at one position, averaged over the batch.

    Attributes:
        heads: [n_layers, n_heads] each head's output (None for an attention variant whose output is not a sum
            of per-head terms; then `attn` holds the layer totals).
        attn: [n_layers] each attention layer's total (heads + bias).
        attn_bias: [n_layers] the `b_O` terms.
        neurons: [n_layers, d_mlp] each neuron's output (None for a feed-forward without neurons, e.g. MoE).
        mlp: [n_layers] each feed-forward layer's total (neurons + bias).
        mlp_bias: [n_layers] the `b_out` terms.
        embed, pos_embed: the token and position embeddings' direct paths.
        ln_bias: the final norm's bias term `b · d`; unembed_bias: `b_U[good] - b_U[bad]`.
        logit_diff: the logit difference the model computes (per batch mean), for comparison with `total()`.
        pos: the position read.
    """

    heads: Tensor | None
    attn: Tensor
    attn_bias: Tensor
    neurons: Tensor | None
    mlp: Tensor
    mlp_bias: Tensor
    embed: float
    pos_embed: float
    ln_bias: float
    unembed_bias: float
    logit_diff: float
    pos: int
    meta: dict[str, Any] = field(default_factory=dict)

    def total(self) -> float:
        """Every term: the embeddings' direct paths, every layer (heads and neurons and biases), the final
        norm's bias and the unembedding bias. Equals `logit_diff` (a frozen-scale decomposition is exact)."""
        return float(self.embed + self.pos_embed + self.attn.sum() + self.mlp.sum() + self.ln_bias + self.unembed_bias)

    def layers(self) -> Tensor:
        """[n_layers, 2]: each layer's attention and MLP totals."""
        return torch.stack([self.attn, self.mlp], dim=1)

    def top(self, k: int = 5) -> list[tuple[str, float]]:
        """The k components (heads "L1H3", neurons "L0N12", or layers "attn1"/"mlp0" without per-part terms,
        and "embed", "pos_embed") with the largest |contribution|."""
        items = [("embed", self.embed), ("pos_embed", self.pos_embed)]
        for layer in range(len(self.attn)):
            if self.heads is not None:
                items += [(f"L{layer}H{h}", float(v)) for h, v in enumerate(self.heads[layer])]
            else:
                items.append((f"attn{layer}", float(self.attn[layer])))
            if self.neurons is not None:
                items += [(f"L{layer}N{n}", float(v)) for n, v in enumerate(self.neurons[layer])]
            else:
                items.append((f"mlp{layer}", float(self.mlp[layer])))
        return sorted(items, key=lambda kv: -abs(kv[1]))[:k]

    def __repr__(self) -> str:
        top = ", ".join(f"{n} {v:+.3f}" for n, v in self.top(3))
        return f"DLAResult(logit diff {self.logit_diff:.4f} = total {self.total():.4f}; largest: {top})"

    def figure(self, title: str | None = None):
        """Plotly: per-layer attention / MLP bars and the (layer x head) heatmap of the heads' contributions."""
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots

        n = len(self.attn)
        cols = 2 if self.heads is not None else 1
        fig = make_subplots(
            rows=1,
            cols=cols,
            subplot_titles=["per layer", "per head"][:cols],
            column_widths=[0.45, 0.55][:cols],
        )
        x = ["embed", "pos_embed"] + [f"{p}{i}" for i in range(n) for p in ("attn", "mlp")] + ["ln bias"]
        y = [self.embed, self.pos_embed] + [float(v) for i in range(n) for v in (self.attn[i], self.mlp[i])]
        y.append(self.ln_bias)
        fig.add_trace(go.Bar(x=x, y=y, name="direct contribution"), row=1, col=1)
        if self.heads is not None:
            lim = float(self.heads.abs().max()) or 1.0
            fig.add_trace(
                go.Heatmap(
                    z=self.heads.tolist(),
                    x=[f"H{h}" for h in range(self.heads.shape[1])],
                    y=[f"L{i}" for i in range(n)],
                    colorscale="RdBu",
                    zmid=0,
                    zmin=-lim,
                    zmax=lim,
                    hovertemplate="%{y}%{x}: %{z:.4f}<extra></extra>",
                ),
                row=1,
                col=2,
            )
            fig.update_yaxes(autorange="reversed", row=1, col=2)
        fig.update_layout(
            title=title or f"Direct logit attribution (logit diff {self.logit_diff:.3f}, total {self.total():.3f})",
            template="plotly_white",
            height=420,
            width=900 if cols == 2 else 560,
            showlegend=False,
        )
        return fig


def _token_ids(model, x: Any, batch: int, device) -> Tensor:
    if isinstance(x, str):
        x = model.to_single_token(x)
    elif isinstance(x, (list, tuple)) and x and isinstance(x[0], str):
        x = [model.to_single_token(s) for s in x]
    t = torch.as_tensor(x, device=device).reshape(-1)
    if t.numel() not in (1, batch):
        raise CircuitError(f"got {t.numel()} answer tokens for a batch of {batch} prompts; give one or one per prompt")
    return t.expand(batch)


def direct_logit_attribution(model, tokens: Any, good: Any, bad: Any = None, pos: int = -1) -> DLAResult:
    """Split the logit difference `logit[good] - logit[bad]` at position `pos` into direct contributions.

    Args:
        model: a tinygpt model (eval mode during the call).
        tokens: a prompt (text, texts of equal token length, or tokens [batch, pos]).
        good, bad: answer tokens (ids or single-token strings; one, or one per prompt); without `bad`, the logit
            of `good` itself is attributed (the unembedding bias then counts too).
        pos: the position read (default the last).

    Returns:
        A `DLAResult` (batch means); `.total()` equals `.logit_diff`.
    """
    toks = as_tokens(model, tokens, what="tokens", error=CircuitError)
    b, t = toks.shape
    if not -t <= pos < t:
        raise CircuitError(f"position {pos} is out of range for prompts of {t} tokens")
    cfg = model.cfg
    n_layers = cfg.n_layers
    with eval_mode(model), torch.no_grad():
        run_logits, cache = model.run_with_cache(toks)
        names = cache.cache_dict
        if "ln_final.hook_scale" not in names:
            raise CircuitError("direct logit attribution needs the final norm's hook_scale, which this model lacks")
        u, direction, unembed_bias, g, w = _readout(model, cache, toks, good, bad, pos)
        bias = getattr(model.ln_final, "b", None)
        rms = getattr(cfg, "normalization_type", "LN") in ("RMS", "RMSPre")

        def dot(x: Tensor) -> Tensor:  # [b, ..., d_model] at pos -> [...] batch mean
            x = x.double()
            return torch.einsum("b...d,bd->b...", x, u).mean(0)

        def at(name: str) -> Tensor | None:
            return cache[name][:, pos] if name in names else None

        embed = float(dot(at("hook_embed"))) if "hook_embed" in names else 0.0
        pos_embed = float(dot(at("hook_pos_embed"))) if "hook_pos_embed" in names else 0.0
        heads, attn, attn_bias, neurons, mlp, mlp_bias = [], [], [], [], [], []
        for layer in range(n_layers):
            block = model.blocks[layer]
            attn_total = dot(at(f"blocks.{layer}.hook_attn_out"))
            per_head, b_o = _head_terms(block, at(f"blocks.{layer}.attn.hook_z"), at(f"blocks.{layer}.hook_attn_out"))
            heads.append(None if per_head is None else dot(per_head))
            attn_bias.append(dot(b_o.expand(b, -1)) if b_o is not None else torch.zeros((), dtype=torch.float64))
            attn.append(attn_total)
            mlp_total = dot(at(f"blocks.{layer}.hook_mlp_out"))
            post, w_out, b_out = _neuron_terms(
                block, at(f"blocks.{layer}.mlp.hook_post"), at(f"blocks.{layer}.hook_mlp_out")
            )
            neurons.append(None if post is None else (post * (u @ w_out.T)).mean(0))  # post_n * (W_out[n] · u)
            mlp_bias.append(dot(b_out.expand(b, -1)) if b_out is not None else torch.zeros((), dtype=torch.float64))
            mlp.append(mlp_total)
        ln_bias = float((bias.double() @ direction.T).mean()) if bias is not None and not rms else 0.0
        logits = run_logits[:, pos].double()
        rows = torch.arange(b, device=toks.device)
        actual = logits[rows, g] - (logits[rows, w] if bad is not None else 0.0)
    heads_t = torch.stack(heads).float() if all(h is not None for h in heads) else None
    neurons_t = torch.stack(neurons).float() if all(n is not None for n in neurons) else None
    return DLAResult(
        heads=heads_t,
        attn=torch.stack(attn).float(),
        attn_bias=torch.stack(attn_bias).float(),
        neurons=neurons_t,
        mlp=torch.stack(mlp).float(),
        mlp_bias=torch.stack(mlp_bias).float(),
        embed=embed,
        pos_embed=pos_embed,
        ln_bias=ln_bias,
        unembed_bias=float(unembed_bias.mean()),
        logit_diff=float(actual.mean()),
        pos=pos,
        meta=dict(tokens=toks, good=g.tolist(), bad=None if bad is None else w.tolist()),
    )


def _readout(model, cache, toks: Tensor, good: Any, bad: Any, pos: int):
    """The direction `u` [b, d_model] with `u · c` = component c's direct contribution to logit[good] - logit[bad]
    at `pos` (the final norm's scale frozen from `cache`), and the pieces it is built from: the unembedding
    difference [b, d_model], the unembedding bias term [b], and the token ids."""
    b = toks.shape[0]
    scale = cache["ln_final.hook_scale"][:, pos].double()  # [b, 1]
    g = _token_ids(model, good, b, toks.device)
    w_u = model.W_U.double()  # [d_model, d_vocab]
    direction = w_u[:, g].T  # [b, d_model]
    b_u = model.b_U.double()
    unembed_bias = b_u[g]
    w = None
    if bad is not None:
        w = _token_ids(model, bad, b, toks.device)
        direction = direction - w_u[:, w].T
        unembed_bias = unembed_bias - b_u[w]
    weight = getattr(model.ln_final, "w", None)
    u = direction * (weight.double() if weight is not None else 1.0) / scale  # [b, d_model]
    if getattr(model.cfg, "normalization_type", "LN") not in ("RMS", "RMSPre"):
        u = u - u.mean(-1, keepdim=True)  # (c - mean c) · v == c · (v - mean v)
    return u, direction, unembed_bias, g, w


def logit_readout(model, tokens: Any, good: Any, bad: Any = None, pos: int = -1) -> tuple[Tensor, Any, float]:
    """For other tools' direct logit attribution (e.g. per dictionary latent): one run of `model` on `tokens`,
    and the direction `u` [batch, d_model] such that `u · c` is a residual-stream component c's direct
    contribution to `logit[good] - logit[bad]` at `pos`, with the final norm's scale frozen from that run.

    Returns:
        (u [batch, d_model] float64, the run's `ActivationCache`, the logit difference (batch mean)).
    """
    toks = as_tokens(model, tokens, what="tokens", error=CircuitError)
    if not -toks.shape[1] <= pos < toks.shape[1]:
        raise CircuitError(f"position {pos} is out of range for prompts of {toks.shape[1]} tokens")
    with eval_mode(model), torch.no_grad():
        logits, cache = model.run_with_cache(toks)
        if "ln_final.hook_scale" not in cache.cache_dict:
            raise CircuitError("direct logit attribution needs the final norm's hook_scale, which this model lacks")
        u, _, _, g, w = _readout(model, cache, toks, good, bad, pos)
        rows = torch.arange(toks.shape[0], device=toks.device)
        last = logits[:, pos].double()
        diff = last[rows, g] - (last[rows, w] if w is not None else 0.0)
        return u, cache, float(diff.mean())


def _head_terms(block, z: Tensor | None, out: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
    """Each head's output [b, H, d_model] and the output bias, when the attention output is their sum (checked)."""
    attn = block.attn
    w_o = getattr(attn, "W_O", None)
    b_o = getattr(attn, "b_O", None)
    if z is None or w_o is None or out is None:
        return None, None
    try:
        per_head = torch.einsum("bhe,hed->bhd", z.double(), w_o.double())
    except RuntimeError:
        return None, None
    total = per_head.sum(1) + (b_o.double() if b_o is not None else 0.0)
    if not torch.allclose(total, out.double(), atol=1e-4, rtol=1e-4):
        return None, None  # e.g. differential attention normalises the heads before o_proj
    return per_head, b_o.double() if b_o is not None else None


def _neuron_terms(block, post: Tensor | None, out: Tensor | None):
    """The neurons' activations [b, d_mlp], `W_out` [d_mlp, d_model] and the output bias, when the MLP output is
    `post @ W_out + b_out` (checked; else three Nones, e.g. a mixture of experts)."""
    mlp = getattr(block, "mlp", None)
    w_out = getattr(mlp, "W_out", None)
    b_out = getattr(mlp, "b_out", None)
    if post is None or w_out is None or out is None or post.shape[-1] != w_out.shape[0]:
        return None, None, None
    post, w_out = post.double(), w_out.double()
    total = post @ w_out + (b_out.double() if b_out is not None else 0.0)
    if not torch.allclose(total, out.double(), atol=1e-4, rtol=1e-4):
        return None, None, None
    return post, w_out, b_out.double() if b_out is not None else None
