"""YOCO, "You Only Cache Once" (Sun et al. 2024): a decoder-decoder with one shared global KV cache.

The layer stack is split in two halves (`n_self = n_layers // 2`):

- **self-decoder**, blocks `0 .. n_self - 1`: ordinary pre-LN blocks whose attention is causal *sliding
  window* attention (`SlidingWindowAttention`): the query at position `i` sees the keys at positions
  `i - yoco_window + 1 .. i` only. (The paper uses gated retention or sliding-window attention; we use SWA.)
- **shared K/V** (`yoco_kv`, a model-level module): computed ONCE from the self-decoder's output `x`,
  `K = k_proj(ln(x))`, `V = v_proj(ln(x))`, and shared by every cross-decoder layer.
- **cross-decoder**, blocks `n_self .. n_layers - 1`: pre-LN blocks whose attention (`CrossAttention`) has
  only `q_proj` and `o_proj`; its queries attend causally to the shared K/V.

Generation (`YocoCache`) keeps a ring buffer of the last `yoco_window` keys/values per self-decoder layer
plus ONE global K/V cache for the cross-decoder: `O(n_self * window + T)` memory instead of the vanilla
`O(n_layers * T)`.

Prefill note: YOCO's cross-decoder only needs the shared K/V of the prompt and the *last* position's
queries to produce the next token, so a prefill can stop the cross-decoder early (the paper's "early
exit", which makes prefill cost roughly that of the self-decoder). We do not implement it: `forward`
always computes logits for every position, as the rest of tinygpt (losses, hooks, `generate`) expects.

Hook points (TransformerLens style, see docs/hooks.md, section "YOCO"):

    blocks.{i}.attn.hook_q/_k/_v/_z                  self-decoder, [batch, pos, n_heads, d_head]
    blocks.{i}.attn.hook_attn_scores/_pattern        self-decoder, [batch, n_heads, dest_pos, src_pos],
                                                     -inf / 0 outside the window
    yoco_kv.ln.hook_scale / hook_normalized          [batch, pos, 1] / [batch, pos, d_model]
    yoco_kv.hook_k / hook_v                          the shared keys/values, [batch, pos, n_heads, d_head]
    blocks.{j}.attn.hook_q/_z                        cross-decoder, [batch, pos, n_heads, d_head]
    blocks.{j}.attn.hook_attn_scores/_pattern        cross-decoder, [batch, n_heads, dest_pos, src_pos]
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from transformer_lens.hook_points import HookPoint

from tinygpt.config import ConfigError, GPTConfig
from tinygpt.model import GPT, Attention, LayerNorm, observed

__all__ = ["CrossAttention", "SharedKV", "SlidingWindowAttention", "YocoCache", "YocoGPT", "YocoKV"]


def _use_eager(attn: nn.Module) -> bool:
    """The fast/eager rule of `tinygpt.model.Attention` (see docs/hooks.md) for YOCO's attention modules."""
    impl = attn.cfg.attn_impl
    if impl not in ("auto", "eager", "sdpa", "mps"):
        raise RuntimeError(
            f"attn_impl={impl!r} is not available with yoco: its kernel has no sliding-window mask; "
            "use 'auto', 'sdpa' or 'eager' (YOCO's attention runs PyTorch SDPA, on the model's device)"
        )
    eager = impl == "eager" or observed(attn.hook_attn_scores) or observed(attn.hook_pattern)
    if eager and impl == "sdpa":
        raise RuntimeError(
            "attn_impl='sdpa' cannot expose attention scores/pattern to hooks; "
            "use attn_impl='auto' (falls back to eager when a hook needs the pattern) or 'eager'"
        )
    return eager


def _softmax(scores: Tensor, dtype: torch.dtype) -> Tensor:
    """Softmax over the last axis in at least fp32, returned in `dtype` (as `Attention` does)."""
    return scores.softmax(-1, dtype=torch.promote_types(dtype, torch.float32)).to(dtype)


