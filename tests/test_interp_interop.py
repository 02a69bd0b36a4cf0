"""Interop: nnsight traces over our hook points agree with TransformerLens-style `run_with_cache` /
`run_with_hooks`; attention takes the eager path only inside a trace that reads the pattern; and the
`run_with_cache` memory controls (names_filter, device, pos_slice) behave as in TransformerLens."""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F

from tinygpt import GPT, GPTConfig

nnsight = pytest.importorskip("nnsight")  # the `interop` extra


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return GPT(GPTConfig(n_layers=2, d_model=32, n_heads=4, n_ctx=32, init_std=0.2)).eval()


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(1))


def test_tinygpt_import_does_not_import_nnsight():
    import subprocess

    code = "import sys, tinygpt, tinygpt.interp; assert 'nnsight' not in sys.modules, 'nnsight imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.fixture
def sdpa_calls(monkeypatch):
    calls = []
    real = F.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", counting)
    return calls


def test_trace_saves_equal_run_with_cache(model, tokens):
    wrapped = nnsight.NNsight(model)
    names = [
        "hook_embed",
        "blocks.0.hook_resid_post",
        "blocks.1.attn.hook_z",
        "blocks.1.mlp.hook_post",
        "ln_final.hook_normalized",
    ]
    with torch.no_grad(), wrapped.trace(tokens):
        embed = wrapped.hook_embed.output.save()
        resid = wrapped.blocks[0].hook_resid_post.output.save()
        z = wrapped.blocks[1].attn.hook_z.output.save()
        post = wrapped.blocks[1].mlp.hook_post.output.save()
        normalized = wrapped.ln_final.hook_normalized.output.save()
        logits = wrapped.output.save()
    saved = [embed, resid, z, post, normalized]
    with torch.no_grad():
        ref_logits, cache = model.run_with_cache(tokens, names_filter=names)
    for name, value in zip(names, saved):
        torch.testing.assert_close(value, cache[name], rtol=1e-5, atol=1e-5, msg=name)  # eager vs fused attention
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)


def test_trace_edit_equals_run_with_hooks(model, tokens):
    wrapped = nnsight.NNsight(model)
    with torch.no_grad(), wrapped.trace(tokens):
        wrapped.blocks[0].hook_attn_out.output[:] = 0
        wrapped.blocks[1].attn.hook_z.output[:, :, 2] = 0
        edited = wrapped.output.save()

    def zero_head(z, hook):
        z = z.clone()
        z[:, :, 2] = 0
        return z

    with torch.no_grad():
        expected = model.run_with_hooks(
            tokens,
            fwd_hooks=[
                ("blocks.0.hook_attn_out", lambda x, hook: torch.zeros_like(x)),
                ("blocks.1.attn.hook_z", zero_head),
            ],
        )
        plain = model(tokens)
    torch.testing.assert_close(edited, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(edited, plain, atol=1e-3)


def test_pattern_read_in_trace_uses_eager_path_only_there(model, tokens, sdpa_calls):
    wrapped = nnsight.NNsight(model)
    attn0 = model.blocks[0].attn
    assert not attn0.needs_eager()  # wrapping alone installs an inert controller
    with torch.no_grad(), wrapped.trace(tokens):
        pattern = wrapped.blocks[0].attn.hook_pattern.output.save()
        wrapped.output.save()
    # layer 0 ran eagerly (only that path calls hook_pattern); inside a trace tinygpt.model.observed() treats
    # every hook point as watched, so layer 1 may run eagerly too
    assert len(sdpa_calls) <= 1
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=["blocks.0.attn.hook_pattern"])
    torch.testing.assert_close(pattern, cache["pattern", 0], rtol=0, atol=1e-6)
    torch.testing.assert_close(pattern.sum(-1), torch.ones(2, 4, 10))
    sdpa_calls.clear()
    with torch.no_grad():
        model(tokens)
    assert not attn0.needs_eager() and len(sdpa_calls) == 2  # outside a trace: the fast path again


# ------------------------------------------------------------------------------------ cache memory controls
def test_run_with_cache_memory_controls(model, tokens):
    full_logits, full = model.run_with_cache(tokens)
    only = ["blocks.1.hook_resid_post", "blocks.0.attn.hook_z"]
    logits, small = model.run_with_cache(tokens, names_filter=lambda n: n in only, device="cpu")
    assert sorted(small.keys()) == sorted(only)
    torch.testing.assert_close(logits, full_logits)
    assert all(v.device.type == "cpu" for v in small.values())
    _, sliced = model.run_with_cache(tokens, names_filter=only, pos_slice=slice(-3, None))
    assert sliced["blocks.1.hook_resid_post"].shape == (2, 3, 32)
    assert sliced["blocks.0.attn.hook_z"].shape == (2, 3, 4, 8)  # sliced on the position axis, not heads
    torch.testing.assert_close(sliced["blocks.1.hook_resid_post"], full["blocks.1.hook_resid_post"][:, -3:])
    torch.testing.assert_close(sliced["blocks.0.attn.hook_z"], full["blocks.0.attn.hook_z"][:, -3:])
    _, one = model.run_with_cache(tokens, names_filter="blocks.0.hook_mlp_out", pos_slice=4)
    torch.testing.assert_close(one["blocks.0.hook_mlp_out"], full["blocks.0.hook_mlp_out"][:, 4:5])
    # a filtered cache that does not read the pattern keeps the fast path
    assert "blocks.0.attn.hook_pattern" not in small
    cached_bytes = sum(v.numel() * v.element_size() for v in small.values())
    full_bytes = sum(v.numel() * v.element_size() for v in full.values())
    assert cached_bytes < full_bytes / 5
