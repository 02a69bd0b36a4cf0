"""Shared by the dashboard tests (tests/test_widgets_*.py): tiny models and reading plotly cells back."""

from __future__ import annotations

import math

import numpy as np
import torch
from _model_helpers import tiny_model

from tinygpt import GPT, GPTConfig

PROMPT = "ROMEO: But soft, what light"

#: Architecture variants (and combinations) every interpretability dashboard must handle.
VARIANTS = {
    "moe": dict(moe_experts=4, moe_topk=2),
    "mod": dict(mod=True),
    "diff_attn": dict(diff_attn=True),
    "yoco": dict(yoco=True, yoco_window=4),
    "moe+mod": dict(moe_experts=4, mod=True),
    "diff_attn+mod": dict(diff_attn=True, mod=True),
    "yoco+mod": dict(yoco=True, yoco_window=4, mod=True, mod_every=1),
}


def make_model(seed: int = 0) -> GPT:
    """A seeded 2-layer model with d_model 64 (matrices wide enough for the surgery grids), in eval mode."""
    torch.manual_seed(seed)
    return GPT(GPTConfig(n_layers=2, d_model=64, n_heads=2, n_ctx=64)).eval()


def variant_model(variant: str) -> GPT:
    """`tiny_model` of one of `VARIANTS`; a mixture-of-depths router routes some tokens through block 1."""
    m = tiny_model(**VARIANTS[variant])
    if "mod" in VARIANTS[variant]:
        with torch.no_grad():
            m.blocks[1].router.weight.normal_(0, 1.0)  # route some tokens through block 1, skip others
    return m


def as_array(z) -> np.ndarray:
    """A plotly heatmap's z (nested lists, None for an empty cell) as a float array (NaN for empty)."""
    return np.array([[math.nan if v is None else v for v in row] for row in z], dtype=float)


def cached(model, prompt, names):
    """The activations `names` of `prompt` from one `run_with_cache`."""
    _, cache = model.run_with_cache(model.to_tokens(prompt), names_filter=names)
    return cache
