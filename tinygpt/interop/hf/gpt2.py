"""GPT-2 (`GPT2LMHeadModel`) both ways: a vanilla tinygpt model *is* GPT-2 with different parameter names.

| tinygpt                                   | `GPT2LMHeadModel`                                   |
|-------------------------------------------|-----------------------------------------------------|
| `embed.weight` [V, d]                     | `transformer.wte.weight` [V, d]                     |
| `pos_embed.weight` [n_ctx, d]             | `transformer.wpe.weight` [n_positions, d]           |
| `blocks.i.ln1`, `blocks.i.ln2`            | `transformer.h.i.ln_1`, `transformer.h.i.ln_2`      |
| `attn.q_proj/k_proj/v_proj` [H·dh, d]     | `attn.c_attn` fused q, k, v: weight [d, 3·d]        |
| `attn.o_proj.weight` [d, H·dh]            | `attn.c_proj.weight` [d, d] (Conv1D: [in, out])     |
| `mlp.fc_in.weight` [d_mlp, d]             | `mlp.c_fc.weight` [d, d_mlp]                        |
| `mlp.fc_out.weight` [d, d_mlp]            | `mlp.c_proj.weight` [d_mlp, d]                      |
| `ln_final`                                | `transformer.ln_f`                                  |
| `unembed.weight` [V, d] (or tied)         | `lm_head.weight` [V, d] (`tie_word_embeddings`)     |

HF's `Conv1D` computes `x @ W + b` with W stored [in, out]; `nn.Linear` stores [out, in], hence the transposes.
Config knobs map as `n_layers→n_layer, d_model→n_embd, n_heads→n_head, d_mlp→n_inner, d_vocab→vocab_size,
n_ctx→n_positions, layer_norm_eps→layer_norm_epsilon, act_fn→activation_function ("gelu_new" or "gelu"),
dropout→resid_pdrop/embd_pdrop/attn_pdrop, init_std→initializer_range, tie_embeddings→tie_word_embeddings`;
`attn_impl` is a runtime choice, not part of the exported model. Anything else GPT-2 cannot express (a separate
`d_head`, an architecture variant, weight surgery) is refused with an `InteropError` naming the knob.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from tinygpt.config import GPTConfig
from tinygpt.interop.hf.common import InteropError, non_default_fields, transformers_module
from tinygpt.interop.hf.spec import Family, Group
from tinygpt.tokenizer import Tokenizer

if TYPE_CHECKING:
    from tinygpt.model import GPT

__all__ = [
    "GPT2",
    "GPT2Family",
    "check_gpt2_expressible",
    "copy_hf_gpt2_weights",
    "from_hf",
    "from_hf_config",
    "gpt2_state_dict",
    "to_hf",
    "to_hf_config",
]

# GPTConfig fields GPT-2 expresses (attn_impl is a runtime choice of ours, not part of the weights).
_EXPRESSIBLE = {
    "n_layers",
    "d_model",
    "n_heads",
    "d_head",
    "d_mlp",
    "d_vocab",
    "n_ctx",
    "tie_embeddings",
    "dtype",
    "layer_norm_eps",
    "act_fn",
    "dropout",
    "init_std",
    "attn_impl",
    "device",
}
_ACT_TO_HF = {"gelu_new": "gelu_new", "gelu": "gelu"}
_ACT_FROM_HF = {"gelu_new": "gelu_new", "gelu_pytorch_tanh": "gelu_new", "gelu": "gelu"}


def check_gpt2_expressible(cfg: GPTConfig) -> None:
    """Raise `InteropError` naming every knob of `cfg` that `GPT2LMHeadModel` cannot express."""
    problems = []
    if cfg.n_heads * cfg.d_head != cfg.d_model:
        problems.append(f"d_head={cfg.d_head} (GPT-2 needs n_heads * d_head == d_model={cfg.d_model})")
    if cfg.act_fn not in _ACT_TO_HF:
        problems.append(f"act_fn={cfg.act_fn!r}")
    problems += non_default_fields(cfg, _EXPRESSIBLE)
    if problems:
        raise InteropError(
            f"GPT-2 (GPT2LMHeadModel) cannot express {', '.join(problems)}; only vanilla GPT-2-style models "
            "export to Hugging Face format (set these knobs to their defaults, or keep the model as .tinygpt)"
        )


def to_hf_config(cfg: GPTConfig, tokenizer: Tokenizer | None = None):
    """The `transformers.GPT2Config` of a vanilla tinygpt config (raises `InteropError` otherwise)."""
    check_gpt2_expressible(cfg)
    T = transformers_module()
    eos = tokenizer.eos_id if tokenizer is not None else None
    bos = tokenizer.bos_id if tokenizer is not None else None
    return T.GPT2Config(
        vocab_size=cfg.d_vocab,
        n_positions=cfg.n_ctx,
        n_embd=cfg.d_model,
        n_layer=cfg.n_layers,
        n_head=cfg.n_heads,
        n_inner=cfg.d_mlp,
        activation_function=_ACT_TO_HF[cfg.act_fn],
        resid_pdrop=cfg.dropout,
        embd_pdrop=cfg.dropout,
        attn_pdrop=cfg.dropout,
        layer_norm_epsilon=cfg.layer_norm_eps,
        initializer_range=cfg.init_std,
        bos_token_id=bos,
        eos_token_id=eos,
        tie_word_embeddings=cfg.tie_embeddings,
        architectures=["GPT2LMHeadModel"],
    )


def from_hf_config(c: Any, *, tied: bool | None = None, dtype: str = "float32", dropout: float | None = None):
    """The `GPTConfig` of a Hugging Face GPT-2 config; `InteropError` names any knob tinygpt cannot express.

    Args:
        c: a `transformers.GPT2Config` (or any config with `model_type == "gpt2"`).
        tied: whether lm_head shares wte (default: the config's `tie_word_embeddings`).
        dtype: "float32" or "bfloat16".
        dropout: overrides the dropout (needed when resid/embd/attn dropout differ; inference ignores it).
    """
    if getattr(c, "model_type", None) != "gpt2":
        raise InteropError(
            f"model_type {getattr(c, 'model_type', None)!r} is not GPT-2: this is GPT-2's config mapping; "
            "tinygpt.interop.hf.config_from_hf maps every supported architecture (import_hf reads any of them)"
        )
    problems = []
    act = getattr(c, "activation_function", "gelu_new")
    if act not in _ACT_FROM_HF:
        problems.append(f"activation_function={act!r} (tinygpt has gelu_new and gelu)")
    if not getattr(c, "scale_attn_weights", True):
        problems.append("scale_attn_weights=False (tinygpt always scales scores by 1/sqrt(d_head))")
    if getattr(c, "scale_attn_by_inverse_layer_idx", False):
        problems.append("scale_attn_by_inverse_layer_idx=True")
    if getattr(c, "add_cross_attention", False):
        problems.append("add_cross_attention=True")
    drops = {k: float(getattr(c, k, 0.0) or 0.0) for k in ("resid_pdrop", "embd_pdrop", "attn_pdrop")}
    if dropout is None:
        if len(set(drops.values())) > 1:
            problems.append(
                f"different dropouts {drops} (tinygpt has one `dropout`; pass dropout= to choose it, "
                "inference is unaffected)"
            )
        dropout = next(iter(drops.values()))
    if problems:
        raise InteropError(f"tinygpt cannot express this GPT-2 config: {'; '.join(problems)}")
    return GPTConfig(
        n_layers=c.n_layer,
        d_model=c.n_embd,
        n_heads=c.n_head,
        d_mlp=c.n_inner or 4 * c.n_embd,
        d_vocab=c.vocab_size,
        n_ctx=c.n_positions,
        tie_embeddings=bool(getattr(c, "tie_word_embeddings", True) if tied is None else tied),
        dtype=dtype,
        layer_norm_eps=c.layer_norm_epsilon,
        act_fn=_ACT_FROM_HF[act],
        dropout=dropout,
        init_std=c.initializer_range,
    )


def gpt2_state_dict(model: GPT) -> dict[str, Tensor]:
    """A tinygpt model's weights under `GPT2LMHeadModel` names and layouts (no lm_head when tied)."""
    sd = model.state_dict()
    used: set[str] = set()

    def take(name: str) -> Tensor:
        if name not in sd:
            raise InteropError(
                f"the model has no tensor {name!r}: its structure is not GPT-2's (weight surgery or an "
                "architecture variant?); export the vanilla model"
            )
        used.add(name)
        return sd[name].detach()

    out = {"transformer.wte.weight": take("embed.weight"), "transformer.wpe.weight": take("pos_embed.weight")}
    for i in range(model.cfg.n_layers):
        p, h = f"blocks.{i}.", f"transformer.h.{i}."
        for ours, theirs in (("ln1", "ln_1"), ("ln2", "ln_2")):
            out[h + theirs + ".weight"] = take(p + ours + ".weight")
            out[h + theirs + ".bias"] = take(p + ours + ".bias")
        qkv = [p + f"attn.{x}_proj" for x in "qkv"]
        out[h + "attn.c_attn.weight"] = torch.cat([take(n + ".weight") for n in qkv], 0).T
        out[h + "attn.c_attn.bias"] = torch.cat([take(n + ".bias") for n in qkv], 0)
        for ours, theirs in (("attn.o_proj", "attn.c_proj"), ("mlp.fc_in", "mlp.c_fc"), ("mlp.fc_out", "mlp.c_proj")):
            out[h + theirs + ".weight"] = take(p + ours + ".weight").T
            out[h + theirs + ".bias"] = take(p + ours + ".bias")
    out["transformer.ln_f.weight"] = take("ln_final.weight")
    out["transformer.ln_f.bias"] = take("ln_final.bias")
    if model.cfg.tie_embeddings:
        used.add("unembed.weight")
    else:
        out["lm_head.weight"] = take("unembed.weight")
    if leftover := sorted(set(sd) - used):
        raise InteropError(
            f"GPT-2 has no place for tensor(s) {leftover[:5]}: the model is not a vanilla GPT-2-style model "
            "(weight surgery or an architecture variant); export the vanilla model"
        )
    return out


def copy_hf_gpt2_weights(model: GPT, hf: Any) -> None:
    """Copy a Hugging Face `GPT2LMHeadModel`'s weights into a tinygpt `GPT` of the same shape (in place).

    HF's `Conv1D` stores weights as [in, out] (y = x @ W + b) and fuses q|k|v in `c_attn`; our
    `nn.Linear` stores [out, in]. Positions beyond the model's `n_ctx` are dropped.
    """
    t, hd = hf.transformer, model.cfg.n_heads * model.cfg.d_head

    def put(name: str, dst: Tensor, src: Tensor) -> None:
        if dst.shape != src.shape:
            raise InteropError(f"shape mismatch at {name}: tinygpt {tuple(dst.shape)} vs HF {tuple(src.shape)}")
        dst.copy_(src)

    with torch.no_grad():
        put("embed", model.embed.weight, t.wte.weight)
        put("pos_embed", model.pos_embed.weight, t.wpe.weight[: model.cfg.n_ctx])
        for i, (ours, theirs) in enumerate(zip(model.blocks, t.h, strict=True)):
            put(f"blocks.{i}.ln1.weight", ours.ln1.weight, theirs.ln_1.weight)
            put(f"blocks.{i}.ln1.bias", ours.ln1.bias, theirs.ln_1.bias)
            w_q, w_k, w_v = theirs.attn.c_attn.weight.split(hd, dim=1)
            b_q, b_k, b_v = theirs.attn.c_attn.bias.split(hd)
            for name, w, b in (("q_proj", w_q, b_q), ("k_proj", w_k, b_k), ("v_proj", w_v, b_v)):
                proj = getattr(ours.attn, name)
                put(f"blocks.{i}.attn.{name}.weight", proj.weight, w.T)
                put(f"blocks.{i}.attn.{name}.bias", proj.bias, b)
            put(f"blocks.{i}.attn.o_proj.weight", ours.attn.o_proj.weight, theirs.attn.c_proj.weight.T)
            put(f"blocks.{i}.attn.o_proj.bias", ours.attn.o_proj.bias, theirs.attn.c_proj.bias)
            put(f"blocks.{i}.ln2.weight", ours.ln2.weight, theirs.ln_2.weight)
            put(f"blocks.{i}.ln2.bias", ours.ln2.bias, theirs.ln_2.bias)
            put(f"blocks.{i}.mlp.fc_in.weight", ours.mlp.fc_in.weight, theirs.mlp.c_fc.weight.T)
            put(f"blocks.{i}.mlp.fc_in.bias", ours.mlp.fc_in.bias, theirs.mlp.c_fc.bias)
            put(f"blocks.{i}.mlp.fc_out.weight", ours.mlp.fc_out.weight, theirs.mlp.c_proj.weight.T)
            put(f"blocks.{i}.mlp.fc_out.bias", ours.mlp.fc_out.bias, theirs.mlp.c_proj.bias)
        put("ln_final.weight", model.ln_final.weight, t.ln_f.weight)
        put("ln_final.bias", model.ln_final.bias, t.ln_f.bias)
        if model.unembed.weight is not model.embed.weight:
            put("unembed.weight", model.unembed.weight, hf.lm_head.weight)


def to_hf(model: GPT):
    """An in-memory `transformers.GPT2LMHeadModel` with exactly the model's weights (eval mode, CPU)."""
    T = transformers_module()
    config = to_hf_config(model.cfg, model.tokenizer)
    sd = gpt2_state_dict(model)  # checks the structure before building anything
    dtype = torch.bfloat16 if model.cfg.dtype == "bfloat16" else torch.float32
    hf = T.GPT2LMHeadModel(config).to(dtype)
    tied = hf.lm_head.weight is hf.transformer.wte.weight
    if tied != model.cfg.tie_embeddings:  # guards against a transformers version that ignores the flag
        raise InteropError(
            f"transformers built lm_head {'tied' if tied else 'untied'} although tie_word_embeddings="
            f"{model.cfg.tie_embeddings}; this transformers version is not supported"
        )
    params = dict(hf.named_parameters())  # a tied lm_head appears once, as transformer.wte.weight
    if missing := sorted(set(params) - set(sd)):
        raise InteropError(f"no tinygpt weights for HF parameter(s) {missing[:5]}")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(sd[name])
    return hf.eval()


def from_hf(hf: Any, tokenizer: Tokenizer | None = None, *, dropout: float | None = None) -> GPT:
    """A tinygpt `GPT` with the weights of an in-memory `GPT2LMHeadModel` (exact copy, eval mode)."""
    from tinygpt.model import GPT

    tied = hf.lm_head.weight is hf.transformer.wte.weight  # what the loader did, not only what the config says
    w = hf.transformer.wte.weight
    dtype = "bfloat16" if w.dtype == torch.bfloat16 else "float32"  # fp16 is upcast losslessly
    cfg = from_hf_config(hf.config, tied=tied, dtype=dtype, dropout=dropout)
    if tokenizer is not None and tokenizer.vocab_size > cfg.d_vocab:
        raise InteropError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model only {cfg.d_vocab}")
    model = GPT(cfg, tokenizer=tokenizer)
    copy_hf_gpt2_weights(model, hf)
    return model.eval()


# ----------------------------------------------------------------------------------------------- as a Family
def _transposed(ts):  # Conv1D [in, out] <-> nn.Linear [out, in]
    return [t.T for t in ts]


class GPT2Family(Family):
    """GPT-2 for the shared lazy importer / exporter (`tinygpt.interop.hf.files`): the table in the module docstring.

    `c_attn` holds q|k|v side by side ([d, 3·H·dh], Conv1D layout) and `c_proj` / `c_fc` are transposed; checkpoints
    saved from `GPT2Model` lack the `transformer.` prefix (OpenAI's `gpt2` on the Hub), which the importer accepts.
    """

    model_types = ("gpt2",)
    prefix = "transformer."
    ignorable = (".attn.bias", ".attn.masked_bias")  # old causal-mask buffers
    rules = (
        (r"embed\.weight", "transformer.wte.weight"),
        (r"pos_embed\.weight", "transformer.wpe.weight"),
        (r"unembed\.weight", "lm_head.weight"),
        (r"ln_final\.(weight|bias)", r"transformer.ln_f.\1"),
        (r"blocks\.(\d+)\.ln([12])\.(weight|bias)", r"transformer.h.\1.ln_\2.\3"),
        (r"blocks\.(\d+)\.attn\.o_proj\.bias", r"transformer.h.\1.attn.c_proj.bias"),
        (r"blocks\.(\d+)\.mlp\.fc_in\.bias", r"transformer.h.\1.mlp.c_fc.bias"),
        (r"blocks\.(\d+)\.mlp\.fc_out\.bias", r"transformer.h.\1.mlp.c_proj.bias"),
    )

    def groups(self, cfg: Any, model_type: str, available: set[str] | None) -> list[Group]:
        hd = cfg.n_heads * cfg.d_head
        out = []
        for i in range(cfg.n_layers):
            p, h = f"blocks.{i}.", f"transformer.h.{i}."
            qkv_w = tuple(f"{p}attn.{x}_proj.weight" for x in "qkv")
            qkv_b = tuple(f"{p}attn.{x}_proj.bias" for x in "qkv")
            out.append(
                Group(
                    qkv_w,
                    (h + "attn.c_attn.weight",),
                    lambda ts: [w.T for w in ts[0].split(hd, dim=1)],
                    lambda ts: [torch.cat(ts, 0).T],
                )
            )
            out.append(
                Group(qkv_b, (h + "attn.c_attn.bias",), lambda ts: list(ts[0].split(hd)), lambda ts: [torch.cat(ts)])
            )
            pairs = (("attn.o_proj", "attn.c_proj"), ("mlp.fc_in", "mlp.c_fc"), ("mlp.fc_out", "mlp.c_proj"))
            for ours, theirs in pairs:
                out.append(Group((f"{p}{ours}.weight",), (f"{h}{theirs}.weight",), _transposed, _transposed))
        return out

    def config_fields(self, c: Any, *, n_ctx: int | None = None, dropout: float | None = None) -> dict[str, Any]:
        if n_ctx is not None and n_ctx != c.n_positions:
            raise InteropError("n_ctx= applies to rotary models; a GPT-2 checkpoint keeps its n_positions")
        fields = from_hf_config(c, dropout=dropout).to_dict()
        fields.pop("dtype")
        return fields

    def check(self, cfg: Any, model_type: str) -> None:
        check_gpt2_expressible(cfg)

    def hf_config(self, cfg: Any, tokenizer: Any, model_type: str) -> Any:
        config = to_hf_config(cfg, tokenizer)
        config.dtype = cfg.dtype
        return config


GPT2 = GPT2Family()
