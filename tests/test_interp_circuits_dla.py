"""Direct logit attribution (`tinygpt.interp.circuits.dla`): the parts sum to the logit difference, each head and
layer equals TransformerLens' `ActivationCache.logit_attrs`, and on the induction model the induction head is the
largest direct contributor to predicting the repeated token."""

from __future__ import annotations

import copy

import pytest
import torch

from tinygpt import GPT, GPTConfig
from tinygpt.interp import DLAResult, direct_logit_attribution, repeated_tokens
from tinygpt.interp.circuits import CircuitError


@pytest.fixture(scope="module")
def model():
    """Random weights, with a non-trivial final LayerNorm and non-zero biases (so every term of the total counts)."""
    torch.manual_seed(0)
    m = GPT(GPTConfig(n_layers=3, d_model=48, n_heads=3, n_ctx=32, init_std=0.2)).eval()
    with torch.no_grad():
        m.ln_final.weight.uniform_(0.5, 1.5)
        m.ln_final.bias.normal_(0, 0.3)
        for block in m.blocks:
            block.attn.o_proj.bias.normal_(0, 0.1)
            block.mlp.fc_out.bias.normal_(0, 0.1)
    return m


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("pos", [-1, 4])
def test_total_is_the_logit_difference(model, tokens, pos):
    dla = direct_logit_attribution(model, tokens, [5, 6], [7, 8], pos=pos)
    with torch.no_grad():
        logits = model(tokens)[:, pos]
    expected = float((logits[[0, 1], [5, 6]] - logits[[0, 1], [7, 8]]).mean())
    assert dla.logit_diff == pytest.approx(expected, abs=1e-5)
    assert dla.total() == pytest.approx(expected, abs=1e-4)
    # the parts: each layer's heads + b_O is its attention output, its neurons + b_out its MLP output
    torch.testing.assert_close(dla.heads.sum(1) + dla.attn_bias, dla.attn, rtol=0, atol=1e-5)
    torch.testing.assert_close(dla.neurons.sum(1) + dla.mlp_bias, dla.mlp, rtol=0, atol=1e-5)
    assert dla.heads.shape == (3, 3) and dla.neurons.shape == (3, model.cfg.d_mlp)
    assert abs(dla.ln_bias) > 1e-3 and dla.attn_bias.abs().max() > 1e-3  # those terms are really there
    assert dla.unembed_bias == 0.0  # tinygpt has no unembedding bias


def test_single_logit_and_text(model):
    text = "The cat sat on"
    dla = direct_logit_attribution(model, text, "x")  # no bad token: the logit itself
    with torch.no_grad():
        expected = float(model(text)[0, -1, model.to_single_token("x")])
    assert dla.total() == pytest.approx(expected, abs=1e-4)
    assert dla.meta["bad"] is None


def test_parity_with_transformer_lens_logit_attrs(model, tokens):
    """TransformerLens' logit_attrs assumes the final LayerNorm's weight folded into W_U (and its bias into b_U):
    on a folded copy of the model its per-head (stack_head_results) and per-component (decompose_resid)
    attributions equal ours, and ours are unchanged by the folding except for the bias term it drops."""
    good, bad = torch.tensor([5, 6]), torch.tensor([7, 8])
    folded = copy.deepcopy(model)
    with torch.no_grad():
        folded.unembed.weight.mul_(folded.ln_final.weight[None])
        folded.ln_final.weight.fill_(1.0)
        folded.ln_final.bias.zero_()
    _, cache = folded.run_with_cache(tokens)
    heads, labels = cache.stack_head_results(layer=-1, pos_slice=-1, return_labels=True)
    theirs = cache.logit_attrs(heads, tokens=good, incorrect_tokens=bad, pos_slice=-1).mean(-1)
    ours = direct_logit_attribution(model, tokens, good, bad)
    assert labels[:2] == ["L0H0", "L0H1"]
    torch.testing.assert_close(ours.heads.flatten(), theirs.float(), rtol=0, atol=1e-5)
    parts, names = cache.decompose_resid(pos_slice=-1, apply_ln=False, return_labels=True)
    theirs = cache.logit_attrs(parts, tokens=good, incorrect_tokens=bad, pos_slice=-1).mean(-1).float()
    assert names == ["embed", "pos_embed"] + [f"{i}_{p}" for i in range(3) for p in ("attn_out", "mlp_out")]
    mine = torch.tensor([ours.embed, ours.pos_embed, *ours.layers().flatten().tolist()])
    torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-5)
    again = direct_logit_attribution(folded, tokens, good, bad)
    torch.testing.assert_close(again.heads, ours.heads, rtol=0, atol=1e-5)
    assert again.ln_bias == 0.0 and again.total() == pytest.approx(ours.total() - ours.ln_bias, abs=1e-4)


