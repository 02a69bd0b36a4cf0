"""What a dashboard's inputs become: prompts typed into a text box, and the evaluation data of a sweep.

A prompt is text for a model with a tokenizer, token ids ("5 17 3") for one without. The coercion itself is
`tinygpt.inputs.as_tokens` (one device rule, one range check); this module only adds what a text box needs:
reading typed ids, and showing a prompt or a token back as text.
"""

from __future__ import annotations

import re
from typing import Any

import ipywidgets as W
import torch
from torch import Tensor

from tinygpt.inputs import as_tokens, model_device
from tinygpt.surgery import eval_data


def has_tokenizer(model) -> bool:
    return getattr(model, "tokenizer", None) is not None


def parse_tokens(model, prompt: Any) -> Tensor:
    """A prompt typed in a dashboard (or given as ids) -> tokens [1, pos] on the model's device.

    Text goes through the model's tokenizer. A model without one (a toy model over token ids) takes token ids
    separated by spaces or commas, e.g. "5 17 3 5".

    Raises:
        ValueError: an empty prompt, ids that are not numbers or out of the vocabulary, more than n_ctx tokens.
    """
    if isinstance(prompt, str):
        if not prompt:
            raise ValueError("type a prompt (at least one token)")
        if not has_tokenizer(model):
            try:
                prompt = [int(p) for p in re.split(r"[\s,]+", prompt.strip()) if p]
            except ValueError:
                raise ValueError(
                    f"this model has no tokenizer: type token ids (0..{model.cfg.d_vocab - 1}) separated by spaces, "
                    "e.g. '5 17 3 5'"
                ) from None
            if not prompt:
                raise ValueError("type a prompt (at least one token)")
    else:
        prompt = torch.as_tensor(prompt).reshape(-1)
    return as_tokens(model, prompt, what="the prompt", single=True, max_len=model.cfg.n_ctx)


def prompt_text(model, prompt: Any) -> str:
    """What a prompt box shows for `prompt` (text as is; token ids decoded, or listed for a model without a
    tokenizer)."""
    if isinstance(prompt, str):
        return prompt
    return decode(model, torch.as_tensor(prompt).reshape(-1).tolist())


def prompt_box(model, prompt: Any, description: str = "prompt", width: str = "70%", **kwargs: Any) -> W.Text:
    """A Text box for a prompt that applies on Enter (not on every keystroke)."""
    return W.Text(
        value=prompt_text(model, prompt),
        description=description,
        continuous_update=False,
        layout=W.Layout(width=width),
        **kwargs,
    )


def decode(model, ids: list[int]) -> str:
    """Token ids as text, or as space-separated ids for a model without a tokenizer."""
    if has_tokenizer(model):
        return model.tokenizer.decode(ids)
    return " ".join(str(int(i)) for i in ids)


def token_strs(model, ids: list[int]) -> list[str]:
    """One readable string per token (its id for a model without a tokenizer)."""
    if has_tokenizer(model):
        return [model.tokenizer.token_str(int(i)) for i in ids]
    return [str(int(i)) for i in ids]


def parse_answer(model, text: str) -> int:
    """One answer token: a single-token string, or a token id for a model without a tokenizer."""
    ids = parse_tokens(model, text)[0].tolist()
    if len(ids) != 1:
        raise ValueError(f"the answer {text!r} is {len(ids)} tokens, not one: {ids}")
    return ids[0]


# ------------------------------------------------------------------------------------------ evaluation data
def eval_tokens(model, data: Any = None, n_windows: int = 8) -> Tensor:
    """Evaluation tokens [n, n_ctx] on the model's device: `data` if it is already a [batch, pos] tensor, else
    `n_windows` windows of held-out text (`tinygpt.surgery.eval_data`; None = the built-in Shakespeare)."""
    if isinstance(data, Tensor) and data.ndim == 2:
        return data.long().to(model_device(model))
    d = eval_data(model, data, ctx=model.cfg.n_ctx - 1, n_windows=n_windows)
    return torch.cat([d.x, d.y[:, -1:]], dim=1).to(model_device(model))
