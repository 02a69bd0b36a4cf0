"""Shared by the surgery tests (test_surgery_hqq, test_surgery_hqq_analysis, test_surgery_laser_analysis,
test_surgery_evaluation): the small seeded model they cut up."""

from __future__ import annotations

import torch

from tinygpt import GPT, GPTConfig


def make_model(n_layers: int = 2, d_model: int = 64, seed: int = 0, **kw) -> GPT:
    """A seeded GPT (2 heads, n_ctx 64, byte vocabulary) in eval mode; `kw` are further `GPTConfig` fields."""
    torch.manual_seed(seed)
    return GPT(GPTConfig(n_layers=n_layers, d_model=d_model, n_heads=2, n_ctx=64, **kw)).eval()
