"""The interpretability dashboards, driven through their controls outside a kernel.

Each test sets a control (`.value = ...`, `button.click()`) and checks that the figure holds exactly what the
pure function returns for that setting. Observers run synchronously, so a callback that raises fails the test
that set the control.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from _lens_helpers import random_lens

from tinygpt import GPT, GPTConfig, train
from tinygpt.interp import PatchingError, ablation_sweep, attention_patterns, logit_lens, patch_sweep
from tinygpt.sampling import generate
from tinygpt.widgets import AblationExplorer, AttentionViewer, LensDashboard, PatchingDashboard, TrainingDashboard
from tinygpt.widgets.training import ema

PROMPT = "ROMEO: But soft, what light"


def tiny_model(seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    cfg = dict(n_layers=2, d_model=32, n_heads=2, n_ctx=64)
    cfg.update(overrides)
    return GPT(GPTConfig(**cfg)).eval()


def as_array(z) -> np.ndarray:
    return np.array([[math.nan if v is None else v for v in row] for row in z], dtype=float)


@pytest.fixture(scope="module")
def model() -> GPT:
    return tiny_model()


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    return torch.randint(0, 256, (4, 33), generator=torch.Generator().manual_seed(1))


# ------------------------------------------------------------------------------------------ LensDashboard
def test_lens_heatmap_is_the_logit_lens_of_the_typed_prompt(model):
    d = LensDashboard(model, prompt=PROMPT)
    ref = logit_lens(model, PROMPT)
    heat = d.fig.data[0]
    np.testing.assert_allclose(as_array(heat.z), ref.kl.numpy(), rtol=1e-6, atol=1e-7)
    assert list(heat.text[1]) == [ref.top_strs[1][p][0] for p in range(len(ref.str_tokens))]  # top-1 in cells
    assert "logit lens" in d.fig.layout.title.text
    # the hover of each cell lists the top-5 with probabilities
    top5 = ref.top(1, 3)
    for tok, p in top5:
        assert f"{p:.3f}" in heat.customdata[1][3] and repr(tok)[1:-1] in heat.customdata[1][3]
    d.prompt.value = "To be, or not to be"
    ref2 = logit_lens(model, "To be, or not to be")
    np.testing.assert_allclose(as_array(d.fig.data[0].z), ref2.kl.numpy(), rtol=1e-6, atol=1e-7)
    assert len(d.fig.data[0].z[0]) == len("To be, or not to be") == len(d.result.str_tokens)
    d.metric.value = "entropy"
    np.testing.assert_allclose(as_array(d.fig.data[0].z), ref2.entropy.numpy(), rtol=1e-6)
    d.metric.value = "prob"
    np.testing.assert_allclose(as_array(d.fig.data[0].z), ref2.target_prob.numpy(), rtol=1e-6)  # NaN at the end
    assert d.fig.data[0].zmax == 1.0
    d.metric.value = "kl"
    assert d.fig.data[0].zmax is None  # no stale zmax from the previous metric


def test_lens_toggle_and_loading_a_lenses_file(model, tmp_path):
    lens = random_lens(model, scale=0.5)
    path = lens.save(tmp_path / "m.lenses")
    d = LensDashboard(model, prompt=PROMPT)
    logit_kl = as_array(d.fig.data[0].z)
    d.lens_kind.value = "tuned"  # no lens yet: stays on the logit lens, with an explanation
    assert d.lens_kind.value == "logit" and "no tuned lens" in d.status.value
    np.testing.assert_allclose(as_array(d.fig.data[0].z), logit_kl)

    d.lens_path.value = str(tmp_path / "missing.lenses")
    d.load_button.click()
    assert "no such file" in d.status.value and d.lens is None

    d.lens_path.value = str(path)
    d.load_button.click()
    assert d.lens is not None and d.lens_kind.value == "tuned"
    tuned = logit_lens(model, PROMPT, lens=d.lens)
    z = as_array(d.fig.data[0].z)
    np.testing.assert_allclose(z, tuned.kl.numpy(), rtol=1e-5, atol=1e-6)
    assert not np.allclose(z[:-1], logit_kl[:-1])  # the translators change every layer but the last
    assert "tuned lens" in d.fig.layout.title.text
    d.lens_kind.value = "logit"
    np.testing.assert_allclose(as_array(d.fig.data[0].z), logit_kl)

    other = tiny_model(seed=5)
    d2 = LensDashboard(other, prompt=PROMPT)
    d2.lens_path.value = str(path)
    d2.load_button.click()  # a lens for another model: refused with the pin error
    assert "different model" in d2.status.value and d2.lens is None and d2.lens_kind.value == "logit"


def test_lens_dashboard_takes_a_lens_and_reports_bad_prompts(model):
    lens = random_lens(model, seed=3, scale=0.5)
    d = LensDashboard(model, lens=lens, prompt="abc", metric="entropy")
    assert d.lens_kind.value == "tuned"
    np.testing.assert_allclose(
        as_array(d.fig.data[0].z), logit_lens(model, "abc", lens=lens).entropy.numpy(), rtol=1e-5
    )
    before = as_array(d.fig.data[0].z)
    d.prompt.value = ""  # an empty prompt: a message, the figure stays
    assert "at least one token" in d.status.value
    np.testing.assert_allclose(as_array(d.fig.data[0].z), before)


# ------------------------------------------------------------------------------------------ AblationExplorer
@pytest.fixture(scope="module")
def explorer(model, tokens):
    return AblationExplorer(model, tokens, prompt="ab", max_new_tokens=12, progress=False)


def test_ablation_bars_are_the_sweep(explorer, model, tokens):
    ex = explorer
    ref = ablation_sweep(
        model, tokens, modes=("zero",), components=("layer", "attn", "mlp"), heads=True, progress=False
    )
    bar = ex.fig.data[0]
    assert list(bar.x) == [a.label for a in ref.ablations]
    np.testing.assert_allclose(bar.y, ref.deltas.numpy(), rtol=1e-5, atol=1e-6)
    assert len(bar.x) == 2 * (3 + 2)  # layer, attn, mlp and 2 heads per layer
    ex.mode.value = "mean"
    ref_mean = ablation_sweep(
        model, tokens, modes=("mean",), components=("layer", "attn", "mlp"), heads=True, progress=False
    )
    np.testing.assert_allclose(ex.fig.data[0].y, ref_mean.deltas.numpy(), rtol=1e-5, atol=1e-6)
    assert "mean ablation" in ex.fig.layout.title.text
    assert set(ex.sweeps) == {"zero", "mean"}
    ex.mode.value = "zero"  # back: the cached sweep
    np.testing.assert_allclose(ex.fig.data[0].y, ref.deltas.numpy(), rtol=1e-5, atol=1e-6)


def test_ablation_selection_highlights_its_bar_and_reports_its_loss(explorer):
    ex = explorer
    ex.mode.value = "zero"
    ex.component.value = "mlp"
    assert ex.head.disabled
    ex.layer.value = 1
    colors = list(ex.fig.data[0].marker.color)
    i = list(ex.fig.data[0].x).index("1.mlp")
    assert colors[i] == "#d62728" and colors.count("#d62728") == 1
    sweep = ex.sweeps["zero"]
    assert f"{float(sweep.losses[i]):.4f}" in ex.status.value
    ex.component.value = "head"
    assert not ex.head.disabled
    ex.head.value = 1
    assert ex.spec == "1.head1:zero"
    colors = list(ex.fig.data[0].marker.color)
    assert colors[list(ex.fig.data[0].x).index("1.head1")] == "#d62728"


def test_ablation_generations_with_and_without(explorer, model, tokens):
    ex = explorer
    ex.mode.value = "zero"
    ex.component.value = "layer"
    ex.layer.value = 0
    ex.prompt.value = "hello"
    ids = torch.tensor([list(b"hello")])
    opts = dict(max_new_tokens=12, temperature=0.0, seed=0)
    clean = generate(model, ids, **opts)
    ablated = generate(model, ids, ablate="0.layer", **opts)
    assert ex.sample_clean == model.to_string(clean[0, 5:])
    assert ex.sample_ablated == model.to_string(ablated[0, 5:])
    assert ex.sample_clean != ex.sample_ablated  # removing a whole block changes a random model's greedy text
    assert "with 0.layer:zero" in ex.samples.value and "without ablation" in ex.samples.value
    ex.mode.value = "resample"  # needs reference activations: the explorer passes its tokens
    assert "resample" in ex.sweeps and "0.layer:resample" in ex.samples.value
    ex.prompt.value = ""
    assert "type a prompt" in ex.status.value


def test_ablation_explorer_scores_only_the_given_targets(model, tokens):
    targets = torch.full_like(tokens, -100)
    targets[:, 20:-1] = tokens[:, 21:]
    ex = AblationExplorer(model, tokens, targets=targets, modes=("zero",), max_new_tokens=4, progress=False)
    ref = ablation_sweep(
        model, tokens, components=("layer", "attn", "mlp"), heads=True, targets=targets, progress=False
    )
    np.testing.assert_allclose(ex.fig.data[0].y, ref.deltas.numpy(), rtol=1e-5, atol=1e-6)
    assert f"{int((targets != -100).sum()):,} tokens" in ex.status.value
    assert ex.mode.options == ("zero",)


# ------------------------------------------------------------------------------------------ PatchingDashboard
CLEAN, CORRUPTED = "abcdefgh abcdefg", "abcdefXh abcdefg"


@pytest.fixture(scope="module")
def patching(model):
    return PatchingDashboard(model, CLEAN, CORRUPTED, correct="h", incorrect="X", progress=False)


def test_patching_heatmaps_are_the_sweeps(patching, model):
    d = patching
    assert [tr.name for tr in d.fig.data] == ["resid_pre", "attn_out", "mlp_out", "head"]
    for tr in d.fig.data:
        ref = patch_sweep(model, CLEAN, CORRUPTED, tr.name, correct="h", incorrect="X", normalize=True)
        np.testing.assert_allclose(as_array(tr.z), ref.values.numpy(), rtol=1e-4, atol=1e-5)
    assert len(d.fig.data[0].x) == 16 and list(d.fig.data[3].x) == ["H0", "H1"]
    assert list(d.fig.data[0].y) == ["L0", "L1"]
    d.normalize.value = False
    for tr in d.fig.data:
        ref = patch_sweep(model, CLEAN, CORRUPTED, tr.name, correct="h", incorrect="X")
        np.testing.assert_allclose(as_array(tr.z), ref.values.numpy(), rtol=1e-4, atol=1e-5)
    r = d.results["head"]
    assert f"{r.clean_metric:.3f}" in d.status.value and f"{r.corrupted_metric:.3f}" in d.status.value
    d.normalize.value = True


def test_patching_recomputes_when_prompts_or_answers_change(patching, model):
    d = patching
    d.corrupted.value = "abcdYfgh abcdefg"
    ref = patch_sweep(model, CLEAN, "abcdYfgh abcdefg", "resid_pre", correct="h", incorrect="X", normalize=True)
    np.testing.assert_allclose(as_array(d.fig.data[0].z), ref.values.numpy(), rtol=1e-4, atol=1e-5)
    d.correct.value = ""  # blank: the clean run's own top prediction, as patch_sweep does with correct=None
    ref = patch_sweep(model, CLEAN, "abcdYfgh abcdefg", "mlp_out", incorrect="X", normalize=True)
    np.testing.assert_allclose(as_array(d.fig.data[2].z), ref.values.numpy(), rtol=1e-4, atol=1e-5)
    d.incorrect.value = ""
    try:
        ref = patch_sweep(model, CLEAN, "abcdYfgh abcdefg", "mlp_out", normalize=True)
    except PatchingError:  # both runs predict the same token: the dashboard says so
        assert "coincide" in d.status.value
    else:
        np.testing.assert_allclose(as_array(d.fig.data[2].z), ref.values.numpy(), rtol=1e-4, atol=1e-5)
    before = as_array(d.fig.data[0].z)
    d.corrupted.value = "abc"  # different length: a message, the heatmaps stay
    assert "same number of tokens" in d.status.value
    np.testing.assert_allclose(as_array(d.fig.data[0].z), before)
    d.corrupted.value = CORRUPTED
    d.correct.value = "hh"  # not a single token
    assert "not one" in d.status.value
    d.correct.value, d.incorrect.value = "h", "X"
    d.run_button.click()
    ref = patch_sweep(model, CLEAN, CORRUPTED, "head", correct="h", incorrect="X", normalize=True)
    np.testing.assert_allclose(as_array(d.fig.data[3].z), ref.values.numpy(), rtol=1e-4, atol=1e-5)


def test_patching_heads_by_position(model):
    d = PatchingDashboard(model, CLEAN, CORRUPTED, "h", "X", sites=("head_by_pos",), normalize=False, progress=False)
    ref = patch_sweep(model, CLEAN, CORRUPTED, "head_by_pos", correct="h", incorrect="X")  # [layer, pos, head]
    z = as_array(d.fig.data[0].z)  # rows L0H0, L0H1, L1H0, L1H1
    assert list(d.fig.data[0].y) == ["L0H0", "L0H1", "L1H0", "L1H1"]
    np.testing.assert_allclose(z[3], ref.values[1, :, 1].numpy(), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="sites"):
        PatchingDashboard(model, CLEAN, CORRUPTED, sites=("nope",))


# ------------------------------------------------------------------------------------------ AttentionViewer
def cached(model, prompt, names):
    _, cache = model.run_with_cache(model.to_tokens(prompt), names_filter=names)
    return cache


def test_attention_heatmap_is_the_cached_pattern(model):
    v = AttentionViewer(model, PROMPT)
    for layer, head in ((0, 0), (1, 1), (1, 0)):
        v.layer.value, v.head.value = layer, head
        pat = cached(model, PROMPT, [f"blocks.{layer}.attn.hook_pattern"])[f"blocks.{layer}.attn.hook_pattern"]
        np.testing.assert_allclose(as_array(v.fig.data[0].z), pat[0, head].numpy(), rtol=1e-5, atol=1e-7)
        assert v.fig.layout.title.text == f"layer {layer}, head {head}"
    assert v.router_fig is None and len(v.fig.data) == 1
    v.prompt.value = "abcabc"
    pat = cached(model, "abcabc", ["blocks.1.attn.hook_pattern"])["blocks.1.attn.hook_pattern"]
    np.testing.assert_allclose(as_array(v.fig.data[0].z), pat[0, 0].numpy(), rtol=1e-5, atol=1e-7)
    assert list(v.fig.data[0].x) == ["0 'a'", "1 'b'", "2 'c'", "3 'a'", "4 'b'", "5 'c'"]
    np.testing.assert_allclose(v.result.patterns, attention_patterns(model, "abcabc").patterns)


def test_attention_viewer_shows_both_maps_of_differential_attention():
    m = tiny_model(diff_attn=True)
    v = AttentionViewer(m, "hello there", layer=1, head=1)
    names = [f"blocks.1.attn.hook_pattern{s}" for s in ("1", "2", "")]
    cache = cached(m, "hello there", names)
    assert [tr.name for tr in v.fig.data] == ["pattern1", "pattern2", "pattern"]
    for tr, name in zip(v.fig.data, names):
        np.testing.assert_allclose(as_array(tr.z), cache[name][0, 1].numpy(), rtol=1e-5, atol=1e-6)
    assert v.fig.data[0].zmin == 0  # A1: probabilities
    assert v.fig.data[2].zmin == -v.fig.data[2].zmax < 0  # A1 - λ A2 is signed: a diverging scale around 0


def test_attention_viewer_shows_the_experts_each_token_is_sent_to():
    m = tiny_model(moe_experts=4, moe_topk=2)
    prompt = "experts!"
    v = AttentionViewer(m, prompt, layer=1)
    cache = cached(m, prompt, ["blocks.1.moe.hook_expert_indices", "blocks.1.moe.hook_expert_weights"])
    idx, w = cache["blocks.1.moe.hook_expert_indices"][0], cache["blocks.1.moe.hook_expert_weights"][0]
    heat = v.router_fig.data[0]
    z = as_array(heat.z)  # [expert, pos]
    assert z.shape == (4, len(prompt))
    for pos in range(len(prompt)):
        chosen = {int(e): float(x) for e, x in zip(idx[pos], w[pos])}
        for e in range(4):
            assert z[e, pos] == pytest.approx(chosen.get(e, 0.0), abs=1e-6)
        assert heat.text[int(idx[pos, 0])][pos] == "1" and heat.text[int(idx[pos, 1])][pos] == "2"
    v.layer.value = 0
    idx0 = cached(m, prompt, ["blocks.0.moe.hook_expert_indices"])["blocks.0.moe.hook_expert_indices"][0]
    z0 = as_array(v.router_fig.data[0].z)
    assert all(z0[int(idx0[p, 0]), p] > 0 for p in range(len(prompt)))
    assert "layer 0" in v.router_fig.layout.annotations[0].text


def test_attention_viewer_shows_mixture_of_depths_routing():
    m = tiny_model(mod=True, mod_capacity=0.5)  # block 1 is routed
    with torch.no_grad():  # a router that sends every other token through block 1, whatever the weights
        m.blocks[1].router.weight.zero_()
        m.blocks[1].router.bias.zero_()
    prompt = "routing tokens"
    mask = torch.tensor([i % 2 == 0 for i in range(len(prompt))])

    def force(t, hook):
        return mask[None].expand_as(t)

    v = AttentionViewer(m, prompt)
    assert v.layer.options[1][0] == "layer 1 (routed)"
    with m.hooks(fwd_hooks=[("blocks.1.hook_routing_mask", force)]):
        v.update()
        cache = cached(m, prompt, ["blocks.1.attn.hook_pattern", "blocks.1.hook_routing_mask"])
    heat = v.router_fig.data[0]
    assert list(heat.y) == ["block 1"]
    assert as_array(heat.z)[0].tolist() == mask.float().tolist()
    v.layer.value, v.head.value = 1, 1
    z = as_array(v.fig.data[0].z)
    idx = mask.nonzero()[:, 0]
    np.testing.assert_allclose(z[idx][:, idx], cache["blocks.1.attn.hook_pattern"][0, 1].numpy(), rtol=1e-5, atol=1e-7)
    assert np.isnan(z[1]).all() and np.isnan(z[:, 1]).all()  # skipped tokens are blank
    assert f"computes {len(idx)} of {len(prompt)} tokens" in v.status.value
    v.layer.value = 0  # a dense layer of the same model: every token
    dense = cached(m, prompt, ["blocks.0.attn.hook_pattern"])["blocks.0.attn.hook_pattern"]
    np.testing.assert_allclose(as_array(v.fig.data[0].z), dense[0, 1].numpy(), rtol=1e-5, atol=1e-7)


def test_attention_viewer_shows_the_expert_load_of_every_layer_and_router_probabilities():
    m = tiny_model(n_layers=3, moe_experts=4, moe_topk=2)
    prompt = "the load of each expert"
    v = AttentionViewer(m, prompt, layer=2)
    names = [f"blocks.{i}.moe.hook_{w}" for i in range(3) for w in ("expert_indices", "router_logits")]
    cache = cached(m, prompt, names)
    load = v.router_fig.data[1]
    assert load.name == "load" and list(load.y) == ["layer 0", "layer 1", "layer 2"]
    z = as_array(load.z)
    for i in range(3):
        idx = cache[f"blocks.{i}.moe.hook_expert_indices"][0]
        want = torch.bincount(idx.reshape(-1), minlength=4).float() / idx.numel()
        np.testing.assert_allclose(z[i], want.numpy(), atol=1e-7)
    np.testing.assert_allclose(z.sum(1), 1.0, rtol=1e-6)
    probs = cache["blocks.2.moe.hook_router_logits"][0].softmax(-1)  # [pos, experts]
    np.testing.assert_allclose(as_array(v.router_fig.data[0].customdata), probs.T.numpy(), rtol=1e-5, atol=1e-7)
    assert "expert load per layer" in v.router_fig.layout.annotations[1].text


def test_attention_viewer_with_experts_inside_mixture_of_depths_blocks():
    m = tiny_model(moe_experts=4, moe_topk=2, mod=True)
    with torch.no_grad():
        m.blocks[1].router.weight.normal_(0, 1.0)  # block 1 routes some tokens and skips others
    prompt = "experts and depths"
    v = AttentionViewer(m, prompt, layer=1)
    cache = cached(m, prompt, ["blocks.1.hook_routing_mask", "blocks.1.moe.hook_expert_indices"])
    mask, idx = cache["blocks.1.hook_routing_mask"][0], cache["blocks.1.moe.hook_expert_indices"][0]
    routed = mask.nonzero()[:, 0].tolist()
    assert 0 < len(routed) < len(prompt) and idx.shape[0] == len(routed)  # the experts saw routed tokens only
    experts = v.router_fig.data[0]
    z = as_array(experts.z)  # [expert, pos]
    for pos in range(len(prompt)):
        if pos in routed:  # the token's experts, from its slot in the routed sub-sequence
            slot = routed.index(pos)
            assert {e for e in range(4) if z[e, pos] > 0} == set(idx[slot].tolist())
        else:  # a skipped token has no expert
            assert (z[:, pos] == 0).all() and all(experts.text[e][pos] == "" for e in range(4))
    load = as_array(v.router_fig.data[1].z)
    want = torch.bincount(idx.reshape(-1), minlength=4).float() / idx.numel()
    np.testing.assert_allclose(load[1], want.numpy(), atol=1e-7)
    assert (
        v.router_fig.data[2].name == "routing" and as_array(v.router_fig.data[2].z)[0].tolist() == mask.float().tolist()
    )


def test_attention_viewer_shows_lambda_of_differential_attention():
    m = tiny_model(diff_attn=True)
    v = AttentionViewer(m, "lambda", layer=0)
    for layer in (0, 1):
        v.layer.value = layer
        lam = float(cached(m, "lambda", [f"blocks.{layer}.attn.hook_lambda"])[f"blocks.{layer}.attn.hook_lambda"])
        assert v.result.lambdas[layer] == pytest.approx(lam)
        assert f"λ = {lam:.3f}" in v.fig.layout.annotations[2].text and f"λ = {lam:.3f}" in v.status.value


def test_attention_viewer_maps_need_a_readable_prompt():
    m = tiny_model(d_vocab=64)  # no tokenizer: the prompt box takes token ids
    v = AttentionViewer(m, "not ids")
    assert v.result is None and "type token ids" in v.status.value and len(v.fig.data) == 0
    with pytest.raises(ValueError, match="no attention maps yet"):
        v.maps()
    v.prompt.value = "1 2 3"
    assert v.maps()["pattern"].shape == (3, 3)


# ------------------------------------------------------------------------------------------ every variant
VARIANTS = {
    "moe": dict(moe_experts=4, moe_topk=2),
    "mod": dict(mod=True),
    "diff_attn": dict(diff_attn=True),
    "yoco": dict(yoco=True, yoco_window=4),
    "moe+mod": dict(moe_experts=4, mod=True),
    "diff_attn+mod": dict(diff_attn=True, mod=True),
    "yoco+mod": dict(yoco=True, yoco_window=4, mod=True, mod_every=1),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_dashboard_on_every_architecture_variant(variant, tokens):
    m = tiny_model(**VARIANTS[variant])
    if "mod" in VARIANTS[variant]:
        with torch.no_grad():
            m.blocks[1].router.weight.normal_(0, 1.0)  # route some tokens through block 1, skip others
    lens = LensDashboard(m, prompt=PROMPT)
    np.testing.assert_allclose(as_array(lens.fig.data[0].z), logit_lens(m, PROMPT).kl.numpy(), rtol=1e-5, atol=1e-6)

    ex = AblationExplorer(m, tokens[:2, :24], prompt="ab", max_new_tokens=4, progress=False)
    ex.mode.value = "resample"
    ref = ablation_sweep(
        m, tokens[:2, :24], modes=("resample",), components=("layer", "attn", "mlp"), heads=True, progress=False
    )
    np.testing.assert_allclose(ex.fig.data[0].y, ref.deltas.numpy(), rtol=1e-5, atol=1e-6)
    ex.component.value, ex.layer.value, ex.head.value = "head", 1, 1
    assert "1.head1:resample" in ex.samples.value and "⚠" not in ex.status.value

    sites = ("resid_pre", "attn_out", "mlp_out", "head", "head_by_pos")
    d = PatchingDashboard(m, CLEAN, CORRUPTED, correct="h", incorrect="X", sites=sites, progress=False)
    assert "⚠" not in d.status.value
    for tr, site in zip(d.fig.data, sites):
        want = patch_sweep(m, CLEAN, CORRUPTED, site, correct="h", incorrect="X", normalize=True).values
        if site == "head_by_pos":
            want = want.permute(0, 2, 1).reshape(-1, want.shape[1])  # rows L0H0, L0H1, ...
        np.testing.assert_allclose(as_array(tr.z), want.numpy(), rtol=1e-4, atol=1e-5)

    v = AttentionViewer(m, PROMPT)
    att = attention_patterns(m, PROMPT)
    for layer in (0, 1):
        v.layer.value = layer
        assert [tr.name for tr in v.fig.data] == (
            ["pattern1", "pattern2", "pattern"] if "diff" in variant else ["pattern"]
        )
        np.testing.assert_allclose(as_array(v.fig.data[-1].z), att.head(layer, 0).numpy(), rtol=1e-5, atol=1e-7)
    assert (v.router_fig is not None) == ("mo" in variant)


# ------------------------------------------------------------------------------------------ token-id prompts
def test_dashboards_take_token_ids_for_a_model_without_tokenizer(tokens):
    m = tiny_model(d_vocab=64)  # a toy model over token ids: no tokenizer
    assert m.tokenizer is None
    ids = [5, 17, 3, 40, 5, 17]
    lens = LensDashboard(m, prompt=torch.tensor(ids))
    assert lens.prompt.value == "5 17 3 40 5 17"
    np.testing.assert_allclose(as_array(lens.fig.data[0].z), logit_lens(m, ids).kl.numpy(), rtol=1e-6, atol=1e-7)
    lens.prompt.value = "1, 2, 3"
    assert lens.result.tokens.tolist() == [1, 2, 3]
    lens.prompt.value = "one two"
    assert "type token ids" in lens.status.value
    lens.prompt.value = "1 99"
    assert "[0, 64)" in lens.status.value

    view = AttentionViewer(m, "5 17 3 40 5 17", layer=1)
    pat = m.run_with_cache(torch.tensor([ids]), names_filter=["blocks.1.attn.hook_pattern"])[1]
    np.testing.assert_allclose(
        as_array(view.fig.data[0].z), pat["blocks.1.attn.hook_pattern"][0, 0].numpy(), rtol=1e-5, atol=1e-7
    )
    assert list(view.fig.data[0].x)[:2] == ["0 '5'", "1 '17'"]

    ex = AblationExplorer(m, tokens % 64, prompt=ids, max_new_tokens=5, modes=("zero",), progress=False)
    out = generate(m, torch.tensor([ids]), max_new_tokens=5, temperature=0.0, seed=0)
    assert ex.sample_clean == " ".join(str(i) for i in out[0, len(ids) :].tolist())

    clean, corrupted = torch.tensor([ids]), torch.tensor([[5, 17, 9, 40, 5, 17]])
    d = PatchingDashboard(m, clean, corrupted, correct=3, incorrect=9, sites=("head",), progress=False)
    assert (d.clean.value, d.correct.value) == ("5 17 3 40 5 17", "3")
    ref = patch_sweep(m, clean, corrupted, "head", correct=3, incorrect=9, normalize=True)
    np.testing.assert_allclose(as_array(d.fig.data[0].z), ref.values.numpy(), rtol=1e-4, atol=1e-5)
    assert d.answers == (3, 9) and "logit(&#x27;3&#x27;)" in d.status.value


# ------------------------------------------------------------------------------------------ TrainingDashboard
@pytest.fixture
def corpus(tmp_path):
    p = tmp_path / "corpus.txt"
    p.write_text("First Citizen: Before we proceed any further, hear me speak.\nAll: Speak, speak.\n" * 40)
    return p


def test_training_dashboard_follows_train(corpus, tmp_path):
    dash = TrainingDashboard(min_interval=1e9)  # redraw only on validation steps (and on flush)
    draws = []
    res = train(
        tiny_model(),
        corpus,
        steps=10,
        batch_size=2,
        ctx=32,
        warmup=2,
        val_every=4,
        val_split=0.2,
        val_batches=1,
        device="cpu",
        progress=False,
        cache_dir=tmp_path / "cache",
        callbacks=[dash.callback, lambda r: draws.append(len(dash.fig.data[0].x or ()))],
    )
    assert len(dash.history) == 10
    # the first step draws, then only validation steps (4, 8, 10) do
    assert draws == [1, 1, 1, 4, 4, 4, 4, 8, 8, 10]
    fig = dash.figure
    steps = [h["step"] for h in res.history]
    assert list(fig.data[0].x) == steps and list(fig.data[0].y) == pytest.approx(res.losses)
    assert list(fig.data[2].x) == [s for s, _ in res.val_losses] == [4, 8, 10]
    assert list(fig.data[2].y) == pytest.approx([v for _, v in res.val_losses])
    assert list(fig.data[3].y) == pytest.approx([h["lr"] for h in res.history])
    assert list(fig.data[1].y) == pytest.approx(ema(res.losses, dash.smoothing.value))
    assert f"{res.history[-1]['loss']:.4f}" in dash.status.value


def test_training_dashboard_controls_and_throttle():
    dash = TrainingDashboard(steps=6, min_interval=1e9, smoothing=0.0)
    recs = [{"step": i, "loss": 4.0 - 0.3 * i + (0.2 if i % 2 else 0.0), "lr": 1e-3 * i} for i in range(1, 7)]
    for r in recs[:3]:
        dash.callback(r)
    assert dash.n_draws == 1 and list(dash.fig.data[0].x) == [1]  # throttled
    assert list(dash.figure.data[0].x) == [1, 2, 3]  # reading .figure flushes
    for r in recs[3:]:
        dash.callback(r)
    assert list(dash.fig.data[0].x) == [1, 2, 3, 4, 5, 6]  # the last step (steps=6) always draws
    assert dash.progress.value == 6
    losses = [r["loss"] for r in recs]
    assert list(dash.fig.data[1].y) == pytest.approx(losses)  # smoothing 0 = raw
    dash.smoothing.value = 0.9
    assert list(dash.fig.data[1].y) == pytest.approx(ema(losses, 0.9))
    assert list(dash.fig.data[1].y) != pytest.approx(losses)
    assert list(dash.fig.data[0].y) == pytest.approx(losses)
    dash.log_y.value = True
    assert dash.fig.layout.yaxis.type == "log"
    dash.reset()
    assert dash.history == [] and list(dash.fig.data[0].x or ()) == []
    assert ema([2.0, 2.0, 2.0], 0.5) == pytest.approx([2.0, 2.0, 2.0])  # bias-corrected: no warm-up dip


def test_every_dashboard_is_exported_and_displayable(model):
    import tinygpt.widgets as w

    for name in ("LensDashboard", "AblationExplorer", "PatchingDashboard", "AttentionViewer", "TrainingDashboard"):
        assert name in w.__all__ and name in dir(w)
    bundle = TrainingDashboard()._repr_mimebundle_()
    assert "application/vnd.jupyter.widget-view+json" in bundle
