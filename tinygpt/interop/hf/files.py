"""Hugging Face directories in and out: `import_hf`, `export_hf` for every family, plus `load_hf_causal_lm` and
`transformer_bridge`.

Import (`import_hf(dir)`) reads config.json (through `transformers.AutoConfig`, so defaults and old spellings are
normalised), maps it with the family of its `model_type` (refusing, before any weight is read, whatever tinygpt
cannot express exactly), builds the tinygpt model with its parameters on the meta device (buffers are real),
allocates each parameter once and fills it from the checkpoint one tensor at a time (`shards.TensorSource`): peak
memory is the model plus one tensor. Every
parameter must be filled and every checkpoint tensor used (apart from buffers HF itself ignores), so a checkpoint
with, say, biases its config does not declare is refused rather than silently truncated.

Export (`export_hf(model, dir)`) picks the HF architecture (`architecture=`, else the one the model was imported
from, else the one its knobs describe: `infer_architecture`), checks that it expresses the model, and writes
config.json, the safetensors weights (sharded beyond 5 GB, with an index) and the tokenizer into a temporary
directory that replaces `dir` only once complete. A model imported from a directory whose tokenizer it still has
gets that directory's tokenizer files copied (its tokenizer_config.json keeps the chat template and BOS handling).
"""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from tinygpt.config import ConfigError, GPTConfig
from tinygpt.interop.hf import gpt2
from tinygpt.interop.hf.common import InteropError, check_hf_dir, dtype_name, transformers_module
from tinygpt.interop.hf.gpt_neox import GPT_NEOX
from tinygpt.interop.hf.llama import LLAMA
from tinygpt.interop.hf.moe import MOE
from tinygpt.interop.hf.shards import TensorSource, unused, write_safetensors
from tinygpt.interop.hf.spec import Family, Group
from tinygpt.tokenizer import Tokenizer, load_tokenizer

if TYPE_CHECKING:
    from tinygpt.model import GPT

__all__ = [
    "ARCHITECTURES",
    "config_from_hf",
    "export_hf",
    "hf_state_dict",
    "import_hf",
    "infer_architecture",
    "load_hf_causal_lm",
    "transformer_bridge",
]

FAMILIES: dict[str, Family] = {mt: fam for fam in (gpt2.GPT2, LLAMA, GPT_NEOX, MOE) for mt in fam.model_types}
ARCHITECTURES = tuple(FAMILIES)
"""The HF `model_type`s tinygpt imports and exports."""


def _family(model_type: str | None) -> Family:
    if model_type not in FAMILIES:
        raise InteropError(
            f"model_type {model_type!r} is not supported: tinygpt converts {', '.join(ARCHITECTURES)}; use "
            "tinygpt.interop.hf.load_hf_causal_lm(dir) to run another causal LM with transformers (as a teacher or "
            "for comparison)"
        )
    return FAMILIES[model_type]


def infer_architecture(cfg: GPTConfig) -> str:
    """The HF architecture a tinygpt config's knobs describe (GPT-2 for a vanilla model)."""
    if cfg.moe_experts and cfg.moe_style in ("mixtral", "qwen2_moe"):
        return cfg.moe_style
    if getattr(cfg, "positional_embedding_type", "standard") != "rotary":
        return "gpt2"
    if getattr(cfg, "normalization_type", "LN") == "LN" or getattr(cfg, "parallel_attn_mlp", False):
        return "gpt_neox"
    qkv = getattr(cfg, "qkv_bias", None)
    return "qwen2" if qkv and not getattr(cfg, "bias", True) else "llama"


def config_from_hf(
    c: Any, *, dtype: str = "float32", n_ctx: int | None = None, tied: bool | None = None, dropout: float | None = None
):
    """The `GPTConfig` of any supported HF config object; `InteropError` names what cannot be expressed exactly."""
    fields = _family(getattr(c, "model_type", None)).config_fields(c, n_ctx=n_ctx, dropout=dropout)
    if tied is not None:
        fields["tie_embeddings"] = tied
    try:
        return GPTConfig.from_dict({**fields, "dtype": dtype})
    except ConfigError as e:
        raise InteropError(f"this {c.model_type} config maps to no valid tinygpt config: {e}") from None


