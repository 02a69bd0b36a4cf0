"""The hookable GPT: a GPT-2 style decoder that is a TransformerLens `HookedRootModule`.

Every TransformerLens-canonical hook point exists with TransformerLens' shape (see `docs/hooks.md`):

    hook_embed, hook_pos_embed                       [batch, pos, d_model]
    blocks.{i}.hook_resid_pre / _mid / _post         [batch, pos, d_model]
    blocks.{i}.hook_attn_out, blocks.{i}.hook_mlp_out [batch, pos, d_model]
    blocks.{i}.ln1/ln2.hook_scale                    [batch, pos, 1]
    blocks.{i}.ln1/ln2.hook_normalized               [batch, pos, d_model]
    blocks.{i}.attn.hook_q / _k / _v / _z            [batch, pos, n_heads, d_head]
    blocks.{i}.attn.hook_attn_scores / _pattern      [batch, n_heads, dest_pos, src_pos]
    blocks.{i}.mlp.hook_pre / _post                  [batch, pos, d_mlp]
    ln_final.hook_scale / hook_normalized            [batch, pos, 1] / [batch, pos, d_model]

Hook points are identity modules. Attention runs through `scaled_dot_product_attention` unless something
observes `hook_attn_scores` or `hook_pattern`, in which case the eager path materialises the pattern;
LayerNorm likewise uses the fused kernel unless `hook_scale` is observed.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from transformer_lens import ActivationCache, HookedRootModule
from transformer_lens.hook_points import HookPoint

from tinygpt.arch import backends
from tinygpt.config import GPTConfig

if TYPE_CHECKING:
    from tinygpt.tokenizer import Tokenizer


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


class KVCache:
    """Pre-allocated keys and values for incremental decoding.

    `k[layer]`, `v[layer]`: [batch, n_heads, max_len, d_head]; `length` tokens are filled.
    """

    def __init__(self, cfg: GPTConfig, batch: int, max_len: int, device, dtype: torch.dtype):
        shape = (cfg.n_layers, batch, cfg.n_heads, max_len, cfg.d_head)
        self.k = torch.empty(shape, device=device, dtype=dtype)
        self.v = torch.empty(shape, device=device, dtype=dtype)
        self.length = 0
        self.max_len = max_len

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Append k, v [batch, n_heads, t, d_head]; return all keys and values so far."""
        s, t = self.length, k.shape[2]
        self.k[layer, :, :, s : s + t] = k
        self.v[layer, :, :, s : s + t] = v
        return self.k[layer, :, :, : s + t], self.v[layer, :, :, : s + t]


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


