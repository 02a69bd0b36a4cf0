"""Every flag more than one `tinygpt` command takes, declared once, and the readers of their values.

    add(p, "--corpus")                            # as declared in FLAGS
    add(p, "--seed", default=0)                   # the same flag with this command's default / help
    add_training_flags(p, steps="200")            # the training tail of train, finetune, sft, distill, lora
    add_run_flags(p, out="adapter file (.lora)")  # --out --resume --device --strategy --threads --no-progress
    ...
    corpus_arg(a)      # --corpus (+ --text-field) as the library functions take it
    run_options(a)     # out, resume, device, progress, strategy and the training settings given

The training settings default to None (`None` is the sentinel for "not given"): only the flags a user gives reach
the training function; its own defaults (`TrainConfig`'s, or the command's) or, with `--resume`, the saved run's
settings stand for the rest. No command re-parses its defaults to find out what was given.
"""

from __future__ import annotations

import argparse
from typing import Any

CORPUS_HELP = "text file, directory or .jsonl (default: built-in Shakespeare)"

# option -> argparse keywords; `add(p, option, **overrides)` declares it on a command's parser
FLAGS: dict[str, dict[str, Any]] = {
    # data
    "--corpus": {"default": None, "help": CORPUS_HELP},
    "--text-field": {"default": "text", "help": "JSONL field holding the text"},
    "--tokenizer": {"default": None, "help": "'byte' or a tokenizer.json / Hugging Face tokenizer directory"},
    "--template": {"default": None, "help": "chat template: chatml, alpaca, or a .json file"},
    "--model": {"default": None, "help": "the base model (.tinygpt)"},
    # where and how a command runs
    "--device": {"default": None, "help": "cuda, mps or cpu (default: best available)"},
    "--threads": {"type": int, "default": None, "help": "torch CPU threads"},
    "--seed": {"type": int, "default": None, "help": "random seed"},
    "--out": {"required": True, "help": "the file to write"},
    "--no-progress": {"action": "store_true", "help": "no progress bars"},
    "--resume": {"action": "store_true", "help": "continue the run saved in --out"},
    "--overwrite": {"action": "store_true", "help": "replace an existing output file (default: refuse)"},
    "--strategy": {
        "default": "ddp",
        "choices": ["ddp", "fsdp"],
        "help": "under torchrun: data parallel or fully sharded",
    },
    # which parts of a model
    "--layers": {"default": None, "help": "e.g. 0-3, 0,2 or all (default all)"},
    "--dropout": {"type": float, "default": None, "help": "dropout probability"},
    # sampling
    "--prompt": {"default": "\n", "help": "the text to continue"},
    "--tokens": {"type": int, "default": 200, "help": "tokens to generate"},
    "--temperature": {"type": float, "default": None, "help": "sampling temperature (0: greedy)"},
    "--top-k": {"type": int, "default": None, "help": "sample from the k most likely tokens"},
    "--top-p": {"type": float, "default": None, "help": "sample from the smallest set of probability >= p"},
    # optimisation (the training tail, and the commands that share some of it)
    "--dtype": {"default": None, "choices": ["float32", "bfloat16"], "help": "autocast dtype"},
    "--param-dtype": {
        "default": None,
        "choices": ["float32", "bfloat16"],
        "help": "bfloat16: train bf16 weights with fp32 master copies in the optimizer (faster than autocast)",
    },
    "--compile": {"action": "store_true", "default": None, "help": "torch.compile the forward while nothing is hooked"},
    "--log-every": {"type": int, "default": None, "help": "print a plain progress line every N steps, 0: never"},
    "--batch": {"type": int, "default": None, "help": "sequences per micro-batch"},
    "--accum": {"type": int, "default": None, "help": "gradient accumulation steps"},
    "--ctx": {"type": int, "default": None, "help": "sequence length"},
    "--steps": {"type": int, "default": None, "help": "optimizer steps"},
    "--lr-schedule": {"default": None, "choices": ["cosine", "constant"], "help": "learning-rate schedule"},
    "--warmup": {"type": int, "default": None, "help": "linear warmup steps"},
    "--max-lr": {"type": float, "default": None, "help": "peak learning rate"},
    "--min-lr": {"type": float, "default": None, "help": "final learning rate"},
    "--lr": {"type": float, "default": None, "help": "learning rate"},
    "--alpha": {"type": float, "default": None, "help": "weight or scale (see the command)"},
    "--weight-decay": {"type": float, "default": None, "help": "weight decay"},
    "--grad-clip": {"type": float, "default": None, "help": "max gradient norm, 0 disables"},
    "--save-every": {"type": int, "default": None, "help": "write the checkpoint every N steps, 0: at the end only"},
    "--val-split": {"type": float, "default": None, "help": "fraction of the tokens held out for validation"},
    "--val-every": {"type": int, "default": None, "help": "validate every N steps, 0: never"},
    "--sample-every": {"type": int, "default": None, "help": "print a sample every N steps, 0: never"},
    "--sample-prompt": {"default": None, "help": "the prompt of those samples"},
}


def add(p: argparse.ArgumentParser | argparse._ArgumentGroup, option: str, **overrides: Any) -> None:
    """Declare `option` (a key of `FLAGS`) on a parser; `overrides` replace its default, help, required, ..."""
    p.add_argument(option, **{**FLAGS[option], **overrides})


