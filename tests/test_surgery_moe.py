"""Weight surgery (LASER, HQQ) on Mixture-of-Experts models: `mlp.*` targets reach every expert's matrices."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import tinygpt
from tinygpt import GPT, GPTConfig
from tinygpt.surgery import PackedQuantLinear, hqq_, laser, laser_, resolve_targets
from tinygpt.surgery.common import select_linears

N_EXPERTS = 3
LEAVES = ("fc_in", "fc_out")


def make_moe(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    cfg = GPTConfig(n_layers=2, d_model=32, n_heads=2, n_ctx=32, moe_experts=N_EXPERTS, moe_topk=2)
    return GPT(cfg).eval()


def expert_weight(model: GPT, layer: int, j: int, leaf: str) -> torch.Tensor:
    return model.get_submodule(f"blocks.{layer}.moe.experts.{j}.{leaf}").weight


@pytest.fixture
def tokens() -> torch.Tensor:
    return torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))


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
    with pytest.raises(ValueError, match=r"unknown target 'moe.experts.fc_mid'.*moe.experts.\{j\}.fc_out"):
        resolve_targets("moe.experts.fc_mid")
    with pytest.raises(ValueError, match="unknown target 'moe.router'"):
        resolve_targets("moe.router")
    with pytest.raises(ValueError, match=r"has 3 experts \(valid indices 0..2\)"):
        select_linears(model, "moe.experts.3.fc_out", None)
    dense = GPT(GPTConfig(n_layers=2, d_model=32, n_heads=2, n_ctx=32))
    with pytest.raises(ValueError, match="no `moe.experts`"):
        select_linears(dense, "moe.experts.fc_in", None)
    assert len(select_linears(dense, "mlp", None)) == 4  # dense models are unchanged


def test_laser_reduces_every_expert_rank_and_context_restores(tokens):
    model = make_moe()
    full = {
        (ly, j): int(torch.linalg.matrix_rank(expert_weight(model, ly, j, "fc_out")))
        for ly in (0, 1)
        for j in range(N_EXPERTS)
    }
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out_before = model(tokens)
    with laser(model, "mlp.fc_out", layers=[0, 1], rank_fraction=0.5) as report:
        assert sorted(e.name for e in report.entries) == sorted(
            f"blocks.{ly}.moe.experts.{j}.fc_out" for ly in (0, 1) for j in range(N_EXPERTS)
        )
        for (ly, j), r in full.items():
            assert int(torch.linalg.matrix_rank(expert_weight(model, ly, j, "fc_out"))) < r
            assert int(torch.linalg.matrix_rank(expert_weight(model, ly, j, "fc_in"))) == min(128, 32)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert torch.equal(model(tokens), out_before)

    laser_(model, "mlp.fc_out", layers=[1], rank_fraction=0.5)
    for j in range(N_EXPERTS):
        assert int(torch.linalg.matrix_rank(expert_weight(model, 1, j, "fc_out"))) < full[(1, j)]
        assert torch.equal(expert_weight(model, 0, j, "fc_out"), before[f"blocks.0.moe.experts.{j}.fc_out.weight"])


def test_hqq_mlp_group_changes_every_expert_matrix(tokens):
    model = make_moe()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = hqq_(model, bits=4, group_size=16, targets="mlp")
    assert len(report.entries) == 2 * 2 * N_EXPERTS
    after = model.state_dict()
    for ly in (0, 1):
        for j in range(N_EXPERTS):
            for leaf in LEAVES:
                k = f"blocks.{ly}.moe.experts.{j}.{leaf}.weight"
                assert not torch.equal(before[k], after[k])
                assert len(torch.unique(after[k][0, :16])) <= 16  # one 4-bit group: at most 16 levels
    for k in ("blocks.0.attn.q_proj.weight", "blocks.1.moe.router.weight"):
        assert torch.equal(before[k], after[k])
    logits = model(tokens)
    assert logits.shape == (2, 16, 256) and torch.isfinite(logits).all()


def test_packed_hqq_on_experts_round_trips(tmp_path, tokens):
    model = make_moe()
    report = hqq_(model, bits=4, group_size=16, targets="moe.experts.fc_out,moe.experts.0.fc_in", packed=True)
    names = {e.name for e in report.entries}
    assert names == {f"blocks.{ly}.moe.experts.{j}.fc_out" for ly in (0, 1) for j in range(N_EXPERTS)} | {
        "blocks.0.moe.experts.0.fc_in",
        "blocks.1.moe.experts.0.fc_in",
    }
    assert all(isinstance(model.get_submodule(n), PackedQuantLinear) for n in names)
    assert type(model.get_submodule("blocks.0.moe.experts.1.fc_in")) is nn.Linear
    path = model.save(tmp_path / "moe_q4.tinygpt")
    loaded = tinygpt.load(path).eval()
    assert all(isinstance(loaded.get_submodule(n), PackedQuantLinear) for n in names)
    assert torch.equal(loaded(tokens), model(tokens))
