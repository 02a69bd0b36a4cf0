"""AttentionViewer (widgets/attention.py), driven through its controls outside a kernel.

Every heatmap is checked against the hook points of the model's own `run_with_cache`. Observers run
synchronously, so a callback that raises fails the test that set the control.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _widget_helpers import PROMPT, VARIANTS, as_array, cached, tiny_model, variant_model

from tinygpt import GPT
from tinygpt.interp import attention_patterns
from tinygpt.widgets import AttentionViewer


@pytest.fixture(scope="module")
def model() -> GPT:
    return tiny_model()


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


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_attention_viewer_on_every_architecture_variant(variant):
    m = variant_model(variant)
    v = AttentionViewer(m, PROMPT)
    att = attention_patterns(m, PROMPT)
    for layer in (0, 1):
        v.layer.value = layer
        assert [tr.name for tr in v.fig.data] == (
            ["pattern1", "pattern2", "pattern"] if "diff" in variant else ["pattern"]
        )
        np.testing.assert_allclose(as_array(v.fig.data[-1].z), att.head(layer, 0).numpy(), rtol=1e-5, atol=1e-7)
    assert (v.router_fig is not None) == ("mo" in variant)