class YocoCache:
    """Decoding cache of a `YocoGPT`: window caches for the self-decoder, one global cache for the cross-decoder.

    Attributes:
        wk, wv: [n_self, batch, n_heads, w, d_head] ring buffers, `w = min(yoco_window, max_len)`; the
            key/value of position `s` lives in slot `s % w` (only the last `w` positions are kept).
        k, v: [batch, n_heads, max_len, d_head], the shared K/V of every position so far (cross-decoder).
        length: positions processed so far (the model advances it; set it to 0 to start over).
        max_len: capacity of the global cache.
    """

    def __init__(self, cfg: GPTConfig, batch: int, max_len: int, device, dtype: torch.dtype):
        n_self = cfg.n_layers // 2
        self.window = cfg.yoco_window
        self.slots = min(cfg.yoco_window, max_len)
        wshape = (n_self, batch, cfg.n_heads, self.slots, cfg.d_head)
        self.wk = torch.empty(wshape, device=device, dtype=dtype)
        self.wv = torch.empty(wshape, device=device, dtype=dtype)
        gshape = (batch, cfg.n_heads, max_len, cfg.d_head)
        self.k = torch.empty(gshape, device=device, dtype=dtype)
        self.v = torch.empty(gshape, device=device, dtype=dtype)
        self.length = 0
        self.max_len = max_len

    @property
    def nbytes(self) -> int:
        """Bytes held by the cache tensors."""
        return sum(t.numel() * t.element_size() for t in (self.wk, self.wv, self.k, self.v))

    def window_step(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """One new position (k, v: [batch, n_heads, 1, d_head]) into the ring of self-decoder `layer`.

        Returns every key/value in the window of the new position, [batch, n_heads, n, d_head], in ring
        (not position) order: fine for attention without a mask, where the order of keys does not matter.
        """
        p = self.length
        self.wk[layer, :, :, p % self.slots] = k[:, :, 0]
        self.wv[layer, :, :, p % self.slots] = v[:, :, 0]
        n = min(p + 1, self.window, self.slots)
        return self.wk[layer, :, :, :n], self.wv[layer, :, :, :n]

    def window_update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, int]:
        """New positions (k, v: [batch, n_heads, t, d_head]) for self-decoder `layer`.

        Returns (keys, values, first): the cached positions the new queries can still see followed by the
        new ones, in position order, [batch, n_heads, n_cached + t, d_head]; `first` is the position of
        the first returned key. Then keeps the last `w` positions in the ring.
        """
        p, t = self.length, k.shape[2]
        n_cached = min(p, self.window - 1)
        if n_cached:
            idx = torch.arange(p - n_cached, p, device=k.device) % self.slots
            k_all = torch.cat([self.wk[layer].index_select(2, idx), k], dim=2)
            v_all = torch.cat([self.wv[layer].index_select(2, idx), v], dim=2)
        else:
            k_all, v_all = k, v
        m = min(t, self.slots)
        idx = torch.arange(p + t - m, p + t, device=k.device) % self.slots
        self.wk[layer].index_copy_(2, idx, k[:, :, t - m :])
        self.wv[layer].index_copy_(2, idx, v[:, :, t - m :])
        return k_all, v_all, p - n_cached

    def update_global(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Append the shared k, v [batch, n_heads, t, d_head]; return all of them so far."""
        s, t = self.length, k.shape[2]
        self.k[:, :, s : s + t] = k
        self.v[:, :, s : s + t] = v
        return self.k[:, :, : s + t], self.v[:, :, : s + t]


def _window_mask(first_src: int, n_src: int, first_dest: int, n_dest: int, window: int, device) -> Tensor:
    """[n_dest, n_src] bool, True where the query may attend: `dest - window < src <= dest`."""
    src = torch.arange(first_src, first_src + n_src, device=device)[None, :]
    dest = torch.arange(first_dest, first_dest + n_dest, device=device)[:, None]
    return (src <= dest) & (src > dest - window)


class SlidingWindowAttention(Attention):
    """Self-decoder attention: causal, each query sees at most the last `yoco_window` keys (itself included).

    Same projections and hooks as `tinygpt.model.Attention`; `hook_attn_scores` is `-inf` and
    `hook_pattern` is 0 outside the window. With a `YocoCache` the key axis (`src_pos`) of the scores
    and pattern covers only the keys still in the window cache followed by the new ones.
    """

    def __init__(self, cfg: GPTConfig, layer: int):
        super().__init__(cfg, layer)
        self.window = cfg.yoco_window

    def forward(self, x: Tensor, cache: YocoCache | None = None) -> Tensor:
        """x: [batch, pos, d_model] -> [batch, pos, d_model]."""
        cfg, w = self.cfg, self.window
        b, t, _ = x.shape
        q = self.hook_q(self.q_proj(x).view(b, t, cfg.n_heads, cfg.d_head)).transpose(1, 2)
        k = self.hook_k(self.k_proj(x).view(b, t, cfg.n_heads, cfg.d_head)).transpose(1, 2)
        v = self.hook_v(self.v_proj(x).view(b, t, cfg.n_heads, cfg.d_head)).transpose(1, 2)
        p_drop = cfg.dropout if self.training else 0.0
        eager = _use_eager(self)
        past, first = 0, 0
        if cache is not None:
            if not isinstance(cache, YocoCache):
                raise TypeError(f"a YOCO model needs a YocoCache (model.make_cache(...)), got {type(cache).__name__}")
            past = cache.length
            if t == 1 and not eager:  # decoding: every key in the ring is in the window, no mask needed
                k, v = cache.window_step(self.layer, k, v)
                z = F.scaled_dot_product_attention(q, k, v, dropout_p=p_drop)
                return self._out(z, b, t, p_drop)
            k, v, first = cache.window_update(self.layer, k, v)
        n_src = k.shape[2]
        if eager:
            scores = (q @ k.transpose(-1, -2)) / math.sqrt(cfg.d_head)  # [b, H, t, n_src]
            mask = _window_mask(first, n_src, past, t, w, x.device)
            scores = self.hook_attn_scores(scores.masked_fill(~mask, float("-inf")))
            pattern = self.hook_pattern(_softmax(scores, q.dtype))
            z = F.dropout(pattern, p_drop) @ v if p_drop else pattern @ v
        elif past == 0 and t <= w:  # the window reaches back to position 0 for every query: plain causal
            z = F.scaled_dot_product_attention(q, k, v, dropout_p=p_drop, is_causal=True)
        else:
            mask = _window_mask(first, n_src, past, t, w, x.device)
            z = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p_drop)
        return self._out(z, b, t, p_drop)

    def _out(self, z: Tensor, b: int, t: int, p_drop: float) -> Tensor:
        z = self.hook_z(z.transpose(1, 2))  # [b, t, H, d_head]
        out = self.o_proj(z.reshape(b, t, self.cfg.n_heads * self.cfg.d_head))
        return F.dropout(out, p_drop) if p_drop else out


class YocoKV(nn.Module):
    """The shared global K/V: `K = k_proj(ln(x))`, `V = v_proj(ln(x))` of the self-decoder output `x`.

    Computed once per forward and attended to by every cross-decoder layer.
    """

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        hd = cfg.n_heads * cfg.d_head
        self.ln = LayerNorm(cfg.d_model, cfg.layer_norm_eps)
        self.k_proj = nn.Linear(cfg.d_model, hd)
        self.v_proj = nn.Linear(cfg.d_model, hd)
        self.hook_k = HookPoint()  # [batch, pos, n_heads, d_head]
        self.hook_v = HookPoint()

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x: [batch, pos, d_model] -> (k, v), each [batch, n_heads, pos, d_head]."""
        cfg = self.cfg
        b, t, _ = x.shape
        h = self.ln(x)
        k = self.hook_k(self.k_proj(h).view(b, t, cfg.n_heads, cfg.d_head)).transpose(1, 2)
        v = self.hook_v(self.v_proj(h).view(b, t, cfg.n_heads, cfg.d_head)).transpose(1, 2)
        return k, v

    W_K = Attention.W_K  # [n_heads, d_model, d_head]
    W_V = Attention.W_V
    b_K = Attention.b_K  # [n_heads, d_head]
    b_V = Attention.b_V


@dataclass
class SharedKV:
    """What a cross-decoder block attends to: the shared k, v [batch, n_heads, past + pos, d_head] of every
    position so far; the block's queries are positions `past .. past + pos - 1`."""

    k: Tensor
    v: Tensor
    past: int = 0


class CrossAttention(nn.Module):
    """Cross-decoder attention: own `q_proj` and `o_proj`, keys and values from the shared `yoco_kv`.

    `W_K`, `W_V`, `b_K`, `b_V` are views of the shared projections (every cross-decoder layer reads the
    same ones); note that they act on `yoco_kv.ln` of the self-decoder output, not on this block's `ln1`.
    """

    def __init__(self, cfg: GPTConfig, layer: int, shared: YocoKV):
        super().__init__()
        self.cfg, self.layer = cfg, layer
        hd = cfg.n_heads * cfg.d_head
        self.q_proj = nn.Linear(cfg.d_model, hd)
        self.o_proj = nn.Linear(hd, cfg.d_model)
        for name in ("q", "z", "attn_scores", "pattern"):
            setattr(self, f"hook_{name}", HookPoint())
        object.__setattr__(self, "_shared", shared)  # a reference, not a submodule (the model owns it)

    def needs_eager(self) -> bool:
        return observed(self.hook_attn_scores) or observed(self.hook_pattern)

    def forward(self, x: Tensor, kv: SharedKV) -> Tensor:
        """x: [batch, pos, d_model], kv: the shared keys/values -> [batch, pos, d_model]."""
        if not isinstance(kv, SharedKV):
            raise TypeError(
                "a YOCO cross-decoder block attends to the shared K/V: call the whole model "
                f"(YocoGPT.run_blocks passes a SharedKV), got {type(kv).__name__}"
            )
        cfg = self.cfg
        b, t, _ = x.shape
        q = self.hook_q(self.q_proj(x).view(b, t, cfg.n_heads, cfg.d_head)).transpose(1, 2)
        k, v, past = kv.k, kv.v, kv.past
        p_drop = cfg.dropout if self.training else 0.0
        if _use_eager(self):
            scores = (q @ k.transpose(-1, -2)) / math.sqrt(cfg.d_head)  # [b, H, t, past + t]
            mask = _window_mask(0, k.shape[2], past, t, k.shape[2], x.device)
            scores = self.hook_attn_scores(scores.masked_fill(~mask, float("-inf")))
            pattern = self.hook_pattern(_softmax(scores, q.dtype))
            z = F.dropout(pattern, p_drop) @ v if p_drop else pattern @ v
        elif past == 0:
            z = F.scaled_dot_product_attention(q, k, v, dropout_p=p_drop, is_causal=True)
        elif t == 1:
            z = F.scaled_dot_product_attention(q, k, v, dropout_p=p_drop)
        else:
            mask = _window_mask(0, k.shape[2], past, t, k.shape[2], x.device)
            z = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p_drop)
        z = self.hook_z(z.transpose(1, 2))  # [b, t, H, d_head]
        out = self.o_proj(z.reshape(b, t, cfg.n_heads * cfg.d_head))
        return F.dropout(out, p_drop) if p_drop else out

    W_Q = Attention.W_Q
    W_O = Attention.W_O
    b_Q = Attention.b_Q
    b_O = Attention.b_O
    W_K = property(lambda self: self._shared.W_K)
    W_V = property(lambda self: self._shared.W_V)
    b_K = property(lambda self: self._shared.b_K)
    b_V = property(lambda self: self._shared.b_V)


