"""Every surgery function on every architecture variant (dense, MoE, MoD, diff-attn, YOCO; `arch_model` fixture),
and LASER / HQQ on Mixture-of-Experts models in detail (formerly tests/test_surgery_moe.py).

What "every matrix" means is computed independently of the surgery code: every `nn.Linear` inside the blocks
except routers (MoE's `moe.router`, MoD's `router`). On MoE blocks those are the experts' matrices; YOCO's
cross-decoder blocks have only `attn.q_proj` / `attn.o_proj` (their keys and values come from `yoco_kv`).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

import tinygpt
from tinygpt.cli import main
from tinygpt.surgery import (
    LowRankLinear,
    PackedQuantLinear,
    hqq,
    hqq_,
    hqq_error_grid,
    hqq_loss_curve,
    hqq_quantize,
    kept_rank,
    laser,
    laser_,
    laser_compare,
    laser_greedy,
    laser_sweep,
    quantize_rtn,
    singular_values,
)
from tinygpt.surgery.targets import select_linears, target_sort_key


def block_matrices(model) -> dict[str, nn.Linear]:
    """Every weight matrix surgery should reach: `nn.Linear`s under `blocks.` that are not routers."""
    return {
        name: m
        for name, m in model.named_modules()
        if type(m) is nn.Linear and name.startswith("blocks.") and not name.endswith("router")
    }


def split(name: str) -> tuple[int, str]:
    """ "blocks.1.moe.experts.2.fc_in" -> (1, "moe.experts.2.fc_in")."""
    _, layer, target = name.split(".", 2)
    return int(layer), target


def expected_targets(model) -> list[str]:
    return sorted({split(n)[1] for n in block_matrices(model)}, key=target_sort_key)


def logits(model, tokens) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens)


# ------------------------------------------------------------------------------------- selection
def test_all_and_mlp_select_every_block_matrix(arch_model):
    model = arch_model
    want = block_matrices(model)
    chosen = select_linears(model, "all", None)
    assert {f"blocks.{ly}.{t}" for ly, t, _ in chosen} == set(want)
    assert len(chosen) == len(want)  # each once
    assert all(want[f"blocks.{ly}.{t}"] is lin for ly, t, lin in chosen)
    mlp = {f"blocks.{ly}.{t}" for ly, t, _ in select_linears(model, "mlp", None)}
    assert mlp == {n for n in want if n.endswith(("fc_in", "fc_out"))} and mlp


# ------------------------------------------------------------------------------------- LASER
def test_laser_reduces_every_rank_and_restores(arch_model, tokens, snapshot, assert_bitwise_equal, loss_of):
    model = arch_model
    snap, out_before, base = snapshot(model), logits(model, tokens), loss_of(model, tokens)
    with laser(model, "all", None, 0.25) as report:
        assert {e.name for e in report.entries} == set(block_matrices(model))
        for e in report.entries:
            W = model.get_submodule(e.name).weight
            assert e.rank_kept == kept_rank(W.shape, 0.25) < e.rank_before
            assert int(torch.linalg.matrix_rank(W)) == e.rank_kept
        assert not torch.equal(logits(model, tokens), out_before)
    assert_bitwise_equal(model, snap)
    assert torch.equal(logits(model, tokens), out_before)
    laser_(model, "all", None, 1.0)  # ρ = 1 reproduces the model
    assert loss_of(model, tokens) == pytest.approx(base, abs=1e-5)


def test_factored_laser_saves_loads_and_shrinks(arch_model, tmp_path, tokens):
    model = arch_model
    n_before = sum(p.numel() for p in model.parameters())
    report = laser_(model, "mlp", None, 0.1, factored=True)
    names = {n for n in block_matrices(arch_model) if n.endswith(("fc_in", "fc_out"))} | {
        e.name for e in report.entries
    }
    assert {e.name for e in report.entries} == names
    assert all(isinstance(model.get_submodule(n), LowRankLinear) for n in names)
    assert sum(p.numel() for p in model.parameters()) == n_before - report.params_removed < n_before
    loaded = tinygpt.load(model.save(tmp_path / "factored.tinygpt")).eval()
    assert all(isinstance(loaded.get_submodule(n), LowRankLinear) for n in names)
    assert torch.equal(logits(loaded, tokens), logits(model, tokens))


def test_sweep_covers_every_matrix_and_matches_single_interventions(
    arch_model, tokens, snapshot, assert_bitwise_equal, loss_of
):
    model = arch_model
    snap = snapshot(model)
    res = laser_sweep(model, tokens, "all", None, (0.5, 0.1), progress=False)
    assert_bitwise_equal(model, snap)
    assert res.targets == expected_targets(model) and res.layers == [0, 1]
    have = set(block_matrices(model))
    for t in res.targets:
        for i, layer in enumerate(res.layers):
            present = f"blocks.{layer}.{t}" in have
            assert all(math.isnan(v) for v in res.losses[t][i]) != present, (t, layer)
    assert len(res.rows()) == 2 * len(have) and not any(math.isnan(r["loss"]) for r in res.rows())
    for t, layer, _ in (res.swept()[0], res.swept()[-1]):
        with laser(model, t, [layer], 0.1):
            assert res.loss(t, layer, 0.1) == pytest.approx(loss_of(model, tokens), abs=1e-6)
    iv, loss = res.best()
    assert loss == min(r["loss"] for r in res.rows()) and res.loss(iv.target, iv.layer, iv.rank_fraction) == loss
    fig = res.figure()
    assert sum(tr.type == "scatter" for tr in fig.data) == len(have)
    assert len(next(tr for tr in fig.data if tr.type == "heatmap").z) == len(have)


def test_greedy_composition_restores_and_applies(arch_model, tokens, snapshot, assert_bitwise_equal, loss_of):
    model = arch_model
    snap = snapshot(model)
    res = laser_greedy(model, tokens, "all", None, (0.5, 0.05), progress=False)
    assert_bitwise_equal(model, snap)
    assert len(res.steps) == len(block_matrices(model))
    assert [s["layer"] for s in res.steps] == sorted((s["layer"] for s in res.steps), reverse=True)
    for s in res.steps:
        assert s["kept"] == (s["loss_after"] < s["loss_before"])
    res.apply(model)
    assert loss_of(model, tokens) == pytest.approx(res.loss, abs=1e-5)


def test_singular_values_of_every_matrix(arch_model):
    model = arch_model
    spec = singular_values(model, "all")
    assert spec.targets == expected_targets(model)
    have = block_matrices(model)
    for t in spec.targets:
        for layer in spec.layers:
            name = f"blocks.{layer}.{t}"
            if name in have:
                want = torch.linalg.svdvals(have[name].weight.detach())
                assert spec.spectrum(t, layer) == pytest.approx(want.tolist(), rel=1e-4, abs=1e-6)
            else:
                assert spec.spectrum(t, layer) == []
                with pytest.raises(ValueError, match=f"block {layer} has no {t}"):
                    spec.energy_kept(t, layer, 0.5)
        assert spec.layers_of(t) == sorted(split(n)[0] for n in have if split(n)[1] == t)
    assert len(spec.figure(layer=1).data) == len(spec.targets)


def test_laser_compare_on_a_concrete_matrix(arch_model, tokens, snapshot, assert_bitwise_equal, loss_of):
    model = arch_model
    target = next(t for t in expected_targets(model) if t.endswith("fc_out"))  # an expert's on MoE models
    snap = snapshot(model)
    cmp = laser_compare(model, target, 1, 0.05, tokens, prompt="ab", max_new_tokens=6, seed=1)
    assert_bitwise_equal(model, snap)
    assert [e.name for e in cmp.report.entries] == [f"blocks.1.{target}"]
    assert cmp.loss_before == pytest.approx(loss_of(model, tokens), abs=1e-6)
    with laser(model, target, [1], 0.05):
        assert cmp.loss_after == pytest.approx(loss_of(model, tokens), abs=1e-6)
    assert target in cmp.to_html()


# ------------------------------------------------------------------------------------- HQQ
def test_hqq_context_inplace_and_packed_round_trip(
    arch_model, tmp_path, tokens, snapshot, assert_bitwise_equal, loss_of
):
    model = arch_model
    fp32 = model.save(tmp_path / "fp32.tinygpt")
    snap, base = snapshot(model), loss_of(model, tokens)
    with hqq(model, 8, 16, "all") as report:  # 8 bits: identity within quantization error
        assert {e.name for e in report.entries} == set(block_matrices(model))
        assert max(e.error for e in report.entries) < 0.01
        assert loss_of(model, tokens) == pytest.approx(base, abs=2e-3)
    assert_bitwise_equal(model, snap)
    dense = tinygpt.load(fp32).eval()
    hqq_(dense, 4, 16, "all")
    report = hqq_(model, 4, 16, "all", packed=True)
    assert all(isinstance(model.get_submodule(e.name), PackedQuantLinear) for e in report.entries)
    torch.testing.assert_close(logits(model, tokens), logits(dense, tokens), atol=1e-5, rtol=0)
    path = model.save(tmp_path / "q4.tinygpt")
    assert path.stat().st_size < fp32.stat().st_size
    loaded = tinygpt.load(path).eval()
    assert torch.equal(logits(loaded, tokens), logits(model, tokens))


def test_hqq_error_grid_and_loss_curve(arch_model, tokens, snapshot, assert_bitwise_equal, loss_of):
    model = arch_model
    snap = snapshot(model)
    grid = hqq_error_grid(model, (3, 8), (16,), "all", iters=5, progress=False)
    assert grid.targets == expected_targets(model)
    have = block_matrices(model)
    for t in grid.targets:
        for layer in grid.layers:
            name = f"blocks.{layer}.{t}"
            rtn, hq = grid.error("rtn", layer, t, 3, 16), grid.error("hqq", layer, t, 3, 16)
            if name not in have:
                assert math.isnan(rtn) and math.isnan(hq)
                continue
            W = have[name].weight.detach()
            assert rtn == pytest.approx(quantize_rtn(W, 3, 16).rel_error(W))
            assert hq == pytest.approx(hqq_quantize(W, 3, 16, iters=5).rel_error(W)) and hq < rtn
    curve = hqq_loss_curve(model, tokens, (3, 8), 16, "all", iters=5, progress=False)
    assert_bitwise_equal(model, snap)
    assert curve.targets == grid.targets and curve.base_loss == pytest.approx(loss_of(model, tokens), abs=1e-6)
    assert curve.hqq[1] == pytest.approx(curve.base_loss, abs=2e-3)
    with hqq(model, 3, 16, "all", iters=5):
        assert curve.hqq[0] == pytest.approx(loss_of(model, tokens), abs=1e-6)


# ------------------------------------------------------------------------------------- CLI
def test_cli_laser_and_hqq_on_files(arch_model, tmp_path, tokens, capsys):
    model = arch_model
    src = model.save(tmp_path / "in.tinygpt")
    out = tmp_path / "laser.tinygpt"
    assert main(["laser", str(src), "--target", "mlp.fc_out", "--layers", "1", "--rank-fraction", "0.25",
                 "--factored", "--out", str(out)]) == 0  # fmt: skip
    names = [n for n in block_matrices(model) if n.startswith("blocks.1.") and n.endswith("fc_out")]
    text = capsys.readouterr().out
    assert all(n in text for n in names)
    lasered = tinygpt.load(out).eval()
    assert all(isinstance(lasered.get_submodule(n), LowRankLinear) for n in names)
    laser_(model, "mlp.fc_out", [1], 0.25, factored=True)
    torch.testing.assert_close(logits(lasered, tokens), logits(model, tokens), atol=1e-6, rtol=0)

    out = tmp_path / "q4.tinygpt"
    assert main(["hqq", str(src), "--bits", "4", "--group-size", "16", "--packed", "--out", str(out)]) == 0
    assert "HQQ 4-bit" in capsys.readouterr().out and out.stat().st_size < src.stat().st_size
    quantized = tinygpt.load(out).eval()
    assert all(isinstance(quantized.get_submodule(n), PackedQuantLinear) for n in block_matrices(model))
    reference = tinygpt.load(src).eval()
    hqq_(reference, 4, 16, packed=True)
    assert torch.equal(logits(quantized, tokens), logits(reference, tokens))


# ------------------------------------------------------------------------------------- YOCO and MoE names
def yoco_model():
    torch.manual_seed(0)
    return tinygpt.GPT(tinygpt.GPTConfig(n_layers=4, d_model=32, n_heads=2, n_ctx=64, yoco=True)).eval()


def test_yoco_cross_decoder_keys_and_values_are_shared():
    model = yoco_model()  # blocks 0-1 self-decoder, 2-3 cross-decoder
    assert [ly for ly, _, _ in select_linears(model, "attn.k_proj", None)] == [0, 1]
    assert [t for _, t, _ in select_linears(model, "attn", [3])] == ["attn.q_proj", "attn.o_proj"]
    with pytest.raises(ValueError, match=r"'attn.v_proj' is in none of the selected blocks \(layers 2-3\).*yoco_kv"):
        laser_(model, "attn.v_proj", "2-3", 0.5)
    assert not getattr(model, "surgery_log", None)


def test_cli_error_on_a_matrix_the_blocks_lack_writes_nothing(tmp_path, capsys):
    src = yoco_model().save(tmp_path / "yoco.tinygpt")
    for cmd in (["laser", "--rank-fraction", "0.5"], ["hqq", "--group-size", "16"]):
        out = tmp_path / "never.tinygpt"
        args = [cmd[0], str(src), "--target", "attn.k_proj", "--layers", "3", *cmd[1:], "--out", str(out)]
        assert main(args) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"tinygpt {cmd[0]}: error:") and "yoco_kv" in err and len(err.splitlines()) == 1
        assert not out.exists()


def test_moe_expert_names_in_sweeps_and_grids(tokens):
    torch.manual_seed(0)
    model = tinygpt.GPT(tinygpt.GPTConfig(n_layers=2, d_model=32, n_heads=2, n_ctx=64, moe_experts=4)).eval()
    res = laser_sweep(model, tokens, "moe.experts.fc_in,moe.experts.3.fc_out", [1], (0.5,), progress=False)
    assert res.targets == [f"moe.experts.{j}.fc_in" for j in range(4)] + ["moe.experts.3.fc_out"]
    grid = hqq_error_grid(model, (4,), (16,), "mlp", [0], iters=2, progress=False)
    assert grid.targets == [f"moe.experts.{j}.{leaf}" for leaf in ("fc_in", "fc_out") for j in range(4)]
    with pytest.raises(ValueError, match=r"has 4 experts \(valid indices 0..3\)"):
        singular_values(model, "moe.experts.4.fc_in")


# ------------------------------------------------------------------------------------- mixture of experts
# (LASER, HQQ on MoE models: `mlp.*` targets reach every expert's matrices)
N_EXPERTS = 3
LEAVES = ("fc_in", "fc_out")


def make_moe(seed: int = 0) -> tinygpt.GPT:
    torch.manual_seed(seed)
    cfg = tinygpt.GPTConfig(n_layers=2, d_model=32, n_heads=2, n_ctx=32, moe_experts=N_EXPERTS, moe_topk=2)
    return tinygpt.GPT(cfg).eval()


def expert_weight(model: tinygpt.GPT, layer: int, j: int, leaf: str) -> torch.Tensor:
    return model.get_submodule(f"blocks.{layer}.moe.experts.{j}.{leaf}").weight


@pytest.fixture
def moe_tokens() -> torch.Tensor:
    return torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))


def test_laser_reduces_every_expert_rank_and_context_restores(moe_tokens):
    model = make_moe()
    full = {
        (ly, j): int(torch.linalg.matrix_rank(expert_weight(model, ly, j, "fc_out")))
        for ly in (0, 1)
        for j in range(N_EXPERTS)
    }
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out_before = model(moe_tokens)
    with laser(model, "mlp.fc_out", layers=[0, 1], rank_fraction=0.5) as report:
        assert sorted(e.name for e in report.entries) == sorted(
            f"blocks.{ly}.moe.experts.{j}.fc_out" for ly in (0, 1) for j in range(N_EXPERTS)
        )
        for (ly, j), r in full.items():
            assert int(torch.linalg.matrix_rank(expert_weight(model, ly, j, "fc_out"))) < r
            assert int(torch.linalg.matrix_rank(expert_weight(model, ly, j, "fc_in"))) == min(128, 32)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert torch.equal(model(moe_tokens), out_before)

    laser_(model, "mlp.fc_out", layers=[1], rank_fraction=0.5)
    for j in range(N_EXPERTS):
        assert int(torch.linalg.matrix_rank(expert_weight(model, 1, j, "fc_out"))) < full[(1, j)]
        assert torch.equal(expert_weight(model, 0, j, "fc_out"), before[f"blocks.0.moe.experts.{j}.fc_out.weight"])


def test_hqq_mlp_group_changes_every_expert_matrix(moe_tokens):
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
    logits = model(moe_tokens)
    assert logits.shape == (2, 16, 256) and torch.isfinite(logits).all()


def test_packed_hqq_on_experts_round_trips(tmp_path, moe_tokens):
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
    assert torch.equal(loaded(moe_tokens), model(moe_tokens))
