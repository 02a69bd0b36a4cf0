"""tinygpt.arch.gated_mlp against Hugging Face's LlamaMLP (SwiGLU, GeGLU, with and without biases)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import transformers
from transformers.models.llama.modeling_llama import LlamaMLP

from tinygpt.arch.gated_mlp import ACTIVATIONS, GatedExpert, GatedMLP, activation
from tinygpt.config import ConfigError

D, F = 24, 40


def cfg(act="silu", bias=False):
    return SimpleNamespace(d_model=D, d_mlp=F, act_fn=act, bias=bias, dropout=0.0, init_std=0.02, n_layers=2)


def copy_from(ours, hf, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in ("gate_proj", "up_proj", "down_proj"):
            a, b = getattr(ours, name), getattr(hf, name)
            b.weight.copy_(torch.randn(b.weight.shape, generator=g) * 0.3)
            a.weight.copy_(b.weight)
            if b.bias is not None:
                b.bias.copy_(torch.randn(b.bias.shape, generator=g) * 0.3)
                a.bias.copy_(b.bias)


@pytest.mark.parametrize(
    "act,bias", [("silu", False), ("silu", True), ("gelu_pytorch_tanh", False), ("gelu", False), ("relu", True)]
)
def test_matches_llama_mlp(act, bias):
    hf_cfg = transformers.LlamaConfig(
        hidden_size=D, num_attention_heads=2, intermediate_size=F, hidden_act=act, mlp_bias=bias
    )
    hf = LlamaMLP(hf_cfg)
    ours = GatedMLP(cfg(act, bias))
    copy_from(ours, hf)
    x = torch.randn(2, 5, D, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = hf(x)
        seen = {}
        for name in ("hook_pre", "hook_pre_linear", "hook_post"):
            getattr(ours, name).add_hook(lambda t, hook, name=name: seen.setdefault(name, t))
        got = ours(x)
    assert want.abs().max() > 0.1
    assert torch.allclose(got, want, atol=1e-6, rtol=0)
    assert {k: v.shape for k, v in seen.items()} == {k: (2, 5, F) for k in seen} and len(seen) == 3
    assert torch.allclose(seen["hook_pre"], hf.gate_proj(x)) and torch.allclose(seen["hook_pre_linear"], hf.up_proj(x))
    assert torch.allclose(seen["hook_post"], hf.act_fn(hf.gate_proj(x)) * hf.up_proj(x))
    # the expert form is the same computation without hooks
    expert = GatedExpert(cfg(act, bias))
    expert.load_state_dict(ours.state_dict())
    assert torch.allclose(expert(x.view(-1, D)), want.view(-1, D), atol=1e-6, rtol=0)


def test_transformer_lens_views_and_init():
    m = GatedMLP(cfg(bias=True))
    assert m.W_gate.shape == (D, F) and m.W_in.shape == (D, F) and m.W_out.shape == (F, D)
    assert m.b_in is m.up_proj.bias and m.b_out is m.down_proj.bias and m.b_gate is m.gate_proj.bias
    assert torch.equal(m.W_in, m.up_proj.weight.T)
    assert GatedMLP(cfg(bias=False)).b_in is None
    torch.manual_seed(0)
    m.reset_variant_parameters()
    assert m.down_proj.weight.std().item() == pytest.approx(0.02 / 2, rel=0.15)  # 1/sqrt(2 n_layers)


def test_activations_and_errors():
    x = torch.linspace(-3, 3, 11)
    assert torch.allclose(activation("gelu_new")(x), ACTIVATIONS["gelu_pytorch_tanh"](x))
    for name, fn in ACTIVATIONS.items():
        hf = transformers.activations.ACT2FN[name]
        assert torch.allclose(fn(x), hf(x), atol=1e-6), name
    with pytest.raises(ConfigError, match="act_fn"):
        activation("swish2")
