"""The memorization test (`tinygpt.eval.memorization`): overlap measures, training vs held-out examples."""

from __future__ import annotations

import random

import torch
from _eval_helpers import TEXT, small

from tinygpt import GPT, GPTConfig
from tinygpt.eval import longest_common_prefix, longest_common_substring, memorization_test


def test_overlap_measures():
    assert longest_common_prefix([1, 2, 3, 4], [1, 2, 9, 4]) == 2
    assert longest_common_prefix([5], [1]) == 0
    assert longest_common_substring([9, 1, 2, 3, 7], [1, 2, 3, 8, 7]) == 3
    assert longest_common_substring([1, 2], [3, 4]) == 0


def test_memorization_separates_training_examples_from_held_out_ones():
    rng = random.Random(0)
    letters = "abcdefghijklmnopqrstuvwxyz"
    train_texts = ["".join(rng.choice(letters) for _ in range(32)) for _ in range(8)]
    held_texts = ["".join(rng.choice(letters) for _ in range(32)) for _ in range(8)]
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layers=2, d_model=64, n_heads=4, n_ctx=32))
    x = torch.tensor([list(t.encode()) for t in train_texts])
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(400):
        loss = model(x, return_type="loss")
        opt.zero_grad()
        loss.backward()
        opt.step()
        if loss.item() < 0.02:
            break
    model.eval()
    res = memorization_test(model, train_texts, held_texts, prefix_tokens=12, continuation_tokens=16, progress=False)
    assert res.train.n == res.heldout.n == 8
    assert res.train.exact_rate >= 0.75, res.table()
    assert res.heldout.exact_rate == 0.0 and res.heldout.mean_lcp < 2, res.table()
    assert res.train.mean_lcp > 12 and res.gap >= 0.75
    assert res.train.max_lcs >= res.train.max_lcp
    ex = res.examples["train"][0]
    assert any(t.startswith(ex["prefix"] + ex["truth"]) for t in train_texts)
    assert len(res.figure().data) == 2
    assert "verbatim" in res.table()


def test_memorization_draws_windows_from_a_single_text():
    model = small()
    res = memorization_test(model, TEXT, TEXT[::-1], prefix_tokens=8, continuation_tokens=4, n=5, progress=False)
    assert res.train.n == 5 and res.heldout.n == 5
    assert all(len(model.tokenizer.encode(e["prefix"])) == 8 for e in res.examples["train"] if e["prefix"].isascii())
