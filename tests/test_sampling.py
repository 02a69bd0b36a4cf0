"""Sampling: seeds, greedy decoding, the KV cache (including past n_ctx), streaming and argument checks."""

from __future__ import annotations

import pytest
import torch

from tinygpt import GPT, GPTConfig, generate, stream, train_bpe
from tinygpt.sampling import generate_tokens, sample_next

PROMPT = "ROMEO:\n"


@pytest.fixture(scope="module")
def model() -> GPT:
    """A random byte-level model with a short context (n_ctx 32), so generation runs past it."""
    torch.manual_seed(0)
    m = GPT(GPTConfig(n_layers=2, d_model=32, n_heads=2, n_ctx=32))
    # sharpen the output distribution a little so greedy/top-k decoding is far from ties
    with torch.no_grad():
        m.unembed.weight.mul_(20)
    return m.eval()


@pytest.fixture(scope="module")
def bpe_model() -> GPT:
    text = "But soft, what light through yonder window breaks? It is the east, and Juliet is the sun.\n" * 30
    tok = train_bpe([text], 320, progress=False)
    torch.manual_seed(1)
    return GPT(GPTConfig(n_layers=1, d_model=32, n_heads=2, n_ctx=32, d_vocab=tok.vocab_size), tokenizer=tok).eval()


def tokens(model: GPT, text: str) -> torch.Tensor:
    return torch.tensor([model.tokenizer.encode(text)])


# ---------------------------------------------------------------------------------------------- seeds
def test_same_seed_same_text(model):
    a = generate(model, PROMPT, 40, seed=7)
    assert a.startswith(PROMPT) and len(a) > len(PROMPT)
    assert generate(model, PROMPT, 40, seed=7) == a
    assert model.generate(PROMPT, 40, seed=7) == a


def test_different_seeds_differ(model):
    outs = {generate(model, PROMPT, 30, seed=s) for s in range(4)}
    assert len(outs) >= 3


def test_generation_does_not_touch_global_rng(model):
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    generate(model, PROMPT, 10, seed=1)
    assert torch.equal(torch.rand(3), expected)


def test_restores_training_mode(model):
    model.train()
    try:
        generate(model, PROMPT, 3, seed=0)
        assert model.training
    finally:
        model.eval()


# --------------------------------------------------------------------------------------------- greedy
def test_temperature_zero_is_argmax(model):
    prompt = tokens(model, PROMPT)
    out = generate(model, prompt, 20, temperature=0)
    assert out.shape == (1, prompt.shape[1] + 20)
    assert torch.equal(out[:, : prompt.shape[1]], prompt)
    with torch.no_grad():
        for i in range(prompt.shape[1], out.shape[1]):
            assert int(out[0, i]) == int(model(out[:, :i])[0, -1].argmax()), i


def test_top_k_one_is_greedy(model):
    greedy = generate(model, PROMPT, 25, temperature=0)
    for seed in range(3):
        assert generate(model, PROMPT, 25, temperature=1.0, top_k=1, seed=seed) == greedy


def test_sample_next_filters():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]])
    g = torch.Generator().manual_seed(0)
    draws = {int(sample_next(logits, 1.0, top_k=2, generator=g)) for _ in range(200)}
    assert draws == {0, 1}
    # softmax([4,3,2,1,0]) = [.636, .234, .086, .032, .012]: top_p 0.8 keeps the first two
    draws = {int(sample_next(logits, 1.0, top_p=0.8, generator=g)) for _ in range(200)}
    assert draws == {0, 1}
    draws = {int(sample_next(logits, 1.0, top_p=0.5, generator=g)) for _ in range(50)}
    assert draws == {0}  # the top token alone reaches 0.5
    assert torch.equal(sample_next(torch.tensor([[0.0, 2.0], [3.0, 1.0]]), temperature=0), torch.tensor([1, 0]))


# ------------------------------------------------------------------------------------------- KV cache
@pytest.mark.parametrize(
    "kwargs",
    [dict(temperature=1.0), dict(temperature=0.8, top_k=5), dict(temperature=1.2, top_p=0.9), dict(temperature=0)],
    ids=["t1", "topk", "topp", "greedy"],
)
def test_kv_cache_matches_no_cache_past_n_ctx(model, kwargs):
    prompt = tokens(model, PROMPT)
    for seed in range(3):
        with_cache = generate(model, prompt, 80, seed=seed, use_cache=True, **kwargs)  # 87 tokens > n_ctx 32
        without = generate(model, prompt, 80, seed=seed, use_cache=False, **kwargs)
        assert with_cache.shape == (1, prompt.shape[1] + 80)
        assert torch.equal(with_cache, without), (seed, kwargs)


def test_kv_cache_matches_with_prompt_longer_than_n_ctx(model):
    prompt = tokens(model, "O Romeo, Romeo! wherefore art thou Romeo? Deny thy father and refuse thy name.")
    assert prompt.shape[1] > model.cfg.n_ctx
    for seed in range(3):
        a = generate(model, prompt, 30, seed=seed, top_k=20)
        b = generate(model, prompt, 30, seed=seed, top_k=20, use_cache=False)
        assert torch.equal(a, b)
        assert torch.equal(a[:, : prompt.shape[1]], prompt)


def test_batched_prompts(model):
    prompt = torch.stack([tokens(model, "abcd")[0], tokens(model, "wxyz")[0]])
    a = generate(model, prompt, 40, seed=3)
    assert a.shape == (2, 44)
    assert torch.equal(a, generate(model, prompt, 40, seed=3, use_cache=False))


