"""One grammar for inputs: the coercers every public function uses for its model-side arguments.

    tokens = as_tokens(model, "To be, or not to be")      # text -> [1, pos] on the model's device
    tokens = as_tokens(model, ["a b", "c d"])             # several texts (equal lengths) -> [2, pos]
    tokens = as_tokens(model, [1, 2, 3])                   # ids -> [1, pos]
    with eval_mode(model): ...                             # every module's training flag restored exactly

The device rule is one: inputs go to the device of the model's first parameter (`model_device`).
`DEFAULT_PROGRESS` is the one default for every `progress=` argument; `progress_enabled(progress)` resolves it.

Core layer: imports nothing above `tinygpt.errors` (the model is duck-typed: it needs `tokenizer`,
`parameters()` and `cfg.d_vocab`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from tinygpt.errors import TinyGPTValueError


class InputError(TinyGPTValueError):
    """An input that cannot be turned into tokens (wrong type, shape, ids out of range, unequal lengths)."""


DEFAULT_PROGRESS = True


def progress_enabled(progress: bool | None) -> bool:
    """`progress=None` means the package default (`DEFAULT_PROGRESS`)."""
    return DEFAULT_PROGRESS if progress is None else bool(progress)


def model_device(model: nn.Module) -> torch.device:
    """The device inputs are moved to: that of the model's first parameter (CPU for a model without any)."""
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _tokenizer(model: Any):
    tok = getattr(model, "tokenizer", None)
    if tok is None:
        raise InputError(
            "this model has no tokenizer attached, so text cannot be encoded; set model.tokenizer "
            "(e.g. tinygpt.load_tokenizer(path)) or pass token ids"
        )
    return tok


def _is_text_list(x: Any) -> bool:
    return isinstance(x, (list, tuple)) and len(x) > 0 and all(isinstance(s, str) for s in x)


def as_tokens(
    model: Any,
    x: Any,
    *,
    what: str = "input",
    single: bool = False,
    max_len: int | None = None,
    error: type[Exception] = InputError,
) -> Tensor:
    """Text, a list of texts, token ids ([pos], [batch, pos], a list, a numpy array) -> tokens [batch, pos].

    Args:
        model: anything with `tokenizer` (for text), `parameters()` (for the device) and `cfg.d_vocab`.
        x: the input.
        what: how error messages name the input ("clean", "prompt", ...).
        single: require exactly one sequence (returned as [1, pos]).
        max_len: refuse longer inputs (e.g. the model's context).
        error: the exception class to raise (a subclass of `TinyGPTError`).

    Returns:
        Long tensor [batch, pos] on `model_device(model)`.
    """
    if isinstance(x, str):
        ids = [_tokenizer(model).encode(x)]
    elif _is_text_list(x):
        tok = _tokenizer(model)
        ids = [tok.encode(s) for s in x]
        lens = sorted({len(i) for i in ids})
        if len(lens) != 1:
            raise error(
                f"the {what} texts tokenize to different lengths {[len(i) for i in ids]}; pass texts of "
                "equal token length (or token ids you padded yourself)"
            )
    else:
        ids = None
    if ids is not None:
        t = torch.tensor(ids, dtype=torch.long)
    else:
        try:
            t = x if isinstance(x, Tensor) else torch.as_tensor(x if not isinstance(x, Sequence) else list(x))
        except (TypeError, ValueError, RuntimeError) as e:
            raise error(f"{what} must be text, a list of texts or integer token ids, got {type(x).__name__}") from e
        if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
            raise error(f"{what} token ids must be integers, got dtype {t.dtype}")
        if t.ndim == 1:
            t = t[None]
        if t.ndim != 2:
            raise error(f"{what} must be token ids [pos] or [batch, pos], got shape {tuple(t.shape)}")
        t = t.long()
    if t.shape[-1] == 0:
        raise error(f"{what} is empty: pass at least one token")
    if single and t.shape[0] != 1:
        raise error(f"{what} must be one sequence, got a batch of {t.shape[0]}; loop over the batch")
    if max_len is not None and t.shape[1] > max_len:
        raise error(f"{what} has {t.shape[1]} tokens, more than the {max_len} allowed (the model's n_ctx)")
    d_vocab = getattr(getattr(model, "cfg", None), "d_vocab", None)
    if d_vocab is not None and (int(t.min()) < 0 or int(t.max()) >= d_vocab):
        raise error(f"{what} token ids must be in [0, {d_vocab}), got [{int(t.min())}, {int(t.max())}]")
    return t.to(model_device(model))


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put every module in eval mode; on exit restore each module's own `training` flag exactly."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, f in flags:
            m.training = f


__all__ = ["DEFAULT_PROGRESS", "InputError", "as_tokens", "eval_mode", "model_device", "progress_enabled"]