def test_induction_head_writes_the_answer(induction_model):
    """On repeated random tokens the head that predicts the second copy is the induction head (L1H0 for this
    seed): it is the largest direct contributor to the correct next token over another token."""
    model = induction_model
    v = model.cfg.d_vocab
    toks = repeated_tokens(8, 20, v, seed=3)
    pos = 30  # in the second copy: the answer is the token after its first occurrence
    good = toks[:, pos + 1]
    bad = (good + 1) % v
    dla = direct_logit_attribution(model, toks, good, bad, pos=pos)
    assert dla.total() == pytest.approx(dla.logit_diff, abs=1e-4)
    layer, head = divmod(int(dla.heads.argmax()), model.cfg.n_heads)
    assert (layer, head) == (1, 0), dla.heads
    assert dla.top(1)[0][0] == "L1H0" and dla.heads[1, 0] > 0.5 * dla.logit_diff


def test_variants_and_figure(tokens):
    """A mixture-of-experts model has no neurons: the per-layer terms still sum to the logit difference."""
    torch.manual_seed(0)
    moe = GPT(GPTConfig(n_layers=2, d_model=32, n_heads=2, n_ctx=16, moe_experts=2)).eval()
    dla = direct_logit_attribution(moe, tokens[:, :8], 5, 7)
    assert dla.neurons is None and dla.heads is not None
    assert dla.total() == pytest.approx(dla.logit_diff, abs=1e-4)
    assert isinstance(dla, DLAResult) and "mlp0" in [name for name, _ in dla.top(100)]
    fig = dla.figure()
    assert len(fig.data) == 2 and list(fig.data[1].y) == ["L0", "L1"]
    assert "logit diff" in repr(dla)


def test_llama_style_variant(tokens):
    """RMSNorm (no centring, no bias), rotary (no position embedding), SwiGLU neurons, no biases: the parts
    still sum to the logit difference."""
    torch.manual_seed(0)
    llama_knobs = dict(positional_embedding_type="rotary", normalization_type="RMS", gated_mlp=True, act_fn="silu")
    cfg = GPTConfig(
        n_layers=2, d_model=48, n_heads=4, n_key_value_heads=2, n_ctx=32, init_std=0.2, bias=False, **llama_knobs
    )
    dla = direct_logit_attribution(GPT(cfg).eval(), tokens, [5, 6], [7, 8])
    assert dla.heads is not None and dla.neurons is not None and dla.neurons.shape == (2, cfg.d_mlp)
    assert dla.pos_embed == 0.0 and dla.ln_bias == 0.0 and float(dla.attn_bias.abs().max()) == 0.0
    assert dla.total() == pytest.approx(dla.logit_diff, abs=1e-4)
    torch.testing.assert_close(dla.neurons.sum(1), dla.mlp, rtol=0, atol=1e-5)


def test_errors(model, tokens):
    with pytest.raises(CircuitError, match="out of range"):
        direct_logit_attribution(model, tokens, 5, 7, pos=9)
    with pytest.raises(CircuitError, match="answer tokens"):
        direct_logit_attribution(model, tokens, [1, 2, 3], 7)
    with pytest.raises(ValueError, match="not one"):
        direct_logit_attribution(model, "ab", "xy", "z")
