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

Attention runs through `tinygpt.arch.backends` like every other attention module: the fast/eager rule
(eager when a hook observes the scores or pattern), and `attend` with the mask options `window` (the
self-decoder's band) and `q_pos` (see below) on SDPA, our Triton kernel (which implements both) or MPS.

Combinations with the other knobs (each block keeps its usual structure, so they compose):

- `diff_attn`: the self-decoder's attention is `DiffSlidingWindowAttention` (differential attention within
  the window) and the cross-decoder's `DiffCrossAttention`: its queries `[Q1 | Q2]` come from its own
  `q_proj`, the shared keys split the same way (`K1 = K[..., :d_head/2]`, `K2 = K[..., d_head/2:]`), the
  shared values are used whole; λ, the per-head RMSNorm and every hook are those of
  `tinygpt.arch.diff_attn.DiffAttention` (without `hook_k`/`hook_v` in the cross-decoder).
- `moe_experts`: every block's feed-forward is a mixture of experts, as without YOCO.
- `mod`: routed blocks (`i % mod_every == mod_every - 1`) may lie in either half. Only the routed tokens go
  through a routed block, gathered in causal order, as without YOCO. A routed **self-decoder** block
  treats its routed sub-sequence as the sequence (as Mixture-of-Depths always does): a routed token sees the
  last `yoco_window` routed tokens, and its cache keeps the last `yoco_window` routed keys/values of each
  row (a ring, `tinygpt.arch.mod.RoutedKV` with a window). A routed **cross-decoder** block's queries attend
  to the shared keys of every position up to their own (the shared K/V is computed for all tokens, routed
  or not): `SharedKV.select` gives them their positions, `q_pos`; it needs no cache of its own.

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

With `diff_attn` the score and pattern hooks are differential attention's (`hook_attn_scores1/2`,
`hook_pattern1/2`, `hook_lambda`, `hook_pattern` = the differential map, `subln.hook_scale`), masked the
same way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from transformer_lens.hook_points import HookPoint

from tinygpt.arch import backends
from tinygpt.arch.diff_attn import DiffAttention
from tinygpt.config import ConfigError, GPTConfig
from tinygpt.model import GPT, Attention, KVCache, LayerNorm, observed

__all__ = [
    "CrossAttention",
    "DiffCrossAttention",
    "DiffSlidingWindowAttention",
    "SharedKV",
    "SlidingWindowAttention",
    "YocoCache",
    "YocoGPT",
    "YocoKV",
]


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
        """Bytes held by the cache tensors (with Mixture-of-Depths, the routed layers' caches too)."""
        tensors = [self.wk, self.wv, self.k, self.v]
        for st in getattr(self, "routed_layers", {}).values():
            tensors += [t for t in (st.k, st.v) if t is not None]
        return sum(t.numel() * t.element_size() for t in tensors)

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


def _window_keys(attn: nn.Module, k: Tensor, v: Tensor, cache, fast: bool) -> tuple[Tensor, Tensor, int | None]:
    """The keys/values a self-decoder layer's new queries attend to, and the window to mask them with.

    Args:
        attn: the self-decoder attention (`layer`, `window`).
        k, v: [batch, n_heads, t, d_head] of the new positions.
        cache: None, the model's `YocoCache`, or one row of a Mixture-of-Depths routed layer's cache (a
            `KVCache` whose `update` returns that row's routed keys so far, or only those still in its window).
        fast: the call takes the fast path (no pattern is materialised, so keys may come in ring order).

    Returns:
        (keys, values, window): the keys end with the new positions; `window` None means every key is visible.
    """
    w = attn.window
    if cache is None:
        return k, v, w
    t = k.shape[2]
    if isinstance(cache, YocoCache):
        if t == 1 and fast:  # decoding: every key in the ring is in the window, no mask needed
            k, v = cache.window_step(attn.layer, k, v)
            return k, v, None
        k, v, _ = cache.window_update(attn.layer, k, v)
        return k, v, w
    past = cache.length
    k, v = cache.update(attn.layer, k, v)
    keep = min(past, w - 1) + t  # the cached keys the first new query can still see, then the new ones
    return k[:, :, -keep:], v[:, :, -keep:], w


