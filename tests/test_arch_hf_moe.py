"""tinygpt.arch.hf_moe against Hugging Face's MixtralSparseMoeBlock and Qwen2MoeSparseMoeBlock on random weights."""

from __future__ import annotations

import pytest
import torch
import transformers
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock

from tinygpt.arch.hf_moe import HFMoE
from tinygpt.config import ConfigError, GPTConfig

D, F, N, K, S = 24, 20, 4, 2, 12


def ours_cfg(style, **kw):
    cfg = GPTConfig(n_layers=2, d_model=D, n_heads=2, d_mlp=F, moe_experts=N, moe_topk=K, moe_style=style, **kw)
    cfg.act_fn = "silu"  # what HFMoE's experts read (set after validation: independent of GPTConfig's act_fn list)
    return cfg


def fill(hf_block, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in hf_block.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return hf_block.eval()


def copy_experts(ours, hf):
    """HF v5 fuses experts: gate_up_proj [N, 2F, D] (gate rows first), down_proj [N, D, F]."""
    with torch.no_grad():
        ours.router.weight.copy_(hf.gate.weight)
        for j, e in enumerate(ours.experts):
            gate, up = hf.experts.gate_up_proj[j].chunk(2, dim=0)
            e.gate_proj.weight.copy_(gate)
            e.up_proj.weight.copy_(up)
            e.down_proj.weight.copy_(hf.experts.down_proj[j])


def x(seed=1):
    return torch.randn(2, 7, D, generator=torch.Generator().manual_seed(seed))


def test_matches_mixtral():
    hf = fill(MixtralSparseMoeBlock(transformers.MixtralConfig(
        hidden_size=D, intermediate_size=F, num_local_experts=N, num_experts_per_tok=K, num_attention_heads=2,
        num_key_value_heads=2,
    )))  # fmt: skip
    ours = HFMoE(ours_cfg("mixtral"), 0).eval()
    copy_experts(ours, hf)
    seen = {}
    for name in ("hook_router_logits", "hook_expert_indices", "hook_expert_weights"):
        getattr(ours, name).add_hook(lambda t, hook, name=name: seen.setdefault(name, t))
    with torch.no_grad():
        want, got = hf(x()), ours(x())
    assert want.abs().max() > 0.1
    assert torch.allclose(got, want, atol=1e-5, rtol=0), (got - want).abs().max()
    assert seen["hook_router_logits"].shape == (2, 7, N) and seen["hook_router_logits"].dtype == torch.float32
    assert seen["hook_expert_indices"].shape == (2, 7, K)
    assert torch.allclose(seen["hook_expert_weights"].sum(-1), torch.ones(2, 7))  # renormalised
    assert sorted(ours.state_dict()) == sorted(
        ["router.weight"] + [f"experts.{j}.{p}_proj.weight" for j in range(N) for p in ("gate", "up", "down")]
    )


@pytest.mark.parametrize("norm_topk", [True, False])
def test_matches_qwen2_moe_with_shared_expert(norm_topk):
    hf = fill(Qwen2MoeSparseMoeBlock(transformers.Qwen2MoeConfig(
        hidden_size=D, moe_intermediate_size=F, shared_expert_intermediate_size=S, num_experts=N,
        num_experts_per_tok=K, norm_topk_prob=norm_topk, num_attention_heads=2, num_key_value_heads=2,
    )), seed=2)  # fmt: skip
    ours = HFMoE(ours_cfg("qwen2_moe", moe_norm_topk=norm_topk, moe_shared_d_mlp=S), 1).eval()
    copy_experts(ours, hf)
    with torch.no_grad():
        for name in ("gate_proj", "up_proj", "down_proj"):
            getattr(ours.shared_expert, name).weight.copy_(getattr(hf.shared_expert, name).weight)
        ours.shared_expert_gate.weight.copy_(hf.shared_expert_gate.weight)
        seen = {}
        ours.hook_expert_weights.add_hook(lambda t, hook: seen.setdefault("w", t))
        ours.hook_shared_gate.add_hook(lambda t, hook: seen.setdefault("g", t))
        want, got = hf(x(3)), ours(x(3))
    assert torch.allclose(got, want, atol=1e-5, rtol=0), (got - want).abs().max()
    sums = seen["w"].sum(-1)
    assert torch.allclose(sums, torch.ones(2, 7)) == norm_topk
    assert seen["g"].shape == (2, 7, 1) and ((seen["g"] > 0) & (seen["g"] < 1)).all()


def test_edited_routing_runs_and_training_sets_aux_loss():
    ours = HFMoE(ours_cfg("mixtral"), 0)
    ours.hook_expert_indices.add_hook(lambda t, hook: torch.zeros_like(t))  # everything to expert 0 (twice)
    ours.eval()
    with torch.no_grad():
        out = ours(x())
    with torch.no_grad():
        e0 = ours.experts[0](x().view(-1, D)).view(2, 7, D)
    assert torch.allclose(out, e0, atol=1e-6)  # weights sum to 1 over two copies of expert 0
    ours.hook_expert_indices.remove_hooks()
    ours.train()
    ours(x()).sum().backward()
    assert ours.aux_loss is not None and ours.aux_loss.item() > 0
    assert ours.router.weight.grad is not None
    assert set(ours.metrics()) >= {"moe/l0/entropy", "moe/l0/dead"}


def test_config_refuses_qwen_options_elsewhere():
    with pytest.raises(ConfigError, match="moe_shared_d_mlp"):
        ours_cfg("mixtral", moe_shared_d_mlp=8)
    with pytest.raises(ConfigError, match="moe_style"):
        ours_cfg("deepseek")
    with pytest.raises(ConfigError, match="moe_style"):
        HFMoE(ours_cfg("tinygpt"), 0)
