"""Mixture-of-Depths (`--mod`, `--mod-capacity 0.125`, `--mod-every 2`), after Raposo et al. 2024.

Routed blocks are the layers `i` with `i % mod_every == mod_every - 1`: with the default `mod_every=2`,
blocks 1, 3, 5, ... (every other block, the first block always dense); `mod_every=1` routes every block.
A routed block is a `MoDBlock`: the usual `Block` (same module names `ln1`, `attn`, `ln2`, `mlp`/`moe`, same
block hooks) plus a router `blocks.{i}.router` = `nn.Linear(d_model, 1)` scoring each token from the
block's input (the residual stream `resid_pre`, router math in fp32):

    r = router(resid_pre)                                 [batch, pos]   (hook_router_scores)
    routed = topk(r, k = ceil(mod_capacity * pos))        per sequence   (hook_routing_mask, bool)

Only routed tokens are computed: they are gathered, **in their original causal order**, into a
sub-sequence [batch, k, d_model], and attention and the feed-forward run on that sub-sequence only
(causal attention among the routed tokens; positions are the learned absolute embeddings already in the
residual stream). Skipped tokens pass unchanged (`resid_post == resid_pre` bit for bit).

Router weight. The paper multiplies the block's output by the router weight so the router gets a
gradient from the language-modelling loss. We use the gate `g = sigmoid(r)` and apply it to each
sub-layer's output (both with the same `g`), so that the block's hooks keep their exact meaning:

    attn_out  = g * attn(ln1(x))                  (scattered back, 0 for skipped tokens)
    resid_mid = resid_pre + attn_out              (the MLP's input, as in a dense block)
    mlp_out   = g * ffn(ln2(resid_mid))
    resid_post = resid_mid + mlp_out

The paper's `x + r * f(x)` would feed the MLP `x + attn(x)` while only `r * attn(x)` reaches the residual
stream, so `resid_mid` would no longer be the MLP's input. The sigmoid keeps the gate in (0, 1), monotone in
`r`, so the top-k by `r` are also the tokens with the largest gates.

Causal routing. Top-k over a sequence is not causal (a token's routing depends on later tokens' scores).
We use the paper's method 1: the router itself is trained with an auxiliary binary cross-entropy loss
`MOD_AUX_COEF * BCE(sigmoid(r), routed_by_topk)` (in `aux_loss`, added to the training loss), so its own
score predicts top-k membership; causal routing sends a token through the block iff `r > 0`
(`sigmoid(r) > 0.5`). The routing rule of each routed block is its `routing` attribute (`set_routing`):

- `"auto"` (default): top-k in training mode on a full sequence, the causal predictor in eval mode and
  whenever a KV cache is given (generation). Eval losses, hooks and `generate` therefore see exactly the
  routing a deployed model uses, and the cached and uncached paths agree.
- `"topk"`: always the training-time top-k (eval-time analysis of training routing; no KV cache).
- `"predictor"`: always the causal predictor (`r > 0`), also in training.

`metrics()` reports, for the last training batch, `mod/l{i}/agreement` (fraction of tokens where `r > 0`
equals the top-k decision), `mod/l{i}/predicted` (fraction the predictor would route; the top-k routes
`mod_capacity`) and `mod/l{i}/bce`. `routing_agreement(model, tokens)` computes the agreement on any tokens.

KV cache. Only routed tokens enter a routed block's attention cache, so each routed layer keeps its own
length per batch row: `RoutedKV` (a `KVCache` kind) holds them, created lazily and kept on the model's
cache object under `cache.routed_layers[layer]`; the plain `KVCache` from `GPT.make_cache` serves the dense
layers. Resetting `cache.length = 0` (as `generate` does to re-encode a cropped context) also resets
the routed layers. Incremental decoding equals the full forward under predictor routing (tested).

With YOCO (`tinygpt.arch.yoco`), a routed self-decoder block's cache is a `RoutedKV` with a window (each row
keeps only its last `yoco_window` routed keys, a ring), and a routed cross-decoder block gets the shared K/V
(`SharedKV`) instead of a cache: its routed queries attend to the shared keys up to their own positions.

Hook points (see docs/hooks.md, section "Mixture-of-Depths"):

    blocks.{i}.hook_router_scores       [batch, pos]   router score r (fp32)
    blocks.{i}.hook_routing_mask        [batch, pos]   True where the token goes through the block

A hook on `hook_routing_mask` may return another mask (bool, or float > 0.5 means routed): that routing runs.
Inside a routed block, `ln1`, `attn`, `ln2` and the feed-forward hooks see only the routed sub-sequence:
their `pos` axis has `k` entries (the routed count; with predictor routing the longest row's count, shorter
rows padded at the end with skipped tokens whose results are discarded). The block-level hooks
`hook_resid_pre/_attn_out/_resid_mid/_mlp_out/_resid_post` keep the full `[batch, pos, d_model]` shape
(`attn_out` and `mlp_out` are 0 at skipped tokens, gate included at routed ones), so residual-stream tools
(logit lens, `decompose_resid`, patching) work unchanged.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from transformer_lens.hook_points import HookPoint

from tinygpt.config import GPTConfig
from tinygpt.errors import TinyGPTError
from tinygpt.inputs import eval_mode
from tinygpt.model.cache import KVCache, SharedKV
from tinygpt.model.heads import HeadInputs, map_inputs
from tinygpt.model.layers import Block, ModelError, observed

__all__ = [
    "MOD_AUX_COEF",
    "ROUTING_MODES",
    "MoDBlock",
    "RoutedCacheError",
    "RoutedKV",
    "capacity_k",
    "routing",
    "routing_agreement",
    "set_routing",
]

MOD_AUX_COEF = 0.1
"""Weight of the router's auxiliary BCE loss (predict top-k membership from the router's own score)."""
ROUTING_MODES = ("auto", "topk", "predictor")


class RoutedCacheError(TinyGPTError, RuntimeError):
    """A routed layer's cache out of step with the model's cache (use a fresh one, or reset its length)."""


def capacity_k(capacity: float, pos: int) -> int:
    """Tokens a routed block takes from a sequence of `pos`: ceil(capacity * pos), at least 1."""
    return min(pos, max(1, math.ceil(capacity * pos - 1e-9)))


class RoutedKV(KVCache):
    """KV cache of ONE routed layer: each batch row has its own length (only routed tokens are stored).

    `k`, `v`: [batch, heads, slots, d_head] (allocated on the first update, with the shapes the attention
    module passes, so attention variants with other head layouts work too); `lengths[row]` routed tokens
    have been cached in each row. `seen` is the number of positions of the whole sequence processed so far
    (to detect a reset).

    Without a `window`, `slots = max_len` and every routed key stays. With one (a YOCO self-decoder layer),
    each row is a ring of `slots = min(window, max_len)` entries: routed token `s` of a row lives in slot
    `s % slots`, and an update returns only the keys the new queries can still see.
    """

    def __init__(self, batch: int, max_len: int, window: int | None = None):  # storage is allocated lazily
        self.k: Tensor | None = None
        self.v: Tensor | None = None
        self.batch, self.max_len, self.window = batch, max_len, window
        self.slots = max_len if window is None else min(window, max_len)
        self.lengths = [0] * batch
        self.seen = 0
        self.length = 0  # unused for a routed layer (rows differ); see `lengths`

    def row(self, r: int) -> _RowKV:
        """A single-row view with the `KVCache` interface the attention modules use."""
        return _RowKV(self, r)

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        raise RoutedCacheError("RoutedKV rows have different lengths: update through RoutedKV.row(r)")


class _RowKV(KVCache):
    """Row `r` of a `RoutedKV`, as a batch-1 `KVCache` (`length` = that row's cached routed tokens)."""

    def __init__(self, store: RoutedKV, r: int):  # no super().__init__: a view
        self.store, self.r = store, r
        self.length = store.lengths[r]
        self.max_len = store.max_len

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Append k, v [1, heads, t, d_head] to this row; return the row's keys and values so far (with a
        window: the last `window - 1` cached ones, then the new ones), in position order."""
        st, s, t = self.store, self.length, k.shape[2]
        if st.k is None:
            st.k = k.new_zeros(st.batch, k.shape[1], st.slots, k.shape[3])
            st.v = v.new_zeros(st.batch, v.shape[1], st.slots, v.shape[3])
        if st.window is not None:
            return self._ring_update(k, v)
        if s + t > st.max_len:
            raise ModelError(f"routed KV cache full: {s} + {t} tokens exceed max_len={st.max_len}")
        st.k[self.r, :, s : s + t] = k[0]
        st.v[self.r, :, s : s + t] = v[0]
        return st.k[self.r : self.r + 1, :, : s + t], st.v[self.r : self.r + 1, :, : s + t]

    def _ring_update(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        st, s, t, r = self.store, self.length, k.shape[2], self.r
        n_cached = min(s, st.window - 1)
        if n_cached:
            idx = torch.arange(s - n_cached, s, device=k.device) % st.slots
            k_all = torch.cat([st.k[r : r + 1].index_select(2, idx), k], dim=2)
            v_all = torch.cat([st.v[r : r + 1].index_select(2, idx), v], dim=2)
        else:
            k_all, v_all = k, v
        m = min(t, st.slots)
        idx = torch.arange(s + t - m, s + t, device=k.device) % st.slots
        st.k[r].index_copy_(1, idx, k[0, :, t - m :])
        st.v[r].index_copy_(1, idx, v[0, :, t - m :])
        return k_all, v_all


def _routed_cache(cache: KVCache, layer: int, batch: int, window: int | None = None) -> RoutedKV:
    """The `RoutedKV` of `layer`, kept on the model's cache object; a fresh one after `cache.length = 0`."""
    layers = cache.__dict__.setdefault("routed_layers", {})
    st = layers.get(layer)
    start = cache.length
    if st is None or (start == 0 and st.seen != 0):
        st = layers[layer] = RoutedKV(batch, cache.max_len, window)
    elif st.seen != start:
        raise RoutedCacheError(
            f"the routed KV cache of layer {layer} holds {st.seen} positions but the cache says {start}; "
            "use a fresh cache (model.make_cache) or reset it with cache.length = 0"
        )
    if st.batch != batch:
        raise ModelError(f"the KV cache was built for batch {st.batch}, got a batch of {batch}")
    return st


