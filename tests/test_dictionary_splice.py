"""tinygpt.dictionary.splice: exact splicing, the dictionary's hooks in the model's hook dict, exact restore."""

import pytest
import torch

import tinygpt
from tinygpt import GPT, GPTConfig
from tinygpt.dictionary import (
    ARCHS,
    DictionaryConfig,
    DictionaryError,
    DictionaryMismatchError,
    make_dictionary,
    run_with_saes,
    splice,
)
from tinygpt.dictionary.files import model_pin

HOOK = "blocks.0.hook_resid_post"


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return GPT(GPTConfig(n_layers=2, d_model=32, n_heads=2, n_ctx=64)).eval()


@pytest.fixture(scope="module")
def toks():
    return torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(1))


def _sae(arch="topk", hook=HOOK, **kw):
    return make_dictionary(DictionaryConfig(arch=arch, d_in=32, d_sae=64, hook=hook, k=6, **kw), seed=3)


def _transcoder(arch="relu", layer=1, skip=True):
    return _sae(arch, hook=f"blocks.{layer}.ln2.hook_normalized", out_hook=f"blocks.{layer}.hook_mlp_out", skip=skip)


@pytest.mark.parametrize("arch", ARCHS)
def test_spliced_with_error_term_equals_clean_exactly(model, toks, arch):
    sae = _sae(arch)
    clean = model(toks)
    clean_cached, _ = model.run_with_cache(toks)  # the eager path: compare like with like
    with splice(model, sae, error_term=True):
        assert torch.equal(model(toks), clean)
        logits, cache = model.run_with_cache(toks)
        assert torch.equal(logits, clean_cached)
    assert cache[f"{HOOK}.hook_sae_acts_post"].shape == (2, 20, 64)
    assert torch.equal(cache[HOOK], cache[f"{HOOK}.hook_sae_input"])  # the site holds the output == the input
    sae_only = [k for k in cache if ".hook_sae_" in k]
    assert sorted(sae_only) == sorted(
        f"{HOOK}.{n}"
        for n in (
            "hook_sae_input",
            "hook_sae_acts_pre",
            "hook_sae_acts_post",
            "hook_sae_recons",
            "hook_sae_error",
            "hook_sae_output",
        )
    )


def test_transcoders_and_saes_together_are_exact(model, toks):
    clean = model(toks)
    tc, sae = _transcoder(), _sae("jumprelu")
    with splice(model, [tc, sae], error_term=True):
        assert torch.equal(model(toks), clean)
        _, cache = model.run_with_cache(toks, names_filter=lambda n: "hook_sae" in n or n.endswith("mlp_out"))
    assert cache["blocks.1.hook_mlp_out.hook_sae_input"].shape == (2, 20, 32)  # reads ln2.hook_normalized
    torch.testing.assert_close(
        cache["blocks.1.hook_mlp_out.hook_sae_recons"] + cache["blocks.1.hook_mlp_out.hook_sae_error"],
        cache["blocks.1.hook_mlp_out"],
        rtol=1e-5,
        atol=1e-5,
    )


def test_without_error_term_the_reconstruction_replaces_the_site(model, toks):
    sae = _sae("relu")
    store = {}

    def grab(t, hook):
        store[hook.name] = t.clone()

    with splice(model, sae):
        spliced = model.run_with_hooks(toks, fwd_hooks=[(HOOK, grab), (f"{HOOK}.hook_sae_recons", grab)])
    assert torch.equal(store[HOOK], store[f"{HOOK}.hook_sae_recons"])
    assert not torch.equal(spliced, model(toks))
    assert torch.equal(run_with_saes(model, toks, sae), spliced)