def _attention(attn: nn.Module, q: Tensor, k: Tensor, v: Tensor, *, window=None, q_pos=None) -> Tensor:
    """Plain attention of a YOCO module: the fast/eager rule, `hook_z`, `o_proj`.

    Args:
        attn: the module (`cfg`, `hook_attn_scores`, `hook_pattern`, `hook_z`, `o_proj`, `needs_eager`).
        q: [batch, n_heads, t, d_head]; k, v: [batch, n_heads, n, d_head], the queries' positions last.
        window, q_pos: the mask options of `tinygpt.arch.backends.attn_mask`.

    Returns:
        [batch, t, d_model].
    """
    cfg = attn.cfg
    b, _, t, _ = q.shape
    n = k.shape[2]
    p_drop = cfg.dropout if attn.training else 0.0
    if backends.use_eager(cfg.attn_impl, attn.needs_eager(), q.device):
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(cfg.d_head)  # [b, H, t, n]
        mask = backends.attn_mask(t, n, q.device, window=window, q_pos=q_pos)
        scores = attn.hook_attn_scores(scores.masked_fill(~mask, float("-inf")))
        pattern = attn.hook_pattern(_softmax(scores, q.dtype))
        z = F.dropout(pattern, p_drop) @ v if p_drop else pattern @ v
    else:  # fused: SDPA or our Triton kernel
        z = backends.attend(q, k, v, n - t, p_drop, cfg.attn_impl, window=window, q_pos=q_pos)
    z = attn.hook_z(z.transpose(1, 2))  # [b, t, H, d_head]
    out = attn.o_proj(z.reshape(b, t, cfg.n_heads * cfg.d_head))
    return F.dropout(out, p_drop) if p_drop else out


class SlidingWindowAttention(Attention):
    """Self-decoder attention: causal, each query sees at most the last `yoco_window` keys (itself included).

    Same projections and hooks as `tinygpt.model.Attention`; `hook_attn_scores` is `-inf` and
    `hook_pattern` is 0 outside the window. With a `YocoCache` the key axis (`src_pos`) of the scores
    and pattern covers only the keys still in the window cache followed by the new ones.
    """

    def __init__(self, cfg: GPTConfig, layer: int):
        super().__init__(cfg, layer)
        self.window = cfg.yoco_window

    def forward(self, x: Tensor, cache: YocoCache | KVCache | None = None) -> Tensor:
        """x: [batch, pos, d_model] -> [batch, pos, d_model]."""
        cfg = self.cfg
        b, t, _ = x.shape
        q = self.hook_q(self.q_proj(x).view(b, t, cfg.n_heads, cfg.d_head)).transpose(1, 2)
        k = self.hook_k(self.k_proj(x).view(b, t, cfg.n_heads, cfg.d_head)).transpose(1, 2)
        v = self.hook_v(self.v_proj(x).view(b, t, cfg.n_heads, cfg.d_head)).transpose(1, 2)
        fast = not backends.use_eager(cfg.attn_impl, self.needs_eager(), x.device)
        k, v, window = _window_keys(self, k, v, cache, fast)
        return _attention(self, q, k, v, window=window)


class DiffSlidingWindowAttention(DiffAttention):
    """Self-decoder attention with `diff_attn`: differential attention (both softmax maps) within the window.

    Parameters and hooks are those of `tinygpt.arch.diff_attn.DiffAttention`; scores are `-inf` and both
    maps 0 outside the window, as in `SlidingWindowAttention`.
    """

    def __init__(self, cfg: GPTConfig, layer: int):
        super().__init__(cfg, layer)
        self.window = cfg.yoco_window

    def forward(self, x: Tensor, cache: YocoCache | KVCache | None = None) -> Tensor:
        """x: [batch, pos, d_model] -> [batch, pos, d_model]."""
        q, k, v = self.project(x)
        fast = not backends.use_eager(self.cfg.attn_impl, self.needs_eager(), x.device)
        k, v, window = _window_keys(self, k, v, cache, fast)
        return self.attend(q, k, v, window=window)


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
    """What a cross-decoder block attends to: the shared keys/values of every position so far.

    Attributes:
        k, v: [batch, n_heads, past + pos, d_head].
        past: positions before the current chunk; the block's queries are positions `past .. past + pos - 1`.
        q_pos: [batch, q] key index of each query, when the queries are a sub-sequence of the chunk (a
            Mixture-of-Depths routed block; see `select`); None: the whole chunk, in order.
        cached: a `YocoCache` is in use (incremental decoding).
    """

    k: Tensor
    v: Tensor
    past: int = 0
    q_pos: Tensor | None = None
    cached: bool = False

    def select(self, idx: Tensor) -> SharedKV:
        """The same keys, for queries at positions `idx` [batch, q] (int64) of the current chunk."""
        return SharedKV(self.k, self.v, self.past, idx + self.past, self.cached)


