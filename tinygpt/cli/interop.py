"""`tinygpt export` and `tinygpt import`: Hugging Face checkpoint directories to and from `.tinygpt` files.

    tinygpt export model.tinygpt --hf out-dir/        # config.json + model.safetensors + tokenizer files
    tinygpt export model.tinygpt --hf out-dir/ --architecture mistral
    tinygpt import hf-dir/ --out model.tinygpt        # gpt2, llama, qwen2, mistral, gpt_neox, mixtral, qwen2_moe
    tinygpt import hf-dir/ --out model.tinygpt --float32 --n-ctx 4096

Both run offline; see `tinygpt.interop.hf` for the weight mappings and what each architecture cannot express.
"""

from __future__ import annotations

import argparse

from tinygpt.cli._command import command, out_file
from tinygpt.cli._flags import add

_ARCHS = ("gpt2", "llama", "qwen2", "mistral", "gpt_neox", "mixtral", "qwen2_moe")  # = interop.hf.ARCHITECTURES


def _export_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", help="input .tinygpt")
    p.add_argument("--hf", required=True, metavar="DIR", help="output directory (weights, config, tokenizer)")
    p.add_argument(
        "--architecture",
        choices=_ARCHS,
        default=None,
        help="HF model_type to write (default: the one the model's knobs describe, e.g. gpt2 or llama)",
    )
    add(p, "--overwrite", help="replace an existing export in DIR (swapped in once the new one is complete)")


@command("export", "write a .tinygpt model as a Hugging Face checkpoint directory", flags=_export_flags)
def cmd_export(a: argparse.Namespace) -> int:
    from tinygpt.checkpoint import load
    from tinygpt.interop.hf import export_hf

    model = load(a.file)
    d = export_hf(model, a.hf, overwrite=a.overwrite, architecture=a.architecture)
    files = ", ".join(sorted(f.name for f in d.iterdir() if f.is_file()))
    print(f"exported {a.file} ({model.n_params():,} parameters) to {d}: {files}")
    return 0


def _import_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("directory", help="Hugging Face model directory (config.json, safetensors weights, tokenizer)")
    add(p, "--out", help="output .tinygpt")
    add(p, "--overwrite")
    add(p, "--tokenizer", help="override the directory's tokenizer ('byte' or a path)")
    add(p, "--dropout", help="GPT-2 only: needed if the config's dropouts differ")
    p.add_argument("--float32", action="store_true", help="import bfloat16 weights as float32 (default: keep bf16)")
    p.add_argument(
        "--n-ctx",
        type=int,
        default=None,
        metavar="N",
        help="context length (default: max_position_embeddings); at most a sliding window, which then never binds",
    )


@command("import", "convert a local Hugging Face checkpoint directory to .tinygpt", flags=_import_flags)
def cmd_import(a: argparse.Namespace) -> int:
    from tinygpt.checkpoint import save
    from tinygpt.interop.hf import import_hf

    out = out_file(a.out)
    dtype = "float32" if a.float32 else None
    model = import_hf(a.directory, tokenizer=a.tokenizer, dropout=a.dropout, dtype=dtype, n_ctx=a.n_ctx)
    save(model, out)
    c = model.cfg
    kv = getattr(c, "n_key_value_heads", None)
    heads = f"{c.n_heads} heads" + (f" ({kv} KV)" if kv and kv != c.n_heads else "")
    if c.moe_experts:
        heads += f", {c.moe_experts} experts (top {c.moe_topk}, {c.moe_style})"
    print(
        f"imported {a.directory} ({model.hf_architecture}): {c.n_layers} layers, d_model {c.d_model}, {heads}, "
        f"vocab {c.d_vocab}, n_ctx {c.n_ctx}, {c.dtype}, {model.n_params():,} parameters, tokenizer "
        f"{model.tokenizer.kind}; saved {out}"
    )
    return 0