def test_ablating_a_latent_changes_only_through_that_latent(model, toks):
    sae = _sae("topk")
    clean = model(toks)

    def zero_all(t, hook):
        return torch.zeros_like(t)

    with splice(model, sae, error_term=True):
        acts = model.run_with_cache(toks, names_filter=f"{HOOK}.hook_sae_acts_post")[1][f"{HOOK}.hook_sae_acts_post"]
        live = int((acts > 0).sum((0, 1)).argmax())

        def zero_one(t, hook):
            t = t.clone()
            t[..., live] = 0
            return t

        one = model.run_with_hooks(toks, fwd_hooks=[(f"{HOOK}.hook_sae_acts_post", zero_one)])
        dead = int((acts > 0).sum((0, 1)).argmin())
        assert int((acts[..., dead] > 0).sum()) == 0

        def zero_dead(t, hook):
            t = t.clone()
            t[..., dead] = 0
            return t

        same = model.run_with_hooks(toks, fwd_hooks=[(f"{HOOK}.hook_sae_acts_post", zero_dead)])
        every = model.run_with_hooks(toks, fwd_hooks=[(f"{HOOK}.hook_sae_acts_post", zero_all)])
    assert not torch.equal(one, clean) and torch.equal(same, clean)
    assert (every - clean).abs().max() > (one - clean).abs().max()


def test_splice_restores_the_model_exactly(model, toks):
    before_hooks = dict(model.hook_dict)
    before_mods = dict(model.mod_dict)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    fp = model_pin(model)["fingerprint"]
    sae, tc = _sae(), _transcoder()
    with splice(model, [sae, tc], error_term=True):
        assert model.state_dict().keys() == state.keys()  # the dictionary is not a parameter-holding submodule
        assert model_pin(model)["fingerprint"] == fp
        assert type(model.blocks[0].hook_resid_post).__name__ == "SpliceSite"
    assert model.hook_dict == before_hooks and model.mod_dict == before_mods
    assert all(model.hook_dict[k] is v for k, v in before_hooks.items())
    assert sae.hook_sae_acts_post.name == "hook_sae_acts_post"  # the dictionary's own names are back
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    with pytest.raises(RuntimeError):
        with splice(model, sae):
            raise RuntimeError("inside")
    assert model.hook_dict == before_hooks


def test_refusals(model, toks):
    sae = _sae()
    with pytest.raises(DictionaryError, match="already spliced"):
        with splice(model, [sae, _sae("relu")]):
            pass
    with splice(model, sae):
        with pytest.raises(DictionaryError, match="already spliced"):
            with splice(model, _sae("relu")):
                pass
    other = GPT(GPTConfig(n_layers=2, d_model=32, n_heads=2, n_ctx=64))
    pinned = _sae()
    pinned.base = model_pin(other)
    with pytest.raises(DictionaryMismatchError, match="different model"):
        with splice(model, pinned):
            pass
    with pytest.raises(DictionaryMismatchError, match="does not have"):
        with splice(model, _sae(hook="blocks.9.hook_resid_post")):
            pass


def test_generation_and_nnsight_see_the_latents(model):
    sae = _sae("topk")
    with splice(model, sae, error_term=True):
        a = tinygpt.generate(model, "To be", 12, seed=0, use_cache=True)
        b = tinygpt.generate(model, "To be", 12, seed=0, use_cache=False)
    assert a == b == tinygpt.generate(model, "To be", 12, seed=0)
    nnsight = pytest.importorskip("nnsight")
    toks = torch.randint(0, 256, (1, 9))
    with splice(model, sae, error_term=True):
        _, cache = model.run_with_cache(toks, names_filter=f"{HOOK}.hook_sae_acts_post")
        wrapped = nnsight.NNsight(model)
        with wrapped.trace(toks):
            acts = wrapped.blocks[0].hook_resid_post.hook_sae_acts_post.output.save()
    # nnsight observes every hook point, which selects the eager attention path: equal up to float rounding
    torch.testing.assert_close(acts.detach(), cache[f"{HOOK}.hook_sae_acts_post"], rtol=1e-4, atol=1e-5)


