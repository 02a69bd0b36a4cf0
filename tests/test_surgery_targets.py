"""The one target grammar (`tinygpt.surgery.targets`): names, groups, layers, MoE experts, LoRA's patterns."""

from __future__ import annotations

import pytest
import torch

from tinygpt import GPT, GPTConfig
from tinygpt.surgery import resolve_layers, resolve_targets
from tinygpt.surgery.targets import SurgeryError, select_linears, select_modules

N_EXPERTS = 3


def make_moe(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    cfg = GPTConfig(n_layers=2, d_model=32, n_heads=2, n_ctx=32, moe_experts=N_EXPERTS, moe_topk=2)
    return GPT(cfg).eval()


# ------------------------------------------------------------------------------------- selection
def test_resolve_layers_forms():
    assert resolve_layers(None, 12) == list(range(12))
    assert resolve_layers("8-11", 12) == [8, 9, 10, 11]
    assert resolve_layers("0,2,5", 12) == [0, 2, 5]
    assert resolve_layers("0-1, 5", 12) == [0, 1, 5]
    assert resolve_layers(-1, 12) == [11]
    assert resolve_layers([3, 1, 3], 12) == [1, 3]
    assert resolve_layers(range(2, 4), 12) == [2, 3]
    for bad, msg in [
        (12, "out of range"),
        ("10-12", "out of range"),
        ("3-1", "empty"),
        ("a", "cannot parse"),
        ([1.5], "ints"),
        ([], "no layers"),
        (True, "ints"),
    ]:
        with pytest.raises(ValueError, match=msg):
            resolve_layers(bad, 12)


def test_resolve_targets_forms():
    assert resolve_targets("mlp") == ["mlp.fc_in", "mlp.fc_out", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    assert resolve_targets("attn") == ["attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj"]
    assert len(resolve_targets("all")) == 9
    assert resolve_targets("down_proj,q_proj") == ["attn.q_proj", "mlp.down_proj"]  # HF leaf names
    assert (
        resolve_targets("moe.experts")
        == resolve_targets("experts")
        == [f"moe.experts.{leaf}" for leaf in ("fc_in", "fc_out", "gate_proj", "up_proj", "down_proj")]
    )
    assert resolve_targets(["fc_out", "attn.q_proj"]) == ["attn.q_proj", "mlp.fc_out"]
    assert resolve_targets("mlp.fc_in,mlp.fc_in") == ["mlp.fc_in"]
    with pytest.raises(ValueError, match="unknown target 'mlp.fc'.*mlp.fc_in, mlp.fc_out"):
        resolve_targets("mlp.fc")


# ------------------------------------------------------------------------------------- mixture of experts
def test_resolution_on_moe_blocks():
    model = make_moe()
    per_expert = [f"moe.experts.{j}.fc_out" for j in range(N_EXPERTS)]
    assert [t for ly, t, _ in select_linears(model, "mlp.fc_out", [0])] == per_expert
    assert [t for _, t, _ in select_linears(model, "moe.experts.fc_out", [1])] == per_expert
    assert [t for _, t, _ in select_linears(model, "moe.experts.2.fc_in", None)] == ["moe.experts.2.fc_in"] * 2
    chosen = select_linears(model, "all", None)
    names = [f"blocks.{ly}.{t}" for ly, t, _ in chosen]
    assert len(names) == len(set(names)) == 2 * (4 + 2 * N_EXPERTS)  # every matrix once, each labelled uniquely
    assert all(model.get_submodule(n) is lin for n, (_, _, lin) in zip(names, chosen, strict=True))
    # "mlp" plus an explicit expert does not select that expert twice
    assert len(select_linears(model, "mlp,moe.experts.1.fc_in", [0])) == 2 * N_EXPERTS


def test_bad_moe_targets_have_clear_errors():
    model = make_moe()
    with pytest.raises(
        ValueError,
        match=r"unknown target 'moe.experts.fc_mid'.*moe.experts.\{j\}.<leaf>, <leaf> one of fc_in, fc_out, gate_proj",
    ):
        resolve_targets("moe.experts.fc_mid")
    with pytest.raises(ValueError, match="unknown target 'moe.router'"):
        resolve_targets("moe.router")
    with pytest.raises(ValueError, match=r"has 3 experts \(valid indices 0..2\)"):
        select_linears(model, "moe.experts.3.fc_out", None)
    dense = GPT(GPTConfig(n_layers=2, d_model=32, n_heads=2, n_ctx=32))
    with pytest.raises(ValueError, match="no `moe.experts`"):
        select_linears(dense, "moe.experts.fc_in", None)
    assert len(select_linears(dense, "mlp", None)) == 4  # dense models are unchanged


# ------------------------------------------------------------------------------------- patterns (LoRA)
def test_patterns_reach_any_linear_layer_and_name_what_they_miss():
    model = make_moe()
    assert resolve_targets("moe.experts.*.fc_in", patterns=True) == ["moe.experts.*.fc_in"]
    assert resolve_targets("o_proj,moe.router", patterns=True) == ["attn.o_proj", "moe.router"]  # leaves first
    with pytest.raises(SurgeryError, match="unknown target"):
        resolve_targets("moe.experts.*.fc_in")  # LASER and HQQ take names only
    got = select_modules(model, "moe.experts.*.fc_in,attn.v_proj", 0, dense_only=False, patterns=True)
    assert [t for _, t, _ in got] == ["attn.v_proj"] + [f"moe.experts.{j}.fc_in" for j in range(N_EXPERTS)]
    assert [t for _, t, _ in select_modules(model, "moe.router", None, patterns=True)] == ["moe.router"] * 2
    with pytest.raises(SurgeryError, match="names ln1 \\(LayerNorm\\), not a linear layer"):
        select_modules(model, "ln1", None, patterns=True)
    with pytest.raises(SurgeryError, match="matches no linear layer in blocks.0; its linear layers are: attn.k_proj"):
        select_modules(model, "mlp.gate", None, patterns=True)
    assert select_modules(model, None, [1], patterns=True, default="attn.q_proj")[0][:2] == (1, "attn.q_proj")
    assert isinstance(SurgeryError("x"), ValueError)


# ------------------------------------------------------------------------------------- Llama-style and HF-style MoE
def make_llama(seed: int = 0, **kw) -> GPT:
    torch.manual_seed(seed)
    cfg = GPTConfig(
        n_layers=2, d_model=32, n_heads=4, n_key_value_heads=2, d_mlp=48, n_ctx=32, positional_embedding_type="rotary",
        normalization_type="RMS", gated_mlp=True, act_fn="silu", bias=False, **kw,
    )  # fmt: skip
    return GPT(cfg).eval()


def test_gated_mlp_and_gqa_matrices_are_targets():
    model = make_llama()
    names = [t for ly, t, _ in select_linears(model, "all", 0)]
    assert names == ["attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj"] + [
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
    ]  # fmt: skip
    assert [t for _, t, _ in select_linears(model, "mlp", 1)] == ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    ((_, _, k),) = select_linears(model, "k_proj", 0)
    assert tuple(k.weight.shape) == (2 * 8, 32)  # GQA: n_key_value_heads * d_head rows
    with pytest.raises(SurgeryError, match="'mlp.fc_in' is in none.*has attn.q_proj.*mlp.gate_proj, mlp.up_proj"):
        select_linears(model, "fc_in", None)


@pytest.mark.parametrize("style", ["mixtral", "qwen2_moe"])
def test_hf_style_experts_are_targets(style):
    shared = 24 if style == "qwen2_moe" else 0
    model = make_llama(moe_experts=N_EXPERTS, moe_topk=2, moe_style=style, moe_shared_d_mlp=shared)
    ex = [f"moe.experts.{j}.gate_proj" for j in range(N_EXPERTS)]
    plus = ["moe.shared_expert.gate_proj"] if shared else []
    assert [t for _, t, _ in select_linears(model, "gate_proj", 0)] == ex + plus
    assert [t for _, t, _ in select_linears(model, "moe.experts.gate_proj", 0)] == ex  # the routed experts only
    mlp = select_linears(model, "mlp", None)
    assert len(mlp) == 2 * 3 * (N_EXPERTS + bool(shared))  # every expert matrix, routers excluded
    assert all(isinstance(m, torch.nn.Linear) and "router" not in t and "_gate" not in t for _, t, m in mlp)
    assert len(select_linears(model, "experts", 1)) == 3 * N_EXPERTS
    assert [t for _, t, _ in select_linears(model, "moe.experts.1.down_proj", 1)] == ["moe.experts.1.down_proj"]
    with pytest.raises(SurgeryError, match=r"in none.*moe.experts.\{0..2\}.gate_proj"):
        select_linears(model, "moe.experts.fc_in", None)
    dense = make_llama()
    with pytest.raises(SurgeryError, match="no weight matrices selected"):
        select_linears(dense, "experts", None)  # a group naming nothing in the model
