"""What `tinygpt` checks before any command runs, so a long run never fails at its end.

- `--threads` (or `$TINYGPT_THREADS` when the flag is not given) must be an integer >= 1;
- `--device` must be one this torch can use (`tinygpt.training.run.check_device`);
- every output (`OUTPUTS`) is checked with `tinygpt.io.check_output`: it is none of the command's inputs, an
  existing file is replaced only with `--overwrite` (or `--resume`, which continues the run saved there), and its
  location is writable (a temp file is created and removed beside it). Replacing a training checkpoint (optimizer
  state) by a plain model prints a warning line.

Nothing is written or loaded here; the library functions make the same output checks for their `out=`.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from tinygpt.cli._command import CommandError

#: command -> (flag dest, kind) of what it writes: "file", "dir" (a directory it fills) or "tokenizer" (a
#: directory that gets tokenizer.json)
OUTPUTS: dict[str, tuple[tuple[str, str], ...]] = {
    "train": (("out", "file"),),
    "finetune": (("out", "file"),),
    "sft": (("out", "file"),),
    "distill": (("out", "file"),),
    "lora": (("out", "file"), ("merge_out", "file")),
    "lora-merge": (("out", "file"),),
    "es": (("out", "file"),),
    "laser": (("out", "file"),),
    "hqq": (("out", "file"),),
    "tuned-lens": (("out", "file"),),
    "import": (("out", "file"),),
    "magpie": (("out", "file"),),
    "leaderboard": (("out", "file"),),
    "tokenizer": (("out", "tokenizer"),),
    "export": (("hf", "dir"),),
    "sae-export": (("out", "dir"),),
    "sae-import": (("out", "file"),),
}

#: flag dests naming files a command reads. An output may replace one of `REPLACEABLE` (the model a command
#: transforms: `laser m.tinygpt --out m.tinygpt --overwrite`), never any other (a corpus, data, a teacher, ...).
INPUTS = (
    "file",
    "model",
    "student",
    "teacher",
    "corpus",
    "data",
    "directory",
    "adapter",
    "tokenizer",
    "template",
    "train",
    "heldout",
    "word_list",
)
REPLACEABLE = ("file", "model", "student")

#: the default output of commands whose --out is optional
_DEFAULT_OUT = {
    "train": lambda a: f"{a.preset or 'tiny'}.tinygpt",
    "tuned-lens": lambda a: str(Path(a.model).with_suffix(".lenses")),
}


def threads(a: argparse.Namespace) -> int | None:
    """`--threads`, else `$TINYGPT_THREADS`, as a number >= 1 (None: neither given)."""
    value, source = getattr(a, "threads", None), "--threads"
    if value is None and os.environ.get("TINYGPT_THREADS", "").strip():
        value, source = os.environ["TINYGPT_THREADS"].strip(), "TINYGPT_THREADS"
    if value is None:
        return None
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise CommandError(f"{source} must be an integer >= 1 (torch CPU threads), got {value!r}")
    return n


def device(a: argparse.Namespace) -> None:
    """`--device` checked against this torch (CUDA / MPS available?)."""
    if getattr(a, "device", None) is None:
        return
    from tinygpt.training.run import check_device
    from tinygpt.training.settings import SettingError

    try:
        check_device(a.device)
    except SettingError as e:
        raise CommandError(
            str(e).replace(f"device={a.device!r}", f"--device {a.device}").replace("device='cpu'", "--device cpu")
        ) from None


def outputs(a: argparse.Namespace) -> None:
    """Check every output of `a.command` (see the module docstring); fills in a default `--out`."""
    from tinygpt.checkpoint import resumable_state
    from tinygpt.io import check_output, same_file

    specs = OUTPUTS.get(a.command, ())
    if a.command in _DEFAULT_OUT and getattr(a, "out", None) is None:
        a.out = _DEFAULT_OUT[a.command](a)
    resume = bool(getattr(a, "resume", False))
    overwrite = bool(getattr(a, "overwrite", False))
    hint = "pass --overwrite to replace it" + (" (or --resume to continue its run)" if hasattr(a, "resume") else "")
    for dest, kind in specs:
        value = getattr(a, dest, None)
        if value is None:
            continue
        path = Path(value)
        flag = "--" + dest.replace("_", "-")
        for name in INPUTS:
            inp = getattr(a, name, None)
            if not isinstance(inp, str) or not Path(inp).is_file() or not same_file(path, inp):
                continue
            if name not in REPLACEABLE:
                raise CommandError(
                    f"{flag} {path} is also this command's --{name.replace('_', '-')} input; "
                    "write the output to another file"
                )
            if resume:  # `finetune base --resume --out base`: the run is in base (checked by the library)
                continue
            if not overwrite:
                raise CommandError(
                    f"{flag} {path} is also this command's input; write to another file, or pass "
                    "--overwrite to replace the input"
                )
        target = path / "tokenizer.json" if kind == "tokenizer" else path
        if kind == "tokenizer" and path.exists() and not path.is_dir():
            raise CommandError(f"{flag} {path} is a file; {flag} names a directory to write tokenizer.json into")
        allowed = overwrite or (resume and dest == "out")
        check_output(target, overwrite=allowed, directory=kind == "dir", error=CommandError, hint=hint)
        if overwrite and not resume and kind == "file" and target.exists():
            if lost := resumable_state(target):
                print(
                    f"warning: --overwrite replaces {target}, {lost}; the new file cannot continue that run",
                    file=sys.stderr,
                )


def run(a: argparse.Namespace) -> int | None:
    """Every check before `a.command` runs; returns the thread count to set (None: leave torch's)."""
    n = threads(a)
    device(a)
    outputs(a)
    return n


__all__ = ["INPUTS", "OUTPUTS", "REPLACEABLE", "outputs", "run", "threads"]
