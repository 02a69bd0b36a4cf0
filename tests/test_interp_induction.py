"""Attention views, and a scientific check: in a small model trained on repeated random tokens, the head with
the highest induction score is the head whose ablation most hurts the repeated half, and activation patching
localises the effect to the same head."""

from __future__ import annotations

import pytest
import torch

from tinygpt import GPT, GPTConfig
from tinygpt.interp import (
    Ablation,
    ablation_sweep,
    attention_maps,
    attention_patterns,
    induction_batch,
    induction_scores,
    patch_heads,
    previous_token_scores,
    repeated_tokens,
    train_induction_model,
)

SEED = 3  # the checks held for seeds 0..5 locally; one is fixed here so the test is deterministic
SEQ = 20  # half-length of the evaluation sequences


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


def test_induction_batch_layout():
    gen = torch.Generator().manual_seed(0)
    tokens, targets = induction_batch(16, 64, 50, generator=gen)
    assert tokens.shape == targets.shape == (16, 64)
    for row_t, row_y in zip(tokens, targets):
        idx = (row_y != -100).nonzero().flatten()
        assert len(idx) >= 5
        assert torch.equal(row_y[idx], row_t[idx + 1])  # targets are next tokens
        seg = len(idx) + 1  # the copy's length: every copy position but the last predicts
        start = int(idx[0])  # first copy position
        assert torch.equal(row_t[start : start + seg], row_t[start - seg : start])  # it repeats what precedes it
    rep = repeated_tokens(3, 7, 50, seed=1)
    assert rep.shape == (3, 14) and torch.equal(rep[:, :7], rep[:, 7:])


# ------------------------------------------------------------------------------------------ scientific check
@pytest.fixture(scope="module")
def induction_model():
    return train_induction_model(seed=SEED)


def test_induction_head_is_found_by_scores_ablation_and_patching(induction_model):
    model = induction_model
    v = model.cfg.d_vocab
    scores = induction_scores(model, seq_len=SEQ, batch=16, seed=1)
    layer, head = divmod(int(scores.argmax()), model.cfg.n_heads)
    assert layer == 1, f"the top induction head should be in the second layer:\n{scores}"
    assert scores[layer, head] > 0.3, f"no real induction head formed:\n{scores}"

    # 1. ablation: loss on the repeated half only (the first half is unpredictable noise)
    tokens = repeated_tokens(32, SEQ, v, seed=2)
    targets = torch.full_like(tokens, -100)
    targets[:, SEQ:-1] = tokens[:, SEQ + 1 :]
    sweep = ablation_sweep(
        model,
        tokens,
        modes=("mean",),
        components=(),
        heads=True,
        targets=targets,
        reference_tokens=repeated_tokens(32, SEQ, v, seed=3),
        progress=False,
    )
    (worst, increase), (second, increase2) = sweep.top(2)
    assert worst == Ablation(layer, "head", head, "mean"), f"{sweep.delta('head', 'mean')}\n{scores}"
    assert increase > 1.0 and increase > 1.5 * increase2

    # 2. patching: clean = [A, A], corrupted = [B, A]; the metric is the log-probability of A's next tokens
    clean = repeated_tokens(8, SEQ, v, seed=4)
    corrupted = clean.clone()
    corrupted[:, :SEQ] = repeated_tokens(8, SEQ, v, seed=5)[:, :SEQ]

    def metric(logits):
        logp = logits[:, SEQ:-1].log_softmax(-1)
        return logp.gather(-1, clean[:, SEQ + 1 :, None]).mean()

    res = patch_heads(model, clean, corrupted, metric, normalize=True)
    assert res.clean_metric > res.corrupted_metric + 1.0
    best = res.top(1)[0][0]
    assert (best["layer"], best["head"]) == (layer, head), f"{res.values}\n{scores}"
    assert res.values[layer, head] > 0.5  # patching that one head recovers most of the clean behaviour
