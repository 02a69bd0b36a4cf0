"""Differential attention (Ye et al. 2024, "Differential Transformer"), `GPTConfig(diff_attn=True)`.

Formulation (the paper's, in the layout of its official code, `multihead_diffattn.py`): a model with
`n_heads` heads of width `d_head` has `n_heads` *differential* heads. Head `h` splits its query and key
(each `d_head` wide, from the usual `q_proj`/`k_proj`) into halves `Q1 = q[..., :d_head/2]`,
`Q2 = q[..., d_head/2:]` (likewise `K1`, `K2`), with `d = d_head / 2`; its value keeps the full `d_head`
(the paper's `2d`). So `q_proj, k_proj, v_proj, o_proj` are the same `nn.Linear(d_model, n_heads * d_head)`
/ `nn.Linear(n_heads * d_head, d_model)` as in vanilla attention (with biases, like the rest of tinygpt;
the official code has none), and the paper's recipe "half as many heads, each twice as wide" is simply
`n_heads = d_model / (2d)`. Per head:

    A1 = softmax(Q1 K1^T / sqrt(d) + causal mask),  A2 = softmax(Q2 K2^T / sqrt(d) + causal mask)
    λ  = exp(λq1·λk1) − exp(λq2·λk2) + λ_init,      λ_init = 0.8 − 0.6·exp(−0.3·layer)   (layer 0-based)
    z  = RMSNorm((A1 − λ A2) V) · (1 − λ_init)

λ is one scalar per layer (shared by its heads, as in the official code); `lambda_q1, lambda_k1,
lambda_q2, lambda_k2` are vectors of size `d_head / 2`, initialised N(0, 0.1) as in the official code. The
per-head RMSNorm (`subln`, over each head's `d_head` values, eps = `layer_norm_eps`) has a learnable weight
of size `d_head` shared by the heads (initialised to ones), as in the official code. Extra parameters per
layer over vanilla attention: `4 · d_head/2 + d_head = 3 · d_head`.

Hook points (TransformerLens style; see docs/hooks.md, "Differential attention"):

    attn.hook_q / hook_k        [batch, pos, n_heads, d_head]   [Q1 | Q2] and [K1 | K2], bias included
    attn.hook_v                 [batch, pos, n_heads, d_head]
    attn.hook_attn_scores1 / 2  [batch, n_heads, dest_pos, src_pos]  Q1K1^T/sqrt(d), Q2K2^T/sqrt(d), masked (-inf)
    attn.hook_pattern1 / 2      [batch, n_heads, dest_pos, src_pos]  A1, A2 (rows sum to 1)
    attn.hook_lambda            []                                  λ of this layer (fp32 scalar)
    attn.hook_pattern           [batch, n_heads, dest_pos, src_pos]  the differential map A1 − λ A2: what
                                                                    multiplies V (rows sum to 1 − λ)
    attn.subln.hook_scale       [batch, pos, n_heads]               RMSNorm scale sqrt(mean(x²) + eps)
    attn.hook_z                 [batch, pos, n_heads, d_head]        the normalised, (1 − λ_init)-scaled head
                                                                    output: what `W_O` multiplies, so
                                                                    attn_out = Σ_h z[h] @ W_O[h] + b_O

There is no `attn.hook_attn_scores`: no single score map underlies the differential map.

The fast path (nothing observes the score or pattern hooks): the two maps' outputs come from two fused
attention calls sharing V (SDPA, or our Triton kernel, per `attn_impl`) and are combined as `o1 − λ o2`:
mathematically the same as `(A1 − λ A2) V`. Observing any score or pattern hook switches the layer to the
eager path (the fast/eager rule of docs/hooks.md); `hook_lambda` and `subln.hook_scale` are always called.

`DiffAttention.attend(q, k, v, window=..., q_pos=...)` is everything after the projections, with the mask
options of `tinygpt.arch.backends.attn_mask`: YOCO's differential sliding-window and cross-decoder attention
(`tinygpt.arch.yoco`) reuse it with their own keys and values.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from transformer_lens.hook_points import HookPoint

from tinygpt.arch import backends
from tinygpt.config import ConfigError, GPTConfig
from tinygpt.model.cache import KVCache
from tinygpt.model.heads import HeadInputs
from tinygpt.model.layers import HeadViews, attn_output, observed, proj_heads

__all__ = ["DiffAttention", "HeadRMSNorm", "lambda_init"]


def lambda_init(layer: int) -> float:
    """λ_init = 0.8 − 0.6·exp(−0.3·layer), layer 0-based (the paper's depth schedule)."""
    return 0.8 - 0.6 * math.exp(-0.3 * layer)


class HeadRMSNorm(nn.Module):
    """RMSNorm over the last axis of [batch, pos, n_heads, d_head], one weight [d_head] shared by the heads.

    Computed in at least fp32; `hook_scale` [batch, pos, n_heads] is the scale `sqrt(mean(x²) + eps)` (a
    hook's returned value is the scale used, so the norm can be frozen as with LayerNorm's `hook_scale`).
    """

    def __init__(self, d: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))
        self.hook_scale = HookPoint()

    def forward(self, x: Tensor) -> Tensor:
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        scale = self.hook_scale((xf.pow(2).mean(-1) + self.eps).sqrt())  # [b, p, H]
        return (xf / scale[..., None]).to(x.dtype) * self.weight


