"""Shared by the lens tests and the lens-dashboard tests."""

from __future__ import annotations

import torch

from tinygpt import GPT
from tinygpt.interp import TunedLens


def random_lens(model: GPT, seed: int = 1, scale: float = 0.3) -> TunedLens:
    """A tuned lens with random translators of about `scale` relative size (far from the identity)."""
    lens = TunedLens.from_model(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lens.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale / p.shape[-1] ** 0.5)
    return lens