# ----------------------------------------------------------------------------------------------- weights
def _plan(model: GPT, fam: Family, model_type: str, available: set[str] | None) -> tuple[list[Group], dict[str, str]]:
    """(fused groups, one-to-one ours -> theirs names) covering every parameter of `model`; `InteropError` names a
    parameter no rule covers (weight surgery, or a knob the family lacks)."""
    names = [n for n, _ in model.named_parameters()]  # a tied unembedding appears once, as embed.weight
    groups = [g for g in fam.groups(model.cfg, model_type, available) if set(g.ours) <= set(names)]
    grouped = {n for g in groups for n in g.ours}
    single, orphans = {}, []
    for n in names:
        if n in grouped:
            continue
        theirs = fam.rename(n, model_type)
        if theirs is None:
            orphans.append(n)
        else:
            single[n] = theirs
    if orphans:
        raise InteropError(
            f"{model_type} has no place for tensor(s) {orphans[:5]}: the model's structure is not the architecture's "
            "(weight surgery such as LASER / HQQ / LoRA, or a knob it lacks); export the plain model"
        )
    return groups, single


def hf_state_dict(model: GPT, architecture: str | None = None) -> dict[str, Tensor]:
    """A tinygpt model's weights under the checkpoint names and layouts of an HF architecture (no lm_head when
    tied)."""
    arch = architecture or infer_architecture(model.cfg)
    fam = _family(arch)
    fam.check(model.cfg, arch)
    params = dict(model.named_parameters())
    groups, single = _plan(model, fam, arch, None)
    out = {theirs: params[ours].detach() for ours, theirs in single.items()}
    for g in groups:
        out.update(zip(g.theirs, g.merge([params[n].detach() for n in g.ours]), strict=True))
    return out


def _resolve(src: TensorSource, name: str, prefix: str) -> str | None:
    if name in src:
        return name
    if prefix and name.startswith(prefix) and name[len(prefix) :] in src:  # saved from the base model class
        return name[len(prefix) :]
    return None


def _load_weights(model: GPT, src: TensorSource, fam: Family, model_type: str) -> None:
    params = dict(model.named_parameters())
    available = src.names()
    groups, single = _plan(model, fam, model_type, available)
    used: set[str] = set()

    def read(theirs: str, ours: str) -> Tensor:
        name = _resolve(src, theirs, fam.prefix)
        if name is None:
            raise InteropError(
                f"{src.directory} is not a consistent Hugging Face model directory: it lacks tensor {theirs!r} (for "
                f"tinygpt's {ours}), which its config.json implies"
            )
        used.add(name)
        return src.get(name)

    def put(ours: str, t: Tensor, theirs: str) -> None:
        p = params[ours]
        if p.shape != t.shape:
            raise InteropError(
                f"{src.directory} is not a consistent Hugging Face model directory: its weights do not match its "
                f"config.json (shape mismatch at {theirs}: checkpoint {tuple(t.shape)}, config {tuple(p.shape)})"
            )
        with torch.no_grad():
            p.copy_(t)

    for ours, theirs in single.items():
        put(ours, read(theirs, ours), theirs)
    for g in groups:
        ts = [read(n, g.ours[0]) for n in g.theirs]
        for ours, t in zip(g.ours, g.split(ts), strict=True):
            put(ours, t, g.theirs[0])
    head = _resolve(src, "lm_head.weight", "") or _resolve(src, "embed_out.weight", "")
    if model.cfg.tie_embeddings and head is not None and head not in used:
        embed = params["embed.weight"]
        if not torch.equal(src.get(head).to(embed.dtype), embed.detach()):
            raise InteropError(
                f"tie_word_embeddings=True but {src.directory} holds a separate {head} that differs from the input "
                "embedding: the config and the weights disagree about tying"
            )
        used.add(head)
    if extra := unused(available, used, fam.ignorable):
        raise InteropError(
            f"{src.directory} holds tensor(s) {extra[:5]} that this {model_type} config does not use (e.g. biases "
            "or layers its config.json does not declare); nothing is imported approximately"
        )


