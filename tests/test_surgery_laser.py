"""LASER rank reduction: the math, model surgery (dense and factored), restoration, sweeps, CLI."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

import tinygpt
from tinygpt import GPT, GPTConfig
from tinygpt.cli import main
from tinygpt.surgery import (
    PAPER_GRID,
    LowRankLinear,
    kept_rank,
    laser,
    laser_,
    laser_greedy,
    laser_sweep,
    low_rank,
)


def make_model(n_layers: int = 4, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(n_layers=n_layers, d_model=32, n_heads=2, n_ctx=64)).eval()


# ------------------------------------------------------------------------------------- the math
def test_low_rank_identity_at_full_rank():
    torch.manual_seed(0)
    W = torch.randn(48, 32)
    assert torch.allclose(low_rank(W, 1.0), W, atol=1e-5)


@pytest.mark.parametrize("shape,rho", [((48, 32), 0.25), ((32, 80), 0.5), ((64, 64), 0.01)])
def test_low_rank_has_kept_rank_and_is_optimal(shape, rho):
    torch.manual_seed(0)
    W = torch.randn(*shape)
    r = math.floor(rho * min(shape)) or 1
    Wr = low_rank(W, rho)
    assert Wr.shape == W.shape and Wr.dtype == W.dtype
    assert torch.linalg.matrix_rank(Wr) == r
    S = torch.linalg.svdvals(W)
    # Eckart–Young: the error is exactly the energy of the discarded singular values.
    assert torch.allclose((W - Wr).norm(), S[r:].norm(), rtol=1e-4)


def test_low_rank_keeps_dtype_and_explicit_rank():
    torch.manual_seed(0)
    W = torch.randn(16, 24, dtype=torch.bfloat16)
    out = low_rank(W, rank=3)
    assert out.dtype == torch.bfloat16
    assert torch.linalg.matrix_rank(out.float(), rtol=1e-2) == 3
    with pytest.raises(ValueError, match="exactly one"):
        low_rank(W, 0.5, rank=3)
    with pytest.raises(ValueError, match="1..16"):
        low_rank(W, rank=17)


def test_kept_rank_floor_and_minimum():
    assert kept_rank((100, 100), 0.29) == 29  # 0.29 * 100 = 28.999999999999996 in floats
    assert kept_rank((128, 32), 0.9) == 28
    assert kept_rank((128, 32), 0.01) == 1
    for bad in (0.0, -0.1, 1.5, "0.5", True):
        with pytest.raises(ValueError, match="rank_fraction"):
            kept_rank((4, 4), bad)


def test_paper_grid():
    assert PAPER_GRID == (0.9, 0.8, 0.6, 0.4, 0.2, 0.1, 0.05, 0.01)


# ------------------------------------------------------------------------------------- on a model
def test_laser_inplace_reduces_rank_and_touches_nothing_else(snapshot):
    model = make_model()
    before = snapshot(model)
    report = laser_(model, "mlp.fc_out", layers="2-3", rank_fraction=0.25)
    for layer in (2, 3):
        W = model.blocks[layer].mlp.fc_out.weight
        assert torch.linalg.matrix_rank(W) == 8  # floor(0.25 * min(32, 128))
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {"blocks.2.mlp.fc_out.weight", "blocks.3.mlp.fc_out.weight"}
    assert [(e.layer, e.target, e.shape, e.rank_before, e.rank_kept) for e in report.entries] == [
        (2, "mlp.fc_out", (32, 128), 32, 8),
        (3, "mlp.fc_out", (32, 128), 32, 8),
    ]
    W0 = before["blocks.2.mlp.fc_out.weight"]
    rel = float((W0 - model.blocks[2].mlp.fc_out.weight.detach()).norm() / W0.norm())
    assert report.entries[0].rel_error == pytest.approx(rel, rel=1e-4)
    assert "blocks.2.mlp.fc_out" in str(report)


def test_laser_context_manager_restores_bitwise(tokens, snapshot, assert_bitwise_equal):
    model = make_model()
    before = snapshot(model)
    base = model(tokens, return_type="loss")
    with laser(model, "all", None, 0.05) as report:
        assert len(report.entries) == 4 * 6
        assert not torch.equal(model.blocks[0].attn.q_proj.weight, before["blocks.0.attn.q_proj.weight"])
        assert model(tokens, return_type="loss") != base
    assert_bitwise_equal(model, before)
    assert torch.equal(model(tokens, return_type="loss"), base)
    # also when the body raises
    with pytest.raises(RuntimeError, match="boom"), laser(model, "mlp", [0], 0.1, factored=True):
        assert isinstance(model.blocks[0].mlp.fc_in, LowRankLinear)
        raise RuntimeError("boom")
    assert type(model.blocks[0].mlp.fc_in) is nn.Linear
    assert model.mod_dict["blocks.0.mlp.fc_in"] is model.blocks[0].mlp.fc_in
    assert_bitwise_equal(model, before)
    assert not getattr(model, "surgery_log", [])


def test_factored_matches_dense_and_shrinks(tokens):
    dense, fact = make_model(), make_model()
    n0 = fact.n_params()
    laser_(dense, "mlp.fc_in", [1, 3], 0.125)
    report = laser_(fact, "mlp.fc_in", [1, 3], 0.125, factored=True)
    mod = fact.get_submodule("blocks.3.mlp.fc_in")
    assert isinstance(mod, LowRankLinear) and mod.rank == 4
    assert mod.A.shape == (4, 32) and mod.B.shape == (128, 4) and mod.bias.shape == (128,)
    assert fact.n_params() == n0 - 2 * (128 * 32 - 4 * (128 + 32))
    assert report.params_removed == 2 * (128 * 32 - 4 * (128 + 32))
    assert torch.allclose(fact(tokens), dense(tokens), atol=1e-5)
    assert torch.allclose(fact.W_in[3], dense.W_in[3], atol=1e-6)  # TL-style views still work
    assert "blocks.3.mlp.fc_in.A" in fact.state_dict()


def test_factored_storage_larger_than_dense_warns(tokens, loss_of):
    model = make_model(2)
    before = loss_of(model, tokens)
    with pytest.warns(UserWarning, match="only saves space below rank 25"):  # 128*32 // (128+32)
        report = laser_(model, "mlp.fc_in", 0, 1.0, factored=True)
    assert report.params_removed < 0
    assert loss_of(model, tokens) == pytest.approx(before, abs=1e-5)  # full rank: the same function


def test_factored_model_saves_loads_and_generates(tmp_path, tokens):
    model = make_model()
    laser_(model, "attn.o_proj", -1, 0.1, factored=True)
    laser_(model, "mlp.fc_out", [0], 0.5)  # a dense reduction on top: recorded in the log
    _, cache = model.run_with_cache(tokens)
    assert cache["blocks.3.hook_attn_out"].shape == (4, 33, 32)
    path = model.save(tmp_path / "m.tinygpt")
    loaded = tinygpt.load(path)
    assert isinstance(loaded.blocks[3].attn.o_proj, LowRankLinear)
    assert torch.equal(loaded(tokens), model(tokens))
    assert [e["op"] for e in loaded.surgery_log] == ["laser", "laser"]
    out = loaded.generate(tokens[:1, :5], max_new_tokens=6, seed=0)
    assert out.shape == (1, 11)
    assert "surgery     1 low_rank modules" in tinygpt.describe(path)
    # a second save of the loaded model round-trips too
    again = tinygpt.load(loaded.save(tmp_path / "m2.tinygpt"))
    assert torch.equal(again(tokens), model(tokens))


def test_corrupt_surgery_record_is_a_checkpoint_error(tmp_path):
    model = make_model(2)
    laser_(model, "mlp.fc_in", 0, 0.5, factored=True)
    ckpt = tinygpt.read_checkpoint(model.save(tmp_path / "m.tinygpt"))
    ckpt.manifest["surgery"]["modules"]["blocks.0.mlp.fc_in"]["type"] = "mystery"
    with pytest.raises(tinygpt.CheckpointError, match="mystery"):
        tinygpt.load(ckpt)


@pytest.mark.parametrize(
    "kwargs,msg",
    [
        ({"layers": 4}, "layer 4 is out of range for a 4-layer model"),
        ({"layers": "2-7"}, "out of range"),
        ({"target": "mlp.fc_mid"}, r"unknown target.*valid targets: attn.q_proj"),
        ({"rank_fraction": 0.0}, r"rank_fraction must be in \(0, 1\]"),
        ({"rank_fraction": 1.2}, "rank_fraction"),
    ],
)
def test_bad_arguments_modify_nothing(kwargs, msg, snapshot, assert_bitwise_equal):
    model = make_model()
    before = snapshot(model)
    args = {"target": "mlp", "layers": None, "rank_fraction": 0.5, **kwargs}
    with pytest.raises(ValueError, match=msg):
        laser_(model, args["target"], args["layers"], args["rank_fraction"], factored=True)
    with pytest.raises(ValueError, match=msg), laser(model, args["target"], args["layers"], args["rank_fraction"]):
        pass
    assert_bitwise_equal(model, before)
    assert all(type(b.mlp.fc_in) is nn.Linear for b in model.blocks)


def test_already_factored_matrix_is_refused():
    model = make_model(2)
    laser_(model, "mlp.fc_in", 0, 0.5, factored=True)
    with pytest.raises(ValueError, match="blocks.0.mlp.fc_in is a LowRankLinear"):
        laser_(model, "mlp", None, 0.5)
    assert type(model.blocks[1].mlp.fc_in) is nn.Linear  # nothing was done to layer 1 either


# ------------------------------------------------------------------------------------- sweeps
def test_sweep_matches_single_interventions(tokens, snapshot, assert_bitwise_equal, loss_of):
    model = make_model(2)
    before = snapshot(model)
    res = laser_sweep(model, tokens, "mlp.fc_in", None, fractions=(1.0, 0.5, 0.05), progress=False)
    assert_bitwise_equal(model, before)
    assert res.base_loss == pytest.approx(loss_of(model, tokens), abs=1e-6)
    for layer in (0, 1):
        assert res.loss("mlp.fc_in", layer, 1.0) == pytest.approx(res.base_loss, abs=1e-4)
        for f in (0.5, 0.05):
            with laser(model, "mlp.fc_in", [layer], f):
                expected = loss_of(model, tokens)
            assert res.loss("mlp.fc_in", layer, f) == pytest.approx(expected, abs=1e-6)
    iv, loss = res.best()
    assert loss == min(r["loss"] for r in res.rows())
    assert res.loss(iv.target, iv.layer, iv.rank_fraction) == loss
    fig = res.figure()
    assert sum(t.type == "scatter" for t in fig.data) == 2
    heat = [t for t in fig.data if t.type == "heatmap"][0]
    assert len(heat.z) == 2 and len(heat.z[0]) == 3


def test_sweep_on_token_stream_and_text():
    model = make_model(2)
    stream = torch.randint(0, 256, (500,), generator=torch.Generator().manual_seed(0))
    res = laser_sweep(model, stream, "attn.v_proj", [1], fractions=(0.5,), ctx=32, n_windows=4, progress=False)
    assert res.n_tokens == 4 * 32
    res = laser_sweep(model, "To be, or not to be, that is the question.", "mlp", 0, (0.2,), progress=False)
    assert set(res.losses) == {"mlp.fc_in", "mlp.fc_out"}
    with pytest.raises(ValueError, match="fractions is empty"):
        laser_sweep(model, stream, "mlp", 0, (), progress=False)


def test_greedy_keeps_only_improvements(tokens, snapshot, assert_bitwise_equal, loss_of):
    model = make_model(2)
    with torch.no_grad():  # a full-rank perturbation that rank reduction can remove
        g = torch.Generator().manual_seed(3)
        model.blocks[1].mlp.fc_out.weight.add_(torch.randn(32, 128, generator=g) * 0.5)
    before = snapshot(model)
    res = laser_greedy(model, tokens, "mlp", None, fractions=(0.5, 0.1, 0.01), progress=False)
    assert_bitwise_equal(model, before)
    assert [s["layer"] for s in res.steps] == [1, 1, 0, 0]  # last layer first
    assert res.interventions and res.loss < res.base_loss
    for s in res.steps:
        assert s["kept"] == (s["loss_after"] < s["loss_before"])
    res.apply(model)
    assert loss_of(model, tokens) == pytest.approx(res.loss, abs=1e-6)


# ------------------------------------------------------------------------------------- CLI
@pytest.fixture
def saved(tmp_path):
    return make_model().save(tmp_path / "in.tinygpt")


def test_cli_laser_end_to_end(saved, tmp_path, capsys):
    out = tmp_path / "out" / "laser.tinygpt"
    rc = main(
        [
            "laser",
            str(saved),
            "--target",
            "mlp.fc_out",
            "--layers",
            "2-3",
            "--rank-fraction",
            "0.25",
            "--factored",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    text = capsys.readouterr().out
    assert "blocks.3.mlp.fc_out" in text and "wrote" in text
    assert out.stat().st_size < saved.stat().st_size
    model = tinygpt.load(out)
    assert isinstance(model.blocks[2].mlp.fc_out, LowRankLinear) and model.blocks[2].mlp.fc_out.rank == 8
    assert model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4, seed=0).shape == (1, 7)


@pytest.mark.parametrize(
    "args,msg",
    [
        (["--target", "mlp", "--layers", "4", "--rank-fraction", "0.5"], "out of range"),
        (["--target", "mlp.fc", "--layers", "0", "--rank-fraction", "0.5"], "unknown target"),
        (["--target", "mlp", "--rank-fraction", "0"], "rank_fraction"),
    ],
)
def test_cli_laser_bad_arguments_write_nothing(saved, tmp_path, capsys, args, msg):
    out = tmp_path / "never.tinygpt"
    assert main(["laser", str(saved), *args, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and msg in err and err.startswith("tinygpt laser: error:")
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.tinygpt"]


def test_sweep_with_a_task_metric(tokens):
    model = make_model(2)

    def accuracy(m) -> float:  # next-token top-1 accuracy on the batch
        return float((m(tokens[:, :-1]).argmax(-1) == tokens[:, 1:]).float().mean())

    res = laser_sweep(model, tokens, "mlp", None, (0.5, 0.05), metric=accuracy, progress=False)
    assert res.base_metric == accuracy(model)
    for layer in (0, 1):
        with laser(model, "mlp.fc_in", [layer], 0.05):
            assert res.metrics["mlp.fc_in"][layer][1] == accuracy(model)
    assert all(r["metric"] == res.metrics[r["target"]][r["layer"]][res.fractions.index(r["rank_fraction"])]
               for r in res.rows())  # fmt: skip
    iv, score = res.best(by="metric")
    assert score == max(r["metric"] for r in res.rows()) and res.best()[1] == min(r["loss"] for r in res.rows())
    with pytest.raises(ValueError, match="by must be 'loss' or"):
        laser_sweep(model, tokens, "mlp", 0, (0.5,), progress=False).best(by="metric")