class DiffAttention(HeadViews, nn.Module):
    """Causal differential multi-head attention with `q_proj, k_proj, v_proj, o_proj` (see the module doc).

    Args:
        cfg: the model config (`d_head` must be even).
        layer: 0-based block index (sets λ_init).
        own_kv: build `k_proj`, `v_proj` (and `hook_k`, `hook_v`); False for an attention whose keys and
            values come from elsewhere (YOCO's cross-decoder), which then calls `attend` itself.

    The TransformerLens-style per-head views `W_Q`, `W_K`, ... are those of `HeadViews` (`W_Q[h][:, :d_head/2]`
    are Q1's columns, the rest Q2's).
    """

    def __init__(self, cfg: GPTConfig, layer: int, *, own_kv: bool = True):
        super().__init__()
        if cfg.d_head % 2:
            raise ConfigError(f"differential attention needs an even d_head, got {cfg.d_head}")
        self.cfg, self.layer = cfg, layer
        hd = cfg.n_heads * cfg.d_head
        self.half = cfg.d_head // 2
        self.q_proj = nn.Linear(cfg.d_model, hd, bias=cfg.qkv_has_bias)
        if own_kv:
            self.k_proj = nn.Linear(cfg.d_model, hd, bias=cfg.qkv_has_bias)
            self.v_proj = nn.Linear(cfg.d_model, hd, bias=cfg.qkv_has_bias)
        self.o_proj = nn.Linear(hd, cfg.d_model, bias=cfg.bias)
        self.lambda_init = lambda_init(layer)
        for name in ("lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2"):
            setattr(self, name, nn.Parameter(torch.zeros(self.half)))
        self.subln = HeadRMSNorm(cfg.d_head, cfg.layer_norm_eps)
        hooks = ("q", "k", "v") if own_kv else ("q",)
        maps = ("attn_scores1", "attn_scores2", "pattern1", "pattern2", "lambda", "pattern")
        for name in (*hooks, *maps, "z", "result"):
            setattr(self, f"hook_{name}", HookPoint())
        self.reset_variant_parameters()

    def reset_variant_parameters(self) -> None:
        """λ vectors N(0, 0.1) and the RMSNorm weight 1, as in the official code (called after the generic init)."""
        with torch.no_grad():
            for p in (self.lambda_q1, self.lambda_k1, self.lambda_q2, self.lambda_k2):
                p.normal_(0.0, 0.1)
            self.subln.weight.fill_(1.0)

    def lambda_full(self) -> Tensor:
        """λ = exp(λq1·λk1) − exp(λq2·λk2) + λ_init, an fp32 scalar."""
        l1 = torch.exp(torch.dot(self.lambda_q1.float(), self.lambda_k1.float()))
        l2 = torch.exp(torch.dot(self.lambda_q2.float(), self.lambda_k2.float()))
        return l1 - l2 + self.lambda_init

    def needs_eager(self) -> bool:
        return any(
            observed(h)
            for h in (self.hook_attn_scores1, self.hook_attn_scores2, self.hook_pattern1, self.hook_pattern2)
        ) or observed(self.hook_pattern)

    def project(
        self, x: Tensor | HeadInputs, *, queries: bool = True, keys: bool = True
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        """x: [batch, pos, d_model] (or per-head `HeadInputs`) -> q, k, v, each [batch, n_heads, pos, d_head]
        (through hook_q/k/v); q is None without `queries`, k and v without `keys`."""
        cfg = self.cfg
        xq, xk, xv = x if isinstance(x, HeadInputs) else (x, x, x)
        q = proj_heads(cfg, self.hook_q, self.q_proj, xq) if queries else None
        if not keys:
            return q, None, None
        return q, proj_heads(cfg, self.hook_k, self.k_proj, xk), proj_heads(cfg, self.hook_v, self.v_proj, xv)

    def forward(self, x: Tensor | HeadInputs, cache: KVCache | None = None) -> Tensor:
        """x: [batch, pos, d_model] -> [batch, pos, d_model]."""
        q, k, v = self.project(x)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)
        return self.attend(q, k, v)

    def attend(
        self, q: Tensor, k: Tensor, v: Tensor, *, window: int | None = None, q_pos: Tensor | None = None
    ) -> Tensor:
        """Differential attention of new queries over keys/values, then RMSNorm, `hook_z` and `o_proj`.

        Args:
            q: [batch, n_heads, t, d_head] queries `[Q1 | Q2]`.
            k: [batch, n_heads, n, d_head] keys `[K1 | K2]`, the queries' own positions last (cache first).
            v: [batch, n_heads, n, d_head] values.
            window, q_pos: the mask options of `tinygpt.arch.backends.attn_mask` (YOCO).

        Returns:
            [batch, t, d_model].
        """
        cfg, half = self.cfg, self.half
        b, _, t, _ = q.shape
        n = k.shape[2]
        p_drop = cfg.dropout if self.training else 0.0
        q1, q2, k1, k2 = q[..., :half], q[..., half:], k[..., :half], k[..., half:]
        lam = self.hook_lambda(self.lambda_full())
        if backends.use_eager(cfg.attn_impl, self.needs_eager(), q.device):
            mask = backends.attn_mask(t, n, q.device, window=window, q_pos=q_pos)  # [t, n] or [b, 1, t, n]
            softmax_dtype = torch.promote_types(q.dtype, torch.float32)
            scale = 1.0 / math.sqrt(half)
            s1 = self.hook_attn_scores1(((q1 @ k1.transpose(-1, -2)) * scale).masked_fill(~mask, float("-inf")))
            s2 = self.hook_attn_scores2(((q2 @ k2.transpose(-1, -2)) * scale).masked_fill(~mask, float("-inf")))
            p1 = self.hook_pattern1(s1.softmax(-1, dtype=softmax_dtype).to(q.dtype))
            p2 = self.hook_pattern2(s2.softmax(-1, dtype=softmax_dtype).to(q.dtype))
            pattern = self.hook_pattern(p1 - lam.to(q.dtype) * p2)  # [b, H, t, n]
            z = F.dropout(pattern, p_drop) @ v if p_drop else pattern @ v
        else:
            o1 = backends.attend(q1, k1, v, n - t, p_drop, cfg.attn_impl, window=window, q_pos=q_pos)
            o2 = backends.attend(q2, k2, v, n - t, p_drop, cfg.attn_impl, window=window, q_pos=q_pos)
            z = o1 - lam.to(o2.dtype) * o2
        z = self.subln(z.transpose(1, 2)) * (1.0 - self.lambda_init)  # [b, t, H, d_head]
        out = attn_output(self, self.hook_z(z))  # through hook_result when cfg.use_attn_result
        return F.dropout(out, p_drop) if p_drop else out
