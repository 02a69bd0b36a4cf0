"""Llama, Qwen2 and Mistral (`LlamaForCausalLM`, `Qwen2ForCausalLM`, `MistralForCausalLM`): one decoder, three configs.

| tinygpt                                        | checkpoint                                              |
|------------------------------------------------|---------------------------------------------------------|
| `embed.weight` [V, d]                          | `model.embed_tokens.weight`                             |
| `blocks.i.ln1.weight` (RMSNorm)                | `model.layers.i.input_layernorm.weight`                 |
| `blocks.i.attn.{q,k,v,o}_proj.weight` (+bias)  | `model.layers.i.self_attn.{q,k,v,o}_proj.weight` (+bias)|
| `blocks.i.ln2.weight`                          | `model.layers.i.post_attention_layernorm.weight`        |
| `blocks.i.mlp.{gate,up,down}_proj.weight`      | `model.layers.i.mlp.{gate,up,down}_proj.weight`         |
| `ln_final.weight`                              | `model.norm.weight`                                     |
| `unembed.weight` (absent when tied)            | `lm_head.weight`                                        |

Both sides use nn.Linear layouts, so every tensor copies as is. Config: `num_hidden_layers→n_layers,
hidden_size→d_model, num_attention_heads→n_heads, head_dim→d_head, num_key_value_heads→n_key_value_heads,
intermediate_size→d_mlp, vocab_size→d_vocab, max_position_embeddings→n_ctx, rms_norm_eps→layer_norm_eps,
hidden_act→act_fn, rope_theta→rotary_base, rope_scaling (linear / llama3)→rope_scaling,
tie_word_embeddings→tie_embeddings, initializer_range→init_std`, with `positional_embedding_type="rotary"`,
`normalization_type="RMS"`, `gated_mlp=True`. Biases: Llama's `attention_bias` and `mlp_bias` must agree (tinygpt's
`bias` covers every linear); Qwen2 has q/k/v biases only (`bias=False, qkv_bias=True`); Mistral none.

Refused, naming the field: a sliding window that binds (Mistral `sliding_window`, Qwen2 `use_sliding_window` +
`max_window_layers`) unless `n_ctx=` is at most the window (then the window never masks anything and the import is
exact), rope types other than default / linear / llama3, `partial_rotary_factor` != 1, activations tinygpt lacks.
`attention_dropout` only acts in training and is not carried over (tinygpt's `dropout` is 0 on import).
"""

from __future__ import annotations

from typing import Any

from tinygpt.interop.hf.common import RUNTIME_FIELDS, InteropError, non_default_fields, transformers_module
from tinygpt.interop.hf.spec import Family, hf_act, refuse, rope_of, sliding_window_of

__all__ = ["LLAMA", "LlamaFamily", "decoder_fields", "decoder_hf_kwargs", "check_decoder"]

_CLASSES = {"llama": "LlamaConfig", "qwen2": "Qwen2Config", "mistral": "MistralConfig"}
_ARCHS = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM"}

# GPTConfig fields a Llama-style decoder expresses (whether each value is, is checked in check_decoder)
DECODER_FIELDS = RUNTIME_FIELDS | {
    "n_layers",
    "d_model",
    "n_heads",
    "d_head",
    "d_mlp",
    "d_vocab",
    "n_ctx",
    "tie_embeddings",
    "layer_norm_eps",
    "act_fn",
    "n_key_value_heads",
    "positional_embedding_type",
    "rotary_base",
    "rope_scaling",
    "normalization_type",
    "gated_mlp",
    "bias",
    "qkv_bias",
}


def decoder_fields(c: Any, problems: list[str], *, n_ctx: int | None, d_mlp: int) -> dict[str, Any]:
    """GPTConfig fields of the attention / norm / embedding part of a Llama-style HF config (MoE ones included)."""
    heads = c.num_attention_heads
    kv = getattr(c, "num_key_value_heads", None) or heads
    d_head = getattr(c, "head_dim", None) or c.hidden_size // heads
    theta, scaling, partial = rope_of(c, problems)
    if partial != 1.0:
        problems.append(f"partial_rotary_factor={partial} (this architecture rotates whole heads)")
    max_pos = c.max_position_embeddings
    n = n_ctx or max_pos
    if n_ctx is not None and n_ctx > max_pos:
        problems.append(f"n_ctx={n_ctx} exceeds max_position_embeddings={max_pos}")
    window = sliding_window_of(c)
    if window is not None and window < n:
        problems.append(
            f"sliding_window={window} is in use (layers attend to their last {window} positions only); import with "
            f"n_ctx={window} or less (tinygpt import --n-ctx {window}), where the window never masks anything"
        )
    return dict(
        n_layers=c.num_hidden_layers,
        d_model=c.hidden_size,
        n_heads=heads,
        d_head=d_head,
        n_key_value_heads=None if kv == heads else kv,
        d_mlp=d_mlp,
        d_vocab=c.vocab_size,
        n_ctx=n,
        tie_embeddings=bool(getattr(c, "tie_word_embeddings", False)),
        layer_norm_eps=float(c.rms_norm_eps),
        act_fn=hf_act(c, problems),
        init_std=float(getattr(c, "initializer_range", 0.02)),
        dropout=0.0,
        positional_embedding_type="rotary",
        rotary_base=theta,
        rope_scaling=scaling,
        normalization_type="RMS",
        gated_mlp=True,
    )


