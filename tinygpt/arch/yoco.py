"""YOCO, "You Only Cache Once" (Sun et al. 2024): a decoder-decoder with one shared global KV cache.

The layer stack is split in two halves (`n_self = n_layers // 2`):

- **self-decoder**, blocks `0 .. n_self - 1`: ordinary pre-LN blocks whose attention is causal *sliding
  window* attention (`SlidingWindowAttention`): the query at position `i` sees the keys at positions
  `i - yoco_window + 1 .. i` only. (The paper uses gated retention or sliding-window attention; we use SWA.)
- **shared K/V** (`yoco_kv`, a model-level module): computed ONCE from the self-decoder's output `x`,
  `K = k_proj(ln(x))`, `V = v_proj(ln(x))`, and shared by every cross-decoder layer.
- **cross-decoder**, blocks `n_self .. n_layers - 1`: pre-LN blocks whose attention (`CrossAttention`) has
  only `q_proj` and `o_proj`; its queries attend causally to the shared K/V.

The model is a plain `GPT` whose model-level strategy is `YocoStack` (`tinygpt.arch.model_stack` picks it for
`yoco=True`): it adds `yoco_kv` and `n_self`, gives the blocks their YOCO attention and chains the two halves.
The caches (`SharedKV`, `YocoCache`) live in `tinygpt.model.cache` and are re-exported here.

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

import torch.nn as nn
from torch import Tensor
from transformer_lens.hook_points import HookPoint

from tinygpt.arch import backends
from tinygpt.arch.diff_attn import DiffAttention
from tinygpt.config import ConfigError, GPTConfig
from tinygpt.model.cache import CacheError, KVCache, SharedKV, YocoCache
from tinygpt.model.heads import HeadInputs
from tinygpt.model.layers import Attention, HeadViews, ModelError, make_norm, observed, proj_heads, split_heads
from tinygpt.model.stack import Stack

__all__ = [
    "YOCO_STACK",
    "CrossAttention",
    "DiffCrossAttention",
    "DiffSlidingWindowAttention",
    "SharedKV",
    "SlidingWindowAttention",
    "YocoCache",
    "YocoKV",
    "YocoStack",
]


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


def _window_qkv(attn: nn.Module, x: Tensor, cache) -> tuple[Tensor, Tensor, Tensor, int | None]:
    """A self-decoder attention's queries [batch, n_heads, t, d_head], the keys and values they see and the
    window to mask them with (see `_window_keys`)."""
    q, k, v = attn.project(x)
    fast = not backends.use_eager(attn.cfg.attn_impl, attn.needs_eager(), q.device)
    return q, *_window_keys(attn, k, v, cache, fast)


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
        q, k, v, window = _window_qkv(self, x, cache)
        return self.out(self.attend(q, k, v, k.shape[2] - q.shape[2], window=window))


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
        q, k, v, window = _window_qkv(self, x, cache)
        return self.attend(q, k, v, window=window)


class YocoKV(nn.Module):
    """The shared global K/V: `K = k_proj(ln(x))`, `V = v_proj(ln(x))` of the self-decoder output `x`.

    Computed once per forward and attended to by every cross-decoder layer.
    """

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        hd = cfg.n_heads * cfg.d_head
        self.ln = make_norm(cfg)
        self.k_proj = nn.Linear(cfg.d_model, hd, bias=cfg.qkv_has_bias)
        self.v_proj = nn.Linear(cfg.d_model, hd, bias=cfg.qkv_has_bias)
        self.hook_k = HookPoint()  # [batch, pos, n_heads, d_head]
        self.hook_v = HookPoint()

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x: [batch, pos, d_model] -> (k, v), each [batch, n_heads, pos, d_head]."""
        h = self.ln(x)
        return split_heads(self.cfg, self.hook_k, self.k_proj(h)), split_heads(self.cfg, self.hook_v, self.v_proj(h))

    _W_K, _W_V, _b_K, _b_V = HeadViews._W_K, HeadViews._W_V, HeadViews._b_K, HeadViews._b_V
    W_K = HeadViews.W_K  # [n_heads, d_model, d_head]
    W_V = HeadViews.W_V
    b_K = HeadViews.b_K  # [n_heads, d_head]
    b_V = HeadViews.b_V


def _check_shared(kv) -> None:
    if not isinstance(kv, SharedKV):
        raise CacheError(
            "a YOCO cross-decoder block attends to the shared K/V: call the whole model "
            f"(YocoStack.run_blocks passes a SharedKV), got {type(kv).__name__}"
        )


