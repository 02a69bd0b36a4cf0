"""GPT-NeoX / Pythia (`GPTNeoXForCausalLM`): LayerNorm, partial rotary, parallel attention + MLP residual.

| tinygpt                                  | checkpoint                                                  |
|------------------------------------------|-------------------------------------------------------------|
| `embed.weight`                           | `gpt_neox.embed_in.weight`                                  |
| `blocks.i.ln1` / `ln2` (weight, bias)    | `gpt_neox.layers.i.input_layernorm` / `post_attention_layernorm` |
| `blocks.i.attn.{q,k,v}_proj` (w, b)      | `gpt_neox.layers.i.attention.query_key_value` (fused)       |
| `blocks.i.attn.o_proj`                   | `gpt_neox.layers.i.attention.dense`                         |
| `blocks.i.mlp.fc_in` / `fc_out`          | `gpt_neox.layers.i.mlp.dense_h_to_4h` / `dense_4h_to_h`     |
| `ln_final`                               | `gpt_neox.final_layer_norm`                                 |
| `unembed.weight`                         | `embed_out.weight`                                          |

`query_key_value` is interleaved *per head*: its [3·H·dh, d] weight is [H, (q, k, v), dh, d] (HF views the output
as [..., H, 3·dh] and chunks it), so the split is `W.view(H, 3, dh, d)[:, j]`, not three contiguous thirds.
Config: `rotary_pct` / `partial_rotary_factor` → `rotary_dim = int(d_head · pct)` (must be even),
`rotary_emb_base` / `rope_theta` → `rotary_base`, `use_parallel_residual` → `parallel_attn_mlp`, `layer_norm_eps`,
`hidden_act` ("gelu" for Pythia), `tie_word_embeddings`; `normalization_type="LN"`, `bias=True` (NeoX biases every
linear; `attention_bias=False` is refused). `hidden_dropout` / `attention_dropout` act only in training.
"""

from __future__ import annotations

from typing import Any

import torch

from tinygpt.interop.hf.common import RUNTIME_FIELDS, InteropError, non_default_fields, transformers_module
from tinygpt.interop.hf.spec import Family, Group, hf_act, refuse, rope_of

__all__ = ["GPT_NEOX", "GPTNeoXFamily"]

_FIELDS = RUNTIME_FIELDS | {
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
    "positional_embedding_type",
    "rotary_dim",
    "rotary_base",
    "rope_scaling",
    "parallel_attn_mlp",
}


