"""`tinygpt distill`: knowledge distillation from a .tinygpt or Hugging Face teacher into a student.

    tinygpt distill nano --teacher tiny.tinygpt --steps 200 --temperature 4 --alpha 0.7 --out nano-kd.tinygpt
    tinygpt distill student.tinygpt --teacher hf-dir/ --corpus FILE --tokenizer hf-dir/ --out student-kd.tinygpt
    tinygpt distill nano --out nano-kd.tinygpt --steps 400 --resume      # continue (teacher from the file)

STUDENT is an existing .tinygpt file, or a preset name (nano, tiny, ...) for a fresh student with the
teacher's tokenizer. Options left out keep `TrainConfig`'s defaults (or, with --resume, the saved run's).

This module also holds what the other fine-tuning commands (`lora`, `sft`, `finetune`) share with it: the
training flags (`add_training_flags`, `add_run_flags`, `run_options`), `--corpus`/`--text-field`
(`corpus_arg`) and the rank-0 final line (`report`).
"""

from __future__ import annotations

import argparse

# flag -> TrainConfig field, for the training options the fine-tuning commands (distill, lora, sft, finetune)
# share with `train`; `add_training_flags` declares them, `training_settings` reads them back
_TRAIN_FLAGS = {
    "batch": "batch_size",
    "accum": "accum",
    "ctx": "ctx",
    "steps": "steps",
    "lr_schedule": "lr_schedule",
    "warmup": "warmup",
    "max_lr": "max_lr",
    "min_lr": "min_lr",
    "weight_decay": "weight_decay",
    "grad_clip": "grad_clip",
    "dtype": "dtype",
    "save_every": "save_every",
    "val_split": "val_split",
    "val_every": "val_every",
    "sample_every": "sample_every",
    "sample_prompt": "sample_prompt",
    "seed": "seed",
}


def add_training_flags(
    p: argparse.ArgumentParser,
    *,
    ctx: str = "the model's n_ctx",
    steps: str = "500",
    max_lr: str | None = None,
    weight_decay: str | None = None,
) -> None:
    """Declare the `_TRAIN_FLAGS` options on a subcommand's parser.

    Every one defaults to None, so that only the flags given reach the training function (its own defaults,
    or with --resume the saved run's, stand for the rest). The keyword arguments are the defaults to name in
    the help text where the command's differ from `TrainConfig`'s.
    """
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"], help="autocast dtype")
    p.add_argument("--batch", type=int, default=None, help="sequences per micro-batch (default 8)")
    p.add_argument("--accum", type=int, default=None, help="gradient accumulation steps")
    p.add_argument("--ctx", type=int, default=None, help=f"sequence length (default: {ctx})")
    p.add_argument("--steps", type=int, default=None, help=f"optimizer steps (default {steps})")
    p.add_argument("--lr-schedule", default=None, choices=["cosine", "constant"])
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--max-lr", type=float, default=None, help=max_lr and f"peak learning rate (default {max_lr})")
    p.add_argument("--min-lr", type=float, default=None)
    p.add_argument("--weight-decay", type=float, default=None, help=weight_decay and f"default {weight_decay}")
    p.add_argument("--grad-clip", type=float, default=None)
    p.add_argument("--save-every", type=int, default=None)
    p.add_argument("--val-split", type=float, default=None)
    p.add_argument("--val-every", type=int, default=None)
    p.add_argument("--sample-every", type=int, default=None)
    p.add_argument("--sample-prompt", default=None)
    p.add_argument("--seed", type=int, default=None)


def add_run_flags(p: argparse.ArgumentParser, *, out: str, resume: str = "continue the run saved in --out") -> None:
    """Declare the options of a training run besides its settings: --out (required), --resume, --device,
    --strategy, --threads and --no-progress."""
    p.add_argument("--out", required=True, help=out)
    p.add_argument("--resume", action="store_true", help=resume)
    p.add_argument("--device", default=None, help="cuda, mps or cpu (default: best available)")
    p.add_argument(
        "--strategy", default="ddp", choices=["ddp", "fsdp"], help="under torchrun: data parallel or fully sharded"
    )
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--no-progress", action="store_true")


