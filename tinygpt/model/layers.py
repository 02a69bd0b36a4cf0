"""The pieces of a block: `LayerNorm`, `Attention`, `MLP`, `Block`, and `observed` (the fast/eager rule's test).

Every TransformerLens-canonical hook point of a block exists with TransformerLens' shape (see `docs/hooks.md`):

    blocks.{i}.hook_resid_pre / _mid / _post         [batch, pos, d_model]
    blocks.{i}.hook_attn_out, blocks.{i}.hook_mlp_out [batch, pos, d_model]
    blocks.{i}.ln1/ln2.hook_scale                    [batch, pos, 1]
    blocks.{i}.ln1/ln2.hook_normalized               [batch, pos, d_model]
    blocks.{i}.attn.hook_q / _k / _v / _z            [batch, pos, n_heads, d_head]
    blocks.{i}.attn.hook_attn_scores / _pattern      [batch, n_heads, dest_pos, src_pos]
    blocks.{i}.mlp.hook_pre / _post                  [batch, pos, d_mlp]

Hook points are identity modules. Attention runs through a fused kernel (`tinygpt.arch.backends.attend`) unless
something observes `hook_attn_scores` or `hook_pattern`, in which case the eager path materialises the pattern;
LayerNorm likewise uses the fused kernel unless `hook_scale` is observed.

A block gets its attention and feed-forward modules from its builder (`tinygpt.arch.make_block` picks the
variant a config asks for); built on its own, `Block(cfg, layer)` holds the plain GPT-2 pieces of this module.
Caches decide which keys new queries see (`tinygpt.model.cache`): `Attention.forward` projects, asks the cache
(if any) to attend, and applies the output projection, so the attention math itself (`Attention.attend`) is
written once for every key layout.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from transformer_lens.hook_points import HookPoint

from tinygpt.arch import backends
from tinygpt.config import GPTConfig
from tinygpt.errors import TinyGPTValueError

if TYPE_CHECKING:
    from tinygpt.model.cache import KVCache

__all__ = ["MLP", "Attention", "Block", "LayerNorm", "ModelError", "observed"]


class ModelError(TinyGPTValueError):
    """A bad input to the model: too long for its context, no tokenizer for text, not a single token, ..."""


def observed(hp: HookPoint) -> bool:
    """True if anything (a TransformerLens hook, a torch hook, a patched forward) watches `hp`."""
    if (
        hp._forward_hooks
        or hp._forward_pre_hooks
        or hp._backward_hooks
        or hp._backward_pre_hooks
        or nn.modules.module._global_forward_hooks
        or nn.modules.module._global_forward_pre_hooks
    ):
        return True
    fwd = hp.__dict__.get("forward")
    if fwd is None:
        return False
    # nnsight installs a controller as the instance forward, inert outside a trace: it only observes
    # while one of its traces is running.
    active = getattr(getattr(fwd, "state", None), "active", None)
    return active is None or active()[0] is not None


class LayerNorm(nn.Module):
    """LayerNorm with TransformerLens' `hook_scale` [b, p, 1] and `hook_normalized` [b, p, d]."""

    def __init__(self, d: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))
        self.bias = nn.Parameter(torch.zeros(d))
        self.hook_scale = HookPoint()
        self.hook_normalized = HookPoint()

    w = property(lambda self: self.weight)  # TransformerLens names
    b = property(lambda self: self.bias)

    def forward(self, x: Tensor) -> Tensor:
        if observed(self.hook_scale):
            # one fused kernel gives the output and its statistics: scale = sqrt(var + eps) = 1 / rstd
            out, mean, rstd = torch.native_layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)
            scale = rstd.reciprocal()
            version = scale._version
            hooked = self.hook_scale(scale)
            edited = hooked is not scale or scale._version != version  # replaced, or changed in place
            x = (x - mean) / hooked * self.weight + self.bias if edited else out
        else:
            x = F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)
        return self.hook_normalized(x)


def _heads(self, proj: nn.Linear) -> Tensor:
    """proj.weight [n_heads * d_head, d_model] as per-head [n_heads, d_model, d_head]."""
    return proj.weight.view(self.cfg.n_heads, self.cfg.d_head, -1).transpose(1, 2)


