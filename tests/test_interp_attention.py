"""Attention views (`tinygpt.interp.attention`): per-head maps, differential attention's maps and λ, a
mixture-of-depths block's maps at token positions, the figures, and the induction / previous-token score formulas."""

from __future__ import annotations

import pytest
import torch

from tinygpt import GPT, GPTConfig
from tinygpt.interp import attention_maps, attention_patterns, induction_scores, previous_token_scores


# ------------------------------------------------------------------------------------------ attention views
@pytest.fixture(scope="module")
def small():
    torch.manual_seed(0)
    return GPT(GPTConfig(n_layers=2, d_model=32, n_heads=4, n_ctx=48, init_std=0.2)).eval()


def test_attention_patterns(small):
    att = attention_patterns(small, "Hello, world")
    n = len("Hello, world")
    assert att.patterns.shape == (2, 4, n, n) and att.layers == [0, 1]
    assert att.str_tokens == list("Hello, world") and att.tokens.tolist() == list(b"Hello, world")
    torch.testing.assert_close(att.patterns.sum(-1), torch.ones(2, 4, n))
    assert (att.patterns.triu(1) == 0).all()  # causal
    _, cache = small.run_with_cache(att.tokens[None])
    torch.testing.assert_close(att.head(1, 2), cache["pattern", 1][0, 2])
    last = attention_patterns(small, att.tokens, layers=[-1])
    assert last.layers == [1] and last.patterns.shape == (1, 4, n, n)
    with pytest.raises(KeyError, match="not collected"):
        last.head(0, 0)
    with pytest.raises(ValueError, match="out of range"):
        attention_patterns(small, "hi", layers=[2])
    assert attention_maps(small, 0) == {"pattern": "blocks.0.attn.hook_pattern"}


def test_attention_figures(small):
    att = attention_patterns(small, "abcdef")
    fig = att.figure(1, 3)
    assert list(fig.data[0].x) == [f"{i} {c!r}" for i, c in enumerate("abcdef")]
    assert fig.data[0].z[0][1] == 0  # row = destination, column = source: token 0 cannot see token 1
    grid = att.grid()
    assert len(grid.data) == 2 * 4
    assert len(att.grid(layers=[0], heads=[1, 2]).data) == 2


def test_attention_patterns_of_differential_attention_keep_both_maps_and_lambda():
    torch.manual_seed(0)
    m = GPT(GPTConfig(n_layers=2, d_model=32, n_heads=2, n_ctx=48, diff_attn=True)).eval()
    att = attention_patterns(m, "abcabc")
    assert sorted(att.maps) == ["pattern", "pattern1", "pattern2"]
    _, cache = m.run_with_cache(att.tokens[None])
    for layer in (0, 1):
        lam = cache[f"blocks.{layer}.attn.hook_lambda"]
        assert att.lambdas[layer] == pytest.approx(float(lam))
        torch.testing.assert_close(att.head(layer, 1, "pattern2"), cache[f"blocks.{layer}.attn.hook_pattern2"][0, 1])
        torch.testing.assert_close(
            att.head(layer, 1), att.head(layer, 1, "pattern1") - lam * att.head(layer, 1, "pattern2"), atol=1e-6, rtol=0
        )
    fig = att.figure(1, 0)  # signed: a diverging scale around 0
    assert fig.data[0].zmin == -fig.data[0].zmax
    every = att.figure(1, 0, map="all")  # A1, A2, then the signed combined map with λ in its title
    assert [t.name for t in every.data] == ["pattern1", "pattern2", "pattern"]
    assert f"λ = {att.lambdas[1]:.3f}" in every.layout.annotations[2].text
    assert every.data[0].zmin == 0 and every.data[2].zmin == -every.data[2].zmax


def test_attention_patterns_of_a_mixture_of_depths_block_are_placed_at_token_positions():
    torch.manual_seed(0)
    m = GPT(GPTConfig(n_layers=2, d_model=32, n_heads=2, n_ctx=48, mod=True)).eval()
    with torch.no_grad():
        m.blocks[1].router.weight.normal_(0, 1.0)  # routes some tokens, skips others
    text = "To be, or not to be"
    att = attention_patterns(m, text)
    _, cache = m.run_with_cache(att.tokens[None])
    mask = cache["blocks.1.hook_routing_mask"][0]
    idx = mask.nonzero()[:, 0]
    assert 0 < len(idx) < len(text)
    assert torch.equal(att.routing_masks[1], mask) and 0 not in att.routing_masks  # block 0 is dense
    full = att.head(1, 1)
    torch.testing.assert_close(full[idx][:, idx], cache["blocks.1.attn.hook_pattern"][0, 1])
    skipped = (~mask).nonzero()[:, 0]
    assert full[skipped].isnan().all() and full[:, skipped].isnan().all()
    torch.testing.assert_close(att.head(0, 1), cache["blocks.0.attn.hook_pattern"][0, 1])
    fig = att.figure(1, 1)  # skipped tokens are blank cells (None), not NaN in the JSON
    assert fig.data[0].z[int(skipped[0])][0] is None
    # scores average over the tokens a routed block computes; dense layers are unaffected
    scores = induction_scores(m, seq_len=10)
    assert scores.shape == (2, 2) and scores.isfinite().all()
    prev = previous_token_scores(m, seq_len=12)
    assert prev.isfinite().all() and (prev >= 0).all() and (prev <= 1).all()


def _force(pattern_fn):
    """A hook replacing blocks.1.attn.hook_pattern's head 2 by `pattern_fn(t)` [t, t]."""

    def hook(pattern, hook):
        pattern = pattern.clone()
        pattern[:, 2] = pattern_fn(pattern.shape[-1]).to(pattern.dtype)
        return pattern

    return hook


def test_induction_and_previous_token_score_formulas(small):
    def induction(t):  # each second-half token attends to the token after its first occurrence
        half = t // 2
        p = torch.zeros(t, t)
        p[:half, 0] = 1
        p[torch.arange(half, t), torch.arange(half, t) - half + 1] = 1
        return p

    def previous(t):
        p = torch.zeros(t, t)
        p[0, 0] = 1
        p[torch.arange(1, t), torch.arange(t - 1)] = 1
        return p

    with small.hooks(fwd_hooks=[("blocks.1.attn.hook_pattern", _force(induction))]):
        scores = induction_scores(small, seq_len=10, batch=3)
    assert scores.shape == (2, 4)
    assert scores[1, 2] == pytest.approx(1.0)
    assert scores.flatten().topk(2).values[1] < 0.5  # random heads score low
    with small.hooks(fwd_hooks=[("blocks.1.attn.hook_pattern", _force(previous))]):
        prev = previous_token_scores(small, seq_len=12, batch=2)
    assert prev[1, 2] == pytest.approx(1.0) and prev[0].max() < 0.7
    with pytest.raises(ValueError, match="seq_len"):
        induction_scores(small, seq_len=30)