@torch.no_grad()
def test_patching_over_latents_matches_a_hand_written_patch(model):
    from tinygpt.dictionary import patch_latents
    from tinygpt.interp.patching import logit_diff

    sae = _sae("topk")
    clean, corrupted = "ROMEO: good morrow", "JULIET: good morrow"[:18]
    c, k = model.to_tokens(clean), model.to_tokens(corrupted)
    assert c.shape == k.shape
    res = patch_latents(model, sae, c, k, correct=5, incorrect=7)
    name = f"{HOOK}.hook_sae_acts_post"
    with splice(model, sae, error_term=True):
        _, cache = model.run_with_cache(c, names_filter=[name])
        a_clean = cache[name]
        assert torch.equal(model(k), model.run_with_hooks(k, fwd_hooks=[]))

        def manual(i, pos=None):
            def fn(t, hook):
                t = t.clone()
                if pos is None:
                    t[:, :, i] = a_clean[:, :, i]
                else:
                    t[:, pos, i] = a_clean[:, pos, i]
                return t

            return float(logit_diff(model.run_with_hooks(k, fwd_hooks=[(name, fn)]), 5, 7))

        for latent, value in list(zip(res.meta["latents"], res.values.tolist()))[:3]:
            assert value == pytest.approx(manual(latent), abs=1e-5)
    clean_ld = float(logit_diff(model(c), 5, 7))
    corrupted_ld = float(logit_diff(model(k), 5, 7))
    assert res.clean_metric == pytest.approx(clean_ld, abs=1e-5) and res.corrupted_metric == pytest.approx(corrupted_ld)
    assert res.axes == ("latent",) and len(res.meta["latents"]) == res.values.shape[0] > 0
    (cell, best), *_ = res.top(1)  # cells are named by latent id, not by row
    assert best == float(res.values.max()) and cell == {"latent": res.meta["latents"][int(res.values.argmax())]}
    with splice(model, sae, error_term=True):
        assert best == pytest.approx(manual(cell["latent"]), abs=1e-5)
    # a latent that is the same in both runs leaves the corrupted run exactly as it is
    with splice(model, sae, error_term=True):
        _, ck = model.run_with_cache(k, names_filter=[name])
    same = ((a_clean == ck[name]).flatten(0, 1).all(0)).nonzero().squeeze(-1)[:1].tolist()
    if same:
        assert float(patch_latents(model, sae, c, k, correct=5, incorrect=7, latents=same).values[0]) == pytest.approx(
            corrupted_ld, abs=1e-6
        )
    by_pos = patch_latents(model, sae, c, k, correct=5, incorrect=7, latents=res.meta["latents"][:2], by_pos=True)
    assert by_pos.values.shape == (2, c.shape[1]) and by_pos.axes == ("latent", "pos")
    with splice(model, sae, error_term=True):
        assert float(by_pos.values[1, 3]) == pytest.approx(manual(res.meta["latents"][1], 3), abs=1e-5)
    norm = res.normalize()
    expect = (res.values - corrupted_ld) / (clean_ld - corrupted_ld)
    torch.testing.assert_close(norm.values, expect, rtol=1e-4, atol=1e-4)
    res.figure(), by_pos.figure()
    assert not any(n.endswith("hook_sae_acts_post") for n in model.hook_dict)  # unspliced afterwards


def test_model_saes_is_the_splice_context_manager():
    """`with model.saes(sae):` (SAELens' HookedSAETransformer.saes) splices exactly as `splice` does."""
    from tinygpt import GPT
    from tinygpt.dictionary import DictionaryConfig, make_dictionary, splice

    torch.manual_seed(0)
    model = GPT("nano").eval()
    sae = make_dictionary(DictionaryConfig(arch="topk", d_in=64, d_sae=128, hook="blocks.1.hook_resid_post", k=8))
    tokens = torch.randint(0, 256, (1, 10))
    plain = model(tokens)
    with splice(model, sae, check=False):
        spliced = model(tokens)
    with model.saes(sae, check=False) as m:
        assert m is model
        torch.testing.assert_close(model(tokens), spliced)
    assert not torch.allclose(spliced, plain)
    torch.testing.assert_close(model(tokens), plain)


