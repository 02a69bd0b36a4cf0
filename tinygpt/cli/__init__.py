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
    tinygpt sae tiny.tinygpt --hook blocks.2.hook_resid_post --arch topk --k 32 --expansion 8 --out tiny-l2.sae

One module per command group registers its commands (`tinygpt.cli._command.command`): `train` (train, sample,
inspect, tokenizer), `surgery`, `interp`, `interop`, `distill`, `eval`, `lora`, `sft`, `es`, `sae`. The flags several
commands share are declared once, in `tinygpt.cli._flags`. Before a command runs, `tinygpt.cli._preflight` checks
--threads (or $TINYGPT_THREADS), --device and every output (writable, not an input, an existing file replaced
only with --overwrite or --resume). `python -m tinygpt` is the same command. Nothing here reads `sys.argv` at
import time.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

# the command modules register their commands on import, in this order (the order of `tinygpt --help`)
# isort: off
from tinygpt.cli import train as _train  # noqa: F401  (train, sample, inspect, tokenizer)
from tinygpt.cli import surgery as _surgery  # noqa: F401  (laser, hqq)
from tinygpt.cli import interp as _interp  # noqa: F401  (tuned-lens)
from tinygpt.cli import interop as _interop  # noqa: F401  (export, import)
from tinygpt.cli import distill as _distill  # noqa: F401  (distill)
from tinygpt.cli import eval as _eval  # noqa: F401  (eval, leaderboard, memorization)
from tinygpt.cli import lora as _lora  # noqa: F401  (lora, lora-merge)
from tinygpt.cli import sft as _sft  # noqa: F401  (sft, finetune, magpie)
from tinygpt.cli import es as _es  # noqa: F401  (es)
from tinygpt.cli import sae as _sae  # noqa: F401  (sae, sae-eval, sae-export, sae-import)

# isort: on
from tinygpt.cli import _preflight
from tinygpt.cli._command import REGISTRY, Command, CommandError
from tinygpt.errors import TinyGPTError

#: what the CLI prints as one line `tinygpt CMD: error: ...` (exit code 2) instead of a traceback
USER_ERRORS: tuple[type[BaseException], ...] = (TinyGPTError, ValueError, OSError)

#: command name -> handler
COMMANDS = {name: c.run for name, c in REGISTRY.items()}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every registered command."""
    parser = argparse.ArgumentParser(prog="tinygpt", description="Train, sample and inspect tiny GPTs.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for c in REGISTRY.values():
        c.flags(sub.add_parser(c.name, help=c.help, description=c.description or c.help))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `tinygpt` console script and `python -m tinygpt` (argv: default `sys.argv[1:]`)."""
    args = build_parser().parse_args(argv)
    from tinygpt.training.distributed import record_error  # under torchrun: the rank's error in its failure summary

    try:
        threads = _preflight.run(args)  # threads, device, outputs: checked before anything runs
        if threads is not None:
            import torch

            torch.set_num_threads(threads)
        return REGISTRY[args.command].run(args)
    except USER_ERRORS as e:
        record_error(e)
        message = " ".join(str(e).split("\n"))  # always one line
        print(f"tinygpt {args.command}: error: {message}", file=sys.stderr)
        return 2
    except Exception as e:
        record_error(e)
        raise
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


__all__ = ["COMMANDS", "USER_ERRORS", "Command", "CommandError", "build_parser", "main"]