# flag dest -> (TrainConfig field, default shown in the help): the training tail
TRAINING_FLAGS: dict[str, tuple[str, str]] = {
    "dtype": ("dtype", "float32"),
    "param_dtype": ("param_dtype", "float32"),
    "compile": ("compile", "off"),
    "log_every": ("log_every", "every 10%% of the steps, at most 50, when not on a terminal"),
    "batch": ("batch_size", "8"),
    "accum": ("accum", "1"),
    "ctx": ("ctx", "the model's n_ctx"),
    "steps": ("steps", "500"),
    "lr_schedule": ("lr_schedule", "cosine"),
    "warmup": ("warmup", "50"),
    "max_lr": ("max_lr", "6e-4"),
    "min_lr": ("min_lr", "max-lr / 10"),
    "weight_decay": ("weight_decay", "0.1"),
    "grad_clip": ("grad_clip", "1.0"),
    "save_every": ("save_every", "0"),
    "val_split": ("val_split", "0.01"),
    "val_every": ("val_every", "100"),
    "sample_every": ("sample_every", "0"),
    "sample_prompt": ("sample_prompt", "newline"),
    "seed": ("seed", "1337"),
}


def _option(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def add_training_flags(p: argparse.ArgumentParser, only: tuple[str, ...] | None = None, **shown: str) -> None:
    """Declare the training tail (`TRAINING_FLAGS`, or the dests in `only`), every flag defaulting to None.

    `shown` names the defaults to print in the help where the command's differ from `TrainConfig`'s, e.g.
    `add_training_flags(p, steps="200", max_lr="3e-4")`.
    """
    for dest in only or TRAINING_FLAGS:
        option = _option(dest)
        default = shown.get(dest, TRAINING_FLAGS[dest][1])
        add(p, option, help=f"{FLAGS[option]['help']} (default: {default})")


def add_run_flags(
    p: argparse.ArgumentParser,
    *,
    out: str,
    resume: str | None = "continue the run saved in --out",
    device: str = "best available",
    strategy: bool = True,
) -> None:
    """Declare the options of a run besides its settings: --out (required), --overwrite, --resume (unless None),
    --device, --strategy (unless False), --threads and --no-progress."""
    add(p, "--out", help=out)
    add(p, "--overwrite", help="start a new run over an existing --out (default: refuse; --resume continues it)")
    if resume is not None:
        add(p, "--resume", help=resume)
    add_device_flags(p, device=device)
    if strategy:
        add(p, "--strategy")


def add_device_flags(p: argparse.ArgumentParser, *, device: str = "best available", progress: bool = True) -> None:
    """--device (its default named in the help), --threads and (unless `progress=False`) --no-progress."""
    add(p, "--device", help=f"cuda, mps or cpu (default: {device})")
    add(p, "--threads")
    if progress:
        add(p, "--no-progress")


def add_corpus_flags(p: argparse.ArgumentParser, *, help: str = CORPUS_HELP) -> None:
    """--corpus and --text-field (read back with `corpus_arg`)."""
    add(p, "--corpus", help=help)
    add(p, "--text-field")


# ------------------------------------------------------------------------------------------------ readers
def corpus_arg(a: argparse.Namespace, *, load: bool = False):
    """`--corpus` as the library takes it: None (the built-in corpus), the path as given, or (with `load`, or
    when `--text-field` is not "text") a `Corpus` reading `--text-field` of a JSONL corpus. Loading checks that
    the path exists (`CorpusError` otherwise) and makes sure a path is never read as text."""
    if a.corpus is None:
        return None
    text_field = getattr(a, "text_field", "text")
    if load or text_field != "text":
        from tinygpt.data import load_corpus

        return load_corpus(a.corpus, text_field=text_field)
    return a.corpus


def given(a: argparse.Namespace, mapping: dict[str, str]) -> dict[str, Any]:
    """{keyword: value} for the flags (dest -> keyword) the user gave (whose value is not the None sentinel)."""
    return {kw: getattr(a, dest) for dest, kw in mapping.items() if getattr(a, dest, None) is not None}


def training_settings(a: argparse.Namespace) -> dict[str, Any]:
    """The `TrainConfig` fields whose flags were given."""
    return given(a, {dest: field for dest, (field, _) in TRAINING_FLAGS.items()})


def progress(a: argparse.Namespace) -> bool:
    """`--no-progress` read back as a library function's `progress=`."""
    return not a.no_progress


def run_options(a: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments the flags of `add_run_flags` and `add_training_flags` give a training function:
    out, overwrite, resume, device, progress, strategy and the `TrainConfig` fields whose flags were given."""
    return dict(
        out=a.out,
        overwrite=a.overwrite,
        resume=a.resume,
        device=a.device,
        progress=progress(a),
        strategy=a.strategy,
        **training_settings(a),
    )


__all__ = [
    "CORPUS_HELP",
    "FLAGS",
    "TRAINING_FLAGS",
    "add",
    "add_corpus_flags",
    "add_device_flags",
    "add_run_flags",
    "add_training_flags",
    "corpus_arg",
    "given",
    "progress",
    "run_options",
    "training_settings",
]
