"""`tinygpt lora` and `tinygpt lora-merge`: LoRA fine-tuning of a .tinygpt model, and folding adapters in.

    tinygpt lora tiny.tinygpt --corpus sonnets.txt --targets mlp.fc_in,attn.q_proj --rank 8 --alpha 16 \\
        --steps 300 --out tiny-sonnets.lora [--merge-out tiny-sonnets.tinygpt]
    tinygpt lora tiny.tinygpt --corpus sonnets.txt --steps 600 --out tiny-sonnets.lora --resume
    tinygpt lora-merge tiny.tinygpt tiny-sonnets.lora --out tiny-sonnets.tinygpt

The run's full checkpoint (for --resume) is kept beside the adapter as ADAPTER.run.tinygpt (--no-checkpoint:
none). Training options left out keep `lora_finetune`'s defaults (or, with --resume, the saved run's). Under
torchrun, lora runs data-parallel like `train` (--strategy ddp or fsdp); rank 0 alone writes the files.
"""

from __future__ import annotations

import argparse

from tinygpt.cli._command import command, report
from tinygpt.cli._flags import add, add_corpus_flags, add_run_flags, add_training_flags, corpus_arg, run_options


def _lora_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="the base .tinygpt file")
    add_corpus_flags(p)
    p.add_argument(
        "--targets",
        default="attn.q_proj,attn.v_proj",
        help="comma-separated: attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.fc_in, mlp.fc_out, "
        "mlp.gate_proj, mlp.up_proj, mlp.down_proj (or leaf names), groups mlp/attn/all/experts, or block-relative "
        "paths with * (default attn.q_proj,attn.v_proj)",
    )
    add(p, "--layers")
    p.add_argument("--rank", type=int, default=8)
    add(p, "--alpha", help="update scale numerator (default 2 x rank)")
    add(p, "--dropout", default=0.0, help="dropout on the adapters' input")
    add_training_flags(p, max_lr="1e-3", weight_decay="0")
    add_run_flags(p, out="the adapter file to write (.lora)", resume="continue the run kept in OUT.run.tinygpt")
    p.add_argument("--merge-out", default=None, help="also write the merged model as a plain .tinygpt")
    p.add_argument("--no-checkpoint", action="store_true", help="keep no run checkpoint (no --resume later)")


@command("lora", "fine-tune LoRA adapters on a .tinygpt model (base weights frozen)", flags=_lora_flags)
def cmd_lora(a: argparse.Namespace) -> int:
    from tinygpt.training import lora_finetune

    res = lora_finetune(
        a.model,
        corpus_arg(a),
        targets=a.targets,
        rank=a.rank,
        alpha=a.alpha,
        dropout=a.dropout,
        layers=a.layers,
        merge_out=a.merge_out,
        checkpoint=not a.no_checkpoint,
        **run_options(a),
    )
    extra = [f"{res.n_trainable:,} of {res.n_total:,} parameters trained in {len(res.modules)} modules"]
    extra.append(f"saved {res.adapter_path}")
    if res.merged_path:
        extra.append(f"merged {res.merged_path}")
    return report(getattr(res, "result", res), ("loss",), tuple(extra))


def _merge_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="the base .tinygpt file the adapter was trained on")
    p.add_argument("adapter", help="the adapter file (.lora)")
    add(p, "--out", help="the merged .tinygpt to write")
    add(p, "--overwrite")
    p.add_argument("--force", action="store_true", help="apply the adapter even if the base model does not match")


@command("lora-merge", "fold a LoRA adapter file into its base model (writes a .tinygpt)", flags=_merge_flags)
def cmd_lora_merge(a: argparse.Namespace) -> int:
    from tinygpt.checkpoint import load, save
    from tinygpt.training.lora import load_lora, merge_lora, read_lora

    model = load(a.model)
    f = read_lora(a.adapter)
    names = load_lora(model, f, check=not a.force)
    merge_lora(model)
    model.train_state = {"lora_merged": {"adapter": str(a.adapter), "base": f.base, "modules": f.modules}}
    path = save(model, a.out)
    print(f"merged {len(names)} adapters from {a.adapter} into {a.model}: saved {path}")
    return 0
