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
from tinygpt.arch.backends import observed
from tinygpt.arch.gated_mlp import activation
from tinygpt.arch.norms import RMSNorm
from tinygpt.arch.rotary import Rotary
from tinygpt.config import GPTConfig
from tinygpt.errors import TinyGPTValueError
from tinygpt.model.heads import HeadInputs, SwitchError, head_results, project_heads, repeat_heads

if TYPE_CHECKING:
    from tinygpt.model.cache import KVCache

__all__ = ["MLP", "Attention", "Block", "LayerNorm", "ModelError", "check_switch", "make_norm", "observed"]


class ModelError(TinyGPTValueError):
    """A bad input to the model: too long for its context, no tokenizer for text, not a single token, ..."""


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


NORMS = {"LN": LayerNorm, "RMS": RMSNorm}


def make_norm(cfg: GPTConfig) -> nn.Module:
    """The model's norm over d_model (`cfg.normalization_type`: LayerNorm or RMSNorm, eps = layer_norm_eps)."""
    return NORMS[cfg.normalization_type](cfg.d_model, cfg.layer_norm_eps)


def _n_kv(self) -> int:
    return getattr(self, "n_kv", self.cfg.n_heads)


def _heads(self, proj: nn.Linear, n: int | None = None) -> Tensor:
    """proj.weight [n * d_head, d_model] as per-head [n, d_model, d_head] (n: default n_heads)."""
    return proj.weight.view(n or self.cfg.n_heads, self.cfg.d_head, -1).transpose(1, 2)


def _head_bias(self, proj: nn.Linear, n: int | None = None) -> Tensor:
    """proj.bias as [n, d_head] (zeros for a projection without bias, as TransformerLens has them)."""
    n = n or self.cfg.n_heads
    if proj.bias is None:
        return torch.zeros(n, self.cfg.d_head, device=proj.weight.device, dtype=proj.weight.dtype)
    return proj.bias.view(n, self.cfg.d_head)


def _per_query_head(self, x: Tensor) -> Tensor:
    """Key/value-head tensors [n_kv, ...] repeated to the query heads [n_heads, ...] (a copy under GQA)."""
    g = self.cfg.n_heads // _n_kv(self)
    return x if g == 1 else x.repeat_interleave(g, 0)


class HeadViews:
    """TransformerLens-style per-head views of `q_proj/k_proj/v_proj/o_proj` (mixed into attention modules;
    a module with only some of the projections may copy single views, e.g. `W_K = HeadViews.W_K`).

    Under grouped-query attention `W_K`, `W_V`, `b_K`, `b_V` are per query head, as in TransformerLens (each
    key/value head repeated for its group: copies), and `_W_K`, `_W_V`, `_b_K`, `_b_V` the key/value heads'
    own views [n_key_value_heads, ...]. Biases of a projection without one read as zeros."""

    W_Q = property(lambda self: _heads(self, self.q_proj))  # [H, d_model, d_head]
    _W_K = property(lambda self: _heads(self, self.k_proj, _n_kv(self)))  # [n_kv, d_model, d_head]
    _W_V = property(lambda self: _heads(self, self.v_proj, _n_kv(self)))
    W_K = property(lambda self: _per_query_head(self, self._W_K))  # [H, d_model, d_head]
    W_V = property(lambda self: _per_query_head(self, self._W_V))
    W_O = property(lambda self: self.o_proj.weight.T.view(self.cfg.n_heads, self.cfg.d_head, -1))  # [H, d_head, d]
    b_Q = property(lambda self: _head_bias(self, self.q_proj))  # [H, d_head]
    _b_K = property(lambda self: _head_bias(self, self.k_proj, _n_kv(self)))  # [n_kv, d_head]
    _b_V = property(lambda self: _head_bias(self, self.v_proj, _n_kv(self)))
    b_K = property(lambda self: _per_query_head(self, self._b_K))
    b_V = property(lambda self: _per_query_head(self, self._b_V))
    b_O = property(lambda self: _bias_or_zeros(self.o_proj))  # [d_model]


def split_heads(cfg: GPTConfig, hook: HookPoint, x: Tensor) -> Tensor:
    """A projection's output [batch, pos, n_heads * d_head] through `hook` as [batch, pos, n_heads, d_head],
    returned as [batch, n_heads, pos, d_head]."""
    b, t, _ = x.shape
    return hook(x.view(b, t, cfg.n_heads, cfg.d_head)).transpose(1, 2)


