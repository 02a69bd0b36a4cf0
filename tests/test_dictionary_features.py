"""tinygpt.dictionary.evaluate / features / probe / steering on a tiny model."""

import random

import pytest
import torch

import tinygpt
from tinygpt import GPT, GPTConfig
from tinygpt.dictionary import (
    DictionaryConfig,
    DictionaryError,
    DictionaryMismatchError,
    auroc,
    build_feature_index,
    evaluate_dictionary,
    find_separating_latents,
    latents_for_text,
    latents_for_token,
    load_feature_index,
    make_dictionary,
    speaker_tag_labels,
    steer,
    steering_vector,
)
from tinygpt.dictionary.files import model_pin
from tinygpt.dictionary.probe import any_speaker_tag_labels

HOOK = "blocks.0.hook_resid_post"


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return GPT(GPTConfig(n_layers=2, d_model=32, n_heads=2, n_ctx=64)).eval()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    rng = random.Random(1)
    words = "the king is dead long live the queen of hearts and all her men".split()
    text = "\n".join(
        f"{rng.choice(['ROMEO:', 'LADY CAPULET:'])}\n{' '.join(rng.choices(words, k=9))}\n" for _ in range(600)
    )
    path = tmp_path_factory.mktemp("corpus") / "plays.txt"
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def sae(model):
    s = make_dictionary(DictionaryConfig(arch="topk", d_in=32, d_sae=48, hook=HOOK, k=4), seed=2)
    s.base = model_pin(model)
    return s


def test_evaluation_table(model, corpus, sae, tmp_path):
    tc = make_dictionary(
        DictionaryConfig(
            arch="relu", d_in=32, d_sae=48, hook="blocks.1.ln2.hook_normalized", out_hook="blocks.1.hook_mlp_out"
        )
    )
    ev = evaluate_dictionary(model, [sae, tc], corpus, tokens=1024, context=32, progress=False, cache_dir=tmp_path)
    assert len(ev) == 2 and ev.tokens == 1024
    r = ev[0]
    assert r["l0"] <= 4 and 0 <= r["dead_fraction"] <= 1 and r["ce_clean"] > 0 and r["kl_spliced"] >= 0
    assert r["loss_recovered"] == pytest.approx((r["ce_zero"] - r["ce_spliced"]) / (r["ce_zero"] - r["ce_clean"]))
    assert ev.densities[0].shape == (48,) and ev[1]["out_hook"] == "blocks.1.hook_mlp_out"
    assert "| name |" in ev.table() and "loss recovered" in ev.summary()
    ev.figure()
    other = GPT(GPTConfig(n_layers=2, d_model=32, n_heads=2, n_ctx=64))
    with pytest.raises(DictionaryMismatchError):
        evaluate_dictionary(other, sae, corpus, tokens=256, progress=False, cache_dir=tmp_path)


def test_feature_index_top_examples_are_the_true_maxima(model, corpus, sae, tmp_path):
    index = build_feature_index(
        model,
        sae,
        corpus,
        tokens=2048,
        context=32,
        top_k=5,
        samples=8,
        before=3,
        after=2,
        batch=4,
        progress=False,
        cache_dir=tmp_path,
        out=tmp_path / "i.features",
    )
    toks = index.t["tokens"].long()
    with torch.no_grad():
        acts = sae.encode(model.run_with_cache(toks, names_filter=HOOK)[1][HOOK])  # [n, 32, 48]
    flat = acts.reshape(-1, 48)
    for f in (0, 7, 31):
        rep = index.feature(f)
        expect = flat[:, f].topk(5).values
        got = torch.tensor([e.value for e in rep.top])
        live = expect > 0
        torch.testing.assert_close(got, expect[live], rtol=1e-5, atol=1e-6)
        for e in rep.top:  # the stored context activations are the feature's activations around the token
            assert e.acts[e.center] == pytest.approx(e.value, rel=1e-5)
            assert acts[e.window, e.pos, f].item() == pytest.approx(e.value, rel=1e-5)
        assert rep.density == pytest.approx(float((flat[:, f] > 0).float().mean()))
        assert sum(rep.hist_pos) == int((flat[:, f] > 0).sum())
        assert all(len(e.tokens) == len(e.acts) for _, ex in rep.quantiles for e in ex)
        assert rep.logits is not None and len(rep.logits["top"]) == 10
    rep.figure()
    assert "<span" in rep._repr_html_()
    back = load_feature_index(tmp_path / "i.features", model, sae)
    assert back.feature(7).top[0].value == index.feature(7).top[0].value
    other = make_dictionary(DictionaryConfig(arch="topk", d_in=32, d_sae=48, hook=HOOK, k=4), seed=9)
    with pytest.raises(DictionaryMismatchError, match="different dictionary"):
        load_feature_index(tmp_path / "i.features", model, other)