class MoDBlock(Block):
    """A routed Mixture-of-Depths block: a `Block` plus `router` (see the module docstring).

    Args:
        cfg: the model config (`mod_capacity`).
        layer: block index.
        attn, ffn: its attention and feed-forward modules, as for `Block` (`tinygpt.arch.make_block` passes
            the ones the config asks for).
    """

    splits_last = False  # routing decides which tokens run: the block runs whole

    def __init__(
        self, cfg: GPTConfig, layer: int, attn: nn.Module | None = None, ffn: tuple[str, nn.Module] | None = None
    ):
        super().__init__(cfg, layer, attn, ffn)
        self.cfg, self.layer = cfg, layer
        self.capacity = cfg.mod_capacity
        self.router = nn.Linear(cfg.d_model, 1)
        self.hook_router_scores = HookPoint()
        self.hook_routing_mask = HookPoint()
        self.routing = "auto"
        self.aux_loss: Tensor | None = None
        self._stats: Tensor | None = None  # [agreement, predicted, bce] of the last training batch

    def reset_variant_parameters(self) -> None:
        """Router weight ~ N(0, init_std), bias 0: scores near 0, so about half the tokens pass the predictor."""
        nn.init.normal_(self.router.weight, 0.0, self.cfg.init_std)
        nn.init.zeros_(self.router.bias)

    def _mode(self, decoding: bool) -> str:
        if self.routing not in ROUTING_MODES:
            raise ModelError(f"routing must be one of {ROUTING_MODES}, got {self.routing!r}")
        if decoding:
            if self.routing == "topk":
                raise ModelError(
                    "top-k routing is not causal and cannot decode with a KV cache; "
                    "use routing 'auto' or 'predictor' (tinygpt.arch.mod.set_routing)"
                )
            return "predictor"
        if self.routing == "auto":
            return "topk" if self.training else "predictor"
        return self.routing

    def forward(self, x: Tensor, cache: KVCache | SharedKV | None = None) -> Tensor:
        """x: [batch, pos, d_model] -> [batch, pos, d_model]; only routed tokens go through attn and ffn.

        `cache`: None, the model's KV cache, or (a YOCO cross-decoder block) the shared K/V.
        """
        b, t, d = x.shape
        shared = cache if isinstance(cache, SharedKV) else None
        if shared is not None:
            cache = None  # a cross-decoder block keeps no cache of its own
        resid_pre = self.hook_resid_pre(x)
        w, bias = self.router.weight, self.router.bias
        with torch.autocast(x.device.type, enabled=False):  # router math in fp32, also under autocast
            r = F.linear(resid_pre.float(), w.float(), bias.float()).squeeze(-1)
        r = self.hook_router_scores(r)  # [b, t]
        mode = self._mode(cache is not None or (shared is not None and shared.cached))
        k = capacity_k(self.capacity, t)
        topk_mask = None
        if mode == "topk" or self.training:
            top_i = r.topk(k, dim=-1).indices
            topk_mask = torch.zeros_like(r, dtype=torch.bool).scatter_(1, top_i, True)
        mask = topk_mask if mode == "topk" else r > 0

        if self.training:
            bce = F.binary_cross_entropy_with_logits(r, topk_mask.float())
            self.aux_loss = MOD_AUX_COEF * bce
            with torch.no_grad():
                pred = r > 0
                self._stats = torch.stack([(pred == topk_mask).float().mean(), pred.float().mean(), bce.detach()])
        else:
            self.aux_loss = None

        if mode == "topk" and not observed(self.hook_routing_mask):
            idx = top_i.sort(dim=1).values  # [b, k]: routed positions in causal order
            valid = None
        else:
            mask = self.hook_routing_mask(mask)
            if mask.dtype != torch.bool:
                mask = mask > 0.5
            counts = mask.sum(1)
            kmax = int(counts.max()) if b else 0
            # Routed positions first, in causal order (stable sort), then skipped ones as padding.
            idx = torch.sort((~mask).to(torch.uint8), dim=1, stable=True).indices[:, :kmax]
            valid = torch.arange(kmax, device=x.device)[None] < counts[:, None]  # [b, kmax]
            if bool(valid.all()):
                valid = None

        zeros = torch.zeros_like(resid_pre)
        if idx.shape[1] == 0:  # nothing routed anywhere: the block is the identity
            attn_out = self.hook_attn_out(zeros)
            resid_mid = self.hook_resid_mid(resid_pre + attn_out)
            mlp_out = self.hook_mlp_out(zeros)
            self._advance(cache, b, t, None)
            return self.hook_resid_post(resid_mid + mlp_out)

        gidx = idx[..., None].expand(-1, -1, d)
        gate = torch.sigmoid(r.gather(1, idx)).to(x.dtype)[..., None]  # [b, k, 1]
        if valid is not None:
            gate = gate * valid[..., None]  # padding contributes exactly 0
        h = self._routed_attn_input(resid_pre, idx, gidx)
        if shared is not None:  # routed queries at their own positions over every shared key
            a = self.attn(h, shared.select(idx))
        elif cache is None:
            a = self.attn(h, None)
        else:
            a = self._cached_attn(h, cache, b, valid)
        attn_out = self.hook_attn_out(zeros.scatter(1, gidx, (gate * a).to(zeros.dtype)))
        resid_mid = self.hook_resid_mid(resid_pre + attn_out)
        m = self.ffn(self.ln2(self.mlp_input(resid_mid).gather(1, gidx)))
        mlp_out = self.hook_mlp_out(zeros.scatter(1, gidx, (gate * m).to(zeros.dtype)))
        self._advance(cache, b, t, valid if valid is not None else idx.shape[1])
        return self.hook_resid_post(resid_mid + mlp_out)

    def _routed_attn_input(self, resid_pre: Tensor, idx: Tensor, gidx: Tensor) -> Tensor | HeadInputs:
        """The attention input of the routed tokens `idx` [batch, routed]: `ln1` of their resid_pre, or with a
        per-head hook switch, the block's per-head inputs (hooked at every position) gathered, then `ln1`."""
        if not (self.cfg.use_split_qkv_input or self.cfg.use_attn_in):
            return self.ln1(resid_pre.gather(1, gidx))

        def routed(x: Tensor) -> Tensor:  # [batch, pos, heads, d_model] -> [batch, routed, heads, d_model]
            return self.ln1(x.gather(1, idx[:, :, None, None].expand(-1, -1, *x.shape[2:])))

        return self.split_input(resid_pre).map(routed)

    def finish(self, resid_mid: Tensor) -> Tensor:
        """Not defined for a routed block: its feed-forward half needs the routing made from `resid_pre`."""
        raise ModelError(
            f"block {self.layer} is a routed (Mixture-of-Depths) block: its feed-forward half needs the routing "
            "decided from its resid_pre; run it from resid_pre"
        )

    @property
    def _window(self) -> int | None:
        """The sliding window of this block's attention (YOCO's self-decoder), else None."""
        return getattr(self.attn, "window", None)

    def _cached_attn(self, h: Tensor | HeadInputs, cache: KVCache, b: int, valid: Tensor | None) -> Tensor:
        """Attention of routed tokens h [b, k, d] (or their per-head inputs) against each row's own routed-token
        cache: [b, k, d_model]."""
        st = _routed_cache(cache, self.layer, b, self._window)
        if b == 1:  # no padding with one row
            return self.attn(h, st.row(0))
        first = h.q if isinstance(h, HeadInputs) else h
        k = first.shape[1]
        counts = [k] * b if valid is None else valid.sum(1).tolist()
        parts = []
        for row, c in enumerate(counts):
            out = first.new_zeros(1, k, self.cfg.d_model)
            if c:
                out[:, :c] = self.attn(map_inputs(h, lambda x, r=row, c=c: x[r : r + 1, :c]), st.row(row))
            parts.append(out)
        return torch.cat(parts)

    def _advance(self, cache: KVCache | None, b: int, t: int, valid: Tensor | int | None) -> None:
        """Record the routed tokens appended to each row of this layer's cache."""
        if cache is None:
            return
        st = _routed_cache(cache, self.layer, b, self._window)
        if valid is not None:
            counts = [valid] * b if isinstance(valid, int) else valid.sum(1).tolist()
            st.lengths = [n + c for n, c in zip(st.lengths, counts, strict=True)]
        st.seen = cache.length + t

    def metrics(self) -> dict[str, float]:
        """Routing agreement of the last training batch (see the module docstring); {} before training."""
        if self._stats is None:
            return {}
        agree, pred, bce = self._stats.tolist()
        key = f"mod/l{self.layer}"
        return {f"{key}/agreement": agree, f"{key}/predicted": pred, f"{key}/bce": bce}


