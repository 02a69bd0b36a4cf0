"""The pieces of a block (`tinygpt.model.layers`): fast and eager attention agree, pattern and score hooks see
(and can edit) the pattern, LayerNorm's `hook_scale` is used when hooked, and a block's gradients are right."""

from __future__ import annotations

import pytest
import torch
from _model_helpers import BATCH, D_VOCAB, N_HEADS, POS, make_model, randomize, single_thread  # noqa: F401

from tinygpt import GPT, GPTConfig
from tinygpt.model import Block


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    yield from single_thread()


@pytest.fixture(scope="module")
def model() -> GPT:
    return make_model()


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    return torch.randint(0, D_VOCAB, (BATCH, POS), generator=torch.Generator().manual_seed(1))


# --------------------------------------------------------------------------------- attention paths
def noop(x, hook):
    return None


def test_fast_and_eager_attention_agree(model, tokens):
    cfg = model.cfg
    outs = {}
    for impl in ("eager", "sdpa", "auto"):
        m = make_model(attn_impl=impl)
        with torch.no_grad():
            outs[impl] = m(tokens)
    with torch.no_grad():
        outs["auto+pattern hook"] = make_model(attn_impl="auto").run_with_hooks(
            tokens, fwd_hooks=[(f"blocks.{i}.attn.hook_pattern", noop) for i in range(cfg.n_layers)]
        )
    for name, out in outs.items():
        assert torch.allclose(out, outs["eager"], atol=1e-5, rtol=0), name
    assert not torch.equal(outs["sdpa"], torch.zeros_like(outs["sdpa"]))


def test_pattern_hook_receives_the_pattern(model, tokens):
    seen = {}

    def grab(x, hook):
        seen[hook.name] = x.detach().clone()

    with torch.no_grad():
        model.run_with_hooks(
            tokens,
            fwd_hooks=[("blocks.1.attn.hook_pattern", grab), ("blocks.1.attn.hook_attn_scores", grab)],
        )
    pattern, scores = seen["blocks.1.attn.hook_pattern"], seen["blocks.1.attn.hook_attn_scores"]
    assert pattern.shape == (BATCH, N_HEADS, POS, POS)
    assert torch.allclose(pattern.sum(-1), torch.ones(BATCH, N_HEADS, POS), atol=1e-6)
    upper = torch.triu(torch.ones(POS, POS, dtype=torch.bool), diagonal=1)
    assert torch.all(pattern[..., upper] == 0)
    assert torch.all(pattern[..., ~upper] > 0)
    assert torch.all(torch.isneginf(scores[..., upper]))
    assert torch.allclose(scores.softmax(-1), pattern, atol=1e-6)
    assert not torch.allclose(pattern[..., 1, :2], torch.full_like(pattern[..., 1, :2], 0.5))  # not uniform


def test_editing_the_pattern_changes_the_output(model, tokens):
    def uniform(pattern, hook):
        causal = torch.tril(torch.ones_like(pattern))
        return causal / causal.sum(-1, keepdim=True)

    with torch.no_grad():
        clean = model(tokens)
        edited = model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.attn.hook_pattern", uniform)])
    assert edited.shape == clean.shape
    assert (edited - clean).abs().max() > 1e-3
    assert torch.allclose(edited[:, 0], clean[:, 0], atol=1e-5)  # position 0 attends only to itself anyway


def test_sdpa_with_a_pattern_hook_is_a_clear_error(tokens):
    m = make_model(attn_impl="sdpa")
    with pytest.raises(RuntimeError, match="attn_impl='sdpa' cannot expose"):
        m.run_with_hooks(tokens, fwd_hooks=[("blocks.0.attn.hook_pattern", noop)])
    with pytest.raises(RuntimeError, match="attn_impl='auto'"):
        m.run_with_cache(tokens)
    m.reset_hooks()
    with torch.no_grad():  # q/k/v/z hooks do not need the pattern: fine on the SDPA path
        m.run_with_hooks(tokens, fwd_hooks=[("blocks.0.attn.hook_z", noop)])


def test_noop_hooks_everywhere_do_not_change_outputs(model, tokens):
    with torch.no_grad():
        plain = model(tokens)
        hooked = model.run_with_hooks(tokens, fwd_hooks=[(lambda name: True, noop)])
    assert torch.allclose(hooked, plain, atol=1e-5, rtol=0)
    assert not any(hp._forward_hooks for hp in model.hook_dict.values())  # hooks removed afterwards


def test_ln_hook_scale_is_used_when_hooked(model, tokens):
    # ln_final has bias b: logits = (x_c / scale * w + b) @ W_U; doubling the scale halves the first term.
    def double(scale, hook):
        return scale * 2

    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter="ln_final.hook_scale")
        logits = model.run_with_hooks(tokens, fwd_hooks=[("ln_final.hook_scale", double)])
        resid = model.run_with_cache(tokens, names_filter="blocks.1.hook_resid_post")[1]["blocks.1.hook_resid_post"]
    ln = model.ln_final
    centred = resid - resid.mean(-1, keepdim=True)
    expected = (centred / (2 * cache["ln_final.hook_scale"]) * ln.weight + ln.bias) @ model.W_U
    assert torch.allclose(logits, expected, atol=1e-5)
    var = centred.pow(2).mean(-1, keepdim=True)
    assert torch.allclose(cache["ln_final.hook_scale"], (var + model.cfg.layer_norm_eps).sqrt(), atol=1e-6)


def test_ln_hook_scale_edited_in_place_is_used(model, tokens):
    def double_in_place(scale, hook):
        scale.mul_(2)  # returns None: the edit is in place

    with torch.no_grad():
        want = model.run_with_hooks(tokens, fwd_hooks=[("ln_final.hook_scale", lambda s, hook: s * 2)])
        got = model.run_with_hooks(tokens, fwd_hooks=[("ln_final.hook_scale", double_in_place)])
        plain = model(tokens)
    assert torch.allclose(got, want, atol=1e-5) and not torch.allclose(got, plain, atol=1e-2)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_block_gradcheck_float64(impl):
    cfg = GPTConfig(n_layers=1, d_model=8, n_heads=2, d_mlp=12, n_ctx=8, attn_impl=impl)
    torch.manual_seed(0)
    block = Block(cfg, 0).double()
    randomize(block, seed=3)
    x = torch.randn(2, 4, 8, dtype=torch.float64, requires_grad=True)
    w_q = block.attn.q_proj.weight.detach().clone().requires_grad_(True)
    w_in = block.mlp.fc_in.weight.detach().clone().requires_grad_(True)
    ln_w = block.ln1.weight.detach().clone().requires_grad_(True)

    def f(x, w_q, w_in, ln_w):
        params = {"attn.q_proj.weight": w_q, "mlp.fc_in.weight": w_in, "ln1.weight": ln_w}
        return torch.func.functional_call(block, params, (x,))

    assert torch.autograd.gradcheck(f, (x, w_q, w_in, ln_w), eps=1e-6, atol=1e-5)
