"""tinygpt.arch.norms.RMSNorm against Hugging Face's LlamaRMSNorm (fp32 and bf16), with its hooks."""

from __future__ import annotations

import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from tinygpt.arch.norms import RMSNorm

D = 24


def pair(eps=1e-6, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = 1 + 0.3 * torch.randn(D, generator=g)
    ours, hf = RMSNorm(D, eps), LlamaRMSNorm(D, eps)
    with torch.no_grad():
        ours.weight.copy_(w)
        hf.weight.copy_(w)
    x = 3 * torch.randn(2, 7, D, generator=g) + 0.5
    return ours.to(dtype), hf.to(dtype), x.to(dtype)


def test_matches_hugging_face_fp32_fused_and_hooked():
    ours, hf, x = pair()
    want = hf(x)
    assert torch.allclose(ours(x), want, atol=1e-6, rtol=0)  # fused F.rms_norm
    seen = {}
    ours.hook_scale.add_hook(lambda t, hook: seen.setdefault("scale", t))
    ours.hook_normalized.add_hook(lambda t, hook: seen.setdefault("norm", t))
    got = ours(x)
    assert torch.allclose(got, want, atol=1e-6, rtol=0)
    assert seen["scale"].shape == (2, 7, 1) and seen["norm"].shape == (2, 7, D)
    assert torch.allclose(seen["scale"], (x.pow(2).mean(-1, keepdim=True) + 1e-6).sqrt())
    assert torch.equal(seen["norm"], got)  # hook_normalized is the norm's output


def test_matches_hugging_face_bf16_exactly():
    ours, hf, x = pair(dtype=torch.bfloat16)
    want = hf(x)
    got = ours(x)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, want)
    ours.hook_scale.add_hook(lambda t, hook: t)
    assert torch.equal(ours(x), want)  # the observed path rounds the same way


def test_editing_the_scale_changes_the_output():
    ours, _, x = pair()
    frozen = torch.full((2, 7, 1), 2.0)
    ours.hook_scale.add_hook(lambda t, hook: frozen)
    assert torch.allclose(ours(x), x / 2 * ours.weight, atol=1e-6)
    ours.hook_scale.remove_hooks()
    ours.hook_scale.add_hook(lambda t, hook: t.mul_(4))  # in place
    assert torch.allclose(ours(x), x / (4 * (x.pow(2).mean(-1, keepdim=True) + 1e-6).sqrt()) * ours.weight, atol=1e-6)


def test_names():
    n = RMSNorm(D, 1e-5)
    assert list(n.state_dict()) == ["weight"] and n.w is n.weight
