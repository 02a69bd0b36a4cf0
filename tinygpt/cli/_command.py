"""The command registry of `tinygpt`, and what the commands print the same way.

    @command("eval", "loss, perplexity and bits per byte of a .tinygpt model", flags=_eval_flags)
    def cmd_eval(a: argparse.Namespace) -> int: ...

`command` records a subcommand (its name, help, a function declaring its flags, the handler); `tinygpt.cli`
builds the parser from `REGISTRY` in the order the command modules are imported. A handler returns the exit
code; it raises a `TinyGPTError` (or `ValueError` / `OSError`) for anything the user can fix, which `main`
prints as one line.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tinygpt.errors import TinyGPTValueError

Handler = Callable[[argparse.Namespace], int]


class CommandError(TinyGPTValueError):
    """Flags that do not go together, or a flag a command needs (printed as one line, exit code 2)."""


@dataclass(frozen=True)
class Command:
    """One subcommand: `tinygpt NAME ...`.

    Attributes:
        name: the subcommand.
        help: one line for `tinygpt --help`.
        flags: declares the subcommand's arguments on its parser.
        run: the handler, called with the parsed arguments; returns the exit code.
        description: a longer text for `tinygpt NAME --help` (default: `help`).
    """

    name: str
    help: str
    flags: Callable[[argparse.ArgumentParser], None]
    run: Handler
    description: str | None = None


REGISTRY: dict[str, Command] = {}


def command(
    name: str, help: str, *, flags: Callable[[argparse.ArgumentParser], None], description: str | None = None
) -> Callable[[Handler], Handler]:
    """Decorator registering a handler as the subcommand `name` (names are unique)."""

    def register(run: Handler) -> Handler:
        if name in REGISTRY:
            raise RuntimeError(f"the command {name!r} is registered twice")
        REGISTRY[name] = Command(name, help, flags, run, description)
        return run

    return register


# ------------------------------------------------------------------------------------------------ output
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


def out_file(out: str) -> Path:
    """`--out` as a file path; a directory is an error (before anything is computed)."""
    path = Path(out)
    if path.is_dir():
        raise CommandError(f"--out {path} is a directory; give a file path such as {path / 'model.tinygpt'}")
    return path


def file_size(path: str | Path) -> str:
    """'N bytes (M MiB)'."""
    n = Path(path).stat().st_size
    return f"{n:,} bytes ({n / 2**20:.2f} MiB)"


__all__ = ["REGISTRY", "Command", "CommandError", "command", "file_size", "out_file", "report"]
