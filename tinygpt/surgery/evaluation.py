"""The validation windows every surgery analysis scores, and the loss on them (from `tinygpt.eval.validation`).

A sweep evaluates the same fixed windows hundreds of times, so they are cut once (`eval_data`, an `EvalData`:
`tinygpt.eval.ValidationWindows`) and scored by `eval_loss`; `validation_loss(model, corpus)` does both, so a
surgically changed model can be compared with the numbers a sweep reported. The code lives in `tinygpt.eval`;
these are the names surgery (and its dashboards) have always used.
"""

from __future__ import annotations

from typing import Any

import torch.nn as nn

from tinygpt.eval.validation import ValidationWindows, validation_loss, validation_windows

EvalData = ValidationWindows


def eval_data(
    model: nn.Module,
    corpus: Any = None,
    *,
    ctx: int | None = None,
    n_windows: int = 16,
    batch_size: int = 8,
    val_fraction: float = 0.01,
    progress: bool | None = False,
) -> EvalData:
    """Validation windows of `corpus`: tokens [batch, pos] (used as they are), a 1-D token stream, text, a corpus
    path / `Corpus`, an `EvalData` (returned as it is) or None (the held-out end of the built-in Shakespeare).

    See `tinygpt.eval.validation_windows`; here the tokenizer's progress bar is off unless asked for.
    """
    return validation_windows(
        model, corpus, ctx=ctx, n_windows=n_windows, batch_size=batch_size, val_fraction=val_fraction, progress=progress
    )


def eval_loss(model: nn.Module, data: EvalData) -> float:
    """Mean next-token cross-entropy over all target tokens of `data` (in eval mode; the mode is restored)."""
    return validation_loss(model, data)


__all__ = ["EvalData", "eval_data", "eval_loss", "validation_loss"]