def test_indexes_of_neurons_and_directions(model, corpus, tmp_path):
    n = build_feature_index(
        model,
        "neurons",
        corpus,
        hook="blocks.1.mlp.hook_post",
        features=[0, 5],
        tokens=512,
        context=32,
        progress=False,
        cache_dir=tmp_path,
    )
    assert len(n) == 2 and n.feature(5).logits is not None  # MLP neurons: their W_out row through W_U
    d = build_feature_index(
        model, torch.randn(3, 32), corpus, hook=HOOK, tokens=512, context=32, progress=False, cache_dir=tmp_path
    )
    assert len(d) == 3 and sum(d.feature(0).hist_neg) > 0
    with pytest.raises(DictionaryError, match="give hook="):
        build_feature_index(model, "neurons", corpus, progress=False)


def test_auroc_is_exact_with_ties():
    v = torch.tensor([[0.0, 1.0], [0.0, 2.0], [3.0, 0.0], [0.0, 0.5]])
    lab = torch.tensor([True, False, True, False])
    # column 0: positives {0, 3}, negatives {0, 0}: pairs (0>0: half, 0>0: half, 3>0, 3>0) -> 3/4
    torch.testing.assert_close(auroc(v, lab), torch.tensor([0.75, 0.25], dtype=torch.float64))


def test_speaker_tags_and_separating_latents(model, corpus, sae, tmp_path):
    text = b"ROMEO:\nhello\nLADY CAPULET:\nno\n\nFirst Citizen:\nStay but a while:\nAnd so:\n\nClown:\nx"
    toks = torch.tensor([list(text)])
    lab = speaker_tag_labels(model, toks)[0]
    assert bytes(t for t, m in zip(toks[0].tolist(), lab.tolist()) if m) == b"ROMEO:LADY CAPULET:"
    # any tag: also mixed-case role names after a blank line; verse lines ending in ':' are never tags
    lab = any_speaker_tag_labels(model, toks)[0]
    assert bytes(t for t, m in zip(toks[0].tolist(), lab.tolist()) if m) == b"ROMEO:LADY CAPULET:First Citizen:Clown:"
    res = find_separating_latents(model, sae, corpus, tokens=2048, context=32, progress=False, cache_dir=tmp_path)
    assert len(res.best) == 10 and res.best[0][1] == float(res.auroc.max()) and 0 < res.positives < 1
    res.figure()
    other = make_dictionary(DictionaryConfig(arch="relu", d_in=32, d_sae=16, hook="blocks.1.hook_resid_post"), seed=4)
    other.base = model_pin(model)
    both = find_separating_latents(
        model, [sae, other], corpus, tokens=2048, context=32, top=64, progress=False, cache_dir=tmp_path
    )
    assert len(both.features) == 48 + 16 and both.features[48] == (1, 0) and both.hook.count("hook_resid_post") == 2
    assert both.best[0][1] == float(both.auroc.max()) and both.auroc[:48].tolist() == res.auroc.tolist()
    assert [a for (i, _), a in both.best if i == 0][:10] == [a for _, a in res.best]  # the same scores, merged
    fired = latents_for_text(model, sae, "ROMEO:\nthe king", top=5)
    assert 0 < len(fired) <= 5 and fired == sorted(fired, key=lambda p: -p[1])
    promote = latents_for_token(model, sae, "k", top=3)
    direct = (sae.W_dec / sae.out_scale) @ model.W_U[:, ord("k")]
    assert [i for i, _ in promote] == direct.topk(3).indices.tolist()


