"""Special tokens for chat templates: add them to a model's tokenizer and grow its embedding to match.

add_special_tokens(model, "chatml")       # {"<|im_start|>": 256, "<|im_end|>": 257}; idempotent
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence

import torch
import torch.nn as nn

from tinygpt.model import GPT
from tinygpt.training.settings import SettingError
from tinygpt.training.templates import Template, load_template


def add_special_tokens(model: GPT, tokens: Template | str | Iterable[str] = "chatml") -> dict[str, int]:
    """Give `model` the special tokens of a template (or a list of token strings); returns {token: id}.

    Missing tokens are added to a copy of the tokenizer (new ids after its vocabulary); when the vocabulary
    outgrows `cfg.d_vocab`, `embed` and `unembed` get new rows and `cfg.d_vocab` grows. The rows of newly added
    tokens start at the mean of the existing rows (so a new token is neither favoured nor impossible). The
    tokenizer's record lists the tokens, so `save`/`load` rebuild the same model. Idempotent: a model that
    already has every token is not changed.
    """
    if isinstance(tokens, (Template, dict)) or isinstance(tokens, (str, os.PathLike)):
        strings = list(load_template(tokens).special_tokens)
    else:
        strings = list(tokens)
    tok = model._require_tokenizer()
    have = tok.special_tokens
    if all(s in have for s in strings):
        return {s: have[s] for s in strings}
    new_tok = tok.with_special_tokens(strings)
    new_ids = sorted({new_tok.special_tokens[s] for s in strings if s not in have} - set(range(tok.vocab_size)))
    resize_token_embeddings(model, max(model.cfg.d_vocab, new_tok.vocab_size), init_rows=new_ids)
    model.tokenizer = new_tok
    return {s: new_tok.special_tokens[s] for s in strings}


@torch.no_grad()
def resize_token_embeddings(model: GPT, d_vocab: int, init_rows: Sequence[int] = ()) -> None:
    """Grow `embed`/`unembed` to `d_vocab` rows (in place; hook names unchanged) and set `init_rows` of both
    to the mean of the rows of the tokenizer's original vocabulary."""
    old = model.cfg.d_vocab
    if d_vocab < old:
        raise SettingError(f"cannot shrink the vocabulary from {old} to {d_vocab}")
    tok = model.tokenizer
    n_mean = min(old, tok.vocab_size) if tok is not None else old
    tied = model.unembed.weight is model.embed.weight
    if d_vocab > old:
        w = model.embed.weight
        new = torch.zeros(d_vocab, w.shape[1], device=w.device, dtype=w.dtype)
        new[:old] = w
        model.embed.weight = nn.Parameter(new, requires_grad=w.requires_grad)
        model.embed.num_embeddings = d_vocab
        if tied:
            model.unembed.weight = model.embed.weight
        else:
            u = model.unembed.weight
            new_u = torch.zeros(d_vocab, u.shape[1], device=u.device, dtype=u.dtype)
            new_u[:old] = u
            model.unembed.weight = nn.Parameter(new_u, requires_grad=u.requires_grad)
        model.unembed.out_features = d_vocab
        model._zero_b_U = torch.zeros(d_vocab, device=model._zero_b_U.device, dtype=model._zero_b_U.dtype)
        model.cfg.d_vocab = d_vocab
    rows = list(init_rows)
    if rows:
        for w in [model.embed.weight] + ([] if tied else [model.unembed.weight]):
            w[rows] = w[:n_mean].float().mean(0).to(w.dtype)


__all__ = ["add_special_tokens", "resize_token_embeddings"]
