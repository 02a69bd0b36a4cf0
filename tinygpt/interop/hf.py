"""Hugging Face interop: GPT-2 export/import, any local causal LM as a teacher, TransformerLens bridges.

A vanilla tinygpt model *is* GPT-2 with different parameter names, so it converts both ways exactly:

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

Tokenizers: the byte tokenizer is written as a byte-level `tokenizer.json` (a BPE with the 256 GPT-2 byte
symbols as ids 0..255 and no merges) that `PreTrainedTokenizerFast` loads and that encodes any text to exactly
the ids `ByteTokenizer` gives; a BPE tokenizer writes its own `tokenizer.json`. Importing reads the directory's
tokenizer back (a byte-level vocabulary becomes a `ByteTokenizer` again).

Tokenizer comparison (`vocab_mismatch`, in `tinygpt.tokenizer`, re-exported here) is by vocabulary *content*:
every token is reduced to the bytes it stands for (`<0x41>` and the byte-level symbol "A" are both b"A", "Ġthe"
is b" the"), so a tinygpt tokenizer and a Hugging Face tokenizer compare meaningfully whatever their spelling,
and a probe text must encode to the same ids as well. Running any local causal LM (a teacher, a chat model) goes
through `tinygpt.interop.causal_lm`.

`transformers` is imported lazily: importing this module is cheap.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from tinygpt.config import GPTConfig
from tinygpt.errors import TinyGPTError
from tinygpt.tokenizer import (  # noqa: F401  (tokenizer comparison, re-exported: it lived here)
    PROBE_TEXT,
    BPETokenizer,
    ByteTokenizer,
    Tokenizer,
    TokenizerError,
    bytes_to_unicode,
    canonical_vocab,
    describe_tokenizer,
    load_tokenizer,
    unicode_to_bytes,
    vocab_mismatch,
)

if TYPE_CHECKING:
    from tinygpt.model import GPT


class InteropError(TinyGPTError, ValueError):
    """A model, config or directory cannot be converted to or from Hugging Face format."""


def _transformers():
    try:
        import transformers
    except ImportError as e:  # pragma: no cover - transformers is part of the dev environment
        raise InteropError(
            "Hugging Face interop needs the `transformers` package: pip install 'tinygpt[interop]'"
        ) from e
    return transformers


# ----------------------------------------------------------------------------------------------- config
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
# Architecture-variant switches: a sub-knob `prefix_*` only matters when its switch is on.
_SWITCHES = {"diff": "diff_attn", "mod": "mod", "moe": "moe_experts", "yoco": "yoco"}
_ACT_TO_HF = {"gelu_new": "gelu_new", "gelu": "gelu"}
_ACT_FROM_HF = {"gelu_new": "gelu_new", "gelu_pytorch_tanh": "gelu_new", "gelu": "gelu"}


def check_gpt2_expressible(cfg: GPTConfig) -> None:
    """Raise `InteropError` naming every knob of `cfg` that `GPT2LMHeadModel` cannot express."""
    problems = []
    if cfg.n_heads * cfg.d_head != cfg.d_model:
        problems.append(f"d_head={cfg.d_head} (GPT-2 needs n_heads * d_head == d_model={cfg.d_model})")
    defaults = {f.name: f.default for f in dataclasses.fields(GPTConfig) if f.init}
    for name, default in defaults.items():
        if name in _EXPRESSIBLE or default is dataclasses.MISSING:
            continue
        value = getattr(cfg, name)
        if value == default:
            continue
        switch = _SWITCHES.get(name.split("_")[0])
        if switch and switch != name and getattr(cfg, switch) == defaults[switch]:
            continue  # a setting of a variant that is switched off: inert
        problems.append(f"{name}={value!r}")
    if problems:
        raise InteropError(
            f"GPT-2 (GPT2LMHeadModel) cannot express {', '.join(problems)}; only vanilla GPT-2-style models "
            "export to Hugging Face format (set these knobs to their defaults, or keep the model as .tinygpt)"
        )


def to_hf_config(cfg: GPTConfig, tokenizer: Tokenizer | None = None):
    """The `transformers.GPT2Config` of a vanilla tinygpt config (raises `InteropError` otherwise)."""
    check_gpt2_expressible(cfg)
    T = _transformers()
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
            f"model_type {getattr(c, 'model_type', None)!r} is not GPT-2: only GPT-2-architecture checkpoints "
            "convert to tinygpt models; use tinygpt.interop.hf.load_hf_causal_lm(dir) to run it as a teacher "
            "or for comparison"
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


# ----------------------------------------------------------------------------------------------- weights
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
    T = _transformers()
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


# ----------------------------------------------------------------------------------------------- tokenizers


def byte_tokenizer_json() -> str:
    """A `tokenizers` JSON for the byte tokenizer: id i is byte i, no merges, byte-level pre-tokenizer/decoder."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    b2u = bytes_to_unicode()
    tok = HFTokenizer(models.BPE(vocab={b2u[b]: b for b in range(256)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return tok.to_str()


def hf_tokenizer(tokenizer: Tokenizer, n_ctx: int | None = None):
    """A `transformers.PreTrainedTokenizerFast` equivalent to a tinygpt tokenizer (same ids for any text)."""
    T = _transformers()
    from tokenizers import Tokenizer as HFTokenizer

    if isinstance(tokenizer, ByteTokenizer):
        backend = HFTokenizer.from_str(byte_tokenizer_json())
        if tokenizer.added_tokens:  # e.g. a chat template's tokens: ids 256, 257, ... as in tinygpt
            backend.add_special_tokens(list(tokenizer.added_tokens))
    elif isinstance(tokenizer, BPETokenizer):
        backend = HFTokenizer.from_str(tokenizer.tok.to_str())  # a copy: transformers may set padding options
    else:
        raise InteropError(f"cannot export a {type(tokenizer).__name__} to Hugging Face format")
    specials = {}
    for key, i in (("eos_token", tokenizer.eos_id), ("bos_token", tokenizer.bos_id)):
        if i is not None:
            specials[key] = backend.id_to_token(i)
    kw = {"model_max_length": n_ctx} if n_ctx else {}
    return T.PreTrainedTokenizerFast(tokenizer_object=backend, **specials, **kw)


def tokenizer_from_hf_dir(directory: str | os.PathLike) -> Tokenizer:
    """The tinygpt tokenizer of a Hugging Face model directory (a byte-level vocabulary -> `ByteTokenizer`).

    Reads `tokenizer.json`, or `vocab.json` + `merges.txt`, or any fast tokenizer `transformers` can load there.
    """
    d = Path(directory)
    if (d / "tokenizer.json").exists() or ((d / "vocab.json").exists() and (d / "merges.txt").exists()):
        tok: Tokenizer = BPETokenizer.from_file(d)
    else:
        T = _transformers()
        try:
            fast = T.AutoTokenizer.from_pretrained(str(d), local_files_only=True)
            tok = BPETokenizer.from_str(fast.backend_tokenizer.to_str(), source=str(d))
        except Exception as e:  # noqa: BLE001 - transformers raises many kinds
            raise InteropError(
                f"{d} holds no tokenizer tinygpt can read (tokenizer.json, vocab.json + merges.txt, or a fast "
                f"tokenizer): {e}; pass tokenizer= explicitly"
            ) from e
    as_bytes = ByteTokenizer(t for t, _ in sorted(tok.special_tokens.items(), key=lambda kv: kv[1]))
    return as_bytes if vocab_mismatch(tok, as_bytes) is None else tok


# ----------------------------------------------------------------------------------------------- files
def export_hf(
    model: GPT, directory: str | os.PathLike, *, tokenizer: Tokenizer | None = None, overwrite: bool = False
) -> Path:
    """Write a model as a Hugging Face `GPT2LMHeadModel` directory (weights, config and tokenizer files).

    The files are written into a temporary directory beside `directory`, which replaces it only once complete:
    a failure (a full disk) leaves the old export, or nothing, and never a mix of new config and old weights.

    Args:
        model: a vanilla tinygpt `GPT` (`InteropError` names any knob GPT-2 cannot express).
        directory: created if needed; loadable with `GPT2LMHeadModel.from_pretrained(directory)` and
            `AutoTokenizer.from_pretrained(directory)`.
        tokenizer: default `model.tokenizer`.
        overwrite: replace a non-empty `directory` (default: refuse, `OutputError`).
    Returns:
        The directory.
    """
    from tinygpt.checkpoint import OutputError
    from tinygpt.io import atomic_directory, check_output

    tok = tokenizer if tokenizer is not None else model.tokenizer
    if tok is None:
        raise InteropError("the model has no tokenizer attached; pass tokenizer= (or set model.tokenizer)")
    d = Path(directory)
    if d.exists() and not d.is_dir():
        raise InteropError(f"{d} exists and is not a directory; give a directory to write the model into")
    hint = "pass overwrite=True (--overwrite) to replace it"
    check_output(d, overwrite=overwrite, directory=True, error=OutputError, hint=hint)
    hf = to_hf(model)
    with atomic_directory(d) as tmp:
        try:
            hf.save_pretrained(str(tmp))
            hf_tokenizer(tok, n_ctx=model.cfg.n_ctx).save_pretrained(str(tmp))
        except OSError:
            raise
        except Exception as e:  # noqa: BLE001 - safetensors / transformers raise their own types (disk full)
            raise InteropError(f"cannot write the Hugging Face export {d}: {e}") from e
    return d


def _check_hf_dir(directory: str | os.PathLike) -> Path:
    d = Path(directory)
    if not d.is_dir():
        raise InteropError(f"{d} is not a directory; give a Hugging Face model directory (with config.json)")
    if not (d / "config.json").exists():
        raise InteropError(f"{d} has no config.json: it is not a Hugging Face model directory")
    return d


def import_hf(
    directory: str | os.PathLike,
    *,
    tokenizer: Any = None,
    dropout: float | None = None,
    device: str | None = None,
) -> GPT:
    """Load a local GPT-2-architecture Hugging Face directory (made by anyone) as a tinygpt `GPT`.

    Args:
        directory: holds config.json (model_type "gpt2"), the weights and, usually, tokenizer files.
        tokenizer: overrides the directory's tokenizer (anything `load_tokenizer` accepts).
        dropout: needed only when the config's three dropouts differ.
        device: where to put the model (default CPU).
    """
    T = _transformers()
    d = _check_hf_dir(directory)
    config = T.AutoConfig.from_pretrained(str(d), local_files_only=True)
    from_hf_config(config, dropout=dropout)  # fail before loading weights if the config cannot be expressed
    tok = load_tokenizer(tokenizer) if tokenizer is not None else tokenizer_from_hf_dir(d)
    try:
        hf = T.GPT2LMHeadModel.from_pretrained(str(d), config=config, local_files_only=True)
    except (OSError, RuntimeError, ValueError) as e:  # missing / truncated weights, shapes not config.json's
        first = " ".join(str(e).split())[:300]
        raise InteropError(
            f"{d} is not a consistent Hugging Face model directory: its weights do not load with its config.json "
            f"({type(e).__name__}: {first})"
        ) from None
    if hf.transformer.wte.weight.dtype == torch.float16:
        hf = hf.float()
    model = from_hf(hf, tok, dropout=dropout)
    model.source_path = str(d)
    return model.to(device) if device else model


def load_hf_causal_lm(directory: str | os.PathLike, *, device: str | None = None, **kwargs: Any):
    """Any local Hugging Face causal LM and its tokenizer, fully offline (`local_files_only=True`).

    Returns:
        (`AutoModelForCausalLM` in eval mode, `AutoTokenizer`); logits are `model(input_ids=ids).logits`.
    """
    T = _transformers()
    d = _check_hf_dir(directory)
    model = T.AutoModelForCausalLM.from_pretrained(str(d), local_files_only=True, **kwargs)
    tok = T.AutoTokenizer.from_pretrained(str(d), local_files_only=True)
    if device:
        model.to(device)
    return model.eval(), tok


def transformer_bridge(
    model_or_dir: GPT | str | os.PathLike, directory: str | os.PathLike | None = None, *, device: str = "cpu"
):
    """A TransformerLens `TransformerBridge` booted offline over an exported model (or any HF directory).

    Args:
        model_or_dir: a tinygpt `GPT` (exported first) or a Hugging Face directory.
        directory: where to export a `GPT` (default: a new temporary directory, kept for the bridge's lifetime).
    """
    from tinygpt.model import GPT

    T = _transformers()
    if isinstance(model_or_dir, GPT):
        directory = directory or tempfile.mkdtemp(prefix="tinygpt-hf-")
        export_hf(model_or_dir, directory, overwrite=True)
    else:
        directory = model_or_dir
    d = _check_hf_dir(directory)
    from transformer_lens.model_bridge import TransformerBridge

    hf = T.AutoModelForCausalLM.from_pretrained(str(d), local_files_only=True)  # fresh: the bridge edits it
    tok = T.AutoTokenizer.from_pretrained(str(d), local_files_only=True, add_bos_token=True)
    return TransformerBridge.boot_transformers(str(d), hf_model=hf, tokenizer=tok, device=device)
