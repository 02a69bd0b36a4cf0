"""`tinygpt export` and `tinygpt import`: Hugging Face GPT-2 directories to and from `.tinygpt` files.

    tinygpt export model.tinygpt --hf gpt2-dir/      # GPT2LMHeadModel + config + tokenizer files
    tinygpt import gpt2-dir/ --out model.tinygpt     # any local GPT-2-architecture checkpoint

Both run offline; see `tinygpt.interop.hf` for the weight mapping and what GPT-2 cannot express.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parsers(sub) -> None:
    """Register the `export` and `import` subcommands on an argparse subparsers object."""
    p = sub.add_parser("export", help="write a .tinygpt model as a Hugging Face GPT2LMHeadModel directory")
    p.add_argument("file", help="input .tinygpt")
    p.add_argument("--hf", required=True, metavar="DIR", help="output directory (weights, config, tokenizer)")

    p = sub.add_parser("import", help="convert a local Hugging Face GPT-2-architecture directory to .tinygpt")
    p.add_argument("directory", help="Hugging Face model directory (config.json, weights, tokenizer files)")
    p.add_argument("--out", required=True, help="output .tinygpt")
    p.add_argument("--tokenizer", default=None, help="override the directory's tokenizer ('byte' or a path)")
    p.add_argument("--dropout", type=float, default=None, help="needed only if the config's dropouts differ")


def cmd_export(a: argparse.Namespace) -> int:
    from tinygpt.checkpoint import load
    from tinygpt.interop.hf import export_hf

    model = load(a.file)
    d = export_hf(model, a.hf)
    files = ", ".join(sorted(f.name for f in d.iterdir() if f.is_file()))
    print(f"exported {a.file} ({model.n_params():,} parameters) to {d}: {files}")
    return 0


def cmd_import(a: argparse.Namespace) -> int:
    from tinygpt.checkpoint import save
    from tinygpt.interop.hf import import_hf

    out = Path(a.out)
    if out.is_dir():
        raise ValueError(f"--out {out} is a directory; give a file path such as {out / 'model.tinygpt'}")
    model = import_hf(a.directory, tokenizer=a.tokenizer, dropout=a.dropout)
    save(model, out)
    c = model.cfg
    print(
        f"imported {a.directory}: {c.n_layers} layers, d_model {c.d_model}, {c.n_heads} heads, vocab {c.d_vocab}, "
        f"n_ctx {c.n_ctx}, {model.n_params():,} parameters, tokenizer {model.tokenizer.kind}; saved {out}"
    )
    return 0


COMMANDS = {"export": cmd_export, "import": cmd_import}
