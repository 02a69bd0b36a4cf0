"""tinygpt.arch.rotary against Hugging Face's rotary embeddings (Llama default / linear / llama3, GPT-NeoX partial)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import transformers
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.gpt_neox import modeling_gpt_neox as neox
from transformers.models.llama import modeling_llama as llama

from tinygpt.arch.rotary import Rotary, inv_frequencies, normalize_rope_scaling
from tinygpt.config import ConfigError

H, DH = 3, 16
LLAMA3 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}


def cfg(**kw):
    base = dict(d_head=DH, rotary_dim=None, rotary_base=10000.0, rotary_adjacent_pairs=False, rope_scaling=None)
    return SimpleNamespace(**{**base, **kw})


def hf_llama_config(scaling=None, theta=10000.0):
    rope = {"rope_type": "default", "rope_theta": theta, **(scaling or {})}
    return transformers.LlamaConfig(
        hidden_size=H * DH, num_attention_heads=H, max_position_embeddings=64, rope_parameters=rope
    )


def x_and_pos(seed=0, b=2, t=9, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, t, H, DH, generator=g).to(dtype), torch.arange(5, 5 + t)


@pytest.mark.parametrize("scaling", [None, {"rope_type": "linear", "factor": 2.5}, LLAMA3], ids=str)
def test_matches_llama_rotary(scaling):
    hf_cfg = hf_llama_config(scaling, theta=500.0)
    rope = llama.LlamaRotaryEmbedding(hf_cfg)
    ours = Rotary(cfg(rotary_base=500.0, rope_scaling=scaling))
    assert torch.equal(ours._inv, rope.inv_freq)  # the same frequencies, bitwise
    x, pos = x_and_pos()
    cos, sin = rope(x, pos[None].expand(2, -1))
    want, _ = llama.apply_rotary_pos_emb(x.transpose(1, 2), x.transpose(1, 2), cos, sin)
    got = ours(x, pos)
    assert got.shape == x.shape
    assert torch.allclose(got, want.transpose(1, 2), atol=1e-6, rtol=0)
    assert not torch.allclose(got, x, atol=1e-2)  # it rotated something
    # an int start gives positions start..start+t-1; per-row positions [batch, pos] too
    assert torch.equal(ours(x, 5), got)
    assert torch.equal(ours(x, pos[None].expand(2, -1)), got)


def test_matches_hf_in_bfloat16():
    rope = llama.LlamaRotaryEmbedding(hf_llama_config())
    x, pos = x_and_pos(dtype=torch.bfloat16)
    cos, sin = rope(x, pos[None].expand(2, -1))
    want, _ = llama.apply_rotary_pos_emb(x.transpose(1, 2), x.transpose(1, 2), cos, sin)
    got = Rotary(cfg())(x, pos)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, want.transpose(1, 2))  # same op order and rounding


def test_partial_rotary_matches_gpt_neox():
    hf_cfg = transformers.GPTNeoXConfig(
        hidden_size=H * DH, num_attention_heads=H, rotary_pct=0.25, rotary_emb_base=10000, max_position_embeddings=64
    )
    rope = neox.GPTNeoXRotaryEmbedding(hf_cfg)
    ours = Rotary(cfg(rotary_dim=4))
    x, pos = x_and_pos(seed=1)
    cos, sin = rope(x, pos[None].expand(2, -1))
    want, _ = neox.apply_rotary_pos_emb(x.transpose(1, 2), x.transpose(1, 2), cos, sin)
    got = ours(x, pos)
    assert torch.allclose(got, want.transpose(1, 2), atol=1e-6, rtol=0)
    assert torch.equal(got[..., 4:], x[..., 4:])  # the rest passes through


def test_adjacent_pairs_rotate_each_pair_by_its_angle():
    x, pos = x_and_pos(t=4)
    got = Rotary(cfg(rotary_adjacent_pairs=True))(x, pos)
    a = pos.float()[:, None] * inv_frequencies(DH, 10000.0)  # [t, DH/2]
    c, s = a.cos()[None, :, None], a.sin()[None, :, None]
    even, odd = x[..., 0::2], x[..., 1::2]
    assert torch.allclose(got[..., 0::2], even * c - odd * s, atol=1e-6)
    assert torch.allclose(got[..., 1::2], odd * c + even * s, atol=1e-6)


def test_relative_positions_only():
    """q·k after rotation depends on the position difference only (the defining property)."""
    g = torch.Generator().manual_seed(3)
    q, k = torch.randn(1, 1, 1, DH, generator=g), torch.randn(1, 1, 1, DH, generator=g)
    rot = Rotary(cfg())
    d1 = (rot(q, 7) * rot(k, 3)).sum()
    d2 = (rot(q, 20) * rot(k, 16)).sum()
    assert torch.allclose(d1, d2, atol=1e-5)


def test_tables_grow_and_are_not_state():
    rot = Rotary(cfg())
    x, _ = x_and_pos(t=3)
    far = rot(x, 1000)  # beyond the first table
    assert rot._tables[(torch.device("cpu"), torch.float32)][0].shape[0] >= 1003
    assert list(rot.state_dict()) == []
    assert torch.allclose(far, rot(x, torch.arange(1000, 1003)))


def test_scaling_validation_names_the_problem():
    assert normalize_rope_scaling({"type": "default"}) is None
    assert normalize_rope_scaling({"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}) == {
        "rope_type": "linear",
        "factor": 2.0,
    }
    with pytest.raises(ConfigError, match="'yarn' is not supported"):
        normalize_rope_scaling({"rope_type": "yarn", "factor": 2.0})
    with pytest.raises(ConfigError, match="needs"):
        normalize_rope_scaling({"rope_type": "llama3", "factor": 2.0})
    with pytest.raises(ConfigError, match="rotary_dim"):
        Rotary(cfg(rotary_dim=5))
    for kind in ("linear", "llama3"):
        assert kind in ROPE_INIT_FUNCTIONS  # the HF names we follow exist
