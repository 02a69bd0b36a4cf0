"""The HQQ analyses under the dashboard (`tinygpt.surgery.hqq.analysis`): error grids, loss vs bits."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from _surgery_helpers import make_model

from tinygpt import GPT
from tinygpt.surgery import hqq, hqq_error_grid, hqq_loss_curve, hqq_quantize, quantize_rtn


@pytest.fixture(scope="module")
def model() -> GPT:
    return make_model()


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


def test_grid_figure_of_one_method(grid):
    fig = grid.figure(1, "attn.k_proj", method="rtn")
    (heat,) = fig.data
    assert heat.type == "heatmap" and fig.layout.title.text == "RTN: layer 1 attn.k_proj"
    z = np.array([[np.nan if v is None else v for v in row] for row in heat.z], dtype=float)
    np.testing.assert_allclose(z, grid.table("rtn", 1, "attn.k_proj"))
    assert np.isnan(z[0, 2])  # group 128 does not divide in_features 64: an empty cell
    assert list(heat.x) == ["16", "32", "128"] and list(heat.y) == ["2-bit", "3-bit", "4-bit", "8-bit"]
    assert heat.zmax == pytest.approx(np.nanmax(z)) and heat.zmin == 0
    fixed = grid.figure(None, "mlp.fc_in", method="hqq", zmax=grid.max_error())
    assert fixed.layout.title.text == "HQQ: mean over all layers, mlp.fc_in"
    assert fixed.data[0].zmax == max(v for r in grid.rows() for v in (r["rtn_error"], r["hqq_error"]) if v == v)
    np.testing.assert_allclose(np.array(fixed.data[0].z, dtype=float), grid.table("hqq", None, "mlp.fc_in"))
    assert grid.figure(method="hqq").layout.title.text == "HQQ: mean over all matrices"
    with pytest.raises(ValueError, match="method"):
        grid.figure(method="gptq")
    two = grid.figure(0, "mlp.fc_out", zmax=1.0)  # the two-panel figure takes the fixed scale too
    assert [t.zmax for t in two.data] == [1.0, 1.0]


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