def _check_shared(kv) -> None:
    if not isinstance(kv, SharedKV):
        raise TypeError(
            "a YOCO cross-decoder block attends to the shared K/V: call the whole model "
            f"(YocoGPT.run_blocks passes a SharedKV), got {type(kv).__name__}"
        )


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
        _check_shared(kv)
        cfg = self.cfg
        b, t, _ = x.shape
        q = self.hook_q(self.q_proj(x).view(b, t, cfg.n_heads, cfg.d_head)).transpose(1, 2)
        return _attention(self, q, kv.k, kv.v, q_pos=kv.q_pos)

    W_Q = Attention.W_Q
    W_O = Attention.W_O
    b_Q = Attention.b_Q
    b_O = Attention.b_O
    W_K = property(lambda self: self._shared.W_K)
    W_V = property(lambda self: self._shared.W_V)
    b_K = property(lambda self: self._shared.b_K)
    b_V = property(lambda self: self._shared.b_V)


class DiffCrossAttention(DiffAttention):
    """Cross-decoder attention with `diff_attn`: differential attention of its own queries over the shared K/V.

    Parameters: `q_proj`, `o_proj`, λ vectors and `subln` (no `k_proj`/`v_proj`). Queries split into
    `[Q1 | Q2]` as in `DiffAttention`, the shared keys (`yoco_kv.hook_k`) into `[K1 | K2]` the same way; the
    shared values are used whole. `W_K`, `W_V`, `b_K`, `b_V` are views of the shared projections.
    """

    def __init__(self, cfg: GPTConfig, layer: int, shared: YocoKV):
        super().__init__(cfg, layer, own_kv=False)
        object.__setattr__(self, "_shared", shared)  # a reference, not a submodule (the model owns it)

    def forward(self, x: Tensor, kv: SharedKV) -> Tensor:
        """x: [batch, pos, d_model], kv: the shared keys/values -> [batch, pos, d_model]."""
        _check_shared(kv)
        cfg = self.cfg
        b, t, _ = x.shape
        q = self.hook_q(self.q_proj(x).view(b, t, cfg.n_heads, cfg.d_head)).transpose(1, 2)
        return self.attend(q, kv.k, kv.v, q_pos=kv.q_pos)

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
        super().__init__(cfg, tokenizer)

    def build_extra(self) -> None:
        cfg = self.cfg
        self.n_self = cfg.n_layers // 2
        self.yoco_kv = YocoKV(cfg)
        if cfg.diff_attn:
            window_cls, cross_cls = DiffSlidingWindowAttention, DiffCrossAttention
        else:
            window_cls, cross_cls = SlidingWindowAttention, CrossAttention
        for i, block in enumerate(self.blocks):
            block.attn = window_cls(cfg, i) if i < self.n_self else cross_cls(cfg, i, self.yoco_kv)

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
        shared = SharedKV(k, v, past, cached=cache is not None)
        for block in self.blocks[self.n_self :]:
            x = block(x, shared)
        return x

    def make_cache(self, batch: int, max_len: int | None = None) -> YocoCache:
        """A `YocoCache`: window caches for the self-decoder plus one global K/V cache of `max_len` positions."""
        w = self.embed.weight
        return YocoCache(self.cfg, batch, max_len or self.cfg.n_ctx, w.device, w.dtype)
