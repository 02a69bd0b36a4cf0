"""The one error base class: everything a user can cause raises a `TinyGPTError`.

Each module defines its own subclass next to the code that raises it (`ConfigError` in `tinygpt.config`,
`CheckpointError` in `tinygpt.checkpoint`, ...); they also derive from the builtin they replace
(`ValueError`, `RuntimeError`) so `except ValueError` keeps working. The CLI prints a `TinyGPTError` as one
line (`tinygpt CMD: error: ...`) instead of a traceback.

This module imports nothing from tinygpt: it sits below every layer.
"""

from __future__ import annotations


class TinyGPTError(Exception):
    """Base class of every error tinygpt raises for bad input, bad files or a run that cannot go on."""


class TinyGPTValueError(TinyGPTError, ValueError):
    """A bad argument or bad data (a `ValueError` too)."""


__all__ = ["TinyGPTError", "TinyGPTValueError"]