def add_parsers(sub) -> None:
    """Register the `distill` subcommand on an argparse subparsers object."""
    p = sub.add_parser("distill", help="distil a teacher (.tinygpt or Hugging Face directory) into a student")
    p.add_argument("student", help="a .tinygpt file, or a preset name (nano, tiny, ...) for a fresh student")
    p.add_argument("--teacher", default=None, help=".tinygpt file or Hugging Face causal-LM directory")
    p.add_argument("--corpus", default=None, help="text file, directory or .jsonl (default: built-in Shakespeare)")
    p.add_argument("--text-field", default="text", help="JSONL field holding the text")
    p.add_argument("--tokenizer", default=None, help="optional; checked against the teacher's tokenizer")
    p.add_argument("--temperature", type=float, default=None, help="softmax temperature T (default 2)")
    p.add_argument("--alpha", type=float, default=None, help="weight of the KL term; 1-alpha weighs NLL (default 0.5)")
    p.add_argument("--reverse-kl", action="store_true", default=None, help="KL(student || teacher) (MiniLLM)")
    p.add_argument("--on-policy", type=float, default=None, help="fraction of student-generated batches (GKD)")
    add_training_flags(p, ctx="the shorter model context")
    add_run_flags(p, out="student checkpoint to write (.tinygpt)", resume="continue the distillation saved in --out")


def corpus_arg(a: argparse.Namespace):
    """`--corpus` as given, or a `Corpus` reading `--text-field` of a JSONL corpus."""
    if a.corpus is not None and a.text_field != "text":
        from tinygpt.data import load_corpus

        return load_corpus(a.corpus, text_field=a.text_field)
    return a.corpus


def training_settings(a: argparse.Namespace) -> dict:
    """The `TrainConfig` fields whose flags were given."""
    return {field: getattr(a, flag) for flag, field in _TRAIN_FLAGS.items() if getattr(a, flag) is not None}


def run_options(a: argparse.Namespace) -> dict:
    """The keyword arguments the flags of `add_run_flags` and `add_training_flags` give a training function:
    out, resume, device, progress, strategy and the `TrainConfig` fields whose flags were given."""
    return dict(
        out=a.out,
        resume=a.resume,
        device=a.device,
        progress=not a.no_progress,
        strategy=a.strategy,
        **training_settings(a),
    )


def report(res, keys: tuple[str, ...] = ("loss",), extra: tuple[str, ...] = (), before: tuple[str, ...] = ()) -> int:
    """Print the `before` lines, then `done: step N | <keys of the last record> | val loss | seconds | <extra>`,
    and return the exit code (130 when interrupted). Under torchrun only rank 0 prints; every process returns
    the same code."""
    from tinygpt.training import distributed

    if distributed.is_main():
        for line in before:
            print(line)
        last = res.history[-1] if res.history else {}
        parts = [f"step {res.step}"] + [f"{k} {last[k]:.3f}" for k in keys if k in last]
        if res.final_val_loss is not None:
            parts.append(f"val loss {res.final_val_loss:.3f}")
        parts += [f"{res.elapsed:.1f}s", *extra]
        print(("interrupted: " if res.interrupted else "done: ") + " | ".join(parts))
    return 130 if res.interrupted else 0


def cmd_distill(a: argparse.Namespace) -> int:
    from tinygpt.training.distill import distill

    if a.teacher is None and not a.resume:
        raise ValueError("--teacher is required (a .tinygpt file or a Hugging Face model directory)")
    res = distill(
        None if a.resume else a.student,
        a.teacher,
        corpus_arg(a),
        temperature=a.temperature,
        alpha=a.alpha,
        reverse_kl=a.reverse_kl,
        on_policy=a.on_policy,
        tokenizer=a.tokenizer,
        **run_options(a),
    )
    return report(res, ("loss", "kl", "nll"), (f"saved {res.path}",))


COMMANDS = {"distill": cmd_distill}
