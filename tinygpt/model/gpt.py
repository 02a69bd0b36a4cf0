"""`GPT`: a GPT-2 style decoder that is a TransformerLens `HookedRootModule`.

Every TransformerLens-canonical hook point exists with TransformerLens' shape (see `docs/hooks.md`; the
block-level ones in `tinygpt.model.layers`):

    hook_embed, hook_pos_embed                       [batch, pos, d_model]
    blocks.{i}.hook_resid_pre / _mid / _post ...     (see tinygpt.model.layers)
    ln_final.hook_scale / hook_normalized            [batch, pos, 1] / [batch, pos, d_model]

`GPT` is one class for every architecture variant: `GPTConfig` knobs choose, through the registry in
`tinygpt.arch`, each block's pieces (`arch.make_block`) and the model-level strategy (`arch.model_stack`: how the
blocks are chained, which cache decoding needs, e.g. YOCO's decoder-decoder), which `GPT` delegates to.

`generate` and `save` are conveniences registered by `tinygpt.sampling` and `tinygpt.checkpoint` when they are
imported (`import tinygpt` imports both): the model layer imports neither.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from transformer_lens import ActivationCache, HookedRootModule
from transformer_lens.hook_points import HookPoint

from tinygpt import arch
from tinygpt.config import GPTConfig, register_param_counter
from tinygpt.model.cache import KVCache
from tinygpt.model.layers import ModelError, check_switch, observed
from tinygpt.model.loss import linear_cross_entropy
from tinygpt.model.stack import STARTS
from tinygpt.tokenizer import ByteTokenizer

if TYPE_CHECKING:
    from tinygpt.tokenizer import Tokenizer

__all__ = ["GPT", "register_method"]

_METHODS: dict[str, Callable[..., Any]] = {}


def register_method(name: str, fn: Callable[..., Any]) -> None:
    """Register the function behind the `GPT.<name>` convenience (`generate` by `tinygpt.sampling`, `save` by
    `tinygpt.checkpoint`), called as `fn(model, *args, **kwargs)`."""
    _METHODS[name] = fn


def _method(name: str, home: str) -> Callable[..., Any]:
    fn = _METHODS.get(name)
    if fn is None:
        raise ModelError(f"GPT.{name} is provided by {home}; import it (`import tinygpt` does)")
    return fn


class GPT(HookedRootModule):
    """A GPT-2 style decoder with TransformerLens hook points at every canonical name.

    Args:
        cfg: the model's `GPTConfig` (or a preset name such as "tiny"); its knobs choose the architecture
            variant (`GPT(GPTConfig(yoco=True))` is a YOCO model).
        tokenizer: attached tokenizer; defaults to `ByteTokenizer` when `d_vocab == 256`.

    Attributes:
        stack: the variant's model-level strategy (`tinygpt.model.stack.Stack`, or e.g.
            `tinygpt.arch.yoco.YocoStack`), which `run_blocks`, `make_cache` and `run_from` delegate to.
    """

    def __init__(self, cfg: GPTConfig | str, tokenizer: Tokenizer | None = None):
        super().__init__()
        cfg = GPTConfig.preset(cfg) if isinstance(cfg, str) else cfg.replace()
        self.cfg = cfg
        self.stack = arch.model_stack(cfg)
        if tokenizer is None and cfg.d_vocab == 256:
            tokenizer = ByteTokenizer()
        self.tokenizer = tokenizer
        self.embed = nn.Embedding(cfg.d_vocab, cfg.d_model)
        self.hook_embed = HookPoint()
        self.pos_embed: nn.Embedding | None = None  # rotary models encode positions in attention instead
        if cfg.positional_embedding_type == "standard":
            self.pos_embed = nn.Embedding(cfg.n_ctx, cfg.d_model)
            self.hook_pos_embed = HookPoint()
        self.blocks = nn.ModuleList(arch.make_block(cfg, i) for i in range(cfg.n_layers))
        self.ln_final = arch.make_norm(cfg)
        self.unembed = nn.Linear(cfg.d_model, cfg.d_vocab, bias=False)
        if cfg.tie_embeddings:
            self.unembed.weight = self.embed.weight
        self.register_buffer("_zero_b_U", torch.zeros(cfg.d_vocab), persistent=False)
        self.train_state: dict[str, Any] = {}
        self.stack.build(self)
        self.reset_parameters()
        if cfg.dtype == "bfloat16":
            self.to(torch.bfloat16)
        self.setup()
        self._aux_modules = [m for m in self.modules() if m is not self and hasattr(m, "aux_loss")]

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
            raise ModelError(
                f"sequence of {start + t} tokens exceeds the model's context n_ctx={self.cfg.n_ctx}; "
                "truncate the input (generate() does this for you)"
            )
        x = self.hook_embed(self.embed(tokens))
        if self.pos_embed is not None:
            pos = torch.arange(start, start + t, device=tokens.device)
            x = x + self.hook_pos_embed(self.pos_embed(pos)[None].expand(b, t, -1))
        if self.cfg.dropout and self.training:
            x = F.dropout(x, self.cfg.dropout)
        x = self.run_blocks(x, past_kv_cache)
        if past_kv_cache is not None:
            past_kv_cache.length += t
        if return_type is None:
            return None
        if return_type == "loss" and self.logits_unobserved():  # nothing sees the logits: never materialise them
            loss = self.loss_from_hidden(self.ln_final(x), tokens, targets, per_token=loss_per_token)
        else:
            logits = self.unembed(self.ln_final(x))
            if return_type == "logits":
                return logits
            if return_type not in ("loss", "both"):
                raise ModelError(f"return_type must be 'logits', 'loss', 'both' or None, got {return_type!r}")
            loss = self.loss_fn(logits, tokens, targets, per_token=loss_per_token)
        if self.training and self._aux_modules and not loss_per_token:
            loss = loss + self.aux_loss()
        return loss if return_type == "loss" else (logits, loss)

    def run_blocks(self, x: Tensor, cache: KVCache | None) -> Tensor:
        """The residual stream through every block: [batch, pos, d_model] -> [batch, pos, d_model]."""
        return self.stack.run_blocks(self, x, cache)

    def run_from(
        self,
        layer: int,
        resid: Tensor,
        *,
        start_at: str = "resid_pre",
        stop_at: int | None = None,
        past_kv_cache: KVCache | None = None,
        last_only: bool = False,
    ) -> Tensor:
        """Run the model from any layer: the blocks from `layer` on, given the residual stream entering it.

        Args:
            layer: the first block (0 .. n_layers; n_layers runs no block).
            resid: `blocks.{layer}.hook_{start_at}` [batch, pos, d_model] (e.g. from `run_with_cache`, patched);
                with a `tinygpt.model.cache.PackedRows` cache, packed rows [1, N, d_model].
            start_at: "resid_pre" (from the block's input) or "resid_mid" (its feed-forward half only).
            stop_at: return the residual stream entering block `stop_at` (n_layers: the final `resid_post`)
                instead of logits.
            past_kv_cache: keys and values of the positions before `resid`'s (e.g. `PrefixKV.from_activations`
                of an earlier run); read, never advanced.
            last_only: compute the last position's output only ([batch, 1, ...]); when the final block runs, it
                computes the other positions' keys and values but not their outputs (its hooks see both calls).

        Returns:
            logits [batch, pos, d_vocab] (no `stop_at`), or the residual stream [batch, pos, d_model].

        Every block's hooks fire as in a forward. The plain stack runs from any layer; a variant whose layers
        are not a plain sequence (YOCO) says which layers it can start from.
        """
        n = self.cfg.n_layers
        stop = n if stop_at is None else stop_at
        if start_at not in STARTS:
            raise ModelError(f"start_at must be one of {STARTS}, got {start_at!r}")
        if not 0 <= layer <= stop <= n or (start_at == "resid_mid" and layer == stop):
            raise ModelError(f"cannot run from block {layer} ({start_at}) to block {stop} of a {n}-layer model")
        x = self.stack.run_from(
            self, layer, resid, start_at=start_at, stop_at=stop, cache=past_kv_cache, last_only=last_only
        )
        return x if stop_at is not None else self.unembed(self.ln_final(x))

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
        """A KV cache for incremental decoding of `max_len` positions (default n_ctx); variants return their
        own kind (YOCO: a `YocoCache`)."""
        return self.stack.make_cache(self, batch, max_len or self.cfg.n_ctx)

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

    def logits_unobserved(self) -> bool:
        """True when nothing can see the logits: the unembedding is a plain bias-free `nn.Linear` (not swapped by
        LoRA or surgery) with no hook on it and no patched forward (nnsight's while tracing), so the loss may be
        computed without them (`loss_from_hidden`)."""
        u = self.unembed
        return type(u) is nn.Linear and u.bias is None and not observed(u)

    def loss_from_hidden(
        self, hidden: Tensor, tokens: Tensor, targets: Tensor | None = None, per_token: bool = False
    ) -> Tensor:
        """`loss_fn(unembed(hidden), ...)` without the logits: chunked linear + cross-entropy
        (`tinygpt.model.loss.linear_cross_entropy`; equal to float rounding, gradients too).

        Args:
            hidden: `ln_final`'s output [batch, pos, d_model].
            tokens, targets, per_token: as `loss_fn`.
        """
        if targets is None:
            hidden, targets = hidden[:, :-1], tokens[:, 1:]
        return linear_cross_entropy(
            hidden, self.unembed.weight, targets, ignore_index=-100, reduction="none" if per_token else "mean"
        )

    # ---------------------------------------------------------------- TransformerLens' hook switches
    def set_use_attn_result(self, use_attn_result: bool) -> None:
        """Compute each head's output on its own: `blocks.{i}.attn.hook_result` [batch, pos, n_heads, d_model]
        (`z[h] @ W_O[h]`, without `b_O`). Off by default (costs memory); see `tinygpt.model.heads`."""
        self._set_switch("use_attn_result", use_attn_result)

    def set_use_split_qkv_input(self, use_split_qkv_input: bool) -> None:
        """Give each head its own query/key/value input: `blocks.{i}.hook_q_input` [batch, pos, n_heads, d_model],
        `hook_k_input` / `hook_v_input` [batch, pos, n_key_value_heads, d_model] (ln1 applied per head)."""
        self._set_switch("use_split_qkv_input", use_split_qkv_input)

    def set_use_attn_in(self, use_attn_in: bool) -> None:
        """Give each head its own attention input: `blocks.{i}.hook_attn_in` [batch, pos, n_heads, d_model]."""
        self._set_switch("use_attn_in", use_attn_in)

    def set_use_hook_mlp_in(self, use_hook_mlp_in: bool) -> None:
        """Call `blocks.{i}.hook_mlp_in` [batch, pos, d_model] on the feed-forward input (a copy of resid_mid)."""
        self._set_switch("use_hook_mlp_in", use_hook_mlp_in)

    def _set_switch(self, name: str, on: bool) -> None:
        if on:
            check_switch(self, name)  # a variant that cannot express it says so (SwitchError)
        setattr(self.cfg, name, bool(on))

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
            raise ModelError(
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
                raise ModelError("prepend_bos=True but this tokenizer has no BOS token")
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
            raise ModelError(f"{string!r} is {len(ids)} tokens, not one: {ids}")
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
    W_pos = property(lambda self: _pos_weight(self))  # [n_ctx, d_model]
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
        """See `tinygpt.generate` (registered by `tinygpt.sampling`)."""
        return _method("generate", "tinygpt.sampling")(self, prompt, max_new_tokens=max_new_tokens, **kwargs)

    def save(self, path, **kwargs: Any):
        """Write a `.tinygpt` file (see `tinygpt.save`, registered by `tinygpt.checkpoint`)."""
        return _method("save", "tinygpt.checkpoint")(self, path, **kwargs)

    def saes(self, saes: Any, **kwargs: Any):
        """Context manager: the model with sparse dictionaries spliced in (`tinygpt.dictionary.splice`), as
        SAELens' `HookedSAETransformer.saes`."""
        return _method("saes", "tinygpt.dictionary")(self, saes, **kwargs)


def _pos_weight(model: GPT) -> Tensor:
    if model.pos_embed is None:
        raise ModelError("a rotary model has no learned positional embeddings (W_pos); positions are in attention")
    return model.pos_embed.weight


def _count_params(cfg: GPTConfig) -> int:
    """Parameters of a model built from `cfg`, built on the meta device (no memory)."""
    with torch.device("meta"):
        return GPT(cfg.replace(dtype="float32")).n_params()


register_param_counter(_count_params)
