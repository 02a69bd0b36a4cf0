"""Prompt pairs the circuit tests share (helper `edges`): the induction task's K-composition corruption."""

from __future__ import annotations

import torch


def induction_pair(batch: int = 8, *, seg: int = 8, d_vocab: int = 64, seed: int = 0):
    """Random tokens with a segment repeated once; each prompt ends inside the copy, so the next token is the one
    that followed the last token's first occurrence (the induction head's job). The corrupted prompt changes
    that first occurrence only, so the key the induction head looks for is gone (K-composition): a previous-
    token head's output at the position after it is what differs.

    Returns:
        clean, corrupted [batch, 2 + seg + seg // 2 + 1] tokens, correct and incorrect [batch] answer ids.
    """
    g = torch.Generator().manual_seed(seed)
    start = 2
    end = start + seg + seg // 2  # the last position: the copy of start + seg // 2
    toks = torch.randint(0, d_vocab, (batch, start + 2 * seg), generator=g)
    toks[:, start + seg :] = toks[:, start : start + seg]
    toks = toks[:, : end + 1]
    j = start + seg // 2
    correct = toks[:, j + 1].clone()
    corrupted = toks.clone()
    corrupted[:, j] = (toks[:, j] + 1 + torch.randint(0, d_vocab - 1, (batch,), generator=g)) % d_vocab
    incorrect = (correct + 1 + torch.randint(0, d_vocab - 1, (batch,), generator=g)) % d_vocab
    return toks, corrupted, correct, incorrect