class GPTNeoXFamily(Family):
    """GPT-NeoX / Pythia (see the module docstring)."""

    model_types = ("gpt_neox",)
    prefix = "gpt_neox."
    ignorable = ("rotary_emb.inv_freq", ".attention.bias", ".attention.masked_bias")
    rules = (
        (r"embed\.weight", "gpt_neox.embed_in.weight"),
        (r"unembed\.weight", "embed_out.weight"),
        (r"ln_final\.(weight|bias)", r"gpt_neox.final_layer_norm.\1"),
        (r"blocks\.(\d+)\.ln1\.(weight|bias)", r"gpt_neox.layers.\1.input_layernorm.\2"),
        (r"blocks\.(\d+)\.ln2\.(weight|bias)", r"gpt_neox.layers.\1.post_attention_layernorm.\2"),
        (r"blocks\.(\d+)\.attn\.o_proj\.(weight|bias)", r"gpt_neox.layers.\1.attention.dense.\2"),
        (r"blocks\.(\d+)\.mlp\.fc_in\.(weight|bias)", r"gpt_neox.layers.\1.mlp.dense_h_to_4h.\2"),
        (r"blocks\.(\d+)\.mlp\.fc_out\.(weight|bias)", r"gpt_neox.layers.\1.mlp.dense_4h_to_h.\2"),
    )

    def groups(self, cfg: Any, model_type: str, available: set[str] | None) -> list[Group]:
        h, dh = cfg.n_heads, cfg.d_head

        def split(ts):  # [3·H·dh, ...] interleaved per head -> q, k, v [H·dh, ...]
            (t,) = ts
            per_head = t.view(h, 3, dh, *t.shape[1:])
            return [per_head[:, j].reshape(h * dh, *t.shape[1:]) for j in range(3)]

        def merge(ts):
            q, k, v = (t.view(h, dh, *t.shape[1:]) for t in ts)
            return [torch.stack((q, k, v), 1).reshape(3 * h * dh, *q.shape[2:])]

        out = []
        for i in range(cfg.n_layers):
            for kind in ("weight", "bias"):
                ours = tuple(f"blocks.{i}.attn.{x}_proj.{kind}" for x in "qkv")
                theirs = (f"gpt_neox.layers.{i}.attention.query_key_value.{kind}",)
                out.append(Group(ours, theirs, split, merge))
        return out

    def config_fields(self, c: Any, *, n_ctx: int | None = None, dropout: float | None = None) -> dict[str, Any]:
        problems: list[str] = []
        heads = c.num_attention_heads
        d_head = c.hidden_size // heads
        theta, scaling, partial = rope_of(c, problems)
        rotary_dim = int(d_head * partial)
        if rotary_dim % 2 or rotary_dim < 2:
            problems.append(f"rotary_pct={partial} gives rotary_dim={rotary_dim} (must be even and >= 2)")
        if not getattr(c, "attention_bias", True):
            problems.append("attention_bias=False (NeoX MLPs keep biases; tinygpt's `bias` covers every linear)")
        max_pos = c.max_position_embeddings
        if n_ctx is not None and n_ctx > max_pos:
            problems.append(f"n_ctx={n_ctx} exceeds max_position_embeddings={max_pos}")
        act = hf_act(c, problems)
        refuse("gpt_neox", problems)
        return dict(
            n_layers=c.num_hidden_layers,
            d_model=c.hidden_size,
            n_heads=heads,
            d_mlp=c.intermediate_size,
            d_vocab=c.vocab_size,
            n_ctx=n_ctx or max_pos,
            tie_embeddings=bool(getattr(c, "tie_word_embeddings", False)),
            layer_norm_eps=float(c.layer_norm_eps),
            act_fn=act,
            init_std=float(getattr(c, "initializer_range", 0.02)),
            dropout=0.0,
            positional_embedding_type="rotary",
            rotary_dim=None if rotary_dim == d_head else rotary_dim,
            rotary_base=theta,
            rope_scaling=scaling,
            parallel_attn_mlp=bool(getattr(c, "use_parallel_residual", True)),
        )

    def check(self, cfg: Any, model_type: str) -> None:
        problems = non_default_fields(cfg, _FIELDS)
        if getattr(cfg, "positional_embedding_type", "standard") != "rotary":
            problems.append("positional_embedding_type='standard' (GPT-NeoX is rotary)")
        if cfg.n_heads * cfg.d_head != cfg.d_model:
            problems.append(f"d_head={cfg.d_head} (GPT-NeoX needs n_heads * d_head == d_model)")
        if getattr(cfg, "rotary_adjacent_pairs", False):
            problems.append("rotary_adjacent_pairs=True (HF rotates halves)")
        if problems:
            raise InteropError(f"GPTNeoXForCausalLM cannot express {', '.join(problems)}; keep the model as .tinygpt")

    def hf_config(self, cfg: Any, tokenizer: Any, model_type: str) -> Any:
        T = transformers_module()
        rotary_dim = getattr(cfg, "rotary_dim", None) or cfg.d_head
        rope: dict[str, Any] = {
            "rope_theta": float(getattr(cfg, "rotary_base", 10000.0)),
            "rope_type": "default",
            "partial_rotary_factor": rotary_dim / cfg.d_head,
        }
        rope.update(getattr(cfg, "rope_scaling", None) or {})
        return T.GPTNeoXConfig(
            architectures=["GPTNeoXForCausalLM"],
            vocab_size=cfg.d_vocab,
            hidden_size=cfg.d_model,
            num_hidden_layers=cfg.n_layers,
            num_attention_heads=cfg.n_heads,
            intermediate_size=cfg.d_mlp,
            hidden_act=cfg.act_fn,
            max_position_embeddings=cfg.n_ctx,
            initializer_range=cfg.init_std,
            layer_norm_eps=cfg.layer_norm_eps,
            use_parallel_residual=bool(getattr(cfg, "parallel_attn_mlp", False)),
            tie_word_embeddings=cfg.tie_embeddings,
            rope_parameters=rope,
            attention_bias=True,
            attention_dropout=0.0,
            hidden_dropout=0.0,
            bos_token_id=tokenizer.bos_id if tokenizer is not None else None,
            eos_token_id=tokenizer.eos_id if tokenizer is not None else None,
            dtype=cfg.dtype,
        )


GPT_NEOX = GPTNeoXFamily()