def test_steering_same_with_and_without_kv_cache(model, sae):
    v = steering_vector(model, sae, latent=3)
    assert v.hook == HOOK and torch.equal(v.vector, sae.latent_direction(3))
    plain = tinygpt.generate(model, "ROMEO:", 16, seed=0)
    with steer(model, v, coeff=40.0):
        a = tinygpt.generate(model, "ROMEO:", 16, seed=0, use_cache=True)
        b = tinygpt.generate(model, "ROMEO:", 16, seed=0, use_cache=False)
    assert a == b != plain
    assert tinygpt.generate(model, "ROMEO:", 16, seed=0) == plain  # removed on exit
    diff = steering_vector(model, ["the king", "long live"], ["the queen", "her men"], hook=HOOK, position="last")
    assert diff.vector.shape == (32,)
    with steer(model, HOOK, torch.ones(32), 0.0):
        assert tinygpt.generate(model, "ROMEO:", 8, seed=0) == tinygpt.generate(model, "ROMEO:", 8, seed=0)
    with pytest.raises(DictionaryError, match="width 32"):
        steering_vector(model, torch.ones(5), hook=HOOK)
    with pytest.raises(DictionaryError, match="latent="):
        steering_vector(model, sae)


def test_generate_steer_goes_through_the_sampling_registry(model, sae):
    import tinygpt.sampling
    from tinygpt.dictionary import Steering, as_steering

    assert tinygpt.sampling._interventions["steer"] is as_steering
    v = steering_vector(model, sae, latent=3)
    with steer(model, v, coeff=40.0):
        ref = tinygpt.generate(model, "ROMEO:", 16, seed=0)
    for use_cache in (True, False):  # identical with and without the KV cache, and to the `with steer` block
        assert tinygpt.generate(model, "ROMEO:", 16, seed=0, steer=v * 40.0, use_cache=use_cache) == ref
    s = steer(model, v, coeff=40.0)
    assert isinstance(s, Steering)
    assert tinygpt.generate(model, "ROMEO:", 16, seed=0, steer=s) == ref  # a Steering is reusable
    assert tinygpt.generate(model, "ROMEO:", 16, seed=0, steer=[v * 20.0, v * 20.0]) == ref  # several add up
    assert tinygpt.generate(model, "ROMEO:", 16, seed=0) != ref and not model.blocks[0].hook_resid_post.fwd_hooks
    greedy = dict(seed=0, temperature=0)  # a random model's sampled text barely depends on its logits
    with steer(model, v, coeff=0.3):
        nested = tinygpt.generate(model, "ROMEO:", 16, ablate="0.mlp, 1.mlp", **greedy)
    both = tinygpt.generate(model, "ROMEO:", 16, steer=v * 0.3, ablate="0.mlp, 1.mlp", **greedy)  # both at once
    assert both == nested != tinygpt.generate(model, "ROMEO:", 16, steer=v * 0.3, **greedy)
    with pytest.raises(DictionaryError, match="SteeringVector"):
        tinygpt.generate(model, "ROMEO:", 4, steer="blocks.0.hook_resid_post")
    other = GPT(GPTConfig(n_layers=2, d_model=32, n_heads=2, n_ctx=64))
    with pytest.raises(DictionaryError, match="another model"):
        tinygpt.generate(other, "ROMEO:", 4, steer=s)