class Attention(nn.Module):
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

    def forward(self, x: Tensor, cache: KVCache | None = None) -> Tensor:
        """x: [batch, pos, d_model] -> [batch, pos, d_model]."""
        cfg = self.cfg
        b, t, _ = x.shape
        q = self.hook_q(self.q_proj(x).view(b, t, cfg.n_heads, cfg.d_head)).transpose(1, 2)
        k = self.hook_k(self.k_proj(x).view(b, t, cfg.n_heads, cfg.d_head)).transpose(1, 2)
        v = self.hook_v(self.v_proj(x).view(b, t, cfg.n_heads, cfg.d_head)).transpose(1, 2)
        past = 0
        if cache is not None:
            past = cache.length
            k, v = cache.update(self.layer, k, v)
        p_drop = cfg.dropout if self.training else 0.0
        if backends.use_eager(cfg.attn_impl, self.needs_eager(), x.device):
            # One fused kernel: scores = causal bias (-inf above the diagonal) + q·kᵀ/√d_head  [b, H, t, past + t]
            n = past + t
            bias = torch.full((t, n), float("-inf"), device=x.device, dtype=q.dtype).triu_(past + 1)
            scores = torch.baddbmm(
                bias, q.reshape(b * cfg.n_heads, t, -1), k.reshape(b * cfg.n_heads, n, -1).transpose(1, 2),
                alpha=1 / math.sqrt(cfg.d_head),
            ).view(b, cfg.n_heads, t, n)  # fmt: skip
            scores = self.hook_attn_scores(scores)
            # Softmax in at least fp32 (bf16 is upcast; float64 stays float64 for gradcheck/double runs).
            pattern = self.hook_pattern(
                scores.softmax(-1, dtype=torch.promote_types(q.dtype, torch.float32)).to(q.dtype)
            )
            z = F.dropout(pattern, p_drop) @ v if p_drop else pattern @ v
        else:  # fused: SDPA or our Triton kernel (tinygpt.arch.backends)
            z = backends.attend(q, k, v, past, p_drop, cfg.attn_impl)
        z = self.hook_z(z.transpose(1, 2))  # [b, t, H, d_head]
        out = self.o_proj(z.reshape(b, t, cfg.n_heads * cfg.d_head))
        return F.dropout(out, p_drop) if p_drop else out

    # TransformerLens-style per-head views of the projection weights.
    @property
    def W_Q(self) -> Tensor:  # [H, d_model, d_head]
        return self.q_proj.weight.view(self.cfg.n_heads, self.cfg.d_head, -1).transpose(1, 2)

    @property
    def W_K(self) -> Tensor:
        return self.k_proj.weight.view(self.cfg.n_heads, self.cfg.d_head, -1).transpose(1, 2)

    @property
    def W_V(self) -> Tensor:
        return self.v_proj.weight.view(self.cfg.n_heads, self.cfg.d_head, -1).transpose(1, 2)

    @property
    def W_O(self) -> Tensor:  # [H, d_head, d_model]
        return self.o_proj.weight.T.view(self.cfg.n_heads, self.cfg.d_head, -1)

    b_Q = property(lambda self: self.q_proj.bias.view(self.cfg.n_heads, self.cfg.d_head))
    b_K = property(lambda self: self.k_proj.bias.view(self.cfg.n_heads, self.cfg.d_head))
    b_V = property(lambda self: self.v_proj.bias.view(self.cfg.n_heads, self.cfg.d_head))
    b_O = property(lambda self: self.o_proj.bias)


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

    The attention and feed-forward modules come from `tinygpt.arch` (plain `Attention`/`MLP`, or a
    variant such as differential attention or mixture-of-experts, which is then named `moe`).
    """

    hook_out_is_single_residual_stream = True

    def __init__(self, cfg: GPTConfig, layer: int):
        super().__init__()
        from tinygpt import arch

        self.ln1 = LayerNorm(cfg.d_model, cfg.layer_norm_eps)
        self.attn = arch.attention_class(cfg)(cfg, layer)
        self.ln2 = LayerNorm(cfg.d_model, cfg.layer_norm_eps)
        self._ffn_name, ffn = arch.make_ffn(cfg, layer)
        setattr(self, self._ffn_name, ffn)
        for name in ("resid_pre", "attn_out", "resid_mid", "mlp_out", "resid_post"):
            setattr(self, f"hook_{name}", HookPoint())

    def forward(self, x: Tensor, cache: KVCache | None = None) -> Tensor:
        resid_pre = self.hook_resid_pre(x)
        attn_out = self.hook_attn_out(self.attn(self.ln1(resid_pre), cache))
        resid_mid = self.hook_resid_mid(resid_pre + attn_out)
        mlp_out = self.hook_mlp_out(getattr(self, self._ffn_name)(self.ln2(resid_mid)))
        return self.hook_resid_post(resid_mid + mlp_out)


class GPT(HookedRootModule):
    """A GPT-2 style decoder with TransformerLens hook points at every canonical name.

    Args:
        cfg: the model's `GPTConfig` (or a preset name such as "tiny").
        tokenizer: attached tokenizer; defaults to `ByteTokenizer` when `d_vocab == 256`.
    """

    def __new__(cls, cfg: GPTConfig | str | None = None, *args: Any, **kwargs: Any):
        # `GPT(cfg)` builds the variant a config asks for when it needs its own model class (e.g. YOCO).
        if cls is GPT and cfg is not None:
            from tinygpt import arch

            cls = arch.model_class(GPTConfig.preset(cfg) if isinstance(cfg, str) else cfg)
        return super().__new__(cls)

    def __init__(self, cfg: GPTConfig | str, tokenizer: Tokenizer | None = None):
        super().__init__()
        from tinygpt import arch

        cfg = GPTConfig.preset(cfg) if isinstance(cfg, str) else cfg.replace()
        self.cfg = cfg
        if tokenizer is None and cfg.d_vocab == 256:
            from tinygpt.tokenizer import ByteTokenizer

            tokenizer = ByteTokenizer()
        self.tokenizer = tokenizer
        self.embed = nn.Embedding(cfg.d_vocab, cfg.d_model)
        self.pos_embed = nn.Embedding(cfg.n_ctx, cfg.d_model)
        self.hook_embed = HookPoint()
        self.hook_pos_embed = HookPoint()
        self.blocks = nn.ModuleList(arch.make_block(cfg, i) for i in range(cfg.n_layers))
        self.ln_final = LayerNorm(cfg.d_model, cfg.layer_norm_eps)
        self.unembed = nn.Linear(cfg.d_model, cfg.d_vocab, bias=False)
        if cfg.tie_embeddings:
            self.unembed.weight = self.embed.weight
        self.register_buffer("_zero_b_U", torch.zeros(cfg.d_vocab), persistent=False)
        self.train_state: dict[str, Any] = {}
        self.build_extra()
        self.reset_parameters()
        if cfg.dtype == "bfloat16":
            self.to(torch.bfloat16)
        self.setup()
        self._aux_modules = [m for m in self.modules() if m is not self and hasattr(m, "aux_loss")]

    def build_extra(self) -> None:
        """Model-level modules of an architecture variant (overridden by e.g. YOCO)."""

    def reset_parameters(self) -> None:
        """GPT-2 initialisation: N(0, init_std), residual projections scaled by 1/sqrt(2L)."""
        std = self.cfg.init_std
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif ".ln" in name or name.startswith("ln_final"):
                nn.init.ones_(p)
            elif name.endswith(("o_proj.weight", "fc_out.weight")):
                nn.init.normal_(p, 0.0, std / math.sqrt(2 * self.cfg.n_layers))
            else:
                nn.init.normal_(p, 0.0, std)
        for m in self.modules():  # variants with parameters of their own (routers, λ, ...)
            if m is not self and hasattr(m, "reset_variant_parameters"):
                m.reset_variant_parameters()

    def _apply(self, fn, *args, **kwargs):
        out = super()._apply(fn, *args, **kwargs)
        self.cfg.device = str(self.embed.weight.device)
        return out

    # ------------------------------------------------------------------------------------------
    def forward(
        self,
        input: Tensor | str | list[str],
        return_type: str | None = "logits",
        *,
        targets: Tensor | None = None,
        past_kv_cache: KVCache | None = None,
        loss_per_token: bool = False,
    ) -> Any:
        """Run the model.

        Args:
            input: tokens [batch, pos] (or [pos]), or text, which is tokenized.
            return_type: "logits" [batch, pos, d_vocab], "loss" (scalar, or [batch, pos] with
                `loss_per_token`), "both" (logits, loss) or None.
            targets: [batch, pos] next-token targets (-100 is ignored); without them the loss
                predicts `input[:, 1:]` from `input[:, :-1]`, as in TransformerLens.
            past_kv_cache: a `KVCache` to read from and append to (incremental decoding).
        """
        tokens = self.to_tokens(input) if isinstance(input, (str, list)) else input
        if tokens.ndim == 1:
            tokens = tokens[None]
        b, t = tokens.shape
        start = past_kv_cache.length if past_kv_cache is not None else 0
        if start + t > self.cfg.n_ctx:
            raise ValueError(
                f"sequence of {start + t} tokens exceeds the model's context n_ctx={self.cfg.n_ctx}; "
                "truncate the input (generate() does this for you)"
            )
        pos = torch.arange(start, start + t, device=tokens.device)
        x = self.hook_embed(self.embed(tokens)) + self.hook_pos_embed(self.pos_embed(pos)[None].expand(b, t, -1))
        if self.cfg.dropout and self.training:
            x = F.dropout(x, self.cfg.dropout)
        x = self.run_blocks(x, past_kv_cache)
        if past_kv_cache is not None:
            past_kv_cache.length += t
        if return_type is None:
            return None
        logits = self.unembed(self.ln_final(x))
        if return_type == "logits":
            return logits
        if return_type not in ("loss", "both"):
            raise ValueError(f"return_type must be 'logits', 'loss', 'both' or None, got {return_type!r}")
        loss = self.loss_fn(logits, tokens, targets, per_token=loss_per_token)
        if self.training and self._aux_modules and not loss_per_token:
            loss = loss + self.aux_loss()
        return loss if return_type == "loss" else (logits, loss)

    def run_blocks(self, x: Tensor, cache: KVCache | None) -> Tensor:
        """The residual stream through every block: [batch, pos, d_model] -> [batch, pos, d_model]."""
        for block in self.blocks:
            x = block(x, cache)
        return x

    def aux_loss(self) -> Tensor:
        """Sum of the auxiliary losses (router balance, z-loss, ...) from the last forward; 0 if none."""
        parts = [m.aux_loss for m in self._aux_modules if m.aux_loss is not None]
        return torch.stack(parts).sum() if parts else torch.zeros((), device=self.embed.weight.device)

    def arch_metrics(self) -> dict[str, float]:
        """Training metrics of architecture variants (expert load entropy, routing agreement, ...)."""
        out: dict[str, float] = {}
        for m in self.modules():
            if m is not self and hasattr(m, "metrics") and callable(m.metrics):
                out.update(m.metrics())
        return out

    def make_cache(self, batch: int, max_len: int | None = None) -> KVCache:
        """A KV cache for incremental decoding (variants return their own kind)."""
        w = self.embed.weight
        return KVCache(self.cfg, batch, max_len or self.cfg.n_ctx, w.device, w.dtype)

    @staticmethod
    def loss_fn(logits: Tensor, tokens: Tensor, targets: Tensor | None = None, per_token: bool = False) -> Tensor:
        """Cross-entropy in fp32; next-token shift when `targets` is None."""
        if targets is None:
            logits, targets = logits[:, :-1], tokens[:, 1:]
        loss = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(),
            targets.reshape(-1),
            ignore_index=-100,
            reduction="none" if per_token else "mean",
        )
        return loss.view(targets.shape) if per_token else loss

    def run_with_cache(self, *args: Any, return_cache_object: bool = True, **kwargs: Any):
        """Like TransformerLens: returns (output, ActivationCache). Accepts `names_filter`,
        `device` (e.g. "cpu" to offload), `pos_slice` and `remove_batch_dim`."""
        out, cache = super().run_with_cache(*args, **kwargs)
        if return_cache_object:
            cache = ActivationCache(cache, self, has_batch_dim=not kwargs.get("remove_batch_dim", False))
        return out, cache

    # ---------------------------------------------------------------- tokenizer conveniences
    def _require_tokenizer(self) -> Tokenizer:
        if self.tokenizer is None:
            raise ValueError(
                "this model has no tokenizer attached; set model.tokenizer "
                "(e.g. tinygpt.load_tokenizer(path)) or pass token ids"
            )
        return self.tokenizer

    def to_tokens(self, input: str | list[str], prepend_bos: bool = False, truncate: bool = True) -> Tensor:
        """Text (or a list of texts, right-padded with 0) -> tokens [batch, pos] on the model's device."""
        tok = self._require_tokenizer()
        texts = [input] if isinstance(input, str) else list(input)
        ids = [tok.encode(s) for s in texts]
        if prepend_bos:
            if tok.bos_id is None:
                raise ValueError("prepend_bos=True but this tokenizer has no BOS token")
            ids = [[tok.bos_id, *x] for x in ids]
        if truncate:
            ids = [x[: self.cfg.n_ctx] for x in ids]
        width = max(len(x) for x in ids)
        out = torch.zeros(len(ids), width, dtype=torch.long)
        for i, x in enumerate(ids):
            out[i, : len(x)] = torch.tensor(x, dtype=torch.long)
        return out.to(self.cfg.device)

    def to_string(self, tokens: Tensor | list[int]) -> str | list[str]:
        tok = self._require_tokenizer()
        if isinstance(tokens, Tensor) and tokens.ndim == 2:
            return [tok.decode(row.tolist()) for row in tokens]
        return tok.decode(tokens.tolist() if isinstance(tokens, Tensor) else list(tokens))

    def to_str_tokens(self, input: str | Tensor | list[int], prepend_bos: bool = False) -> list[str]:
        tok = self._require_tokenizer()
        if isinstance(input, str):
            ids = self.to_tokens(input, prepend_bos=prepend_bos)[0].tolist()
        else:
            ids = input.flatten().tolist() if isinstance(input, Tensor) else list(input)
        return [tok.token_str(i) for i in ids]

    def to_single_token(self, string: str) -> int:
        ids = self._require_tokenizer().encode(string)
        if len(ids) != 1:
            raise ValueError(f"{string!r} is {len(ids)} tokens, not one: {ids}")
        return ids[0]

    def tokens_to_residual_directions(self, tokens: str | int | Tensor) -> Tensor:
        """Unembedding direction(s) of tokens: [..., d_model]."""
        if isinstance(tokens, str):
            tokens = self.to_single_token(tokens)
        if isinstance(tokens, int):
            return self.W_U[:, tokens]
        return self.W_U[:, tokens].movedim(0, -1)

    # ---------------------------------------------------------------- TransformerLens weights
    W_E = property(lambda self: self.embed.weight)  # [d_vocab, d_model]
    W_pos = property(lambda self: self.pos_embed.weight)  # [n_ctx, d_model]
    W_U = property(lambda self: self.unembed.weight.T)  # [d_model, d_vocab]
    b_U = property(lambda self: self._zero_b_U)  # [d_vocab]

    def _stack(self, attr: str, part: str = "attn") -> Tensor:
        return torch.stack([getattr(getattr(b, part), attr) for b in self.blocks])

    W_Q = property(lambda self: self._stack("W_Q"))  # [n_layers, H, d_model, d_head]
    W_K = property(lambda self: self._stack("W_K"))
    W_V = property(lambda self: self._stack("W_V"))
    W_O = property(lambda self: self._stack("W_O"))  # [n_layers, H, d_head, d_model]
    b_Q = property(lambda self: self._stack("b_Q"))
    b_K = property(lambda self: self._stack("b_K"))
    b_V = property(lambda self: self._stack("b_V"))
    b_O = property(lambda self: self._stack("b_O"))
    W_in = property(lambda self: self._stack("W_in", "mlp"))
    W_out = property(lambda self: self._stack("W_out", "mlp"))
    b_in = property(lambda self: self._stack("b_in", "mlp"))
    b_out = property(lambda self: self._stack("b_out", "mlp"))

    # ---------------------------------------------------------------- conveniences
    def n_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def generate(self, prompt: Any = "\n", max_new_tokens: int = 100, **kwargs: Any):
        """See `tinygpt.generate`."""
        from tinygpt.sampling import generate

        return generate(self, prompt, max_new_tokens=max_new_tokens, **kwargs)

    def save(self, path, **kwargs: Any):
        """Write a `.tinygpt` file (see `tinygpt.save`)."""
        from tinygpt.checkpoint import save

        return save(self, path, **kwargs)
