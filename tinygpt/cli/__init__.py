"""The `tinygpt` command line: a thin layer over the library functions.

    tinygpt train --preset tiny --steps 300 --out tiny.tinygpt
    tinygpt sample tiny.tinygpt --prompt "ROMEO:" --tokens 200 --temperature 0.8 --seed 1
    tinygpt inspect tiny.tinygpt
    tinygpt tokenizer --corpus FILE --vocab-size 4096 --out tok/
    tinygpt laser tiny.tinygpt --target mlp.fc_out --layers 2-3 --rank-fraction 0.2 --out tiny-laser.tinygpt
    tinygpt hqq tiny.tinygpt --bits 4 --group-size 64 --packed --out tiny-4bit.tinygpt
    tinygpt tuned-lens tiny.tinygpt --steps 300 --lr 1e-3 --out tiny.lenses
    tinygpt export tiny.tinygpt --hf tiny-hf/
    tinygpt import gpt2-dir/ --out gpt2.tinygpt
    tinygpt distill nano --teacher tiny.tinygpt --steps 200 --temperature 4 --alpha 0.7 --out nano-kd.tinygpt
    tinygpt eval tiny.tinygpt --corpus heldout.txt
    tinygpt leaderboard runs/ --corpus heldout.txt --out report.md
    tinygpt lora tiny.tinygpt --corpus FILE --targets mlp.fc_in,attn.q_proj --rank 8 --alpha 16 --steps 300 --out a.lora
    tinygpt sft tiny.tinygpt --data data/sft_small.jsonl --template chatml --steps 300 --out chat.tinygpt
    tinygpt magpie chat.tinygpt --count 500 --template chatml --temperature 0.9 --out magpie.jsonl
    tinygpt es tiny.tinygpt --corpus FILE --steps 50 --population 40 --sigma 0.02 --lr 0.01 --out tiny-es.tinygpt

`python -m tinygpt` is the same command. Nothing here reads `sys.argv` at import time.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from tinygpt.cli import distill as distill_cli
from tinygpt.cli import es as es_cli
from tinygpt.cli import eval as evaluate_cli
from tinygpt.cli import interop as interop_cli
from tinygpt.cli import interp as interp_cli
from tinygpt.cli import lora as lora_cli
from tinygpt.cli import sft as sft_cli
from tinygpt.cli import surgery as surgery_cli
from tinygpt.config import PRESETS


def _train_parser(sub) -> None:
    p = sub.add_parser("train", help="train a model (built-in Shakespeare and bytes by default)")
    p.add_argument("--preset", default="tiny", choices=list(PRESETS), help="model size (default tiny)")
    p.add_argument("--tokenizer", default=None, help="'byte' (default) or a tokenizer.json / HF tokenizer directory")
    p.add_argument("--corpus", default=None, help="text file, directory or .jsonl (default: built-in Shakespeare)")
    p.add_argument("--text-field", default="text", help="JSONL field holding the text")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="autocast dtype")
    p.add_argument("--batch", type=int, default=8, help="sequences per micro-batch")
    p.add_argument("--accum", type=int, default=1, help="gradient accumulation steps")
    p.add_argument("--ctx", type=int, default=None, help="sequence length (default: the preset's n_ctx)")
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--lr-schedule", default="cosine", choices=["cosine", "constant"])
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--max-lr", type=float, default=6e-4)
    p.add_argument("--min-lr", type=float, default=None, help="default: max-lr / 10")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--grad-clip", type=float, default=1.0, help="0 disables")
    p.add_argument("--save-every", type=int, default=0)
    p.add_argument("--val-split", type=float, default=0.01)
    p.add_argument("--val-every", type=int, default=100)
    p.add_argument("--sample-every", type=int, default=0)
    p.add_argument("--sample-prompt", default="\n")
    p.add_argument("--resume", action="store_true", help="continue the run saved in --out")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--device", default=None, help="cuda, mps or cpu (default: best available)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--out", default=None, help="checkpoint path (default: PRESET.tinygpt)")
    p.add_argument(
        "--strategy", default="ddp", choices=["ddp", "fsdp"], help="under torchrun: data parallel or fully sharded"
    )
    arch = p.add_argument_group("architecture (GPTConfig knobs of a new model)")
    arch.add_argument("--attn-impl", default=None, help="auto, eager, sdpa, triton (our kernel; CUDA) or mps (Apple)")
    arch.add_argument("--tie-embeddings", action="store_true")
    arch.add_argument("--dropout", type=float, default=None)
    arch.add_argument("--diff-attn", action="store_true", help="differential attention (Ye et al. 2024)")
    arch.add_argument("--mod", action="store_true", help="mixture-of-depths routing (Raposo et al. 2024)")
    arch.add_argument("--mod-capacity", type=float, default=None, help="fraction of tokens a routed block takes")
    arch.add_argument("--mod-every", type=int, default=None, help="route every N-th block (default 2)")
    arch.add_argument("--moe-experts", type=int, default=None, help="mixture-of-experts: experts per layer")
    arch.add_argument("--moe-topk", type=int, default=None, help="experts per token")
    arch.add_argument("--yoco", action="store_true", help="you-only-cache-once decoder (Sun et al. 2024)")
    arch.add_argument("--yoco-window", type=int, default=None, help="sliding window of the self-decoder")
    p.add_argument("--no-progress", action="store_true")


def _cmd_train(a: argparse.Namespace) -> int:
    from tinygpt.training.loop import train

    out = a.out or f"{a.preset}.tinygpt"
    settings = dict(
        steps=a.steps,
        batch_size=a.batch,
        accum=a.accum,
        ctx=a.ctx,
        max_lr=a.max_lr,
        min_lr=a.min_lr,
        lr_schedule=a.lr_schedule,
        warmup=a.warmup,
        weight_decay=a.weight_decay,
        grad_clip=a.grad_clip,
        dtype=a.dtype,
        val_split=a.val_split,
        val_every=a.val_every,
        save_every=a.save_every,
        sample_every=a.sample_every,
        sample_prompt=a.sample_prompt,
        seed=a.seed,
    )
    if a.resume:  # only what was given explicitly overrides the saved run
        defaults = vars(build_parser().parse_args(["train"]))
        flag = {"batch_size": "batch"}
        settings = {k: v for k, v in settings.items() if getattr(a, flag.get(k, k)) != defaults[flag.get(k, k)]}
    res = train(
        corpus=distill_cli.corpus_arg(a),
        tokenizer=a.tokenizer,
        preset=a.preset,
        model_config=_model_config(a),
        out=out,
        resume=a.resume,
        device=a.device,
        progress=not a.no_progress,
        strategy=a.strategy,
        **settings,
    )
    return distill_cli.report(res, ("loss",), (f"saved {res.path}",))  # under torchrun, rank 0 reports


_ARCH_FLAGS = (
    "attn_impl",
    "tie_embeddings",
    "dropout",
    "diff_attn",
    "mod",
    "mod_capacity",
    "mod_every",
    "moe_experts",
    "moe_topk",
    "yoco",
    "yoco_window",
)


def _model_config(a: argparse.Namespace) -> dict:
    """GPTConfig overrides from the architecture flags that were given."""
    out = {}
    for k in _ARCH_FLAGS:
        v = getattr(a, k)
        if v is not None and v is not False:
            out[k] = v
    if out and a.resume:
        raise ValueError(f"architecture flags ({', '.join(sorted(out))}) cannot change a run being resumed")
    return out


def _sample_parser(sub) -> None:
    p = sub.add_parser("sample", help="generate text from a .tinygpt file")
    p.add_argument("file")
    p.add_argument("--prompt", default="\n")
    p.add_argument("--tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--no-cache", action="store_true", help="recompute the whole context every token")
    p.add_argument("--device", default=None)


def _cmd_sample(a: argparse.Namespace) -> int:
    from tinygpt.checkpoint import load
    from tinygpt.sampling import stream

    model = load(a.file, device=a.device)
    for i in range(a.num_samples):
        seed = None if a.seed is None else a.seed + i
        sys.stdout.write(a.prompt)
        for piece in stream(
            model,
            a.prompt,
            a.tokens,
            temperature=a.temperature,
            top_k=a.top_k,
            top_p=a.top_p,
            seed=seed,
            use_cache=not a.no_cache,
        ):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n" if a.num_samples == 1 else "\n---\n")
    return 0


def _cmd_inspect(a: argparse.Namespace) -> int:
    from tinygpt.checkpoint import describe

    print(describe(a.file))
    return 0


def _cmd_tokenizer(a: argparse.Namespace) -> int:
    from tinygpt.tokenizer import train_bpe

    tok = train_bpe(a.corpus, a.vocab_size, out=a.out, progress=not a.no_progress)
    print(f"trained BPE tokenizer, vocab {tok.vocab_size}, saved {tok.source}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tinygpt", description="Train, sample and inspect tiny GPTs.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _train_parser(sub)
    _sample_parser(sub)
    p = sub.add_parser("inspect", help="print config, tokenizer and every tensor of a .tinygpt file")
    p.add_argument("file")
    p = sub.add_parser("tokenizer", help="train a byte-level BPE tokenizer on a corpus")
    p.add_argument("--corpus", default=None, help="default: built-in Shakespeare")
    p.add_argument("--vocab-size", type=int, required=True)
    p.add_argument("--out", required=True, help="directory to write tokenizer.json into")
    p.add_argument("--no-progress", action="store_true")
    surgery_cli.add_parsers(sub)  # laser, hqq
    interp_cli.add_parsers(sub)  # tuned-lens
    interop_cli.add_parsers(sub)  # export, import (Hugging Face)
    distill_cli.add_parsers(sub)  # distill
    evaluate_cli.add_parsers(sub)  # eval, leaderboard, memorization
    lora_cli.add_parsers(sub)  # lora, lora-merge
    sft_cli.add_parsers(sub)  # sft, finetune, magpie
    es_cli.add_parsers(sub)  # es (evolution strategies)
    return parser


COMMANDS = {
    "train": _cmd_train,
    "sample": _cmd_sample,
    "inspect": _cmd_inspect,
    "tokenizer": _cmd_tokenizer,
    **surgery_cli.COMMANDS,
    **interp_cli.COMMANDS,
    **interop_cli.COMMANDS,
    **distill_cli.COMMANDS,
    **evaluate_cli.COMMANDS,
    **lora_cli.COMMANDS,
    **sft_cli.COMMANDS,
    **es_cli.COMMANDS,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `tinygpt` console script and `python -m tinygpt`."""
    args = build_parser().parse_args(argv)
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)
    from tinygpt.errors import USER_ERRORS
    from tinygpt.training.distributed import record_error  # under torchrun: the rank's error in its failure summary

    try:
        return COMMANDS[args.command](args)
    except USER_ERRORS as e:
        record_error(e)
        print(f"tinygpt {args.command}: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        record_error(e)
        raise
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