def mod_blocks(model: nn.Module) -> list[MoDBlock]:
    """The routed blocks of a model."""
    return [m for m in model.modules() if isinstance(m, MoDBlock)]


def set_routing(model: nn.Module, mode: str) -> dict[int, str]:
    """Set every routed block's routing rule ("auto", "topk" or "predictor"); returns the previous ones."""
    if mode not in ROUTING_MODES:
        raise ModelError(f"routing must be one of {ROUTING_MODES}, got {mode!r}")
    before = {}
    for blk in mod_blocks(model):
        before[blk.layer] = blk.routing
        blk.routing = mode
    return before


@contextlib.contextmanager
def routing(model: nn.Module, mode: str) -> Iterator[None]:
    """Context manager: run the model's routed blocks with `mode`, then restore their rules."""
    before = set_routing(model, mode)
    try:
        yield
    finally:
        for blk in mod_blocks(model):
            blk.routing = before[blk.layer]


@torch.no_grad()
def routing_agreement(model: nn.Module, tokens: Tensor) -> dict[str, float]:
    """How often causal (generation-time) routing agrees with training-time top-k routing.

    Runs the model once in eval mode with top-k routing (the training-time computation) and compares, in
    each routed block, the predictor's decision `r > 0` with top-k membership of the same scores.

    Args:
        model: a model with `mod=True`.
        tokens: [batch, pos] token ids.

    Returns:
        {"mod/l{i}/agreement": fraction of tokens where both decide alike, "mod/l{i}/recall": fraction of
        top-k tokens the predictor routes, ..., "mod/agreement": mean agreement over routed layers}.
    """
    blocks = mod_blocks(model)
    if not blocks:
        raise ModelError("the model has no Mixture-of-Depths blocks (build it with mod=True)")
    out: dict[str, float] = {}
    seen: dict[int, Tensor] = {}

    def grab(scores: Tensor, hook: HookPoint) -> None:
        seen[int(hook.name.split(".")[1])] = scores.detach()

    with eval_mode(model), routing(model, "topk"):
        model.run_with_hooks(
            tokens,
            return_type=None,
            fwd_hooks=[(f"blocks.{blk.layer}.hook_router_scores", grab) for blk in blocks],
        )
    for blk in blocks:
        r = seen[blk.layer]
        top_i = r.topk(capacity_k(blk.capacity, r.shape[1]), dim=-1).indices
        topk_mask = torch.zeros_like(r, dtype=torch.bool).scatter_(1, top_i, True)
        pred = r > 0
        out[f"mod/l{blk.layer}/agreement"] = (pred == topk_mask).float().mean().item()
        out[f"mod/l{blk.layer}/recall"] = pred[topk_mask].float().mean().item()
    out["mod/agreement"] = sum(out[f"mod/l{b.layer}/agreement"] for b in blocks) / len(blocks)
    return out