@contextmanager
def _parameters_on_meta():
    """Every parameter registered inside lands on the meta device (allocated, then freed, one at a time); buffers
    and plain tensors stay real, so every module keeps the non-learned state its __init__ gives it."""
    register = nn.Module.register_parameter

    def on_meta(self, name, param):
        register(self, name, param)
        if param is not None and param.device.type != "meta":
            self._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def _empty_model(cfg: GPTConfig, tokenizer: Tokenizer | None) -> GPT:
    """A GPT whose parameters are allocated (once, uninitialised) but never randomly initialised."""
    from tinygpt.model import GPT

    with _parameters_on_meta():
        model = GPT(cfg, tokenizer=tokenizer)
    owners: dict[int, list[tuple[nn.Module, str]]] = {}  # shared parameters (a tied unembedding) stay shared
    for module in model.modules():
        for name, p in module._parameters.items():
            if p is not None:
                owners.setdefault(id(p), []).append((module, name))
    for refs in owners.values():
        p = refs[0][0]._parameters[refs[0][1]]
        real = nn.Parameter(torch.empty_like(p, device="cpu"), requires_grad=p.requires_grad)
        for module, name in refs:
            module._parameters[name] = real
    return model


def _import_family(
    d: Path, config: Any, tok: Tokenizer | None, dtype: Any, n_ctx: int | None, dropout: float | None
) -> GPT:
    fam = _family(config.model_type)
    fields = fam.config_fields(config, n_ctx=n_ctx, dropout=dropout)  # refusals happen here, before weights
    with TensorSource(d) as src:
        found = src.float_dtype()
        fields["dtype"] = dtype_name(dtype, found)
        has_head = any(_resolve(src, n, "") for n in ("lm_head.weight", "embed_out.weight"))
        if not fields["tie_embeddings"] and not has_head:
            raise InteropError(
                f"tie_word_embeddings=False but {d} has no output embedding (lm_head.weight): the config and the "
                "weights disagree about tying"
            )
        try:
            cfg = GPTConfig.from_dict(fields)
        except ConfigError as e:
            raise InteropError(f"this {config.model_type} config maps to no valid tinygpt config: {e}") from None
        if tok is not None and tok.vocab_size > cfg.d_vocab:
            raise InteropError(f"the tokenizer has {tok.vocab_size} tokens but the model only {cfg.d_vocab}")
        model = _empty_model(cfg, tok)
        _load_weights(model, src, fam, config.model_type)
    return model


