"""`tinygpt export` and `tinygpt import`: Hugging Face GPT-2 directories to and from `.tinygpt` files.

    tinygpt export model.tinygpt --hf gpt2-dir/      # GPT2LMHeadModel + config + tokenizer files
    tinygpt import gpt2-dir/ --out model.tinygpt     # any local GPT-2-architecture checkpoint

Both run offline; see `tinygpt.interop.hf` for the weight mapping and what GPT-2 cannot express.
"""

from __future__ import annotations

import argparse

from tinygpt.cli._command import command, out_file
from tinygpt.cli._flags import add


def _export_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", help="input .tinygpt")
    p.add_argument("--hf", required=True, metavar="DIR", help="output directory (weights, config, tokenizer)")
    add(p, "--overwrite", help="replace an existing export in DIR (swapped in once the new one is complete)")


@command("export", "write a .tinygpt model as a Hugging Face GPT2LMHeadModel directory", flags=_export_flags)
def cmd_export(a: argparse.Namespace) -> int:
    from tinygpt.checkpoint import load
    from tinygpt.interop.hf import export_hf

    model = load(a.file)
    d = export_hf(model, a.hf, overwrite=a.overwrite)
    files = ", ".join(sorted(f.name for f in d.iterdir() if f.is_file()))
    print(f"exported {a.file} ({model.n_params():,} parameters) to {d}: {files}")
    return 0


def _import_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("directory", help="Hugging Face model directory (config.json, weights, tokenizer files)")
    add(p, "--out", help="output .tinygpt")
    add(p, "--overwrite")
    add(p, "--tokenizer", help="override the directory's tokenizer ('byte' or a path)")
    add(p, "--dropout", help="needed only if the config's dropouts differ")


@command("import", "convert a local Hugging Face GPT-2-architecture directory to .tinygpt", flags=_import_flags)
def cmd_import(a: argparse.Namespace) -> int:
    from tinygpt.checkpoint import save
    from tinygpt.interop.hf import import_hf

    out = out_file(a.out)
    model = import_hf(a.directory, tokenizer=a.tokenizer, dropout=a.dropout)
    save(model, out)
    c = model.cfg
    print(
        f"imported {a.directory}: {c.n_layers} layers, d_model {c.d_model}, {c.n_heads} heads, vocab {c.d_vocab}, "
        f"n_ctx {c.n_ctx}, {model.n_params():,} parameters, tokenizer {model.tokenizer.kind}; saved {out}"
    )
    return 0