def proj_heads(cfg: GPTConfig, hook: HookPoint, proj: nn.Module, x: Tensor, n: int | None = None) -> Tensor:
    """`proj` of x (an input [batch, pos, d_model], or per-head inputs [batch, pos, n, d_model]) to `n` heads
    (default n_heads), through `hook` as [batch, pos, n, d_head]; returned as [batch, n, pos, d_head]."""
    return hook(project_heads(proj, x, n or cfg.n_heads, cfg.d_head)).transpose(1, 2)


def attn_output(attn: nn.Module, z: Tensor) -> Tensor:
    """The output projection of z [batch, pos, n_heads, d_head] (after `hook_z`) -> [batch, pos, d_model]; with
    `cfg.use_attn_result`, through each head's `attn.hook_result` [batch, pos, n_heads, d_model] and their sum."""
    b, t, n, dh = z.shape
    if not attn.cfg.use_attn_result:
        return attn.o_proj(z.reshape(b, t, n * dh))
    result, bias = head_results(attn.o_proj, z)
    out = attn.hook_result(result).sum(2)
    return out if bias is None else out + bias


def make_rotary(cfg: GPTConfig) -> Rotary | None:
    """The rotary position embedding of an attention module (`tinygpt.arch.rotary`), or None without rotary."""
    return Rotary(cfg) if cfg.positional_embedding_type == "rotary" else None


class Attention(HeadViews, nn.Module):
    """Causal multi-head attention with separate q/k/v/o `nn.Linear` projections.

    With `cfg.n_key_value_heads` < n_heads it is grouped-query attention: `k_proj` / `v_proj` project to the
    key/value heads only (`hook_k` / `hook_v` are [batch, pos, n_key_value_heads, d_head], caches hold only
    those heads) and each serves `n_heads / n_key_value_heads` query heads. With rotary position embeddings
    (`cfg.positional_embedding_type == "rotary"`) queries and keys are rotated by their positions after
    `hook_q` / `hook_k`, through `hook_rot_q` [batch, pos, n_heads, d_head] and `hook_rot_k` [batch, src_pos,
    n_key_value_heads, d_head]: caches keep the keys unrotated (as TransformerLens does), so with a cache
    `hook_rot_k` holds every key so far. Biases follow `cfg.qkv_has_bias` (q/k/v) and `cfg.bias` (o).
    """

    def __init__(self, cfg: GPTConfig, layer: int):
        super().__init__()
        self.cfg, self.layer = cfg, layer
        self.n_kv = cfg.n_kv_heads
        hd, kvd = cfg.n_heads * cfg.d_head, self.n_kv * cfg.d_head
        self.q_proj = nn.Linear(cfg.d_model, hd, bias=cfg.qkv_has_bias)
        self.k_proj = nn.Linear(cfg.d_model, kvd, bias=cfg.qkv_has_bias)
        self.v_proj = nn.Linear(cfg.d_model, kvd, bias=cfg.qkv_has_bias)
        self.o_proj = nn.Linear(hd, cfg.d_model, bias=cfg.bias)
        for name in ("q", "k", "v", "z", "attn_scores", "pattern", "result"):
            setattr(self, f"hook_{name}", HookPoint())
        self.rotary = make_rotary(cfg)
        if self.rotary is not None:
            self.hook_rot_q = HookPoint()
            self.hook_rot_k = HookPoint()

    def unsupported_switch(self, name: str) -> str | None:
        if name == "use_attn_in" and self.n_kv != self.cfg.n_heads:
            return (
                f"grouped-query attention (n_key_value_heads={self.n_kv} < n_heads={self.cfg.n_heads}): "
                "hook_attn_in has one input per query head, but each key/value head serves several query heads; "
                "use set_use_split_qkv_input (hook_k_input / hook_v_input are per key/value head), as in "
                "TransformerLens"
            )
        return None

    def rotate(self, q: Tensor, k: Tensor, past: int) -> tuple[Tensor, Tensor]:
        """Rotary position embedding of the queries q [batch, n_heads, t, d_head] (at positions past ..) and of
        every key k [batch, n_kv, n, d_head] (at positions 0 ..), through `hook_rot_q` / `hook_rot_k`."""
        q = self.hook_rot_q(self.rotary(q.transpose(1, 2), past)).transpose(1, 2)
        k = self.hook_rot_k(self.rotary(k.transpose(1, 2), 0)).transpose(1, 2)
        return q, k

    def needs_eager(self) -> bool:
        return observed(self.hook_attn_scores) or observed(self.hook_pattern)

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
        k = proj_heads(cfg, self.hook_k, self.k_proj, xk, self.n_kv)
        return q, k, proj_heads(cfg, self.hook_v, self.v_proj, xv, self.n_kv)

    def attend(
        self, q: Tensor, k: Tensor, v: Tensor, past: int, *, window: int | None = None, q_pos: Tensor | None = None
    ) -> Tensor:
        """Causal attention of `t` new queries over `past + t` keys (the queries' own positions last).

        Args:
            q: [batch, n_heads, t, d_head]; k, v: [batch, n_kv, past + t, d_head] (n_kv: key/value heads),
                unrotated: rotary (if any) is applied here, keys at positions 0 .. past + t - 1.
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
        if self.rotary is not None:
            q, k = self.rotate(q, k, past)
        if backends.use_eager(cfg.attn_impl, self.needs_eager(), q.device):
            if k.shape[1] != h:  # grouped-query attention: each key/value head serves a group of query heads
                k, v = k.repeat_interleave(h // k.shape[1], 1), v.repeat_interleave(h // v.shape[1], 1)
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
        """z [batch, pos, n_heads, d_head] through `hook_z` and `o_proj` (and `hook_result`, when switched on)
        -> [batch, pos, d_model]."""
        out = attn_output(self, self.hook_z(z))
        p_drop = self.cfg.dropout if self.training else 0.0
        return F.dropout(out, p_drop) if p_drop else out

    def forward(self, x: Tensor | HeadInputs, cache: KVCache | None = None) -> Tensor:
        """x: [batch, pos, d_model] (or per-head `HeadInputs`) -> [batch, pos, d_model]; `cache` holds the
        earlier positions' keys."""
        if cache is None:
            q, k, v = self.project(x)
            return self.out(self.attend(q, k, v, 0))
        q, k, v = cache.project(self, x)
        return self.out(cache.attend(self, q, k, v))