class YocoGPT(GPT):
    """A `GPT` whose layer stack is YOCO's self-decoder + shared K/V + cross-decoder (see the module doc).

    `GPT(cfg)` with `cfg.yoco` builds this class; block names, residual hooks and weights views are those of
    `GPT`. Attributes: `n_self` (self-decoder blocks, `n_layers // 2`), `yoco_kv` (the shared K/V module).
    """

    def __init__(self, cfg: GPTConfig | str, tokenizer=None):
        c = GPTConfig.preset(cfg) if isinstance(cfg, str) else cfg
        if not c.yoco:
            raise ConfigError("YocoGPT needs a config with yoco=True (or build GPT(cfg), which picks the class)")
        if c.attn_impl not in ("auto", "eager", "sdpa", "mps"):
            raise ConfigError(
                f"attn_impl={c.attn_impl!r} is not available with yoco: its kernel has no sliding-window mask; "
                "use 'auto', 'sdpa' or 'eager' (YOCO's attention runs PyTorch SDPA, on the model's device)"
            )
        unsupported = [name for name in ("diff_attn", "mod") if getattr(c, name)]
        if unsupported:
            raise ConfigError(
                f"yoco cannot be combined with {', '.join(unsupported)} yet (YOCO replaces every block's "
                "attention with sliding-window / cross attention); switch one of them off"
            )
        super().__init__(cfg, tokenizer)

    def build_extra(self) -> None:
        cfg = self.cfg
        self.n_self = cfg.n_layers // 2
        self.yoco_kv = YocoKV(cfg)
        for i, block in enumerate(self.blocks):
            block.attn = SlidingWindowAttention(cfg, i) if i < self.n_self else CrossAttention(cfg, i, self.yoco_kv)

    def run_blocks(self, x: Tensor, cache: YocoCache | None) -> Tensor:
        """Self-decoder, shared K/V (computed once), cross-decoder: [batch, pos, d_model] -> same."""
        if cache is not None and not isinstance(cache, YocoCache):
            raise TypeError(
                f"a YOCO model needs a YocoCache, got {type(cache).__name__}; create it with model.make_cache(batch)"
            )
        for block in self.blocks[: self.n_self]:
            x = block(x, cache)
        k, v = self.yoco_kv(x)
        past = 0
        if cache is not None:
            past = cache.length
            k, v = cache.update_global(k, v)
        shared = SharedKV(k, v, past)
        for block in self.blocks[self.n_self :]:
            x = block(x, shared)
        return x

    def make_cache(self, batch: int, max_len: int | None = None) -> YocoCache:
        """A `YocoCache`: window caches for the self-decoder plus one global K/V cache of `max_len` positions."""
        w = self.embed.weight
        return YocoCache(self.cfg, batch, max_len or self.cfg.n_ctx, w.device, w.dtype)