def test_attribution_patching_over_latents_is_the_first_order_estimate_of_patch_latents(model):
    """`attribute_latents`: laid out like `patch_latents`, and each cell's effect is the derivative of patching
    along clean - corrupted (checked by a finite difference of the exact patch), with the weights untouched."""
    from tinygpt.dictionary import attribute_latents, patch_latents
    from tinygpt.interp.patching import logit_diff

    sae = _sae("topk")
    c, k = model.to_tokens("ROMEO: good morrow"), model.to_tokens("JULIET: good morrow"[:18])
    exact = patch_latents(model, sae, c, k, correct=5, incorrect=7)
    est = attribute_latents(model, sae, c, k, correct=5, incorrect=7)
    assert est.meta["latents"] == exact.meta["latents"] and est.axes == exact.axes == ("latent",)
    assert est.corrupted_metric == pytest.approx(exact.corrupted_metric, abs=1e-5)
    assert est.clean_metric == pytest.approx(exact.clean_metric, abs=1e-5) and est.meta["estimate"]
    assert all(p.grad is None for p in [*model.parameters(), *sae.parameters()])
    assert all(p.requires_grad for p in model.parameters())
    name, eps = f"{HOOK}.hook_sae_acts_post", 1e-2
    with torch.no_grad(), splice(model, sae, error_term=True):
        _, cc = model.run_with_cache(c, names_filter=[name])
        _, ck = model.run_with_cache(k, names_filter=[name])
        for row, latent in list(enumerate(est.meta["latents"]))[:4]:

            def nudge(t, hook, i=latent):
                t = t.clone()
                t[:, :, i] += eps * (cc[name][:, :, i] - ck[name][:, :, i])
                return t

            moved = float(logit_diff(model.run_with_hooks(k, fwd_hooks=[(name, nudge)]), 5, 7))
            derivative = (moved - est.corrupted_metric) / eps
            assert float(est.values[row]) - est.corrupted_metric == pytest.approx(derivative, rel=0.05, abs=1e-3)
    by_pos = attribute_latents(model, sae, c, k, correct=5, incorrect=7, by_pos=True)
    assert by_pos.values.shape == (len(est.meta["latents"]), c.shape[1])
    torch.testing.assert_close(by_pos.values.sum(1) - (c.shape[1] - 1) * est.corrupted_metric, est.values)


@pytest.mark.parametrize("hook", ["blocks.0.hook_mlp_out", "blocks.1.hook_resid_post"])
def test_latent_logit_attribution_sums_to_the_site_direct_contribution(hook):
    """Per-latent DLA: the latents' terms plus the decoder bias, skip and error terms equal the site's own direct
    contribution (`direct_logit_attribution`'s MLP term, or for the final residual stream the whole logit
    difference less the biases)."""
    from tinygpt import GPT, GPTConfig
    from tinygpt.dictionary import DictionaryConfig, latent_logit_attribution, make_dictionary
    from tinygpt.interp import direct_logit_attribution

    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layers=2, d_model=32, n_heads=2, n_ctx=32)).eval()
    sae = make_dictionary(DictionaryConfig(arch="topk", d_in=32, d_sae=64, hook=hook, k=6))
    tokens = torch.randint(0, 256, (2, 10))
    res = latent_logit_attribution(model, sae, tokens, 5, 7, check=False)
    dla = direct_logit_attribution(model, tokens, 5, 7)
    parts = float(res.values.sum()) + res.bias + res.skip + res.error
    assert parts == pytest.approx(res.site, abs=1e-5) and res.logit_diff == pytest.approx(dla.logit_diff, abs=1e-5)
    expected = float(dla.mlp[0]) if hook.endswith("mlp_out") else dla.logit_diff - dla.ln_bias - dla.unembed_bias
    assert res.site == pytest.approx(expected, abs=1e-4)
    (latent, value), *_ = res.top(1)
    assert abs(value) == pytest.approx(float(res.values.abs().max())) and value == float(res.values[latent])
    res.figure()
    bad = make_dictionary(DictionaryConfig(arch="topk", d_in=32, d_sae=64, hook="blocks.0.hook_resid_post", k=6))
    with pytest.raises(DictionaryError, match=r"writes the residual stream directly"):
        latent_logit_attribution(model, bad, tokens, 5, 7, check=False)