class CrossAttention(nn.Module):
    """Cross-decoder attention: own `q_proj` and `o_proj`, keys and values from the shared `yoco_kv`.

    `W_K`, `W_V`, `b_K`, `b_V` are views of the shared projections (every cross-decoder layer reads the
    same ones); note that they act on `yoco_kv.ln` of the self-decoder output, not on this block's `ln1`.
    """

    rotary = None  # yoco with rotary is refused by GPTConfig

    def __init__(self, cfg: GPTConfig, layer: int, shared: YocoKV):
        super().__init__()
        self.cfg, self.layer = cfg, layer
        hd = cfg.n_heads * cfg.d_head
        self.q_proj = nn.Linear(cfg.d_model, hd, bias=cfg.qkv_has_bias)
        self.o_proj = nn.Linear(hd, cfg.d_model, bias=cfg.bias)
        for name in ("q", "z", "attn_scores", "pattern", "result"):
            setattr(self, f"hook_{name}", HookPoint())
        object.__setattr__(self, "_shared", shared)  # a reference, not a submodule (the model owns it)

    def needs_eager(self) -> bool:
        return observed(self.hook_attn_scores) or observed(self.hook_pattern)

    def forward(self, x: Tensor | HeadInputs, kv: SharedKV) -> Tensor:
        """x: [batch, pos, d_model] (or per-head inputs: only their queries' are used), kv: the shared
        keys/values -> [batch, pos, d_model]."""
        _check_shared(kv)
        q = proj_heads(self.cfg, self.hook_q, self.q_proj, x.q if isinstance(x, HeadInputs) else x)
        return self.out(self.attend(q, kv.k, kv.v, kv.k.shape[2] - q.shape[2], q_pos=kv.q_pos))

    def unsupported_switch(self, name: str) -> str | None:
        return _cross_switch(self.layer, name)

    attend = Attention.attend  # the attention math and output projection of `Attention`, written once
    out = Attention.out
    W_Q = HeadViews.W_Q
    W_O = HeadViews.W_O
    b_Q = HeadViews.b_Q
    b_O = HeadViews.b_O
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

    def forward(self, x: Tensor | HeadInputs, kv: SharedKV) -> Tensor:
        """x: [batch, pos, d_model] (or per-head inputs: only their queries' are used), kv: the shared
        keys/values -> [batch, pos, d_model]."""
        _check_shared(kv)
        q = proj_heads(self.cfg, self.hook_q, self.q_proj, x.q if isinstance(x, HeadInputs) else x)
        return self.attend(q, kv.k, kv.v, q_pos=kv.q_pos)

    def unsupported_switch(self, name: str) -> str | None:
        return _cross_switch(self.layer, name)

    W_K = property(lambda self: self._shared.W_K)
    W_V = property(lambda self: self._shared.W_V)
    b_K = property(lambda self: self._shared.b_K)
    b_V = property(lambda self: self._shared.b_V)


def _cross_switch(layer: int, name: str) -> str | None:
    """Why a cross-decoder block cannot express the hook switch `name` (None: it can)."""
    if name == "use_split_qkv_input":
        return (
            f"YOCO (yoco=True): the keys and values of cross-decoder block {layer} are not computed from its own "
            "input but once, from the self-decoder's output, by the shared yoco_kv, so the block has no key or value "
            "input to split; use set_use_attn_in (its hook_attn_in feeds the cross-decoder queries only), or a "
            "model without yoco"
        )
    return None


class YocoStack(Stack):
    """YOCO's layer stack: self-decoder, the shared K/V (`model.yoco_kv`, computed once), cross-decoder.

    `GPT(cfg)` with `cfg.yoco` uses it (`tinygpt.arch.model_stack`); block names, residual hooks and weight
    views are those of every `GPT`. `build` adds `model.n_self` (self-decoder blocks, `n_layers // 2`) and
    `model.yoco_kv` (the shared K/V module), and gives each block the YOCO form of its attention.
    """

    name = "yoco"

    def build(self, model: nn.Module) -> None:
        cfg = model.cfg
        if not cfg.yoco:
            raise ConfigError("the YOCO stack needs a config with yoco=True (GPT(cfg) picks the stack)")
        model.n_self = cfg.n_layers // 2
        model.yoco_kv = YocoKV(cfg)
        if cfg.diff_attn:
            window_cls, cross_cls = DiffSlidingWindowAttention, DiffCrossAttention
        else:
            window_cls, cross_cls = SlidingWindowAttention, CrossAttention
        for i, block in enumerate(model.blocks):
            block.attn = window_cls(cfg, i) if i < model.n_self else cross_cls(cfg, i, model.yoco_kv)

    def run_blocks(self, model: nn.Module, x: Tensor, cache: YocoCache | None) -> Tensor:
        """Self-decoder, shared K/V (computed once), cross-decoder: [batch, pos, d_model] -> same."""
        if cache is not None and not isinstance(cache, YocoCache):
            raise CacheError(
                f"a YOCO model needs a YocoCache, got {type(cache).__name__}; create it with model.make_cache(batch)"
            )
        return self._run(model, 0, x, cache, len(model.blocks))

    def _run(self, model: nn.Module, layer: int, x: Tensor, cache: YocoCache | None, stop: int) -> Tensor:
        for block in model.blocks[layer : min(stop, model.n_self)]:
            x = block(x, cache)
        if stop <= model.n_self:
            return x
        k, v = model.yoco_kv(x)
        past = 0
        if cache is not None:
            past = cache.length
            k, v = cache.update_global(k, v)
        shared = SharedKV(k, v, past, cached=cache is not None)
        for block in model.blocks[max(layer, model.n_self) : stop]:
            x = block(x, shared)
        return x

    def make_cache(self, model: nn.Module, batch: int, max_len: int) -> YocoCache:
        """A `YocoCache`: window caches for the self-decoder plus one global K/V cache of `max_len` positions."""
        w = model.embed.weight
        return YocoCache(model.cfg, batch, max_len, w.device, w.dtype)

    def check_run_from(self, model: nn.Module, layer: int, start_at: str, stop_at: int, cache) -> None:
        """YOCO runs from a self-decoder layer, or from `n_self` (whose input is the self-decoder's output, from
        which the shared K/V is computed), without a cache."""
        if cache is not None:
            raise CacheError("a YOCO model runs from a layer without a cache (its caches are YocoCache rings)")
        if layer > model.n_self or (layer == model.n_self and start_at == "resid_mid" and stop_at > layer + 1):
            raise ModelError(
                f"a YOCO cross-decoder block attends to the shared K/V of the self-decoder's output: run from a "
                f"layer <= n_self = {model.n_self} (the whole cross-decoder then runs), not from layer {layer}"
            )

    def run_range(
        self, model: nn.Module, layer: int, x: Tensor, stop_at: int, cache: KVCache | None, last_only: bool
    ) -> Tensor:
        x = self._run(model, layer, x, None, stop_at)
        return x[:, -1:] if last_only else x


YOCO_STACK = YocoStack()
