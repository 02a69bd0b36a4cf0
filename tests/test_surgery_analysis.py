"""The pure functions under the surgery dashboards: spectra, LASER before/after, HQQ error grids, loss vs bits."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from tinygpt import GPT, GPTConfig, generate
from tinygpt.surgery import (
    LowRankLinear,
    hqq,
    hqq_,
    hqq_error_grid,
    hqq_loss_curve,
    hqq_quantize,
    laser,
    laser_,
    laser_compare,
    quantize_rtn,
    singular_values,
    validation_loss,
)


def make_model(n_layers: int = 2, d_model: int = 64, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(n_layers=n_layers, d_model=d_model, n_heads=2, n_ctx=64)).eval()


@pytest.fixture(scope="module")
def model() -> GPT:
    return make_model()


# ------------------------------------------------------------------------------------- spectra
def test_singular_values_match_torch_and_are_sorted(model):
    sp = singular_values(model, "all", [1])
    assert sp.layers == [1] and len(sp.targets) == 6
    for t in sp.targets:
        W = model.get_submodule(f"blocks.1.{t}").weight
        s = sp.spectrum(t, 1)
        assert sp.shapes[t] == tuple(W.shape)
        assert len(s) == min(W.shape) == len(sp.rank_fractions(t))
        assert np.allclose(s, torch.linalg.svdvals(W).tolist(), rtol=1e-5, atol=1e-7)
        assert all(a >= b for a, b in zip(s, s[1:]))
        assert sp.rank_fractions(t)[-1] == 1.0


def test_energy_kept_matches_the_laser_report(model):
    sp = singular_values(model, "mlp", None)
    for rho in (0.05, 0.3, 1.0):
        with laser(model, "mlp.fc_out", [0], rho) as report:
            pass
        assert sp.energy_kept("mlp.fc_out", 0, rho) == pytest.approx(report.entries[0].energy_kept, rel=1e-5)
    assert sp.energy_kept("mlp.fc_in", 1, 1.0) == pytest.approx(1.0)


def test_spectrum_traces_and_figures(model):
    sp = singular_values(model, "mlp", None)
    per_target = sp.traces(layer=1)
    assert [tr["name"] for tr in per_target] == sp.targets
    assert per_target[0]["y"] == sp.spectrum(sp.targets[0], 1)
    normed = sp.traces(layer=1, normalize=True)
    assert normed[1]["y"][0] == pytest.approx(1.0)
    assert normed[1]["y"][5] == pytest.approx(per_target[1]["y"][5] / per_target[1]["y"][0])
    per_layer = sp.traces(target="mlp.fc_in")
    assert [tr["name"] for tr in per_layer] == ["layer 0", "layer 1"]
    with pytest.raises(ValueError, match="exactly one"):
        sp.traces()
    assert len(sp.figure(layer=0).data) == 2
    assert len(sp.figure().data) == 2 * 2  # a line per layer in each target's panel


def test_singular_values_of_a_factored_layer_show_the_kept_rank():
    m = make_model(seed=3)
    laser_(m, "mlp.fc_in", [0], 0.125, factored=True)
    assert isinstance(m.blocks[0].mlp.fc_in, LowRankLinear)
    s = singular_values(m, "mlp.fc_in", [0]).spectrum("mlp.fc_in", 0)
    r = m.blocks[0].mlp.fc_in.rank  # floor(0.125 * 64) = 8
    assert r == 8
    assert s[r - 1] > 1e-3 and max(s[r:]) < 1e-5 * s[0]


def test_singular_values_reject_bad_selections(model):
    with pytest.raises(ValueError, match="unknown target"):
        singular_values(model, "mlp.fc_middle")
    with pytest.raises(ValueError, match="out of range"):
        singular_values(model, "mlp", [5])


# ------------------------------------------------------------------------------------- laser_compare
def test_laser_compare_restores_the_model_and_reports_both_sides(
    model, tokens, snapshot, assert_bitwise_equal, loss_of
):
    snap = snapshot(model)
    cmp = laser_compare(model, "fc_out", -1, 0.05, tokens, prompt="ab", max_new_tokens=12, seed=4)
    assert_bitwise_equal(model, snap)
    assert cmp.intervention.layer == 1 and cmp.intervention.target == "mlp.fc_out"
    assert cmp.loss_before == pytest.approx(loss_of(model, tokens), abs=1e-6)
    with laser(model, "mlp.fc_out", [1], 0.05):
        after = loss_of(model, tokens)
        sample_after = generate(model, "ab", 12, temperature=0.8, seed=4)
    assert cmp.loss_after == pytest.approx(after, abs=1e-6)
    assert cmp.loss_after != cmp.loss_before
    assert cmp.delta == pytest.approx(cmp.loss_after - cmp.loss_before)
    assert cmp.sample_before == generate(model, "ab", 12, temperature=0.8, seed=4)
    assert cmp.sample_after == sample_after
    assert cmp.report.entries[0].rank_kept == 3  # floor(0.05 * 64)
    text = cmp.to_html()
    assert f"{cmp.loss_before:.4f}" in text and f"{cmp.loss_after:.4f}" in text
    assert "&lt;b&gt;x" in dataclasses.replace(cmp, sample_after="<b>x").to_html()  # samples are escaped


def test_laser_compare_full_rank_changes_nothing(model, tokens):
    cmp = laser_compare(model, "mlp.fc_in", 0, 1.0, tokens, prompt="x", max_new_tokens=8)
    assert cmp.loss_after == pytest.approx(cmp.loss_before, abs=1e-4)


def test_laser_compare_takes_exactly_one_matrix(model, tokens):
    with pytest.raises(ValueError, match="one target"):
        laser_compare(model, "mlp", 0, 0.5, tokens)
    with pytest.raises(ValueError, match="one layer"):
        laser_compare(model, "mlp.fc_in", [0, 1], 0.5, tokens)
    with pytest.raises(ValueError, match="rank_fraction"):
        laser_compare(model, "mlp.fc_in", 0, 0.0, tokens)


# ------------------------------------------------------------------------------------- HQQ error grid
@pytest.fixture(scope="module")
def grid(model):
    return hqq_error_grid(model, bits=(2, 3, 4, 8), group_sizes=(16, 32, 128), progress=False)


def test_grid_values_are_the_quantizers_errors(model, grid):
    W = model.blocks[1].attn.v_proj.weight
    assert grid.error("rtn", 1, "attn.v_proj", 3, 16) == pytest.approx(quantize_rtn(W, 3, 16).rel_error(W))
    assert grid.error("hqq", 1, "attn.v_proj", 3, 16) == pytest.approx(hqq_quantize(W, 3, 16).rel_error(W))
    W = model.blocks[0].mlp.fc_out.weight  # in_features 256: group 128 fits
    assert grid.error("hqq", 0, "mlp.fc_out", 2, 128) == pytest.approx(hqq_quantize(W, 2, 128).rel_error(W))
    assert len(grid.rows()) == 2 * 6 * 4 * 3


def test_grid_errors_are_sane(grid):
    for r in grid.rows():
        if r["group_size"] == 128 and r["target"] != "mlp.fc_out":
            continue
        assert 0 < r["hqq_error"] <= r["rtn_error"] + 1e-9, r
    for t in grid.targets:
        for layer in grid.layers:
            for m in ("rtn", "hqq"):
                tab = grid.table(m, layer, t)
                for k in range(len(grid.group_sizes)):
                    col = [row[k] for row in tab]
                    if not math.isnan(col[0]):
                        assert all(a > b for a, b in zip(col, col[1:])), (m, t, layer, col)  # more bits, less error
                for row in tab:  # smaller groups, less error
                    finite = [v for v in row if not math.isnan(v)]
                    assert all(a < b for a, b in zip(finite, finite[1:])), (m, t, layer, row)
    assert grid.table("hqq", 1, "mlp.fc_out")[0][0] > 0.2 > 0.01 > grid.table("hqq", 1, "mlp.fc_out")[3][0]


def test_grid_marks_group_sizes_that_do_not_fit_and_averages_the_rest(grid):
    # group 128 only divides mlp.fc_out (in_features 256); the others have in_features 64
    assert math.isnan(grid.error("rtn", 0, "attn.q_proj", 4, 128))
    assert not math.isnan(grid.error("rtn", 0, "mlp.fc_out", 4, 128))
    mean = grid.table("rtn")
    assert mean[2][2] == pytest.approx(
        (grid.error("rtn", 0, "mlp.fc_out", 4, 128) + grid.error("rtn", 1, "mlp.fc_out", 4, 128)) / 2
    )
    cells = [grid.error("hqq", ly, t, 3, 32) for t in grid.targets for ly in grid.layers]
    assert grid.table("hqq")[1][1] == pytest.approx(sum(cells) / len(cells))
    per_layer = [grid.error("hqq", 1, t, 3, 32) for t in grid.targets]
    assert grid.table("hqq", layer=1)[1][1] == pytest.approx(sum(per_layer) / len(per_layer))


def test_grid_leaves_the_model_alone_and_validates(model, snapshot, assert_bitwise_equal):
    snap = snapshot(model)
    hqq_error_grid(model, bits=(4,), group_sizes=(32,), targets="mlp", layers=[0], progress=False)
    assert_bitwise_equal(model, snap)
    with pytest.raises(ValueError, match="divides none"):
        hqq_error_grid(model, bits=(4,), group_sizes=(48,), progress=False)
    with pytest.raises(ValueError, match="bits"):
        hqq_error_grid(model, bits=(0,), progress=False)
    with pytest.raises(ValueError, match="group sizes must be positive"):
        hqq_error_grid(model, bits=(4,), group_sizes=(-32,), progress=False)


def test_grid_histograms_and_residuals(model, grid):
    W = model.blocks[0].mlp.fc_in.weight
    res = grid.residual(0, "mlp.fc_in", 4, 32, "rtn")
    assert torch.allclose(res, W - quantize_rtn(W, 4, 32).dequantize())
    h = grid.residual_histogram(0, "mlp.fc_in", 4, 32, n_bins=41)
    assert len(h["edges"]) == 42 and len(h["centers"]) == len(h["rtn"]) == len(h["hqq"]) == 41
    assert sum(h["rtn"]) == sum(h["hqq"]) == W.numel()
    assert h["hqq_error"] == grid.error("hqq", 0, "mlp.fc_in", 4, 32)
    big = float(res.abs().max())
    assert max(abs(h["edges"][0]), h["edges"][-1]) >= big - 1e-12
    fig = grid.histogram(0, "mlp.fc_in", 4, 32, n_bins=41)
    assert [list(tr.y) for tr in fig.data] == [h["rtn"], h["hqq"]]
    with pytest.raises(ValueError, match="no stored weight"):
        grid.residual(0, "mlp.fc_middle", 4, 32)


def test_grid_figures_show_the_tables(grid):
    fig = grid.figure(layer=1, target="mlp.fc_in")
    assert len(fig.data) == 2
    np.testing.assert_allclose(np.array(fig.data[0].z, dtype=float), grid.table("rtn", 1, "mlp.fc_in"))
    np.testing.assert_allclose(np.array(fig.data[1].z, dtype=float), grid.table("hqq", 1, "mlp.fc_in"))
    assert list(fig.data[0].x) == ["16", "32", "128"] and list(fig.data[0].y) == ["2-bit", "3-bit", "4-bit", "8-bit"]
    lf = grid.layer_figure(4, 32, "hqq")
    z = np.array(lf.data[0].z, dtype=float)
    assert z.shape == (2, 6) and z[1, 5] == grid.error("hqq", 1, grid.targets[5], 4, 32)
    assert grid.figure().data[1].z[0][2] is not None  # mean over the matrices that fit


# ------------------------------------------------------------------------------------- HQQ loss vs bits
def test_loss_curve(model, tokens, snapshot, assert_bitwise_equal, loss_of):
    snap = snapshot(model)
    curve = hqq_loss_curve(model, tokens, bits=(2, 4, 8), group_size=32, progress=False)
    assert_bitwise_equal(model, snap)
    assert curve.base_loss == pytest.approx(loss_of(model, tokens), abs=1e-6)
    with hqq(model, 2, 32, optimize=False):
        assert curve.rtn[0] == pytest.approx(loss_of(model, tokens), abs=1e-6)
    with hqq(model, 4, 32):
        assert curve.hqq[1] == pytest.approx(loss_of(model, tokens), abs=1e-6)
    # weight errors fall with bits and HQQ's are lower; 8 bits is nearly lossless, 2 bits is not
    assert curve.rtn_error[0] > curve.rtn_error[1] > curve.rtn_error[2]
    assert all(h < r for h, r in zip(curve.hqq_error, curve.rtn_error))
    assert abs(curve.rtn[2] - curve.base_loss) < 1e-3
    assert abs(curve.rtn[0] - curve.base_loss) > abs(curve.rtn[2] - curve.base_loss)
    fig = curve.figure()
    assert [list(tr.y) for tr in fig.data] == [curve.rtn, curve.hqq]
    assert [r["bits"] for r in curve.rows()] == [2, 4, 8]
    with pytest.raises(ValueError, match="group_size"):
        hqq_loss_curve(model, tokens, bits=(4,), group_size=48, progress=False)


# ------------------------------------------------------------------------------------- validation_loss
def test_validation_loss_matches_a_direct_evaluation_and_works_on_packed_models(tokens, loss_of):
    m = make_model(seed=5)
    assert validation_loss(m, tokens) == pytest.approx(loss_of(m, tokens), abs=1e-6)
    with hqq(m, 4, 32) as _:
        dense = validation_loss(m, tokens)
    hqq_(m, 4, 32, packed=True)
    assert validation_loss(m, tokens) == pytest.approx(dense, abs=1e-5)
    stream = torch.randint(0, 256, (500,), generator=torch.Generator().manual_seed(2))
    assert validation_loss(m, stream, ctx=32, n_windows=4) == pytest.approx(
        validation_loss(m, torch.stack([stream[s : s + 33] for s in (0, 155, 311, 467)])), abs=1e-6
    )