class HeadViews:
    """TransformerLens-style per-head views of `q_proj/k_proj/v_proj/o_proj` (mixed into attention modules;
    a module with only some of the projections may copy single views, e.g. `W_K = HeadViews.W_K`)."""

    W_Q = property(lambda self: _heads(self, self.q_proj))  # [H, d_model, d_head]
    W_K = property(lambda self: _heads(self, self.k_proj))
    W_V = property(lambda self: _heads(self, self.v_proj))
    W_O = property(lambda self: self.o_proj.weight.T.view(self.cfg.n_heads, self.cfg.d_head, -1))  # [H, d_head, d]
    b_Q = property(lambda self: self.q_proj.bias.view(self.cfg.n_heads, self.cfg.d_head))  # [H, d_head]
    b_K = property(lambda self: self.k_proj.bias.view(self.cfg.n_heads, self.cfg.d_head))
    b_V = property(lambda self: self.v_proj.bias.view(self.cfg.n_heads, self.cfg.d_head))
    b_O = property(lambda self: self.o_proj.bias)  # [d_model]


def split_heads(cfg: GPTConfig, hook: HookPoint, x: Tensor) -> Tensor:
    """A projection's output [batch, pos, n_heads * d_head] through `hook` as [batch, pos, n_heads, d_head],
    returned as [batch, n_heads, pos, d_head]."""
    b, t, _ = x.shape
    return hook(x.view(b, t, cfg.n_heads, cfg.d_head)).transpose(1, 2)