def check_decoder(cfg: Any, model_type: str, allowed: set[str], bias: tuple[bool, bool | None] | None) -> list[str]:
    """Problems exporting `cfg` as a Llama-style `model_type`; `bias` = the (bias, qkv_bias) it needs (None: any
    agreeing pair)."""
    problems = non_default_fields(cfg, allowed)
    want = {"positional_embedding_type": "rotary", "normalization_type": "RMS", "gated_mlp": True}
    for name, value in want.items():
        if getattr(cfg, name, None) != value:
            problems.append(f"{name}={getattr(cfg, name, None)!r} ({model_type} needs {value!r})")
    rd = getattr(cfg, "rotary_dim", None)
    if rd not in (None, cfg.d_head):
        problems.append(f"rotary_dim={rd} ({model_type} rotates whole heads)")
    if getattr(cfg, "rotary_adjacent_pairs", False):
        problems.append("rotary_adjacent_pairs=True (HF rotates halves)")
    b = bool(getattr(cfg, "bias", True))
    qb = getattr(cfg, "qkv_bias", None)
    qb = b if qb is None else bool(qb)
    if bias is None:
        if qb != b:
            problems.append(f"qkv_bias={qb} with bias={b} ({model_type} has attention_bias and mlp_bias only)")
    elif (b, qb) != bias:
        problems.append(f"bias={b}, qkv_bias={qb} ({model_type} has bias={bias[0]}, qkv_bias={bias[1]})")
    return problems


def decoder_hf_kwargs(cfg: Any, tokenizer: Any) -> dict[str, Any]:
    """The transformers config kwargs of the shared decoder part."""
    rope: dict[str, Any] = {"rope_theta": float(getattr(cfg, "rotary_base", 10000.0))}
    scaling = getattr(cfg, "rope_scaling", None)
    rope["rope_type"] = "default"
    if scaling:
        rope.update({k: v for k, v in scaling.items() if k != "type"})
    return dict(
        vocab_size=cfg.d_vocab,
        hidden_size=cfg.d_model,
        intermediate_size=cfg.d_mlp,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=getattr(cfg, "n_key_value_heads", None) or cfg.n_heads,
        head_dim=cfg.d_head,
        hidden_act=cfg.act_fn,
        max_position_embeddings=cfg.n_ctx,
        initializer_range=cfg.init_std,
        rms_norm_eps=cfg.layer_norm_eps,
        tie_word_embeddings=cfg.tie_embeddings,
        rope_parameters=rope,
        attention_dropout=0.0,
        bos_token_id=tokenizer.bos_id if tokenizer is not None else None,
        eos_token_id=tokenizer.eos_id if tokenizer is not None else None,
        dtype=cfg.dtype,
    )


DECODER_RULES = (
    (r"embed\.weight", "model.embed_tokens.weight"),
    (r"unembed\.weight", "lm_head.weight"),
    (r"ln_final\.weight", "model.norm.weight"),
    (r"blocks\.(\d+)\.ln1\.weight", r"model.layers.\1.input_layernorm.weight"),
    (r"blocks\.(\d+)\.ln2\.weight", r"model.layers.\1.post_attention_layernorm.weight"),
    (r"blocks\.(\d+)\.attn\.([qkvo])_proj\.(weight|bias)", r"model.layers.\1.self_attn.\2_proj.\3"),
)


class LlamaFamily(Family):
    """Llama / Qwen2 / Mistral (see the module docstring)."""

    model_types = ("llama", "qwen2", "mistral")
    prefix = "model."
    rules = (
        *DECODER_RULES,
        (r"blocks\.(\d+)\.mlp\.(gate|up|down)_proj\.(weight|bias)", r"model.layers.\1.mlp.\2_proj.\3"),
    )

    def config_fields(self, c: Any, *, n_ctx: int | None = None, dropout: float | None = None) -> dict[str, Any]:
        mt = c.model_type
        problems: list[str] = []
        fields = decoder_fields(c, problems, n_ctx=n_ctx, d_mlp=c.intermediate_size)
        if mt == "llama":
            attn_bias, mlp_bias = bool(getattr(c, "attention_bias", False)), bool(getattr(c, "mlp_bias", False))
            if attn_bias != mlp_bias:
                problems.append(
                    f"attention_bias={attn_bias} with mlp_bias={mlp_bias} (tinygpt's `bias` covers every linear: "
                    "they must agree)"
                )
            fields.update(bias=attn_bias, qkv_bias=None)
        elif mt == "qwen2":
            fields.update(bias=False, qkv_bias=True)
        else:
            fields.update(bias=False, qkv_bias=None)
        refuse(mt, problems)
        return fields

    def check(self, cfg: Any, model_type: str) -> None:
        need = {"llama": None, "qwen2": (False, True), "mistral": (False, False)}[model_type]
        problems = check_decoder(cfg, model_type, DECODER_FIELDS, need)
        if problems:
            raise InteropError(
                f"{_ARCHS[model_type]} cannot express {', '.join(problems)}; keep the model as .tinygpt or export "
                "another architecture (architecture=)"
            )

    def hf_config(self, cfg: Any, tokenizer: Any, model_type: str) -> Any:
        T = transformers_module()
        kw = decoder_hf_kwargs(cfg, tokenizer)
        if model_type == "llama":
            kw.update(attention_bias=bool(getattr(cfg, "bias", True)), mlp_bias=bool(getattr(cfg, "bias", True)))
        elif model_type == "mistral":
            kw.update(sliding_window=None)
        else:
            kw.update(use_sliding_window=False, sliding_window=None)
        return getattr(T, _CLASSES[model_type])(architectures=[_ARCHS[model_type]], **kw)


LLAMA = LlamaFamily()