class MLP(nn.Module):
    """`fc_in` -> hook_pre -> activation (`cfg.act_fn`, GELU by default) -> hook_post -> `fc_out`; biases when
    `cfg.bias` (`b_in` / `b_out` read as zeros without)."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.fc_in = nn.Linear(cfg.d_model, cfg.d_mlp, bias=cfg.bias)
        self.fc_out = nn.Linear(cfg.d_mlp, cfg.d_model, bias=cfg.bias)
        activation(cfg.act_fn)  # a known name (ConfigError otherwise); looked up per call, so the module pickles
        self.act_fn = cfg.act_fn
        self.p_drop = cfg.dropout
        self.hook_pre = HookPoint()
        self.hook_post = HookPoint()

    def forward(self, x: Tensor) -> Tensor:
        h = self.hook_post(activation(self.act_fn)(self.hook_pre(self.fc_in(x))))
        out = self.fc_out(h)
        return F.dropout(out, self.p_drop, self.training) if self.p_drop else out

    W_in = property(lambda self: self.fc_in.weight.T)  # [d_model, d_mlp]
    b_in = property(lambda self: _bias_or_zeros(self.fc_in))
    W_out = property(lambda self: self.fc_out.weight.T)  # [d_mlp, d_model]
    b_out = property(lambda self: _bias_or_zeros(self.fc_out))


def _bias_or_zeros(lin: nn.Linear) -> Tensor:
    return lin.bias if lin.bias is not None else lin.weight.new_zeros(lin.weight.shape[0])


class Block(nn.Module):
    """Pre-LayerNorm block; the residual stream is additive and exact.

    Args:
        cfg: the model config.
        layer: the block's index.
        attn: its attention module (default the plain `Attention`); `tinygpt.arch.make_block` passes the
            variant a config asks for (e.g. differential attention).
        ffn: (attribute name, module) of its feed-forward part (default `("mlp", MLP(cfg))`; e.g.
            `("moe", MoE(...))` for mixture-of-experts).

    The hook switches of `tinygpt.model.heads` (`cfg.use_split_qkv_input`, `use_attn_in`, `use_hook_mlp_in`)
    act here: `attn_input` gives the attention its per-head inputs, `mlp_input` the feed-forward its hooked
    copy; with the switches off both are the plain `ln1(resid_pre)` / `resid_mid`.
    """

    hook_out_is_single_residual_stream = True
    splits_last = True  # position-wise but for attention: run_from(last_only=True) may run the last position alone

    def __init__(
        self, cfg: GPTConfig, layer: int, attn: nn.Module | None = None, ffn: tuple[str, nn.Module] | None = None
    ):
        super().__init__()
        self.cfg, self.layer = cfg, layer
        self.ln1 = make_norm(cfg)
        self.attn = Attention(cfg, layer) if attn is None else attn
        self.ln2 = make_norm(cfg)
        self._ffn_name, ffn_module = ("mlp", MLP(cfg)) if ffn is None else ffn
        setattr(self, self._ffn_name, ffn_module)
        names = ("resid_pre", "attn_in", "q_input", "k_input", "v_input", "attn_out", "resid_mid", "mlp_in")
        for name in (*names, "mlp_out", "resid_post"):
            setattr(self, f"hook_{name}", HookPoint())

    @property
    def ffn(self) -> nn.Module:
        """The feed-forward module (`mlp`, or `moe` for mixture-of-experts)."""
        return getattr(self, self._ffn_name)

    def forward(self, x: Tensor, cache: KVCache | None = None) -> Tensor:
        """x = resid_pre [batch, pos, d_model] -> resid_post [batch, pos, d_model]."""
        resid_pre = self.hook_resid_pre(x)
        attn_out = self.hook_attn_out(self.attn(self.attn_input(resid_pre), cache))
        return self.finish(self.hook_resid_mid(resid_pre + attn_out))

    def finish(self, resid_mid: Tensor) -> Tensor:
        """The feed-forward half: resid_mid [batch, pos, d_model] -> resid_post (position-wise)."""
        mlp_out = self.hook_mlp_out(self.ffn(self.ln2(self.mlp_input(resid_mid))))
        return self.hook_resid_post(resid_mid + mlp_out)

    def finish_from(self, resid_pre: Tensor, attn_out: Tensor) -> Tensor:
        """resid_post from the block's input and an attention output (e.g. a patched `hook_attn_out`), for any
        block kind: here `finish(resid_pre + attn_out)` (through `hook_resid_mid`)."""
        return self.finish(self.hook_resid_mid(resid_pre + attn_out))

    def attn_input(self, resid_pre: Tensor) -> Tensor | HeadInputs:
        """What the attention reads: `ln1(resid_pre)` [batch, pos, d_model], or with a per-head switch on, the
        `HeadInputs` of `split_input` through `ln1` (applied per head)."""
        cfg = self.cfg
        if not (cfg.use_split_qkv_input or cfg.use_attn_in):
            return self.ln1(resid_pre)
        return self.split_input(resid_pre).map(self.ln1)

    def split_input(self, resid_pre: Tensor) -> HeadInputs:
        """The per-head attention inputs before ln1 (`cfg.use_attn_in` / `use_split_qkv_input`), each through its
        hook: `hook_attn_in` [batch, pos, n_heads, d_model]; `hook_q_input` [batch, pos, n_heads, d_model],
        `hook_k_input` / `hook_v_input` [batch, pos, n_key_value_heads, d_model]."""
        cfg = self.cfg
        n, n_kv = cfg.n_heads, getattr(self.attn, "n_kv", cfg.n_heads)
        attn_in = self.hook_attn_in(repeat_heads(resid_pre, n)) if cfg.use_attn_in else None
        if not cfg.use_split_qkv_input:
            return HeadInputs(attn_in, attn_in, attn_in)

        def copy(hook: HookPoint, heads: int) -> Tensor:
            return hook(repeat_heads(resid_pre, heads) if attn_in is None else attn_in.clone())

        return HeadInputs(copy(self.hook_q_input, n), copy(self.hook_k_input, n_kv), copy(self.hook_v_input, n_kv))

    def mlp_input(self, resid_mid: Tensor) -> Tensor:
        """The feed-forward input before ln2: resid_mid, or with `cfg.use_hook_mlp_in` a copy through
        `hook_mlp_in` [batch, pos, d_model]."""
        return self.hook_mlp_in(resid_mid.clone()) if self.cfg.use_hook_mlp_in else resid_mid

    def keys_values(self, x: Tensor, cache: KVCache | None = None) -> tuple[Tensor, Tensor]:
        """The keys and values the attention computes for resid_pre x [batch, pos, d_model] (no output):
        each [batch, n_heads, pos, d_head]."""
        h = self.attn_input(x)
        _, k, v = self.attn.project(h, queries=False) if cache is None else cache.project(self.attn, h, queries=False)
        return k, v


def check_switch(model: nn.Module, name: str) -> None:
    """Raise `SwitchError` if a module of `model` cannot express the hook switch `name` (a module says so by
    returning a reason from its `unsupported_switch(name)`)."""
    for m in model.modules():
        why = m.unsupported_switch(name) if hasattr(m, "unsupported_switch") else None
        if why:
            raise SwitchError(f"set_{name}(True) is not available on this model: {why}")