def import_hf(
    directory: str | os.PathLike,
    *,
    tokenizer: Any = None,
    dropout: float | None = None,
    device: str | None = None,
    dtype: str | torch.dtype | None = None,
    n_ctx: int | None = None,
) -> GPT:
    """Load a local Hugging Face checkpoint directory (made by anyone) as a tinygpt `GPT`, exactly.

    Args:
        directory: holds config.json (`model_type` one of `ARCHITECTURES`), the safetensors weights
            (`model.safetensors`, or shards with `model.safetensors.index.json`) and, usually, tokenizer files.
        tokenizer: overrides the directory's tokenizer (anything `load_tokenizer` accepts).
        dropout: GPT-2 only: needed when the config's three dropouts differ.
        device: where to put the model (default CPU).
        dtype: "float32" or "bfloat16" (default: the checkpoint's; fp16 is upcast to fp32).
        n_ctx: the context length (default `max_position_embeddings`); at most a sliding window that would
            otherwise be refused.

    Returns:
        The model in eval mode, with `source_path` and `hf_architecture` (what `export_hf` writes back) set.
    """
    from tinygpt.interop import hf as pkg  # looked up on the package: tests substitute its functions

    T = transformers_module()
    d = check_hf_dir(directory)
    try:
        config = T.AutoConfig.from_pretrained(str(d), local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise InteropError(f"{d}/config.json is not a config transformers can read: {e}") from None
    mt = getattr(config, "model_type", None)
    _family(mt).config_fields(config, n_ctx=n_ctx, dropout=dropout)  # fail before reading the tokenizer
    tok = load_tokenizer(tokenizer) if tokenizer is not None else pkg.tokenizer_from_hf_dir(d)
    model = _import_family(d, config, tok, dtype, n_ctx, dropout)
    model.source_path = str(d)
    model.hf_architecture = mt
    model.eval()
    return model.to(device) if device else model


def export_hf(
    model: GPT,
    directory: str | os.PathLike,
    *,
    tokenizer: Tokenizer | None = None,
    overwrite: bool = False,
    architecture: str | None = None,
) -> Path:
    """Write a model as a Hugging Face checkpoint directory (config.json, safetensors weights, tokenizer files).

    The files are written into a temporary directory beside `directory`, which replaces it only once complete:
    a failure (a full disk) leaves the old export, or nothing, and never a mix of new config and old weights.

    Args:
        model: a tinygpt `GPT` of an architecture in `ARCHITECTURES` (`InteropError` names any knob it lacks).
        directory: created if needed; loadable with `AutoModelForCausalLM.from_pretrained(directory)` and
            `AutoTokenizer.from_pretrained(directory)`.
        tokenizer: default `model.tokenizer`.
        overwrite: replace a non-empty `directory` (default: refuse, `OutputError`).
        architecture: the HF `model_type` to write (default: the one the model was imported from, else
            `infer_architecture(model.cfg)`), e.g. "mistral" for a Llama-style model.
    Returns:
        The directory.
    """
    from tinygpt.checkpoint import OutputError
    from tinygpt.interop import hf as pkg  # looked up on the package: tests substitute its functions
    from tinygpt.io import atomic_directory, check_output

    tok = tokenizer if tokenizer is not None else model.tokenizer
    if tok is None:
        raise InteropError("the model has no tokenizer attached; pass tokenizer= (or set model.tokenizer)")
    arch = architecture or getattr(model, "hf_architecture", None) or infer_architecture(model.cfg)
    if arch not in ARCHITECTURES:
        raise InteropError(f"architecture={arch!r} is not one tinygpt exports ({', '.join(ARCHITECTURES)})")
    d = Path(directory)
    if d.exists() and not d.is_dir():
        raise InteropError(f"{d} exists and is not a directory; give a directory to write the model into")
    hint = "pass overwrite=True (--overwrite) to replace it"
    check_output(d, overwrite=overwrite, directory=True, error=OutputError, hint=hint)
    tensors = hf_state_dict(model, arch)  # checks the model before anything is written
    config = FAMILIES[arch].hf_config(model.cfg, tok, arch)
    with atomic_directory(d) as tmp:
        try:
            write_safetensors(tensors, tmp)
            config.save_pretrained(str(tmp))
            if not _copy_source_tokenizer(model, tok, tmp):
                pkg.hf_tokenizer(tok, n_ctx=model.cfg.n_ctx).save_pretrained(str(tmp))
        except OSError:
            raise
        except Exception as e:  # noqa: BLE001 - safetensors / transformers raise their own types (disk full)
            raise InteropError(f"cannot write the Hugging Face export {d}: {e}") from e
    return d


_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
)


def _copy_source_tokenizer(model: GPT, tok: Tokenizer, out: Path) -> bool:
    """Copy the tokenizer files of the directory `model` was imported from (keeping its tokenizer_config: chat
    template, BOS handling, ...) when `tok` is still that tokenizer; False (nothing copied) otherwise."""
    import shutil

    from tinygpt.interop import hf as pkg

    src = getattr(model, "source_path", None)
    if not src or not (Path(src) / "config.json").exists() or not (Path(src) / "tokenizer.json").exists():
        return False
    try:
        same = pkg.tokenizer_from_hf_dir(src).fingerprint == tok.fingerprint
    except InteropError:
        return False
    if not same:
        return False
    for name in _TOKENIZER_FILES:
        if (Path(src) / name).is_file():
            shutil.copy2(Path(src) / name, out / name)
    return True


def load_hf_causal_lm(directory: str | os.PathLike, *, device: str | None = None, **kwargs: Any):
    """Any local Hugging Face causal LM and its tokenizer, fully offline (`local_files_only=True`).

    Returns:
        (`AutoModelForCausalLM` in eval mode, `AutoTokenizer`); logits are `model(input_ids=ids).logits`.
    """
    T = transformers_module()
    d = check_hf_dir(directory)
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

    T = transformers_module()
    if isinstance(model_or_dir, GPT):
        directory = directory or tempfile.mkdtemp(prefix="tinygpt-hf-")
        export_hf(model_or_dir, directory, overwrite=True)
    else:
        directory = model_or_dir
    d = check_hf_dir(directory)
    from transformer_lens.model_bridge import TransformerBridge

    hf = T.AutoModelForCausalLM.from_pretrained(str(d), local_files_only=True)  # fresh: the bridge edits it
    tok = T.AutoTokenizer.from_pretrained(str(d), local_files_only=True, add_bos_token=True)
    return TransformerBridge.boot_transformers(str(d), hf_model=hf, tokenizer=tok, device=device)
