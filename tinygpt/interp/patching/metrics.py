"""Patching metrics: the logit difference (the default), its normalised form, and how a sweep picks its metric.

A metric maps logits [batch, pos, d_vocab] of a (patched) corrupted run to a scalar. The default is
`logit_diff` at the last position between `correct` and `incorrect` (token ids or single-token strings; if
omitted, the clean and corrupted runs' own top predictions), as `LogitDiff`, which can also score many patched
runs at once (`batched`) and which the engine recognises (it reads the last position only).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from tinygpt.errors import TinyGPTValueError

__all__ = ["LogitDiff", "Metric", "PatchingError", "logit_diff", "logit_diff_metric", "resolve_metric", "scalar"]

Metric = Callable[[Tensor], Tensor | float]


class PatchingError(TinyGPTValueError):
    """Prompts, answers or sites that cannot be patched as asked."""


def _answers(correct: Any, incorrect: Any, batch: int, device, hint: str) -> tuple[Tensor, Tensor]:
    """Token ids (an int, or one per prompt) as two [batch] tensors; `hint` ends the error message."""
    c = torch.as_tensor(correct, device=device).reshape(-1)
    w = torch.as_tensor(incorrect, device=device).reshape(-1)
    if c.numel() not in (1, batch) or w.numel() not in (1, batch):
        raise PatchingError(
            f"got {c.numel()} correct and {w.numel()} incorrect answers for a batch of {batch} prompts; {hint}"
        )
    return c.expand(batch), w.expand(batch)


def logit_diff(logits: Tensor, correct: Any, incorrect: Any, *, pos: int = -1, per_prompt: bool = False) -> Tensor:
    """Logit of the correct answer minus the incorrect one at position `pos`, averaged over the batch.

    Args:
        logits: [batch, pos, d_vocab].
        correct, incorrect: token ids: an int (every prompt) or a sequence / tensor [batch].
        pos: the position read (default the last).
        per_prompt: return [batch] instead of the mean.
    """
    last = logits[:, pos]  # [batch, d_vocab]
    b = last.shape[0]
    c, w = _answers(correct, incorrect, b, last.device, "give one token id per prompt (or one for all)")
    rows = torch.arange(b, device=last.device)
    diff = last[rows, c] - last[rows, w]
    return diff if per_prompt else diff.mean()


def logit_diff_metric(
    correct: Any, incorrect: Any, *, pos: int = -1, clean: float | None = None, corrupted: float | None = None
) -> Metric:
    """A metric closure `logits -> logit_diff(...)`; with `clean` and `corrupted` baselines it is normalised,
    (ld - corrupted) / (clean - corrupted), as in TransformerLens' IOI demo's `ioi_metric`."""
    if (clean is None) != (corrupted is None):
        raise PatchingError("give both clean= and corrupted= baselines to normalise, or neither")

    def metric(logits: Tensor) -> Tensor:
        ld = logit_diff(logits, correct, incorrect, pos=pos)
        return ld if clean is None else (ld - corrupted) / (clean - corrupted)

    return metric


class LogitDiff:
    """The default metric, `logit_diff` at the last position; `batched` scores many patched runs at once.

    Args:
        correct, incorrect: token ids, one or one per prompt.
        batch: prompts per run.
        device: where the logits are.
    """

    def __init__(self, correct: Any, incorrect: Any, batch: int, device):
        hint = "give one token per prompt (or one for all)"
        self.correct, self.incorrect = _answers(correct, incorrect, batch, device, hint)

    def __call__(self, logits: Tensor) -> Tensor:
        return logit_diff(logits, self.correct, self.incorrect)

    def batched(self, logits: Tensor) -> Tensor:
        """logits [n, batch, pos, d_vocab] of n patched runs -> [n]."""
        last = logits[:, :, -1]
        rows = torch.arange(last.shape[1], device=last.device)
        return (last[:, rows, self.correct] - last[:, rows, self.incorrect]).mean(-1)


def _answer(model, x: Any) -> Any:
    if isinstance(x, str):
        return model.to_single_token(x)
    if isinstance(x, (list, tuple)) and x and isinstance(x[0], str):
        return [model.to_single_token(s) for s in x]
    return x


def resolve_metric(
    model, metric: Metric | None, correct: Any, incorrect: Any, clean_logits: Tensor, corrupted_logits: Tensor
) -> Metric:
    """The sweep's metric: `metric` as given, else `LogitDiff` of `correct` vs `incorrect` (default: the clean
    and corrupted runs' top predictions at the last position)."""
    if metric is not None:
        if correct is not None or incorrect is not None:
            raise PatchingError("give either metric= or correct=/incorrect= answers, not both")
        return metric
    if correct is None:
        correct = clean_logits[:, -1].argmax(-1)
    if incorrect is None:
        incorrect = corrupted_logits[:, -1].argmax(-1)
    correct, incorrect = _answer(model, correct), _answer(model, incorrect)
    same = torch.as_tensor(correct).cpu() == torch.as_tensor(incorrect).cpu()
    if bool(same.any()):
        raise PatchingError(
            "the correct and incorrect answers coincide (the clean and corrupted runs predict the same token?): "
            "pass correct= and incorrect= tokens, or a metric="
        )
    return LogitDiff(correct, incorrect, clean_logits.shape[0], clean_logits.device)


def scalar(value: Any) -> float:
    """A metric's value as a float (a `PatchingError` unless it is one number)."""
    v = torch.as_tensor(value)
    if v.numel() != 1:
        raise PatchingError(f"the metric must return a scalar, got shape {tuple(v.shape)}")
    return float(v)