# -------------------------------------------------------------------------------------------- stream
def test_stream_concatenates_to_completion(model):
    for seed in range(3):
        full = generate(model, PROMPT, 60, seed=seed, top_p=0.95)
        pieces = list(stream(model, PROMPT, 60, seed=seed, top_p=0.95))
        assert len(pieces) > 1
        assert "".join(pieces) == full[len(PROMPT) :]


def test_stream_holds_back_partial_utf8(model, bpe_model, monkeypatch):
    """A multi-byte character arrives as one piece, never as replacement characters."""
    import tinygpt.sampling

    def fake(tok):
        ids = tok.encode("a\u00e9\u20acb")  # "aé€b": 1 + 2 + 3 + 1 bytes

        def gen(*args, **kwargs):
            for i in ids:
                yield torch.tensor([i])

        return ids, gen

    ids, gen = fake(model.tokenizer)
    monkeypatch.setattr(tinygpt.sampling, "generate_tokens", gen)
    assert list(stream(model, PROMPT, len(ids))) == ["a", "\u00e9", "\u20ac", "b"]
    ids, gen = fake(bpe_model.tokenizer)
    assert len(ids) >= 4  # the Euro sign is split into byte tokens
    monkeypatch.setattr(tinygpt.sampling, "generate_tokens", gen)
    pieces = list(stream(bpe_model, "But", len(ids)))
    assert "".join(pieces) == "a\u00e9\u20acb"
    assert not any("\ufffd" in p for p in pieces)


def test_bpe_model_generates_and_streams(bpe_model):
    tok = bpe_model.tokenizer
    prompt = "But soft, what light"
    text = generate(bpe_model, prompt, 30, seed=2)
    assert text.startswith(prompt)
    ids = generate(bpe_model, torch.tensor(tok.encode(prompt)), 30, seed=2)
    assert ids.shape == (1, len(tok.encode(prompt)) + 30)
    assert int(ids.max()) < tok.vocab_size
    assert text == tok.decode(ids[0].tolist())
    completion = tok.decode(ids[0, len(tok.encode(prompt)) :].tolist())
    assert "".join(stream(bpe_model, prompt, 30, seed=2)) == completion
    assert torch.equal(ids, generate(bpe_model, torch.tensor(tok.encode(prompt)), 30, seed=2, use_cache=False))


# ------------------------------------------------------------------------------------------ arguments
@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(temperature=-0.1), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_k=0), "top_k"),
        (dict(top_k=2.5), "top_k"),
        (dict(max_new_tokens=-1), "max_new_tokens"),
    ],
)
def test_bad_arguments(model, kwargs, match):
    kw = dict(max_new_tokens=5, seed=0)
    kw.update(kwargs)
    with pytest.raises(ValueError, match=match):
        generate(model, PROMPT, **kw)
    with pytest.raises(ValueError, match=match):
        list(stream(model, PROMPT, **kw))


def test_empty_prompt(model):
    with pytest.raises(ValueError, match="prompt is empty"):
        generate(model, "", 5)
    with pytest.raises(ValueError, match="prompt is empty"):
        list(stream(model, "", 5))
    with pytest.raises(ValueError, match="prompt is empty"):
        list(generate_tokens(model, torch.zeros(1, 0, dtype=torch.long), 5))


def test_default_prompt(model):
    """Like `tinygpt.generate`, `model.generate()` without a prompt starts from a newline."""
    out = model.generate(max_new_tokens=5, seed=0)
    assert out == generate(model, "\n", 5, seed=0) and out.startswith("\n")
    assert generate(model, max_new_tokens=5, seed=0) == out


def test_zero_new_tokens(model):
    assert generate(model, PROMPT, 0) == PROMPT
    assert list(stream(model, PROMPT, 0)) == []


def test_stop_at_eos(bpe_model):
    tok = bpe_model.tokenizer
    with torch.no_grad():  # make EOS the most likely token everywhere
        model = GPT(bpe_model.cfg, tokenizer=tok)
        model.load_state_dict(bpe_model.state_dict())
        model.unembed.weight[tok.eos_id] = 0
        model.ln_final.bias.fill_(0)
        model.ln_final.bias[0] = 1.0
        model.unembed.weight[tok.eos_id, 0] = 100.0
    out = generate(model, torch.tensor(tok.encode("But")), 10, temperature=0, stop_at_eos=True)
    assert out[0, -1] == tok.eos_id and out.shape[1] == len(tok.encode("But")) + 1
    with pytest.raises(ValueError, match="EOS"):
        generate(GPT(GPTConfig(n_layers=1, d_model=32, n_heads=2, n_ctx=32)), "a", 3, stop_at_eos=True)


def test_ablations_are_registered_by_interp(model):
    """`generate(..., ablate=...)` runs under the intervention `tinygpt.interp.ablation` registers at import
    (the sampling layer imports nothing above it)."""
    import tinygpt.sampling
    from tinygpt.interp.ablation import as_ablation_context

    assert tinygpt.sampling._interventions["ablate"] is as_ablation_context
    plain = generate(model, PROMPT, 8, seed=3, temperature=0)
    ablated = generate(model, PROMPT, 8, seed=3, temperature=0, ablate="0.attn, 0.mlp, 1")
    assert ablated.startswith(PROMPT) and len(ablated) == len(plain)
