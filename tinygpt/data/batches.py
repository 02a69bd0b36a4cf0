"""Deterministic batches: window starts a pure function of (seed, step), and fixed validation windows.

That makes resumed runs exact and lets data-parallel processes agree on the global batch.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from tinygpt.errors import TinyGPTValueError


def batch_starts(n_tokens: int, ctx: int, count: int, seed: int, step: int) -> Tensor:
    """`count` window starts for optimizer step `step`: a pure function of (seed, step)."""
    high = n_tokens - ctx  # exclusive: the last window starts at n_tokens - ctx - 1
    if high < 1:
        raise TinyGPTValueError(f"{n_tokens} tokens are too few for windows of ctx+1={ctx + 1}")
    g = torch.Generator().manual_seed((seed * 1_000_003 + step) % (2**63))
    return torch.randint(0, high, (count,), generator=g)


def windows(tokens: np.ndarray, starts: Tensor, ctx: int, device=None) -> tuple[Tensor, Tensor]:
    """Input and target windows x, y [len(starts), ctx] (y is x shifted by one)."""
    arr = np.stack([np.asarray(tokens[s : s + ctx + 1]) for s in starts.tolist()]).astype(np.int64)
    t = torch.from_numpy(arr)
    if device is not None and str(device) != "cpu":
        t = t.to(device, non_blocking=True)
    return t[:, :-1], t[:, 1:]


def val_starts(n_tokens: int, ctx: int, count: int) -> Tensor:
    """Evenly spaced windows over a validation split (the same every evaluation)."""
    high = n_tokens - ctx - 1
    if high < 1:
        raise TinyGPTValueError(f"validation split has {n_tokens} tokens, too few for ctx={ctx}; raise --val-split")
    return torch.linspace(0, high, count).long().unique()


__all__ = ["batch_starts", "val_starts", "windows"]
