"""Small pieces the interpretability results share: readable tokens and the plotting helpers of `.figure()`.

Nothing here imports plotly: the helpers prepare the plain lists plotly is given.
"""

from __future__ import annotations

import html
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor


def str_tokens(model: Any, ids: Iterable[int]) -> list[str]:
    """One readable string per token id (`tokenizer.token_str`; the id itself for a model without a tokenizer)."""
    tok = getattr(model, "tokenizer", None)
    seen: dict[int, str] = {}
    out = []
    for i in ids:
        i = int(i)
        if i not in seen:
            seen[i] = tok.token_str(i) if tok is not None else str(i)
        out.append(seen[i])
    return out


def position_ticks(tokens: list[str]) -> list[str]:
    """Axis labels "0 'a'", "1 'b'", ...: unique per position, so a category axis keeps repeated tokens apart."""
    return [f"{i} {s!r}" for i, s in enumerate(tokens)]


def show_token(s: str) -> str:
    """A token made visible in a plot cell: escaped newlines/tabs, spaces as '␣' when it is all blank."""
    s = s.replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r")
    if not s.strip():
        s = s.replace(" ", "␣")
    return html.escape(s)


def nan_to_none(z: Tensor) -> list[list[float | None]]:
    """A [rows, cols] tensor as nested lists with NaN as None (a blank heatmap cell, valid JSON)."""
    return [[None if v != v else v for v in row] for row in z.float().tolist()]


def color_range(z: Tensor, *, signed: bool = False) -> dict[str, Any]:
    """Heatmap colours: Blues on [0, max] for non-negative values (probabilities); a diverging scale around 0
    for signed ones (and always when `signed`, e.g. differential attention's A1 - λ A2). NaN is ignored."""
    finite = z[torch.isfinite(z)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.numel() else (0.0, 1.0)
    if lo >= 0 and not signed:
        return dict(colorscale="Blues", zmin=0.0, zmax=max(hi, 1e-9))
    lim = max(abs(lo), abs(hi), 1e-9)
    return dict(colorscale="RdBu_r", zmin=-lim, zmax=lim)
