"""The loss of a model on fixed held-out windows of a corpus: the one number surgery sweeps compare.

    from tinygpt.eval import validation_loss, validation_windows

    validation_loss(model)                          # 16 windows of the last 1% of the built-in Shakespeare
    validation_loss(model, "plays.txt", ctx=128, n_windows=64)
    windows = validation_windows(model, tokens)     # cut once ...
    validation_loss(model, windows)                 # ... and score many variants of the model on them

Unlike `evaluate` (every token of a text scored once, bits per byte), this scores `n_windows` evenly spaced
windows of `ctx` tokens (`tinygpt.data.val_starts`), the same windows every time, which makes it cheap enough to
call once per setting of a sweep.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from tinygpt.data import Corpus, load_corpus, tokenize_corpus, val_starts, windows
from tinygpt.eval.perplexity import EvalError
from tinygpt.inputs import eval_mode, model_device, progress_enabled


@dataclass
class ValidationWindows:
    """Fixed validation windows: inputs `x` and next-token targets `y` [n_windows, ctx], on the model's device.

    Attributes:
        x, y: the windows (y is x shifted by one token).
        batch_size: windows per forward pass.
    """

    x: Tensor
    y: Tensor
    batch_size: int = 8

    @property
    def n_tokens(self) -> int:
        """Scored target tokens."""
        return self.y.numel()

    def batches(self) -> Iterator[tuple[Tensor, Tensor]]:
        """(x, y) batches of `batch_size` windows."""
        for i in range(0, len(self.x), self.batch_size):
            yield self.x[i : i + self.batch_size], self.y[i : i + self.batch_size]


def validation_windows(
    model: Any,
    corpus: Any = None,
    *,
    ctx: int | None = None,
    n_windows: int = 16,
    batch_size: int = 8,
    val_fraction: float = 0.01,
    progress: bool | None = None,
) -> ValidationWindows:
    """Validation windows from many kinds of input.

    Args:
        model: the model (its tokenizer, `cfg.n_ctx` and device are used).
        corpus: tokens [batch, pos] (used as they are, next-token targets), a 1-D token stream (tensor, array
            or list; cut into `n_windows` evenly spaced windows of `ctx`), text, a corpus path / `Corpus`, None
            for the built-in Shakespeare (of a corpus the last `val_fraction` of its tokens is used), or
            `ValidationWindows` (returned as they are).
        ctx: window length (default and maximum: the model's n_ctx).
        n_windows: windows cut from a token stream.
        batch_size: windows per forward pass.
        val_fraction: the held-out end of a corpus's tokens (0: all of them).
        progress: a progress bar while a corpus is tokenized (None: the package default).

    Returns:
        `ValidationWindows` with x, y [n_windows, ctx] (fewer positions when the stream is shorter).

    Raises:
        EvalError: fewer than 2 tokens, or tokens of another shape.
    """
    if isinstance(corpus, ValidationWindows):
        return corpus
    device = model_device(model)
    ctx = min(ctx or model.cfg.n_ctx, model.cfg.n_ctx)
    if isinstance(corpus, Tensor) and corpus.ndim == 2:
        if corpus.shape[1] < 2:
            raise EvalError(f"token batches need at least 2 positions, got shape {tuple(corpus.shape)}")
        t = corpus.long().to(device)
        return ValidationWindows(t[:, :-1], t[:, 1:], batch_size)
    if isinstance(corpus, str) and not os.path.exists(corpus):
        stream = np.asarray(model._require_tokenizer().encode(corpus), dtype=np.int64)
    elif corpus is None or isinstance(corpus, (str, os.PathLike, Path, Corpus)):
        tok = model._require_tokenizer()
        td = tokenize_corpus(load_corpus(corpus), tok, progress=progress_enabled(progress))
        stream = td.split(val_fraction)[1] if val_fraction else td.tokens
    else:
        stream = corpus.cpu().numpy() if isinstance(corpus, Tensor) else np.asarray(corpus)
        if stream.ndim != 1:
            raise EvalError(f"expected tokens [batch, pos] or a 1-D token stream, got shape {stream.shape}")
    if len(stream) < 2:
        raise EvalError(f"need at least 2 validation tokens, got {len(stream)}")
    ctx = min(ctx, len(stream) - 1)
    starts = val_starts(len(stream), ctx, n_windows) if len(stream) > ctx + 1 else torch.zeros(1, dtype=torch.long)
    x, y = windows(stream, starts, ctx, device)
    return ValidationWindows(x.to(device), y.to(device), batch_size)


@torch.no_grad()
def validation_loss(
    model: Any,
    corpus: Any = None,
    *,
    ctx: int | None = None,
    n_windows: int = 16,
    batch_size: int = 8,
    val_fraction: float = 0.01,
    progress: bool | None = None,
) -> float:
    """Mean next-token cross-entropy (nats) of `model` over all targets of fixed validation windows.

    Works on any model, including ones with factored, packed or LoRA layers, so a changed model can be compared
    with the numbers a sweep reported. Each module's training flag is restored afterwards.

    Args:
        model: a `GPT` or a `.tinygpt` path.
        corpus: what `validation_windows` accepts (None: the held-out end of the built-in Shakespeare), or the
            `ValidationWindows` it returned (then ctx, n_windows, batch_size and val_fraction are not used).
        ctx, n_windows, batch_size, val_fraction, progress: as for `validation_windows`.

    Returns:
        The mean loss per target token.
    """
    from tinygpt.checkpoint import as_model

    model = as_model(model)
    data = validation_windows(
        model,
        corpus,
        ctx=ctx,
        n_windows=n_windows,
        batch_size=batch_size,
        val_fraction=val_fraction,
        progress=progress,
    )
    total, count = 0.0, 0
    with eval_mode(model):
        for x, y in data.batches():
            loss = model(x, return_type="loss", targets=y)
            total += float(loss) * y.numel()
            count += y.numel()
    return total / count


__all__ = ["ValidationWindows", "validation_loss", "validation_windows"]
