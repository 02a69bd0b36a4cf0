"""Evolution strategies: fitness shaping, seeded antithetic noise, bitwise restoration, the update rule, rewards,
the vmapped and sequential paths, and the CLI."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from _model_helpers import tiny_model

from tinygpt import GPT, load
from tinygpt.cli import main
from tinygpt.data import batch_starts, windows
from tinygpt.training.es import (
    ESConfig,
    ESParams,
    centered_ranks,
    es,
    noise_seed,
    select_parameters,
    word_list_reward,
    words_of,
)


def make_model(seed: int = 0, **kw) -> GPT:
    """`tiny_model` with one layer and n_ctx 32."""
    return tiny_model(seed, **{"n_layers": 1, "n_ctx": 32, **kw})


@pytest.fixture(scope="module")
def stream() -> torch.Tensor:
    """A learnable token stream: a repeated phrase with some noise."""
    g = torch.Generator().manual_seed(0)
    phrase = torch.tensor(list(b"to be or not to be, that is the question. "))
    s = phrase.repeat(60)
    flip = torch.rand(len(s), generator=g) < 0.05
    return torch.where(flip, torch.randint(0, 256, s.shape, generator=g), s)


# ------------------------------------------------------------------------------------------ fitness shaping
def test_centered_ranks_are_ranks_scaled_to_half_with_ties_averaged():
    r = centered_ranks([3.0, -1.0, 10.0, 0.5])
    np.testing.assert_allclose(r, [1 / 6, -0.5, 0.5, -1 / 6])
    assert r.sum() == pytest.approx(0.0)
    t = centered_ranks([1.0, 2.0, 2.0, 5.0, 2.0])  # three ties share rank (1+2+3)/3 = 2
    np.testing.assert_allclose(t, [0 / 4 - 0.5, 0.0, 0.0, 4 / 4 - 0.5, 0.0])
    np.testing.assert_allclose(centered_ranks([7.0, 7.0, 7.0, 7.0]), 0.0)


def test_centered_ranks_ignore_monotone_transforms():
    x = np.random.default_rng(0).normal(size=12)
    np.testing.assert_array_equal(centered_ranks(x), centered_ranks(np.exp(3 * x) + 100))


def test_centered_ranks_reject_bad_input():
    with pytest.raises(ValueError, match="at least 2"):
        centered_ranks([1.0])
    with pytest.raises(ValueError, match="finite"):
        centered_ranks([1.0, float("nan")])


# ------------------------------------------------------------------------------------------ noise and restore
def test_noise_is_seeded_per_step_pair_and_tensor():
    seeds = {noise_seed(0, s, j, k) for s in range(3) for j in range(4) for k in range(5)}
    assert len(seeds) == 60
    assert noise_seed(1, 0, 0, 0) != noise_seed(0, 0, 0, 0)
    model = make_model()
    a, b = ESParams(model, seed=3), ESParams(copy.deepcopy(model), seed=3)
    for i in range(len(a.params)):
        assert torch.equal(a.noise(2, 1, i), b.noise(2, 1, i))
    e = a.noise(0, 0, 0)
    assert not torch.equal(e, a.noise(0, 1, 0)) and not torch.equal(e, a.noise(1, 0, 0))
    big = next(i for i, p in enumerate(a.params) if p.numel() > 1000)
    n = a.noise(0, 0, big)
    assert abs(float(n.mean())) < 0.1 and abs(float(n.std()) - 1) < 0.1


def test_antithetic_members_are_centre_plus_and_minus_sigma_noise(snapshot, assert_bitwise_equal):
    model = make_model()
    space = ESParams(model)
    snap = snapshot(model)
    i = space.names.index("blocks.0.mlp.fc_in.weight")
    eps = space.noise(5, 3, i)
    for member, sign in ((6, 1.0), (7, -1.0)):
        with space.perturbed(5, member, 0.1):
            torch.testing.assert_close(space.params[i].detach(), space.center[i] + sign * 0.1 * eps)
        assert_bitwise_equal(model, snap)


def test_perturbation_is_restored_bit_for_bit_after_every_evaluation_and_on_errors(snapshot, assert_bitwise_equal):
    model = make_model()
    snap = snapshot(model)
    space = ESParams(model)
    x = torch.randint(0, 256, (2, 16))
    for step in range(3):
        for m in range(6):
            with space.perturbed(step, m, 0.05), torch.no_grad():
                changed = any(not torch.equal(p, snap[n]) for n, p in zip(space.names, space.params))
                assert changed
                model(x)
            assert_bitwise_equal(model, snap)
    with pytest.raises(RuntimeError, match="boom"), space.perturbed(0, 0, 0.05):
        raise RuntimeError("boom")
    assert_bitwise_equal(model, snap)


def test_select_parameters_by_pattern_and_trainability():
    model = make_model()
    names = [n for n, _ in select_parameters(model, "blocks.*.mlp.*,ln_final.weight")]
    assert names == [
        "blocks.0.mlp.fc_in.weight",
        "blocks.0.mlp.fc_in.bias",
        "blocks.0.mlp.fc_out.weight",
        "blocks.0.mlp.fc_out.bias",
        "ln_final.weight",
    ]
    with pytest.raises(ValueError, match="matches no parameter"):
        select_parameters(model, "nothing.*")
    tied = make_model(tie_embeddings=True)
    tnames = [n for n, _ in select_parameters(tied)]
    assert "embed.weight" in tnames and "unembed.weight" not in tnames  # a shared weight once


# ------------------------------------------------------------------------------------------ es: exactness
@pytest.mark.parametrize("batched", [False, True])
def test_es_with_lr_zero_leaves_the_model_bitwise_unchanged(stream, batched, snapshot, assert_bitwise_equal):
    model = make_model()
    snap = snapshot(model)
    res = es(
        model, stream, steps=3, population=6, sigma=0.05, lr=0.0, ctx=16, batch_size=4, batched=batched, progress=False
    )
    assert len(res.history) == 3 and res.history[0]["pop_std"] > 0  # members really differed
    assert_bitwise_equal(model, snap)


def test_es_text_reward_sees_perturbed_weights_and_lr_zero_restores_them(snapshot, assert_bitwise_equal):
    model = make_model()
    snap = snapshot(model)
    w = model.blocks[0].mlp.fc_in.weight
    seen = []

    def reward(text: str) -> float:
        seen.append(torch.equal(w, snap["blocks.0.mlp.fc_in.weight"]))
        return float(text.count("a"))

    res = es(
        model, reward, steps=2, population=4, lr=0.0, prompts=["ab", "x"], samples=2, max_new_tokens=4, progress=False
    )
    assert_bitwise_equal(model, snap)
    # per step: the centre (4 texts: 2 prompts x 2 samples) then 4 members; the members' weights differ
    assert len(seen) == 2 * (4 + 4 * 4) + 4
    assert seen[:4] == [True] * 4 and not any(seen[4:20])
    assert res.objective == "reward" and len(res.samples) == 4


# ------------------------------------------------------------------------------------------ es: the update
def test_one_es_step_applies_the_documented_update(stream):
    model = make_model()
    ref = copy.deepcopy(model)
    n, sigma, lr, ctx, bs, seed = 6, 0.03, 0.02, 16, 4, 7
    es(
        model,
        stream,
        steps=1,
        population=n,
        sigma=sigma,
        lr=lr,
        ctx=ctx,
        batch_size=bs,
        seed=seed,
        val_every=0,
        progress=False,
    )
    # recompute independently: the same batch for every member, centred ranks, θ + lr/(Nσ) Σ F_i ε_i
    tokens = stream.numpy()
    x, y = windows(tokens, batch_starts(len(tokens), ctx, bs, seed, 0), ctx)
    space = ESParams(ref, seed=seed)
    rewards = []
    for m in range(n):
        with space.perturbed(0, m, sigma), torch.no_grad():
            rewards.append(-float(ref(x, return_type="loss", targets=y)))
    f = centered_ranks(rewards)
    for i, name in enumerate(space.names):
        step = sum(f[m] * (1 if m % 2 == 0 else -1) * space.noise(0, m // 2, i) for m in range(n))
        want = space.center[i] + lr / (n * sigma) * step
        torch.testing.assert_close(dict(model.named_parameters())[name].detach(), want, atol=1e-6, rtol=1e-5)


def test_weight_decay_shrinks_matrices_only():
    model = make_model()
    space = ESParams(model)
    before = [c.clone() for c in space.center]
    space.update(0, np.zeros(4), sigma=0.1, lr=0.5, weight_decay=0.1)  # no fitness signal: decay alone
    for name, b, p in zip(space.names, before, space.params):
        want = b * (1 - 0.05) if b.ndim >= 2 else b
        torch.testing.assert_close(p.detach(), want)
        assert torch.equal(p.detach(), space.center[space.names.index(name)])


def test_batched_and_sequential_members_agree(stream):
    a, b = make_model(), make_model()
    kw = dict(steps=3, population=6, sigma=0.03, lr=0.01, ctx=16, batch_size=4, val_every=0, progress=False)
    ra = es(a, stream, batched=False, **kw)
    rb = es(b, stream, batched=True, member_batch=4, **kw)
    for ha, hb in zip(ra.history, rb.history):
        assert ha["pop_mean"] == pytest.approx(hb["pop_mean"], abs=1e-5)
        assert ha["reward"] == pytest.approx(hb["reward"], abs=1e-5)
    for (na, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        torch.testing.assert_close(pa, pb, atol=1e-5, rtol=1e-4, msg=na)


def test_only_selected_parameters_evolve(stream, snapshot):
    model = make_model()
    snap = snapshot(model)
    es(model, stream, steps=2, population=4, ctx=16, batch_size=2, params="ln_final.*", val_every=0, progress=False)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, snap[k])}
    assert changed == {"ln_final.weight", "ln_final.bias"}


def test_lora_model_evolves_only_its_adapters(stream, snapshot):
    from tinygpt.training.lora import add_lora

    model = make_model()
    add_lora(model, "attn.q_proj", rank=2)
    snap = snapshot(model)
    res = es(model, stream, steps=2, population=4, ctx=16, batch_size=2, val_every=0, progress=False)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, snap[k])}
    assert changed and all("lora_" in k for k in changed)
    assert res.n_params == sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)


# ------------------------------------------------------------------------------------------ es: it optimises
def test_es_lowers_the_loss(stream):
    model = make_model(seed=1)
    res = es(
        model,
        stream,
        steps=25,
        population=16,
        sigma=0.02,
        lr=0.01,
        ctx=16,
        batch_size=8,
        val_split=0.2,
        val_every=25,
        progress=False,
    )
    first, last = res.history[0]["loss"], res.final_val_loss
    assert last < first - 0.2, (first, last)
    assert res.losses == [h["loss"] for h in res.history] and res.val_losses[-1][0] == 25


def test_es_raises_a_non_differentiable_text_reward():
    model = make_model(seed=2)

    def share_of_lowercase(text: str) -> float:  # a count over sampled text: no gradient exists
        return sum(c.islower() for c in text) / max(1, len(text))

    kw = dict(prompts="\n", samples=4, max_new_tokens=8, temperature=1.0, progress=False)
    res = es(model, share_of_lowercase, steps=20, population=16, sigma=0.05, lr=0.05, **kw)
    start = np.mean([h["reward"] for h in res.history[:3]])  # ≈ 26/256 for a random byte model
    assert start < 0.3 and res.final_reward > start + 0.3, (start, res.final_reward)


# ------------------------------------------------------------------------------------------ es: the run
def test_es_saves_and_reloads(stream, tmp_path, snapshot, assert_bitwise_equal):
    model = make_model()
    out = tmp_path / "es.tinygpt"
    res = es(model, stream, steps=2, population=4, ctx=16, batch_size=2, val_every=0, out=out, progress=False)
    assert res.path == out
    back = load(out)
    assert_bitwise_equal(back, snapshot(model))
    st = back.train_state
    assert st["es"]["population"] == 4 and st["es"]["objective"] == "loss" and st["step"] == 2
    assert len(st["history"]) == 2


def test_es_resumes_exactly(stream, tmp_path, snapshot, assert_bitwise_equal):
    """2 steps, then resume=True to 4: the same weights, bit for bit, and the same history as 4 steps at once."""
    from tinygpt import TrainResult, read_checkpoint

    kw = dict(population=4, ctx=16, batch_size=2, val_every=0, progress=False)
    straight = es(make_model(), stream, steps=4, **kw)
    out = tmp_path / "es.tinygpt"
    first = es(make_model(), stream, steps=4, save_every=2, callbacks=[_stop_at(2)], out=out, **kw)
    assert first.interrupted and read_checkpoint(out).train_state["step"] == 2
    more = es(None, stream, steps=4, resume=True, out=out, **kw)
    assert isinstance(more, TrainResult) and more.step == 4
    assert [h["reward"] for h in more.history] == [h["reward"] for h in straight.history]
    assert_bitwise_equal(more.model, snapshot(straight.model))
    with pytest.raises(ValueError, match="reward function or tokens in memory"):
        es(None, None, steps=5, resume=True, out=out, **kw)  # a token stream is not recorded: pass it again


def _stop_at(step: int):
    def stop(rec):
        if rec["step"] == step:
            raise KeyboardInterrupt

    return stop


def test_an_interrupt_stops_cleanly_with_the_centre_in_place(stream, snapshot):
    model = make_model()
    calls = []

    def stop(rec):
        calls.append(rec["step"])
        raise KeyboardInterrupt

    space_before = snapshot(model)
    res = es(model, stream, steps=5, population=4, ctx=16, batch_size=2, val_every=0, callbacks=[stop], progress=False)
    assert res.interrupted and calls == [1] and res.step == 1
    assert any(not torch.equal(v, space_before[k]) for k, v in model.state_dict().items())  # step 1 was applied
    assert "interrupted" in repr(res)


def test_settings_are_validated(stream):
    model = make_model()
    with pytest.raises(ValueError, match="antithetic"):
        es(model, stream, population=5, progress=False)
    with pytest.raises(ValueError, match="sigma"):
        ESConfig(sigma=0)
    with pytest.raises(ValueError, match="ctx"):
        es(model, stream, steps=1, population=2, ctx=64, progress=False)
    cfg = ESConfig(steps=3, population=8)
    res = es(model, stream, config=cfg, sigma=0.01, ctx=16, batch_size=2, val_every=0, progress=False)
    assert (res.config.steps, res.config.population, res.config.sigma) == (3, 8, 0.01)


def test_figure_shows_centre_population_and_validation(stream):
    model = make_model()
    res = es(model, stream, steps=4, population=4, ctx=16, batch_size=2, val_split=0.2, val_every=2, progress=False)
    fig = res.figure()
    names = [t.name for t in fig.data]
    assert "centre loss" in names and "val loss" in names
    centre = next(t for t in fig.data if t.name == "centre loss")
    assert list(centre.y) == pytest.approx(res.losses)


# ------------------------------------------------------------------------------------------ word-list reward
def test_word_list_reward(tmp_path):
    r = word_list_reward(["Love", "night", "king", "a"])
    assert r("love the night, O king") == pytest.approx(3 / 4)  # "O" is too short to count; "the" is not listed
    assert r("a a a a love") == 0.0  # one counted word < min_words
    assert r("") == 0.0
    f = tmp_path / "words.txt"
    f.write_text("love\nnight\n")
    r2 = word_list_reward(f, min_words=1)
    assert r2("night watch") == 0.5
    assert words_of("o'er the hills, thou'rt") == ["o'er", "the", "hills", "thou'rt"]
    r3 = word_list_reward(["the", "king", "love"], distinct=True)
    assert r3("the the the the") == 0.25 and r3("the king the love") == 0.75
    assert word_list_reward(["the"])("the the the the") == 1.0  # what distinct=True guards against
    with pytest.raises(ValueError, match="not a file"):
        word_list_reward(str(tmp_path / "missing.txt"))


# ------------------------------------------------------------------------------------------ CLI
def test_cli_es_corpus_and_word_list(tmp_path, capsys):
    model = make_model()
    src = tmp_path / "m.tinygpt"
    model.save(src)
    corpus = tmp_path / "c.txt"
    corpus.write_text("to be or not to be, that is the question.\n" * 40)
    out = tmp_path / "es.tinygpt"
    flags = "--steps 2 --population 4 --ctx 16 --batch 2 --no-progress"
    rc = main(["es", str(src), "--corpus", str(corpus), "--out", str(out)] + flags.split())
    assert rc == 0 and out.exists()
    text = capsys.readouterr().out
    assert text.startswith("done: step 2 | loss") and "parameters evolved" in text
    assert load(out).train_state["es"]["objective"] == "loss"
    words = tmp_path / "w.txt"
    words.write_text("question\nthat\nnot\n")
    out2 = tmp_path / "es2.tinygpt"
    flags = "--steps 1 --population 2 --samples 2 --tokens 4 --no-progress"
    rc = main(["es", str(src), "--word-list", str(words), "--out", str(out2)] + flags.split())
    assert rc == 0 and "reward" in capsys.readouterr().out
    rc = main(["es", str(src), "--word-list", str(words), "--corpus", str(corpus), "--out", str(out2), "--overwrite"])
    assert rc == 2 and "not both" in capsys.readouterr().err