class Attention(HeadViews, nn.Module):
    """Causal multi-head attention with separate q/k/v/o `nn.Linear` projections."""

    def __init__(self, cfg: GPTConfig, layer: int):
        super().__init__()
        self.cfg, self.layer = cfg, layer
        hd = cfg.n_heads * cfg.d_head
        self.q_proj = nn.Linear(cfg.d_model, hd)
        self.k_proj = nn.Linear(cfg.d_model, hd)
        self.v_proj = nn.Linear(cfg.d_model, hd)
        self.o_proj = nn.Linear(hd, cfg.d_model)
        for name in ("q", "k", "v", "z", "attn_scores", "pattern"):
            setattr(self, f"hook_{name}", HookPoint())

    def needs_eager(self) -> bool:
        return observed(self.hook_attn_scores) or observed(self.hook_pattern)

    def project(
        self, x: Tensor, *, queries: bool = True, keys: bool = True
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        """x: [batch, pos, d_model] -> q, k, v, each [batch, n_heads, pos, d_head] (through hook_q/k/v); q is
        None without `queries`, k and v without `keys`."""
        cfg = self.cfg
        q = split_heads(cfg, self.hook_q, self.q_proj(x)) if queries else None
        if not keys:
            return q, None, None
        return q, split_heads(cfg, self.hook_k, self.k_proj(x)), split_heads(cfg, self.hook_v, self.v_proj(x))

    def attend(
        self, q: Tensor, k: Tensor, v: Tensor, past: int, *, window: int | None = None, q_pos: Tensor | None = None
    ) -> Tensor:
        """Causal attention of `t` new queries over `past + t` keys (the queries' own positions last).

        Args:
            q: [batch, n_heads, t, d_head]; k, v: [batch, n_heads, past + t, d_head].
            past: keys before the queries' positions.
            window, q_pos: the mask options of `tinygpt.arch.backends.attn_mask` (YOCO's sliding window, and
                queries at scattered positions).

        Returns:
            z [batch, t, n_heads, d_head] (a view), eager (scores and pattern through their hooks) when the
            fast/eager rule says so, else by the fused backend.
        """
        cfg = self.cfg
        b, h, t, _ = q.shape
        n = k.shape[2]
        p_drop = cfg.dropout if self.training else 0.0
        if backends.use_eager(cfg.attn_impl, self.needs_eager(), q.device):
            # One fused kernel: scores = mask bias (-inf where a query may not look) + q·kᵀ/√d_head  [b, H, t, n]
            if window is None and q_pos is None:  # causal: -inf above the diagonal
                bias = torch.full((t, n), float("-inf"), device=q.device, dtype=q.dtype).triu_(past + 1)
            else:
                mask = backends.attn_mask(t, n, q.device, window=window, q_pos=q_pos)  # [t, n] or [b, 1, t, n]
                bias = torch.zeros(mask.shape, device=q.device, dtype=q.dtype).masked_fill_(~mask, float("-inf"))
                if bias.ndim == 4:
                    bias = bias.expand(b, h, t, n).reshape(b * h, t, n)
            scores = torch.baddbmm(
                bias, q.reshape(b * h, t, -1), k.reshape(b * h, n, -1).transpose(1, 2), alpha=1 / math.sqrt(cfg.d_head)
            ).view(b, h, t, n)
            scores = self.hook_attn_scores(scores)
            # Softmax in at least fp32 (bf16 is upcast; float64 stays float64 for gradcheck/double runs).
            pattern = self.hook_pattern(
                scores.softmax(-1, dtype=torch.promote_types(q.dtype, torch.float32)).to(q.dtype)
            )
            z = F.dropout(pattern, p_drop) @ v if p_drop else pattern @ v
        else:  # fused: SDPA or our Triton kernel (tinygpt.arch.backends)
            z = backends.attend(q, k, v, past, p_drop, cfg.attn_impl, window=window, q_pos=q_pos)
        return z.transpose(1, 2)

    def out(self, z: Tensor) -> Tensor:
        """z [batch, pos, n_heads, d_head] through `hook_z` and `o_proj` -> [batch, pos, d_model]."""
        b, t = z.shape[:2]
        out = self.o_proj(self.hook_z(z).reshape(b, t, self.cfg.n_heads * self.cfg.d_head))
        p_drop = self.cfg.dropout if self.training else 0.0
        return F.dropout(out, p_drop) if p_drop else out

    def forward(self, x: Tensor, cache: KVCache | None = None) -> Tensor:
        """x: [batch, pos, d_model] -> [batch, pos, d_model]; `cache` holds the earlier positions' keys."""
        if cache is None:
            q, k, v = self.project(x)
            return self.out(self.attend(q, k, v, 0))
        q, k, v = cache.project(self, x)
        return self.out(cache.attend(self, q, k, v))


class MLP(nn.Module):
    """`fc_in` -> hook_pre -> GELU -> hook_post -> `fc_out`."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.fc_in = nn.Linear(cfg.d_model, cfg.d_mlp)
        self.fc_out = nn.Linear(cfg.d_mlp, cfg.d_model)
        self.approximate = "tanh" if cfg.act_fn == "gelu_new" else "none"
        self.p_drop = cfg.dropout
        self.hook_pre = HookPoint()
        self.hook_post = HookPoint()

    def forward(self, x: Tensor) -> Tensor:
        h = self.hook_post(F.gelu(self.hook_pre(self.fc_in(x)), approximate=self.approximate))
        out = self.fc_out(h)
        return F.dropout(out, self.p_drop, self.training) if self.p_drop else out

    W_in = property(lambda self: self.fc_in.weight.T)  # [d_model, d_mlp]
    b_in = property(lambda self: self.fc_in.bias)
    W_out = property(lambda self: self.fc_out.weight.T)  # [d_mlp, d_model]
    b_out = property(lambda self: self.fc_out.bias)


class Block(nn.Module):
    """Pre-LayerNorm block; the residual stream is additive and exact.

    Args:
        cfg: the model config.
        layer: the block's index.
        attn: its attention module (default the plain `Attention`); `tinygpt.arch.make_block` passes the
            variant a config asks for (e.g. differential attention).
        ffn: (attribute name, module) of its feed-forward part (default `("mlp", MLP(cfg))`; e.g.
            `("moe", MoE(...))` for mixture-of-experts).
    """

    hook_out_is_single_residual_stream = True

    def __init__(
        self, cfg: GPTConfig, layer: int, attn: nn.Module | None = None, ffn: tuple[str, nn.Module] | None = None
    ):
        super().__init__()
        self.layer = layer
        self.ln1 = LayerNorm(cfg.d_model, cfg.layer_norm_eps)
        self.attn = Attention(cfg, layer) if attn is None else attn
        self.ln2 = LayerNorm(cfg.d_model, cfg.layer_norm_eps)
        self._ffn_name, ffn_module = ("mlp", MLP(cfg)) if ffn is None else ffn
        setattr(self, self._ffn_name, ffn_module)
        for name in ("resid_pre", "attn_out", "resid_mid", "mlp_out", "resid_post"):
            setattr(self, f"hook_{name}", HookPoint())

    @property
    def ffn(self) -> nn.Module:
        """The feed-forward module (`mlp`, or `moe` for mixture-of-experts)."""
        return getattr(self, self._ffn_name)

    def forward(self, x: Tensor, cache: KVCache | None = None) -> Tensor:
        """x = resid_pre [batch, pos, d_model] -> resid_post [batch, pos, d_model]."""
        resid_pre = self.hook_resid_pre(x)
        attn_out = self.hook_attn_out(self.attn(self.ln1(resid_pre), cache))
        return self.finish(self.hook_resid_mid(resid_pre + attn_out))

    def finish(self, resid_mid: Tensor) -> Tensor:
        """The feed-forward half: resid_mid [batch, pos, d_model] -> resid_post (position-wise)."""
        mlp_out = self.hook_mlp_out(self.ffn(self.ln2(resid_mid)))
        return self.hook_resid_post(resid_mid + mlp_out)

    def keys_values(self, x: Tensor, cache: KVCache | None = None) -> tuple[Tensor, Tensor]:
        """The keys and values the attention computes for resid_pre x [batch, pos, d_model] (no output):
        each [batch, n_heads, pos, d_head]."""
        h = self.ln1(x)
        _, k, v = self.attn.project(h, queries=False) if cache is None else cache.project(self.attn, h, queries=False)
        return k, v
